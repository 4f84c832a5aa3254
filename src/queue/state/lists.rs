//! The wait lists: one FIFO list per priority and one for callers waiting
//! for a place, linked by index over one node arena, only ever touched under
//! the lock (see [`Locked`](super::lock::Locked)).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::task::Waker;

use super::sync::{Arc, AtomicU8};

pub(super) const NIL: u32 = u32::MAX;
/// Lists 0..3 hold queued requests by priority (High, Normal, Low); list 3
/// holds callers waiting in `poll_ready` for a place in the queue.
pub(super) const SLOT_LIST: usize = 3;
const LISTS: usize = 4;

/// A node's state, as its owner reads it from the [`Flag`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum NodeState {
    Free = 0,
    Waiting,
    /// Granted a permit (handed over, not taken from the count).
    Permit,
    /// Granted a place in the queue (place waiters only).
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

/// What an entry's owner reads without the lock: its node's state, one byte
/// holding a [`NodeState`] code,
///
/// ```text
///  7                                    0
/// +--------------------------------------+
/// |  NodeState (Waiting, Permit, Slot,   |
/// |  Closed; Free never stored)          |
/// +--------------------------------------+
/// ```
///
/// written once, `Waiting` to the outcome, by whoever settles the node
/// (under the lock). Shared by the entry and its node (an `Arc`), so that
/// it lives as long as either does. A node keeps its flag when it is freed,
/// and reuses it for its next entry if the last one has let go of it (the
/// `Arc` is unique again), so that a queued request allocates no flag.
#[derive(Debug)]
pub(super) struct Flag(Arc<AtomicU8>);

impl Flag {
    fn new() -> Self {
        Self(Arc::new(AtomicU8::new(NodeState::Waiting.code())))
    }

    fn share(&self) -> Self {
        Self(Arc::clone(&self.0))
    }

    /// Makes this flag read `Waiting` for a new entry if nobody else holds
    /// it (an entry that has not yet read its outcome still may); returns
    /// whether it did.
    fn renew(&mut self) -> bool {
        if Arc::get_mut(&mut self.0).is_none() {
            return false;
        }
        // Unique (checked with acquire ordering): the previous owner is done.
        self.0.store(NodeState::Waiting.code(), Ordering::Relaxed);
        true
    }

    /// The state, with the grant's writes visible (acquire).
    pub(super) fn get(&self) -> NodeState {
        NodeState::from_code(self.0.load(Ordering::Acquire))
    }

    fn set(&self, state: NodeState) {
        self.0.store(state.code(), Ordering::Release);
    }
}

#[derive(Debug)]
pub(super) struct Node {
    prev: u32,
    next: u32,
    pub(super) list: u8,
    /// Its entry's flag (kept for the next entry once the node is freed).
    flag: Flag,
    pub(super) waker: Option<Waker>,
    /// Virtual time: the earliest wins. Enqueue time plus the class offset.
    vt: u64,
}

/// The wait lists, over one node arena (nodes are reused; the arena never
/// grows beyond the most requests that ever waited at once), and the rest
/// of what the lock guards.
#[derive(Debug)]
pub(crate) struct Lists {
    pub(super) nodes: Vec<Node>,
    /// Free nodes, reused oldest first and only once the entry a node was
    /// settled for has let go of its flag, which the next entry then reuses
    /// (so the arena holds at most about twice the most requests that ever
    /// waited at once).
    free: VecDeque<u32>,
    pub(super) head: [u32; LISTS],
    tail: [u32; LISTS],
    pub(super) len: [usize; LISTS],
    pub(super) closed: bool,
    /// The shutdown drain timed out: what was still queued was failed and
    /// nothing more is enqueued.
    pub(super) drained_out: bool,
    /// Requests that were ever queued (for `QueueStats`).
    pub(super) queued: u64,
    /// Whether `PLACE_WAITERS` is set in the places word (set and cleared
    /// only under the lock): read here instead of on that busy cache line.
    pub(super) place_waiters: bool,
    /// The flags set on every permit shard (changed only here, under the
    /// lock).
    pub(super) flags: usize,
    /// Free permits in the lock's keeping: while a flag is set, permits are
    /// not put back on the shards.
    pub(super) central: usize,
}

impl Lists {
    pub(super) fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: VecDeque::new(),
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

    pub(super) fn all_empty(&self) -> bool {
        self.len.iter().all(|&n| n == 0)
    }

    /// Appends a node to `list`; returns its index and the flag its entry
    /// reads.
    pub(super) fn push(&mut self, list: usize, vt: u64, waker: Waker) -> (u32, Flag) {
        let prev = self.tail[list];
        let idx = match self.reusable() {
            Some(i) => {
                let n = &mut self.nodes[i as usize];
                n.prev = prev;
                n.next = NIL;
                n.list = list as u8;
                n.waker = Some(waker);
                n.vt = vt;
                i
            }
            None => {
                if self.nodes.len() == self.nodes.capacity() {
                    // Grow by a quarter rather than double: at most a
                    // quarter of the arena's memory is ever unused.
                    self.nodes.reserve_exact(self.nodes.len() / 4 + 8);
                }
                self.nodes.push(Node {
                    prev,
                    next: NIL,
                    list: list as u8,
                    flag: Flag::new(),
                    waker: Some(waker),
                    vt,
                });
                (self.nodes.len() - 1) as u32
            }
        };
        match self.tail[list] {
            NIL => self.head[list] = idx,
            t => self.nodes[t as usize].next = idx,
        }
        self.tail[list] = idx;
        self.len[list] += 1;
        (idx, self.nodes[idx as usize].flag.share())
    }

    /// A free node whose flag is back in the arena's hands alone (renewed
    /// to `Waiting`), looking at a few of the oldest.
    fn reusable(&mut self) -> Option<u32> {
        for _ in 0..self.free.len().min(4) {
            let i = self.free.pop_front()?;
            if self.nodes[i as usize].flag.renew() {
                return Some(i);
            }
            self.free.push_back(i);
        }
        None
    }

    pub(super) fn unlink(&mut self, idx: u32) {
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

    /// Frees an unlinked node, first telling its owner `state` through the
    /// flag (`None` when the owner itself removes it). Returns its waker,
    /// for the caller to wake or drop after the lock is released (either
    /// can run a task's code).
    #[must_use]
    pub(super) fn release_node(&mut self, idx: u32, state: Option<NodeState>) -> Option<Waker> {
        let n = &mut self.nodes[idx as usize];
        if let Some(state) = state {
            n.flag.set(state);
        }
        let waker = n.waker.take();
        self.free.push_back(idx);
        waker
    }

    /// The queued request to serve next: the smallest virtual time among the
    /// heads of the three priority lists (each list is FIFO, so its head has
    /// its smallest virtual time).
    pub(super) fn pick(&self) -> Option<u32> {
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
