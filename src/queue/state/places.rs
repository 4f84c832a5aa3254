//! The place counter: places taken in the queue (reserved by `poll_ready`,
//! or held by a queued request), and the [`Slot`] that holds one.

use std::sync::atomic::Ordering;

use super::lists::{NodeState, NIL, SLOT_LIST};
use super::lock::Locked;
use super::{Core, Link};

/// The places word, on a cache line of its own:
///
/// ```text
///  63 (31 on 32-bit targets)       2   1               0
/// +----------------------------------+---------------+---------------+
/// |  places taken (word / PLACE):    | PLACES_CLOSED | PLACE_WAITERS |
/// |  reserved or queued requests     |               |               |
/// +----------------------------------+---------------+---------------+
/// ```
///
/// `PLACE_WAITERS`: callers wait in `poll_ready` for a place (mirrored in
/// `Lists::place_waiters`). `PLACES_CLOSED`: shutdown began. Both change
/// only under the lock; while both are clear a place is reserved (or, in
/// reject mode, refused) and given back with one compare-and-swap,
/// otherwise under the lock, where a freed place goes to the first caller
/// waiting for one (invariant 4).
pub(super) const PLACE_WAITERS: usize = 0b01;
pub(super) const PLACES_CLOSED: usize = 0b10;
pub(super) const PLACE: usize = 0b100;

/// A place in the queue, reserved by `poll_ready`; freed (or handed to a
/// caller waiting for one) on drop unless it was turned into an entry.
pub(crate) struct Slot {
    /// `None` once the place went into a wait list (see `Slot::enqueue`).
    pub(super) shared: Option<Link>,
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

impl Core {
    /// Hands a freed place in the queue to a caller waiting for one, else
    /// lowers the depth.
    pub(super) fn release_slot_locked(&self, l: &mut Locked<'_>) {
        if l.head[SLOT_LIST] != NIL && !l.closed {
            let i = l.head[SLOT_LIST];
            l.settle(i, NodeState::Slot);
        } else {
            self.places.fetch_sub(PLACE, Ordering::AcqRel);
        }
    }

    /// Frees a place: one compare-and-swap while nobody waits for a place
    /// and shutdown has not begun; otherwise under the lock, where the place
    /// goes to the first caller waiting for one.
    pub(crate) fn release_place(&self) {
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
        let mut l = self.locked();
        self.release_slot_locked(&mut l);
    }

    /// The fast place path, while nobody waits for a place and shutdown has
    /// not begun: `Ok` reserved a place (one compare-and-swap), `Err(depth)`
    /// found the queue full in reject mode. `None` sends the caller to
    /// `Shared::admit_slow`.
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

    /// Under the lock: a place if there is room (`Ok(true)`), else in wait
    /// mode the `PLACE_WAITERS` flag raised (`Ok(false)`), else in reject
    /// mode `Err(depth)`.
    pub(super) fn place_or_flag(&self, l: &mut Locked<'_>) -> Result<bool, usize> {
        let mut s = self.places.load(Ordering::Acquire);
        loop {
            let (new, room) = if s / PLACE < self.capacity {
                (s + PLACE, true)
            } else if self.reject {
                return Err(s / PLACE);
            } else {
                (s | PLACE_WAITERS, false)
            };
            match self
                .places
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if !room {
                        l.place_waiters = true;
                    }
                    return Ok(room);
                }
                Err(actual) => s = actual,
            }
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.places.load(Ordering::Acquire) / PLACE
    }
}
