//! Streams inside the bounds over real HTTP on loopback, with the crate's
//! clients against the mock LLM server: a queue slot is held until the
//! stream finishes (or is dropped), and a breaker trips after N streams
//! cut mid-stream, for the OpenAI-compatible and the Anthropic client.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use llm_resilience::anthropic::{AnthropicClient, MessagesRequest};
use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::client::{ChatRequest, ClientErrorKind, OpenAiClient};
use llm_resilience::queue::QueueLayer;
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use llm_resilience::Error;
use tokio::time::timeout;
use tower::{ServiceBuilder, ServiceExt};

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key("sk-test")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Bounds a step that must happen: a hang fails the test instead of
/// blocking it.
async fn soon<F: std::future::Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(10), f)
        .await
        .expect("the step finished")
}

#[tokio::test]
async fn a_queue_slot_is_held_until_the_stream_finishes() {
    let server = MockServer::start(FaultScript::new().chunks(4))
        .await
        .unwrap();
    let queue = QueueLayer::builder()
        .concurrency(2)
        .hold_until_stream_end()
        .build()
        .unwrap();
    let q = queue.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .service(client(&server).streaming());

    // Two streams answered and left unread hold both slots.
    let mut a = soon(svc.clone().oneshot(ChatRequest::user("a")))
        .await
        .unwrap();
    let b = soon(svc.clone().oneshot(ChatRequest::user("b")))
        .await
        .unwrap();
    assert_eq!(q.in_flight(), 2);
    let third = tokio::spawn(svc.clone().oneshot(ChatRequest::user("c")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.total(), 2, "the third request waits for a slot");
    assert_eq!(q.depth(), 1);

    // Reading `a` to its `[DONE]` frees a slot: the third goes.
    while let Some(chunk) = soon(a.next()).await {
        chunk.unwrap();
    }
    let c = soon(third).await.unwrap().unwrap();
    assert_eq!(server.total(), 3);
    assert_eq!(q.in_flight(), 2);

    // Dropping streams unread frees theirs.
    drop((a, b, c));
    assert_eq!(q.in_flight(), 0);
}

#[tokio::test]
async fn without_hold_streams_read_past_the_concurrency_bound() {
    let server = MockServer::start(FaultScript::new()).await.unwrap();
    let queue = QueueLayer::builder().concurrency(2).build().unwrap();
    let q = queue.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .service(client(&server).streaming());
    let mut open = Vec::new();
    for i in 0..5 {
        let req = ChatRequest::user(format!("{i}"));
        open.push(soon(svc.clone().oneshot(req)).await.unwrap());
    }
    // The default gives the slot back at the first chunk.
    assert_eq!(q.in_flight(), 0);
    assert_eq!(server.total(), 5);
}

#[tokio::test]
async fn ten_callers_read_two_streams_at_a_time() {
    let server = MockServer::start(
        FaultScript::new()
            .chunks(4)
            .chunk_gap(Duration::from_millis(5)),
    )
    .await
    .unwrap();
    let queue = QueueLayer::builder()
        .concurrency(2)
        .hold_until_stream_end()
        .build()
        .unwrap();
    let q = queue.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .layer(RetryLayer::llm_defaults())
        .service(client(&server).streaming());
    let reading = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..10 {
        let (svc, reading, most) = (svc.clone(), reading.clone(), most.clone());
        callers.push(tokio::spawn(async move {
            let stream = svc.oneshot(ChatRequest::user(format!("{i}"))).await?;
            let now = reading.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let text = stream.collect_text().await;
            reading.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, llm_resilience::BoxError>(text?)
        }));
    }
    for caller in callers {
        assert!(!soon(caller).await.unwrap().unwrap().is_empty());
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
    assert_eq!(q.in_flight(), 0);
    assert_eq!(server.stats().get(Served::Ok), 10);
}

#[tokio::test]
async fn the_breaker_trips_after_three_streams_cut_mid_stream() {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::Ok)
            .then_n(3, MockFault::MidStreamDrop { after_chunks: 1 }),
    )
    .await
    .unwrap();
    let queue = QueueLayer::builder()
        .concurrency(1)
        .hold_until_stream_end()
        .build()
        .unwrap();
    let q = queue.handle();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .layer(RetryLayer::llm_defaults())
        .layer(breaker)
        .service(client(&server).streaming());

    // A whole stream: one success, recorded at `[DONE]`.
    let stream = soon(svc.clone().oneshot(ChatRequest::user("ok")))
        .await
        .unwrap();
    assert_eq!(b.counts().calls, 0, "nothing recorded before the end");
    soon(stream.collect_text()).await.unwrap();
    assert_eq!((b.counts().calls, b.counts().failures), (1, 0));

    // Three streams answer (so the calls succeed and are not retried),
    // then break off: three failures.
    for i in 0..3 {
        let mut stream = soon(svc.clone().oneshot(ChatRequest::user("cut")))
            .await
            .expect("the first chunk arrived");
        assert_eq!(b.state(), State::Closed, "stream {i}");
        assert!(soon(stream.next()).await.unwrap().is_ok());
        let err = soon(stream.next()).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
        assert_eq!(q.in_flight(), 0, "the error ended the stream");
    }
    assert_eq!(b.state(), State::Open);
    let refused = soon(svc.clone().oneshot(ChatRequest::user("x")))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::CircuitOpen { .. }), "{refused:?}");
    assert_eq!(server.total(), 4);
    assert_eq!(server.stats().get(Served::MidStreamDrop), 3);
}

#[tokio::test]
async fn a_stream_dropped_by_the_caller_is_not_a_failure() {
    let server = MockServer::start(FaultScript::new().chunks(6))
        .await
        .unwrap();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .service(client(&server).streaming());
    for _ in 0..3 {
        let mut stream = soon(svc.clone().oneshot(ChatRequest::user("x")))
            .await
            .unwrap();
        soon(stream.next()).await.unwrap().unwrap();
        drop(stream);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.counts().calls, 0);
}

#[tokio::test]
async fn the_anthropic_client_holds_the_slot_and_trips_the_breaker() {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::Ok)
            .then_n(2, MockFault::StreamErrorEvent { after_chunks: 1 }),
    )
    .await
    .unwrap();
    let anthropic = AnthropicClient::builder()
        .base_url(server.anthropic_base_url())
        .api_key("sk-ant-test")
        .model("claude-mock")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let queue = QueueLayer::builder()
        .concurrency(1)
        .hold_until_stream_end()
        .build()
        .unwrap();
    let q = queue.handle();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .layer(breaker)
        .service(anthropic.streaming());
    let req = || MessagesRequest::user("hi").max_tokens(64);

    let stream = soon(svc.clone().oneshot(req())).await.unwrap();
    assert_eq!(q.in_flight(), 1);
    soon(stream.collect_message()).await.unwrap();
    assert_eq!(q.in_flight(), 0);
    assert_eq!((b.counts().calls, b.counts().failures), (1, 0));
    for _ in 0..2 {
        let stream = soon(svc.clone().oneshot(req())).await.unwrap();
        assert_eq!(q.in_flight(), 1);
        assert!(soon(stream.collect_message()).await.is_err());
        assert_eq!(q.in_flight(), 0);
    }
    assert_eq!(b.state(), State::Open);
}

#[tokio::test]
async fn a_streaming_pipeline_holds_its_slot_and_its_breaker_sees_the_cut() {
    use llm_resilience::client::{ChatStream, StreamingClient};
    use llm_resilience::guard::AtStreamEnd;
    use llm_resilience::pipeline::AgentPipeline;

    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::Ok)
            .then_n(2, MockFault::MidStreamDrop { after_chunks: 1 }),
    )
    .await
    .unwrap();
    let agent: AgentPipeline<StreamingClient, ChatRequest, ChatStream, AtStreamEnd> =
        AgentPipeline::builder()
            .target("mock", client(&server).streaming())
            .queue(8, 1)
            .breaker(|b| b.consecutive_failures(2))
            .hold_until_stream_end()
            .build()
            .unwrap();
    let breaker = agent.breaker("mock").unwrap().clone();

    let mut first = soon(agent.clone().oneshot(ChatRequest::user("a")))
        .await
        .unwrap();
    assert_eq!(agent.queue().in_flight(), 1, "the stream holds the slot");
    let second = tokio::spawn(agent.clone().oneshot(ChatRequest::user("b")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.total(), 1, "the second call waits for the stream");
    while let Some(chunk) = soon(first.next()).await {
        chunk.unwrap();
    }
    assert_eq!((breaker.counts().calls, breaker.counts().failures), (1, 0));

    // Two streams cut after their first chunk: the target's breaker opens.
    let mut cut = soon(second).await.unwrap().unwrap();
    while let Some(Ok(_)) = soon(cut.next()).await {}
    let cut = soon(agent.clone().oneshot(ChatRequest::user("c")))
        .await
        .unwrap();
    assert!(soon(cut.collect_text()).await.is_err());
    assert_eq!(agent.queue().in_flight(), 0);
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(server.total(), 3);
}
