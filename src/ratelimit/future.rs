//! The rate limiter's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::event::RateLimitEventKind as Kind;
use super::limiter::{Limiter, Ticket, WaitPoll};
use super::usage::{Outcome, ReadUsage};
use crate::error::{BoxError, Error};

pin_project! {
    #[project = KindProj]
    enum State<S, Req, F> {
        // Refused: the answer is ready.
        Rejected { retry_after: Duration },
        // In the key's waiting line (boxed: the slow path keeps the
        // future small for the fast one).
        Waiting { wait: Pin<Box<Wait<S, Req>>> },
        // Admitted; readying the owned (cloned) inner service.
        Readying { svc: S, req: Option<Req> },
        // The inner call is in flight.
        Calling { #[pin] fut: F },
        // Finished.
        Done,
    }
}

pin_project! {
    #[project = WaitProj]
    struct Wait<S, Req> {
        id: u64,
        #[pin]
        sleep: Sleep,
        deadline: Instant,
        since: Instant,
        span: tracing::Span,
        svc: Option<S>,
        req: Option<Req>,
    }
}

pin_project! {
    /// The future of [`RateLimit`](super::RateLimit) and
    /// [`KeyedRateLimit`](super::KeyedRateLimit): the wait in line (if
    /// any), then the inner call, then the settlement of its cost.
    pub struct ResponseFuture<S, Req, U>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
        guard: Guard<U>,
    }
}

impl<S, Req, U> fmt::Debug for ResponseFuture<S, Req, U>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admitted", &self.guard.ticket.is_some())
            .field("waiting", &self.guard.waiting.is_some())
            .finish_non_exhaustive()
    }
}

/// What the call holds of its limiter: its place in line or its charges.
struct Guard<U> {
    /// `None` with a ticket: a call sent at once whose response is read for
    /// nothing, which finds its limiter by `id` if it fails (`registry.rs`).
    limiter: Option<Arc<Limiter>>,
    id: u64,
    ticket: Option<Ticket>,
    waiting: Option<u64>,
    sent: bool,
    usage: U,
}

impl<U> Drop for Guard<U> {
    fn drop(&mut self) {
        let Some(limiter) = &self.limiter else { return };
        if let Some(id) = self.waiting.take() {
            // Dropped in line: the next caller takes the place at once.
            if limiter.leave(id).is_some() {
                limiter.settings.emit(Kind::Cancelled, None, None);
            }
        } else if let (Some(ticket), false) = (self.ticket.take(), self.sent) {
            // Admitted but never sent: nothing was used.
            limiter.refund_all(ticket);
        }
    }
}

impl<S, Req, U> ResponseFuture<S, Req, U>
where
    S: Service<Req>,
{
    pub(crate) fn rejected(retry_after: Duration, usage: U) -> Self {
        Self {
            state: State::Rejected { retry_after },
            guard: Guard {
                limiter: None,
                id: 0,
                ticket: None,
                waiting: None,
                sent: false,
                usage,
            },
        }
    }

    /// Sent at once. With `detach`, the future holds no reference to the
    /// limiter (see `Guard::limiter`).
    #[inline]
    pub(crate) fn calling(
        fut: S::Future,
        limiter: &Arc<Limiter>,
        detach: bool,
        ticket: Ticket,
        usage: U,
    ) -> Self {
        let held = (!detach).then(|| Arc::clone(limiter));
        Self::sent(fut, held, limiter.id, ticket, usage)
    }

    /// Sent at once, its response read for nothing: the future keeps only
    /// its limiter's number (see `Guard::limiter`).
    #[inline]
    pub(crate) fn detached(fut: S::Future, id: u64, ticket: Ticket, usage: U) -> Self {
        Self::sent(fut, None, id, ticket, usage)
    }

    #[inline]
    fn sent(
        fut: S::Future,
        limiter: Option<Arc<Limiter>>,
        id: u64,
        ticket: Ticket,
        usage: U,
    ) -> Self {
        Self {
            state: State::Calling { fut },
            guard: Guard {
                limiter,
                id,
                ticket: Some(ticket),
                waiting: None,
                sent: true,
                usage,
            },
        }
    }

    pub(crate) fn readying(
        svc: S,
        req: Req,
        limiter: Arc<Limiter>,
        ticket: Ticket,
        usage: U,
    ) -> Self {
        Self {
            state: State::Readying {
                svc,
                req: Some(req),
            },
            guard: Guard {
                id: limiter.id,
                limiter: Some(limiter),
                ticket: Some(ticket),
                waiting: None,
                sent: false,
                usage,
            },
        }
    }

    #[cold]
    pub(crate) fn waiting(
        svc: S,
        req: Req,
        limiter: Arc<Limiter>,
        id: u64,
        max_wait: Duration,
        usage: U,
    ) -> Self {
        let since = Instant::now();
        let deadline = since.checked_add(max_wait).unwrap_or(since + super::FAR);
        let span = tracing::debug_span!(
            target: "llm_resilience::ratelimit",
            "rate_limit_wait",
            limiter = %limiter.settings.name
        );
        Self {
            state: State::Waiting {
                wait: Box::pin(Wait {
                    id,
                    sleep: tokio::time::sleep_until(deadline),
                    deadline,
                    since,
                    span,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
            guard: Guard {
                id: limiter.id,
                limiter: Some(limiter),
                ticket: None,
                waiting: Some(id),
                sent: false,
                usage,
            },
        }
    }
}

impl<U> Guard<U> {
    #[inline]
    fn finish<Res>(&mut self, result: Result<&Res, &Error>)
    where
        U: ReadUsage<Res>,
    {
        if self.limiter.is_none() && result.is_ok() {
            // Detached: a success has nothing to settle.
            self.ticket = None;
            return;
        }
        self.settle(result);
    }

    #[inline(never)]
    fn settle<Res>(&mut self, result: Result<&Res, &Error>)
    where
        U: ReadUsage<Res>,
    {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let found;
        let limiter = match &self.limiter {
            Some(limiter) => limiter,
            // Detached and failed: it finds its limiter, unless it is gone.
            None => match super::registry::find(self.id) {
                Some(limiter) => {
                    found = limiter;
                    &found
                }
                None => return,
            },
        };
        match Outcome::of(&self.usage, &limiter.settings.classifier, result) {
            // Nothing reported (always, with `IgnoreUsage`): nothing to
            // settle, no lock.
            Outcome::Nothing => {}
            Outcome::Reported { used, server } => limiter.settle(ticket, used, &server),
            Outcome::Throttled { hint, server } => limiter.rate_limited(ticket, hint, &server),
            Outcome::Failed { server } => limiter.settle(ticket, None, &server),
            Outcome::NotSent => limiter.refund_all(ticket),
        }
    }
}

impl<S, Req, U> Future for ResponseFuture<S, Req, U>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    U: ReadUsage<S::Response>,
{
    type Output = Result<S::Response, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                KindProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Error::from_inner);
                    this.guard.finish(result.as_ref());
                    // The finished inner future is dropped now, not with
                    // this one: what it holds (a connection, a timer, a
                    // permit) goes back at once. (Keeping it saved 15
                    // instructions a call, and the storm test then lost
                    // an answer in some runs under load.)
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                KindProj::Readying { svc, req } => match ready!(svc.poll_ready(cx)) {
                    Ok(()) => {
                        let req = req.take().expect("request taken once");
                        let fut = svc.call(req);
                        this.guard.sent = true;
                        this.state.set(State::Calling { fut });
                    }
                    Err(e) => {
                        // Never sent: the guard gives the charges back.
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::from_inner(e)));
                    }
                },
                KindProj::Waiting { wait } => {
                    let WaitProj {
                        id,
                        mut sleep,
                        deadline,
                        since,
                        span,
                        svc,
                        req,
                    } = wait.as_mut().project();
                    let _entered = span.enter();
                    let limiter = this.guard.limiter.as_ref().expect("a waiter has a limiter");
                    match limiter.poll_wait(*id, cx.waker()) {
                        WaitPoll::Admitted(ticket) => {
                            this.guard.waiting = None;
                            this.guard.ticket = Some(ticket);
                            limiter
                                .settings
                                .emit(Kind::Admitted, Some(since.elapsed()), None);
                            let svc = svc.take().expect("service taken once");
                            let req = req.take();
                            drop(_entered);
                            this.state.set(State::Readying { svc, req });
                        }
                        WaitPoll::Pending(at) => {
                            let wake = at.map_or(*deadline, |at| at.min(*deadline));
                            if sleep.deadline() != wake {
                                sleep.as_mut().reset(wake);
                            }
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            if Instant::now() < *deadline {
                                // The head's time has come: check again.
                                continue;
                            }
                            this.guard.waiting = None;
                            let retry_after = limiter.leave(*id).unwrap_or_default();
                            limiter.settings.emit(
                                Kind::TimedOut,
                                Some(since.elapsed()),
                                Some(retry_after),
                            );
                            drop(_entered);
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::RateLimited { retry_after }));
                        }
                    }
                }
                KindProj::Rejected { retry_after } => {
                    let retry_after = *retry_after;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(Error::RateLimited { retry_after }));
                }
                KindProj::Done => panic!("rate limit ResponseFuture polled after completion"),
            }
        }
    }
}
