//! The state one queue shares between every clone of its service, its
//! futures and its handle: the permit count (an atomic) and the wait lists
//! (behind a `Mutex` held for a few instructions, never across an `.await`
//! and never while a user callback runs).
//!
//! # The permit words
//!
//! The free permits are spread over shards, one atomic word per cache line
//! and at most one per core (and per permit); a thread takes and returns
//! permits on its own shard, and takes from another only when its own is
//! empty. Each word packs its free permits (`word / ONE`) with three flags,
//! the same on every shard: `WAITERS` (some request waits in a list),
//! `CLOSED` (shutdown began) and `DEAD` (every [`Shared`] is gone). The
//! fast paths are one compare-and-swap each and run only while no flag is
//! set: acquiring takes a free permit, releasing adds one back. Flags are
//! raised and lowered only under the lock, on every shard at once
//! ([`Core::raise`]), which moves the shards' free permits into the lock's
//! keeping (`Lists::central`): from then on a permit is taken or returned
//! only under the lock, where a released permit is handed straight to the
//! next waiter, so a newcomer can never overtake a waiter. `WAITERS` is
//! raised only when no permit is free and stays up while any list is
//! non-empty, so "`WAITERS` set" implies "no free permit".
//!
//! # Who keeps the core alive
//!
//! Services, handles, places and entries hold a [`Shared`] (through a
//! service's own [`Link`], so that queued calls of different services do not
//! share a reference count's cache line). A [`Permit`] holds a plain pointer
//! and no count at all: the permits share one strong reference to the
//! [`Core`], released by whoever sees, under the lock, both "no `Shared`
//! left" (`DEAD`, raised by the last `Shared`'s drop) and "every permit
//! back". That is the last `Shared` if the permits are all back by then,
//! else the permit that comes back last. A slow release works under the
//! lock, where `DEAD` cannot be raised under it, and does not touch the core
//! after unlocking. `tests/queue_loom.rs` checks this protocol.
//!
//! # The places word
//!
//! `places` counts the places taken in the queue the same way, with the
//! flags `PLACE_WAITERS` (callers wait in `poll_ready` for a place) and
//! `PLACES_CLOSED`: with both clear, a place is reserved (or, in reject
//! mode, refused) and given back with one compare-and-swap; otherwise under
//! the lock, where a freed place is handed to the first caller waiting for
//! one. A queued request keeps its place until it takes its permit, and
//! frees it then, outside the critical section that granted the permit.
//!
//! # Wait-list nodes
//!
//! A waiting request owns an [`Entry`]: an index into the node arena and a
//! boxed flag the node points at. Whoever settles a node (grants it a permit
//! or a place, or fails it on shutdown) does so under the lock, sets the
//! flag, wakes the owner and frees the node; the owner then reads its grant
//! from the flag without the lock. An owner that drops its entry removes the
//! node (still waiting) or passes on what it was granted, under the lock,
//! before its flag is freed.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::PoisonError;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::event::{Listener, QueueEvent, QueueEventKind};
use super::sync::{Arc, AtomicU8, AtomicUsize, Mutex, MutexGuard};
use super::Priority;

const WAITERS: usize = 0b001;
const CLOSED: usize = 0b010;
/// Every [`Shared`] is gone: the permit that comes back last frees the core.
const DEAD: usize = 0b100;
const FLAGS: usize = WAITERS | CLOSED | DEAD;
const ONE: usize = 0b1000;

/// The places word: places taken (`word / PLACE`) and two flags, like
/// the permit word: `PLACE_WAITERS` (callers wait in `poll_ready` for a
/// place) and `PLACES_CLOSED`. Places are reserved and given back with one
/// compare-and-swap while both flags are clear; otherwise under the lock.
const PLACE_WAITERS: usize = 0b01;
const PLACES_CLOSED: usize = 0b10;
const PLACE: usize = 0b100;

const NIL: u32 = u32::MAX;
/// Lists 0..3 hold queued requests by priority (High, Normal, Low); list 3
/// holds callers waiting in `poll_ready` for a place in the queue.
const SLOT_LIST: usize = 3;
const LISTS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum NodeState {
    Free = 0,
    Waiting,
    /// Granted a permit (handed over, not taken from the count).
    Permit,
    /// Granted a place in the queue (slot waiters only).
    Slot,
    /// Failed by shutdown.
    Closed,
}

impl NodeState {
    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => NodeState::Waiting,
            2 => NodeState::Permit,
            3 => NodeState::Slot,
            4 => NodeState::Closed,
            _ => NodeState::Free,
        }
    }
}

/// What an entry's owner reads without the lock: its node's state, set by
/// whoever settles the node (under the lock), who also frees the node.
/// Boxed, so that it stays put while its entry moves: the node points at it
/// (see [`FlagPtr`]).
type Flag = Box<AtomicU8>;

/// A node's pointer to its entry's [`Flag`], written only under the lock.
#[derive(Clone, Copy, Debug)]
struct FlagPtr(NonNull<AtomicU8>);

// SAFETY: it points at an `AtomicU8` (`Send + Sync`), valid while the node is
// in a list: an entry removes its node under the lock before its flag is
// freed (`Entry::remove`, run by `Drop`), and a settled node is unlinked and
// forgets the pointer in the same critical section.
unsafe impl Send for FlagPtr {}
// SAFETY: as above.
unsafe impl Sync for FlagPtr {}

fn new_flag() -> Flag {
    Box::new(AtomicU8::new(NodeState::Waiting.code()))
}

#[derive(Debug)]
struct Node {
    prev: u32,
    next: u32,
    list: u8,
    state: NodeState,
    flag: Option<FlagPtr>,
    waker: Option<Waker>,
    /// Virtual time: the earliest wins. Enqueue time plus the class offset.
    vt: u64,
}

/// The wait lists: an index-linked list per priority plus one for slot
/// waiters, over one node arena (nodes are reused; the arena never grows
/// beyond the most requests that ever waited at once).
#[derive(Debug)]
struct Lists {
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: [u32; LISTS],
    tail: [u32; LISTS],
    len: [usize; LISTS],
    closed: bool,
    /// The shutdown drain timed out: what was still queued was failed and
    /// nothing more is enqueued.
    drained_out: bool,
    /// Requests that were ever queued (for [`QueueStats`](super::QueueStats)).
    queued: u64,
    /// Whether `PLACE_WAITERS` is set in the places word (set and cleared
    /// only under the lock): read here instead of on that busy cache line.
    place_waiters: bool,
    /// The flags set on every permit shard (changed only here, under the
    /// lock).
    flags: usize,
    /// Free permits in the lock's keeping: while a flag is set, permits are
    /// not put back on the shards.
    central: usize,
}

impl Lists {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            head: [NIL; LISTS],
            tail: [NIL; LISTS],
            len: [0; LISTS],
            closed: false,
            drained_out: false,
            queued: 0,
            place_waiters: false,
            flags: 0,
            central: 0,
        }
    }

    fn all_empty(&self) -> bool {
        self.len.iter().all(|&n| n == 0)
    }

    fn push(&mut self, list: usize, vt: u64, waker: Option<Waker>, flag: &Flag) -> u32 {
        let node = Node {
            prev: self.tail[list],
            next: NIL,
            list: list as u8,
            state: NodeState::Waiting,
            flag: Some(FlagPtr(NonNull::from(&**flag))),
            waker,
            vt,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        match self.tail[list] {
            NIL => self.head[list] = idx,
            t => self.nodes[t as usize].next = idx,
        }
        self.tail[list] = idx;
        self.len[list] += 1;
        idx
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, list) = {
            let n = &self.nodes[idx as usize];
            (n.prev, n.next, n.list as usize)
        };
        match prev {
            NIL => self.head[list] = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail[list] = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        self.len[list] -= 1;
        let n = &mut self.nodes[idx as usize];
        n.prev = NIL;
        n.next = NIL;
    }

    /// Frees a node; returns its waker, for the caller to drop after the
    /// lock is released (dropping a waker can run a task's drop code).
    #[must_use]
    fn release_node(&mut self, idx: u32) -> Option<Waker> {
        let n = &mut self.nodes[idx as usize];
        n.state = NodeState::Free;
        n.flag = None;
        let waker = n.waker.take();
        self.free.push(idx);
        waker
    }

    /// Settles an unlinked node: tells its owner (flag, waker) and frees it.
    fn settle(&mut self, idx: u32, state: NodeState, wakes: &mut Wakes) {
        let n = &mut self.nodes[idx as usize];
        if let Some(flag) = n.flag {
            // SAFETY: the node is (was, until just now) in a list, so its
            // entry's flag is alive (see `FlagPtr`); this is under the lock.
            unsafe { flag.0.as_ref() }.store(state.code(), Ordering::Release);
        }
        wakes.push(n.waker.take());
        let none = self.release_node(idx);
        debug_assert!(none.is_none());
    }

    /// The queued request to serve next: the smallest virtual time among the
    /// heads of the three priority lists (each list is FIFO, so its head has
    /// its smallest virtual time).
    fn pick(&self) -> Option<u32> {
        let mut best: Option<u32> = None;
        for list in 0..SLOT_LIST {
            let h = self.head[list];
            if h == NIL {
                continue;
            }
            best = match best {
                Some(b) if self.nodes[b as usize].vt <= self.nodes[h as usize].vt => Some(b),
                _ => Some(h),
            };
        }
        best
    }
}

/// Wakers collected under the lock and woken after it is released. A
/// release hands on one grant, rarely two: those stay inline, so that a
/// handoff does not allocate.
#[derive(Default)]
pub(crate) struct Wakes {
    first: Option<Waker>,
    second: Option<Waker>,
    rest: Vec<Waker>,
}

impl Wakes {
    fn push(&mut self, w: Option<Waker>) {
        let Some(w) = w else { return };
        if self.first.is_none() {
            self.first = Some(w);
        } else if self.second.is_none() {
            self.second = Some(w);
        } else {
            self.rest.push(w);
        }
    }

    fn wake(self) {
        for w in self.first.into_iter().chain(self.second).chain(self.rest) {
            w.wake();
        }
    }
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

/// The most permit shards a queue has.
const MAX_SHARDS: usize = 16;

/// How many permit shards a queue has: one per core the process may use,
/// rounded up to a power of two, at most [`MAX_SHARDS`], and no more than
/// the permits (so that a queue of concurrency 1 keeps its permit on one
/// line instead of sending callers to look for it). Two under loom, to
/// explore stealing in small models.
fn shard_count(concurrency: usize) -> usize {
    if cfg!(all(loom, test)) {
        return 2;
    }
    let mut n = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .next_power_of_two()
        .min(MAX_SHARDS);
    while n > 1 && n > concurrency {
        n /= 2;
    }
    n
}

/// The permits spread evenly over the first `n` shards.
fn spread(concurrency: usize, n: usize) -> [Padded<AtomicUsize>; MAX_SHARDS] {
    std::array::from_fn(|i| {
        let free = if i < n {
            concurrency / n + usize::from(i < concurrency % n)
        } else {
            0
        };
        Padded(AtomicUsize::new(free * ONE))
    })
}

/// This thread's index, for the permit shards and the counter rows: given
/// out round-robin on a thread's first use.
#[inline]
fn thread_index() -> usize {
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

fn stripe() -> usize {
    thread_index() & (STRIPES - 1)
}

impl Counters {
    pub(crate) fn add(&self, count: Count) {
        self.rows[stripe()].0[count as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, count: Count) -> u64 {
        self.rows
            .iter()
            .map(|row| row.0[count as usize].load(Ordering::Relaxed))
            .sum()
    }
}

/// What the queue holds in common. Services, handles, places and entries
/// reach it through a [`Shared`]; permits point at it directly (see
/// [`Permit`]).
pub(crate) struct Core {
    /// The permit words (on cache lines of their own, as are the lock, the
    /// places word and the counter rows, so that the slow path's traffic
    /// does not slow the fast path's compare-and-swaps): free permits spread over shards, one per cache
    /// line; a thread takes and returns permits on its own shard (see
    /// [`Core::here`]), so that callers on different cores do not pass one
    /// line back and forth.
    shards: [Padded<AtomicUsize>; MAX_SHARDS],
    /// Shards in use, minus one (their number is a power of two).
    mask: usize,
    pub(crate) concurrency: usize,
    pub(crate) capacity: usize,
    pub(crate) reject: bool,
    age_after: u64,
    base: Instant,
    lists: Padded<Mutex<Lists>>,
    /// Places taken in the queue: reserved by `poll_ready` and not yet
    /// enqueued, or enqueued and waiting for a permit (see `PLACE`).
    places: Padded<AtomicUsize>,
    listener: Option<Listener>,
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

/// What admission gave.
pub(crate) enum Admission {
    Permit(Permit),
    Slot(Slot),
    Full { depth: usize },
    Closed,
    Waiting(Entry),
}

/// What a wait list entry was granted.
pub(crate) enum Grant {
    Permit(Permit),
    Slot(Slot),
    Closed,
}

/// What enqueueing gave.
pub(crate) enum Enqueued {
    Permit(Permit),
    Entry(Entry),
    Closed,
}

impl Core {
    fn new(
        concurrency: usize,
        capacity: usize,
        reject: bool,
        age_after: Duration,
        listener: Option<Listener>,
    ) -> Self {
        let shards = shard_count(concurrency);
        Self {
            shards: spread(concurrency, shards),
            mask: shards - 1,
            concurrency,
            capacity,
            reject,
            age_after: u64::try_from(age_after.as_nanos()).unwrap_or(u64::MAX / 4),
            base: Instant::now(),
            lists: Padded(Mutex::new(Lists::new())),
            places: Padded(AtomicUsize::new(0)),
            listener,
            counters: Counters::default(),
            idle: Notify::new(),
        }
    }

    /// The shards in use.
    fn shards(&self) -> &[Padded<AtomicUsize>] {
        &self.shards[..=self.mask]
    }

    /// This thread's shard.
    #[inline]
    fn here(&self) -> usize {
        thread_index() & self.mask
    }

    fn lock(&self) -> MutexGuard<'_, Lists> {
        // Nothing that can panic runs under the lock; recover anyway.
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn free_permits(&self) -> usize {
        self.free_locked(&self.lock())
    }

    /// Free permits: on the shards, and in the lock's keeping while a flag
    /// is set. Called under the lock.
    fn free_locked(&self, l: &Lists) -> usize {
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
    fn raise(&self, l: &mut Lists, flags: usize) {
        l.flags |= flags;
        for shard in self.shards() {
            let prev = shard.swap(l.flags, Ordering::AcqRel);
            l.central += prev / ONE;
        }
    }

    /// Clears `WAITERS` (the only flag that clears) once no request waits,
    /// handing the free permits back to the shards (to this thread's).
    fn lower(&self, l: &mut Lists) {
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
            self.listener.as_deref(),
            &QueueEvent {
                kind,
                priority,
                depth,
                waited,
            },
        );
    }

    /// The compare-and-swap of [`try_acquire`](Self::try_acquire), without
    /// making the guard.
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

    /// Hands a released permit to the next queued request (in priority
    /// order), else to a caller waiting for a place, else back to the count.
    /// Returns whether that made it the last permit back after every
    /// [`Shared`] went (then the caller releases the permits' reference).
    #[must_use]
    fn release_permit_locked(&self, l: &mut Lists, wakes: &mut Wakes) -> bool {
        if let Some(i) = l.pick() {
            l.unlink(i);
            // It keeps its place until it takes the grant (`Entry::poll`),
            // which frees the place outside this critical section.
            l.settle(i, NodeState::Permit, wakes);
        } else if l.head[SLOT_LIST] != NIL {
            let i = l.head[SLOT_LIST];
            l.unlink(i);
            l.settle(i, NodeState::Permit, wakes);
        } else if l.flags == 0 {
            // The flag that sent this release here was lowered meanwhile.
            self.shards[self.here()].fetch_add(ONE, Ordering::AcqRel);
        } else {
            l.central += 1;
            return l.flags & DEAD != 0 && l.central == self.concurrency;
        }
        false
    }

    /// Hands a freed place in the queue to a caller waiting for one, else
    /// lowers the depth.
    fn release_slot_locked(&self, l: &mut Lists, wakes: &mut Wakes) {
        if l.head[SLOT_LIST] != NIL && !l.closed {
            let i = l.head[SLOT_LIST];
            l.unlink(i);
            l.settle(i, NodeState::Slot, wakes);
        } else {
            self.places.fetch_sub(PLACE, Ordering::AcqRel);
        }
    }

    /// Frees a place: one compare-and-swap while nobody waits for a place
    /// and shutdown has not begun; otherwise under the lock, where the place
    /// goes to the first caller waiting for one.
    fn release_place(&self) {
        let mut s = self.places.load(Ordering::Relaxed);
        while s & (PLACE_WAITERS | PLACES_CLOSED) == 0 {
            match self.places.compare_exchange_weak(
                s,
                s - PLACE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
        let mut wakes = Wakes::default();
        {
            let mut l = self.lock();
            self.release_slot_locked(&mut l, &mut wakes);
            self.after_change(&mut l);
        }
        wakes.wake();
    }

    /// The fast place path, while nobody waits for a place and shutdown has
    /// not begun: `Ok` reserved a place (one compare-and-swap), `Err(depth)`
    /// found the queue full in reject mode. `None` sends the caller to
    /// [`LocalRef::admit_slow`].
    #[inline]
    pub(crate) fn try_place(&self) -> Option<Result<(), usize>> {
        let mut s = self.places.load(Ordering::Relaxed);
        loop {
            if s & (PLACE_WAITERS | PLACES_CLOSED) != 0 {
                return None;
            }
            if s / PLACE >= self.capacity {
                return self.reject.then_some(Err(s / PLACE));
            }
            match self.places.compare_exchange_weak(
                s,
                s + PLACE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Ok(())),
                Err(actual) => s = actual,
            }
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.places.load(Ordering::Acquire) / PLACE
    }

    /// Keeps the `WAITERS` flag true to the lists and wakes a pending
    /// shutdown when the queue went idle.
    fn after_change(&self, l: &mut Lists) {
        if l.flags == WAITERS && l.all_empty() {
            self.lower(l);
        }
        if l.len[SLOT_LIST] == 0 && l.place_waiters {
            l.place_waiters = false;
            self.places.fetch_and(!PLACE_WAITERS, Ordering::AcqRel);
        }
        if l.closed && self.depth() == 0 && self.free_locked(l) == self.concurrency {
            // Under the lock: a permit's slow release must not touch the core
            // after unlocking (see `release_permit_slow`). `notify_waiters`
            // only schedules the waiting `shutdown` futures.
            self.idle.notify_waiters();
        }
    }

    /// Takes a free permit if there is one and nobody waits for one. Called
    /// under the lock.
    fn take_permit_only(&self, l: &mut Lists) -> bool {
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
    fn take_permit_or_flag(&self, l: &mut Lists) -> bool {
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

    /// Begins shutdown: nothing new is admitted, callers waiting for a place
    /// are failed. Queued requests stay and are served.
    pub(crate) fn close(&self) {
        let mut wakes = Wakes::default();
        {
            let mut l = self.lock();
            if !l.closed {
                l.closed = true;
                self.raise(&mut l, CLOSED);
                self.places.fetch_or(PLACES_CLOSED, Ordering::AcqRel);
                while l.head[SLOT_LIST] != NIL {
                    let i = l.head[SLOT_LIST];
                    l.unlink(i);
                    l.settle(i, NodeState::Closed, &mut wakes);
                }
            }
            self.after_change(&mut l);
        }
        wakes.wake();
    }

    /// Fails every queued request with `Shutdown` and stops enqueueing.
    /// Returns how many were failed.
    pub(crate) fn fail_queued(&self) -> usize {
        let mut wakes = Wakes::default();
        let failed = {
            let mut l = self.lock();
            l.drained_out = true;
            let mut failed = 0;
            while let Some(i) = l.pick() {
                l.unlink(i);
                l.settle(i, NodeState::Closed, &mut wakes);
                self.places.fetch_sub(PLACE, Ordering::AcqRel);
                failed += 1;
            }
            self.after_change(&mut l);
            failed
        };
        wakes.wake();
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

    /// Places taken (reserved or queued) and queued requests per priority.
    pub(crate) fn depths(&self) -> (usize, [usize; 3], usize) {
        let l = self.lock();
        (
            self.depth(),
            [l.len[0], l.len[1], l.len[2]],
            l.len[SLOT_LIST],
        )
    }
}

/// A reference to the queue that keeps it alive: what services, handles,
/// places and entries hold. When the last one goes, the core is freed once
/// the last permit is back (see [`Permit`]).
pub(crate) struct Shared {
    core: Arc<Core>,
    /// The core, from the one strong reference that the permits share: it
    /// is dropped by whoever sees both "no `Shared` left" and "every permit
    /// back" first, under the lock.
    pool: CorePtr,
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

impl Drop for Shared {
    fn drop(&mut self) {
        // `DEAD` is set under the lock: a permit's slow release, which works
        // under the lock without a reference of its own, thus never sees the
        // core freed under it (see `release_permit_slow`).
        let all_back = {
            let mut l = self.core.lock();
            self.core.raise(&mut l, DEAD);
            l.central == self.core.concurrency
        };
        if all_back {
            // Every permit is back and none can be taken any more (that
            // takes a `Shared`): the permits' reference goes now.
            // SAFETY: `pool` came from `Arc::into_raw` in `Shared::new`, and
            // only the party that sees the last permit back with `DEAD` set
            // releases it: this one, by the check above.
            unsafe { Arc::decrement_strong_count(self.pool.0.as_ptr()) };
        }
    }
}

impl Shared {
    pub(crate) fn new(
        concurrency: usize,
        capacity: usize,
        reject: bool,
        age_after: Duration,
        listener: Option<Listener>,
    ) -> Self {
        let core = Arc::new(Core::new(
            concurrency,
            capacity,
            reject,
            age_after,
            listener,
        ));
        let pool = Arc::into_raw(Arc::clone(&core));
        Self {
            core,
            pool: CorePtr(NonNull::new(pool.cast_mut()).expect("`Arc::into_raw` is never null")),
        }
    }

    /// Wraps a permit already taken from the count (or handed over).
    #[inline]
    pub(crate) fn permit(&self) -> Permit {
        Permit { core: self.pool }
    }

    /// The fast path: one compare-and-swap when a permit is free and nobody
    /// waits.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        self.try_take().then(|| self.permit())
    }
}

/// A service's own reference to the queue, shared with the places and
/// entries of its calls: cloning it touches a cache line that other callers
/// do not, where cloning the queue's `Arc` would pass that line between
/// cores on every queued request.
pub(crate) type Link = Arc<LocalRef>;

/// The target of a [`Link`]: cache-line aligned, so that two services'
/// references never share a line.
#[repr(align(128))]
pub(crate) struct LocalRef(pub(crate) Arc<Shared>);

impl std::ops::Deref for LocalRef {
    type Target = Shared;
    #[inline]
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl LocalRef {
    /// The slow admission path: a permit if one is free, else a place in the
    /// queue if there is room, else (reject mode) `Full`, else (wait mode) an
    /// entry in the list of callers waiting for a place.
    #[cold]
    pub(crate) fn admit_slow(this: &Link, waker: &Waker) -> Admission {
        let mut l = this.lock();
        if l.closed {
            return Admission::Closed;
        }
        if this.take_permit_only(&mut l) {
            // No waiter can exist while a permit is free, so this does not
            // overtake anyone.
            drop(l);
            return Admission::Permit(this.permit());
        }
        let mut s = this.places.load(Ordering::Acquire);
        loop {
            let (new, room) = if s / PLACE < this.capacity {
                (s + PLACE, true)
            } else if this.reject {
                return Admission::Full { depth: s / PLACE };
            } else {
                (s | PLACE_WAITERS, false)
            };
            match this
                .places
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if room => return Admission::Slot(Slot::new(Arc::clone(this))),
                Ok(_) => {
                    l.place_waiters = true;
                    break;
                }
                Err(actual) => s = actual,
            }
        }
        if this.take_permit_or_flag(&mut l) {
            this.after_change(&mut l);
            drop(l);
            return Admission::Permit(this.permit());
        }
        let now = Instant::now();
        let flag = new_flag();
        let idx = l.push(SLOT_LIST, 0, Some(waker.clone()), &flag);
        Admission::Waiting(Entry {
            shared: Arc::clone(this),
            idx,
            flag,
            priority: None,
            since: now,
        })
    }
}

/// A pointer to the core that does not keep it alive by itself: a permit's.
/// The core lives while any permit is out, because the permits share one
/// strong reference ([`Shared`]'s `pool`) that is released only once every
/// permit is back and no `Shared` is left.
#[derive(Clone, Copy)]
pub(crate) struct CorePtr(NonNull<Core>);

// SAFETY: `Core` is `Send + Sync`; `CorePtr` is a shared reference to it
// whose validity the permit protocol above guarantees.
unsafe impl Send for CorePtr {}
// SAFETY: as above.
unsafe impl Sync for CorePtr {}

/// A permit to call the inner service; returned (or handed to the next
/// waiter) on drop.
///
/// It holds no reference count of its own: taking and returning a permit is
/// one compare-and-swap each on this thread's permit word, and nothing else, so the
/// uncontended path costs what a semaphore's does without the semaphore's
/// `Arc` traffic.
pub(crate) struct Permit {
    core: CorePtr,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl Permit {
    /// The queue's core.
    #[inline]
    pub(crate) fn core(&self) -> &Core {
        // SAFETY: while this permit is out, the permits' strong reference is
        // held (see `CorePtr`).
        unsafe { self.core.0.as_ref() }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        let core = self.core();
        let state = &core.shards[core.here()];
        let mut s = state.load(Ordering::Relaxed);
        loop {
            if s & FLAGS != 0 {
                return release_permit_slow(self.core);
            }
            match state.compare_exchange_weak(s, s + ONE, Ordering::AcqRel, Ordering::Relaxed) {
                // The permit is back: the core must not be touched again.
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }
}

/// Returns a permit through the lock: it goes to the next waiter, or back to
/// the count (and, if it was the last one out after every `Shared` went, the
/// permits' reference is released).
#[cold]
fn release_permit_slow(ptr: CorePtr) {
    let mut wakes = Wakes::default();
    let last = {
        // SAFETY: the permit is still out, so the permits' reference keeps
        // the core alive until the lock is taken. Under the lock, handing the
        // permit on cannot free the core either: that takes `DEAD`, which is
        // set under the lock, or (with `DEAD` set) the last permit back,
        // which is this one. The core is not touched after the unlock.
        let core = unsafe { ptr.0.as_ref() };
        let mut l = core.lock();
        let last = core.release_permit_locked(&mut l, &mut wakes);
        core.after_change(&mut l);
        last
    };
    wakes.wake();
    if last {
        // SAFETY: the permits' reference, released once, by the party that
        // brought the last permit back after `DEAD` was set.
        unsafe { Arc::decrement_strong_count(ptr.0.as_ptr()) };
    }
}

/// A place in the queue, reserved by `poll_ready`; freed (or handed to a
/// caller waiting for one) on drop unless it was turned into an entry.
pub(crate) struct Slot {
    /// `None` once the place went into a wait list (see [`Slot::enqueue`]).
    shared: Option<Link>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Slot {
    /// Wraps a place already reserved (with [`Core::try_place`]).
    pub(crate) fn new(shared: Link) -> Self {
        Self {
            shared: Some(shared),
        }
    }

    /// Puts the request that holds this place into its priority list, unless
    /// a permit is free (then it takes the permit and the place is freed).
    pub(crate) fn enqueue(mut self, priority: Priority, since: Instant, waker: &Waker) -> Enqueued {
        let link = self
            .shared
            .take()
            .expect("a slot holds its link until enqueued");
        let q: &Shared = &link;
        let mut wakes = Wakes::default();
        let mut queued = false;
        // Made before the lock is taken, to keep the critical section short
        // (wasted in the rare case that a permit is free after all).
        let class = priority as u64;
        let vt = u64::try_from(since.saturating_duration_since(q.base).as_nanos())
            .unwrap_or(u64::MAX / 2)
            .saturating_add(class.saturating_mul(q.age_after));
        let flag = new_flag();
        let waker = waker.clone();
        let idx = {
            let mut l = q.lock();
            if l.drained_out {
                q.release_slot_locked(&mut l, &mut wakes);
                q.after_change(&mut l);
                None
            } else if q.take_permit_or_flag(&mut l) {
                q.release_slot_locked(&mut l, &mut wakes);
                q.after_change(&mut l);
                Some(None)
            } else {
                let idx = l.push(priority as usize, vt, Some(waker), &flag);
                // Counted here, under the lock already held, rather than
                // with one more atomic add.
                l.queued += 1;
                queued = true;
                Some(Some(idx))
            }
        };
        wakes.wake();
        if queued {
            // The depth is read only for someone who looks (tracing
            // evaluates its fields only when the event is enabled).
            tracing::debug!(
                priority = priority.as_str(),
                depth = q.depth(),
                "request queued"
            );
            if q.observed() {
                q.emit(QueueEventKind::Queued, Some(priority), q.depth(), None);
            }
        }
        match idx {
            None => {
                q.counters.add(Count::ShutOut);
                Enqueued::Closed
            }
            Some(None) => Enqueued::Permit(q.permit()),
            Some(Some(idx)) => Enqueued::Entry(Entry {
                shared: link,
                idx,
                flag,
                priority: Some(priority),
                since,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Link {
        self.shared
            .as_ref()
            .expect("a slot holds its link until enqueued")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release_place();
        }
    }
}

/// A node in a wait list, owned by the caller that waits. Dropping it
/// withdraws the request (a cancellation): the node leaves its list, its
/// place is freed, and anything it had been granted is passed on.
pub(crate) struct Entry {
    shared: Link,
    /// The node, while this entry waits (`NIL` once it took its grant).
    idx: u32,
    flag: Flag,
    /// `None` for a caller waiting for a place.
    priority: Option<Priority>,
    since: Instant,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl Entry {
    pub(crate) fn shared(&self) -> &Link {
        &self.shared
    }

    pub(crate) fn since(&self) -> Instant {
        self.since
    }

    /// Checks for a grant (without the lock when there is one); registers
    /// the task's waker otherwise.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Grant> {
        debug_assert!(self.idx != NIL, "entry polled after its grant");
        let mut state = NodeState::from_code(self.flag.load(Ordering::Acquire));
        if state == NodeState::Waiting {
            let mut l = self.shared.lock();
            // Settled nodes are settled under the lock: while the flag says
            // waiting, the node is still ours.
            state = NodeState::from_code(self.flag.load(Ordering::Acquire));
            if state == NodeState::Waiting {
                let n = &mut l.nodes[self.idx as usize];
                let stale = match &mut n.waker {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    slot => slot.replace(cx.waker().clone()),
                };
                // The replaced waker is dropped after the lock.
                drop(l);
                drop(stale);
                return Poll::Pending;
            }
        }
        self.idx = NIL;
        Poll::Ready(match state {
            NodeState::Permit => {
                if self.priority.is_some() {
                    // A queued request leaves the queue: its place frees.
                    self.shared.release_place();
                }
                Grant::Permit(self.shared.permit())
            }
            NodeState::Slot => Grant::Slot(Slot::new(Arc::clone(&self.shared))),
            _ => Grant::Closed,
        })
    }

    /// Withdraws the entry (a timeout or an expired deadline): like a drop,
    /// without the cancellation event. Returns whether it was still waiting
    /// (a grant that raced with the timer is passed on).
    pub(crate) fn withdraw(mut self) -> bool {
        self.remove() == Some(NodeState::Waiting)
    }

    fn remove(&mut self) -> Option<NodeState> {
        if self.idx == NIL {
            return None;
        }
        let idx = std::mem::replace(&mut self.idx, NIL);
        let mut wakes = Wakes::default();
        let mut stale = None;
        let state = {
            let mut l = self.shared.lock();
            let state = NodeState::from_code(self.flag.load(Ordering::Acquire));
            match state {
                NodeState::Waiting => {
                    let list = l.nodes[idx as usize].list as usize;
                    l.unlink(idx);
                    stale = l.release_node(idx);
                    if list != SLOT_LIST {
                        self.shared.release_slot_locked(&mut l, &mut wakes);
                    }
                }
                // Settled: the node is already free; pass the grant on.
                NodeState::Permit => {
                    // This entry holds a `Shared`: the permit cannot be the
                    // last one back after every `Shared` went.
                    let last = self.shared.release_permit_locked(&mut l, &mut wakes);
                    debug_assert!(!last);
                    if self.priority.is_some() {
                        // A queued entry still held its place.
                        self.shared.release_slot_locked(&mut l, &mut wakes);
                    }
                }
                NodeState::Slot => self.shared.release_slot_locked(&mut l, &mut wakes),
                NodeState::Closed | NodeState::Free => {}
            }
            self.shared.after_change(&mut l);
            state
        };
        drop(stale);
        wakes.wake();
        Some(state)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.remove() == Some(NodeState::Waiting) {
            if let Some(priority) = self.priority {
                self.shared.counters.add(Count::Cancelled);
                let waited = Instant::now().saturating_duration_since(self.since);
                tracing::debug!(
                    priority = priority.as_str(),
                    waited_ms = waited.as_millis() as u64,
                    "queued request cancelled by its caller"
                );
                self.shared
                    .emit(QueueEventKind::Cancelled, Some(priority), 0, Some(waited));
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn shared(concurrency: usize, capacity: usize, reject: bool) -> Link {
        Arc::new(LocalRef(Arc::new(Shared::new(
            concurrency,
            capacity,
            reject,
            Duration::from_secs(10),
            None,
        ))))
    }

    #[tokio::test(start_paused = true)]
    async fn permits_are_counted_and_returned() {
        let s = shared(2, 1, true);
        let a = s.try_acquire().unwrap();
        let b = s.try_acquire().unwrap();
        assert!(s.try_acquire().is_none());
        assert_eq!(s.free_permits(), 0);
        drop(a);
        assert_eq!(s.free_permits(), 1);
        drop(b);
        assert_eq!(s.free_permits(), 2);
        assert!(s.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_permit_goes_to_the_earliest_virtual_time() {
        let s = shared(1, 3, true);
        let p = s.try_acquire().unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut entries = Vec::new();
        for prio in [Priority::Low, Priority::Normal, Priority::High] {
            let Admission::Slot(slot) = LocalRef::admit_slow(&s, &waker) else {
                panic!("no slot")
            };
            let Enqueued::Entry(e) = slot.enqueue(prio, Instant::now(), &waker) else {
                panic!("not queued")
            };
            entries.push(e);
        }
        assert!(matches!(
            LocalRef::admit_slow(&s, &waker),
            Admission::Full { depth: 3 }
        ));
        drop(p);
        // High (the last one) got it.
        assert!(entries[0].poll(&mut cx).is_pending());
        assert!(entries[1].poll(&mut cx).is_pending());
        let Poll::Ready(Grant::Permit(p)) = entries[2].poll(&mut cx) else {
            panic!("high not served")
        };
        assert_eq!(s.depths().0, 2);
        drop(entries.remove(1)); // cancel Normal: its place frees
        assert_eq!(s.depths().0, 1);
        drop(p);
        let Poll::Ready(Grant::Permit(p)) = entries[0].poll(&mut cx) else {
            panic!("low not served")
        };
        drop(p);
        drop(entries);
        assert!(s.is_idle());
    }
}
