//! The breaker's shared state machine: one atomic word for the state, its
//! generation and the half-open permits, so that every transition and every
//! probe reservation is a single compare-and-swap.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::sync::{AtomicU32, AtomicU64, Ordering, Padded};
use super::window::{Window, WindowCounts};
use crate::classify::Reason;
use crate::util::clock::Origin;

pub(crate) use super::event::{BreakerEvent, State};
#[cfg_attr(loom, allow(unused_imports))] // the loom model has no listener
pub(crate) use super::settings::{Listener, Settings, WindowSpec};
#[path = "remote.rs"]
mod remote;
pub(crate) use remote::Link;
use remote::{NO_GRANT, PROBE_DECISION_WAIT};

/// The public state a mode of the state word stands for.
fn state_of(mode: u64) -> State {
    match mode {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        FORCED_CLOSED => State::ForcedClosed,
        _ => State::Disabled,
    }
}

// The state word: mode (3 bits) | probes issued (16) | probe successes (16)
// | generation (24). Every transition bumps the generation, so a result
// stamped with an older generation is recognised and ignored.
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const FORCED_CLOSED: u64 = 4;
const DISABLED: u64 = 5;
const MODE_MASK: u64 = 0x7;
const ISSUED_SHIFT: u32 = 8;
const SUCC_SHIFT: u32 = 24;
const GEN_SHIFT: u32 = 40;
const U16: u64 = 0xffff;
const GEN_MASK: u64 = (1 << 24) - 1;
// The deadline word: generation (24 bits) | milliseconds since the origin (40).
const MS_MASK: u64 = (1 << 40) - 1;

#[derive(Clone, Copy)]
struct Word(u64);

impl Word {
    fn new(mode: u64, gen: u64, issued: u64, succ: u64) -> Self {
        Word(
            mode | (issued & U16) << ISSUED_SHIFT
                | (succ & U16) << SUCC_SHIFT
                | (gen & GEN_MASK) << GEN_SHIFT,
        )
    }
    fn mode(self) -> u64 {
        self.0 & MODE_MASK
    }
    fn gen(self) -> u64 {
        self.0 >> GEN_SHIFT
    }
    fn issued(self) -> u64 {
        (self.0 >> ISSUED_SHIFT) & U16
    }
    fn succ(self) -> u64 {
        (self.0 >> SUCC_SHIFT) & U16
    }
    fn next_gen(self) -> u64 {
        (self.gen() + 1) & GEN_MASK
    }
}

/// What a call was admitted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TicketKind {
    /// A call in the closed state: its result goes to the window.
    Closed,
    /// A half-open probe holding one of the permits.
    Probe,
    /// A call while disabled: recorded, never trips.
    MetricsOnly,
    /// A call while forced closed: not recorded.
    Untracked,
}

/// An admitted call, stamped with the generation it was admitted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    gen: u32,
    /// What the call was admitted as.
    pub(crate) kind: TicketKind,
}

/// What a finished call means to the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// A failure of the target (`Outcome::is_target_failure`).
    pub(crate) failed: bool,
    /// Slower than the slow-call threshold.
    pub(crate) slow: bool,
    /// Why it failed ([`Reason::Ok`] for a success).
    pub(crate) reason: Reason,
}

fn ms_ceil(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(MS_MASK).min(MS_MASK)
}

/// One breaker's shared state. Time is passed in as milliseconds since the
/// breaker's origin, read lazily through a closure so that the closed path
/// with a count window never reads the clock.
pub(crate) struct Core {
    state: Padded<AtomicU64>,
    consecutive: Padded<AtomicU32>,
    deadline: AtomicU64,
    trips: AtomicU32,
    window: Window,
    settings: Arc<Settings>,
    /// Where the breaker's milliseconds count from, and the per-call clock.
    clock: Origin,
    // The shared coordination, if one is attached (`remote.rs`): read only
    // on transitions and when an open period ends, never when closed.
    link: std::sync::OnceLock<std::sync::Arc<Link>>,
    grant: AtomicU64,
    want: AtomicU64,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("state", &self.state())
            .field("trips", &self.trips.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(crate) fn new(settings: Arc<Settings>, origin: Origin) -> Self {
        let window = match settings.window {
            WindowSpec::Count(n) => Window::count(n),
            WindowSpec::Time(secs) => Window::time(secs),
        };
        Self {
            state: Padded(AtomicU64::new(Word::new(CLOSED, 0, 0, 0).0)),
            consecutive: Padded(AtomicU32::new(0)),
            deadline: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            window,
            settings,
            clock: origin,
            link: std::sync::OnceLock::new(),
            grant: AtomicU64::new(NO_GRANT),
            want: AtomicU64::new(NO_GRANT),
        }
    }

    /// Milliseconds since the breaker's origin on the per-call clock
    /// (`util::clock`: without `test-util`, on Linux, the kernel's coarse
    /// monotonic clock, behind the true time by at most one kernel tick;
    /// the time window counts whole seconds and an open period is then at
    /// most a tick longer; with it, tokio's clock, and inside an agent
    /// pipeline's poll the reading its layers share).
    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.elapsed_millis()
    }

    /// The current state.
    pub(crate) fn state(&self) -> State {
        state_of(Word(self.state.load(Ordering::Acquire)).mode())
    }

    /// Probes issued in the current half-open period (0 in other states).
    pub(crate) fn probes_in_flight(&self) -> u32 {
        let w = Word(self.state.load(Ordering::Acquire));
        if w.mode() == HALF_OPEN {
            (w.issued() - w.succ()) as u32
        } else {
            0
        }
    }

    /// Whether a call arriving now would find the breaker letting calls
    /// through without a time check (closed, forced closed, disabled).
    #[inline]
    pub(crate) fn is_passing(&self) -> bool {
        matches!(
            Word(self.state.load(Ordering::Relaxed)).mode(),
            CLOSED | FORCED_CLOSED | DISABLED
        )
    }

    pub(crate) fn counts(&self, now_ms: u64) -> WindowCounts {
        self.window.counts(now_ms)
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    fn deadline_for(&self, gen: u64) -> Option<u64> {
        let d = self.deadline.load(Ordering::Acquire);
        (d >> 40 == gen).then_some(d & MS_MASK)
    }

    /// Publishes the deadline of generation `gen`, unless a newer
    /// generation already published its own: a transition's thread can be
    /// preempted between its compare-and-swap and this store, and a late
    /// store must not hide the newer deadline (found by loom).
    fn set_deadline(&self, gen: u64, at_ms: u64) {
        let new = gen << 40 | at_ms.min(MS_MASK);
        let mut cur = self.deadline.load(Ordering::Acquire);
        loop {
            let ahead = (cur >> 40).wrapping_sub(gen) & GEN_MASK;
            if ahead != 0 && ahead < GEN_MASK / 2 {
                return;
            }
            match self
                .deadline
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn transitioned(&self, from: u64, to: u64, open_for: Option<Duration>) {
        let (from, to) = (state_of(from), state_of(to));
        tracing::info!(
            target: "llm_resilience::breaker",
            from = from.as_str(),
            to = to.as_str(),
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            "circuit breaker state changed"
        );
        self.settings.metrics.transitioned(from, to);
        if let Some(listener) = &self.settings.listener {
            listener(&BreakerEvent::StateChanged { from, to, open_for });
        }
        self.notify_link();
    }

    #[cold]
    fn rejected(&self, retry_after: Duration) {
        let state = self.state();
        tracing::debug!(
            target: "llm_resilience::breaker",
            state = state.as_str(),
            retry_after_ms = retry_after.as_millis() as u64,
            "call rejected by circuit breaker"
        );
        self.settings.metrics.rejected(state);
        // Nothing is built for a listener that does not exist.
        if let Some(listener) = &self.settings.listener {
            listener(&BreakerEvent::Rejected { state, retry_after });
        }
    }

    /// Admits a call or says how long until the next probe. The clock is
    /// read only when the state needs it (open or half-open).
    #[inline]
    pub(crate) fn acquire(&self, now: impl Fn() -> u64) -> Result<Ticket, Duration> {
        let result = self.try_acquire(now);
        if let Err(retry_after) = result {
            self.rejected(retry_after);
        }
        result
    }

    #[inline]
    fn try_acquire(&self, now: impl Fn() -> u64) -> Result<Ticket, Duration> {
        let mut s = self.state.load(Ordering::Acquire);
        let mut now_ms = None;
        let mut now = || *now_ms.get_or_insert_with(&now);
        loop {
            let w = Word(s);
            let gen = w.gen();
            let kind = match w.mode() {
                CLOSED => TicketKind::Closed,
                FORCED_CLOSED => TicketKind::Untracked,
                DISABLED => TicketKind::MetricsOnly,
                FORCED_OPEN => return Err(self.settings.open_base),
                OPEN => {
                    let Some(at) = self.deadline_for(gen) else {
                        // The trip is not fully published yet: still open.
                        return Err(self.settings.open_base);
                    };
                    let t = now();
                    if t < at {
                        return Err(Duration::from_millis(at - t));
                    }
                    if self.gate_closed(gen) {
                        return Err(PROBE_DECISION_WAIT);
                    }
                    match self.begin_half_open(s, t) {
                        Ok(ticket) => return Ok(ticket),
                        Err(actual) => {
                            s = actual;
                            continue;
                        }
                    }
                }
                _ => {
                    // Half-open: reserve a permit, or fail fast.
                    if w.issued() < u64::from(self.settings.probes) {
                        let next = Word::new(HALF_OPEN, gen, w.issued() + 1, w.succ());
                        match self.cas(s, next.0) {
                            Ok(()) => {
                                self.settings.metrics.probe();
                                return Ok(Ticket {
                                    gen: gen as u32,
                                    kind: TicketKind::Probe,
                                });
                            }
                            Err(actual) => {
                                s = actual;
                                continue;
                            }
                        }
                    }
                    let Some(at) = self.deadline_for(gen) else {
                        return Err(self.settings.open_base);
                    };
                    let t = now();
                    if t < at {
                        return Err(Duration::from_millis(at - t));
                    }
                    // Every permit is held longer than the probe timeout:
                    // start a fresh half-open period; the old probes'
                    // results carry the old generation and are ignored.
                    match self.begin_half_open(s, t) {
                        Ok(ticket) => return Ok(ticket),
                        Err(actual) => {
                            s = actual;
                            continue;
                        }
                    }
                }
            };
            return Ok(Ticket {
                gen: gen as u32,
                kind,
            });
        }
    }

    fn cas(&self, current: u64, new: u64) -> Result<(), u64> {
        self.state
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }

    fn begin_half_open(&self, s: u64, now_ms: u64) -> Result<Ticket, u64> {
        let w = Word(s);
        let gen = w.next_gen();
        self.cas(s, Word::new(HALF_OPEN, gen, 1, 0).0)?;
        self.set_deadline(
            gen,
            now_ms.saturating_add(ms_ceil(self.settings.probe_timeout)),
        );
        self.transitioned(w.mode(), HALF_OPEN, None);
        self.settings.metrics.probe();
        Ok(Ticket {
            gen: gen as u32,
            kind: TicketKind::Probe,
        })
    }

    /// Returns a ticket whose call ended without a verdict (dropped, or a
    /// neutral outcome): a probe gives its permit back.
    pub(crate) fn release(&self, ticket: Ticket) {
        if ticket.kind != TicketKind::Probe {
            return;
        }
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let w = Word(s);
            if w.mode() != HALF_OPEN || w.gen() != u64::from(ticket.gen) || w.issued() == 0 {
                return;
            }
            let next = Word::new(HALF_OPEN, w.gen(), w.issued() - 1, w.succ());
            match self.cas(s, next.0) {
                Ok(()) => return,
                Err(actual) => s = actual,
            }
        }
    }

    /// Records a finished call. `hint` is asked only when the call trips the
    /// breaker (a server's "retry after" for the open period).
    #[inline]
    pub(crate) fn complete(
        &self,
        ticket: Ticket,
        verdict: Verdict,
        now: impl Fn() -> u64,
        hint: impl FnOnce() -> Option<Duration>,
    ) {
        match ticket.kind {
            TicketKind::Closed => self.complete_closed(ticket, verdict, now, hint),
            TicketKind::Probe => self.complete_probe(ticket, verdict, now, hint),
            TicketKind::MetricsOnly => {
                let w = Word(self.state.load(Ordering::Acquire));
                if w.mode() == DISABLED && w.gen() == u64::from(ticket.gen) {
                    let t = if self.window.needs_clock() { now() } else { 0 };
                    self.window.record(verdict.failed, verdict.slow, t, 0);
                }
            }
            TicketKind::Untracked => {}
        }
    }

    #[inline]
    fn complete_closed(
        &self,
        ticket: Ticket,
        v: Verdict,
        now: impl Fn() -> u64,
        hint: impl FnOnce() -> Option<Duration>,
    ) {
        let s = self.state.load(Ordering::Acquire);
        let w = Word(s);
        if w.mode() != CLOSED || w.gen() != u64::from(ticket.gen) {
            return;
        }
        let st = &self.settings;
        if !v.failed && !v.slow {
            // The hot path: a success.
            let t = if self.window.needs_clock() { now() } else { 0 };
            let crossed = self.window.record(false, false, t, st.min_calls);
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            // A success lowers every rate; it can only trip the breaker by
            // bringing the window up to `min_calls`.
            if crossed {
                let t = now();
                if self.rates_exceeded(t) {
                    // A lost race means another transition happened: the
                    // closed word changes only on transitions.
                    let _ = self.trip(s, t, &mut Some(hint));
                }
            }
            return;
        }
        let t = now();
        self.window.record(v.failed, v.slow, t, st.min_calls);
        let mut trip = false;
        if v.failed {
            let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
            trip |= st.consecutive.is_some_and(|k| n >= k);
            trip |= st.trip_on.contains(&v.reason);
        } else if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if trip || self.rates_exceeded(t) {
            let _ = self.trip(s, t, &mut Some(hint));
        }
    }

    /// Whether the window holds enough calls and a rate is at or above its
    /// threshold.
    fn rates_exceeded(&self, now_ms: u64) -> bool {
        let st = &self.settings;
        let c = self.window.counts(now_ms);
        if c.calls < st.min_calls || c.calls == 0 {
            return false;
        }
        let calls = c.calls as f64;
        (c.failures > 0
            && st
                .failure_rate
                .is_some_and(|r| c.failures as f64 >= r * calls))
            || (st.slow_threshold.is_some() && c.slow > 0 && c.slow as f64 >= st.slow_rate * calls)
    }

    fn complete_probe(
        &self,
        ticket: Ticket,
        v: Verdict,
        now: impl Fn() -> u64,
        hint: impl FnOnce() -> Option<Duration>,
    ) {
        let mut hint = Some(hint);
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let w = Word(s);
            if w.mode() != HALF_OPEN || w.gen() != u64::from(ticket.gen) {
                return;
            }
            if v.failed || v.slow {
                // The word may have moved within this generation (another
                // probe took or returned a permit): retry, never drop the
                // failure (found by loom).
                match self.trip(s, now(), &mut hint) {
                    Ok(()) => return,
                    Err(actual) => {
                        s = actual;
                        continue;
                    }
                }
            }
            let succ = w.succ() + 1;
            if succ >= u64::from(self.settings.probes) {
                let next = Word::new(CLOSED, w.next_gen(), 0, 0);
                match self.cas(s, next.0) {
                    Ok(()) => {
                        self.trips.store(0, Ordering::Release);
                        self.consecutive.store(0, Ordering::Release);
                        self.transitioned(HALF_OPEN, CLOSED, None);
                        return;
                    }
                    Err(actual) => s = actual,
                }
            } else {
                let next = Word::new(HALF_OPEN, w.gen(), w.issued(), succ);
                match self.cas(s, next.0) {
                    Ok(()) => return,
                    Err(actual) => s = actual,
                }
            }
        }
    }

    /// Opens from the state word `s` (closed or half-open), if it is still
    /// current; otherwise returns the current word.
    fn trip<H: FnOnce() -> Option<Duration>>(
        &self,
        s: u64,
        now_ms: u64,
        hint: &mut Option<H>,
    ) -> Result<(), u64> {
        self.open(s, now_ms, |n, gen| {
            let open_for = self.open_duration(n, gen);
            let hint = hint.take().and_then(|h| h());
            match (self.settings.hint_cap, hint) {
                (Some(cap), Some(h)) => open_for.max(h.min(cap)),
                _ => open_for,
            }
        })
        .map(|_| ())
    }

    /// Moves the state word `s` to a new open period (one compare-and-swap),
    /// clears the window and the consecutive count, counts the trip, and
    /// ends the period `open_for(n, gen)` after `now_ms` (`n`: the trips
    /// since the breaker last closed, this one included). Returns the open
    /// generation, or the word found instead of `s`.
    pub(super) fn open(
        &self,
        s: u64,
        now_ms: u64,
        open_for: impl FnOnce(u32, u64) -> Duration,
    ) -> Result<u64, u64> {
        let w = Word(s);
        let gen = w.next_gen();
        self.cas(s, Word::new(OPEN, gen, 0, 0).0)?;
        self.window.clear();
        self.consecutive.store(0, Ordering::Release);
        let n = self.trips.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let open_for = open_for(n, gen);
        self.set_deadline(gen, now_ms.saturating_add(ms_ceil(open_for)));
        self.transitioned(w.mode(), OPEN, Some(open_for));
        Ok(gen)
    }
}
