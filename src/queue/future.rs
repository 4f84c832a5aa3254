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

/// Per-request facts the slow path needs.
#[derive(Debug)]
struct Meta {
    priority: Priority,
    deadline: Option<Instant>,
    since: Option<Instant>,
    expiry: Expiry,
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
        state: State<S::Future>,
        // Held while the inner future runs, and from the grant on.
        permit: Option<Permit>,
        // What waiting and readying need, boxed so that the future of a call
        // that went straight through stays small (and its drop cheap).
        slow: Option<Box<Slow<S, Req>>>,
        hold: PhantomData<fn() -> H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] fut: F },
        Failed { error: Option<Failure> },
        // Admitting, queued or readying: the work is in `slow`.
        Slow,
        Done,
    }
}

/// A call that is not (yet) running: its service, its request, its timer.
struct Slow<S, Req> {
    phase: Phase,
    service: Option<S>,
    req: Option<Req>,
    timer: Option<Pin<Box<Sleep>>>,
    meta: Meta,
}

enum Phase {
    /// `call` came without `poll_ready`: admission happens in `poll`.
    Admitting {
        shared: Arc<Shared>,
        wait: Option<Box<Waiting>>,
        max_wait: Option<Duration>,
    },
    /// Holds a place; the first poll puts the request in its list (with the
    /// task's waker, in one critical section).
    Queued {
        slot: Option<Slot>,
        entry: Option<Entry>,
    },
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
        let state = match (&self.state, self.slow.as_deref().map(|s| &s.phase)) {
            (State::Calling { .. }, _) => "calling",
            (State::Failed { .. }, _) => "failed",
            (State::Done, _) => "done",
            (State::Slow, Some(Phase::Admitting { .. })) => "admitting",
            (State::Slow, Some(Phase::Queued { .. })) => "queued",
            (State::Slow, _) => "readying",
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
                slow: None,
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
            slow: None,
            hold: PhantomData,
        }
    }

    pub(super) fn expired(shared: &Core, priority: Option<Priority>) -> Self {
        count_expired(shared, priority, None);
        Self::failed(deadline_exceeded())
    }

    fn slow(slow: Slow<S, Req>, permit: Option<Permit>) -> Self {
        Self {
            state: State::Slow,
            permit,
            slow: Some(Box::new(slow)),
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
        let slow = Slow {
            phase: Phase::Readying,
            service: Some(service),
            req: Some(req),
            timer: timer_at(deadline),
            meta: Meta {
                priority: Priority::Normal,
                deadline,
                since: None,
                expiry: Expiry::Deadline,
            },
        };
        Self::slow(slow, Some(permit))
    }

    /// A place in the queue: enqueue on the first poll, then wait.
    pub(super) fn queue(
        service: S,
        req: Req,
        slot: Slot,
        since: Instant,
        priority: Priority,
        deadline: Option<Instant>,
        max_wait: Option<Duration>,
    ) -> Self {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            let shared = Arc::clone(slot.shared());
            drop(slot);
            return Self::expired(&shared, Some(priority));
        }
        let mut meta = Meta {
            priority,
            deadline,
            since: Some(since),
            expiry: Expiry::Deadline,
        };
        let (at, expiry) = wait_limit(deadline, max_wait.and_then(|d| since.checked_add(d)));
        meta.expiry = expiry;
        let slow = Slow {
            phase: Phase::Queued {
                slot: Some(slot),
                entry: None,
            },
            service: Some(service),
            req: Some(req),
            timer: timer_at(at),
            meta,
        };
        Self::slow(slow, None)
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
    ) -> Self {
        let slow = Slow {
            phase: Phase::Admitting {
                shared,
                wait,
                max_wait,
            },
            service: Some(service),
            req: Some(req),
            timer: timer_at(deadline),
            meta: Meta {
                priority,
                deadline,
                since: None,
                expiry: Expiry::Deadline,
            },
        };
        Self::slow(slow, None)
    }
}

/// A boxed timer (slow path only).
fn timer_at(at: Option<Instant>) -> Option<Pin<Box<Sleep>>> {
    at.map(|at| Box::pin(sleep_until(at)))
}

/// The timer fired (`true`), or is not armed or still pending (`false`).
fn fired(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

/// The earlier of the deadline and the end of the maximum wait, and which
/// one it is.
fn wait_limit(deadline: Option<Instant>, wait_end: Option<Instant>) -> (Option<Instant>, Expiry) {
    match (deadline, wait_end) {
        (None, None) => (None, Expiry::Deadline),
        (Some(d), None) => (Some(d), Expiry::Deadline),
        (None, Some(w)) => (Some(w), Expiry::MaxWait),
        (Some(d), Some(w)) if d <= w => (Some(d), Expiry::Deadline),
        (Some(_), Some(w)) => (Some(w), Expiry::MaxWait),
    }
}

impl<S, Req> Slow<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// Runs the waiting and readying until the inner service is called, an
    /// error is the answer, or nothing can happen until a wake-up.
    fn poll(&mut self, permit: &mut Option<Permit>, cx: &mut Context<'_>) -> Step<S::Future> {
        loop {
            match &mut self.phase {
                Phase::Admitting {
                    shared,
                    wait,
                    max_wait,
                } => {
                    let max_wait = *max_wait;
                    match poll_admit(shared, wait, max_wait, cx) {
                        Poll::Pending => {
                            if fired(&mut self.timer, cx) {
                                count_expired(shared, Some(self.meta.priority), None);
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
                            let meta = &mut self.meta;
                            if meta.deadline.is_some_and(|d| d <= Instant::now()) {
                                let shared = Arc::clone(slot.shared());
                                drop(slot);
                                count_expired(&shared, Some(meta.priority), None);
                                return Step::Fail(deadline_exceeded());
                            }
                            meta.since = Some(since);
                            let (at, expiry) = wait_limit(
                                meta.deadline,
                                max_wait.and_then(|d| since.checked_add(d)),
                            );
                            meta.expiry = expiry;
                            self.timer = timer_at(at);
                            self.phase = Phase::Queued {
                                slot: Some(slot),
                                entry: None,
                            };
                        }
                    }
                }
                Phase::Queued { slot, entry } => {
                    let meta = &mut self.meta;
                    let mut fresh = false;
                    if let Some(slot) = slot.take() {
                        let since = meta.since.unwrap_or_else(Instant::now);
                        match slot.enqueue(meta.priority, since, cx.waker()) {
                            Enqueued::Entry(e) => {
                                *entry = Some(e);
                                // Its waker is registered: no need to look again.
                                fresh = true;
                            }
                            Enqueued::Permit(p) => {
                                *permit = Some(p);
                                self.timer = timer_at(meta.deadline);
                                meta.expiry = Expiry::Deadline;
                                self.phase = Phase::Readying;
                                continue;
                            }
                            Enqueued::Closed => return Step::Fail(Error::Shutdown),
                        }
                    }
                    let e = entry.as_mut().expect("a queued future keeps its entry");
                    let polled = if fresh { Poll::Pending } else { e.poll(cx) };
                    match polled {
                        Poll::Ready(Grant::Permit(p)) => {
                            let shared = e.shared();
                            shared.counters.add(Count::DispatchedAfterWait);
                            if shared.observed() {
                                let waited = meta
                                    .since
                                    .map(|s| Instant::now().saturating_duration_since(s));
                                shared.emit(
                                    QueueEventKind::Dispatched,
                                    Some(meta.priority),
                                    shared.depth(),
                                    waited,
                                );
                            }
                            *entry = None;
                            *permit = Some(p);
                            // Only the deadline applies from here on.
                            self.timer = timer_at(meta.deadline);
                            meta.expiry = Expiry::Deadline;
                            self.phase = Phase::Readying;
                        }
                        Poll::Ready(Grant::Closed | Grant::Slot(_)) => {
                            // A queued entry is only ever granted a permit or
                            // failed by shutdown.
                            e.shared().counters.add(Count::ShutOut);
                            *entry = None;
                            return Step::Fail(Error::Shutdown);
                        }
                        Poll::Pending => {
                            if !fired(&mut self.timer, cx) {
                                return Step::Pending;
                            }
                            let entry = entry.take().expect("a queued future keeps its entry");
                            let shared = Arc::clone(entry.shared());
                            entry.withdraw();
                            let waited = meta
                                .since
                                .map(|s| Instant::now().saturating_duration_since(s))
                                .unwrap_or_default();
                            return Step::Fail(match meta.expiry {
                                Expiry::Deadline => {
                                    count_expired(&shared, Some(meta.priority), Some(waited));
                                    deadline_exceeded()
                                }
                                Expiry::MaxWait => {
                                    shared.counters.add(Count::TimedOut);
                                    tracing::debug!(
                                        priority = meta.priority.as_str(),
                                        waited_ms = waited.as_millis() as u64,
                                        "queue wait exceeded"
                                    );
                                    shared.emit(
                                        QueueEventKind::TimedOut,
                                        Some(meta.priority),
                                        0,
                                        Some(waited),
                                    );
                                    Error::QueueTimeout { waited }
                                }
                            });
                        }
                    }
                }
                Phase::Readying => {
                    let svc = self
                        .service
                        .as_mut()
                        .expect("a readying future keeps its service");
                    match svc.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            if self.meta.deadline.is_some_and(|d| d <= Instant::now()) {
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

    /// The deadline passed while readying: the permit goes back unused.
    fn expire(&mut self, permit: &mut Option<Permit>) -> Error {
        if let Some(p) = permit.take() {
            count_expired(p.core(), Some(self.meta.priority), None);
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
                StateProj::Slow => {
                    let slow = this
                        .slow
                        .as_mut()
                        .expect("a slow future keeps its slow part");
                    match slow.poll(this.permit, cx) {
                        Step::Pending => return Poll::Pending,
                        Step::Call(fut) => this.state.set(State::Calling { fut }),
                        Step::Fail(error) => this.state.set(State::Failed {
                            error: Some(error.into()),
                        }),
                    }
                    // The service, the request and the timer are done with.
                    *this.slow = None;
                }
                StateProj::Done => panic!("queue ResponseFuture polled after completion"),
            }
        }
    }
}
