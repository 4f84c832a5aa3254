//! Slow-path counters striped by thread, the cache-line padding the state
//! uses, and the thread index that picks a permit shard, a reference stripe
//! and a counter row.

use std::sync::atomic::{AtomicU64, Ordering};

/// A value on a cache line (pair) of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// This thread's index, for the permit shards, the reference stripes and
/// the counter rows: given out round-robin on a thread's first use.
#[inline]
pub(super) fn thread_index() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    INDEX
        .try_with(|index| match index.get() {
            usize::MAX => {
                let i = NEXT.fetch_add(1, Ordering::Relaxed) % (1 << 20);
                index.set(i);
                i
            }
            i => i,
        })
        .unwrap_or(0)
}

/// A slow-path event that [`Counters`] counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Count {
    DispatchedAfterWait,
    Rejected,
    Expired,
    TimedOut,
    Cancelled,
    ShutOut,
}

const COUNTS: usize = 6;
/// Counter rows: a thread adds to its own row, so that two workers counting
/// the same event do not pass a cache line back and forth.
const STRIPES: usize = 8;

/// Counters of slow-path events (the fast path counts nothing), striped by
/// thread; a read sums the rows.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    rows: [Padded<[AtomicU64; COUNTS]>; STRIPES],
}

impl Counters {
    pub(crate) fn add(&self, count: Count) {
        let row = thread_index() & (STRIPES - 1);
        self.rows[row].0[count as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, count: Count) -> u64 {
        self.rows
            .iter()
            .map(|row| row.0[count as usize].load(Ordering::Relaxed))
            .sum()
    }
}
