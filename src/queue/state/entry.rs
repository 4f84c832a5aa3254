//! A request's place in a wait list: the slow admission that puts a caller
//! in the list of those waiting for a place, the enqueueing that puts a
//! request in its priority's list, and the [`Entry`] its owner polls for a
//! grant and drops to withdraw.

use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

use super::counters::Count;
use super::lists::{acknowledge, state_of, Chunk, NodeState, NIL, SLOT_LIST};
use super::permits::Permit;
use super::places::Slot;
use super::sync::Arc;
use super::{Core, Link, Priority, QueueEventKind, Shared};

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

impl Shared {
    /// The slow admission path: a permit if one is free, else a place in the
    /// queue if there is room, else (reject mode) `Full`, else (wait mode) an
    /// entry in the list of callers waiting for a place.
    #[cold]
    pub(crate) fn admit_slow(&self, waker: &Waker) -> Admission {
        let this = self;
        let mut l = this.locked();
        if l.closed {
            return Admission::Closed;
        }
        if this.take_permit_only(&mut l) {
            // No waiter can exist while a permit is free, so this does not
            // overtake anyone.
            return Admission::Permit(this.permit());
        }
        match this.place_or_flag(&mut l) {
            Err(depth) => return Admission::Full { depth },
            Ok(true) => return Admission::Slot(Slot::new(this.link())),
            Ok(false) => {}
        }
        if this.take_permit_or_flag(&mut l) {
            return Admission::Permit(this.permit());
        }
        let (idx, chunk) = l.push(SLOT_LIST, 0, waker.clone());
        drop(l);
        Admission::Waiting(Entry {
            shared: Some(this.link()),
            chunk,
            idx,
            priority: None,
            since: Some(Instant::now()),
        })
    }
}

impl Slot {
    /// Puts the request that holds this place into its priority list, unless
    /// a permit is free (then it takes the permit and the place is freed).
    /// `since`, when the wait began, gives the aging order; a queue whose
    /// requests all have one class passes `None` (one list: the order is
    /// the arrival order, and no clock needs reading).
    pub(crate) fn enqueue(
        mut self,
        priority: Priority,
        since: impl Into<Option<Instant>>,
        waker: &Waker,
    ) -> Enqueued {
        let since = since.into();
        let link = self
            .shared
            .take()
            .expect("a slot holds its link until enqueued");
        let q: &Core = &link;
        // Made before the lock is taken, to keep the critical section short
        // (wasted in the rare case that a permit is free after all).
        let class = priority as u64;
        let vt = since
            .map_or(0, |s| {
                u64::try_from(s.saturating_duration_since(q.base).as_nanos())
                    .unwrap_or(u64::MAX / 2)
            })
            .saturating_add(class.saturating_mul(q.age_after));
        let waker = waker.clone();
        let queued = {
            // A plain guard: the common case only adds a node (no waker to
            // wake or drop, no flag to restore: a list is non-empty after
            // it); the others go through `Locked`.
            let mut l = q.lock();
            if l.drained_out {
                q.release_slot_locked(&mut q.locked_from(l));
                None
            } else if q.take_permit_or_flag(&mut l) {
                q.release_slot_locked(&mut q.locked_from(l));
                Some(None)
            } else {
                let entry = l.push(priority as usize, vt, waker);
                // Counted here, under the lock already held, rather than
                // with one more atomic add.
                l.queued += 1;
                Some(Some(entry))
            }
        };
        match queued {
            None => {
                q.counters.add(Count::ShutOut);
                Enqueued::Closed
            }
            Some(None) => Enqueued::Permit(Permit::new(link)),
            Some(Some((idx, chunk))) => {
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
                Enqueued::Entry(Entry {
                    shared: Some(link),
                    chunk,
                    idx,
                    priority: Some(priority),
                    since,
                })
            }
        }
    }
}

/// A node in a wait list, owned by the caller that waits. Dropping it
/// withdraws the request (a cancellation): the node leaves its list, its
/// place is freed, and anything it had been granted is passed on.
pub(crate) struct Entry {
    /// Its reference to the queue, until it goes to the grant.
    shared: Option<Link>,
    /// The chunk holding its node's state byte.
    chunk: Arc<Chunk>,
    /// The node, until this entry has read its outcome (`NIL` after).
    idx: u32,
    /// `None` for a caller waiting for a place.
    priority: Option<Priority>,
    /// When the wait began, if the clock was read for it.
    since: Option<Instant>,
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
        self.shared
            .as_ref()
            .expect("an entry keeps its link until it takes its grant")
    }

    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
    }

    fn take_link(&mut self) -> Link {
        self.shared
            .take()
            .expect("an entry keeps its link until it takes its grant")
    }

    /// Checks for a grant (without the lock when there is one); registers
    /// the task's waker otherwise.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Grant> {
        debug_assert!(self.idx != NIL, "entry polled after its grant");
        let mut state = state_of(&self.chunk, self.idx);
        if state == NodeState::Waiting {
            let mut l = self.shared().locked();
            // Nodes are settled under the lock (invariant 5): while the flag
            // says waiting, the node is still ours.
            state = state_of(&self.chunk, self.idx);
            if state == NodeState::Waiting {
                let n = &mut l.nodes[self.idx as usize];
                let stale = match &mut n.waker {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    slot => slot.replace(cx.waker().clone()),
                };
                l.discard(stale);
                return Poll::Pending;
            }
        }
        acknowledge(&self.chunk, self.idx);
        self.idx = NIL;
        Poll::Ready(match state {
            NodeState::Permit => {
                if self.priority.is_some() {
                    // A queued request leaves the queue: its place frees
                    // (invariant 6).
                    self.shared().release_place();
                }
                // The entry's reference goes to the grant.
                Grant::Permit(Permit::new(self.take_link()))
            }
            NodeState::Slot => Grant::Slot(Slot::new(self.take_link())),
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
        let q: &Core = self.shared();
        let mut l = q.locked();
        let state = state_of(&self.chunk, idx);
        if state != NodeState::Waiting {
            acknowledge(&self.chunk, idx);
        }
        match state {
            NodeState::Waiting => {
                let list = l.nodes[idx as usize].list as usize;
                l.unlink(idx);
                let stale = l.release_node(idx, None);
                l.discard(stale);
                if list != SLOT_LIST {
                    q.release_slot_locked(&mut l);
                }
            }
            // Settled: the node is already free; pass the grant on.
            NodeState::Permit => {
                q.release_permit_locked(&mut l);
                if self.priority.is_some() {
                    // A queued entry still held its place.
                    q.release_slot_locked(&mut l);
                }
            }
            NodeState::Slot => q.release_slot_locked(&mut l),
            NodeState::Closed | NodeState::Free => {}
        }
        Some(state)
    }
}

impl Drop for Entry {
    #[inline]
    fn drop(&mut self) {
        if self.idx == NIL {
            // It took its grant (or was withdrawn): nothing to undo.
            return;
        }
        if self.remove() == Some(NodeState::Waiting) {
            if let Some(priority) = self.priority {
                let shared = self.shared();
                shared.counters.add(Count::Cancelled);
                let waited = self
                    .since
                    .map(|s| Instant::now().saturating_duration_since(s));
                tracing::debug!(
                    priority = priority.as_str(),
                    waited_ms = waited.map(|w| w.as_millis() as u64),
                    "queued request cancelled by its caller"
                );
                shared.emit(QueueEventKind::Cancelled, Some(priority), 0, waited);
            }
        }
    }
}
