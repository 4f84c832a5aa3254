//! The breaker's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::state::{Ticket, Verdict};
use super::Shared;
use crate::classify::{Classify, Outcome};
use crate::error::{BoxError, Error};
use crate::guard::{StreamEnd, StreamGuard};

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, F> {
        // Refused: the answer is ready.
        Rejected { retry_after: Duration },
        // Admitted, waiting for the owned (cloned) service to be ready,
        // because `call` came without a successful `poll_ready`.
        Readying { svc: S, req: Option<Req> },
        // The inner call is in flight.
        Calling { #[pin] fut: F },
        // Finished; polling again is a bug of the caller.
        Done,
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker) and
    /// [`KeyedCircuitBreaker`](super::KeyedCircuitBreaker): the inner call,
    /// or the refusal, plus the admission that is recorded when it ends (or
    /// given back when it is dropped).
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, S::Future>,
        guard: Option<Guard<C>>,
    }
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admitted", &self.guard.as_ref().map(|g| g.ticket.kind))
            .finish_non_exhaustive()
    }
}

/// An admitted call's ticket; dropped without a result, it gives a probe's
/// permit back.
pub(crate) struct Guard<C> {
    shared: Arc<Shared<C>>,
    start: Option<Instant>,
    ticket: Ticket,
    armed: bool,
}

impl<C> Guard<C> {
    #[inline]
    fn finish<Res>(&mut self, result: Result<&Res, &Error>)
    where
        C: Classify<Res>,
    {
        let outcome = self.shared.classifier.classify(result);
        let slow = self.slow();
        self.record(outcome, slow);
    }

    /// Whether the call took longer than the slow threshold (until now).
    #[inline]
    fn slow(&self) -> bool {
        match (self.start, self.shared.core.settings().slow_threshold) {
            (Some(start), Some(threshold)) => start.elapsed() > threshold,
            _ => false,
        }
    }

    #[inline]
    fn record(&mut self, outcome: Outcome, slow: bool) {
        // Recorded here, one way or the other: nothing to give back on drop.
        self.armed = false;
        let core = &self.shared.core;
        if !outcome.is_success() && !outcome.is_target_failure() {
            // Neutral (a bad request): the target answered correctly.
            core.release(self.ticket);
            return;
        }
        let verdict = Verdict {
            failed: outcome.is_target_failure(),
            slow,
            reason: outcome.reason(),
        };
        core.complete(
            self.ticket,
            verdict,
            // The per-call clock (inside an agent pipeline's poll, with
            // `test-util`, the reading its layers share).
            || core.now_ms(),
            || outcome.retry_after(),
        );
    }
}

impl<C: Send + Sync + 'static> Guard<C> {
    /// Records the call's result; a streamed response that the classifier
    /// calls a success (so far) takes the guard along instead, to record
    /// how its stream ends.
    #[inline]
    fn settle<Res>(slot: &mut Option<Self>, result: &mut Result<Res, Error>)
    where
        C: Classify<Res>,
    {
        let Some(g) = slot.as_mut() else { return };
        if let Ok(response) = result {
            if g.shared.classifier.stream(response).is_some() {
                let outcome = g.shared.classifier.classify(Ok(response));
                if outcome.is_success() {
                    if let Some(g) = slot.take() {
                        g.follow(response);
                    }
                    return;
                }
                let slow = g.slow();
                return g.record(outcome, slow);
            }
        }
        g.finish(result.as_ref());
    }

    /// Moves into the streamed response: the outcome is recorded when its
    /// stream completes (a success) or fails (the error, classified); a
    /// stream dropped before its end records nothing. The slow-call rule
    /// judges the time to the response (the first chunk): a stream's
    /// length follows its output's.
    #[cold]
    fn follow<Res>(self, response: &mut Res)
    where
        C: Classify<Res>,
    {
        let slow = self.slow();
        let classify: fn(&C, &(dyn std::error::Error + 'static)) -> Outcome =
            <C as Classify<Res>>::classify_stream_error;
        let Some(stream) = self.shared.classifier.stream(response) else {
            return;
        };
        let mut guard = self;
        stream.attach(StreamGuard::on_end(move |end| match end {
            StreamEnd::Completed => guard.record(Outcome::Success, slow),
            StreamEnd::Failed(err) => {
                let outcome = classify(&guard.shared.classifier, err);
                // Whatever the classifier says, the stream broke: never a
                // success.
                let outcome = if outcome.is_success() {
                    Outcome::transient(crate::classify::Reason::Unknown)
                } else {
                    outcome
                };
                guard.record(outcome, slow);
            }
            // Dropped by the caller: no outcome (`Drop` gives a probe's
            // permit back).
            _ => drop(guard),
        }));
    }
}

impl<C> Drop for Guard<C> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.core.release(self.ticket);
        }
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    pub(crate) fn rejected(retry_after: Duration) -> Self {
        Self {
            kind: Kind::Rejected { retry_after },
            guard: None,
        }
    }

    pub(crate) fn calling(
        fut: S::Future,
        shared: Arc<Shared<C>>,
        ticket: Ticket,
        start: Option<Instant>,
    ) -> Self {
        Self {
            kind: Kind::Calling { fut },
            guard: Some(Guard {
                shared,
                ticket,
                start,
                armed: true,
            }),
        }
    }

    pub(crate) fn readying(svc: S, req: Req, shared: Arc<Shared<C>>, ticket: Ticket) -> Self {
        Self {
            kind: Kind::Readying {
                svc,
                req: Some(req),
            },
            guard: Some(Guard {
                shared,
                ticket,
                start: None,
                armed: true,
            }),
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.kind.as_mut().project() {
                KindProj::Rejected { retry_after } => {
                    let retry_after = *retry_after;
                    this.kind.set(Kind::Done);
                    return Poll::Ready(Err(Error::CircuitOpen { retry_after }));
                }
                KindProj::Readying { svc, req } => match ready!(svc.poll_ready(cx)) {
                    Ok(()) => {
                        let req = req.take().expect("request taken once");
                        let fut = svc.call(req);
                        if let Some(g) = this.guard.as_mut() {
                            if g.shared.core.settings().slow_threshold.is_some() {
                                g.start = Some(Instant::now());
                            }
                        }
                        this.kind.set(Kind::Calling { fut });
                    }
                    Err(e) => {
                        let err = Error::from_inner(e);
                        this.kind.set(Kind::Done);
                        if let Some(g) = this.guard.as_mut() {
                            g.finish::<S::Response>(Err(&err));
                        }
                        return Poll::Ready(Err(err));
                    }
                },
                KindProj::Calling { fut } => {
                    let mut result = ready!(fut.poll(cx)).map_err(Error::from_inner);
                    Guard::settle(this.guard, &mut result);
                    this.kind.set(Kind::Done);
                    return Poll::Ready(result);
                }
                KindProj::Done => panic!("breaker ResponseFuture polled after completion"),
            }
        }
    }
}
