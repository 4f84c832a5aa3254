//! What a shared coordination of breakers across processes (the `redis`
//! feature's `SharedBreakers`) needs from one breaker's core, and the
//! operator's states. Nothing here runs on the closed path: the link is
//! read on transitions and when an open period ends.

use std::sync::atomic::AtomicBool;
use std::sync::Arc as StdArc;
use std::time::Duration;

use super::{
    ms_ceil, state_of, Core, Ordering, State, Word, CLOSED, DISABLED, FORCED_CLOSED, FORCED_OPEN,
    HALF_OPEN, OPEN,
};
use crate::util::rng::{splitmix, unit};

/// No probe permit granted by the coordination (no generation has it).
pub(super) const NO_GRANT: u64 = u64::MAX;

/// What a caller is told to wait while a connected coordination decides
/// which process probes (one Redis round trip).
pub(super) const PROBE_DECISION_WAIT: Duration = Duration::from_millis(50);

/// The link from a breaker to its coordination task: a wake-up on every
/// transition, and whether the coordination is connected (while it is not,
/// the breaker behaves exactly as a local one).
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// Woken on every transition, when a keyed breaker adds a key, and when
    /// a call finds an ended open period waiting for the probe permit.
    pub(crate) notify: tokio::sync::Notify,
    /// A transition or a new key since the coordination last looked.
    pub(crate) changed: AtomicBool,
    /// The coordination reaches Redis: open periods end only with its
    /// probe permit.
    pub(crate) connected: AtomicBool,
}

/// The state of a breaker as the coordination sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct Snapshot {
    /// The state.
    pub(crate) state: State,
    /// Its generation (bumped on every transition).
    pub(crate) gen: u64,
    /// While open: what is left of the open period (zero once it ended).
    pub(crate) remaining: Duration,
    /// While open: whether this generation holds the coordination's probe
    /// permit.
    pub(crate) granted: bool,
    /// While open: whether a call is waiting for the probe permit.
    pub(crate) wanted: bool,
}

impl Core {
    /// Links the breaker to a coordination; false if one already is.
    pub(crate) fn attach(&self, link: StdArc<Link>) -> bool {
        self.link.set(link).is_ok()
    }

    /// Wakes the coordination, if any, after a transition.
    pub(super) fn notify_link(&self) {
        if let Some(link) = self.link.get() {
            link.changed.store(true, Ordering::Release);
            link.notify.notify_one();
        }
    }

    /// Whether the open period of `gen`, now over, must wait for the
    /// coordination's probe permit; if so, the coordination is asked for it
    /// (a call is waiting: the permit goes to a process with traffic).
    #[cold]
    #[inline(never)]
    pub(super) fn gate_closed(&self, gen: u64) -> bool {
        match self.link.get() {
            Some(link) if link.connected.load(Ordering::Acquire) => {
                if self.grant.load(Ordering::Acquire) == gen {
                    return false;
                }
                if self.want.swap(gen, Ordering::AcqRel) != gen {
                    link.notify.notify_one();
                }
                true
            }
            _ => false,
        }
    }

    /// The state, generation and remaining open time.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn snapshot(&self) -> Snapshot {
        let w = Word(self.state.load(Ordering::Acquire));
        let (gen, state) = (w.gen(), state_of(w.mode()));
        let remaining = if w.mode() == OPEN {
            let at = self.deadline_for(gen).unwrap_or(u64::MAX);
            Duration::from_millis(at.saturating_sub(self.now_ms()))
        } else {
            Duration::ZERO
        };
        Snapshot {
            state,
            gen,
            remaining,
            granted: self.grant.load(Ordering::Acquire) == gen,
            wanted: self.want.load(Ordering::Acquire) == gen,
        }
    }

    /// Lets the open period of `open_gen` end in half-open (the
    /// coordination's probe permit is this process's).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn grant_probes(&self, open_gen: u64) {
        self.grant.store(open_gen, Ordering::Release);
    }

    /// Keeps the open period of `open_gen` (if still current) open for at
    /// least `d` from now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn hold_open(&self, open_gen: u64, d: Duration) {
        let w = Word(self.state.load(Ordering::Acquire));
        if w.mode() == OPEN && w.gen() == open_gen {
            let at = self.now_ms().saturating_add(ms_ceil(d));
            if self.deadline_for(open_gen).is_none_or(|cur| cur < at) {
                self.set_deadline(open_gen, at);
            }
            // The next call after the new end asks again.
            self.want.store(NO_GRANT, Ordering::Release);
        }
    }

    /// Opens a closed or half-open breaker as a tripping failure would (the
    /// open period on its schedule). Returns whether it did; an open
    /// breaker or an operator's state is left alone.
    pub(crate) fn trip_now(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        while matches!(Word(s).mode(), CLOSED | HALF_OPEN) {
            match self.open(s, self.now_ms(), |n, gen| self.open_duration(n, gen)) {
                Ok(_) => return true,
                Err(actual) => s = actual,
            }
        }
        false
    }

    /// Opens the breaker until `d` from now (another process's trip: the
    /// shared open period), counting a trip; an open breaker's period is
    /// set to end then. Returns the open generation; `None` in an
    /// operator's state, which this leaves alone.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn trip_until(&self, d: Duration) -> Option<u64> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let w = Word(s);
            let now = self.now_ms();
            match w.mode() {
                CLOSED | HALF_OPEN => match self.open(s, now, |_, _| d) {
                    Ok(gen) => return Some(gen),
                    Err(actual) => s = actual,
                },
                OPEN => {
                    // A probe permit taken for this period is void: the
                    // trip freed it for everyone.
                    let _ = self.grant.compare_exchange(
                        w.gen(),
                        NO_GRANT,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    self.want.store(NO_GRANT, Ordering::Release);
                    self.set_deadline(w.gen(), now.saturating_add(ms_ceil(d)));
                    return Some(w.gen());
                }
                _ => return None,
            }
        }
    }

    /// Closes an open or half-open breaker (another process's probes
    /// succeeded); returns whether it did. An operator's state is left alone.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn close_now(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let w = Word(s);
            if !matches!(w.mode(), OPEN | HALF_OPEN) {
                return false;
            }
            match self.cas(s, Word::new(CLOSED, w.next_gen(), 0, 0).0) {
                Ok(()) => {
                    self.window.clear();
                    self.consecutive.store(0, Ordering::Release);
                    self.trips.store(0, Ordering::Release);
                    self.transitioned(w.mode(), CLOSED, None);
                    return true;
                }
                Err(actual) => s = actual,
            }
        }
    }

    /// The open period after the `n`-th consecutive trip: the base grown by
    /// the multiplier, capped, then shortened by up to the jitter fraction.
    pub(crate) fn open_duration(&self, n: u32, gen: u64) -> Duration {
        let st = &self.settings;
        let grown = st.open_base.as_secs_f64()
            * st.open_multiplier
                .powi(n.saturating_sub(1).min(1_000) as i32);
        let capped = grown.min(st.open_cap.as_secs_f64());
        let d = if st.open_jitter > 0.0 {
            let u = unit(splitmix(st.seed ^ u64::from(n) << 32 ^ gen));
            capped * (1.0 - st.open_jitter * u)
        } else {
            capped
        };
        Duration::from_secs_f64(d.max(0.001))
    }

    /// Sets an operator state; returns whether it changed.
    pub(crate) fn set_mode(&self, mode: State) {
        let m = match mode {
            State::Closed => CLOSED,
            State::ForcedOpen => FORCED_OPEN,
            State::ForcedClosed => FORCED_CLOSED,
            _ => DISABLED,
        };
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let w = Word(s);
            match self.cas(s, Word::new(m, w.next_gen(), 0, 0).0) {
                Ok(()) => {
                    if m == CLOSED {
                        self.window.clear();
                        self.consecutive.store(0, Ordering::Release);
                        self.trips.store(0, Ordering::Release);
                    }
                    if w.mode() != m {
                        self.transitioned(w.mode(), m, None);
                    }
                    return;
                }
                Err(actual) => s = actual,
            }
        }
    }

    /// Consecutive trips since the breaker last closed.
    pub(crate) fn trips(&self) -> u32 {
        self.trips.load(Ordering::Acquire)
    }
}

// On tokio's paused clock, which the breaker reads only with `test-util`
// (without it, on Linux, the kernel's coarse clock, which a pause does not
// stop).
#[cfg(all(test, not(loom), feature = "test-util"))]
#[path = "remote_tests.rs"]
mod tests;
