//! Sliding windows of call results: count-based and time-based, both O(1)
//! per record and lock-free on the record path, and both emptied in O(1)
//! (a trip or a reset costs the same whatever the window's size).
//!
//! Emptying works by epochs: every slot or bucket is tagged with the epoch
//! (count window) or the second (time window) it was written in, and the
//! running totals with the epoch they count. Clearing starts a new epoch and
//! zeroes the totals; the old slots are not touched, they are simply no
//! longer current, and are overwritten as new calls come in. A record that
//! races a clear lands in the old epoch and is forgotten with it.

use super::sync::{AtomicU32, AtomicU64, Mutex, Ordering, Padded};

/// Slot flags.
const CALL: u32 = 1;
const FAILED: u32 = 2;
const SLOW: u32 = 4;

/// Running totals and the count window's head: epoch (high 24 bits) and a
/// count (low 40 bits, two's complement for the totals, which may dip below
/// zero for a moment when a record and an eviction race).
const EPOCH_SHIFT: u32 = 40;
const COUNT_MASK: u64 = (1 << EPOCH_SHIFT) - 1;
const EPOCH_MASK: u64 = (1 << 24) - 1;
/// A time window's calls cell of a second the window has rolled past: its
/// count has moved to the totals (a record that finds it sealed records
/// again in the new second). Below it, the cell's count.
const SEALED: u64 = 1 << 31;
const CELL_COUNT: u64 = SEALED - 1;
/// The count window's head is folded back into `[size, 2 size)` past this,
/// so it never carries into the epoch.
const FOLD_AT: u64 = 1 << 39;

fn epoch_of(word: u64) -> u64 {
    word >> EPOCH_SHIFT
}

/// The signed count of a totals word.
fn signed(word: u64) -> i64 {
    ((word << 24) as i64) >> 24
}

fn clamp(v: i64) -> u64 {
    v.max(0) as u64
}

/// Adds `delta` to a totals word if it still counts `epoch`; returns the
/// count after the add (`None` when the epoch is over).
fn add_in(cell: &AtomicU64, epoch: u64, delta: i64) -> Option<i64> {
    let mut cur = cell.load(Ordering::Acquire);
    while epoch_of(cur) == epoch {
        let next = (cur & !COUNT_MASK) | ((cur as i64).wrapping_add(delta) as u64 & COUNT_MASK);
        match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(signed(next)),
            Err(actual) => cur = actual,
        }
    }
    None
}

/// The count of a totals word if it counts `epoch`, else 0.
fn count_in(cell: &AtomicU64, epoch: u64) -> u64 {
    let w = cell.load(Ordering::Acquire);
    if epoch_of(w) == epoch {
        clamp(signed(w))
    } else {
        0
    }
}

/// Counts over the window at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowCounts {
    /// Calls recorded in the window.
    pub calls: u64,
    /// Of which failed.
    pub failures: u64,
    /// Of which were slow.
    pub slow: u64,
}

/// A sliding window over the last N calls or the last N seconds.
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
    /// Returns whether a success may have brought the window to a trip
    /// (the caller then checks the rates): a count window, when this record
    /// brought it to exactly `min_calls` calls; a time window, when it holds
    /// at least `min_calls` calls and some failure or slow call (its calls
    /// are counted without a shared running total, see [`TimeWindow`]).
    pub(crate) fn record(&self, failed: bool, slow: bool, now_ms: u64, min_calls: u64) -> bool {
        match self {
            Window::Count(w) => w.record(failed, slow) == min_calls,
            Window::Time(w) => w.record(failed, slow, now_ms / 1000, min_calls),
        }
    }

    /// The counts at `now_ms`.
    pub(crate) fn counts(&self, now_ms: u64) -> WindowCounts {
        match self {
            Window::Count(w) => w.counts(),
            Window::Time(w) => w.counts(now_ms / 1000),
        }
    }

    /// Forgets every recorded call, in O(1).
    pub(crate) fn clear(&self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(),
        }
    }
}

/// The last `size` calls: a ring of slots, each tagged with its epoch, and
/// running totals of the failures and slow calls in it. Recording claims the
/// next slot with one `fetch_add`, swaps the new result in and moves the
/// totals by the difference with the evicted result (if that one is of the
/// current epoch); an all-success stream whose slots already hold successes
/// writes nothing at all.
#[derive(Debug)]
pub(crate) struct CountWindow {
    // Epoch | calls recorded in it (folded once past `FOLD_AT`).
    head: Padded<AtomicU64>,
    // Epoch | failures; epoch | slow calls.
    failures: Padded<AtomicU64>,
    slow: AtomicU64,
    // Epoch (24 bits) << 8 | flags.
    slots: Box<[AtomicU32]>,
    size: u64,
}

impl CountWindow {
    fn new(size: u32) -> Self {
        Self {
            head: Padded(AtomicU64::new(0)),
            failures: Padded(AtomicU64::new(0)),
            slow: AtomicU64::new(0),
            slots: (0..size).map(|_| AtomicU32::new(0)).collect(),
            size: u64::from(size),
        }
    }

    /// Returns the number of calls recorded in the current epoch, this one
    /// included (0 when nothing was written).
    #[inline]
    fn record(&self, failed: bool, slow: bool) -> u64 {
        if !failed && !slow && self.clean_and_full() {
            // Every slot holds a success: recording one more would evict a
            // success and change nothing. Only reads, so clones on other
            // cores never fight over a cache line.
            return 0;
        }
        let h = self.head.fetch_add(1, Ordering::AcqRel);
        let (epoch, n) = (epoch_of(h), h & COUNT_MASK);
        if n + 1 >= FOLD_AT {
            self.fold();
        }
        let flags = CALL | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let new = (epoch as u32) << 8 | flags;
        let slot = &self.slots[(n % self.size) as usize];
        // Replacing a value by the same value changes nothing: skip the write
        // (linearizable as a swap of equal values).
        if slot.load(Ordering::Acquire) != new {
            let old = slot.swap(new, Ordering::AcqRel);
            // The evicted result counts only if it is of the same epoch.
            let old = if old >> 8 == epoch as u32 { old } else { 0 };
            let f = i64::from(flags & FAILED != 0) - i64::from(old & FAILED != 0);
            if f != 0 {
                add_in(&self.failures, epoch, f);
            }
            let s = i64::from(flags & SLOW != 0) - i64::from(old & SLOW != 0);
            if s != 0 {
                add_in(&self.slow, epoch, s);
            }
        }
        n + 1
    }

    /// Folds the head back into `[size, 2 size)`, keeping it modulo `size`,
    /// long before it could carry into the epoch.
    #[cold]
    fn fold(&self) {
        let mut cur = self.head.load(Ordering::Acquire);
        loop {
            let n = cur & COUNT_MASK;
            if n < FOLD_AT {
                return;
            }
            let folded = (cur & !COUNT_MASK) | (self.size + (n - self.size) % self.size);
            match self
                .head
                .compare_exchange(cur, folded, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The window is full and holds neither failures nor slow calls.
    #[inline]
    fn clean_and_full(&self) -> bool {
        let h = self.head.load(Ordering::Acquire);
        h & COUNT_MASK >= self.size
            && self.failures.load(Ordering::Acquire) & COUNT_MASK == 0
            && self.slow.load(Ordering::Acquire) & COUNT_MASK == 0
    }

    fn counts(&self) -> WindowCounts {
        let h = self.head.load(Ordering::Acquire);
        let epoch = epoch_of(h);
        let calls = (h & COUNT_MASK).min(self.size);
        WindowCounts {
            calls,
            failures: count_in(&self.failures, epoch).min(calls),
            slow: count_in(&self.slow, epoch).min(calls),
        }
    }

    /// A new epoch: the totals first, so that a record that still sees the
    /// old epoch in the head cannot add to the new totals.
    fn clear(&self) {
        let next = ((epoch_of(self.head.load(Ordering::Acquire)) + 1) & EPOCH_MASK) << EPOCH_SHIFT;
        self.failures.store(next, Ordering::Release);
        self.slow.store(next, Ordering::Release);
        self.head.store(next, Ordering::Release);
    }
}

/// A bucket cell: the second it counts (low 32 bits of it, high word) and
/// a count (low word).
#[derive(Debug)]
struct Bucket {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

fn tag(sec: u64) -> u64 {
    sec & 0xffff_ffff
}

/// Adds one to the bucket cell for second `sec`. A cell of an older second
/// is dead (its second was passed over by a reset, never drained) and is
/// claimed; a cell of a newer second means the window moved on meanwhile:
/// returns `false` and the caller records again in the new second, as for
/// a calls cell of this second that a roll has sealed.
fn bump(cell: &AtomicU64, sec: u64) -> bool {
    let mut cur = cell.load(Ordering::Acquire);
    loop {
        let held = cur >> 32;
        let next = if held == tag(sec) {
            if cur & SEALED != 0 {
                return false;
            }
            cur + 1
        } else if held.wrapping_sub(tag(sec)) & 0xffff_ffff < 1 << 31 {
            return false;
        } else {
            tag(sec) << 32 | 1
        };
        match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(actual) => cur = actual,
        }
    }
}

/// The last `size` seconds: a ring of one-second buckets, each cell tagged
/// with its second, and running totals.
///
/// Recording adds to the current second's bucket (no lock); a failure or
/// a slow call adds to its running total too. The calls of the current
/// second join their total only when the window rolls past it, so a
/// success writes one shared word, not two. The first recorder that sees a
/// new second takes a short lock and rolls the ring forward: the current
/// second's calls cell is sealed and its count added to the calls total,
/// each bucket passed over is swapped to the new second with nothing in
/// it, and what it held of the second it evicts is subtracted from the
/// totals. A roll runs between two increments of `rolls`, so a reader of
/// the calls (the total plus the current cell) retries when a roll ran
/// meanwhile, and waits on the lock while one runs. A gap of a whole window or more, and a clear,
/// instead start a new epoch in O(1): the totals restart at zero, and every
/// bucket holds a second outside the window (a clear moves the window's own
/// seconds a window ahead of the clock to make it so). Because every count
/// is added once and taken out once, or forgotten with its epoch, the totals
/// stay exact when a record races a roll (it then counts in the newer
/// second) or a clear (it is forgotten).
#[derive(Debug)]
pub(crate) struct TimeWindow {
    // Epoch (high 24 bits) | the current second (low 40 bits), in the
    // window's seconds: the clock's plus `shift`.
    current: Padded<AtomicU64>,
    shift: AtomicU64,
    // Odd while a roll or a clear runs (a sequence lock for the calls).
    rolls: AtomicU64,
    // Epoch | count.
    calls: Padded<AtomicU64>,
    failures: AtomicU64,
    slow: AtomicU64,
    buckets: Box<[Bucket]>,
    // Serializes rolls and clears.
    roll: Mutex<()>,
    size: u64,
}

impl TimeWindow {
    fn new(size: u32) -> Self {
        Self {
            current: Padded(AtomicU64::new(0)),
            shift: AtomicU64::new(0),
            rolls: AtomicU64::new(0),
            calls: Padded(AtomicU64::new(0)),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            buckets: (0..size)
                .map(|_| Bucket {
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                })
                .collect(),
            roll: Mutex::new(()),
            size: u64::from(size),
        }
    }

    /// Moves the ring forward to the clock's second `sec`; returns the
    /// current (epoch, window second).
    #[inline]
    fn advance(&self, sec: u64) -> (u64, u64) {
        let sec = sec + self.shift.load(Ordering::Acquire);
        let cur = self.current.load(Ordering::Acquire);
        if sec <= cur & COUNT_MASK {
            return (epoch_of(cur), cur & COUNT_MASK);
        }
        self.roll_to(sec)
    }

    #[cold]
    fn roll_to(&self, sec: u64) -> (u64, u64) {
        let _guard = self.roll.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load(Ordering::Acquire);
        let (epoch, at) = (epoch_of(cur), cur & COUNT_MASK);
        if sec <= at {
            return (epoch, at);
        }
        self.rolls.fetch_add(1, Ordering::AcqRel);
        // The second the window leaves: its calls join the total.
        let cell = &self.buckets[(at % self.size) as usize].calls;
        let old = cell.fetch_or(SEALED, Ordering::AcqRel);
        if old >> 32 == tag(at) && old & SEALED == 0 {
            add_in(&self.calls, epoch, (old & CELL_COUNT) as i64);
        }
        let now = if sec - at >= self.size {
            // Everything recorded has left the window.
            self.new_epoch(epoch, sec)
        } else {
            for s in at + 1..=sec {
                self.pass(s, epoch);
            }
            self.current
                .store(epoch << EPOCH_SHIFT | sec, Ordering::Release);
            (epoch, sec)
        };
        self.rolls.fetch_add(1, Ordering::Release);
        now
    }

    /// Moves bucket `s % size` to second `s`, taking what it held of second
    /// `s - size` out of the totals. (Anything older is of an epoch that is
    /// over: never in the current totals.)
    fn pass(&self, s: u64, epoch: u64) {
        let b = &self.buckets[(s % self.size) as usize];
        for (cell, total) in [
            (&b.calls, &self.calls.0),
            (&b.failures, &self.failures),
            (&b.slow, &self.slow),
        ] {
            let old = cell.swap(tag(s) << 32, Ordering::AcqRel);
            // Every count here is in its total: a failures or slow cell's
            // from its record, a calls cell's from the roll that left its
            // second (and sealed it; a second left by a new epoch is never
            // evicted in that epoch).
            let n = old & CELL_COUNT;
            if n != 0 && s >= self.size && old >> 32 == tag(s - self.size) {
                add_in(total, epoch, -(n as i64));
            }
        }
    }

    /// A new epoch at window second `sec`, which must be at least a window
    /// past every second a bucket holds: totals first, then the current word.
    fn new_epoch(&self, epoch: u64, sec: u64) -> (u64, u64) {
        let next = (epoch + 1) & EPOCH_MASK;
        for total in [&self.calls.0, &self.failures, &self.slow] {
            total.store(next << EPOCH_SHIFT, Ordering::Release);
        }
        self.current
            .store(next << EPOCH_SHIFT | sec, Ordering::Release);
        (next, sec)
    }

    /// Records one call; returns whether the window now holds at least
    /// `min_calls` calls and some failure or slow call.
    #[inline]
    fn record(&self, failed: bool, slow: bool, sec: u64, min_calls: u64) -> bool {
        let (epoch, at) = loop {
            let (epoch, at) = self.advance(sec);
            let b = &self.buckets[(at % self.size) as usize];
            if bump(&b.calls, at) {
                if failed {
                    bump(&b.failures, at);
                }
                if slow {
                    bump(&b.slow, at);
                }
                break (epoch, at);
            }
            // The window moved on, or a roll is sealing this second: wait
            // for the roll to end, then record in the new second.
            drop(self.roll.lock().unwrap_or_else(|p| p.into_inner()));
        };
        if failed {
            add_in(&self.failures, epoch, 1);
        }
        if slow {
            add_in(&self.slow, epoch, 1);
        }
        (count_in(&self.failures, epoch) != 0 || count_in(&self.slow, epoch) != 0)
            && self.calls(epoch, at) >= min_calls
    }

    /// The calls in the window: the total of the seconds rolled past and
    /// the current second's cell, read between two equal, even values of
    /// `rolls`.
    fn calls(&self, epoch: u64, at: u64) -> u64 {
        let cell = &self.buckets[(at % self.size) as usize].calls;
        loop {
            let r = self.rolls.load(Ordering::Acquire);
            if r & 1 == 1 {
                // A roll runs: wait for it.
                drop(self.roll.lock().unwrap_or_else(|p| p.into_inner()));
                continue;
            }
            let total = count_in(&self.calls, epoch);
            let c = cell.load(Ordering::Acquire);
            let live = if c >> 32 == tag(at) && c & SEALED == 0 {
                c & CELL_COUNT
            } else {
                0
            };
            if self.rolls.load(Ordering::Acquire) == r {
                return total + live;
            }
        }
    }

    fn counts(&self, sec: u64) -> WindowCounts {
        let (epoch, at) = self.advance(sec);
        let calls = self.calls(epoch, at);
        WindowCounts {
            calls,
            failures: count_in(&self.failures, epoch).min(calls),
            slow: count_in(&self.slow, epoch).min(calls),
        }
    }

    /// A new epoch, O(1) whatever the size: the window's seconds move a
    /// window ahead of the clock's, so every bucket is outside it.
    fn clear(&self) {
        let _guard = self.roll.lock().unwrap_or_else(|p| p.into_inner());
        self.rolls.fetch_add(1, Ordering::AcqRel);
        let cur = self.current.load(Ordering::Acquire);
        self.shift.fetch_add(self.size, Ordering::AcqRel);
        self.new_epoch(epoch_of(cur), (cur & COUNT_MASK) + self.size);
        self.rolls.fetch_add(1, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
// A path from this file's directory, so that the loom model, which
// compiles this file by its path, resolves it the same way.
#[path = "window/tests.rs"]
mod tests;
