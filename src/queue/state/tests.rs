//! Unit tests of the shared state, on its own API.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::queue::Priority;

fn shared(concurrency: usize, capacity: usize, reject: bool) -> Shared {
    Shared::named(
        concurrency,
        capacity,
        reject,
        Duration::from_secs(10),
        None,
        std::borrow::Cow::Borrowed("test"),
    )
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
        let Admission::Slot(slot) = s.admit_slow(&waker) else {
            panic!("no slot")
        };
        let Enqueued::Entry(e) = slot.enqueue(prio, Instant::now(), &waker) else {
            panic!("not queued")
        };
        entries.push(e);
    }
    assert!(matches!(s.admit_slow(&waker), Admission::Full { depth: 3 }));
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

/// Polls an entry that must have been granted a permit.
fn granted(e: &mut Entry, cx: &mut Context<'_>) -> Permit {
    match e.poll(cx) {
        Poll::Ready(Grant::Permit(p)) => p,
        _ => panic!("no permit granted"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_start_time_one_class_is_served_in_arrival_order() {
    let s = shared(1, 3, true);
    let p = s.try_acquire().unwrap();
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut entries: Vec<Entry> = (0..3)
        .map(|_| {
            let Admission::Slot(slot) = s.admit_slow(&waker) else {
                panic!("no slot")
            };
            let Enqueued::Entry(e) = slot.enqueue(Priority::Normal, None, &waker) else {
                panic!("not queued")
            };
            e
        })
        .collect();
    let mut held = p;
    for i in 0..3 {
        drop(held);
        for later in &mut entries[i + 1..] {
            assert!(later.poll(&mut cx).is_pending(), "served out of order");
        }
        held = granted(&mut entries[i], &mut cx);
    }
    drop(held);
    drop(entries);
    assert!(s.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_node_is_reused_only_once_its_owner_read_its_grant() {
    let s = shared(1, 3, true);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let enqueue = || {
        let Admission::Slot(slot) = s.admit_slow(&waker) else {
            panic!("no slot")
        };
        let Enqueued::Entry(e) = slot.enqueue(Priority::Normal, None, &waker) else {
            panic!("not queued")
        };
        e
    };
    let p = s.try_acquire().unwrap();
    let mut first = enqueue();
    drop(p); // `first` is granted, but has not looked yet
    let mut second = enqueue();
    assert_eq!(s.lock().nodes.len(), 2, "a granted node was reused unread");
    let p = granted(&mut first, &mut cx);
    drop(p); // `second` is granted; `first`'s node is free and read
    let mut third = enqueue();
    assert_eq!(s.lock().nodes.len(), 2, "a read node was not reused");
    let p = granted(&mut second, &mut cx);
    drop(p);
    let p = granted(&mut third, &mut cx);
    drop(p);
    drop((first, second, third));
    assert!(s.is_idle());
}
