//! The one policy for a panicking inner service, for every layer: the panic
//! is not caught; it unwinds to the caller's task exactly as it would
//! without the layer, and the layer's shared state stays usable (a panic is
//! handled like a cancelled call: it counts neither as a success nor as a
//! failure, and whatever the call held is given back).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::chaos::{ChaosLayer, Latency};
use llm_resilience::classify::HttpError;
use llm_resilience::retry::RetryLayer;
use llm_resilience::Error;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};

type Svc = BoxCloneService<u32, u32, Error>;

/// Panics on request 0, fails with a 500 on request 1, answers otherwise;
/// counts the calls that reached it.
fn inner(
    calls: Arc<AtomicU32>,
) -> impl tower::Service<u32, Response = u32, Error = HttpError, Future: Send> + Clone + Send {
    service_fn(move |req: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match req {
                0 => panic!("inner service bug"),
                1 => Err(HttpError::new(500)),
                n => Ok(n),
            }
        }
    })
}

/// Runs `svc.oneshot(req)` on its own task and says whether it panicked.
async fn panicked(svc: Svc, req: u32) -> bool {
    tokio::spawn(svc.oneshot(req))
        .await
        .err()
        .is_some_and(|e| e.is_panic())
}

#[tokio::test(start_paused = true)]
async fn retry_lets_the_panic_unwind_and_is_not_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let layer = RetryLayer::builder().build().unwrap();
    let svc: Svc = BoxCloneService::new(layer.layer(inner(Arc::clone(&calls))));
    assert!(panicked(svc.clone(), 0).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a panic is not retried");
    assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn breaker_lets_the_panic_unwind_and_gives_the_probe_back() {
    let calls = Arc::new(AtomicU32::new(0));
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .half_open_probes(1)
        .open_duration(Duration::from_secs(1))
        .open_jitter(0.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc: Svc = BoxCloneService::new(layer.layer(inner(Arc::clone(&calls))));
    // Closed: the panic reaches the caller and is not counted as a failure.
    assert!(panicked(svc.clone(), 0).await);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.counts().failures, 0);
    // Open it, wait for half-open, and panic inside the only probe.
    assert!(svc.clone().oneshot(1).await.is_err());
    assert_eq!(handle.state(), State::Open);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(panicked(svc.clone(), 0).await);
    // The probe's permit came back: the next call is admitted and closes it.
    assert_eq!(svc.clone().oneshot(5).await.unwrap(), 5);
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn chaos_lets_the_panic_unwind_delayed_or_not() {
    let calls = Arc::new(AtomicU32::new(0));
    for layer in [
        ChaosLayer::builder().build().unwrap(),
        ChaosLayer::builder()
            .latency(Latency::Fixed(Duration::from_millis(10)), 1.0)
            .build()
            .unwrap(),
    ] {
        let svc: Svc = BoxCloneService::new(layer.layer(inner(Arc::clone(&calls))));
        assert!(panicked(svc.clone(), 0).await);
        assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
    }
}
