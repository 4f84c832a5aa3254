//! What the rate limiter reports: events for the hook, `tracing` and
//! (feature `metrics`) the `metrics` facade.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// The event hook's type, as stored.
pub(crate) type Listener = Arc<dyn Fn(&RateLimitEvent) + Send + Sync>;

/// Something the rate limiter did, for the
/// [event hook](super::RateLimitLayerBuilder::on_event).
///
/// Events come from the slow paths only: a call admitted at once produces
/// none. They never carry the key (it may be a credential).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitEvent {
    /// What happened.
    pub kind: RateLimitEventKind,
    /// How long the call had waited, where it applies.
    pub waited: Option<Duration>,
    /// The wait told to the caller ([`Error::RateLimited`]), or the length
    /// of a pause.
    ///
    /// [`Error::RateLimited`]: crate::Error::RateLimited
    pub retry_after: Option<Duration>,
}

/// The kinds of [`RateLimitEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitEventKind {
    /// The call could not go at once and joined the key's waiting line.
    Queued,
    /// A waiting call was admitted.
    Admitted,
    /// The call was refused at once (reject mode, a wait beyond the maximum,
    /// or a cost above the limit): [`Error::RateLimited`](crate::Error::RateLimited).
    Rejected,
    /// A waiting call reached the maximum wait:
    /// [`Error::RateLimited`](crate::Error::RateLimited).
    TimedOut,
    /// The caller dropped its future while waiting; its place went to the
    /// next in line.
    Cancelled,
    /// A 429 from the server paused every call on the key.
    Paused,
    /// The server's rate-limit headers lowered the key's budget.
    Steered,
}

impl RateLimitEventKind {
    /// A short, stable, lowercase name, for log fields and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RateLimitEventKind::Queued => "queued",
            RateLimitEventKind::Admitted => "admitted",
            RateLimitEventKind::Rejected => "rejected",
            RateLimitEventKind::TimedOut => "timed_out",
            RateLimitEventKind::Cancelled => "cancelled",
            RateLimitEventKind::Paused => "paused",
            RateLimitEventKind::Steered => "steered",
        }
    }
}

/// Reports `event`: a `tracing` debug event (target
/// `llm_resilience::ratelimit`), the metrics, then the hook.
// `&Cow`, not `&str`: the metrics labels clone it, free when it is borrowed.
#[allow(clippy::ptr_arg)]
pub(crate) fn emit(
    name: &Cow<'static, str>,
    listener: Option<&Listener>,
    kind: RateLimitEventKind,
    waited: Option<Duration>,
    retry_after: Option<Duration>,
) {
    tracing::debug!(
        limiter = %name,
        event = kind.as_str(),
        waited_ms = waited.map(|d| d.as_millis() as u64),
        retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
        "rate limiter"
    );
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(
            "llm_resilience_ratelimit_events_total",
            "limiter" => name.clone(),
            "kind" => kind.as_str()
        )
        .increment(1);
        if let Some(waited) = waited {
            metrics::histogram!("llm_resilience_ratelimit_wait_seconds", "limiter" => name.clone())
                .record(waited.as_secs_f64());
        }
        if kind == RateLimitEventKind::Paused {
            if let Some(p) = retry_after {
                metrics::histogram!(
                    "llm_resilience_ratelimit_pause_seconds",
                    "limiter" => name.clone()
                )
                .record(p.as_secs_f64());
            }
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = name;
    if let Some(listener) = listener {
        listener(&RateLimitEvent {
            kind,
            waited,
            retry_after,
        });
    }
}
