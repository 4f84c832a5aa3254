//! Fallback: an ordered list of targets (other models, providers or keys),
//! tried in turn on failures another target can fix.
//!
//! ```
//! use llm_resilience::classify::HttpError;
//! use llm_resilience::fallback::Fallback;
//! use tower::util::BoxCloneSyncService;
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_resilience::BoxError> {
//! type Target = BoxCloneSyncService<String, String, HttpError>;
//! let down: Target = BoxCloneSyncService::new(service_fn(|_: String| async {
//!     Err::<String, _>(HttpError::new(503))
//! }));
//! let up: Target = BoxCloneSyncService::new(service_fn(|q: String| async move {
//!     Ok::<_, HttpError>(format!("answer to {q}"))
//! }));
//! let agent = Fallback::builder()
//!     .target("primary", down)
//!     .target("secondary", up)
//!     .build()?;
//! assert_eq!(agent.oneshot("hi".to_owned()).await?, "answer to hi");
//! # Ok(()) }
//! ```
//!
//! # What moves on and what stops
//!
//! Each target is a whole per-target stack (retry, breaker, rate limit,
//! attempt timeout, client), so a failure that reaches the fallback already
//! outlasted that target's own retries. The fallback then decides by the
//! failure's [`Reason`]:
//!
//! - transient failures (retries exhausted, budget exhausted, timeouts,
//!   overloads, server errors), an open circuit, a rate limit that would make
//!   the caller wait, an exhausted quota, a refused credential, a missing
//!   model: **the next target** is tried (another provider or key can help).
//!   A target whose circuit is open or whose limiter rejects answers at once
//!   without an upstream call, so it is skipped for free.
//! - a bad request (invalid, content policy): **stop**; no target can fix
//!   it, and sending it elsewhere only pays twice.
//! - a request too long for the context: the designated
//!   [larger-context target](FallbackBuilder::larger_context) if there is
//!   one, else stop.
//!
//! When every target failed with errors another target could have fixed, the
//! [degrade step](FallbackBuilder::degrade) may answer (a cached or canned
//! reply); the [report](crate::report) marks such an answer as degraded.
//!
//! # Deadline
//!
//! One deadline covers every target: nothing is sent after it, and a target
//! in flight when it passes is dropped (its future cancelled) with
//! [`Error::DeadlineExceeded`]. Under an
//! [`AgentPipeline`](crate::pipeline::AgentPipeline) the deadline counts
//! from the pipeline's `call`, so the time spent in its queue is part of it.
//!
//! # Readiness
//!
//! `poll_ready` is always ready: each target is readied inside the response
//! future, only when it is its turn, so a busy secondary never holds up a
//! healthy primary.
//!
//! # Observability
//!
//! One `tracing` span per request, `llm_resilience.request`, with the
//! target being tried as `target_name` and the attempt being sent to it as
//! `attempt` (from 1, recorded by the target's retry layer); each target's
//! own spans (the retry's, with the attempts and one span per attempt with
//! its number) open inside it. Each decision is a debug event (target
//! `llm_resilience::fallback`) and, with the `metrics` feature,
//! `llm_resilience_fallback_decisions_total{target, decision, reason}` (the
//! `answered` counters registered when the fallback is built, so a success
//! formats nothing). Requests and answers are never recorded.

mod event;
mod future;
mod layer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use crate::classify::{LlmClassifier, Outcome, Reason};
use crate::error::{BoxError, Error};

pub use self::event::{FallbackEvent, FallbackEventKind};

thread_local! {
    /// The deadline of the call whose target this thread is calling or
    /// polling right now (set by the fallback around each target's `call`
    /// and poll): layers inside a target read it, so the rate limiter
    /// refuses at once a wait that would outlast it.
    static CURRENT_DEADLINE: std::cell::Cell<Option<tokio::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with `deadline` (when there is one) as the current call's
/// deadline; the previous one is back afterwards, even on a panic.
#[inline]
pub(crate) fn with_deadline<T>(deadline: Option<tokio::time::Instant>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<tokio::time::Instant>);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            let _ = CURRENT_DEADLINE.try_with(|c| c.set(self.0));
        }
    }
    if deadline.is_none() {
        return f();
    }
    let _restore = CURRENT_DEADLINE
        .try_with(|c| c.replace(deadline))
        .map(Restore)
        .ok();
    f()
}

/// The deadline of the call whose target is being called or polled on this
/// thread, if a fallback set one.
pub(crate) fn current_deadline() -> Option<tokio::time::Instant> {
    CURRENT_DEADLINE
        .try_with(std::cell::Cell::get)
        .ok()
        .flatten()
}

pub use self::future::ResponseFuture;
pub use self::layer::FallbackBuilder;

type Rewrite<Req> = Arc<dyn Fn(&mut Req) + Send + Sync + 'static>;
type Degrade<Req, Res> = Arc<dyn Fn(&Req, &Error) -> Option<Res> + Send + Sync + 'static>;
type Listener = Arc<dyn Fn(&FallbackEvent) + Send + Sync + 'static>;

pub(crate) struct Target<S, Req> {
    name: Arc<str>,
    service: S,
    rewrite: Option<Rewrite<Req>>,
}

pub(crate) struct Shared<S, Req, Res> {
    services: Vec<S>,
    targets: Vec<(Arc<str>, Option<Rewrite<Req>>)>,
    larger: Option<usize>,
    degrade: Option<Degrade<Req, Res>>,
    deadline: Option<Duration>,
    listener: Option<Listener>,
    // `llm_resilience_fallback_decisions_total{decision="answered"}` per
    // target, registered at build: a success formats no label.
    #[cfg(feature = "metrics")]
    answered: Vec<metrics::Counter>,
}

impl<S, Req, Res> Shared<S, Req, Res> {
    /// The first normal target at or after `from` (the larger-context target
    /// is never taken in order).
    fn next_normal(&self, from: usize) -> Option<usize> {
        (from..self.targets.len()).find(|&i| Some(i) != self.larger)
    }

    fn emit(&self, kind: FallbackEventKind, target: usize, reason: Reason) {
        let name = &self.targets[target.min(self.targets.len() - 1)].0;
        tracing::debug!(
            target: "llm_resilience::fallback",
            kind = kind.as_str(),
            target_name = &**name,
            reason = reason.as_str(),
            "fallback decision"
        );
        #[cfg(feature = "metrics")]
        match self.answered.get(target) {
            Some(counter) if kind == FallbackEventKind::Answered => counter.increment(1),
            _ => metrics::counter!(
                "llm_resilience_fallback_decisions_total",
                "target" => name.to_string(),
                "decision" => kind.as_str(),
                "reason" => reason.as_str(),
            )
            .increment(1),
        }
        if let Some(listener) = &self.listener {
            listener(&FallbackEvent {
                kind,
                target: name.clone(),
                reason,
            });
        }
    }
}

/// What a failure means for the next target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Next,
    Stop,
    LargerContext,
}

pub(crate) fn decide(err: &Error) -> (Decision, Reason) {
    let reason = match err {
        Error::BadRequest { reason, .. } => *reason,
        other => LlmClassifier::new().classify_error(other).reason(),
    };
    let outcome = match err {
        Error::BadRequest { reason, .. } => Outcome::BadRequest { reason: *reason },
        Error::Upstream { .. } => LlmClassifier::new().classify_error(err),
        _ => Outcome::transient(reason),
    };
    let decision = match outcome {
        Outcome::BadRequest {
            reason: Reason::ContextLength,
        } => Decision::LargerContext,
        Outcome::BadRequest { .. } => Decision::Stop,
        _ => Decision::Next,
    };
    (decision, reason)
}

/// Tries targets in order; see the [module docs](self).
pub struct Fallback<S, Req, Res> {
    shared: Arc<Shared<S, Req, Res>>,
}

impl<S, Req, Res> Clone for Fallback<S, Req, Res> {
    fn clone(&self) -> Self {
        Fallback {
            shared: self.shared.clone(),
        }
    }
}

impl<S, Req, Res> fmt::Debug for Fallback<S, Req, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field(
                "targets",
                &self
                    .shared
                    .targets
                    .iter()
                    .map(|t| &*t.0)
                    .collect::<Vec<_>>(),
            )
            .field("deadline", &self.shared.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, Req, Res> Fallback<S, Req, Res> {
    /// A builder with no targets yet.
    pub fn builder() -> FallbackBuilder<S, Req, Res> {
        FallbackBuilder::default()
    }

    /// The targets' names, in order (the larger-context target included).
    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.shared.targets.iter().map(|t| &*t.0)
    }

    /// The targets' services, in the order of [`target_names`](Self::target_names).
    pub fn get_ref(&self) -> &[S] {
        &self.shared.services
    }
}

impl<S, Req, Res> Service<Req> for Fallback<S, Req, Res>
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Response = Res;
    type Error = Error;
    type Future = ResponseFuture<S, Req, Res>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture::new(self.shared.clone(), req, None)
    }
}

impl<S, Req, Res> Fallback<S, Req, Res> {
    /// [`call`](Service::call) under a deadline set by the layer that owns
    /// the whole call (the agent pipeline, which counts it from its own
    /// `call`, queue wait included): the earlier of it and the fallback's
    /// own holds.
    #[inline]
    pub(crate) fn call_until(
        &self,
        req: Req,
        deadline: tokio::time::Instant,
    ) -> ResponseFuture<S, Req, Res>
    where
        S: Service<Req>,
    {
        ResponseFuture::new(self.shared.clone(), req, Some(deadline))
    }
}
