//! [`QueueHandle`]: depth queries, counters and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use super::event::QueueEventKind;
use super::state::{Count, Shared};
use super::Priority;

/// A handle on one queue, from [`QueueLayer::handle`](super::QueueLayer::handle).
/// Cheap to clone; every query is a plain synchronous function.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    shared: Arc<Shared>,
}

/// Counters since the queue was built (slow-path events only: a request
/// that went straight through is not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Requests that took a place in the queue.
    pub queued: u64,
    /// Queued requests that then got a permit and were sent.
    pub dispatched_after_wait: u64,
    /// Requests rejected because the queue was full (reject mode).
    pub rejected: u64,
    /// Requests whose deadline passed before they were sent.
    pub expired: u64,
    /// Requests that waited longer than the maximum queue wait.
    pub timed_out: u64,
    /// Queued requests whose caller dropped the future.
    pub cancelled: u64,
    /// Requests refused or failed because of shutdown.
    pub shut_out: u64,
}

/// What [`QueueHandle::shutdown`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Everything queued or in flight finished within the timeout.
    pub drained: bool,
    /// Queued requests failed with [`Error::Shutdown`](crate::Error::Shutdown)
    /// when the timeout passed.
    pub failed: usize,
    /// Calls still in flight when `shutdown` returned (they run on in their
    /// callers' futures and finish normally).
    pub in_flight: usize,
}

impl QueueHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Places taken in the queue: requests waiting for a permit, including
    /// places reserved by `poll_ready` whose `call` has not come yet. Never
    /// more than the capacity.
    pub fn depth(&self) -> usize {
        self.shared.depths().0
    }

    /// Requests of one class queued for a permit.
    pub fn depth_of(&self, priority: Priority) -> usize {
        self.shared.depths().1[priority as usize]
    }

    /// Callers waiting in `poll_ready` for a place (wait mode, queue full).
    pub fn waiting_for_place(&self) -> usize {
        self.shared.depths().2
    }

    /// Permits in use: calls in flight plus permits reserved by `poll_ready`.
    pub fn in_flight(&self) -> usize {
        self.shared.concurrency - self.shared.free_permits()
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// The configured concurrency.
    pub fn concurrency(&self) -> usize {
        self.shared.concurrency
    }

    /// Nothing waits, nothing is reserved and every permit is back.
    pub fn is_idle(&self) -> bool {
        self.shared.is_idle()
    }

    /// Whether shutdown has begun.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Sets the `metrics` gauges (label `queue`, the layer's name) from one
    /// snapshot of the queue: `llm_resilience_queue_depth` (places taken),
    /// `llm_resilience_queue_depth_by_priority{priority}` (requests queued
    /// per class), `llm_resilience_queue_in_flight` (permits in use) and
    /// `llm_resilience_queue_waiting_for_place`. Call it where the gauges are
    /// read (a scrape handler, a periodic task): the queue's own paths update
    /// only the counters and the wait-time histogram, and the uncontended path
    /// nothing at all.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn record_metrics(&self) {
        let (depth, by_class, waiting) = self.shared.depths();
        self.shared
            .metrics
            .record(depth, by_class, self.in_flight(), waiting);
    }

    /// The counters.
    pub fn stats(&self) -> QueueStats {
        let c = &self.shared.counters;
        QueueStats {
            queued: self.shared.queued_total(),
            dispatched_after_wait: c.get(Count::DispatchedAfterWait),
            rejected: c.get(Count::Rejected),
            expired: c.get(Count::Expired),
            timed_out: c.get(Count::TimedOut),
            cancelled: c.get(Count::Cancelled),
            shut_out: c.get(Count::ShutOut),
        }
    }

    /// Stops admitting: every new request, and every caller waiting in
    /// `poll_ready` for a place, is answered with
    /// [`Error::Shutdown`](crate::Error::Shutdown). Requests already queued
    /// or in flight go on.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Graceful shutdown: [`close`](Self::close), wait up to `timeout` for
    /// the queue to drain (queued requests are still served in order), then
    /// fail whatever is still queued with
    /// [`Error::Shutdown`](crate::Error::Shutdown). Calls already in flight
    /// run in their callers' futures and are not interrupted.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.close();
        let drained = tokio::time::timeout(timeout, self.shared.wait_idle())
            .await
            .is_ok();
        let failed = if drained {
            0
        } else {
            self.shared.fail_queued()
        };
        if failed > 0 {
            tracing::debug!(failed, "queue shutdown: failed what was still queued");
            self.shared.emit(QueueEventKind::Shutdown, None, 0, None);
        }
        ShutdownReport {
            drained,
            failed,
            in_flight: self.in_flight(),
        }
    }
}
