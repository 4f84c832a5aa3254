//! The permit counter: the free permits, spread over per-core shards, and
//! the [`Permit`] a caller holds while its call is in flight.

use std::sync::atomic::Ordering;

use super::counters::{thread_index, Padded};
use super::lists::{NodeState, SLOT_LIST};
use super::lock::Locked;
use super::sync::{Arc, AtomicUsize};
use super::{Core, Link, Lists, Shared};

/// The permit word, one per shard, each on a cache line of its own:
///
/// ```text
///  63 (31 on 32-bit targets)       2   1        0
/// +----------------------------------+--------+---------+
/// |  free permits on this shard      | CLOSED | WAITERS |
/// |  (word / ONE)                    |        |         |
/// +----------------------------------+--------+---------+
/// ```
///
/// `WAITERS`: some request waits in a list, so a released permit must go
/// to it (through the lock). `CLOSED`: shutdown began. The flags are the
/// same on every shard and change only under the lock (invariant 2); while
/// one is set, the shards hold no free permit.
pub(super) const WAITERS: usize = 0b01;
pub(super) const CLOSED: usize = 0b10;
const FLAGS: usize = WAITERS | CLOSED;
pub(super) const ONE: usize = 0b100;

/// The most permit shards (and reference stripes) a queue has.
pub(super) const MAX_SHARDS: usize = 16;

/// One shard per core the process may use, rounded up to a power of two,
/// at most [`MAX_SHARDS`]. Two under loom, to explore stealing in small
/// models.
pub(super) fn cores() -> usize {
    if cfg!(all(loom, test)) {
        return 2;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .next_power_of_two()
        .min(MAX_SHARDS)
}

/// How many permit shards a queue has: [`cores`], but no more than the
/// permits (so that a queue of concurrency 1 keeps its permit on one line
/// instead of sending callers to look for it).
pub(super) fn shard_count(concurrency: usize) -> usize {
    let mut n = cores();
    while n > 1 && n > concurrency {
        n /= 2;
    }
    n
}

/// The permits spread evenly over the first `n` shards.
pub(super) fn spread(concurrency: usize, n: usize) -> [Padded<AtomicUsize>; MAX_SHARDS] {
    std::array::from_fn(|i| {
        let free = if i < n {
            concurrency / n + usize::from(i < concurrency % n)
        } else {
            0
        };
        Padded(AtomicUsize::new(free * ONE))
    })
}

/// What [`take_from`] found on a shard.
enum Taken {
    Yes,
    Empty,
    Flagged,
}

/// The fast acquire on one shard: one compare-and-swap while no flag is set
/// and a permit is free.
#[inline]
fn take_from(shard: &AtomicUsize) -> Taken {
    let mut s = shard.load(Ordering::Relaxed);
    loop {
        if s & FLAGS != 0 {
            return Taken::Flagged;
        }
        if s < ONE {
            return Taken::Empty;
        }
        match shard.compare_exchange_weak(s, s - ONE, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Taken::Yes,
            Err(actual) => s = actual,
        }
    }
}

/// One thread's strong reference to the core, for its permits: each
/// permit holds an `Arc` of its thread's stripe (invariant 9), so that
/// taking and returning permits on different cores does not pass one
/// reference count's cache line back and forth. Cache-line aligned, so
/// that two stripes' counts never share a line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Stripe {
    core: Arc<Core>,
}

impl Stripe {
    pub(super) fn new(core: Arc<Core>) -> Arc<Self> {
        Arc::new(Self { core })
    }
}

impl std::ops::Deref for Stripe {
    type Target = Core;
    #[inline]
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// This thread's stripe among `n` (a power of two).
#[inline]
pub(super) fn thread_stripe(n: usize) -> usize {
    thread_index() & (n - 1)
}

/// A permit to call the inner service; returned (or handed to the next
/// waiter) on drop. It keeps the queue alive through its thread's
/// [`Stripe`].
pub(crate) struct Permit {
    stripe: Arc<Stripe>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl Permit {
    /// Wraps a permit already taken from the count (or handed over), with
    /// the reference that keeps the core alive.
    #[inline]
    pub(crate) fn new(stripe: Link) -> Self {
        Self { stripe }
    }

    /// The queue's core.
    #[inline]
    pub(crate) fn core(&self) -> &Core {
        &self.stripe.core
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        let core = self.core();
        let shard = &core.shards[core.here()];
        let mut s = shard.load(Ordering::Relaxed);
        loop {
            if s & FLAGS != 0 {
                return core.release_permit_slow();
            }
            match shard.compare_exchange_weak(s, s + ONE, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }
}

impl Shared {
    /// Wraps a permit already taken from the count (or handed over).
    #[inline]
    pub(crate) fn permit(&self) -> Permit {
        Permit::new(self.link())
    }

    /// The fast path: one compare-and-swap when a permit is free and nobody
    /// waits.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        self.try_take().then(|| self.permit())
    }
}

impl Core {
    /// The shards in use.
    fn shards(&self) -> &[Padded<AtomicUsize>] {
        &self.shards[..=self.mask]
    }

    /// This thread's shard.
    #[inline]
    fn here(&self) -> usize {
        thread_index() & self.mask
    }

    pub(crate) fn free_permits(&self) -> usize {
        self.free_locked(&self.lock())
    }

    /// Free permits: on the shards, and in the lock's keeping while a flag
    /// is set. Called under the lock.
    pub(super) fn free_locked(&self, l: &Lists) -> usize {
        l.central
            + self
                .shards()
                .iter()
                .map(|s| s.load(Ordering::Acquire) / ONE)
                .sum::<usize>()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shards[0].load(Ordering::Acquire) & CLOSED != 0
    }

    /// Sets `flags` on every shard (they are only ever changed together,
    /// under the lock), moving the shards' free permits into the lock's
    /// keeping: from then on no permit is taken or returned without the
    /// lock.
    pub(super) fn raise(&self, l: &mut Lists, flags: usize) {
        l.flags |= flags;
        for shard in self.shards() {
            let prev = shard.swap(l.flags, Ordering::AcqRel);
            l.central += prev / ONE;
        }
    }

    /// Clears `WAITERS` (the only flag that clears) once no request waits,
    /// handing the free permits back to the shards (to this thread's).
    pub(super) fn lower(&self, l: &mut Lists) {
        debug_assert_eq!(l.flags, WAITERS);
        l.flags = 0;
        let here = self.here();
        for (i, shard) in self.shards().iter().enumerate() {
            let free = if i == here { l.central } else { 0 };
            // While a flag was set no permit went to a shard: each holds
            // only the flags.
            let prev = shard.swap(free * ONE, Ordering::AcqRel);
            debug_assert_eq!(prev / ONE, 0);
        }
        l.central = 0;
    }

    /// The compare-and-swap of [`Shared::try_acquire`], without making the
    /// permit.
    #[inline]
    pub(crate) fn try_take(&self) -> bool {
        let here = self.here();
        match take_from(&self.shards[here]) {
            Taken::Yes => true,
            Taken::Flagged => false,
            Taken::Empty => self.steal(here),
        }
    }

    /// Takes a permit from another shard than this thread's (empty).
    #[cold]
    fn steal(&self, here: usize) -> bool {
        for k in 1..=self.mask {
            match take_from(&self.shards[(here + k) & self.mask]) {
                Taken::Yes => return true,
                // Flags are set on every shard: the lock decides.
                Taken::Flagged => return false,
                Taken::Empty => {}
            }
        }
        false
    }

    /// Returns a permit through the lock (a flag is up). The common case,
    /// a queued request to hand it to, is written out: one node settled,
    /// the flags restored, the lock released, then its owner woken
    /// (invariant 8), without collecting wakers.
    #[cold]
    fn release_permit_slow(&self) {
        let mut l = self.lock();
        if let Some(i) = l.pick() {
            // It keeps its place until it takes the grant (`Entry::poll`).
            l.unlink(i);
            let waker = l.release_node(i, Some(NodeState::Permit));
            self.after_change(&mut l);
            drop(l);
            if let Some(w) = waker {
                w.wake();
            }
            return;
        }
        let mut l = self.locked_from(l);
        self.release_permit_locked(&mut l);
    }

    /// Hands a released permit to the next queued request (in priority
    /// order), else to a caller waiting for a place, else back to the count.
    pub(super) fn release_permit_locked(&self, l: &mut Locked<'_>) {
        if let Some(i) = l.pick() {
            // It keeps its place until it takes the grant (`Entry::poll`),
            // which frees the place outside this critical section.
            l.settle(i, NodeState::Permit);
        } else if l.head[SLOT_LIST] != super::lists::NIL {
            let i = l.head[SLOT_LIST];
            l.settle(i, NodeState::Permit);
        } else if l.flags == 0 {
            // The flag that sent this release here was lowered meanwhile.
            self.shards[self.here()].fetch_add(ONE, Ordering::AcqRel);
        } else {
            l.central += 1;
        }
    }

    /// Takes a free permit if there is one and nobody waits for one. Called
    /// under the lock.
    pub(super) fn take_permit_only(&self, l: &mut Lists) -> bool {
        if l.flags == 0 {
            return self.try_take();
        }
        if l.flags & WAITERS == 0 && l.central > 0 {
            l.central -= 1;
            return true;
        }
        false
    }

    /// Takes a free permit if there is one, else raises `WAITERS` (so that
    /// every release comes to the lock, to be handed to a waiter). Returns
    /// whether it took a permit. Called under the lock.
    pub(super) fn take_permit_or_flag(&self, l: &mut Lists) -> bool {
        if l.flags & WAITERS != 0 {
            // Raised: no permit is free (a release goes to a waiter).
            return false;
        }
        if self.take_permit_only(l) {
            return true;
        }
        self.raise(l, WAITERS);
        // A permit returned before the flag went up is in `central` now.
        if l.central > 0 {
            l.central -= 1;
            return true;
        }
        false
    }
}
