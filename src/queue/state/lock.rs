//! The lock-and-wake sequence, written once: [`Locked`] holds the lock on
//! the wait lists, collects the wakers to wake and the wakers to drop, and
//! on drop restores the flags that mirror the lists (invariants 3 and 4 in
//! [`state`](super)), unlocks, and only then wakes and drops the wakers
//! (invariant 8: no task code under the lock).

use std::ops::{Deref, DerefMut};
use std::sync::PoisonError;
use std::task::Waker;

use super::lists::{Lists, NodeState};
use super::sync::MutexGuard;
use super::Core;

/// Wakers collected under the lock, woken (or just dropped) after it is
/// released. A critical section settles one node, rarely more: the first
/// waker to wake and the first to drop stay inline, so that a handoff does
/// not allocate, and nothing is moved or zeroed on the way out.
#[derive(Default)]
struct Wakes {
    wake: Option<Waker>,
    /// Wakers replaced or freed, to be dropped (dropping one can cancel
    /// another queued call, which takes the lock).
    stale: Option<Waker>,
    /// The rest (shutdown settles every node at once), woken; a stale one
    /// that lands here is woken rather than dropped under the lock (a
    /// spurious wake-up is harmless).
    more: Vec<Waker>,
}

impl Wakes {
    fn push(&mut self, w: Option<Waker>) {
        let Some(w) = w else { return };
        if self.wake.is_none() {
            self.wake = Some(w);
        } else {
            self.more.push(w);
        }
    }

    fn discard(&mut self, w: Option<Waker>) {
        let Some(w) = w else { return };
        if self.stale.is_none() {
            self.stale = Some(w);
        } else {
            self.more.push(w);
        }
    }
}

/// The lock on a queue's wait lists, from [`Core::locked`]. Dereferences to
/// the [`Lists`].
pub(crate) struct Locked<'a> {
    core: &'a Core,
    lists: Option<MutexGuard<'a, Lists>>,
    wakes: Wakes,
}

impl Core {
    /// Takes the lock for a change: see [`Locked`].
    pub(super) fn locked(&self) -> Locked<'_> {
        Locked {
            core: self,
            lists: Some(self.lock()),
            wakes: Wakes::default(),
        }
    }

    /// Turns a plain guard (taken for a critical section that usually wakes
    /// nobody) into a [`Locked`], for the branch that may.
    pub(super) fn locked_from<'a>(&'a self, guard: MutexGuard<'a, Lists>) -> Locked<'a> {
        Locked {
            core: self,
            lists: Some(guard),
            wakes: Wakes::default(),
        }
    }

    /// Takes the lock to read.
    pub(super) fn lock(&self) -> MutexGuard<'_, Lists> {
        // Nothing that can panic runs under the lock; recover anyway.
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Locked<'_> {
    /// Unlinks a node, tells its owner `state`, and wakes it after the
    /// unlock.
    pub(super) fn settle(&mut self, idx: u32, state: NodeState) {
        self.unlink(idx);
        let waker = self.release_node(idx, Some(state));
        self.wakes.push(waker);
    }

    /// Drops a waker after the unlock.
    pub(super) fn discard(&mut self, waker: Option<Waker>) {
        self.wakes.discard(waker);
    }
}

impl Deref for Locked<'_> {
    type Target = Lists;
    #[inline]
    fn deref(&self) -> &Lists {
        self.lists.as_ref().expect("locked until dropped")
    }
}

impl DerefMut for Locked<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Lists {
        self.lists.as_mut().expect("locked until dropped")
    }
}

impl Drop for Locked<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(mut lists) = self.lists.take() {
            self.core.after_change(&mut lists);
        }
        // Unlocked. The stale waker is dropped with `self`, after this.
        if let Some(w) = self.wakes.wake.take() {
            w.wake();
        }
        if !self.wakes.more.is_empty() {
            self.wakes.more.drain(..).for_each(Waker::wake);
        }
    }
}
