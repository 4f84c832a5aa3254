//! loom models of the queue's permit protocol: the permit word's fast
//! paths, the handoff to a waiter under the lock, cancellation racing a
//! grant, and the core's lifetime (a permit keeps the core alive through its
//! thread's reference stripe; the core is freed by whoever drops the last
//! reference, a `Shared` or a permit, exactly once).
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release --test queue_loom`
//!
//! `src/queue/state/` is compiled into this test crate from its source
//! files, where `src/queue/sync.rs` picks loom's atomics, lock and `Arc`
//! (`cfg(all(loom, test))`): loom checks the real code. loom's `Arc` panics
//! on a double release and reports an `Arc` never released, so every model
//! below also checks that the core is freed exactly once.
#![cfg(loom)]
#![allow(dead_code, unreachable_pub)]

// `state/` reaches its siblings as `super::event`, `super::sync` and
// `super::Priority`.
pub(crate) use llm_resilience::queue::Priority;
#[path = "../src/queue/event.rs"]
mod event;
#[path = "../src/queue/state/mod.rs"]
mod state;
#[path = "../src/queue/sync.rs"]
mod sync;

use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::noop_waker;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use state::{Enqueued, Entry, Grant, Shared, Slot};
use tokio::time::Instant;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn queue(concurrency: usize, capacity: usize) -> Arc<Shared> {
    Arc::new(Shared::named(
        concurrency,
        capacity,
        false,
        Duration::from_secs(10),
        None,
        std::borrow::Cow::Borrowed("loom"),
    ))
}

/// A request queued behind the permits: a place, then a list entry.
fn queued(link: &Shared) -> Entry {
    let waker = noop_waker();
    assert_eq!(link.try_place(), Some(Ok(())), "no place in the queue");
    let slot = Slot::new(link.link());
    match slot.enqueue(Priority::Normal, Instant::now(), &waker) {
        Enqueued::Entry(e) => e,
        _ => panic!("a permit was free"),
    }
}

/// Spins (yielding to loom) until the entry is granted a permit, then
/// returns it at once.
fn take_grant(mut entry: Entry) {
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    loop {
        match entry.poll(&mut cx) {
            Poll::Ready(Grant::Permit(p)) => {
                drop(p);
                return;
            }
            Poll::Ready(_) => panic!("a queued entry is only granted a permit"),
            Poll::Pending => thread::yield_now(),
        }
    }
}

/// Two callers race for one permit on the fast path: never both in.
#[test]
fn the_fast_path_never_grants_more_than_the_concurrency() {
    model(|| {
        let link = queue(1, 1);
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let link = Arc::clone(&link);
                let inside = Arc::clone(&inside);
                thread::spawn(move || {
                    if let Some(p) = link.try_acquire() {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(p);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(link.free_permits(), 1);
        assert!(link.is_idle());
    });
}

/// The last `Shared` goes while two permits are still out, returned on two
/// threads: the core is freed once, by whichever comes last.
#[test]
fn the_core_outlives_the_last_shared_until_the_last_permit_is_back() {
    model(|| {
        let link = queue(2, 1);
        let a = link.try_acquire().unwrap();
        let b = link.try_acquire().unwrap();
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        drop(link);
        ta.join().unwrap();
        tb.join().unwrap();
    });
}

/// A permit is handed to a waiter under the lock while the waiter's thread
/// takes it, returns it and drops the last reference to the queue: the
/// release never touches a freed core, and the core is freed once.
#[test]
fn a_handoff_races_the_waiter_dropping_everything() {
    model(|| {
        let link = queue(1, 1);
        let p = link.try_acquire().unwrap();
        let entry = queued(&link);
        assert!(link.try_acquire().is_none());
        drop(link);
        let releaser = thread::spawn(move || drop(p));
        let waiter = thread::spawn(move || take_grant(entry));
        releaser.join().unwrap();
        waiter.join().unwrap();
    });
}

/// A waiter cancels (drops its entry) while the permit is released: either
/// it was still waiting and leaves, or it was granted and passes the permit
/// back. Either way every permit and place is back.
#[test]
fn a_cancellation_racing_a_grant_loses_nothing() {
    model(|| {
        let link = queue(1, 1);
        let p = link.try_acquire().unwrap();
        let entry = queued(&link);
        let releaser = thread::spawn(move || drop(p));
        let canceller = thread::spawn(move || drop(entry));
        releaser.join().unwrap();
        canceller.join().unwrap();
        assert_eq!(link.free_permits(), 1);
        assert_eq!(link.depths().0, 0);
        assert!(link.is_idle());
        // The permit went back to the count, not to a vanished waiter.
        assert!(link.try_acquire().is_some());
    });
}

/// A newcomer on the fast path races a release that must go to a waiter:
/// the newcomer never overtakes it, and both end up served.
#[test]
fn a_newcomer_never_overtakes_a_waiter() {
    model(|| {
        let link = queue(1, 2);
        let p = link.try_acquire().unwrap();
        let entry = queued(&link);
        let newcomer = {
            let link = Arc::clone(&link);
            thread::spawn(move || link.try_acquire().map(drop).is_some())
        };
        let releaser = thread::spawn(move || drop(p));
        let overtook = newcomer.join().unwrap();
        releaser.join().unwrap();
        assert!(!overtook, "a newcomer took the permit a waiter was owed");
        take_grant(entry);
        assert!(link.is_idle());
    });
}

/// Two permits come back at once, on two threads, to two waiters: each
/// waiter is granted exactly one, and the count is whole at the end.
#[test]
fn two_releases_serve_two_waiters() {
    model(|| {
        let link = queue(2, 2);
        let a = link.try_acquire().unwrap();
        let b = link.try_acquire().unwrap();
        let first = queued(&link);
        let second = queued(&link);
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(link.free_permits(), 0, "both permits went to the waiters");
        take_grant(first);
        take_grant(second);
        assert_eq!(link.free_permits(), 2);
        assert!(link.is_idle());
    });
}

/// A permit comes back on the fast path while a newcomer queues (raising
/// `WAITERS`, which moves the shards' free permits under the lock): the
/// newcomer either takes that permit at once or is granted it, never
/// neither.
#[test]
fn a_release_racing_the_first_waiter_is_never_lost() {
    model(|| {
        let link = queue(1, 1);
        let p = link.try_acquire().unwrap();
        let releaser = thread::spawn(move || drop(p));
        let waker = noop_waker();
        // As `poll_admit` does: a free permit, else a place.
        let slot = match link.try_acquire() {
            Some(p) => {
                drop(p);
                None
            }
            None => {
                assert_eq!(link.try_place(), Some(Ok(())), "no place in the queue");
                Some(Slot::new(link.link()))
            }
        };
        if let Some(slot) = slot {
            match slot.enqueue(Priority::Normal, Instant::now(), &waker) {
                Enqueued::Entry(e) => take_grant(e),
                Enqueued::Permit(p) => drop(p),
                Enqueued::Closed => panic!("not closed"),
            }
        }
        releaser.join().unwrap();
        assert_eq!(link.free_permits(), 1);
        assert!(link.is_idle());
    });
}

/// Shutdown begins (raising `CLOSED`, which moves the free permits under the
/// lock) while a permit comes back and a request waits: the waiter is still
/// served, nothing new is admitted, and every permit ends up free.
#[test]
fn closing_while_a_permit_comes_back_still_serves_the_waiter() {
    model(|| {
        let link = queue(2, 2);
        let a = link.try_acquire().unwrap();
        let b = link.try_acquire().unwrap();
        let entry = queued(&link);
        let closer = {
            let link = Arc::clone(&link);
            thread::spawn(move || link.close())
        };
        let releaser = thread::spawn(move || drop(a));
        closer.join().unwrap();
        releaser.join().unwrap();
        assert!(link.is_closed());
        assert!(link.try_acquire().is_none(), "admitted after close");
        take_grant(entry);
        drop(b);
        assert_eq!(link.free_permits(), 2);
        assert!(link.is_idle());
    });
}

/// A node freed by a grant is reused for a newcomer while the entry it was
/// settled for reads its outcome: the flag is reused only once that entry
/// has let go of it, so the old entry still sees its grant and the newcomer
/// is served too.
#[test]
fn a_reused_node_never_changes_a_settled_entry_s_outcome() {
    model(|| {
        let link = queue(1, 2);
        let p = link.try_acquire().unwrap();
        let first = queued(&link);
        // Settles `first` (a permit) and frees its node.
        drop(p);
        let newcomer = {
            let link = Arc::clone(&link);
            thread::spawn(move || {
                let waker = noop_waker();
                assert_eq!(link.try_place(), Some(Ok(())), "no place in the queue");
                match Slot::new(link.link()).enqueue(Priority::Normal, Instant::now(), &waker) {
                    Enqueued::Entry(e) => take_grant(e),
                    Enqueued::Permit(p) => drop(p),
                    Enqueued::Closed => panic!("not closed"),
                }
            })
        };
        take_grant(first);
        newcomer.join().unwrap();
        assert_eq!(link.free_permits(), 1);
        assert!(link.is_idle());
    });
}
