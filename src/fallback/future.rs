//! The response future of [`Fallback`](super::Fallback).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::event::FallbackEventKind;
use super::{decide, Decision, Shared};
use crate::classify::Reason;
use crate::error::{BoxError, Error};
use crate::report::{self, TargetOutcome};

pin_project! {
    /// The future of [`Fallback`](super::Fallback): tries the targets in
    /// order until one answers, the failure is one no target can fix, or the
    /// deadline passes.
    pub struct ResponseFuture<S, Req, Res>
    where
        S: Service<Req>,
    {
        shared: Arc<Shared<S, Req, Res>>,
        progress: Progress<Req>,
        #[pin]
        state: State<S, Req>,
        // The deadline's timer, created only when a target makes the call
        // wait: a call answered at once never touches the timer wheel.
        // Boxed, as the other layers' timers: the future every layer above
        // moves stays small.
        deadline: Option<Pin<Box<Sleep>>>,
        // One span per request, `llm_resilience.request{target_name}`: the
        // target being tried; the retry's spans (attempts, and one per
        // attempt with its number) open inside it. Only when a subscriber
        // listens (which allocates for it anyway): otherwise nothing, not
        // even a disabled span to enter on every poll.
        span: Option<Box<tracing::Span>>,
    }
}

/// Where the call stands, apart from the pinned state.
struct Progress<Req> {
    request: Option<Req>,
    /// One past the target being called (or the next to pick).
    next: usize,
    larger_tried: bool,
    tried: u32,
    // Boxed: set only once a target failed.
    last: Option<Box<Error>>,
    deadline: Option<Instant>,
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Pick,
        Readying { service: Option<S>, request: Option<Req> },
        Calling { #[pin] fut: S::Future },
    }
}

impl<S, Req, Res> fmt::Debug for ResponseFuture<S, Req, Res>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("next", &self.progress.next)
            .field("tried", &self.progress.tried)
            .finish_non_exhaustive()
    }
}

impl<S, Req, Res> ResponseFuture<S, Req, Res>
where
    S: Service<Req>,
{
    #[inline]
    pub(super) fn new(
        shared: Arc<Shared<S, Req, Res>>,
        request: Req,
        inherited: Option<Instant>,
    ) -> Self {
        // The earlier of this fallback's own deadline and the one the caller
        // gave it (the agent pipeline's, counted from its call).
        let own = shared.deadline.and_then(|d| Instant::now().checked_add(d));
        let deadline = match (own, inherited) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ResponseFuture {
            shared,
            progress: Progress {
                request: Some(request),
                next: 0,
                larger_tried: false,
                tried: 0,
                last: None,
                deadline,
            },
            state: State::Pick,
            deadline: None,
            span: request_span(),
        }
    }
}

/// The request's span, when a subscriber listens.
#[inline]
fn request_span() -> Option<Box<tracing::Span>> {
    let span = tracing::debug_span!(
        target: "llm_resilience::fallback",
        "llm_resilience.request",
        target_name = tracing::field::Empty,
        attempt = tracing::field::Empty,
    );
    (!span.is_disabled()).then(|| Box::new(span))
}

impl<S, Req, Res> Future for ResponseFuture<S, Req, Res>
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Output = Result<Res, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _span = this.span.as_deref().map(tracing::Span::enter);
        let span = this.span.as_deref();
        let shared = &**this.shared;
        let p = this.progress;
        loop {
            if let Some(sleep) = this.deadline.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(deadline_exceeded(shared, p));
                }
            }
            match this.state.as_mut().project() {
                StateProj::Pick => {
                    let Some(idx) = shared.next_normal(p.next) else {
                        let last = p.last.take().map(|e| *e);
                        return Poll::Ready(finish(shared, &p.request, last));
                    };
                    // Nothing is sent after the deadline: until the timer is
                    // armed, one clock read says whether it passed.
                    // (Inside an agent pipeline's poll, the reading its
                    // layers share.)
                    if this.deadline.is_none()
                        && p.deadline.is_some_and(|at| crate::util::time::now() >= at)
                    {
                        return Poll::Ready(deadline_exceeded(shared, p));
                    }
                    // A target ready at once is called from here (the
                    // common case), without a pass through `Readying`.
                    let (mut svc, req) = begin(shared, p, idx, span);
                    let Poll::Ready(ready) = svc.poll_ready(cx) else {
                        this.state.set(State::Readying {
                            service: Some(svc),
                            request: Some(req),
                        });
                        return wait(this.deadline, shared, p, cx);
                    };
                    p.tried += 1;
                    match ready {
                        Ok(()) => {
                            let fut = super::with_deadline(p.deadline, || svc.call(req));
                            this.state.set(State::Calling { fut });
                        }
                        Err(e) => {
                            let err = Error::from_inner(e);
                            if let Some(done) =
                                on_failure(shared, p, this.state.as_mut(), err, span)
                            {
                                return Poll::Ready(done);
                            }
                        }
                    }
                }
                StateProj::Readying { service, request } => {
                    let svc = service.as_mut().expect("polled after the call was made");
                    let Poll::Ready(ready) = svc.poll_ready(cx) else {
                        return wait(this.deadline, shared, p, cx);
                    };
                    match ready {
                        Ok(()) => {
                            let req = request.take().expect("request taken once");
                            let fut = super::with_deadline(p.deadline, || svc.call(req));
                            p.tried += 1;
                            this.state.set(State::Calling { fut });
                        }
                        Err(e) => {
                            p.tried += 1;
                            this.state.set(State::Pick);
                            let err = Error::from_inner(e);
                            if let Some(done) =
                                on_failure(shared, p, this.state.as_mut(), err, span)
                            {
                                return Poll::Ready(done);
                            }
                        }
                    }
                }
                StateProj::Calling { fut } => {
                    let Poll::Ready(result) = super::with_deadline(p.deadline, || fut.poll(cx))
                    else {
                        return wait(this.deadline, shared, p, cx);
                    };
                    this.state.set(State::Pick);
                    match result {
                        Ok(res) => {
                            let current = p.next - 1;
                            shared.emit(FallbackEventKind::Answered, current, Reason::Ok);
                            let name = &shared.targets[current].0;
                            report::record(|r| {
                                if let Some(t) = r.current() {
                                    t.outcome = TargetOutcome::Answered;
                                }
                                r.answered_by = Some(name.clone());
                            });
                            return Poll::Ready(Ok(res));
                        }
                        Err(e) => {
                            let err = Error::from_inner(e);
                            if let Some(done) =
                                on_failure(shared, p, this.state.as_mut(), err, span)
                            {
                                return Poll::Ready(done);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The call waits on a target: arms the deadline's timer if it is not yet
/// (polling it registers the waker); the deadline's error if it passed.
fn wait<S, Req, Res>(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    shared: &Shared<S, Req, Res>,
    p: &mut Progress<Req>,
    cx: &mut Context<'_>,
) -> Poll<Result<Res, Error>> {
    if deadline.is_none() {
        let Some(at) = p.deadline else {
            return Poll::Pending;
        };
        *deadline = Some(Box::pin(tokio::time::sleep_until(at)));
    }
    match deadline.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
        Some(Poll::Ready(())) => Poll::Ready(deadline_exceeded(shared, p)),
        _ => Poll::Pending,
    }
}

/// The deadline passed: the event, the report, the error.
fn deadline_exceeded<S, Req, Res>(
    shared: &Shared<S, Req, Res>,
    p: &mut Progress<Req>,
) -> Result<Res, Error> {
    shared.emit(
        FallbackEventKind::DeadlineExceeded,
        p.next.saturating_sub(1),
        Reason::Timeout,
    );
    report::record(|r| {
        if let Some(t) = r.current() {
            if t.outcome == TargetOutcome::Pending {
                t.outcome = TargetOutcome::Failed(Reason::Timeout);
            }
        }
    });
    Err(Error::DeadlineExceeded {
        attempts: p.tried,
        source: p.last.take().map(|e| e.into_cause()),
    })
}

/// Starts target `idx`, to be readied in the `Readying` state.
fn start<S, Req, Res>(
    shared: &Shared<S, Req, Res>,
    p: &mut Progress<Req>,
    mut state: Pin<&mut State<S, Req>>,
    idx: usize,
    span: Option<&tracing::Span>,
) where
    S: Service<Req> + Clone,
    Req: Clone,
{
    let (service, request) = begin(shared, p, idx, span);
    state.set(State::Readying {
        service: Some(service),
        request: Some(request),
    });
}

/// Target `idx`'s turn: its service, its request, its report line.
#[inline]
fn begin<S, Req, Res>(
    shared: &Shared<S, Req, Res>,
    p: &mut Progress<Req>,
    idx: usize,
    span: Option<&tracing::Span>,
) -> (S, Req)
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    if let Some(span) = span {
        span.record("target_name", &*shared.targets[idx].0);
    }
    p.next = idx + 1;
    let request = prepare(shared, idx, &p.request);
    report::record(|r| r.start_target(&shared.targets[idx].0));
    (shared.services[idx].clone(), request)
}

/// Decides what a target's failure means; `Some` ends the call.
fn on_failure<S, Req, Res>(
    shared: &Shared<S, Req, Res>,
    p: &mut Progress<Req>,
    state: Pin<&mut State<S, Req>>,
    err: Error,
    span: Option<&tracing::Span>,
) -> Option<Result<Res, Error>>
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    let current = p.next - 1;
    let (decision, reason) = decide(&err);
    let skipped = matches!(err, Error::CircuitOpen { .. } | Error::RateLimited { .. });
    report::record(|r| {
        if let Some(t) = r.current() {
            if skipped {
                t.attempts = 0;
                t.outcome = TargetOutcome::Skipped(reason);
            } else {
                t.outcome = TargetOutcome::Failed(reason);
            }
        }
    });
    let on_larger = shared.larger == Some(current);
    match decision {
        Decision::LargerContext if !p.larger_tried && !on_larger => {
            if let Some(larger) = shared.larger {
                shared.emit(FallbackEventKind::ToLargerContext, current, reason);
                p.larger_tried = true;
                p.last = Some(Box::new(err));
                start(shared, p, state, larger, span);
                return None;
            }
            shared.emit(FallbackEventKind::Stopped, current, reason);
            Some(Err(err))
        }
        Decision::Stop | Decision::LargerContext => {
            shared.emit(FallbackEventKind::Stopped, current, reason);
            Some(Err(err))
        }
        Decision::Next if on_larger => {
            // The larger-context target failed: no other target helps.
            shared.emit(FallbackEventKind::MovedOn, current, reason);
            Some(finish(shared, &p.request, Some(err)))
        }
        Decision::Next => {
            shared.emit(FallbackEventKind::MovedOn, current, reason);
            p.last = Some(Box::new(err));
            None
        }
    }
}

/// The request for target `idx`: a clone, rewritten for the target.
fn prepare<S, Req, Res>(shared: &Shared<S, Req, Res>, idx: usize, request: &Option<Req>) -> Req
where
    Req: Clone,
{
    let original = request.as_ref().expect("request kept until the call ends");
    let mut req = original.clone();
    if let Some(rewrite) = &shared.targets[idx].1 {
        rewrite(&mut req);
    }
    req
}

/// Every target failed: the degrade step, or the last error.
fn finish<S, Req, Res>(
    shared: &Shared<S, Req, Res>,
    request: &Option<Req>,
    last: Option<Error>,
) -> Result<Res, Error> {
    let err = last.unwrap_or(Error::Shutdown);
    if let (Some(degrade), Some(req)) = (&shared.degrade, request.as_ref()) {
        if let Some(answer) = degrade(req, &err) {
            shared.emit(
                FallbackEventKind::Degraded,
                shared.targets.len() - 1,
                Reason::Ok,
            );
            report::record(|r| r.degraded = true);
            return Ok(answer);
        }
    }
    Err(err)
}
