//! Retry: only transient failures, with backoff, server hints, a deadline and
//! a budget.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::retry::RetryLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let retry = RetryLayer::builder()
//!     .max_attempts(3)
//!     .attempt_timeout(Duration::from_secs(30))
//!     .deadline(Duration::from_secs(60))
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(retry)
//!     .service(service_fn(|prompt: &'static str| async move {
//!         Ok::<_, std::io::Error>(prompt.len())
//!     }));
//! assert_eq!(svc.oneshot("hello").await?, 5);
//! # Ok(()) }
//! ```
//!
//! # What is retried
//!
//! Each result goes through the classifier ([`LlmClassifier`] by default,
//! any [`Classify`] or closure otherwise). Transient outcomes are retried;
//! permanent and bad-request outcomes stop at once with
//! [`Error::Permanent`] and [`Error::BadRequest`] (a 429
//! `insufficient_quota` or a 400 `context_length_exceeded` makes exactly one
//! attempt). A typed error from a layer below (a breaker's
//! [`Error::CircuitOpen`]) is returned as it is, never wrapped.
//!
//! # How long it waits
//!
//! A server hint (`retry-after-ms`, `retry-after`, the rate-limit reset
//! headers; see [`hint`](crate::classify::hint)) is honoured: the retry waits
//! at least the hint, plus up to [`hint_jitter`](RetryLayerBuilder::hint_jitter)
//! of it so that callers released together do not stampede. A hint beyond
//! [`hint_cap`](RetryLayerBuilder::hint_cap) or beyond the deadline ends the
//! request at once with [`Error::RetryAfterTooLong`], carrying the hint,
//! instead of sleeping for an hour. Without a hint, the delay comes from the
//! [`Backoff`](crate::backoff::Backoff): the throttling one for rate limits
//! and overloads, the ordinary one otherwise.
//!
//! # Deadline and attempt timeout
//!
//! The attempt timeout bounds each attempt; the deadline bounds the whole
//! logical request, sleeps included. A sleep that would end at or after the
//! deadline is not started ([`Error::DeadlineExceeded`] at once, with the last
//! error), and every attempt is cut at the deadline.
//!
//! # Budget
//!
//! With a [`RetryBudget`](crate::budget::RetryBudget) (on by default), each
//! logical request deposits once and each retry withdraws once; a retry the
//! budget cannot pay for ends with [`Error::BudgetExhausted`]. Every clone
//! of the layer and of the service shares the one budget. A service value
//! tells the budget of its deposits in batches of
//! [`CLOCK_READ_EVERY`] and when it is
//! dropped, each batch dated to the budget's mark at its first request (never
//! later than any of them), so a reused service pays one shared atomic per
//! batch; a clone made for one request (`svc.clone().oneshot(req)`) tells it
//! as soon as the clone is dropped, right after the call. Until then a
//! request's deposit only makes the budget stricter.
//!
//! # Readiness and cloning
//!
//! `poll_ready` readies the inner service; `call` moves that readied service
//! into the response future (leaving a fresh clone behind) and calls
//! `ready()` on it again before every retry, so a retry never calls a service
//! that was not ready. A service whose `call` comes without `poll_ready`
//! readies the inner service itself first. Requests are cloned through
//! [`CloneRequest`]; a request that cannot be cloned is sent once, reported
//! as a [`RetryEventKind::NotCloneable`] event and a `tracing` warning, and a
//! transient failure of that one attempt ends with [`Error::NotCloneable`].
//!
//! # Idempotency keys and attempt numbers
//!
//! While it polls an attempt, the retry layer makes that attempt current on
//! the thread: a service below it reads [`Attempt::current`] for the
//! retries taken so far (0 on the first attempt) and the logical request's
//! [`IdempotencyKey`], drawn the first time it is asked for and then the
//! same on every attempt. The crate's HTTP clients send both
//! (`Idempotency-Key` and `x-stainless-retry-count`), so a server that
//! deduplicates runs a retried completion once. One call of this service
//! is one logical request; see [`attempt`] for what that means for a
//! caller who retries by hand, for layers in between and for the cost (a
//! few word copies into a thread-local per poll of an attempt once
//! something listens, one relaxed atomic load before; no allocation, lock
//! or atomic write).
//!
//! # Observability
//!
//! A `tracing` span per logical call (`llm_resilience.retry`) and per attempt
//! (`attempt`, with its number); a debug event per retry with the delay and
//! the reason. An event hook ([`RetryLayerBuilder::on_event`]) sees every
//! decision. With the `metrics` feature, every decision also increments
//! `llm_resilience_retry_decisions_total{retry, decision, reason}` (`retry`: the layer's [`name`](RetryLayerBuilder::name)) (the names of
//! [`RetryEventKind::as_str`] and [`Reason::as_str`](crate::classify::Reason::as_str)) and sets the gauge
//! `llm_resilience_retry_budget_balance{retry}`. Nothing is formatted, timestamped,
//! recorded or allocated on a first-attempt success, unless a subscriber
//! takes debug spans (then the spans and one allocation per call). A
//! logical request allocates once (a timer, the deadline, the backoff state
//! and the spans share it) the first time it needs any of them: an attempt
//! that waits with an attempt timeout or a deadline set, or a retry.
//!
//! [`LlmClassifier`]: crate::classify::LlmClassifier
//! [`Classify`]: crate::classify::Classify
//! [`Error::Permanent`]: crate::Error::Permanent
//! [`Error::BadRequest`]: crate::Error::BadRequest
//! [`Error::CircuitOpen`]: crate::Error::CircuitOpen
//! [`Error::RetryAfterTooLong`]: crate::Error::RetryAfterTooLong
//! [`Error::DeadlineExceeded`]: crate::Error::DeadlineExceeded
//! [`Error::BudgetExhausted`]: crate::Error::BudgetExhausted
//! [`Error::NotCloneable`]: crate::Error::NotCloneable

pub mod attempt;
mod event;
mod future;
mod layer;
mod stop;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

pub use self::attempt::{Attempt, IdempotencyKey};
pub use self::event::{RetryEvent, RetryEventKind};
pub use self::future::ResponseFuture;
use self::layer::Config;
pub use self::layer::{RetryLayer, RetryLayerBuilder, LLM_ATTEMPT_TIMEOUT, LLM_DEADLINE};
use crate::budget::CLOCK_READ_EVERY;
use crate::classify::{Classify, LlmClassifier};
use crate::error::{BoxError, Error};

/// Clones a request for another attempt; `None` means it cannot be cloned.
///
/// Implemented by [`UseClone`] for every `Req: Clone` and by every
/// `Fn(&Req) -> Option<Req> + Send + Sync + 'static`.
///
/// A request type that is not `Clone` does not compile under the default
/// [`UseClone`], and wherever the compiler checks the bound it says why
/// ("the retry layer cannot copy a `Prompt` for another attempt", with what
/// to do). Through method syntax on a service whose request type is not
/// known yet (`svc.oneshot(p)`), rustc only says that `Service`'s bounds
/// are not met; `ServiceExt::<Prompt>::oneshot(svc, p)` shows the message.
///
/// ```compile_fail,E0277
/// use llm_resilience::retry::RetryLayer;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// struct Prompt(String); // not Clone
///
/// # async fn run() {
/// let svc = RetryLayer::llm_defaults()
///     .layer(service_fn(|p: Prompt| async move { Ok::<_, std::io::Error>(p.0) }));
/// // error[E0277]: the retry layer cannot copy a `Prompt` for another attempt
/// let _ = ServiceExt::<Prompt>::oneshot(svc, Prompt("hi".into())).await;
/// # }
/// ```
///
/// Derive `Clone` (keep it cheap: an `Arc` around a large body), or say how
/// to copy it with [`clone_requests`](RetryLayerBuilder::clone_requests):
///
/// ```
/// use llm_resilience::retry::RetryLayer;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// struct Prompt(String); // not Clone
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let retry = RetryLayer::builder()
///     .clone_requests(|p: &Prompt| Some(Prompt(p.0.clone())))
///     .build()
///     .unwrap();
/// let svc = retry.layer(service_fn(|p: Prompt| async move { Ok::<_, std::io::Error>(p.0) }));
/// assert_eq!(svc.oneshot(Prompt("hi".into())).await.unwrap(), "hi");
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "the retry layer cannot copy a `{Req}` for another attempt with `{Self}`",
    label = "`{Req}` needs `Clone` here, or a `clone_requests` function",
    note = "derive or implement `Clone` for `{Req}` (an `Arc` around a large body keeps it cheap), or give the builder `.clone_requests(|req: &{Req}| Some(..))`"
)]
pub trait CloneRequest<Req>: Send + Sync + 'static {
    /// A copy of `req` for another attempt, or `None`.
    fn clone_request(&self, req: &Req) -> Option<Req>;
}

/// Clones requests with [`Clone`]. Keep requests cheap to clone (an `Arc`
/// around the body): the retry layer keeps one copy per logical request.
#[derive(Clone, Copy, Debug, Default)]
pub struct UseClone;

impl<Req: Clone> CloneRequest<Req> for UseClone {
    #[inline]
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

impl<Req, F> CloneRequest<Req> for F
where
    F: Fn(&Req) -> Option<Req> + Send + Sync + 'static,
{
    fn clone_request(&self, req: &Req) -> Option<Req> {
        self(req)
    }
}

/// The retry middleware; made by [`RetryLayer`].
pub struct Retry<S, C = LlmClassifier, K = UseClone> {
    inner: S,
    shared: Deposits<C, K>,
    ready: bool,
}

/// The shared configuration, and this service value's deposits that the
/// shared budget has not been told of yet: it is told every
/// [`CLOCK_READ_EVERY`] calls and when the value is dropped, dated to the
/// budget's mark at the first of them (never later than any), so a service
/// that is reused pays one shared atomic per batch instead of per call.
struct Deposits<C, K> {
    // Always set, except in a value given up by `into_config`.
    config: Option<Arc<Config<C, K>>>,
    unsent: u64,
    mark: u64,
}

impl<C, K> Deposits<C, K> {
    #[inline]
    fn config(&self) -> &Arc<Config<C, K>> {
        self.config.as_ref().expect("set until given up")
    }

    #[inline]
    fn record(&mut self) {
        let budget = self.config.as_ref().and_then(|c| c.budget.as_ref());
        if let Some(budget) = budget {
            if self.unsent == 0 {
                self.mark = budget.mark();
            }
            self.unsent += 1;
            if self.unsent >= CLOCK_READ_EVERY {
                budget.deposit_at(self.mark, self.unsent);
                self.unsent = 0;
            }
        }
    }
}

impl<C, K> Deposits<C, K> {
    /// Tells the budget what it has not been told yet and gives up the
    /// configuration (no reference count touched).
    #[inline]
    fn into_config(mut self) -> Arc<Config<C, K>> {
        let config = self.config.take().expect("set until given up");
        if let Some(budget) = &config.budget {
            budget.deposit_at(self.mark, self.unsent);
        }
        config
    }
}

impl<C, K> Drop for Deposits<C, K> {
    fn drop(&mut self) {
        if let Some(budget) = self.config.as_ref().and_then(|c| c.budget.as_ref()) {
            budget.deposit_at(self.mark, self.unsent);
        }
    }
}

impl<S, C, K> Retry<S, C, K> {
    pub(crate) fn from_config(inner: S, config: Arc<Config<C, K>>) -> Self {
        Self {
            inner,
            shared: Deposits {
                config: Some(config),
                unsent: 0,
                mark: 0,
            },
            ready: false,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C, K> Clone for Retry<S, C, K> {
    /// The clone shares the configuration and budget but not readiness: it
    /// must be polled ready itself.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Deposits {
                config: Some(Arc::clone(self.shared.config())),
                unsent: 0,
                mark: 0,
            },
            ready: false,
        }
    }
}

impl<S: fmt::Debug, C, K> fmt::Debug for Retry<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("max_attempts", &self.shared.config().max_attempts)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C, K> Service<Req> for Retry<S, C, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: CloneRequest<Req>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, C, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        crate::util::ready::poll_inner(&mut self.inner, &mut self.ready, cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let ready = std::mem::take(&mut self.ready);
        let fresh = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, fresh);
        self.shared.record();
        ResponseFuture::new(service, ready, req, Arc::clone(self.shared.config()))
    }
}

impl<S, C, K> Retry<S, C, K> {
    /// [`call`](Service::call) on a value that is then done with: its
    /// (readied) inner service and its configuration move into the future,
    /// with no clone left in their place. The agent pipeline's fallback
    /// calls each target's stack this way, on a clone made for that call.
    #[inline]
    pub(crate) fn call_once<Req>(self, req: Req) -> ResponseFuture<S, Req, C, K>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        C: Classify<S::Response>,
        K: CloneRequest<Req>,
    {
        let Retry {
            inner,
            mut shared,
            ready,
        } = self;
        shared.record();
        ResponseFuture::new(inner, ready, req, shared.into_config())
    }
}
