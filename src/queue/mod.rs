//! Queue: bounded admission with backpressure, priorities, deadlines and
//! cancellation, with no worker task.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::queue::{Priority, QueueLayer, WhenFull};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let queue = QueueLayer::builder()
//!     .capacity(1_000)
//!     .concurrency(32)
//!     .when_full(WhenFull::Wait)
//!     .max_wait(Duration::from_secs(30))
//!     .priority_by(|prompt: &&str| if prompt.starts_with('!') { Priority::High } else { Priority::Normal })
//!     .build()?;
//! let handle = queue.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(queue)
//!     .service(service_fn(|prompt: &'static str| async move {
//!         Ok::<_, std::io::Error>(prompt.len())
//!     }));
//! assert_eq!(svc.oneshot("hello").await?, 5);
//! assert_eq!(handle.depth(), 0);
//! # Ok(()) }
//! ```
//!
//! # Capacity and concurrency
//!
//! Two separate bounds. **Concurrency** is the number of calls in flight to
//! the inner service (permits). **Capacity** is the number of requests
//! *waiting* for a permit; in-flight calls do not count. A place in the
//! queue is taken when `poll_ready` finds no free permit and is given back
//! when the request gets its permit, is cancelled, expires or is refused.
//! So with concurrency `c` and capacity `k`, exactly `c + k` requests can be
//! accepted at once (the tests check that boundary); the next one, in
//! [`WhenFull::Wait`] mode, keeps `poll_ready` pending until a place frees
//! (optionally at most [`max_wait`](QueueLayerBuilder::max_wait), then
//! [`Error::QueueTimeout`]), and in [`WhenFull::Reject`] mode is answered at
//! once with [`Error::QueueFull`]. Rejection is decided by the queue's own
//! counts only, never by the inner service being pending.
//!
//! # Where the waiting happens
//!
//! A request's class and deadline are only known at `call`, so the waiting
//! is split:
//!
//! - `poll_ready` reserves a **permit** if one is free and then readies the
//!   inner service (this is the uncontended path: one compare-and-swap, no
//!   lock, no allocation, no task). Otherwise it reserves a **place** in the
//!   queue, or waits for one (wait mode), or records the rejection (reject
//!   mode; `poll_ready` still returns `Ok` and `call` answers with the
//!   error, as tower's `LoadShed` does).
//! - `call` with a permit calls the inner service at once. With a place, it
//!   reads the request's [`Priority`] and deadline and puts it in its
//!   priority's list; the **response future** waits there for a permit,
//!   then readies a clone of the inner service and calls it. The calls run
//!   in the callers' futures: there is no worker task, so nothing can die
//!   behind the callers' backs.
//!
//! A released permit is handed straight to the next queued request (waking
//! it), never put back while someone waits, so newcomers cannot overtake the
//! queue.
//!
//! # Priorities and aging
//!
//! Three classes, read from the request by
//! [`priority_by`](QueueLayerBuilder::priority_by). Order is strict with
//! **aging**: each queued request gets a virtual time, the time it began
//! waiting
//! minus [`age_after`](QueueLayerBuilder::age_after) for every class it is
//! above [`Priority::Low`], and the smallest virtual time is served first.
//! A `High` request therefore goes ahead of `Normal` and `Low` requests that
//! arrived less than `age_after` (resp. `2 × age_after`) before it, but a
//! `Low` request is served before every `High` request that arrives more
//! than `2 × age_after` after it. Under a steady flood of `High` work a
//! `Low` request thus waits for what arrived before it and within that
//! window (never more than the capacity), and never indefinitely; the tests
//! check the exact position. Within a class, order is FIFO. (Aging was
//! chosen over a weighted share because it needs no per-class counters,
//! keeps strict order among requests that arrive close together, and the
//! bound is stated in time, which is what a caller with a deadline cares
//! about.)
//!
//! # Deadlines, cancellation and the one-answer rule
//!
//! A request's deadline ([`deadline_by`](QueueLayerBuilder::deadline_by)) is
//! checked while it waits and once more right before it is sent: a request
//! whose deadline passed is answered with
//! [`Error::DeadlineExceeded`] (`attempts: 0`, no source) and never reaches
//! the inner service. Once sent, the deadline is no longer the queue's
//! business (the retry layer's or the caller's). A caller that drops its
//! future leaves the queue at once: the place is freed, a permit it had
//! been granted passes to the next request, and the inner service never
//! sees the request.
//!
//! Every accepted request is answered exactly once: with the inner
//! service's response or error, or with a typed error from the queue. A
//! panic in the inner service's `call` or response future is caught and
//! answered with [`Error::Upstream`] holding an [`InnerPanicked`]; its permit
//! is returned. When the runtime shuts down, the callers' futures are
//! dropped and their places and permits are returned the same way.
//!
//! # Streamed responses
//!
//! A call's permit goes back when its response future completes. For a
//! streamed response that is the first chunk: the upstream is still busy
//! with the rest, so a queue of concurrency 2 would let any number of
//! streams be read at once. Built with
//! [`hold_until_stream_end`](QueueLayerBuilder::hold_until_stream_end), the
//! queue hands the permit to the response instead (which must be a
//! [`GuardedResponse`](crate::guard::GuardedResponse): the crate's
//! `ChatStream` and `MessageStream` are, and any stream of `Result`s
//! wrapped in [`Guarded`](crate::guard::Guarded)), and the permit comes
//! back when the stream completes, fails or is dropped: concurrency bounds
//! the streams being read. The next queued request is woken then, as for
//! any released permit. This costs one allocation per stream; the default
//! ([`AtResponse`]) costs nothing. See
//! [`crate::guard`].
//!
//! # Shutdown
//!
//! [`QueueHandle::shutdown`] stops admitting ([`Error::Shutdown`] for new
//! requests and for callers waiting for a place), lets the queue drain
//! within a timeout, then fails what is still queued with
//! [`Error::Shutdown`].
//!
//! # Clone
//!
//! Every service made by one [`QueueLayer`], and every clone of those,
//! shares one queue. A clone does not share its original's reservation: it
//! must be polled ready itself. A service dropped while holding a
//! reservation gives it back.
//!
//! # Cost
//!
//! The uncontended path (a permit is free, nobody waits) takes no lock,
//! allocates nothing, emits nothing and spawns nothing: one
//! compare-and-swap to take the permit and one to give it back, and the
//! permit's reference to the queue (an `Arc` increment and decrement). The
//! free permits are spread over one cache line per core, and so are the
//! references permits hold: a caller takes and returns permits on its own
//! thread's line, so callers on different cores do not pass a line back
//! and forth; a thread whose line is empty takes a permit from another.
//! Reserving a place in the queue, and a rejection in reject mode, are one
//! compare-and-swap too. A queued request takes the lock twice (entering
//! its list on its first poll, and when a releasing caller hands it the
//! permit) and allocates nothing: what it needs while it waits (its
//! service, request, class and deadline, and its place in the list) is
//! kept in its response future, the wait lists reuse their nodes, and the
//! state a releasing caller writes for it is a byte in a chunk the queue
//! shares among 64 nodes. It reads the clock only when something needs
//! the time it began waiting: aging (a queue built with
//! [`priority_by`](QueueLayerBuilder::priority_by)), a
//! [`max_wait`](QueueLayerBuilder::max_wait), or events (a hook or the
//! `metrics` feature); otherwise one class means one list, served in
//! arrival order. A deadline or a maximum wait arms a timer (one
//! allocation). Every reference is counted; there is no raw pointer.
//!
//! # Observability
//!
//! [`QueueHandle`] answers depth (per priority), permits in use, callers
//! waiting for a place and counters ([`QueueStats`]: rejections,
//! expirations, timeouts, cancellations, …). The slow paths emit `tracing`
//! debug events and [`QueueEvent`]s to the
//! [hook](QueueLayerBuilder::on_event), with the wait time where it applies;
//! with the `metrics` feature, the counter
//! `llm_resilience_queue_events_total{queue, kind}`, the histogram
//! `llm_resilience_queue_wait_seconds{queue, kind}` and the gauge
//! `llm_resilience_queue_depth{queue}` (`queue`: the layer's
//! [`name`](QueueLayerBuilder::name); handles registered when the layer is
//! built), and `QueueHandle::record_metrics` sets the gauges of a snapshot
//! (depth per priority, in flight, waiting for a place) when called, for
//! example from a scrape handler. The uncontended path emits nothing. Every
//! name: [the table](crate::observability).
//!
//! [`Error::QueueTimeout`]: crate::Error::QueueTimeout
//! [`Error::QueueFull`]: crate::Error::QueueFull
//! [`Error::DeadlineExceeded`]: crate::Error::DeadlineExceeded
//! [`Error::Upstream`]: crate::Error::Upstream
//! [`Error::Shutdown`]: crate::Error::Shutdown

mod admit;
mod event;
mod future;
mod handle;
mod layer;
mod panicked;
mod policy;
mod state;
mod sync;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower_service::Service;

use self::admit::{poll_admit, Admitted, Waiting};
pub use self::event::{QueueEvent, QueueEventKind};
pub use self::future::ResponseFuture;
pub use self::handle::{QueueHandle, QueueStats, ShutdownReport};
use self::layer::Policy;
pub use self::layer::{QueueLayer, QueueLayerBuilder, WhenFull};
pub use self::panicked::InnerPanicked;
pub use self::policy::{DeadlineOf, NoDeadline, Priority, PriorityOf, SamePriority};
use self::state::{Permit, Shared, Slot};
use crate::error::{BoxError, Error};
use crate::guard::{AtResponse, Release};

/// What `poll_ready` reserved for the next `call`, on the slow path (a
/// permit with a ready inner service is kept apart, in `Queue::ready`).
enum Reserved {
    None,
    /// A permit; the inner service is not ready yet.
    Permit(Permit),
    /// A place in the queue, and when the wait for it began (if something
    /// needs to know).
    Slot(Slot, Option<Instant>),
    /// The answer for the next call (queue full, timed out, shut down).
    Refused(Error),
}

/// The queue middleware; made by [`QueueLayer`]. `H` says when a call's
/// permit is given back: when its response arrives ([`AtResponse`]), or
/// when the streamed response's stream ends
/// ([`AtStreamEnd`](crate::guard::AtStreamEnd)).
pub struct Queue<S, P = SamePriority, D = NoDeadline, H = AtResponse> {
    inner: S,
    shared: Arc<Shared>,
    policy: Arc<Policy<P, D>>,
    /// A permit and a ready inner service: what the fast path reserves.
    ready: Option<Permit>,
    reserved: Reserved,
    wait: Option<Box<Waiting>>,
    hold: PhantomData<fn() -> H>,
}

impl<S, P, D, H> Queue<S, P, D, H> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, policy: Arc<Policy<P, D>>) -> Self {
        Self {
            inner,
            shared,
            policy,
            ready: None,
            reserved: Reserved::None,
            wait: None,
            hold: PhantomData,
        }
    }

    /// A handle on this service's queue.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(Arc::clone(&self.shared))
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service (a reservation it held is given back).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, P, D, H> Clone for Queue<S, P, D, H> {
    /// The clone shares the queue but not the reservation: it must be polled
    /// ready itself.
    fn clone(&self) -> Self {
        Self::from_parts(
            self.inner.clone(),
            Arc::clone(&self.shared),
            Arc::clone(&self.policy),
        )
    }
}

impl<S: fmt::Debug, P, D, H> fmt::Debug for Queue<S, P, D, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reserved = match self.reserved {
            _ if self.ready.is_some() => "ready",
            Reserved::None => "none",
            Reserved::Permit(_) => "permit",
            Reserved::Slot(..) => "place",
            Reserved::Refused(_) => "refused",
        };
        f.debug_struct("Queue")
            .field("inner", &self.inner)
            .field("reserved", &reserved)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P, D, H> Service<Req> for Queue<S, P, D, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: PriorityOf<Req>,
    D: DeadlineOf<Req>,
    H: Release<S::Response>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, H>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        if matches!(self.reserved, Reserved::None) && self.wait.is_none() && self.shared.try_take()
        {
            // The uncontended path: a permit, then the inner service, in one
            // go.
            let permit = self.shared.permit();
            return match self.inner.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.ready = Some(permit);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(Error::from_inner(e))),
                Poll::Pending => {
                    self.reserved = Reserved::Permit(permit);
                    Poll::Pending
                }
            };
        }
        self.poll_ready_slow(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(permit) = self.ready.take() {
            if let Some(deadline) = self.policy.deadline.deadline(&req) {
                if deadline <= Instant::now() {
                    return ResponseFuture::expired(&self.shared, None);
                }
            }
            return ResponseFuture::calling(&mut self.inner, req, permit);
        }
        self.call_slow(req)
    }
}

impl<S, P, D, H> Queue<S, P, D, H> {
    /// `poll_ready` past the fast path: a permit whose inner service is not
    /// ready yet, a place, a refusal, or admission (possibly waiting for a
    /// place).
    #[cold]
    fn poll_ready_slow<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        if matches!(self.reserved, Reserved::None) && self.wait.is_none() {
            // The queued path: no permit was free (the fast path just
            // looked), so a place, in one compare-and-swap while there is
            // room and nobody waits for one. Admission below otherwise.
            if let Some(Ok(())) = self.shared.try_place() {
                let since = self.policy.stamp.then(Instant::now);
                let slot = Reserved::Slot(Slot::new(self.shared.link()), since);
                // It was `None` (checked above): no drop to run.
                let old = std::mem::replace(&mut self.reserved, slot);
                debug_assert!(matches!(old, Reserved::None));
                std::mem::forget(old);
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            match &mut self.reserved {
                Reserved::Slot(..) | Reserved::Refused(_) => return Poll::Ready(Ok(())),
                Reserved::Permit(_) => {
                    // Our own gate first; only then the inner service.
                    return match self.inner.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            if let Reserved::Permit(p) =
                                std::mem::replace(&mut self.reserved, Reserved::None)
                            {
                                self.ready = Some(p);
                            }
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(e)) => {
                            self.reserved = Reserved::None;
                            Poll::Ready(Err(Error::from_inner(e)))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Reserved::None => {
                    let admitted = match poll_admit(
                        &self.shared,
                        &mut self.wait,
                        self.policy.max_wait,
                        self.policy.stamp,
                        cx,
                    ) {
                        Poll::Ready(a) => a,
                        Poll::Pending => return Poll::Pending,
                    };
                    self.reserved = match admitted {
                        Admitted::Permit(p) => Reserved::Permit(p),
                        Admitted::Slot(s, since) => Reserved::Slot(s, since),
                        Admitted::Refused(e) => Reserved::Refused(e),
                    };
                }
            }
        }
    }

    /// `call` past the fast path.
    #[cold]
    fn call_slow<Req>(&mut self, req: Req) -> ResponseFuture<S, Req, H>
    where
        S: Service<Req> + Clone,
        S::Error: Into<BoxError>,
        P: PriorityOf<Req>,
        D: DeadlineOf<Req>,
    {
        match std::mem::replace(&mut self.reserved, Reserved::None) {
            Reserved::Permit(permit) => {
                let deadline = self.policy.deadline.deadline(&req);
                ResponseFuture::readying(self.take_inner(), req, permit, deadline)
            }
            Reserved::Slot(slot, since) => {
                let priority = self.policy.priority.priority(&req);
                let deadline = self.policy.deadline.deadline(&req);
                ResponseFuture::queue(
                    self.take_inner(),
                    req,
                    slot,
                    since,
                    priority,
                    deadline,
                    self.policy.max_wait,
                )
            }
            Reserved::Refused(e) => ResponseFuture::failed(e),
            Reserved::None => {
                // `call` without `poll_ready`: the future does the admission.
                let priority = self.policy.priority.priority(&req);
                let deadline = self.policy.deadline.deadline(&req);
                ResponseFuture::admitting(
                    Arc::clone(&self.shared),
                    self.wait.take(),
                    self.take_inner(),
                    req,
                    priority,
                    deadline,
                    self.policy.max_wait,
                    self.policy.stamp,
                )
            }
        }
    }
}

impl<S: Clone, P, D, H> Queue<S, P, D, H> {
    /// Moves the inner service into a future, leaving a clone behind.
    fn take_inner(&mut self) -> S {
        let fresh = self.inner.clone();
        std::mem::replace(&mut self.inner, fresh)
    }
}
