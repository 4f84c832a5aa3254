//! The state one queue shares between every clone of its service, its
//! futures and its handle: the permit counter (atomics, [`permits`]), the
//! place counter (an atomic, [`places`]) and the wait lists ([`lists`],
//! behind a `Mutex` held for a few instructions, never across an `.await`
//! and never while task code or a user callback runs, taken through the
//! guard in [`lock`]); a waiting request's side of it is in [`entry`].
//!
//! Every piece is owned: the core lives in an `Arc`, held by services,
//! handles, layers and, through per-thread stripes, by permits. There is
//! no raw pointer anywhere: the compiler checks every access.
//!
//! # Invariants
//!
//! 1. **Every permit is in exactly one place**: free on a shard, free in
//!    `Lists::central` (only while a shard flag is up), held by a
//!    [`Permit`], or granted to a settled node whose entry has not taken
//!    it yet. So `free + held + granted = concurrency`, always.
//! 2. **Shard flags move together, under the lock.** `WAITERS` and
//!    `CLOSED` are the same on every shard and change only under the lock
//!    (mirrored in `Lists::flags`); raising one moves the shards' free
//!    permits into `central`, so while any flag is up every permit is
//!    taken and returned under the lock. The fast paths (one
//!    compare-and-swap each) run only while no flag is up.
//! 3. **`WAITERS` is up only while someone waits, and then no permit is
//!    free.** It is raised when a request must wait and no permit is free,
//!    and lowered (`Locked`'s drop, through `Core::after_change`) once
//!    every list is empty; under it a released permit goes straight to
//!    the next waiter.
//! 4. **`PLACE_WAITERS` is up exactly while the place list is non-empty**
//!    (mirrored in `Lists::place_waiters`, restored on every unlock); while
//!    it or `PLACES_CLOSED` is up, places are taken and freed under the
//!    lock, where a freed place goes to the first caller waiting for one.
//! 5. **A node is in a list exactly while its state byte reads
//!    `Waiting`.** Only the lock holder settles a node: unlinks it, writes
//!    the outcome to its byte, frees the node and queues its waker. The
//!    owner reads a settled byte without the lock and then writes it back
//!    to `Free`; a freed node is reused only once its byte reads `Free`
//!    (its last owner is done with it). An owner that drops its entry
//!    removes the node (still waiting) or passes on its grant (settled),
//!    under the lock.
//! 6. **A queued request holds its place until it takes its permit**, and
//!    frees it then, outside the critical section that granted the permit;
//!    the depth never exceeds the capacity.
//! 7. **Newcomers never overtake a waiter**: by 2 and 3, while anyone waits
//!    the fast path fails and the slow path takes no free permit.
//! 8. **No task code runs under the lock**: wakers are woken, and replaced
//!    or freed ones dropped, after the unlock ([`lock::Locked`]); events
//!    are emitted outside it.
//! 9. **Ownership is reference counted**: the core is freed when the last
//!    `Arc` goes; a permit, a place or an entry keeps it alive through its
//!    thread's [`Stripe`] (a [`Link`]), so that callers on different cores
//!    do not share one count's cache line; an entry holds an `Arc` of the
//!    chunk of state bytes its node's byte is in.
//!
//! `tests/queue_loom.rs` checks these with loom (this module is compiled
//! into that test crate, with loom's atomics, lock and `Arc`).

mod counters;
mod entry;
mod lists;
mod lock;
mod permits;
mod places;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use self::lists::{Lists, SLOT_LIST};
use self::permits::{Stripe, MAX_SHARDS, WAITERS};
use self::places::{PLACE, PLACES_CLOSED, PLACE_WAITERS};
use self::sync::{Arc, AtomicUsize, Mutex};
use super::event::{Listener, QueueEvent, QueueEventKind};
use super::sync;
use super::Priority;

// The loom models compile this module without the layer that uses all
// of these.
#[cfg_attr(loom, allow(unused_imports))]
pub(crate) use self::counters::{Count, Counters, Padded};
#[cfg_attr(loom, allow(unused_imports))]
pub(crate) use self::entry::{Admission, Enqueued, Entry, Grant};
#[cfg_attr(loom, allow(unused_imports))]
pub(crate) use self::permits::Permit;
pub(crate) use self::places::Slot;

/// What the queue holds in common.
pub(crate) struct Core {
    /// The permit words (see [`permits`]), on cache lines of their own, as
    /// are the lock, the places word and the counter rows, so that the slow
    /// path's traffic does not slow the fast path's compare-and-swaps. A
    /// thread takes and returns permits on its own shard, so that callers on
    /// different cores do not pass one line back and forth.
    shards: [Padded<AtomicUsize>; MAX_SHARDS],
    /// Shards in use, minus one (their number is a power of two).
    mask: usize,
    pub(crate) concurrency: usize,
    pub(crate) capacity: usize,
    pub(crate) reject: bool,
    age_after: u64,
    base: Instant,
    lists: Padded<Mutex<Lists>>,
    /// Places taken in the queue (see [`places`]).
    places: Padded<AtomicUsize>,
    listener: Option<Listener>,
    pub(crate) metrics: super::event::Metrics,
    pub(crate) counters: Counters,
    idle: Notify,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("capacity", &self.capacity)
            .field("concurrency", &self.concurrency)
            .field("free_permits", &self.free_permits())
            .finish_non_exhaustive()
    }
}

impl Core {
    fn new(
        concurrency: usize,
        capacity: usize,
        reject: bool,
        age_after: Duration,
        listener: Option<Listener>,
        name: std::borrow::Cow<'static, str>,
    ) -> Self {
        let shards = permits::shard_count(concurrency);
        Self {
            shards: permits::spread(concurrency, shards),
            mask: shards - 1,
            concurrency,
            capacity,
            reject,
            // A huge `age_after` (up to `Duration::MAX`) saturates: aging
            // never catches up, which is what such a setting asks for.
            age_after: u64::try_from(age_after.as_nanos()).unwrap_or(u64::MAX / 4),
            base: Instant::now(),
            lists: Padded(Mutex::new(Lists::new())),
            places: Padded(AtomicUsize::new(0)),
            listener,
            metrics: super::event::Metrics::new(name),
            counters: Counters::default(),
            idle: Notify::new(),
        }
    }

    /// Someone listens to events (a listener, or the `metrics` facade):
    /// worth reading the clock for them.
    #[inline]
    pub(crate) fn observed(&self) -> bool {
        cfg!(feature = "metrics") || self.listener.is_some()
    }

    pub(crate) fn emit(
        &self,
        kind: QueueEventKind,
        priority: Option<Priority>,
        depth: usize,
        waited: Option<Duration>,
    ) {
        super::event::emit(
            &self.metrics,
            self.listener.as_deref(),
            &QueueEvent {
                kind,
                priority,
                depth,
                waited,
            },
        );
    }

    /// Restores invariants 3 and 4 after a change under the lock, and wakes
    /// a pending shutdown when the queue went idle. Run by `Locked`'s drop.
    fn after_change(&self, l: &mut Lists) {
        if l.flags == WAITERS && l.all_empty() {
            self.lower(l);
        }
        if l.len[SLOT_LIST] == 0 && l.place_waiters {
            l.place_waiters = false;
            self.places.fetch_and(!PLACE_WAITERS, Ordering::AcqRel);
        }
        if l.closed && self.depth() == 0 && self.free_locked(l) == self.concurrency {
            // `notify_waiters` only schedules the waiting `shutdown` futures.
            self.idle.notify_waiters();
        }
    }

    /// Begins shutdown: nothing new is admitted, callers waiting for a place
    /// are failed. Queued requests stay and are served.
    pub(crate) fn close(&self) {
        let mut l = self.locked();
        if !l.closed {
            l.closed = true;
            self.raise(&mut l, permits::CLOSED);
            self.places.fetch_or(PLACES_CLOSED, Ordering::AcqRel);
            while l.head[SLOT_LIST] != lists::NIL {
                let i = l.head[SLOT_LIST];
                l.settle(i, lists::NodeState::Closed);
            }
        }
    }

    /// Fails every queued request with `Shutdown` and stops enqueueing.
    /// Returns how many were failed.
    pub(crate) fn fail_queued(&self) -> usize {
        let mut l = self.locked();
        l.drained_out = true;
        let mut failed = 0;
        while let Some(i) = l.pick() {
            l.settle(i, lists::NodeState::Closed);
            self.places.fetch_sub(PLACE, Ordering::AcqRel);
            failed += 1;
        }
        failed
    }

    /// No request waits, is reserved or in flight.
    pub(crate) fn is_idle(&self) -> bool {
        let l = self.lock();
        self.depth() == 0 && l.all_empty() && self.free_locked(&l) == self.concurrency
    }

    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Requests that were ever queued.
    pub(crate) fn queued_total(&self) -> u64 {
        self.lock().queued
    }

    /// Places taken (reserved or queued), queued requests per priority, and
    /// callers waiting for a place.
    pub(crate) fn depths(&self) -> (usize, [usize; 3], usize) {
        let l = self.lock();
        (
            self.depth(),
            [l.len[0], l.len[1], l.len[2]],
            l.len[SLOT_LIST],
        )
    }
}

/// A reference to the queue: what services, handles and layers hold. It
/// also holds the stripes through which permits, places and entries keep the
/// core alive ([`Link`]).
pub(crate) struct Shared {
    core: Arc<Core>,
    /// One per core (a power of two): a permit holds its thread's.
    stripes: Box<[Arc<Stripe>]>,
}

impl std::ops::Deref for Shared {
    type Target = Core;
    #[inline]
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.fmt(f)
    }
}

impl Shared {
    /// The queue's state; `name` is the `queue` label of its metrics.
    pub(crate) fn named(
        concurrency: usize,
        capacity: usize,
        reject: bool,
        age_after: Duration,
        listener: Option<Listener>,
        name: std::borrow::Cow<'static, str>,
    ) -> Self {
        let core = Arc::new(Core::new(
            concurrency,
            capacity,
            reject,
            age_after,
            listener,
            name,
        ));
        let stripes = (0..permits::cores())
            .map(|_| Stripe::new(Arc::clone(&core)))
            .collect();
        Self { core, stripes }
    }

    /// This thread's stripe of references to the core.
    #[inline]
    pub(crate) fn link(&self) -> Link {
        Arc::clone(&self.stripes[permits::thread_stripe(self.stripes.len())])
    }
}

/// An owned reference to the queue for the slow path's places and entries:
/// the [`Stripe`] of the thread that made it, so that cloning it does not
/// touch a cache line that callers on other cores touch too.
pub(crate) type Link = Arc<Stripe>;

#[cfg(all(test, not(loom)))]
mod tests;
