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

/// A node's state, as its owner reads it from its [`Chunk`] byte.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum NodeState {
    /// Not in use, and its last owner is done with it.
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

/// How many node flags share one [`Chunk`].
#[cfg(not(all(loom, test)))]
pub(super) const CHUNK: usize = 64;
/// Small chunks under loom, so that the models stay small.
#[cfg(all(loom, test))]
pub(super) const CHUNK: usize = 4;

/// What an entry's owner reads without the lock: its node's state, one byte
/// in a chunk of [`CHUNK`] nodes' bytes (node `i` is byte `i % CHUNK` of
/// chunk `i / CHUNK`), each holding a [`NodeState`] code,
///
/// ```text
///  7                                    0
/// +--------------------------------------+
/// |  NodeState (Free, Waiting, Permit,   |
/// |  Slot, Closed)                       |
/// +--------------------------------------+
/// ```
///
/// `Free` to `Waiting` when the node is handed to an entry (under the
/// lock), `Waiting` to the outcome by whoever settles the node (under the
/// lock), and the outcome back to `Free` by the owner once it has read it
/// (its acknowledgement: from then on the node may be reused). An entry
/// holds an `Arc` of its node's chunk, so that the byte lives as long as
/// the entry does; the chunks are made as the arena grows and never
/// freed before the queue, so that a queued request allocates nothing.
pub(super) type Chunk = [AtomicU8; CHUNK];

fn new_chunk() -> Arc<Chunk> {
    Arc::new(std::array::from_fn(|_| {
        AtomicU8::new(NodeState::Free.code())
    }))
}

/// Reads a node's state, with the grant's writes visible (acquire).
#[inline]
pub(super) fn state_of(chunk: &Chunk, idx: u32) -> NodeState {
    NodeState::from_code(chunk[idx as usize % CHUNK].load(Ordering::Acquire))
}

/// The owner read its outcome (or removed its node): the node may be
/// reused.
#[inline]
pub(super) fn acknowledge(chunk: &Chunk, idx: u32) {
    chunk[idx as usize % CHUNK].store(NodeState::Free.code(), Ordering::Release);
}

#[derive(Debug)]
pub(super) struct Node {
    prev: u32,
    next: u32,
    pub(super) list: u8,
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
    /// The nodes' state bytes, [`CHUNK`] nodes to a chunk.
    chunks: Vec<Arc<Chunk>>,
    /// Free nodes, reused oldest first and only once the entry a node was
    /// settled for has read its outcome (so the arena holds at most about
    /// twice the most requests that ever waited at once).
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
            chunks: Vec::new(),
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

    /// Appends a node to `list`; returns its index and the chunk holding
    /// the state byte its entry reads.
    pub(super) fn push(&mut self, list: usize, vt: u64, waker: Waker) -> (u32, Arc<Chunk>) {
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
                let i = self.nodes.len();
                if i.is_multiple_of(CHUNK) {
                    self.chunks.push(new_chunk());
                }
                self.nodes.push(Node {
                    prev,
                    next: NIL,
                    list: list as u8,
                    waker: Some(waker),
                    vt,
                });
                self.set(i as u32, NodeState::Waiting, Ordering::Relaxed);
                i as u32
            }
        };
        match self.tail[list] {
            NIL => self.head[list] = idx,
            t => self.nodes[t as usize].next = idx,
        }
        self.tail[list] = idx;
        self.len[list] += 1;
        (idx, Arc::clone(&self.chunks[idx as usize / CHUNK]))
    }

    /// Writes a node's state byte (under the lock).
    #[inline]
    fn set(&self, idx: u32, state: NodeState, order: Ordering) {
        self.chunks[idx as usize / CHUNK][idx as usize % CHUNK].store(state.code(), order);
    }

    /// A free node whose last owner has read its outcome (made `Waiting`
    /// for the next one): the oldest, which usually is.
    #[inline]
    fn reusable(&mut self) -> Option<u32> {
        let &i = self.free.front()?;
        if state_of(&self.chunks[i as usize / CHUNK], i) == NodeState::Free {
            // Acquire above: the last owner is done; the next one takes the
            // node through the lock.
            self.free.pop_front();
            self.set(i, NodeState::Waiting, Ordering::Relaxed);
            return Some(i);
        }
        self.reusable_later()
    }

    /// The oldest free node's owner has not read its outcome yet: looks at
    /// a few more.
    #[cold]
    fn reusable_later(&mut self) -> Option<u32> {
        for _ in 0..self.free.len().min(4) {
            let i = self.free.pop_front()?;
            if state_of(&self.chunks[i as usize / CHUNK], i) == NodeState::Free {
                self.set(i, NodeState::Waiting, Ordering::Relaxed);
                return Some(i);
            }
            self.free.push_back(i);
        }
        None
    }

    #[inline]
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

    /// Frees an unlinked node, telling its owner `state` through its state
    /// byte (`None` when the owner itself removes it: then the node is
    /// free at once). Returns its waker, for the caller to wake or drop
    /// after the lock is released (either can run a task's code).
    #[must_use]
    #[inline]
    pub(super) fn release_node(&mut self, idx: u32, state: Option<NodeState>) -> Option<Waker> {
        self.set(idx, state.unwrap_or(NodeState::Free), Ordering::Release);
        let waker = self.nodes[idx as usize].waker.take();
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
