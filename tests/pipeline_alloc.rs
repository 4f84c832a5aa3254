//! A first-try success through the whole agent pipeline (queue, deadline,
//! fallback, retry with attempt timeout, breaker) allocates nothing, with
//! the `metrics` feature's recorder installed (every handle the success path
//! touches is registered when the pipeline is built) and without.

#[path = "support/thread_alloc.rs"]
mod thread_alloc;
use thread_alloc::allocations;

use std::future::{ready, Ready};
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::pipeline::AgentPipeline;
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: thread_alloc::Counting = thread_alloc::Counting;

type Client = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, HttpError>>>;

fn calls() -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let client: Client = tower::service_fn(|x: u64| ready(Ok(x + 1)));
        let mut agent = AgentPipeline::builder()
            .target("primary", client)
            .fallback("backup", client)
            .queue(1_000, 32)
            .deadline(Duration::from_secs(60))
            .retry(|r| r.attempt_timeout(Duration::from_secs(30)))
            .build()
            .unwrap();
        // Warm up: lazily created thread-locals, the timer wheel.
        for i in 0..100 {
            agent.ready().await.unwrap().call(i).await.unwrap();
        }
        let mut per_call = Vec::new();
        for i in 0..200 {
            let before = allocations();
            let out = agent.ready().await.unwrap().call(i).await.unwrap();
            per_call.push(allocations() - before);
            assert_eq!(out, i + 1);
        }
        // A clone per request (what axum and hyper do).
        for i in 0..200 {
            let before = allocations();
            agent.clone().oneshot(i).await.unwrap();
            per_call.push(allocations() - before);
        }
        per_call
    })
}

#[test]
fn a_first_try_success_allocates_nothing() {
    let per_call = calls();
    assert!(per_call.iter().all(|&n| n == 0), "{per_call:?}");
}

#[cfg(feature = "metrics")]
#[test]
fn a_first_try_success_allocates_nothing_with_a_metrics_recorder() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let per_call = metrics::with_local_recorder(&recorder, calls);
    assert!(per_call.iter().all(|&n| n == 0), "{per_call:?}");
}
