//! What a breaker is in, and what it tells its listeners.

use std::fmt;
use std::time::Duration;

/// The state of one breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls pass and their results are recorded.
    Closed,
    /// Calls fail at once until the open period ends.
    Open,
    /// A few probe calls pass; everyone else fails at once.
    HalfOpen,
    /// Set by an operator: every call fails at once until reset.
    ForcedOpen,
    /// Set by an operator: every call passes and nothing is recorded.
    ForcedClosed,
    /// Set by an operator: every call passes and is recorded (metrics only),
    /// the breaker never trips.
    Disabled,
}

impl State {
    /// The state as a lowercase `snake_case` string, for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::ForcedClosed => "forced_closed",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a breaker did, for the [event hook](super::CircuitBreakerLayerBuilder::on_event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerEvent {
    /// The state changed.
    StateChanged {
        /// The state before.
        from: State,
        /// The state after.
        to: State,
        /// For a transition to [`State::Open`]: how long it stays open.
        open_for: Option<Duration>,
    },
    /// A call was refused without reaching the inner service.
    Rejected {
        /// The state that refused it.
        state: State,
        /// The time until the next probe, as the caller was told.
        retry_after: Duration,
    },
}

/// The breaker's `metrics` (feature `metrics`; the names and labels are in
/// [the table](crate::observability)). The gauge and the rejection and
/// probe counters are registered once, when the layer is built: install the
/// recorder before building. Nothing is emitted on the closed path.
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    name: std::borrow::Cow<'static, str>,
    #[cfg(feature = "metrics")]
    state: Option<metrics::Gauge>,
    // Rejections by the state that refused: open, half-open, forced open.
    #[cfg(feature = "metrics")]
    rejected: [metrics::Counter; 3],
    #[cfg(feature = "metrics")]
    probes: metrics::Counter,
}

impl Metrics {
    /// Registers the handles of the breaker `name`; a keyed breaker (one
    /// state per key) gets no state gauge.
    pub(crate) fn new(name: std::borrow::Cow<'static, str>, keyed: bool) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (name, keyed);
        #[cfg(feature = "metrics")]
        {
            let state = (!keyed).then(|| {
                let g = metrics::gauge!("llm_resilience_breaker_state", "breaker" => name.clone());
                g.set(0.0);
                g
            });
            Self {
                state,
                rejected: [State::Open, State::HalfOpen, State::ForcedOpen].map(|s| {
                    metrics::counter!(
                        "llm_resilience_breaker_rejected_total",
                        "breaker" => name.clone(),
                        "state" => s.as_str()
                    )
                }),
                probes: metrics::counter!("llm_resilience_breaker_probes_total", "breaker" => name.clone()),
                name,
            }
        }
        #[cfg(not(feature = "metrics"))]
        Self {}
    }

    /// The gauge's value of a state: its position in [`State`].
    #[cfg(feature = "metrics")]
    fn code(state: State) -> f64 {
        match state {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
            State::ForcedOpen => 3.0,
            State::ForcedClosed => 4.0,
            State::Disabled => 5.0,
        }
    }

    pub(crate) fn transitioned(&self, from: State, to: State) {
        #[cfg(not(feature = "metrics"))]
        let _ = (from, to);
        #[cfg(feature = "metrics")]
        {
            if let Some(g) = &self.state {
                g.set(Self::code(to));
            }
            metrics::counter!(
                "llm_resilience_breaker_transitions_total",
                "breaker" => self.name.clone(),
                "from" => from.as_str(),
                "to" => to.as_str()
            )
            .increment(1);
        }
    }

    #[inline]
    pub(crate) fn rejected(&self, state: State) {
        #[cfg(not(feature = "metrics"))]
        let _ = state;
        #[cfg(feature = "metrics")]
        self.rejected[match state {
            State::HalfOpen => 1,
            State::ForcedOpen => 2,
            _ => 0,
        }]
        .increment(1);
    }

    #[inline]
    pub(crate) fn probe(&self) {
        #[cfg(feature = "metrics")]
        self.probes.increment(1);
    }
}
