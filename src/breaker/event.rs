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
