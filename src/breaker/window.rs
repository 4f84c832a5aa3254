//! Sliding windows of call results: count-based and time-based, both O(1)
//! per record and lock-free on the record path.

use super::sync::{AtomicI64, AtomicU64, AtomicU8, Mutex, Ordering};

/// A slot of the count-based ring: empty, or one call's result.
const EMPTY: u8 = 0;
const CALL: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

/// Counts over the window at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Calls recorded in the window.
    pub calls: u64,
    /// Of which failed.
    pub failures: u64,
    /// Of which were slow.
    pub slow: u64,
}

/// Keeps a value on a cache line of its own, so that the atomics written on
/// every call do not share a line with the ones read on every call.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A sliding window over the last N calls or the last N seconds.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn count(size: u32) -> Self {
        Window::Count(CountWindow::new(size))
    }

    pub(crate) fn time(secs: u32) -> Self {
        Window::Time(TimeWindow::new(secs))
    }

    /// Whether recording needs the current time.
    pub(crate) fn needs_clock(&self) -> bool {
        matches!(self, Window::Time(_))
    }

    /// Records one call finished at `now_ms` (ignored by count windows).
    /// Returns whether this record brought the window to exactly
    /// `min_calls` calls (the one moment a success can make a rate count).
    #[inline]
    pub(crate) fn record(&self, failed: bool, slow: bool, now_ms: u64, min_calls: u64) -> bool {
        match self {
            Window::Count(w) => w.record(failed, slow) == min_calls,
            Window::Time(w) => w.record(failed, slow, now_ms / 1000) == min_calls,
        }
    }

    /// The counts at `now_ms`.
    pub(crate) fn counts(&self, now_ms: u64) -> WindowCounts {
        match self {
            Window::Count(w) => w.counts(),
            Window::Time(w) => w.counts(now_ms / 1000),
        }
    }

    /// Forgets every recorded call.
    pub(crate) fn clear(&self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(),
        }
    }
}

fn clamp(v: i64) -> u64 {
    v.max(0) as u64
}

/// The last `size` calls: a ring of one-byte slots and running totals of the
/// failures and slow calls in it. Recording claims the next slot with one
/// `fetch_add`, swaps the new result in and moves the totals by the
/// difference with the evicted one; an all-success stream whose slots
/// already hold successes writes nothing else.
#[derive(Debug)]
pub(crate) struct CountWindow {
    head: Padded<AtomicU64>,
    failures: Padded<AtomicI64>,
    slow: AtomicI64,
    slots: Box<[AtomicU8]>,
    size: u64,
}

impl CountWindow {
    fn new(size: u32) -> Self {
        Self {
            head: Padded(AtomicU64::new(0)),
            failures: Padded(AtomicI64::new(0)),
            slow: AtomicI64::new(0),
            slots: (0..size).map(|_| AtomicU8::new(EMPTY)).collect(),
            size: u64::from(size),
        }
    }

    /// Returns the number of calls recorded since the last clear, this one
    /// included.
    #[inline]
    fn record(&self, failed: bool, slow: bool) -> u64 {
        if !failed && !slow && self.clean_and_full() {
            // Every slot holds a success: recording one more would evict a
            // success and change nothing. Only reads, so clones on other
            // cores never fight over a cache line.
            return 0;
        }
        let n = self.head.fetch_add(1, Ordering::Relaxed);
        let new = CALL | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let slot = &self.slots[(n % self.size) as usize];
        // Replacing a value by the same value changes nothing: skip the write
        // (linearizable as a swap of equal values).
        if slot.load(Ordering::Relaxed) != new {
            let old = slot.swap(new, Ordering::AcqRel);
            self.apply(old, new);
        }
        n + 1
    }

    /// The window is full and holds neither failures nor slow calls.
    #[inline]
    fn clean_and_full(&self) -> bool {
        self.failures.load(Ordering::Acquire) == 0
            && self.slow.load(Ordering::Acquire) == 0
            && self.head.load(Ordering::Relaxed) >= self.size
    }

    fn apply(&self, old: u8, new: u8) {
        let f = i64::from(new & FAILED != 0) - i64::from(old & FAILED != 0);
        if f != 0 {
            self.failures.fetch_add(f, Ordering::AcqRel);
        }
        let s = i64::from(new & SLOW != 0) - i64::from(old & SLOW != 0);
        if s != 0 {
            self.slow.fetch_add(s, Ordering::AcqRel);
        }
    }

    fn counts(&self) -> WindowCounts {
        let calls = self.head.load(Ordering::Acquire).min(self.size);
        WindowCounts {
            calls,
            failures: clamp(self.failures.load(Ordering::Acquire)).min(calls),
            slow: clamp(self.slow.load(Ordering::Acquire)).min(calls),
        }
    }

    fn clear(&self) {
        self.head.store(0, Ordering::Release);
        for slot in self.slots.iter() {
            let old = slot.swap(EMPTY, Ordering::AcqRel);
            if old != EMPTY {
                self.apply(old, EMPTY);
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    calls: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl Bucket {
    fn new() -> Self {
        Self {
            calls: AtomicI64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }
}

/// The last `size` seconds: a ring of one-second buckets and running totals.
///
/// Recording adds to the current second's bucket and to the totals (atomic
/// adds, no lock). Once per second the first recorder that sees a new second
/// takes a short lock and rolls the ring forward: each bucket passed over is
/// swapped to zero and its content subtracted from the totals. Because every
/// count is added once and swapped out once, the totals stay exact even when
/// a record races the roll (it then counts in the newer second).
#[derive(Debug)]
pub(crate) struct TimeWindow {
    current: Padded<AtomicU64>,
    calls: Padded<AtomicI64>,
    failures: AtomicI64,
    slow: AtomicI64,
    buckets: Box<[Bucket]>,
    roll: Mutex<()>,
    size: u64,
}

impl TimeWindow {
    fn new(size: u32) -> Self {
        Self {
            current: Padded(AtomicU64::new(0)),
            calls: Padded(AtomicI64::new(0)),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
            buckets: (0..size).map(|_| Bucket::new()).collect(),
            roll: Mutex::new(()),
            size: u64::from(size),
        }
    }

    /// Moves the ring forward to `sec`; returns the second to record into.
    #[inline]
    fn advance(&self, sec: u64) -> u64 {
        let cur = self.current.load(Ordering::Acquire);
        if sec <= cur {
            return cur;
        }
        self.roll_to(sec)
    }

    #[cold]
    fn roll_to(&self, sec: u64) -> u64 {
        let _guard = self.roll.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load(Ordering::Acquire);
        if sec <= cur {
            return cur;
        }
        let passed = (sec - cur).min(self.size);
        for s in (sec + 1 - passed)..=sec {
            self.drain(&self.buckets[(s % self.size) as usize]);
        }
        self.current.store(sec, Ordering::Release);
        sec
    }

    fn drain(&self, b: &Bucket) {
        let c = b.calls.swap(0, Ordering::AcqRel);
        if c != 0 {
            self.calls.fetch_sub(c, Ordering::AcqRel);
        }
        let f = b.failures.swap(0, Ordering::AcqRel);
        if f != 0 {
            self.failures.fetch_sub(f, Ordering::AcqRel);
        }
        let s = b.slow.swap(0, Ordering::AcqRel);
        if s != 0 {
            self.slow.fetch_sub(s, Ordering::AcqRel);
        }
    }

    /// Returns the calls in the window after this one.
    #[inline]
    fn record(&self, failed: bool, slow: bool, sec: u64) -> u64 {
        let sec = self.advance(sec);
        let b = &self.buckets[(sec % self.size) as usize];
        b.calls.fetch_add(1, Ordering::AcqRel);
        let calls = self.calls.fetch_add(1, Ordering::AcqRel) + 1;
        if failed {
            b.failures.fetch_add(1, Ordering::AcqRel);
            self.failures.fetch_add(1, Ordering::AcqRel);
        }
        if slow {
            b.slow.fetch_add(1, Ordering::AcqRel);
            self.slow.fetch_add(1, Ordering::AcqRel);
        }
        clamp(calls)
    }

    fn counts(&self, sec: u64) -> WindowCounts {
        self.advance(sec);
        let calls = clamp(self.calls.load(Ordering::Acquire));
        WindowCounts {
            calls,
            failures: clamp(self.failures.load(Ordering::Acquire)).min(calls),
            slow: clamp(self.slow.load(Ordering::Acquire)).min(calls),
        }
    }

    fn clear(&self) {
        let _guard = self.roll.lock().unwrap_or_else(|p| p.into_inner());
        for b in self.buckets.iter() {
            self.drain(b);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn count_window_evicts_the_oldest_call() {
        let w = Window::count(3);
        assert!(!w.record(true, false, 0, 3));
        assert!(!w.record(true, true, 0, 3));
        w.record(false, false, 0, 3);
        assert_eq!(
            w.counts(0),
            WindowCounts {
                calls: 3,
                failures: 2,
                slow: 1
            }
        );
        w.record(false, false, 0, 3);
        assert_eq!(
            w.counts(0),
            WindowCounts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(false, false, 0, 3);
        assert_eq!(
            w.counts(0),
            WindowCounts {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
        w.clear();
        assert_eq!(w.counts(0), WindowCounts::default());
    }

    #[test]
    fn time_window_forgets_seconds_that_leave_it() {
        let w = Window::time(3);
        w.record(true, false, 0, 3);
        w.record(false, false, 1_500, 3);
        assert!(w.record(true, false, 2_999, 3));
        assert_eq!(
            w.counts(2_999),
            WindowCounts {
                calls: 3,
                failures: 2,
                slow: 0
            }
        );
        // Second 3 evicts second 0.
        assert_eq!(
            w.counts(3_000),
            WindowCounts {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        // A long gap empties it.
        assert_eq!(w.counts(100_000), WindowCounts::default());
        w.record(true, true, 100_000, 3);
        assert_eq!(
            w.counts(100_000),
            WindowCounts {
                calls: 1,
                failures: 1,
                slow: 1
            }
        );
        w.clear();
        assert_eq!(w.counts(100_000), WindowCounts::default());
    }

    proptest::proptest! {
        /// The count window equals "the last N calls" of a plain list.
        #[test]
        fn count_window_matches_a_plain_list(
            size in 1u32..8,
            calls in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY), 0..60),
        ) {
            let w = Window::count(size);
            let mut all = Vec::new();
            for (failed, slow) in calls {
                w.record(failed, slow, 0, 1);
                all.push((failed, slow));
                let last: Vec<_> = all.iter().rev().take(size as usize).collect();
                let want = WindowCounts {
                    calls: last.len() as u64,
                    failures: last.iter().filter(|c| c.0).count() as u64,
                    slow: last.iter().filter(|c| c.1).count() as u64,
                };
                proptest::prop_assert_eq!(w.counts(0), want);
            }
        }

        /// The time window equals "the calls of the last N seconds" of a
        /// plain list, across gaps of any length.
        #[test]
        fn time_window_matches_a_plain_list(
            size in 1u32..6,
            steps in proptest::collection::vec((0u64..4_000, proptest::bool::ANY, proptest::bool::ANY), 0..60),
        ) {
            let w = Window::time(size);
            let mut now = 0u64;
            let mut all: Vec<(u64, bool, bool)> = Vec::new();
            for (gap, failed, slow) in steps {
                now += gap;
                w.record(failed, slow, now, 1);
                all.push((now / 1000, failed, slow));
                let sec = now / 1000;
                let live: Vec<_> = all.iter().filter(|c| c.0 + u64::from(size) > sec).collect();
                let want = WindowCounts {
                    calls: live.len() as u64,
                    failures: live.iter().filter(|c| c.1).count() as u64,
                    slow: live.iter().filter(|c| c.2).count() as u64,
                };
                proptest::prop_assert_eq!(w.counts(now), want);
            }
        }
    }
}
