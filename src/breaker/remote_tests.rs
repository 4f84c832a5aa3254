//! The coordination's hooks on one breaker, on the paused tokio clock: the
//! gate at the end of an open period, the shared trip and close, and that
//! a disconnected link leaves the breaker local.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc as StdArc;
use std::time::Duration;

use super::{Link, PROBE_DECISION_WAIT};
use crate::breaker::{BreakerHandle, CircuitBreakerLayer, State};

const OPEN: Duration = Duration::from_secs(10);

fn breaker() -> BreakerHandle {
    CircuitBreakerLayer::builder()
        .open_duration(OPEN)
        .open_jitter(0.0)
        .half_open_probes(2)
        .build()
        .unwrap()
        .handle()
}

fn linked(connected: bool) -> (BreakerHandle, StdArc<Link>) {
    let handle = breaker();
    let link = StdArc::new(Link::default());
    link.connected.store(connected, SeqCst);
    assert!(handle.core().attach(StdArc::clone(&link)));
    assert!(!handle.core().attach(StdArc::clone(&link)), "attached once");
    (handle, link)
}

#[tokio::test(start_paused = true)]
async fn an_ended_open_period_waits_for_the_permit_while_connected() {
    let (handle, link) = linked(true);
    let core = handle.core();
    handle.trip();
    assert_eq!(handle.state(), State::Open);
    assert!(
        link.changed.swap(false, SeqCst),
        "a transition marks the link"
    );
    let snap = core.snapshot();
    assert_eq!(snap.remaining, OPEN);
    assert!(!snap.wanted && !snap.granted);

    tokio::time::advance(OPEN).await;
    // No permit: refused as open, told to retry soon, and the
    // coordination is asked (once per period).
    assert_eq!(core.acquire(|| core.now_ms()), Err(PROBE_DECISION_WAIT));
    assert_eq!(core.acquire(|| core.now_ms()), Err(PROBE_DECISION_WAIT));
    let snap = core.snapshot();
    assert!(snap.wanted && !snap.granted && snap.remaining.is_zero());
    assert_eq!(handle.state(), State::Open);

    // Denied: held open, and the next call after that asks again.
    core.hold_open(snap.gen, Duration::from_secs(3));
    assert!(!core.snapshot().wanted);
    assert!(core.acquire(|| core.now_ms()).is_err());
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(core.acquire(|| core.now_ms()), Err(PROBE_DECISION_WAIT));

    // Granted: the breaker's own half-open budget.
    core.grant_probes(snap.gen);
    assert!(core.acquire(|| core.now_ms()).is_ok());
    assert!(core.acquire(|| core.now_ms()).is_ok());
    assert_eq!(handle.state(), State::HalfOpen);
    assert!(core.acquire(|| core.now_ms()).is_err(), "two probes only");
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_link_leaves_the_breaker_local() {
    let (handle, link) = linked(false);
    let core = handle.core();
    handle.trip();
    tokio::time::advance(OPEN).await;
    assert!(core.acquire(|| core.now_ms()).is_ok());
    assert_eq!(handle.state(), State::HalfOpen);
    // The link going down mid-period has the same effect.
    let (handle, link2) = linked(true);
    let core = handle.core();
    handle.trip();
    tokio::time::advance(OPEN).await;
    assert!(core.acquire(|| core.now_ms()).is_err());
    link2.connected.store(false, SeqCst);
    assert!(core.acquire(|| core.now_ms()).is_ok());
    drop(link);
}

#[tokio::test(start_paused = true)]
async fn shared_trips_set_the_shared_end_and_closes_close() {
    let (handle, _link) = linked(true);
    let core = handle.core();
    // From closed: open until exactly the shared end, a trip counted.
    let gen = core.trip_until(Duration::from_secs(2)).unwrap();
    assert_eq!(handle.state(), State::Open);
    assert_eq!(handle.consecutive_trips(), 1);
    assert_eq!(core.snapshot().remaining, Duration::from_secs(2));
    // While open: the end moves to the new shared end (later or earlier),
    // in the same period, and a permit taken for it is void.
    core.grant_probes(gen);
    assert_eq!(core.trip_until(Duration::from_secs(5)), Some(gen));
    assert_eq!(core.snapshot().remaining, Duration::from_secs(5));
    assert!(!core.snapshot().granted);
    assert_eq!(core.trip_until(Duration::from_secs(1)), Some(gen));
    assert_eq!(core.snapshot().remaining, Duration::from_secs(1));
    // hold_open only lengthens.
    core.hold_open(gen, Duration::from_millis(500));
    assert_eq!(core.snapshot().remaining, Duration::from_secs(1));

    // The prober's close closes it, with a fresh window and schedule.
    assert!(core.close_now());
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.consecutive_trips(), 0);
    assert!(!core.close_now(), "already closed");

    // An operator's state is neither tripped nor closed from outside.
    handle.force_open();
    assert_eq!(core.trip_until(Duration::from_secs(1)), None);
    assert!(!core.close_now());
    assert_eq!(handle.state(), State::ForcedOpen);
    handle.trip();
    assert_eq!(handle.state(), State::ForcedOpen);
    handle.disable();
    assert_eq!(core.trip_until(Duration::from_secs(1)), None);
    assert_eq!(handle.state(), State::Disabled);
}

#[tokio::test(start_paused = true)]
async fn trip_opens_on_the_schedule_and_recovers_by_itself() {
    let handle = breaker();
    handle.trip();
    assert_eq!(handle.state(), State::Open);
    assert_eq!(handle.core().snapshot().remaining, OPEN);
    handle.trip();
    assert_eq!(
        handle.consecutive_trips(),
        1,
        "an open breaker stays as it is"
    );
    tokio::time::advance(OPEN).await;
    let core = handle.core();
    let t = core.acquire(|| core.now_ms()).unwrap();
    assert_eq!(handle.state(), State::HalfOpen);
    core.release(t);
}
