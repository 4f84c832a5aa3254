//! The retry layer's metrics (feature `metrics`).
#![cfg(feature = "metrics")]

use llm_resilience::classify::HttpError;
use llm_resilience::retry::RetryLayer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{service_fn, Layer, ServiceExt};

#[test]
fn decisions_are_counted_by_kind_and_reason() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let inner = service_fn(|fail: bool| async move {
                if fail {
                    Err(HttpError::new(503))
                } else {
                    Ok(())
                }
            });
            let svc = RetryLayer::builder()
                .name("openai")
                .seed(3)
                .build()
                .unwrap()
                .layer(inner);
            // A first-attempt success records nothing; a failing call makes
            // two retries and is then exhausted.
            svc.clone().oneshot(false).await.unwrap();
            svc.oneshot(true).await.unwrap_err();
        });
    });
    let mut counts = std::collections::BTreeMap::new();
    let mut balance = None;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        match (key.name(), value) {
            ("llm_resilience_retry_decisions_total", DebugValue::Counter(n)) => {
                let labels: Vec<_> = key.labels().map(|l| l.value().to_string()).collect();
                counts.insert(labels.join("/"), n);
            }
            ("llm_resilience_retry_budget_balance", DebugValue::Gauge(v)) => balance = Some(v),
            _ => {}
        }
    }
    assert_eq!(
        counts.get("openai/retrying/unavailable"),
        Some(&2),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("openai/exhausted/unavailable"),
        Some(&1),
        "{counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    // 2 deposits × 0.2 + 10/s × 10 s − 2 withdrawals.
    assert_eq!(balance.map(|b| b.into_inner()), Some(98.4));
}
