//! What the queue reports: events for the hook, `tracing` and (feature
//! `metrics`) the `metrics` facade.

use std::sync::Arc;
use std::time::Duration;

use super::Priority;

/// The event hook's type, as stored.
pub(crate) type Listener = Arc<dyn Fn(&QueueEvent) + Send + Sync>;

/// Something the queue did, for the [event hook](super::QueueLayerBuilder::on_event).
///
/// Events come from the slow paths only: a request that finds a free permit
/// and calls through at once produces none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueEvent {
    /// What happened.
    pub kind: QueueEventKind,
    /// The request's class, when it had one (a request still waiting for a
    /// place in `poll_ready` has none yet).
    pub priority: Option<Priority>,
    /// Places taken in the queue when it happened, where known (0 otherwise).
    pub depth: usize,
    /// How long the request had waited, where it applies.
    pub waited: Option<Duration>,
}

/// The kinds of [`QueueEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueEventKind {
    /// No permit was free: the request took a place in the queue.
    Queued,
    /// A queued request got a permit and goes on to the inner service.
    Dispatched,
    /// The queue was full in reject mode: [`Error::QueueFull`](crate::Error::QueueFull).
    Rejected,
    /// The request's deadline passed before it was sent:
    /// [`Error::DeadlineExceeded`](crate::Error::DeadlineExceeded).
    Expired,
    /// The request waited longer than the maximum queue wait:
    /// [`Error::QueueTimeout`](crate::Error::QueueTimeout).
    TimedOut,
    /// The caller dropped its future while the request was queued.
    Cancelled,
    /// The request was refused or failed because the queue shut down:
    /// [`Error::Shutdown`](crate::Error::Shutdown).
    Shutdown,
}

impl QueueEventKind {
    /// A short, stable, lowercase name, for log fields and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueEventKind::Queued => "queued",
            QueueEventKind::Dispatched => "dispatched",
            QueueEventKind::Rejected => "rejected",
            QueueEventKind::Expired => "expired",
            QueueEventKind::TimedOut => "timed_out",
            QueueEventKind::Cancelled => "cancelled",
            QueueEventKind::Shutdown => "shutdown",
        }
    }
}

pub(crate) fn emit(listener: Option<&(dyn Fn(&QueueEvent) + Send + Sync)>, event: &QueueEvent) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("llm_resilience_queue_events_total", "kind" => event.kind.as_str())
            .increment(1);
        if let Some(waited) = event.waited {
            metrics::histogram!("llm_resilience_queue_wait_seconds", "kind" => event.kind.as_str())
                .record(waited.as_secs_f64());
        }
        if matches!(
            event.kind,
            QueueEventKind::Queued | QueueEventKind::Dispatched
        ) {
            metrics::gauge!("llm_resilience_queue_depth").set(event.depth as f64);
        }
    }
    if let Some(listener) = listener {
        listener(event);
    }
}
