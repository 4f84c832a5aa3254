//! [`BreakerHandle`]: queries and manual control, plain functions.

use std::fmt;
use std::sync::Arc;

use super::state::{Core, State};
use super::window::WindowCounts;
use super::HasCore;

/// A cheap, cloneable handle to one breaker: its state and counts, and the
/// operator's controls. Every method is a plain function (no `async`, no
/// lock held across anything); call it from any thread.
#[derive(Clone)]
pub struct BreakerHandle {
    shared: Arc<dyn HasCore>,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("state", &self.state())
            .finish()
    }
}

impl BreakerHandle {
    pub(crate) fn new(shared: Arc<dyn HasCore>) -> Self {
        Self { shared }
    }

    pub(crate) fn core(&self) -> &Core {
        self.shared.core()
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.core().state()
    }

    /// The calls, failures and slow calls in the window now.
    pub fn counts(&self) -> WindowCounts {
        let core = self.core();
        core.counts(core.now_ms())
    }

    /// Trips since the breaker last closed (what the open period grows
    /// with).
    pub fn consecutive_trips(&self) -> u32 {
        self.core().trips()
    }

    /// Half-open probe permits held now (0 outside half-open).
    pub fn probes_in_flight(&self) -> u32 {
        self.core().probes_in_flight()
    }

    /// Opens the breaker as a tripping failure would: for the open period
    /// its schedule gives (growing with consecutive trips), then half-open
    /// probes decide, as after any trip. Unlike [`force_open`](Self::force_open)
    /// it recovers by itself. A breaker already open stays as it is; an
    /// operator's state (forced open or closed, disabled) is left alone.
    pub fn trip(&self) {
        let _ = self.core().trip_now();
    }

    /// Refuses every call until [`reset`](Self::reset) (or another manual
    /// state). No probe is scheduled, so refused callers are told the base
    /// open duration as their `retry_after`.
    pub fn force_open(&self) {
        self.core().set_mode(State::ForcedOpen);
    }

    /// Lets every call through and records nothing until
    /// [`reset`](Self::reset).
    pub fn force_closed(&self) {
        self.core().set_mode(State::ForcedClosed);
    }

    /// Lets every call through and records it (metrics only), never trips,
    /// until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.core().set_mode(State::Disabled);
    }

    /// Back to closed with an empty window and the open period back at its
    /// base; results of calls admitted before the reset are ignored.
    pub fn reset(&self) {
        self.core().set_mode(State::Closed);
    }
}
