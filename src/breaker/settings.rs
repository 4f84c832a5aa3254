//! What a breaker decides with, as its builder validated it.

use std::fmt;
use std::time::Duration;

use super::event::{BreakerEvent, Metrics};
use crate::classify::Reason;

pub(crate) type Listener = crate::util::listener::Listener<BreakerEvent>;

/// The window a breaker judges rates over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WindowSpec {
    Count(u32),
    Time(u32),
}

/// Everything a breaker decides with (validated by the builder).
pub(crate) struct Settings {
    pub(crate) window: WindowSpec,
    pub(crate) min_calls: u64,
    pub(crate) failure_rate: Option<f64>,
    pub(crate) slow_threshold: Option<Duration>,
    pub(crate) slow_rate: f64,
    pub(crate) consecutive: Option<u32>,
    pub(crate) open_base: Duration,
    pub(crate) open_multiplier: f64,
    pub(crate) open_cap: Duration,
    pub(crate) open_jitter: f64,
    pub(crate) probes: u32,
    pub(crate) probe_timeout: Duration,
    pub(crate) hint_cap: Option<Duration>,
    pub(crate) trip_on: Vec<Reason>,
    pub(crate) seed: u64,
    pub(crate) listener: Option<Listener>,
    pub(crate) metrics: Metrics,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("window", &self.window)
            .field("min_calls", &self.min_calls)
            .field("failure_rate", &self.failure_rate)
            .field("slow_threshold", &self.slow_threshold)
            .field("slow_rate", &self.slow_rate)
            .field("consecutive", &self.consecutive)
            .field("open_base", &self.open_base)
            .field("open_multiplier", &self.open_multiplier)
            .field("open_cap", &self.open_cap)
            .field("probes", &self.probes)
            .field("probe_timeout", &self.probe_timeout)
            .field("hint_cap", &self.hint_cap)
            .finish_non_exhaustive()
    }
}
