//! The gateway's streamed answers inside its pipeline's bounds, over real
//! HTTP on loopback (the crate's client → the gateway → mock targets): a
//! streamed answer keeps its queue slot until the caller has read it to
//! the end, a whole answer gives it back at once, and streams cut
//! mid-stream open the target's breaker.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "axum", feature = "config", feature = "testing"))]

mod gateway_support;

use std::time::Duration;

use futures::StreamExt;
use llm_resilience::breaker::State;
use llm_resilience::client::{ChatRequest, OpenAiClient};
use llm_resilience::testing::mock_server::{FaultScript, MockFault};
use tokio::time::timeout;
use tower::ServiceExt;

use gateway_support::{start_edited, Running};

fn client(gw: &Running) -> OpenAiClient {
    OpenAiClient::builder(gw.base_url.clone())
        .api_key("sk-gateway")
        .model("gpt-4o-mini")
        .total_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn soon<F: std::future::Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(15), f)
        .await
        .expect("the step finished")
}

#[tokio::test]
async fn a_streamed_answer_holds_the_gateways_slot_until_read() {
    // The target is still streaming when the caller has its first chunk
    // (the gateway forwards as fast as it reads, so a stream it has read to
    // `[DONE]` gives its slot back even if the caller reads slower).
    let slow = FaultScript::new()
        .chunks(3)
        .chunk_gap(Duration::from_secs(2));
    let gw = start_edited(slow, FaultScript::new(), |c| {
        c.queue.concurrency = Some(1);
        c.queue.when_full = None; // wait
    })
    .await;
    let queue = gw.gateway.pipeline().queue().clone();

    // A whole answer gives its slot back with the answer.
    soon(client(&gw).oneshot(ChatRequest::user("whole")))
        .await
        .unwrap();
    assert_eq!(queue.in_flight(), 0);

    // A stream read up to its first chunk keeps it.
    let mut stream = soon(client(&gw).streaming().oneshot(ChatRequest::user("s")))
        .await
        .unwrap();
    assert!(soon(stream.next()).await.unwrap().is_ok());
    assert_eq!(queue.in_flight(), 1);
    let waiting = tokio::spawn(client(&gw).oneshot(ChatRequest::user("next")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.primary.total(), 2, "the next call waits for the stream");
    while let Some(chunk) = soon(stream.next()).await {
        chunk.unwrap();
    }
    soon(waiting).await.unwrap().unwrap();
    assert_eq!(gw.primary.total(), 3);
    assert_eq!(queue.in_flight(), 0);
}

#[tokio::test]
async fn streams_cut_mid_stream_open_the_targets_breaker() {
    let gw = start_edited(
        FaultScript::new().then_n(3, MockFault::MidStreamDrop { after_chunks: 1 }),
        FaultScript::new(),
        |_| {},
    )
    .await;
    let primary = gw.gateway.pipeline().breaker("primary").unwrap().clone();
    for _ in 0..3 {
        assert_eq!(primary.state(), State::Closed);
        let stream = soon(client(&gw).streaming().oneshot(ChatRequest::user("s")))
            .await
            .unwrap();
        assert!(soon(stream.collect_text()).await.is_err());
    }
    // Three failures in a row (the config's threshold): open.
    assert_eq!(primary.state(), State::Open);
    assert_eq!(gw.gateway.pipeline().queue().in_flight(), 0);
    // The next stream goes to the secondary.
    let text = soon(async {
        let s = client(&gw)
            .streaming()
            .oneshot(ChatRequest::user("s"))
            .await?;
        Ok::<_, llm_resilience::BoxError>(s.collect_text().await?)
    })
    .await
    .unwrap();
    assert!(!text.is_empty());
    assert_eq!(gw.secondary.total(), 1);
}
