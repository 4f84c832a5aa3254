//! The retry layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use tower_service::Service;

use super::attempt::{self, KeySlot};
use super::event::{emit, stop_kind};
use super::layer::Config;
use super::stop::Stop;
use super::{CloneRequest, RetryEventKind};
use crate::backoff::BackoffIter;
use crate::classify::{Classify, Outcome, Reason};
use crate::error::{BoxError, Error};
use crate::util::rng::splitmix;
use crate::util::time::after;

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for the owned service to be ready for the next attempt.
        Readying,
        // An attempt is in flight.
        Calling { #[pin] fut: F },
        // Waiting out a backoff or a server hint (the timer holds the wake-up).
        Sleeping,
        // Finished; polling again is a bug of the caller.
        Done,
    }
}

pin_project! {
    /// The future of [`Retry`](super::Retry): drives attempts, sleeps and the
    /// deadline for one logical request.
    pub struct ResponseFuture<S, Req, C, K>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        core: Core<S, Req, C, K>,
    }
}

/// What only a request that is retried needs.
struct Retrying {
    backoff: BackoffIter,
    throttle: BackoffIter,
    last_error: Option<BoxError>,
}

/// The fields that are never pinned, so that the decisions can be plain
/// `&mut self` methods.
struct Core<S, Req, C, K> {
    service: S,
    request: Option<Req>,
    config: Arc<Config<C, K>>,
    attempts: u32,
    // Whether the timer was set for the current state.
    armed: Armed,
    // The timer, the deadline, the backoff state and the spans, behind one
    // pointer: allocated the first time one of them is needed, so a call
    // that answers at once (without a debug subscriber) never allocates,
    // and the future stays small.
    extra: Option<Pin<Box<Extra>>>,
    single_shot: bool,
    // The key a service drew through `Attempt::current`.
    key: KeySlot,
}

/// Whether the timer was set for the current state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Armed {
    /// Not yet considered in this state.
    Unset,
    /// Considered: nothing to wait for.
    Off,
    /// Set.
    On,
}

pin_project! {
    /// What a silent first-attempt success never needs.
    struct Extra {
        // One timer, reused: the attempt's cut-off while calling, the
        // wake-up while sleeping, the deadline while readying. Created the
        // first time an attempt does not answer at once (or a backoff
        // starts), so a call that answers at once never creates, arms or
        // polls a timer and never reads the clock for it.
        #[pin]
        timer: Option<Sleep>,
        // Fixed at the first moment the deadline matters (the first attempt
        // that does not answer at once, or the first failure): in effect the
        // first poll, without a clock read for a request that never needs
        // it. `Some(None)`: fixed, but too far to represent.
        deadline: Option<Option<Instant>>,
        // Only when a subscriber takes debug spans.
        spans: Option<Spans>,
        // Created on the first retry.
        retrying: Option<Retrying>,
    }
}

impl Extra {
    fn new(spans: Option<Spans>) -> Pin<Box<Self>> {
        Box::pin(Self {
            timer: None,
            deadline: None,
            spans,
            retrying: None,
        })
    }
}

struct Spans {
    call: tracing::Span,
    attempt: tracing::Span,
}

fn spans_of(extra: &Option<Pin<Box<Extra>>>) -> Option<&Spans> {
    extra.as_ref()?.spans.as_ref()
}

/// The state behind the one pointer, created the first time.
fn extra(extra: &mut Option<Pin<Box<Extra>>>) -> Pin<&mut Extra> {
    extra.get_or_insert_with(|| Extra::new(None)).as_mut()
}

impl<S, Req, C, K> fmt::Debug for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.core.attempts)
            .field(
                "deadline",
                &self.core.extra.as_ref().and_then(|e| e.deadline.flatten()),
            )
            .finish_non_exhaustive()
    }
}

/// What to do after a failed attempt.
enum Decision {
    Retry(Duration),
    Stop(Stop),
}

impl<S, Req, C, K> ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: CloneRequest<Req>,
{
    #[inline]
    pub(crate) fn new(service: S, ready: bool, request: Req, config: Arc<Config<C, K>>) -> Self {
        let mut core = Core {
            service,
            request: Some(request),
            config,
            attempts: 0,
            armed: Armed::Unset,
            single_shot: false,
            key: KeySlot::default(),
            // Only when a subscriber may take debug spans (one atomic load:
            // the most verbose level any subscriber enables). Otherwise the
            // span would be disabled anyway, and making and dropping it
            // costs a call that answers at once about a tenth of its
            // instructions.
            extra: if tracing::level_enabled!(tracing::Level::DEBUG) {
                traced()
            } else {
                None
            },
        };
        if ready {
            // Readied by `poll_ready`: send the first attempt now.
            let fut = core.start_attempt();
            Self {
                state: State::Calling { fut },
                core,
            }
        } else {
            Self {
                state: State::Readying,
                core,
            }
        }
    }
}

/// The spans of a call, if a subscriber takes them.
#[cold]
#[inline(never)]
fn traced() -> Option<Pin<Box<Extra>>> {
    let call = tracing::debug_span!(
        "llm_resilience.retry",
        attempts = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    (!call.is_disabled()).then(|| {
        Extra::new(Some(Spans {
            call,
            attempt: tracing::Span::none(),
        }))
    })
}

impl<S, Req, C, K> ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    /// Whether a timer was ever created (for the tests).
    #[cfg(test)]
    pub(super) fn has_timer(&self) -> bool {
        self.core.extra.as_ref().is_some_and(|e| e.timer.is_some())
    }
}

impl<S, Req, C, K> Core<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: CloneRequest<Req>,
{
    /// Takes the request (or a clone of it) and calls the service.
    #[inline]
    fn start_attempt(&mut self) -> S::Future {
        self.attempts += 1;
        self.armed = Armed::Unset;
        let config = &self.config;
        let last_possible = self.attempts >= config.max_attempts;
        let req = if last_possible || self.single_shot {
            self.request.take()
        } else {
            let original = self.request.as_ref();
            match original.and_then(|r| config.clone.clone_request(r)) {
                Some(copy) => Some(copy),
                None => {
                    self.single_shot = true;
                    let _e = spans_of(&self.extra).map(|s| s.call.enter());
                    tracing::warn!(
                        attempt = self.attempts,
                        "request cannot be cloned; it will be sent once"
                    );
                    emit(
                        config,
                        RetryEventKind::NotCloneable,
                        self.attempts,
                        Reason::Ok,
                        None,
                    );
                    self.request.take()
                }
            }
        };
        let req = req.expect("a request is kept until its last attempt");
        if let Some(spans) = self
            .extra
            .as_mut()
            .and_then(|e| e.as_mut().project().spans.as_mut())
        {
            spans.attempt = tracing::debug_span!(
                parent: &spans.call,
                "attempt",
                n = self.attempts,
                reason = tracing::field::Empty,
            );
            // An enclosing `attempt` field (the pipeline's request span).
            tracing::Span::current().record("attempt", self.attempts);
        }
        let _a = spans_of(&self.extra).map(|s| s.attempt.enter());
        self.service.call(req)
    }

    fn spans(&self) -> Option<&Spans> {
        spans_of(&self.extra)
    }

    fn record(&self, field: &str, value: impl tracing::Value) {
        if let Some(spans) = self.spans() {
            spans.call.record(field, value);
        }
    }

    /// The request's deadline, fixed the first time it is asked for.
    fn deadline(&mut self) -> Option<Instant> {
        let limit = self.config.deadline?;
        // A deadline too far to represent is no deadline.
        *extra(&mut self.extra)
            .project()
            .deadline
            .get_or_insert_with(|| Instant::now().checked_add(limit))
    }

    /// When the attempt in flight must end: the attempt timeout (counted
    /// from the first time the attempt did not answer at once) or the
    /// deadline, whichever is first.
    fn cutoff(&mut self) -> Option<Instant> {
        let timeout = self
            .config
            .attempt_timeout
            .and_then(|t| Instant::now().checked_add(t));
        match (timeout, self.deadline()) {
            (None, d) => d,
            (t, None) => t,
            (Some(t), Some(d)) => Some(t.min(d)),
        }
    }

    /// Sets the timer for `at` (creating it the first time), or notes that
    /// there is nothing to wait for.
    fn arm(&mut self, at: Option<Instant>) {
        self.armed = match at {
            None => Armed::Off,
            Some(at) => {
                let mut timer = extra(&mut self.extra).project().timer;
                match timer.as_mut().as_pin_mut() {
                    Some(t) => t.reset(at),
                    None => timer.set(Some(sleep_until(at))),
                }
                Armed::On
            }
        };
    }

    /// Polls the timer set for the current state; `Pending` when there is
    /// none (nothing to wait for but the service).
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed != Armed::On {
            return Poll::Pending;
        }
        match self
            .extra
            .as_mut()
            .and_then(|e| e.as_mut().project().timer.as_pin_mut())
        {
            Some(timer) => timer.poll(cx),
            None => Poll::Pending,
        }
    }

    /// The retry-only state, created on the first retry. Each logical
    /// request draws its own seeded streams, numbered in creation order.
    fn retrying(&mut self) -> &mut Retrying {
        let config = &self.config;
        extra(&mut self.extra)
            .project()
            .retrying
            .get_or_insert_with(|| {
                let n = config.sequence.fetch_add(1, Ordering::Relaxed);
                let seed = splitmix(config.seed ^ splitmix(n));
                Retrying {
                    backoff: config.backoff.iter(seed),
                    throttle: config.throttle_backoff.iter(splitmix(seed)),
                    last_error: None,
                }
            })
    }

    fn last_error(&mut self) -> Option<BoxError> {
        self.extra
            .as_mut()
            .and_then(|e| e.as_mut().project().retrying.as_mut())
            .and_then(|r| r.last_error.take())
    }

    fn backoff_delay(&mut self, reason: Reason) -> Duration {
        let r = self.retrying();
        let iter = if reason.is_throttling() {
            &mut r.throttle
        } else {
            &mut r.backoff
        };
        iter.next().unwrap_or(Duration::ZERO)
    }

    fn hint_delay(&mut self, hint: Duration) -> Duration {
        let ratio = self.config.hint_jitter;
        if ratio == 0.0 || hint.is_zero() {
            return hint;
        }
        let u = self.retrying().backoff.unit();
        hint.saturating_add(hint.mul_f64(ratio * u))
    }

    fn decide(&mut self, outcome: Outcome) -> Decision {
        let (reason, hint) = match outcome {
            Outcome::Success => return Decision::Stop(Stop::Accept),
            Outcome::Permanent { .. } => return Decision::Stop(Stop::Permanent),
            Outcome::BadRequest { .. } => return Decision::Stop(Stop::BadRequest),
            Outcome::Transient {
                reason,
                retry_after,
            } => (reason, retry_after.filter(|h| !h.is_zero())),
        };
        if self.request.is_none() {
            return Decision::Stop(if self.single_shot {
                Stop::NotCloneable
            } else {
                Stop::Exhausted
            });
        }
        if self.attempts >= self.config.max_attempts {
            return Decision::Stop(Stop::Exhausted);
        }
        let delay = match hint {
            Some(h) if h > self.config.hint_cap => {
                return Decision::Stop(Stop::HintTooLong {
                    hint: h,
                    limit: self.config.hint_cap,
                })
            }
            Some(h) => self.hint_delay(h),
            None => self.backoff_delay(reason),
        };
        if let Some(deadline) = self.deadline() {
            let left = deadline.saturating_duration_since(Instant::now());
            if delay >= left {
                return Decision::Stop(match hint {
                    Some(h) => Stop::HintTooLong {
                        hint: h,
                        limit: left,
                    },
                    None => Stop::Deadline,
                });
            }
        }
        if let Some(budget) = &self.config.budget {
            if !budget.try_withdraw() {
                return Decision::Stop(Stop::Budget);
            }
        }
        Decision::Retry(delay)
    }
}

impl<S, Req, C, K> Future for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: CloneRequest<Req>,
{
    type Output = Result<S::Response, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let core = this.core;
        loop {
            match this.state.as_mut().project() {
                StateProj::Readying => {
                    match core.service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::from_inner(e)));
                        }
                        Poll::Pending => {
                            // Only the deadline is waited for while readying.
                            if core.armed == Armed::Unset {
                                let at = core.deadline();
                                core.arm(at);
                            }
                            ready!(core.poll_timer(cx));
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::DeadlineExceeded {
                                attempts: core.attempts,
                                source: core.last_error(),
                            }));
                        }
                    }
                    let fut = core.start_attempt();
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let polled = {
                        let _a = spans_of(&core.extra).map(|s| s.attempt.enter());
                        if attempt::listening() {
                            let n = core.attempts.saturating_sub(1);
                            attempt::scope(&mut core.key, n, || fut.poll(cx))
                        } else {
                            fut.poll(cx)
                        }
                    };
                    let result = match polled {
                        Poll::Ready(r) => r.map_err(Error::from_inner),
                        Poll::Pending => {
                            if core.armed == Armed::Unset {
                                let at = core.cutoff();
                                core.arm(at);
                            }
                            ready!(core.poll_timer(cx));
                            if core.deadline().is_some_and(|d| Instant::now() >= d) {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(Error::DeadlineExceeded {
                                    attempts: core.attempts,
                                    source: core.last_error(),
                                }));
                            }
                            Err(Error::Timeout {
                                after: core.config.attempt_timeout.unwrap_or_default(),
                            })
                        }
                    };
                    // Drops the attempt's future (a timed-out attempt is cancelled).
                    this.state.set(State::Done);
                    let outcome = core.config.classifier.classify(result.as_ref());
                    if outcome.is_success() {
                        if core.attempts > 1 {
                            core.record("attempts", core.attempts);
                            emit(
                                &core.config,
                                RetryEventKind::Recovered,
                                core.attempts,
                                Reason::Ok,
                                None,
                            );
                        }
                        return Poll::Ready(result);
                    }
                    let reason = outcome.reason();
                    if let Some(spans) = core.spans() {
                        spans.attempt.record("reason", reason.as_str());
                    }
                    match core.decide(outcome) {
                        Decision::Retry(delay) => {
                            {
                                let _e = core.spans().map(|s| s.attempt.enter());
                                tracing::debug!(
                                    attempt = core.attempts,
                                    delay_ms = delay.as_millis() as u64,
                                    reason = reason.as_str(),
                                    "retrying"
                                );
                            }
                            emit(
                                &core.config,
                                RetryEventKind::Retrying,
                                core.attempts,
                                reason,
                                Some(delay),
                            );
                            core.retrying().last_error = result.err().map(Error::into_cause);
                            core.arm(Some(after(Instant::now(), delay)));
                            this.state.set(State::Sleeping);
                        }
                        Decision::Stop(stop) => {
                            let kind = stop_kind(stop);
                            emit(&core.config, kind, core.attempts, reason, None);
                            core.record("attempts", core.attempts);
                            core.record("outcome", reason.as_str());
                            {
                                let _e = core.spans().map(|s| s.attempt.enter());
                                tracing::debug!(
                                    attempt = core.attempts,
                                    reason = reason.as_str(),
                                    stop = ?kind,
                                    "not retrying"
                                );
                            }
                            return Poll::Ready(match result {
                                Ok(response) => Ok(response),
                                Err(err) => Err(stop.error(core.attempts, outcome, err)),
                            });
                        }
                    }
                }
                StateProj::Sleeping => {
                    // A delay too long for the clock never ends.
                    ready!(core.poll_timer(cx));
                    core.armed = Armed::Unset;
                    this.state.set(State::Readying);
                }
                StateProj::Done => panic!("retry ResponseFuture polled after completion"),
            }
        }
    }
}
