//! The rate limiter's metrics (feature `metrics`): events by kind, the wait
//! histogram, the pause histogram and the remaining-budget gauges, under
//! their documented names and the layer's `limiter` label.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::ratelimit::RateLimitLayer;
use llm_resilience::Error;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{service_fn, Layer, ServiceExt};

#[test]
fn waits_rejections_pauses_and_budgets_are_exported() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let layer = RateLimitLayer::builder()
                .name("openai")
                .requests(1)
                .no_token_limit()
                .window(Duration::from_secs(10))
                .burst(1.0)
                .max_wait(Duration::from_secs(15))
                .estimate_tokens(|_: &u32| 0)
                .ignore_usage()
                .build()
                .unwrap();
            let handle = layer.handle();
            let svc = layer.layer(service_fn(|x: u32| async move {
                if x == 9 {
                    Err(HttpError::new(429).with_header("retry-after", "3"))
                } else {
                    Ok::<_, HttpError>(x)
                }
            }));
            svc.clone().oneshot(1).await.unwrap();
            // Waits 10 s in line, then goes.
            svc.clone().oneshot(2).await.unwrap();
            // 3 queues for the next slot (10 s); 4 queues behind it (10 s
            // alone is within the 15 s maximum) and times out at 15 s.
            let a = tokio::spawn(svc.clone().oneshot(3));
            tokio::task::yield_now().await;
            let b = tokio::spawn(svc.clone().oneshot(4));
            a.await.unwrap().unwrap();
            assert!(matches!(b.await.unwrap(), Err(Error::RateLimited { .. })));
            // A 429 with a hint pauses the key.
            tokio::time::sleep(Duration::from_secs(10)).await;
            svc.clone().oneshot(9).await.unwrap_err();
            handle.record_metrics("primary");
        });
    });
    let mut counters = BTreeMap::new();
    let mut histograms = BTreeMap::new();
    let mut gauges = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<_> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        match value {
            DebugValue::Counter(n) => {
                counters.insert(name, n);
            }
            DebugValue::Histogram(v) => {
                histograms.insert(name, v.len());
            }
            DebugValue::Gauge(g) => {
                gauges.insert(name, g.into_inner());
            }
        }
    }
    let c = |kind: &str| {
        counters
            .get(&format!(
                "llm_resilience_ratelimit_events_total{{limiter=openai,kind={kind}}}"
            ))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(c("queued"), 3, "{counters:?}");
    assert_eq!(c("admitted"), 2, "{counters:?}");
    assert_eq!(c("timed_out"), 1, "{counters:?}");
    assert_eq!(c("paused"), 1, "{counters:?}");
    assert_eq!(
        histograms.get("llm_resilience_ratelimit_wait_seconds{limiter=openai}"),
        Some(&3),
        "{histograms:?}"
    );
    assert_eq!(
        histograms.get("llm_resilience_ratelimit_pause_seconds{limiter=openai}"),
        Some(&1)
    );
    assert!(
        gauges.contains_key(
            "llm_resilience_ratelimit_remaining{limiter=openai,dimension=requests,key=primary}"
        ),
        "{gauges:?}"
    );
}
