//! The shared breaker coordination's metrics (features `redis` and
//! `metrics`) against a real server: the rows of the documented table
//! (docs/metrics.md) whose names start `llm_resilience_shared_breaker_`,
//! all of them, with their types and labels.
#![cfg(feature = "metrics")]

mod redis_support;
#[path = "support/metrics_table.rs"]
mod table;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::redis::breaker::{SharedBreaker, SharedBreakerConfig, SharedBreakerEvent};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use redis_support::{unique, url};
use tokio::time::{sleep, timeout};

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    timeout(Duration::from_secs(10), async {
        while !cond() {
            sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

#[tokio::test]
async fn connected_gauge_and_event_counters_under_stable_names() {
    let Some(url) = url() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();

    let ns = unique("brk-metrics");
    let config = SharedBreakerConfig::builder(ns.clone()).build().unwrap();
    let layer = |_| CircuitBreakerLayer::builder().build().unwrap();
    let (a, b) = (layer(0), layer(1));
    let shared_a = SharedBreaker::attach(&url, &config, "k", &a.handle()).unwrap();
    let shared_b = SharedBreaker::attach(&url, &config, "k", &b.handle()).unwrap();
    wait_for(
        || shared_a.is_connected() && shared_b.is_connected(),
        "connected",
    )
    .await;
    a.handle().trip();
    wait_for(|| b.handle().state() == State::Open, "B open").await;

    // A namespace whose Redis does not answer.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead_ns = unique("brk-metrics-dead");
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let dead_config = SharedBreakerConfig::builder(dead_ns.clone())
        .on_event(move |e| d.store(matches!(e, SharedBreakerEvent::Disconnected { .. }), SeqCst))
        .build()
        .unwrap();
    let c = layer(2);
    let dead_url = format!("redis://127.0.0.1:{port}/");
    let _shared_c = SharedBreaker::attach(&dead_url, &dead_config, "k", &c.handle()).unwrap();
    wait_for(|| down.load(SeqCst), "the dead namespace's disconnection").await;

    // One snapshot (a snapshot drains counters and gauges).
    let snapshot = snapshotter.snapshot().into_vec();
    let seen: BTreeMap<String, f64> = snapshot
        .iter()
        .map(|(k, _, _, v)| {
            let labels: Vec<_> = k.key().labels().map(|l| l.value().to_owned()).collect();
            let v = match v {
                DebugValue::Counter(n) => *n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(_) => f64::NAN,
            };
            (format!("{}/{}", k.key().name(), labels.join("/")), v)
        })
        .collect();
    let get = |name: &str, labels: &str| seen.get(&format!("{name}/{labels}")).copied();
    let events = "llm_resilience_shared_breaker_events_total";
    let gauge = "llm_resilience_shared_breaker_connected";
    assert_eq!(get(gauge, &ns), Some(1.0));
    assert_eq!(get(gauge, &dead_ns), Some(0.0));
    assert_eq!(get(events, &format!("{ns}/connected")), Some(2.0));
    assert_eq!(get(events, &format!("{ns}/trip_published")), Some(1.0));
    assert_eq!(get(events, &format!("{ns}/trip_received")), Some(1.0));
    assert_eq!(get(events, &format!("{dead_ns}/connected")), None);

    // The names, types and labels are the documented rows.
    table::check(
        &table::read_snapshot(&snapshot),
        &["llm_resilience_shared_breaker_"],
    );
}
