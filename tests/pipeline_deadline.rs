//! The pipeline's deadline counts from its `call`: time waited in its queue
//! is part of it, and the fallback sends nothing after it (paused clock).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::pipeline::AgentPipeline;
use llm_resilience::Error;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceExt};

type Client = BoxCloneSyncService<u32, u32, HttpError>;

fn counted(work: Duration, calls: &Arc<AtomicU32>) -> Client {
    let calls = calls.clone();
    BoxCloneSyncService::new(service_fn(move |x: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(work).await;
            Ok(x)
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn the_queue_wait_counts_toward_the_deadline() {
    let (primary, secondary) = (Arc::default(), Arc::default());
    let agent = AgentPipeline::builder()
        .target("primary", counted(Duration::from_millis(200), &primary))
        .fallback("secondary", counted(Duration::ZERO, &secondary))
        .queue(10, 1)
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    // The first call holds the only permit for 200 ms; the second waits
    // that long in the queue, then would need 200 ms more on the primary:
    // past its 300 ms deadline counted from its call, not from its dispatch.
    let first = tokio::spawn(agent.clone().oneshot(1));
    tokio::task::yield_now().await;
    let second = agent.clone().oneshot(2).await;
    assert!(
        matches!(second, Err(Error::DeadlineExceeded { .. })),
        "{second:?}"
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
    // Both reached the primary; the second was not sent to the secondary
    // after its deadline passed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(primary.load(Ordering::SeqCst), 2);
    assert_eq!(secondary.load(Ordering::SeqCst), 0);
}
