//! [`ResponseFuture`]: waits in the queue when it has to, then calls the
//! inner service in the caller's task.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use tower_service::Service;

use super::event::QueueEventKind;
use super::state::{Core, Count, Enqueued, Entry, Grant, Link, Permit, Slot};
use super::{poll_admit, Admitted, Priority, Waiting};
use crate::error::{BoxError, Error};

/// The inner service panicked in `call` or in its response future; the
/// queue caught the panic and answered the caller with
/// [`Error::Upstream`](crate::Error::Upstream) holding this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerPanicked {
    message: String,
}

impl InnerPanicked {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        Self { message }
    }

    /// The panic's message, when it was a string.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for InnerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inner service panicked: {}", self.message)
    }
}

impl std::error::Error for InnerPanicked {}

fn panicked(payload: Box<dyn Any + Send>) -> Error {
    let err = InnerPanicked::from_payload(payload);
    tracing::warn!(
        message = err.message(),
        "inner service panicked; the caller gets an error"
    );
    Error::Upstream {
        source: Box::new(err),
    }
}

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
    max_wait: Option<Duration>,
    since: Option<Instant>,
    expiry: Expiry,
}

pin_project! {
    /// The response future of [`Queue`](super::Queue).
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, S::Future, Req>,
        timer: Option<Pin<Box<Sleep>>>,
        permit: Option<Permit>,
        meta: Option<Box<Meta>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, Req> {
        Calling { #[pin] fut: F },
        Failed { error: Option<Error> },
        Admitting {
            shared: Link,
            wait: Option<Box<Waiting>>,
            service: Option<S>,
            req: Option<Req>,
        },
        Queued {
            // The place, until the first poll puts the request in its list
            // (with the task's waker, in one critical section).
            slot: Option<Slot>,
            entry: Option<Entry>,
            service: Option<S>,
            req: Option<Req>,
        },
        Readying { service: Option<S>, req: Option<Req> },
        Done,
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
            State::Admitting { .. } => "admitting",
            State::Queued { .. } => "queued",
            State::Readying { .. } => "readying",
            State::Done => "done",
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

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    fn new(
        state: State<S, S::Future, Req>,
        permit: Option<Permit>,
        meta: Option<Box<Meta>>,
    ) -> Self {
        Self {
            state,
            timer: None,
            permit,
            meta,
        }
    }

    /// The fast path: permit and readied inner service in hand.
    pub(super) fn calling(inner: &mut S, req: Req, permit: Permit) -> Self {
        match catch_unwind(AssertUnwindSafe(|| inner.call(req))) {
            Ok(fut) => Self::new(State::Calling { fut }, Some(permit), None),
            Err(payload) => Self::failed(panicked(payload)),
        }
    }

    pub(super) fn failed(error: Error) -> Self {
        Self::new(State::Failed { error: Some(error) }, None, None)
    }

    pub(super) fn expired(shared: &Core, priority: Option<Priority>) -> Self {
        count_expired(shared, priority, None);
        Self::failed(Error::DeadlineExceeded {
            attempts: 0,
            source: None,
        })
    }

    /// A permit, but the inner service still has to be readied.
    pub(super) fn readying(
        service: S,
        req: Req,
        permit: Permit,
        deadline: Option<Instant>,
    ) -> Self {
        let meta = Box::new(Meta {
            priority: Priority::Normal,
            deadline,
            max_wait: None,
            since: None,
            expiry: Expiry::Deadline,
        });
        let mut fut = Self::new(
            State::Readying {
                service: Some(service),
                req: Some(req),
            },
            Some(permit),
            Some(meta),
        );
        fut.timer = timer_at(deadline);
        fut
    }

    /// A place in the queue: enqueue now, wait in `poll`.
    pub(super) fn queue(
        service: S,
        req: Req,
        slot: Slot,
        since: Instant,
        priority: Priority,
        deadline: Option<Instant>,
        max_wait: Option<Duration>,
    ) -> Self {
        let mut meta = Box::new(Meta {
            priority,
            deadline,
            max_wait,
            since: Some(since),
            expiry: Expiry::Deadline,
        });
        if deadline.is_some_and(|d| d <= Instant::now()) {
            let shared = Arc::clone(slot.shared());
            drop(slot);
            return Self::expired(&shared, Some(priority));
        }
        let (at, expiry) = wait_limit(deadline, max_wait.map(|d| since + d));
        meta.expiry = expiry;
        let mut fut = Self::new(
            State::Queued {
                slot: Some(slot),
                entry: None,
                service: Some(service),
                req: Some(req),
            },
            None,
            Some(meta),
        );
        fut.timer = timer_at(at);
        fut
    }

    /// `call` came without `poll_ready`: admission happens in `poll`.
    pub(super) fn admitting(
        shared: Link,
        wait: Option<Box<Waiting>>,
        service: S,
        req: Req,
        priority: Priority,
        deadline: Option<Instant>,
        max_wait: Option<Duration>,
    ) -> Self {
        let meta = Box::new(Meta {
            priority,
            deadline,
            max_wait,
            since: None,
            expiry: Expiry::Deadline,
        });
        let mut fut = Self::new(
            State::Admitting {
                shared,
                wait,
                service: Some(service),
                req: Some(req),
            },
            None,
            Some(meta),
        );
        fut.timer = timer_at(deadline);
        fut
    }
}

/// A boxed timer (slow path only), so that the fast path's future stays
/// small.
fn timer_at(at: Option<Instant>) -> Option<Pin<Box<Sleep>>> {
    at.map(|at| Box::pin(sleep_until(at)))
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

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let out = match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(r)) => r.map_err(Error::from_inner),
                        Err(payload) => Err(panicked(payload)),
                    };
                    // Drop the inner future first, then hand the permit on.
                    this.state.set(State::Done);
                    *this.permit = None;
                    return Poll::Ready(out);
                }
                StateProj::Failed { error } => {
                    let error = error.take();
                    this.state.set(State::Done);
                    *this.permit = None;
                    return Poll::Ready(Err(error.unwrap_or(Error::Shutdown)));
                }
                StateProj::Admitting {
                    shared,
                    wait,
                    service,
                    req,
                } => {
                    let meta = this
                        .meta
                        .as_mut()
                        .expect("admitting futures keep their meta");
                    match poll_admit(shared, wait, meta.max_wait, cx) {
                        Poll::Pending => {
                            if let Some(timer) = this.timer.as_mut() {
                                ready!(timer.as_mut().poll(cx));
                                let shared = Arc::clone(shared);
                                this.state.set(State::Done);
                                count_expired(&shared, Some(meta.priority), None);
                                return Poll::Ready(Err(Error::DeadlineExceeded {
                                    attempts: 0,
                                    source: None,
                                }));
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Admitted::Refused(e)) => {
                            this.state.set(State::Failed { error: Some(e) });
                        }
                        Poll::Ready(Admitted::Permit(p)) => {
                            let (service, req) = (service.take(), req.take());
                            *this.permit = Some(p);
                            this.state.set(State::Readying { service, req });
                        }
                        Poll::Ready(Admitted::Slot(slot, since)) => {
                            let (service, req) = (service.take(), req.take());
                            let (Some(service), Some(req)) = (service, req) else {
                                this.state.set(State::Failed { error: None });
                                continue;
                            };
                            let (priority, deadline, max_wait) =
                                (meta.priority, meta.deadline, meta.max_wait);
                            let next = Self::queue(
                                service, req, slot, since, priority, deadline, max_wait,
                            );
                            // Take over the new future's parts.
                            let ResponseFuture {
                                state,
                                timer,
                                permit,
                                meta,
                            } = next;
                            this.state.set(state);
                            *this.timer = timer;
                            *this.permit = permit;
                            *this.meta = meta;
                        }
                    }
                }
                StateProj::Queued {
                    slot,
                    entry,
                    service,
                    req,
                } => {
                    let meta = this.meta.as_mut().expect("queued futures keep their meta");
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
                                let (service, req) = (service.take(), req.take());
                                *this.permit = Some(p);
                                *this.timer = timer_at(meta.deadline);
                                meta.expiry = Expiry::Deadline;
                                this.state.set(State::Readying { service, req });
                                continue;
                            }
                            Enqueued::Closed => {
                                this.state.set(State::Failed {
                                    error: Some(Error::Shutdown),
                                });
                                continue;
                            }
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
                            let (service, req) = (service.take(), req.take());
                            *this.permit = Some(p);
                            // Only the deadline applies from here on.
                            *this.timer = timer_at(meta.deadline);
                            meta.expiry = Expiry::Deadline;
                            this.state.set(State::Readying { service, req });
                        }
                        Poll::Ready(Grant::Closed | Grant::Slot(_)) => {
                            // A queued entry is only ever granted a permit or
                            // failed by shutdown.
                            e.shared().counters.add(Count::ShutOut);
                            *entry = None;
                            this.state.set(State::Failed {
                                error: Some(Error::Shutdown),
                            });
                        }
                        Poll::Pending => {
                            let Some(timer) = this.timer.as_mut() else {
                                return Poll::Pending;
                            };
                            ready!(timer.as_mut().poll(cx));
                            let entry = entry.take().expect("a queued future keeps its entry");
                            let shared = Arc::clone(entry.shared());
                            entry.withdraw();
                            let waited = meta
                                .since
                                .map(|s| Instant::now().saturating_duration_since(s))
                                .unwrap_or_default();
                            let error = match meta.expiry {
                                Expiry::Deadline => {
                                    count_expired(&shared, Some(meta.priority), Some(waited));
                                    Error::DeadlineExceeded {
                                        attempts: 0,
                                        source: None,
                                    }
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
                            };
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    }
                }
                StateProj::Readying { service, req } => {
                    let svc = service
                        .as_mut()
                        .expect("a readying future keeps its service");
                    match svc.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let deadline = this.meta.as_ref().and_then(|m| m.deadline);
                            if deadline.is_some_and(|d| d <= Instant::now()) {
                                // Never send a request nobody waits for.
                                let priority = this.meta.as_ref().map(|m| m.priority);
                                this.state.set(State::Done);
                                if let Some(p) = this.permit.take() {
                                    count_expired(p.core(), priority, None);
                                }
                                return Poll::Ready(Err(Error::DeadlineExceeded {
                                    attempts: 0,
                                    source: None,
                                }));
                            }
                            let req = req.take().expect("a readying future keeps its request");
                            match catch_unwind(AssertUnwindSafe(|| svc.call(req))) {
                                Ok(fut) => {
                                    *this.timer = None;
                                    this.state.set(State::Calling { fut });
                                }
                                Err(payload) => {
                                    this.state.set(State::Failed {
                                        error: Some(panicked(payload)),
                                    });
                                }
                            }
                        }
                        Poll::Ready(Err(e)) => {
                            this.state.set(State::Done);
                            *this.permit = None;
                            return Poll::Ready(Err(Error::from_inner(e)));
                        }
                        Poll::Pending => {
                            let Some(timer) = this.timer.as_mut() else {
                                return Poll::Pending;
                            };
                            ready!(timer.as_mut().poll(cx));
                            let priority = this.meta.as_ref().map(|m| m.priority);
                            this.state.set(State::Done);
                            if let Some(p) = this.permit.take() {
                                count_expired(p.core(), priority, None);
                            }
                            return Poll::Ready(Err(Error::DeadlineExceeded {
                                attempts: 0,
                                source: None,
                            }));
                        }
                    }
                }
                StateProj::Done => panic!("queue ResponseFuture polled after completion"),
            }
        }
    }
}
