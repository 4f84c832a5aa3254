//! loom model of the breaker's lock-free state: the half-open permits and
//! the transitions.
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release --test breaker_loom`
//!
//! The breaker's state machine, window and atomics are compiled into this
//! test crate from their source files, where `src/util/sync.rs` picks
//! loom's atomics (`cfg(all(loom, test))`): loom checks the real code.
#![cfg(loom)]
#![allow(dead_code, unreachable_pub)]

mod classify {
    pub(crate) use llm_resilience::classify::Reason;
}

mod util {
    pub(crate) use super::{clock, listener, rng, time};
}

// `state.rs` reaches its siblings as `super::sync`, `super::window`,
// `super::event` and `super::settings`.
#[path = "../src/util/clock.rs"]
mod clock;
#[path = "../src/breaker/event.rs"]
mod event;
#[path = "../src/util/listener.rs"]
mod listener;
#[path = "../src/util/rng.rs"]
mod rng;
#[path = "../src/breaker/settings.rs"]
mod settings;
#[path = "../src/breaker/state.rs"]
mod state;
#[path = "../src/util/sync.rs"]
mod sync;
#[path = "../src/util/time.rs"]
mod time;
#[path = "../src/breaker/window.rs"]
mod window;

use std::sync::Arc as StdArc;
use std::time::Duration;

use classify::Reason;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use state::{Core, Settings, State, TicketKind, Verdict, WindowSpec};

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

fn settings() -> Settings {
    Settings {
        window: WindowSpec::Count(2),
        min_calls: 1,
        failure_rate: Some(0.5),
        slow_threshold: None,
        slow_rate: 1.0,
        consecutive: Some(1),
        open_base: Duration::from_millis(1),
        open_multiplier: 1.0,
        open_cap: Duration::from_millis(1),
        open_jitter: 0.0,
        probes: PROBES,
        probe_timeout: Duration::from_secs(3_600),
        hint_cap: None,
        trip_on: Vec::new(),
        seed: 1,
        listener: None,
        metrics: event::Metrics::new(std::borrow::Cow::Borrowed("loom"), false),
    }
}

fn fresh() -> Arc<Core> {
    Arc::new(Core::new(
        StdArc::new(settings()),
        clock::Origin::new(tokio::time::Instant::now()),
    ))
}

/// A breaker tripped at t = 0 for 1 ms, so that at `LATER` it is due for
/// half-open.
fn tripped() -> Arc<Core> {
    let core = fresh();
    let t = core.acquire(|| 0).unwrap();
    core.complete(t, fail(), || 0, || None);
    assert_eq!(core.state(), State::Open);
    core
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
        let core = tripped();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let core = core.clone();
                let in_flight = in_flight.clone();
                thread::spawn(move || {
                    if let Ok(t) = core.acquire(|| LATER) {
                        if t.kind != TicketKind::Probe {
                            // The other two probes closed the breaker.
                            assert_eq!(t.kind, TicketKind::Closed);
                            assert_eq!(core.state(), State::Closed);
                            return;
                        }
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
        let core = fresh();
        let stale = core.acquire(|| 0).unwrap();
        let t = core.acquire(|| 0).unwrap();
        core.complete(t, fail(), || 0, || None);
        assert_eq!(core.state(), State::Open);
        let c1 = core.clone();
        let a = thread::spawn(move || {
            if let Ok(t) = c1.acquire(|| LATER) {
                c1.complete(t, fail(), || LATER, || None);
            }
        });
        let c2 = core.clone();
        let b = thread::spawn(move || {
            let core = c2;
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
        let core = tripped();
        core.set_mode(State::Closed);
        let t = core.acquire(|| LATER).unwrap();
        assert_eq!(t.kind, TicketKind::Closed);
        let c1 = core.clone();
        let a = thread::spawn(move || {
            c1.complete(t, fail(), || LATER, || None);
        });
        let c2 = core.clone();
        let b = thread::spawn(move || c2.set_mode(State::Closed));
        a.join().unwrap();
        b.join().unwrap();
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

/// Both permits are held past the probe timeout: one caller starts a fresh
/// half-open period while the old probes finish (a failure, a drop). The
/// old results must not touch the new period's permits.
#[test]
fn probe_timeout_restarts_half_open_and_ignores_the_old_probes() {
    model(|| {
        let core = tripped();
        let p1 = core.acquire(|| LATER).unwrap();
        let p2 = core.acquire(|| LATER).unwrap();
        assert_eq!((p1.kind, p2.kind), (TicketKind::Probe, TicketKind::Probe));
        let after_timeout = LATER + 3_600_000;
        let c1 = core.clone();
        let a = thread::spawn(move || {
            // Refused only if the old failure re-opened the breaker first.
            if let Ok(t) = c1.acquire(|| after_timeout) {
                assert_eq!(t.kind, TicketKind::Probe);
                c1.complete(t, ok(), || after_timeout, || None);
            }
        });
        let c2 = core.clone();
        let b = thread::spawn(move || {
            c2.complete(p1, fail(), || after_timeout, || None);
            c2.release(p2);
        });
        a.join().unwrap();
        b.join().unwrap();
        assert!(core.probes_in_flight() <= PROBES);
        match core.state() {
            // The old failure won the race before the new period began.
            State::Open => {}
            // The new period: one success in, one permit free.
            State::HalfOpen => {
                assert_eq!(core.probes_in_flight(), 0);
                let t = core.acquire(|| after_timeout).expect("a free permit");
                core.complete(t, ok(), || after_timeout, || None);
                assert_eq!(core.state(), State::Closed);
            }
            other => panic!("unexpected {other:?}"),
        }
    });
}

/// Two closed-state failures race to trip: the breaker opens exactly once.
#[test]
fn concurrent_failures_trip_once() {
    model(|| {
        let core = fresh();
        let t1 = core.acquire(|| 0).unwrap();
        let t2 = core.acquire(|| 0).unwrap();
        let c1 = core.clone();
        let a = thread::spawn(move || c1.complete(t1, fail(), || 5, || None));
        let c2 = core.clone();
        let b = thread::spawn(move || c2.complete(t2, fail(), || 5, || None));
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(core.state(), State::Open);
        assert_eq!(core.trips(), 1);
        // Open for exactly the base period from the trip.
        assert!(core.acquire(|| 5).is_err());
        assert!(core.acquire(|| 6).is_ok());
    });
}

/// The time window: a record racing a roll (another thread moves the
/// window to the next second, sealing the current one) counts once, in the
/// second it reached; a reader during the roll sees no fewer calls than
/// its own and never more than all of them.
#[test]
fn time_window_records_racing_a_roll_count_once() {
    model(|| {
        let w = Arc::new(window::Window::time(3));
        let w1 = w.clone();
        let a = thread::spawn(move || {
            w1.record(false, false, 1_000, 1);
            w1.record(false, false, 2_000, 1);
        });
        let w2 = w.clone();
        let b = thread::spawn(move || {
            w2.record(false, false, 1_000, 1);
            // Read at second 1 while `a` may be rolling the window to
            // second 2: the calls are never seen fewer than the ones this
            // thread made, nor more than all three.
            let seen = w2.counts(1_000).calls;
            assert!((1..=3).contains(&seen), "{seen} calls seen");
        });
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(w.counts(2_000).calls, 3);
        // Second 3 keeps seconds 1 and 2: still all three.
        assert_eq!(w.counts(3_000).calls, 3);
    });
}
