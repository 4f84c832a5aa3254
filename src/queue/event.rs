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

/// The queue's `metrics` handles (feature `metrics`), registered once when
/// the queue is built under its `queue` label: an event formats nothing.
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    events: [metrics::Counter; 7],
    #[cfg(feature = "metrics")]
    waits: [metrics::Histogram; 7],
    #[cfg(feature = "metrics")]
    depth: metrics::Gauge,
    #[cfg(feature = "metrics")]
    by_priority: [metrics::Gauge; 3],
    #[cfg(feature = "metrics")]
    in_flight: metrics::Gauge,
    #[cfg(feature = "metrics")]
    waiting_for_place: metrics::Gauge,
}

impl QueueEventKind {
    const ALL: [QueueEventKind; 7] = [
        QueueEventKind::Queued,
        QueueEventKind::Dispatched,
        QueueEventKind::Rejected,
        QueueEventKind::Expired,
        QueueEventKind::TimedOut,
        QueueEventKind::Cancelled,
        QueueEventKind::Shutdown,
    ];
}

impl Metrics {
    pub(crate) fn new(name: std::borrow::Cow<'static, str>) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (name, QueueEventKind::ALL);
        Self {
            #[cfg(feature = "metrics")]
            events: QueueEventKind::ALL.map(|k| {
                metrics::counter!(
                    "llm_resilience_queue_events_total",
                    "queue" => name.clone(),
                    "kind" => k.as_str()
                )
            }),
            #[cfg(feature = "metrics")]
            waits: QueueEventKind::ALL.map(|k| {
                metrics::histogram!(
                    "llm_resilience_queue_wait_seconds",
                    "queue" => name.clone(),
                    "kind" => k.as_str()
                )
            }),
            #[cfg(feature = "metrics")]
            depth: metrics::gauge!("llm_resilience_queue_depth", "queue" => name.clone()),
            #[cfg(feature = "metrics")]
            by_priority: [Priority::High, Priority::Normal, Priority::Low].map(|p| {
                metrics::gauge!(
                    "llm_resilience_queue_depth_by_priority",
                    "queue" => name.clone(),
                    "priority" => p.as_str()
                )
            }),
            #[cfg(feature = "metrics")]
            in_flight: metrics::gauge!("llm_resilience_queue_in_flight", "queue" => name.clone()),
            #[cfg(feature = "metrics")]
            waiting_for_place: metrics::gauge!(
                "llm_resilience_queue_waiting_for_place",
                "queue" => name.clone()
            ),
        }
    }

    /// Sets the snapshot gauges.
    #[cfg(feature = "metrics")]
    pub(crate) fn record(
        &self,
        depth: usize,
        by_class: [usize; 3],
        in_flight: usize,
        waiting: usize,
    ) {
        self.depth.set(depth as f64);
        for (gauge, n) in self.by_priority.iter().zip(by_class) {
            gauge.set(n as f64);
        }
        self.in_flight.set(in_flight as f64);
        self.waiting_for_place.set(waiting as f64);
    }
}

pub(crate) fn emit(
    metrics: &Metrics,
    listener: Option<&(dyn Fn(&QueueEvent) + Send + Sync)>,
    event: &QueueEvent,
) {
    #[cfg(feature = "metrics")]
    {
        let i = event.kind as usize;
        metrics.events[i].increment(1);
        if let Some(waited) = event.waited {
            metrics.waits[i].record(waited.as_secs_f64());
        }
        if matches!(
            event.kind,
            QueueEventKind::Queued | QueueEventKind::Dispatched
        ) {
            metrics.depth.set(event.depth as f64);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = metrics;
    if let Some(listener) = listener {
        listener(event);
    }
}
