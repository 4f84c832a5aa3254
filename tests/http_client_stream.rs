//! The client's streams over real HTTP on loopback: a drop or an error event
//! after the first chunk (typed, with the partial output, never retried),
//! failures before it (retried), a full stream against the plain completion,
//! and the idle timeout.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

mod http_client_support;

use std::time::Duration;

use futures::StreamExt;
use http_client_support::{classify, client, tr};
use llm_resilience::classify::Reason;
use llm_resilience::client::{ChatRequest, ClientErrorKind, OpenAiClient};
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use tower::{Layer, ServiceExt};

#[tokio::test]
async fn a_stream_that_drops_after_two_chunks_is_a_typed_mid_stream_error() {
    let server =
        MockServer::start(FaultScript::new().then(MockFault::MidStreamDrop { after_chunks: 2 }))
            .await
            .unwrap();
    // Through the retry layer: once a chunk reached the caller, nothing is
    // retried.
    let mut stream = RetryLayer::llm_defaults()
        .layer(client(&server).streaming())
        .oneshot(ChatRequest::user("hi"))
        .await
        .expect("the first chunk arrived, so the call succeeds");
    let a = stream.next().await.unwrap().unwrap();
    let b = stream.next().await.unwrap().unwrap();
    let err = stream.next().await.unwrap().unwrap_err();
    assert!(stream.next().await.is_none(), "nothing after the error");
    assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
    assert!(err.is_mid_stream());
    assert_eq!(err.partial(), [a.clone(), b.clone()]);
    assert_eq!(err.partial_text(), format!("{}{}", a.text(), b.text()));
    assert_eq!(err.partial_text(), "part0 part1 ");
    assert_eq!(classify(err), tr(Reason::StreamInterrupted));
    assert_eq!(server.stats().get(Served::MidStreamDrop), 1);
    assert_eq!(server.total(), 1, "a stream that started is never retried");
}

#[tokio::test]
async fn an_error_event_mid_stream_is_typed_and_keeps_the_output() {
    let server =
        MockServer::start(FaultScript::new().then(MockFault::StreamErrorEvent { after_chunks: 2 }))
            .await
            .unwrap();
    let stream = client(&server)
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let err = stream.collect_text().await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamError);
    assert_eq!(err.partial_text(), "part0 part1 ");
    use llm_resilience::classify::HttpView;
    assert_eq!(err.error_type(), Some("overloaded_error"));
    assert_eq!(classify(err), tr(Reason::StreamInterrupted));
}

#[tokio::test]
async fn failures_before_the_first_chunk_are_retried() {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::StreamErrorEvent { after_chunks: 0 })
            .then(MockFault::MidStreamDrop { after_chunks: 0 })
            .then(MockFault::overloaded()),
    )
    .await
    .unwrap();
    let layer = RetryLayer::builder()
        .max_attempts(4)
        .backoff(
            llm_resilience::backoff::Backoff::builder()
                .initial(Duration::from_millis(5))
                .max_delay(Duration::from_millis(10))
                .build()
                .unwrap(),
        )
        .throttle_backoff(
            llm_resilience::backoff::Backoff::builder()
                .initial(Duration::from_millis(5))
                .max_delay(Duration::from_millis(10))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let text = layer
        .layer(client(&server).streaming())
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap()
        .collect_text()
        .await
        .unwrap();
    assert_eq!(text.split_whitespace().count(), 12);
    let stats = server.stats();
    assert_eq!(stats.total, 4);
    assert_eq!(stats.get(Served::Ok), 1);
}

#[tokio::test]
async fn a_full_stream_matches_the_plain_completion_and_reports_usage() {
    let server = MockServer::start(FaultScript::new().chunks(3))
        .await
        .unwrap();
    let c = client(&server);
    let plain = c.clone().oneshot(ChatRequest::user("hi")).await.unwrap();
    let mut stream = c
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let mut text = String::new();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        text.push_str(chunk.unwrap().text());
        n += 1;
    }
    assert_eq!(text, plain.content());
    assert_eq!(n, 4, "three content chunks and the usage chunk");
    assert_eq!(stream.usage(), plain.usage);
    assert_eq!(stream.rate_limit().limit_tokens, Some(2_000_000));
}

#[tokio::test]
async fn a_silent_stream_hits_the_idle_timeout() {
    let server = MockServer::start(FaultScript::new().chunk_gap(Duration::from_secs(3)))
        .await
        .unwrap();
    let c = OpenAiClient::builder(server.base_url())
        .stream_idle_timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let err = c
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
    assert!(!err.is_mid_stream());
}
