//! One agent pipeline: queue, deadline, fallback between targets, and per
//! target retry, circuit breaker, rate limit and attempt timeout, in the
//! order that makes them right.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::classify::HttpError;
//! use llm_resilience::pipeline::AgentPipeline;
//! use llm_resilience::report::with_report;
//! use tower::util::BoxCloneSyncService;
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_resilience::BoxError> {
//! // Any tower::Service is a client; here one provider is down.
//! type Client = BoxCloneSyncService<String, String, HttpError>;
//! let primary: Client = BoxCloneSyncService::new(service_fn(|_: String| async {
//!     Err::<String, _>(HttpError::new(401)) // a revoked key: permanent, move on
//! }));
//! let backup: Client = BoxCloneSyncService::new(service_fn(|q: String| async move {
//!     Ok::<_, HttpError>(format!("summary of {q}"))
//! }));
//!
//! let agent = AgentPipeline::builder()
//!     .target("gpt-4o", primary)
//!     .fallback("gpt-4o-mini", backup)
//!     .queue(1_000, 32)
//!     .deadline(Duration::from_secs(60))
//!     .build()?;
//!
//! let (reply, report) = with_report(agent.clone().oneshot("the ticket".to_owned())).await;
//! assert_eq!(reply?, "summary of the ticket");
//! assert_eq!(report.answered_by.as_deref(), Some("gpt-4o-mini"));
//! # Ok(()) }
//! ```
//!
//! # The order, and why
//!
//! ```text
//! Queue               admission: bounded, backpressure or reject; counts logical requests
//!  └ Fallback         targets in order, one deadline across all of them
//!     └ per target:
//!        Retry          classify, backoff + jitter, server hints, budget
//!         └ Breaker     sees every attempt; fails fast while open
//!          └ RateLimit  requests and tokens per minute, 429 pauses; charged per attempt
//!           └ AttemptTimeout   one attempt, not the wait for the limiter's turn
//!            └ client   the target's LLM client (any tower::Service)
//! ```
//!
//! The queue is outermost so that its capacity counts logical requests and a
//! caller that gives up frees its place before anything is paid for. The
//! deadline counts from the pipeline's `call` and bounds everything: queue
//! wait, attempts, backoff sleeps and every target (a request whose deadline
//! passes while it waits is never sent). That costs one clock read per call. Fallback wraps whole per-target stacks,
//! so each target keeps its own retry budget and breaker: an outage of one
//! provider opens its breaker, and the next calls skip it at no cost until
//! it is probed again. The breaker sits under the retry so that it sees every
//! attempt (the true health of the upstream) and a retry never hammers an
//! open circuit. There is exactly one retry layer per target: nested retries
//! multiply (3 × 3 × 5 = 45 attempts has been seen in the wild). The rate
//! limiter sits under the breaker, so it is charged per attempt but not while
//! the circuit is open, and over the attempt timeout, so a call's wait for
//! its turn is not taken from its attempt. Its own refusals (a wait longer
//! than it allows) send nothing: the breaker does not count them and the
//! retry does not repeat them ([`TargetClassifier`]); the fallback skips the
//! target. A 429's `Retry-After` pauses every call to that target for the
//! hinted time: callers wait in the limiter's line when the pause ends
//! before their deadline and their maximum wait, and move on to the next
//! target at once otherwise. Either way the target is sent nothing during
//! the pause.
//!
//! # Defaults
//!
//! Retry and breaker start from their LLM defaults
//! ([`RetryLayer::builder`](crate::retry::RetryLayer::builder),
//! [`CircuitBreakerLayer::builder`](crate::breaker::CircuitBreakerLayer::builder)),
//! changed with [`AgentPipelineBuilder::retry`] and
//! [`AgentPipelineBuilder::breaker`]; the attempt timeout is the retry's
//! ([`LLM_ATTEMPT_TIMEOUT`](crate::retry::LLM_ATTEMPT_TIMEOUT)), applied
//! under the rate limiter. Each target's rate limiter starts with **no
//! limit of its own** ([`AgentPipelineBuilder::rate_limit`] says why and
//! how to set your account's): it pauses on 429 hints and follows the
//! provider's rate-limit headers. The queue holds 1 000 waiting requests
//! with 32 in flight and waits when full; the deadline is
//! [`DEFAULT_DEADLINE`].
//!
//! # Streaming
//!
//! A pipeline over a streaming client (`OpenAiClient::streaming()`,
//! `AnthropicClient::streaming()`, or any service whose response is a
//! [`GuardedResponse`](crate::guard::GuardedResponse)) is built with
//! [`hold_until_stream_end`](AgentPipelineBuilder::hold_until_stream_end):
//! a call keeps its queue slot until its stream ends or is dropped (so the
//! concurrency bounds the streams being read, not only the calls waiting
//! for a first chunk), and each target's breaker records how the stream
//! ended (a cut mid-stream is a failure). Retries and fallback act only
//! before the first chunk, as the clients answer only once it arrived.
//!
//! # The report
//!
//! Wrap a call in [`with_report`](crate::report::with_report) to learn what
//! happened: time queued, attempts per target, backoff slept, the target that
//! answered, targets skipped and why, degraded or not. Nothing changes for
//! callers who do not ask.

mod builder;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
mod config;
mod target;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::breaker::{BreakerHandle, CircuitBreaker};
use crate::error::{BoxError, Error};
use crate::fallback::{self, Fallback};
use crate::guard::{AtResponse, Mode};
use crate::queue::{NoDeadline, Queue, QueueHandle};
use crate::ratelimit::{RateLimit, RateLimitHandle};
use crate::report;
use crate::retry::Retry;
use crate::util::time;

pub use self::builder::{AgentPipelineBuilder, DEFAULT_DEADLINE};
#[cfg(feature = "config")]
pub use self::config::{
    BreakerConfig, ConfigFileError, PipelineConfig, ProviderConfig, QueueConfig, RateLimitConfig,
    RetryConfig, TargetConfig, WhenFullConfig, WhenLimitedConfig,
};
pub use self::target::{
    AttemptFuture, AttemptTimeout, Estimate, TargetClassifier, TargetService, Usage,
};

/// One target's stack: retry over breaker over rate limit over attempt
/// timeout over the client (whose breaker records at the stream's end in
/// [`AtStreamEnd`](crate::guard::AtStreamEnd) mode), shared by the
/// fallback and cloned for a call when it is its turn.
pub type TargetStack<C, Req, Res, H = AtResponse> = TargetService<
    Retry<
        CircuitBreaker<
            RateLimit<AttemptTimeout<C>, Estimate<Req>, Usage<Res>>,
            TargetClassifier<<H as Mode>::Classifier>,
        >,
        TargetClassifier,
    >,
>;

type PipelineQueue<C, Req, Res, H> = Queue<
    ReportQueued<Fallback<TargetStack<C, Req, Res, H>, Req, Res>>,
    PriorityFn<Req>,
    NoDeadline,
    H,
>;

/// How the pipeline's queue reads a request's class: a plain function, or
/// every request [`Priority::Normal`](crate::queue::Priority::Normal).
pub struct PriorityFn<Req>(Option<fn(&Req) -> crate::queue::Priority>);

impl<Req> Clone for PriorityFn<Req> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req> Copy for PriorityFn<Req> {}

impl<Req> fmt::Debug for PriorityFn<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PriorityFn")
            .field(&self.0.is_some())
            .finish()
    }
}

impl<Req: 'static> crate::queue::PriorityOf<Req> for PriorityFn<Req> {
    #[inline]
    fn priority(&self, req: &Req) -> crate::queue::Priority {
        match self.0 {
            Some(f) => f(req),
            None => crate::queue::Priority::Normal,
        }
    }
}

impl<Req: 'static> crate::queue::PriorityOf<Deadlined<Req>> for PriorityFn<Req> {
    #[inline]
    fn priority(&self, req: &Deadlined<Req>) -> crate::queue::Priority {
        crate::queue::PriorityOf::<Req>::priority(self, &req.request)
    }
}

/// A request on its way through the pipeline's queue, with the deadline
/// the pipeline's `call` gave it (the fallback never runs past it).
#[derive(Debug)]
pub struct Deadlined<Req> {
    request: Req,
    deadline: tokio::time::Instant,
}

/// The whole pipeline as one `Clone + Send` tower `Service`; see the
/// [module docs](self). `H` is [`AtResponse`], or
/// [`AtStreamEnd`](crate::guard::AtStreamEnd) for a
/// client that streams ([`AgentPipelineBuilder::hold_until_stream_end`]).
pub struct AgentPipeline<C, Req, Res, H: Mode = AtResponse> {
    // The handles live with the fallback, behind the same reference count
    // (a clone per request touches one count fewer).
    inner: PipelineQueue<C, Req, Res, H>,
}

pub(crate) struct Handles {
    deadline: std::time::Duration,
    queue: QueueHandle,
    breakers: Vec<(Arc<str>, BreakerHandle)>,
    limits: Vec<(Arc<str>, RateLimitHandle)>,
}

impl<C: Clone, Req, Res, H: Mode> Clone for AgentPipeline<C, Req, Res, H> {
    fn clone(&self) -> Self {
        AgentPipeline {
            inner: self.inner.clone(),
        }
    }
}

impl<C, Req, Res, H: Mode> fmt::Debug for AgentPipeline<C, Req, Res, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentPipeline")
            .field(
                "targets",
                &self
                    .handles()
                    .breakers
                    .iter()
                    .map(|b| &*b.0)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<C, Req, Res> AgentPipeline<C, Req, Res> {
    /// A builder with the LLM defaults and no targets yet.
    pub fn builder() -> AgentPipelineBuilder<C, Req, Res> {
        AgentPipelineBuilder::default()
    }
}

impl<C, Req, Res, H: Mode> AgentPipeline<C, Req, Res, H> {
    fn handles(&self) -> &Handles {
        &self.inner.get_ref().inner.handles
    }

    /// The queue's handle (depth, in flight, shutdown).
    pub fn queue(&self) -> &QueueHandle {
        &self.handles().queue
    }

    /// The breaker of the target named `name`.
    pub fn breaker(&self, name: &str) -> Option<&BreakerHandle> {
        self.handles()
            .breakers
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, h)| h)
    }

    /// Every target's name and breaker, in order.
    pub fn breakers(&self) -> impl Iterator<Item = (&str, &BreakerHandle)> {
        self.handles().breakers.iter().map(|(n, h)| (&**n, h))
    }

    /// The rate limiter of the target named `name` (what it would admit
    /// now, its 429 pause, its line).
    pub fn rate_limit(&self, name: &str) -> Option<&RateLimitHandle> {
        self.handles()
            .limits
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, h)| h)
    }
}

impl<C, Req, Res, H: Mode> Service<Req> for AgentPipeline<C, Req, Res, H>
where
    PipelineQueue<C, Req, Res, H>: Service<Deadlined<Req>, Response = Res, Error = Error>,
{
    type Response = Res;
    type Error = Error;
    type Future =
        PipelineFuture<<PipelineQueue<C, Req, Res, H> as Service<Deadlined<Req>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // The deadline counts from here and goes with the request through
        // the queue to the fallback (the fast path calls it inside `call`,
        // the queued path later): one clock read per call.
        let deadline = time::after(tokio::time::Instant::now(), self.handles().deadline);
        PipelineFuture {
            inner: self.inner.call(Deadlined {
                request: req,
                deadline,
            }),
            started: false,
        }
    }
}

pin_project! {
    /// The future of [`AgentPipeline`].
    pub struct PipelineFuture<F> {
        #[pin]
        inner: F,
        started: bool,
    }
}

impl<F> fmt::Debug for PipelineFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineFuture").finish_non_exhaustive()
    }
}

impl<F: Future> Future for PipelineFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Every layer below runs inside this poll without waiting: they
        // share one reading of tokio's clock (the deadline check before
        // sending; with `test-util` or off Linux also the rate limiter's
        // admission and the breaker's window, which on Linux otherwise read
        // the kernel's coarse clock, `util::clock`).
        time::one_reading(|| {
            if !*this.started {
                *this.started = true;
                if report::active() {
                    let now = time::now();
                    report::record(|r| r.started = Some(now));
                }
            }
            this.inner.poll(cx)
        })
    }
}

/// Records, at the moment the queue admits a request, how long it waited,
/// and calls the fallback under the request's deadline. Holds the
/// pipeline's handles too.
pub struct ReportQueued<S> {
    inner: Arc<Glue<S>>,
}

struct Glue<S> {
    fallback: S,
    handles: Handles,
}

impl<S> ReportQueued<S> {
    pub(crate) fn new(fallback: S, handles: Handles) -> Self {
        ReportQueued {
            inner: Arc::new(Glue { fallback, handles }),
        }
    }
}

impl<S> Clone for ReportQueued<S> {
    fn clone(&self) -> Self {
        ReportQueued {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ReportQueued<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportQueued")
            .field("inner", &self.inner.fallback)
            .finish_non_exhaustive()
    }
}

impl<S, Req, Res> Service<Deadlined<Req>> for ReportQueued<Fallback<S, Req, Res>>
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Response = Res;
    type Error = Error;
    type Future = fallback::ResponseFuture<S, Req, Res>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // The fallback is always ready: each target is readied in the
        // response future, when it is its turn.
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Deadlined<Req>) -> Self::Future {
        if report::active() {
            let now = tokio::time::Instant::now();
            report::record(|r| {
                if let Some(start) = r.started {
                    r.queued = now.saturating_duration_since(start);
                }
            });
        }
        self.inner.fallback.call_until(req.request, req.deadline)
    }
}
