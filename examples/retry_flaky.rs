//! The retry layer against a flaky in-process upstream, on a simulated clock.
//!
//! 1,000 requests go to an upstream that fails a third of its calls with
//! LLM-shaped errors (503, 529, 429 with `retry-after`, and a few permanent
//! `insufficient_quota` and `context_length_exceeded` errors). The same
//! requests run once without and once with `RetryLayer::llm_defaults()`, and
//! the example prints what each caller saw and what the upstream paid.
//!
//! The clock is tokio's paused clock, so the backoff sleeps (seconds of
//! simulated time) take no real time; the figures are exact and the same on
//! every run (the upstream and the jitter are seeded).
//!
//! Run: `cargo run --example retry_flaky`

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use llm_resilience::classify::HttpError;
use llm_resilience::retry::RetryLayer;
use llm_resilience::Error;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::{service_fn, Layer, Service, ServiceExt};

/// A seeded upstream: returns `Ok(n)` or one of the LLM errors, and counts
/// every call it receives.
fn flaky_upstream(
    seed: u64,
    calls: Arc<AtomicU64>,
) -> impl Service<u32, Response = u32, Error = HttpError, Future: Send> + Clone {
    let rng = Arc::new(Mutex::new(SmallRng::seed_from_u64(seed)));
    service_fn(move |n: u32| {
        calls.fetch_add(1, Ordering::Relaxed);
        let roll: f64 = rng.lock().unwrap().random();
        async move {
            match roll {
                r if r < 0.15 => Err(HttpError::new(503)),
                r if r < 0.25 => Err(HttpError::new(529).with_error_type("overloaded_error")),
                r if r < 0.32 => Err(HttpError::new(429)
                    .with_error_code("rate_limit_exceeded")
                    .with_header("retry-after", "2")),
                r if r < 0.33 => Err(HttpError::new(429).with_error_code("insufficient_quota")),
                r if r < 0.34 => {
                    Err(HttpError::new(400).with_error_code("context_length_exceeded"))
                }
                _ => Ok(n),
            }
        }
    })
}

async fn run<S>(label: &str, svc: S, calls: &AtomicU64)
where
    S: Service<u32, Response = u32, Error = Error> + Clone,
{
    let start = tokio::time::Instant::now();
    let results = futures::future::join_all((0..1000).map(|n| svc.clone().oneshot(n))).await;
    let mut outcomes: BTreeMap<&'static str, u32> = BTreeMap::new();
    for r in &results {
        *outcomes
            .entry(r.as_ref().map_or_else(Error::kind, |_| "ok"))
            .or_default() += 1;
    }
    println!("{label}");
    println!("  upstream calls: {}", calls.load(Ordering::Relaxed));
    for (kind, n) in &outcomes {
        println!("  {kind:<20} {n:>5}");
    }
    println!("  simulated time: {:?}\n", start.elapsed());
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let calls = Arc::new(AtomicU64::new(0));
    let plain = flaky_upstream(42, calls.clone()).map_err(Error::from_inner);
    run("without retries (1,000 requests):", plain, &calls).await;

    let calls = Arc::new(AtomicU64::new(0));
    let retry = RetryLayer::builder()
        .seed(42)
        .build()
        .expect("valid configuration");
    let budget = retry.budget().cloned();
    let svc = retry.layer(flaky_upstream(42, calls.clone()));
    run(
        "with RetryLayer::llm_defaults() (3 attempts, budget 20 % + 10/s):",
        svc,
        &calls,
    )
    .await;
    if let Some(b) = budget {
        println!("retry budget balance left: {:.1}", b.balance());
    }
}
