//! [`ResponseFuture`]: waits in the queue when it has to, then calls the
//! inner service in the caller's task.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use tower_service::Service;

use super::admit::{poll_admit, Admitted, Waiting};
use super::event::QueueEventKind;
use super::panicked::panicked;
use super::state::{Core, Count, Enqueued, Entry, Grant, Permit, Shared, Slot};
use super::Priority;
use crate::error::{BoxError, Error};
use crate::guard::{AtResponse, Release, StreamGuard};

/// Which error the armed timer stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Deadline,
    MaxWait,
}

/// Why a future failed, kept small so that the future of a call that went
/// straight through stays small: the common refusals inline, the rest
/// boxed (they are rare, and most already allocate).
#[derive(Debug)]
enum Failure {
    Full(usize),
    Shutdown,
    Expired,
    Other(Box<Error>),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::QueueFull { depth } => Failure::Full(depth),
            Error::Shutdown => Failure::Shutdown,
            Error::DeadlineExceeded {
                attempts: 0,
                source: None,
            } => Failure::Expired,
            other => Failure::Other(Box::new(other)),
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Full(depth) => Error::QueueFull { depth },
            Failure::Shutdown => Error::Shutdown,
            Failure::Expired => deadline_exceeded(),
            Failure::Other(e) => *e,
        }
    }
}

pin_project! {
    /// The response future of [`Queue`](super::Queue). With
    /// [`AtStreamEnd`](crate::guard::AtStreamEnd) (`H`) it hands its permit
    /// to the response, which keeps it until its stream ends.
    pub struct ResponseFuture<S, Req, H = AtResponse>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, Wait<S, Req>>,
        // Held while the inner future runs, and from the grant on.
        permit: Option<Permit>,
        hold: PhantomData<fn() -> H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, W> {
        Calling { #[pin] fut: F },
        Failed { error: Option<Failure> },
        // Admitting, queued or readying: a call that is not running yet,
        // kept inline (a waiting request allocates nothing of its own but
        // its timer, if it has one).
        Waiting { wait: W },
        Done,
    }
}

/// A call that is not (yet) running: its service, its request, its timer.
struct Wait<S, Req> {
    phase: Phase,
    service: S,
    req: Option<Req>,
    /// Armed for the deadline (`expiry` says `Deadline`) or for the end of
    /// the maximum wait when that comes first.
    timer: Option<Pin<Box<Sleep>>>,
    deadline: Option<Instant>,
    priority: Priority,
    expiry: Expiry,
}

/// `call` came without `poll_ready`: admission happens in `poll` (rare:
/// boxed, so that it does not make every future larger).
struct Admitting {
    shared: Arc<Shared>,
    wait: Option<Box<Waiting>>,
    max_wait: Option<Duration>,
    stamp: bool,
}

enum Phase {
    Admitting(Box<Admitting>),
    /// Holds a place; the first poll puts the request in its list (with the
    /// task's waker, in one critical section). With when the wait began,
    /// if the clock was read for it.
    Placed(Slot, Option<Instant>),
    /// In its list, waiting for a permit.
    Queued(Entry),
    /// Holds a permit; the inner service is being readied.
    Readying,
}

/// What one poll of the slow part came to.
enum Step<F> {
    Pending,
    Call(F),
    Fail(Error),
}

impl<S, Req, H> fmt::Debug for ResponseFuture<S, Req, H>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
            State::Done => "done",
            State::Waiting { wait } => match wait.phase {
                Phase::Admitting(_) => "admitting",
                Phase::Placed(..) | Phase::Queued(_) => "queued",
                Phase::Readying => "readying",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

fn count_expired(shared: &Core, priority: Option<Priority>, waited: Option<Duration>) {
    shared.counters.add(Count::Expired);
    tracing::debug!(
        priority = priority.map(Priority::as_str),
        "request deadline passed before it was sent"
    );
    shared.emit(QueueEventKind::Expired, priority, 0, waited);
}

fn deadline_exceeded() -> Error {
    Error::DeadlineExceeded {
        attempts: 0,
        source: None,
    }
}

impl<S, Req, H> ResponseFuture<S, Req, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// The fast path: permit and readied inner service in hand.
    #[inline]
    pub(super) fn calling(inner: &mut S, req: Req, permit: Permit) -> Self {
        match catch_unwind(AssertUnwindSafe(|| inner.call(req))) {
            Ok(fut) => Self {
                state: State::Calling { fut },
                permit: Some(permit),
                hold: PhantomData,
            },
            Err(payload) => Self::failed(panicked(payload)),
        }
    }

    pub(super) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed {
                error: Some(error.into()),
            },
            permit: None,
            hold: PhantomData,
        }
    }

    pub(super) fn expired(shared: &Core, priority: Option<Priority>) -> Self {
        count_expired(shared, priority, None);
        Self::failed(deadline_exceeded())
    }

    #[inline]
    fn waiting(wait: Wait<S, Req>, permit: Option<Permit>) -> Self {
        Self {
            state: State::Waiting { wait },
            permit,
            hold: PhantomData,
        }
    }

    /// A permit, but the inner service still has to be readied.
    pub(super) fn readying(
        service: S,
        req: Req,
        permit: Permit,
        deadline: Option<Instant>,
    ) -> Self {
        let wait = Wait::new(Phase::Readying, service, req, Priority::Normal, deadline);
        Self::waiting(wait, Some(permit))
    }

    /// A place in the queue: enqueue on the first poll, then wait.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn queue(
        service: S,
        req: Req,
        slot: Slot,
        since: Option<Instant>,
        priority: Priority,
        deadline: Option<Instant>,
        max_wait: Option<Duration>,
    ) -> Self {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            let shared = Arc::clone(slot.shared());
            drop(slot);
            return Self::expired(&shared, Some(priority));
        }
        let mut wait = Wait::new(Phase::Placed(slot, since), service, req, priority, deadline);
        wait.arm_wait(since, max_wait);
        Self::waiting(wait, None)
    }

    /// `call` came without `poll_ready`: admission happens in `poll`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admitting(
        shared: Arc<Shared>,
        wait: Option<Box<Waiting>>,
        service: S,
        req: Req,
        priority: Priority,
        deadline: Option<Instant>,
        max_wait: Option<Duration>,
        stamp: bool,
    ) -> Self {
        let phase = Phase::Admitting(Box::new(Admitting {
            shared,
            wait,
            max_wait,
            stamp,
        }));
        Self::waiting(Wait::new(phase, service, req, priority, deadline), None)
    }
}

/// A boxed timer (slow path only).
fn timer_at(at: Option<Instant>) -> Option<Pin<Box<Sleep>>> {
    at.map(|at| Box::pin(sleep_until(at)))
}

/// Points the timer at `at` (`None`: no timer), reusing its box if it has
/// one.
fn set_timer(timer: &mut Option<Pin<Box<Sleep>>>, at: Option<Instant>) {
    match (timer.as_mut(), at) {
        (Some(t), Some(at)) => t.as_mut().reset(at),
        (_, at) => *timer = timer_at(at),
    }
}

/// The timer fired (`true`), or is not armed or still pending (`false`).
fn fired(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

impl<S, Req> Wait<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// With its timer armed for the deadline.
    #[inline]
    fn new(
        phase: Phase,
        service: S,
        req: Req,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            phase,
            service,
            req: Some(req),
            timer: timer_at(deadline),
            deadline,
            priority,
            expiry: Expiry::Deadline,
        }
    }

    /// Arms the timer for the wait in the queue: the end of the maximum
    /// wait, if it comes before the deadline (whose timer is armed
    /// otherwise).
    fn arm_wait(&mut self, since: Option<Instant>, max_wait: Option<Duration>) {
        let Some(end) = max_wait.zip(since).and_then(|(d, s)| s.checked_add(d)) else {
            return;
        };
        if self.deadline.is_none_or(|d| end < d) {
            set_timer(&mut self.timer, Some(end));
            self.expiry = Expiry::MaxWait;
        }
    }

    /// The wait is over: only the deadline applies from here on.
    fn arm_deadline(&mut self) {
        if self.expiry == Expiry::MaxWait {
            set_timer(&mut self.timer, self.deadline);
            self.expiry = Expiry::Deadline;
        }
    }

    /// Runs the waiting and readying until the inner service is called, an
    /// error is the answer, or nothing can happen until a wake-up.
    fn poll(&mut self, permit: &mut Option<Permit>, cx: &mut Context<'_>) -> Step<S::Future> {
        loop {
            match &mut self.phase {
                Phase::Admitting(a) => {
                    let (max_wait, stamp) = (a.max_wait, a.stamp);
                    match poll_admit(&a.shared, &mut a.wait, max_wait, stamp, cx) {
                        Poll::Pending => {
                            if fired(&mut self.timer, cx) {
                                count_expired(&a.shared, Some(self.priority), None);
                                return Step::Fail(deadline_exceeded());
                            }
                            return Step::Pending;
                        }
                        Poll::Ready(Admitted::Refused(e)) => return Step::Fail(e),
                        Poll::Ready(Admitted::Permit(p)) => {
                            *permit = Some(p);
                            self.phase = Phase::Readying;
                        }
                        Poll::Ready(Admitted::Slot(slot, since)) => {
                            if self.deadline.is_some_and(|d| d <= Instant::now()) {
                                let shared = Arc::clone(slot.shared());
                                drop(slot);
                                count_expired(&shared, Some(self.priority), None);
                                return Step::Fail(deadline_exceeded());
                            }
                            self.arm_wait(since, max_wait);
                            self.phase = Phase::Placed(slot, since);
                        }
                    }
                }
                Phase::Placed(..) => {
                    let Phase::Placed(slot, since) =
                        std::mem::replace(&mut self.phase, Phase::Readying)
                    else {
                        unreachable!("matched above")
                    };
                    match slot.enqueue(self.priority, since, cx.waker()) {
                        Enqueued::Entry(e) => {
                            // The placeholder holds nothing: no drop to run.
                            let old = std::mem::replace(&mut self.phase, Phase::Queued(e));
                            debug_assert!(matches!(old, Phase::Readying));
                            std::mem::forget(old);
                            // Its waker is registered: only the timer is
                            // left to register.
                            return self.poll_timer(cx);
                        }
                        Enqueued::Permit(p) => {
                            *permit = Some(p);
                            self.arm_deadline();
                        }
                        Enqueued::Closed => return Step::Fail(Error::Shutdown),
                    }
                }
                Phase::Queued(e) => match e.poll(cx) {
                    Poll::Ready(Grant::Permit(p)) => {
                        let shared = p.core();
                        shared.counters.add(Count::DispatchedAfterWait);
                        if shared.observed() {
                            let waited = e
                                .since()
                                .map(|s| Instant::now().saturating_duration_since(s));
                            shared.emit(
                                QueueEventKind::Dispatched,
                                Some(self.priority),
                                shared.depth(),
                                waited,
                            );
                        }
                        self.phase = Phase::Readying;
                        *permit = Some(p);
                        self.arm_deadline();
                    }
                    Poll::Ready(Grant::Closed | Grant::Slot(_)) => {
                        // A queued entry is only ever granted a permit or
                        // failed by shutdown.
                        e.shared().counters.add(Count::ShutOut);
                        self.phase = Phase::Readying;
                        return Step::Fail(Error::Shutdown);
                    }
                    Poll::Pending => return self.poll_timer(cx),
                },
                Phase::Readying => {
                    let svc = &mut self.service;
                    match svc.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            if self.deadline.is_some_and(|d| d <= Instant::now()) {
                                // Never send a request nobody waits for.
                                return Step::Fail(self.expire(permit));
                            }
                            let req = self
                                .req
                                .take()
                                .expect("a readying future keeps its request");
                            return match catch_unwind(AssertUnwindSafe(|| svc.call(req))) {
                                Ok(fut) => Step::Call(fut),
                                Err(payload) => Step::Fail(panicked(payload)),
                            };
                        }
                        Poll::Ready(Err(e)) => {
                            *permit = None;
                            return Step::Fail(Error::from_inner(e));
                        }
                        Poll::Pending => {
                            if fired(&mut self.timer, cx) {
                                return Step::Fail(self.expire(permit));
                            }
                            return Step::Pending;
                        }
                    }
                }
            }
        }
    }

    /// Queued, no grant yet: pending, unless the timer fired (then the
    /// request leaves the queue with the timer's error).
    #[inline]
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Step<S::Future> {
        if self.timer.is_none() || !fired(&mut self.timer, cx) {
            return Step::Pending;
        }
        self.leave()
    }

    /// The timer fired while queued: the request leaves the queue.
    #[cold]
    fn leave(&mut self) -> Step<S::Future> {
        let Phase::Queued(entry) = std::mem::replace(&mut self.phase, Phase::Readying) else {
            unreachable!("only a queued request polls its wait timer")
        };
        let shared = Arc::clone(entry.shared());
        let since = entry.since();
        entry.withdraw();
        let waited = since.map(|s| Instant::now().saturating_duration_since(s));
        Step::Fail(match self.expiry {
            Expiry::Deadline => {
                count_expired(&shared, Some(self.priority), waited);
                deadline_exceeded()
            }
            Expiry::MaxWait => {
                // The maximum wait is armed only with a start.
                let waited = waited.unwrap_or_default();
                shared.counters.add(Count::TimedOut);
                tracing::debug!(
                    priority = self.priority.as_str(),
                    waited_ms = waited.as_millis() as u64,
                    "queue wait exceeded"
                );
                shared.emit(
                    QueueEventKind::TimedOut,
                    Some(self.priority),
                    0,
                    Some(waited),
                );
                Error::QueueTimeout { waited }
            }
        })
    }

    /// The deadline passed while readying: the permit goes back unused.
    fn expire(&mut self, permit: &mut Option<Permit>) -> Error {
        if let Some(p) = permit.take() {
            count_expired(p.core(), Some(self.priority), None);
        }
        deadline_exceeded()
    }
}

impl<S, Req, H> Future for ResponseFuture<S, Req, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    H: Release<S::Response>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let mut out = match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(r)) => r.map_err(Error::from_inner),
                        Err(payload) => Err(panicked(payload)),
                    };
                    // Drop the inner future first, then hand the permit on
                    // (or to the streamed response, which keeps it until
                    // its stream ends).
                    this.state.set(State::Done);
                    if H::HOLDS {
                        if let Ok(response) = &mut out {
                            if let Some(permit) = this.permit.take_if(|_| H::wants_guard(response))
                            {
                                H::attach(response, StreamGuard::hold(permit));
                            }
                        }
                    }
                    *this.permit = None;
                    return Poll::Ready(out);
                }
                StateProj::Failed { error } => {
                    let error = error.take();
                    this.state.set(State::Done);
                    *this.permit = None;
                    return Poll::Ready(Err(error.map_or(Error::Shutdown, Error::from)));
                }
                StateProj::Waiting { wait } => {
                    // The service, the request and the timer are done with
                    // once the next state is set.
                    match wait.poll(this.permit, cx) {
                        Step::Pending => return Poll::Pending,
                        Step::Call(fut) => this.state.set(State::Calling { fut }),
                        Step::Fail(error) => this.state.set(State::Failed {
                            error: Some(error.into()),
                        }),
                    }
                }
                StateProj::Done => panic!("queue ResponseFuture polled after completion"),
            }
        }
    }
}
