//! The Redis queue's metrics (features `redis` and `metrics`) against a
//! real server: job counters by outcome, and the snapshot gauges of
//! `JobQueue::record_metrics`.
#![cfg(feature = "metrics")]

mod redis_support;
#[path = "support/metrics_table.rs"]
mod table;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::redis::{JobOutcome, Worker, WorkerConfig};
use llm_resilience::BoxError;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use redis_support::{fresh_queue, url};

#[tokio::test]
async fn counts_by_outcome_and_queue_gauges_under_stable_names() {
    let Some(url) = url() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();

    let q = fresh_queue(&url, "metrics").await;
    let name = q.config().name().to_owned();
    let first_try = Arc::new(AtomicU32::new(0));
    let f = first_try.clone();
    let svc = tower::service_fn(move |n: u32| {
        let k = if n == 2 {
            f.fetch_add(1, Ordering::SeqCst)
        } else {
            1
        };
        async move {
            match n {
                1 => {
                    let e: BoxError = Box::new(llm_resilience::testing::errors::bad_request(
                        llm_resilience::classify::Reason::InvalidRequest,
                        1,
                        "bad".into(),
                    ));
                    Err(e)
                }
                2 if k == 0 => Err("503".into()),
                _ => Ok(n),
            }
        }
    });
    let config = WorkerConfig::builder()
        .idle_wait(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let w = Worker::new(&q, svc, config).spawn().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3u32 {
        ids.push(q.enqueue(&n).await.unwrap());
    }
    for id in &ids {
        q.wait_for::<u32>(id, Duration::from_secs(10))
            .await
            .unwrap();
    }
    assert!(matches!(
        q.outcome::<u32>(&ids[1]).await.unwrap(),
        Some(JobOutcome::DeadLettered { .. })
    ));
    w.shutdown().await;
    q.record_metrics().await.unwrap();

    // The names, types and labels are the Redis rows of the documented
    // table (docs/metrics.md), all of them, and nothing else.
    let snapshot = snapshotter.snapshot().into_vec();
    table::check(&table::read_snapshot(&snapshot), &["llm_resilience_redis_"]);
    let mut seen = BTreeMap::new();
    for (key, _, _, value) in snapshot {
        let key = key.key();
        let labels: Vec<_> = key.labels().map(|l| l.value().to_string()).collect();
        let v = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(_) => continue,
        };
        seen.insert(format!("{}/{}", key.name(), labels.join("/")), v);
    }
    let get = |k: &str| seen.get(&k.replace("Q", &name)).copied();
    assert_eq!(
        get("llm_resilience_redis_jobs_total/Q/completed"),
        Some(2.0),
        "{seen:?}"
    );
    assert_eq!(get("llm_resilience_redis_jobs_total/Q/retried"), Some(1.0));
    assert_eq!(
        get("llm_resilience_redis_jobs_total/Q/dead_lettered"),
        Some(1.0)
    );
    assert_eq!(
        get("llm_resilience_redis_jobs_total/Q/duplicate"),
        Some(0.0)
    );
    assert_eq!(get("llm_resilience_redis_queue_depth/Q/normal"), Some(0.0));
    assert_eq!(
        get("llm_resilience_redis_queue_pending/Q/normal"),
        Some(0.0)
    );
    assert_eq!(get("llm_resilience_redis_queue_delayed/Q"), Some(0.0));
    assert_eq!(get("llm_resilience_redis_queue_dead_letters/Q"), Some(1.0));
    assert_eq!(get("llm_resilience_redis_queue_retried/Q"), Some(1.0));
}
