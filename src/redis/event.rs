//! What a worker reports: one event type, and metrics under stable names.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Something a worker did with a job, or a Redis error it met.
///
/// Given to the hook set with
/// [`Worker::on_event`](super::Worker::on_event); never carries the job's
/// payload or the service's answer.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum WorkerEvent<'a> {
    /// The job's answer is in the output stream and the job acknowledged.
    Completed {
        /// The job id.
        job: &'a str,
        /// Deliveries, this one included.
        deliveries: u32,
    },
    /// The job's deadline passed; recorded as `expired`.
    Expired {
        /// The job id.
        job: &'a str,
    },
    /// A transient failure: the job waits `delay` and is delivered again.
    Retried {
        /// The job id.
        job: &'a str,
        /// Deliveries so far.
        deliveries: u32,
        /// The re-queue delay.
        delay: Duration,
        /// The failure, as text.
        error: &'a str,
    },
    /// The job went to the dead-letter stream.
    DeadLettered {
        /// The job id.
        job: &'a str,
        /// Deliveries, this one included.
        deliveries: u32,
        /// Why, as text.
        error: &'a str,
    },
    /// Another delivery of the job already recorded its outcome; this one
    /// was acknowledged without a second output.
    Duplicate {
        /// The job id.
        job: &'a str,
    },
    /// Shutdown released the unfinished job back to its queue.
    Released {
        /// The job id.
        job: &'a str,
    },
    /// A Redis command failed; the worker backs off and tries again.
    RedisError {
        /// The client's error.
        error: &'a redis::RedisError,
    },
}

impl WorkerEvent<'_> {
    /// A stable lowercase name: `completed`, `expired`, `retried`,
    /// `dead_lettered`, `duplicate`, `released`, `redis_error` (the `outcome`
    /// label of the metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerEvent::Completed { .. } => "completed",
            WorkerEvent::Expired { .. } => "expired",
            WorkerEvent::Retried { .. } => "retried",
            WorkerEvent::DeadLettered { .. } => "dead_lettered",
            WorkerEvent::Duplicate { .. } => "duplicate",
            WorkerEvent::Released { .. } => "released",
            WorkerEvent::RedisError { .. } => "redis_error",
        }
    }

    fn index(&self) -> usize {
        match self {
            WorkerEvent::Completed { .. } => 0,
            WorkerEvent::Expired { .. } => 1,
            WorkerEvent::Retried { .. } => 2,
            WorkerEvent::DeadLettered { .. } => 3,
            WorkerEvent::Duplicate { .. } => 4,
            WorkerEvent::Released { .. } => 5,
            WorkerEvent::RedisError { .. } => 6,
        }
    }
}

const KINDS: [&str; 7] = [
    "completed",
    "expired",
    "retried",
    "dead_lettered",
    "duplicate",
    "released",
    "redis_error",
];

pub(crate) type Hook = Arc<dyn Fn(&WorkerEvent<'_>) + Send + Sync>;

/// The worker's event sink: the user's hook and the metric counters,
/// registered once per worker (no label formatting per job).
pub(crate) struct Events {
    hook: Option<Hook>,
    #[cfg(feature = "metrics")]
    counters: [metrics::Counter; 7],
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Events {
    pub(crate) fn new(queue: &str, hook: Option<Hook>) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (queue, KINDS);
        Self {
            hook,
            #[cfg(feature = "metrics")]
            counters: KINDS.map(|k| {
                metrics::counter!(
                    "llm_resilience_redis_jobs_total",
                    "queue" => queue.to_owned(),
                    "outcome" => k
                )
            }),
        }
    }

    pub(crate) fn emit(&self, event: WorkerEvent<'_>) {
        #[cfg(feature = "metrics")]
        self.counters[event.index()].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = event.index();
        if let Some(h) = &self.hook {
            h(&event);
        }
    }
}

/// Sets the snapshot gauges of [`QueueStats`](super::QueueStats).
#[cfg(feature = "metrics")]
pub(crate) fn record_stats(queue: &str, s: &super::QueueStats) {
    use super::job::Priority;
    for p in Priority::ALL {
        let i = p.index();
        metrics::gauge!("llm_resilience_redis_queue_depth", "queue" => queue.to_owned(), "priority" => p.as_str())
            .set(s.depth[i] as f64);
        metrics::gauge!("llm_resilience_redis_queue_pending", "queue" => queue.to_owned(), "priority" => p.as_str())
            .set(s.pending[i] as f64);
    }
    metrics::gauge!("llm_resilience_redis_queue_delayed", "queue" => queue.to_owned())
        .set(s.delayed as f64);
    metrics::gauge!("llm_resilience_redis_queue_dead_letters", "queue" => queue.to_owned())
        .set(s.dead_letters as f64);
    metrics::gauge!("llm_resilience_redis_queue_retried", "queue" => queue.to_owned())
        .set(s.retried as f64);
}
