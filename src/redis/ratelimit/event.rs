//! What the fleet rate limiter reports: events for the hook, `tracing` and
//! (feature `metrics`) the `metrics` facade.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// The event hook's type, as stored.
pub(crate) type Listener = Arc<dyn Fn(&FleetRateLimitEvent) + Send + Sync>;

/// Something the fleet rate limiter did, for the
/// [event hook](super::FleetRateLimitLayerBuilder::on_event).
///
/// Events come from the slow paths only: a call admitted at once produces
/// none. They never carry the key or the Redis URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetRateLimitEvent {
    /// What happened.
    pub kind: FleetRateLimitEventKind,
    /// How long the call had waited, where it applies.
    pub waited: Option<Duration>,
    /// The wait told to the caller ([`Error::RateLimited`]), the wait the
    /// shared limit asked for, or the length of a pause.
    ///
    /// [`Error::RateLimited`]: crate::Error::RateLimited
    pub retry_after: Option<Duration>,
}

/// The kinds of [`FleetRateLimitEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetRateLimitEventKind {
    /// The shared limit was reached: the call sleeps for the wait the
    /// server's script returned (`retry_after`), then asks again.
    Waiting,
    /// A call that had waited was admitted.
    Admitted,
    /// The call was refused at once (reject mode, a wait beyond the
    /// maximum, or a cost above the limit).
    Rejected,
    /// A waiting call would have gone past its maximum wait: refused.
    TimedOut,
    /// A 429 from the provider paused every process's calls on the key.
    Paused,
    /// The provider's rate-limit headers lowered the shared budget.
    Steered,
    /// Redis could not be reached (refused, timed out, an error): calls go
    /// through the local limiter, at the limits divided by the fleet size,
    /// until a probe finds Redis again.
    FellBack,
    /// A probe reached Redis again: calls share the fleet's limit again.
    Recovered,
}

impl FleetRateLimitEventKind {
    /// A short, stable, lowercase name, for log fields and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Admitted => "admitted",
            Self::Rejected => "rejected",
            Self::TimedOut => "timed_out",
            Self::Paused => "paused",
            Self::Steered => "steered",
            Self::FellBack => "fell_back",
            Self::Recovered => "recovered",
        }
    }
}

/// Reports an event: a `tracing` event (target
/// `llm_resilience::redis::ratelimit`; a fallback is a warning), the
/// metrics, then the hook.
// `&Cow`, not `&str`: the metrics labels clone it, free when it is borrowed.
#[allow(clippy::ptr_arg)]
pub(crate) fn emit(
    name: &Cow<'static, str>,
    listener: Option<&Listener>,
    kind: FleetRateLimitEventKind,
    waited: Option<Duration>,
    retry_after: Option<Duration>,
) {
    if kind == FleetRateLimitEventKind::FellBack {
        tracing::warn!(
            target: "llm_resilience::redis::ratelimit",
            limiter = %name,
            event = kind.as_str(),
            "fleet rate limiter: redis unreachable, using the local limit"
        );
    } else {
        tracing::debug!(
            target: "llm_resilience::redis::ratelimit",
            limiter = %name,
            event = kind.as_str(),
            waited_ms = waited.map(|d| d.as_millis() as u64),
            retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
            "fleet rate limiter"
        );
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(
            "llm_resilience_fleet_ratelimit_events_total",
            "limiter" => name.clone(),
            "kind" => kind.as_str()
        )
        .increment(1);
        match kind {
            FleetRateLimitEventKind::FellBack | FleetRateLimitEventKind::Recovered => {
                let local = f64::from(u8::from(kind == FleetRateLimitEventKind::FellBack));
                metrics::gauge!(
                    "llm_resilience_fleet_ratelimit_fallback",
                    "limiter" => name.clone()
                )
                .set(local);
            }
            _ => {}
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = name;
    if let Some(listener) = listener {
        listener(&FleetRateLimitEvent {
            kind,
            waited,
            retry_after,
        });
    }
}
