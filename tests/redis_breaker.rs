//! Shared breaker state across processes (feature `redis`) against a real
//! `redis-server` (`LLM_RESILIENCE_REDIS_URL`): each "process" is its own
//! tokio runtime (its own worker thread) with its own breaker and its own
//! coordination, calling the mock LLM server over loopback HTTP. Real time
//! with generous timeouts for waiting; nothing asserts on a duration.
#[path = "redis_support/own_server.rs"]
mod own_server;
mod redis_breaker_support;
mod redis_support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use llm_resilience::breaker::State;
use llm_resilience::redis::breaker::{SharedBreaker, SharedBreakerConfig};
use llm_resilience::testing::mock_server::{FaultScript, MockFault};
use llm_resilience::Error;
use tokio::time::{sleep, timeout, Instant};

use own_server::OwnServer;
use redis_breaker_support::*;
use redis_support::{unique, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_opens_the_other_and_both_send_one_probe_budget() {
    let Some(redis) = url() else { return };
    let server = failing_server().await;
    let ns = unique("brk");
    let a = Proc::new(&server, &redis, &ns);
    let b = Proc::new(&server, &redis, &ns);
    a.connected().await;
    b.connected().await;

    // A trips on the upstream's failures; B has sent nothing.
    for _ in 0..3 {
        assert!(a.call().await.is_err());
    }
    assert_eq!(a.breaker.state(), State::Open);
    let tripped = Instant::now();
    wait_for(|| b.breaker.state() == State::Open, "B open").await;
    // Printed, not asserted: the documented bound is one second.
    eprintln!("trip reached the other process in {:?}", tripped.elapsed());
    assert_eq!(server.total(), 3, "B sent nothing");
    assert!(matches!(b.call().await, Err(Error::CircuitOpen { .. })));
    // (The events follow the state changes on the coordination's task.)
    wait_for(|| a.count("trip_published") == 1, "A's trip published").await;
    wait_for(|| b.count("trip_received") == 1, "B's trip received").await;

    // The upstream recovers; both call until their breaker closes: the
    // upstream sees the probes of one half-open budget, not one per process.
    server.set_script(FaultScript::new());
    let before = server.total();
    let late_before = a.closed_calls.load(SeqCst) + b.closed_calls.load(SeqCst);
    let (probes_a, probes_b) = tokio::join!(a.call_until_closed(), b.call_until_closed());
    let (upstream, probes) = (server.total() - before, probes_a + probes_b);
    // A call a process's loop made just as the prober's close reached it
    // is admitted closed: not a probe.
    let late = a.closed_calls.load(SeqCst) + b.closed_calls.load(SeqCst) - late_before;
    eprintln!("probes: A {probes_a}, B {probes_b}; upstream {upstream} ({late} admitted closed)");
    assert_eq!(upstream, u64::from(probes + late));
    assert!(late <= 2, "at most one per process: {late}");
    assert!(
        probes <= PROBES,
        "{probes} probes for a budget of {PROBES}; A: {:?}; B: {:?}",
        a.events.lock().unwrap(),
        b.events.lock().unwrap()
    );
    assert!(probes >= 1);
    assert_eq!(a.breaker.state(), State::Closed);
    assert_eq!(b.breaker.state(), State::Closed);
    // One process probed and published; the other was told.
    let sum = |kind: &str| a.count(kind) + b.count(kind);
    wait_for(|| sum("close_published") == 1, "close published").await;
    wait_for(|| sum("close_received") == 1, "close received").await;
    assert_eq!(sum("probe_granted"), 1);

    // And again the other way round: B trips, A opens.
    server.set_script(FaultScript::new().rate(MockFault::server_error(503), 1.0));
    for _ in 0..3 {
        assert!(b.call().await.is_err());
    }
    wait_for(|| a.breaker.state() == State::Open, "A open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_trips_both_again_and_each_open_period_gets_one_budget() {
    let Some(redis) = url() else { return };
    let server = failing_server().await;
    let ns = unique("brk-retrip");
    let a = Proc::new(&server, &redis, &ns);
    let b = Proc::new(&server, &redis, &ns);
    a.connected().await;
    b.connected().await;
    for _ in 0..3 {
        assert!(a.call().await.is_err());
    }
    wait_for(|| b.breaker.state() == State::Open, "B open").await;
    wait_for(|| a.count("trip_published") == 1, "A's trip published").await;

    // Three open periods end while the upstream still fails: in each, one
    // process sends one probe, it fails, and its breaker trips again,
    // which reopens the other's.
    for period in 1..=3u64 {
        let before = server.total();
        let probes_before = a.probes.load(SeqCst) + b.probes.load(SeqCst);
        let trips_before = a.count("trip_published") + b.count("trip_published");
        let deadline = Instant::now() + PATIENCE;
        // Both call until one of them has re-tripped (and published it).
        while a.count("trip_published") + b.count("trip_published") == trips_before {
            assert!(Instant::now() < deadline, "period {period}: no re-trip");
            let (ra, rb) = tokio::join!(a.call(), b.call());
            for r in [ra, rb] {
                if !matches!(r, Err(Error::CircuitOpen { .. })) {
                    assert!(r.is_err(), "the upstream fails");
                }
            }
            sleep(Duration::from_millis(5)).await;
        }
        let probes = server.total() - before;
        assert_eq!(probes, 1, "period {period}: one failed probe ends it");
        let counted = a.probes.load(SeqCst) + b.probes.load(SeqCst);
        assert_eq!(u64::from(counted - probes_before), probes);
        wait_for(
            || a.breaker.state() == State::Open && b.breaker.state() == State::Open,
            "both open again",
        )
        .await;
    }

    // Then it recovers: one budget closes both.
    server.set_script(FaultScript::new());
    let before = server.total();
    let late_before = a.closed_calls.load(SeqCst) + b.closed_calls.load(SeqCst);
    let (probes_a, probes_b) = tokio::join!(a.call_until_closed(), b.call_until_closed());
    let late = a.closed_calls.load(SeqCst) + b.closed_calls.load(SeqCst) - late_before;
    assert!(late <= 2, "at most one per process: {late}");
    assert!(
        probes_a + probes_b <= PROBES,
        "A {probes_a}, B {probes_b}; A: {:?}; B: {:?}",
        a.events.lock().unwrap(),
        b.events.lock().unwrap()
    );
    assert_eq!(
        server.total() - before,
        u64::from(probes_a + probes_b + late)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_attaches_late_reads_the_open_state() {
    let Some(redis) = url() else { return };
    let server = failing_server().await;
    let ns = unique("brk-late");
    let a = Proc::new(&server, &redis, &ns);
    a.connected().await;
    for _ in 0..3 {
        assert!(a.call().await.is_err());
    }
    wait_for(|| a.count("trip_published") == 1, "published").await;
    // B starts after the trip was published: it missed the message.
    let b = Proc::new(&server, &redis, &ns);
    wait_for(
        || b.breaker.state() == State::Open,
        "B open from the record",
    )
    .await;
    assert_eq!(server.total(), 3);
}

/// A keyed "process": a breaker per key in front of a service that fails
/// when asked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_breakers_share_only_the_same_key() {
    let Some(redis) = url() else { return };
    let ns = unique("brk-keyed");
    let a = KeyedProc::new(&redis, &ns);
    let b = KeyedProc::new(&redis, &ns);
    wait_for(
        || a.shared.is_connected() && b.shared.is_connected(),
        "connected",
    )
    .await;
    // B has breakers for both keys.
    b.call("gpt", false).await.unwrap();
    b.call("claude", false).await.unwrap();
    // A's "gpt" trips.
    for _ in 0..3 {
        assert!(a.call("gpt", true).await.is_err());
    }
    assert_eq!(a.state("gpt"), Some(State::Open));
    wait_for(|| b.state("gpt") == Some(State::Open), "B's gpt open").await;
    // Only that key: B's other key was never tripped by anyone.
    assert_eq!(b.state("claude"), Some(State::Closed));
    b.call("claude", false).await.unwrap();
    assert!(matches!(
        b.call("gpt", false).await,
        Err(Error::CircuitOpen { .. })
    ));

    // A key B has no breaker for yet: B's breaker, once made, reads the
    // shared state.
    for _ in 0..3 {
        assert!(a.call("mistral", true).await.is_err());
    }
    assert_eq!(b.state("mistral"), None);
    let _ = b.breakers.breaker("mistral");
    wait_for(
        || b.state("mistral") == Some(State::Open),
        "B's new key open",
    )
    .await;
    assert_eq!(b.state("claude"), Some(State::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_made_after_a_trip_read_it_from_the_record() {
    let Some(redis) = url() else { return };
    let ns = unique("brk-many");
    let a = KeyedProc::new(&redis, &ns);
    let b = KeyedProc::new(&redis, &ns);
    wait_for(
        || a.shared.is_connected() && b.shared.is_connected(),
        "connected",
    )
    .await;
    // A name with a space, tripped in A and written to its record before
    // B has a breaker for it (so B cannot learn it from the message).
    for _ in 0..3 {
        assert!(a.call("hot key", true).await.is_err());
    }
    let mut raw = redis_support::raw(&redis).await;
    let record = format!("llmbrk:{{{ns}}}:key:hot key");
    timeout(PATIENCE, async {
        loop {
            let epoch: Option<u64> = redis::cmd("HGET")
                .arg(&record)
                .arg("epoch")
                .query_async(&mut raw)
                .await
                .unwrap();
            if epoch.is_some() {
                break;
            }
            sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("A's record written");
    // B makes 600 breakers at once (more than one read batch), the tripped
    // one among the last.
    let keys: Vec<&'static str> = (0..600)
        .map(|i| &*Box::leak(format!("model {i}").into_boxed_str()))
        .chain(["hot key"])
        .collect();
    for k in &keys {
        let _ = b.breakers.breaker(*k);
    }
    wait_for(
        || b.state("hot key") == Some(State::Open),
        "B's hot key open",
    )
    .await;
    for k in &keys[..600] {
        assert_eq!(b.state(k), Some(State::Closed), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_leaves_the_breaker_working_alone() {
    // A port nothing listens on (taken, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("redis://127.0.0.1:{port}/");
    let server = failing_server().await;
    let a = Proc::new(&server, &dead, &unique("brk-down"));
    wait_for(|| a.count("disconnected") >= 1, "disconnected event").await;
    assert!(!a.shared.as_ref().unwrap().is_connected());
    // Trips, opens, probes and closes by itself, as an unshared breaker.
    for _ in 0..3 {
        assert!(a.call().await.is_err());
    }
    assert_eq!(a.breaker.state(), State::Open);
    assert!(matches!(a.call().await, Err(Error::CircuitOpen { .. })));
    server.set_script(FaultScript::new());
    let before = server.total();
    let through = a.call_until_closed().await;
    assert_eq!(through, PROBES);
    assert_eq!(server.total() - before, u64::from(PROBES));
    assert_eq!(a.count("connected"), 0);
    // It keeps trying to reconnect.
    wait_for(|| a.count("disconnected") >= 2, "a second attempt").await;
}

#[tokio::test]
async fn bad_settings_are_config_errors() {
    for ns in ["", "a{b}", "a b", "a\nb"] {
        let err = SharedBreakerConfig::builder(ns).build().unwrap_err();
        assert_eq!(err.field, "namespace");
    }
    for d in [Duration::ZERO, Duration::MAX] {
        let err = SharedBreakerConfig::builder("ns")
            .response_timeout(d)
            .build()
            .unwrap_err();
        assert_eq!(err.field, "response_timeout");
        let err = SharedBreakerConfig::builder("ns")
            .connect_timeout(d)
            .build()
            .unwrap_err();
        assert_eq!(err.field, "connect_timeout");
    }
    let config = SharedBreakerConfig::builder("ns").build().unwrap();
    let breaker = breaker_layer().handle();
    let err = SharedBreaker::attach("not a url", &config, "k", &breaker).unwrap_err();
    assert_eq!(err.field, "url");
    for name in ["", "a\nb"] {
        let err =
            SharedBreaker::attach("redis://127.0.0.1:1/", &config, name, &breaker).unwrap_err();
        assert_eq!(err.field, "name");
    }
    let _first = SharedBreaker::attach("redis://127.0.0.1:1/", &config, "k", &breaker).unwrap();
    let err = SharedBreaker::attach("redis://127.0.0.1:1/", &config, "k", &breaker).unwrap_err();
    assert_eq!(err.field, "breaker");
    // Outside a runtime.
    let other = breaker_layer().handle();
    let err = std::thread::spawn(move || {
        SharedBreaker::attach("redis://127.0.0.1:1/", &config, "k", &other).unwrap_err()
    })
    .join()
    .unwrap();
    assert_eq!(err.field, "runtime");
}

/// A `redis-server` of this test's own (the shared one must not be
/// stopped under the other tests), on `port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_both_reconnect_and_a_trip_made_meanwhile_is_shared() {
    let Some(bin) = OwnServer::binary() else {
        return;
    };
    let mut own = OwnServer::new(bin);
    let redis = own.url();
    own.start().await;
    let upstream = failing_server().await;
    let ns = unique("brk-restart");
    // Open long enough that A is still open when Redis is back.
    let open = Duration::from_secs(60);
    let a = Proc::open_for(&upstream, &redis, &ns, open);
    let b = Proc::open_for(&upstream, &redis, &ns, open);
    a.connected().await;
    b.connected().await;

    own.stop();
    wait_for(
        || a.count("disconnected") >= 1 && b.count("disconnected") >= 1,
        "both see Redis go",
    )
    .await;
    // While Redis is down, A trips alone: B cannot hear of it.
    for _ in 0..3 {
        assert!(a.call().await.is_err());
    }
    assert_eq!(a.breaker.state(), State::Open);
    assert_eq!(b.breaker.state(), State::Closed);

    // Redis comes back (empty: no AOF here): both reconnect by themselves,
    // and A publishes the trip it made meanwhile.
    own.start().await;
    wait_for(
        || b.breaker.state() == State::Open,
        "B open after the restart",
    )
    .await;
    assert!(a.count("connected") >= 2 && b.count("connected") >= 2);
    assert_eq!(upstream.total(), 3, "B sent nothing");
}
