//! The queue's metrics (feature `metrics`): event counters by kind, the
//! wait-time histogram, and the snapshot gauges of
//! `QueueHandle::record_metrics`.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::time::Duration;

use llm_resilience::queue::{Priority, QueueLayer, WhenFull};
use llm_resilience::{BoxError, Error};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, ServiceExt};

/// A request: its class, its deadline, and how long the upstream works on it.
#[derive(Clone, Copy, Debug)]
struct Job {
    prio: Priority,
    deadline: Option<Instant>,
    work: Duration,
}

fn job(prio: Priority) -> Job {
    Job {
        prio,
        deadline: None,
        work: Duration::from_millis(100),
    }
}

#[derive(Debug, Default)]
struct Seen {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    waits: BTreeMap<String, Vec<f64>>,
}

fn read(snapshotter: &Snapshotter) -> Seen {
    let mut seen = Seen::default();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<_> = key.labels().map(|l| l.value().to_string()).collect();
        let name = if labels.is_empty() {
            key.name().to_string()
        } else {
            format!("{}/{}", key.name(), labels.join("/"))
        };
        match value {
            DebugValue::Counter(n) => {
                seen.counters.insert(name, n);
            }
            DebugValue::Gauge(v) => {
                seen.gauges.insert(name, v.into_inner());
            }
            DebugValue::Histogram(vs) => {
                seen.waits
                    .insert(name, vs.into_iter().map(|v| v.into_inner()).collect());
            }
        }
    }
    seen
}

#[test]
fn events_are_counted_and_the_snapshot_sets_the_gauges() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut during = Seen::default();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let upstream = service_fn(|j: Job| async move {
                sleep(j.work).await;
                Ok::<_, BoxError>(())
            });
            let layer = QueueLayer::builder()
                .concurrency(1)
                .capacity(4)
                .priority_by(|j: &Job| j.prio)
                .deadline_by(|j: &Job| j.deadline)
                .build()
                .unwrap();
            let handle = layer.handle();
            let svc = layer.layer(upstream);

            // One call in flight, four queued: two Low, one Normal, and a
            // High one whose deadline passes while it waits.
            let running = tokio::spawn(svc.clone().oneshot(job(Priority::Normal)));
            tokio::task::yield_now().await;
            let low = tokio::spawn(svc.clone().oneshot(job(Priority::Low)));
            let low2 = tokio::spawn(svc.clone().oneshot(job(Priority::Low)));
            let normal = tokio::spawn(svc.clone().oneshot(job(Priority::Normal)));
            let urgent = tokio::spawn(svc.clone().oneshot(Job {
                deadline: Some(Instant::now() + Duration::from_millis(10)),
                ..job(Priority::High)
            }));
            tokio::task::yield_now().await;

            handle.record_metrics();
            during = read(&snapshotter);

            // The caller of the Normal one gives up: a cancellation.
            normal.abort();
            assert!(normal.await.unwrap_err().is_cancelled());
            // The High one's deadline passes before any permit frees.
            let expired = urgent.await.unwrap();
            assert!(matches!(expired, Err(Error::DeadlineExceeded { .. })));
            // The running call ends at 100 ms; the first Low gets the permit
            // after waiting 100 ms, the second after 200 ms.
            running.await.unwrap().unwrap();
            low.await.unwrap().unwrap();
            low2.await.unwrap().unwrap();

            // A second queue, in reject mode and full: one rejection.
            let reject = QueueLayer::builder()
                .concurrency(1)
                .capacity(0)
                .when_full(WhenFull::Reject)
                .build()
                .unwrap()
                .layer(service_fn(|j: Job| async move {
                    sleep(j.work).await;
                    Ok::<_, BoxError>(())
                }));
            let busy = tokio::spawn(reject.clone().oneshot(job(Priority::Normal)));
            tokio::task::yield_now().await;
            let refused = reject.clone().oneshot(job(Priority::Normal)).await;
            assert!(matches!(refused, Err(Error::QueueFull { depth: 0, .. })));
            busy.await.unwrap().unwrap();

            handle.record_metrics();
        });
    });

    // The snapshot taken while four requests waited behind one call.
    let g = &during.gauges;
    assert_eq!(
        g.get("llm_resilience_queue_depth/default"),
        Some(&4.0),
        "{g:?}"
    );
    assert_eq!(
        g.get("llm_resilience_queue_in_flight/default"),
        Some(&1.0),
        "{g:?}"
    );
    assert_eq!(
        g.get("llm_resilience_queue_waiting_for_place/default"),
        Some(&0.0)
    );
    for (class, n) in [("high", 1.0), ("normal", 1.0), ("low", 2.0)] {
        let name = format!("llm_resilience_queue_depth_by_priority/default/{class}");
        assert_eq!(g.get(&name), Some(&n), "{name}: {g:?}");
    }

    // A snapshot drains the counters and histograms: add both up.
    let after = read(&snapshotter);
    let mut c = during.counters.clone();
    for (name, n) in &after.counters {
        *c.entry(name.clone()).or_default() += n;
    }
    let mut w = during.waits.clone();
    for (name, vs) in &after.waits {
        w.entry(name.clone()).or_default().extend(vs);
    }
    let count = |kind: &str| {
        c.get(&format!("llm_resilience_queue_events_total/default/{kind}"))
            .copied()
    };
    assert_eq!(count("queued"), Some(4), "{c:?}");
    assert_eq!(count("cancelled"), Some(1), "{c:?}");
    assert_eq!(count("expired"), Some(1), "{c:?}");
    assert_eq!(count("dispatched"), Some(2), "{c:?}");
    assert_eq!(count("rejected"), Some(1), "{c:?}");

    // Wait times: the Lows waited 100 and 200 ms for their permits; the
    // expired one 10 ms.
    assert_eq!(
        w.get("llm_resilience_queue_wait_seconds/default/dispatched"),
        Some(&vec![0.1, 0.2]),
        "{w:?}"
    );
    assert_eq!(
        w.get("llm_resilience_queue_wait_seconds/default/expired"),
        Some(&vec![0.01]),
        "{w:?}"
    );

    // The final snapshot: everything drained.
    let g = &after.gauges;
    assert_eq!(
        g.get("llm_resilience_queue_depth/default"),
        Some(&0.0),
        "{g:?}"
    );
    assert_eq!(
        g.get("llm_resilience_queue_in_flight/default"),
        Some(&0.0),
        "{g:?}"
    );
    for class in ["high", "normal", "low"] {
        let name = format!("llm_resilience_queue_depth_by_priority/default/{class}");
        assert_eq!(g.get(&name), Some(&0.0), "{name}: {g:?}");
    }
}
