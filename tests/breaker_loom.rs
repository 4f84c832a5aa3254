//! loom model of the breaker's lock-free state: the half-open permits and
//! the transitions.
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release --test breaker_loom`
#![cfg(loom)]

use std::time::Duration;

use llm_resilience::breaker::loom_api::{Core, TicketKind, Verdict};
use llm_resilience::breaker::{BreakerHandle, CircuitBreakerLayer, State};
use llm_resilience::classify::Reason;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const PROBES: u32 = 2;
const LATER: u64 = 1_000_000;

fn ok() -> Verdict {
    Verdict {
        failed: false,
        slow: false,
        reason: Reason::Ok,
    }
}

fn fail() -> Verdict {
    Verdict {
        failed: true,
        slow: false,
        reason: Reason::ServerError,
    }
}

/// A breaker tripped at t = 0 for 1 ms, so that at `LATER` it is due for
/// half-open.
fn tripped() -> BreakerHandle {
    let layer = CircuitBreakerLayer::builder()
        .count_window(2)
        .min_calls(1)
        .consecutive_failures(1)
        .open_duration(Duration::from_millis(1))
        .open_growth(1.0, Duration::from_millis(1))
        .open_jitter(0.0)
        .half_open_probes(PROBES)
        .probe_timeout(Duration::from_secs(3_600))
        .seed(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let core = h.core_for_loom();
    let t = core.acquire(|| 0).unwrap();
    core.complete(t, fail(), || 0, || None);
    assert_eq!(core.state(), State::Open);
    h
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Three callers race for two permits; each probe then succeeds or is
/// dropped. Never more than two probes in flight, and afterwards the
/// breaker admits again (never stuck in half-open).
#[test]
fn half_open_admits_at_most_n_probes_and_never_sticks() {
    model(|| {
        let h = tripped();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let h = h.clone();
                let in_flight = in_flight.clone();
                thread::spawn(move || {
                    let core: &Core = h.core_for_loom();
                    if let Ok(t) = core.acquire(|| LATER) {
                        assert_eq!(t.kind, TicketKind::Probe);
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(n <= PROBES as usize, "{n} probes in flight");
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        if i == 0 {
                            core.release(t); // dropped
                        } else {
                            core.complete(t, ok(), || LATER, || None);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let core = h.core_for_loom();
        assert!(matches!(core.state(), State::HalfOpen | State::Closed));
        assert!(core.probes_in_flight() <= PROBES);
        // Not stuck: a caller is admitted (a returned permit, or closed).
        let t = core
            .acquire(|| LATER)
            .expect("stuck: no permit and not closed");
        core.complete(t, ok(), || LATER, || None);
    });
}

/// A probe failure and a probe success race; a stale closed-state failure
/// (admitted before the trip) arrives meanwhile and must be ignored. The
/// breaker ends open (the failure won) or half-open/closed, never with a
/// permit leaked, and is admitting again later.
#[test]
fn transitions_ignore_stale_results_and_keep_permits_consistent() {
    model(|| {
        let layer = CircuitBreakerLayer::builder()
            .count_window(2)
            .min_calls(1)
            .consecutive_failures(1)
            .open_duration(Duration::from_millis(1))
            .open_growth(1.0, Duration::from_millis(1))
            .open_jitter(0.0)
            .half_open_probes(PROBES)
            .probe_timeout(Duration::from_secs(3_600))
            .seed(1)
            .build()
            .unwrap();
        let h = layer.handle();
        let core = h.core_for_loom();
        let stale = core.acquire(|| 0).unwrap();
        let t = core.acquire(|| 0).unwrap();
        core.complete(t, fail(), || 0, || None);
        assert_eq!(core.state(), State::Open);
        let h1 = h.clone();
        let a = thread::spawn(move || {
            let core = h1.core_for_loom();
            if let Ok(t) = core.acquire(|| LATER) {
                core.complete(t, fail(), || LATER, || None);
            }
        });
        let h2 = h.clone();
        let b = thread::spawn(move || {
            let core = h2.core_for_loom();
            if let Ok(t) = core.acquire(|| LATER) {
                core.complete(t, ok(), || LATER, || None);
            }
            // The stale closed-state failure from before the trip.
            core.complete(stale, fail(), || LATER, || None);
        });
        a.join().unwrap();
        b.join().unwrap();
        let state = core.state();
        assert!(
            matches!(state, State::Open | State::HalfOpen | State::Closed),
            "{state:?}"
        );
        assert!(core.probes_in_flight() <= PROBES);
        // Whatever happened, the breaker admits a caller once due.
        let t = core
            .acquire(|| 2 * LATER)
            .expect("stuck after concurrent transitions");
        core.release(t);
    });
}

/// An operator reset races a trip: the breaker ends in a state that admits
/// a caller, and the trip's deadline (if it won) is published.
#[test]
fn reset_racing_a_trip_leaves_a_consistent_state() {
    model(|| {
        let h = tripped();
        h.reset();
        let core = h.core_for_loom();
        let t = core.acquire(|| LATER).unwrap();
        assert_eq!(t.kind, TicketKind::Closed);
        let h1 = h.clone();
        let a = thread::spawn(move || {
            h1.core_for_loom().complete(t, fail(), || LATER, || None);
        });
        let h2 = h.clone();
        let b = thread::spawn(move || h2.reset());
        a.join().unwrap();
        b.join().unwrap();
        let core = h.core_for_loom();
        match core.state() {
            State::Closed => {}
            State::Open => {
                // Due after the 1 ms open period.
                core.acquire(|| LATER + 10)
                    .expect("open without a deadline");
            }
            other => panic!("unexpected {other:?}"),
        }
    });
}
