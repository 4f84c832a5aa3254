//! The Anthropic client's streaming over real HTTP on loopback: collected
//! streams equal non-streamed responses (text and tool use), mid-stream
//! `error` events and drops are typed and keep the partial message,
//! failures before output are retried, and the idle and size bounds hold.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use futures::StreamExt;
use llm_resilience::anthropic::{AnthropicErrorKind, MessagesRequest, StreamEvent, Tool};
use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::classify::{Outcome, Reason};
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use serde_json::json;
use tower::{Layer, ServiceExt};

mod anthropic_support;
use anthropic_support::{builder, classify, client, keyed_server as server};

fn fast_retry() -> RetryLayer {
    let fast = Backoff::builder()
        .initial(Duration::from_millis(5))
        .max_delay(Duration::from_millis(10))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    RetryLayer::builder()
        .max_attempts(3)
        .backoff(fast)
        .throttle_backoff(fast)
        .seed(3)
        .build()
        .unwrap()
}

fn weather_tool() -> Tool {
    Tool::new(
        "get_weather",
        "Current weather of a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}),
    )
}

#[tokio::test]
async fn a_collected_stream_equals_the_plain_response() {
    let server = server(FaultScript::new().chunks(5)).await;
    let c = client(&server);
    let plain = c
        .clone()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let stream = c
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let mut streamed = stream.collect_message().await.unwrap();
    // The rate-limit state moved on between the two calls; all else is
    // the same.
    assert_eq!(streamed.rate_limit.limit_requests, Some(10_000));
    streamed.rate_limit = plain.rate_limit;
    assert_eq!(streamed, plain);
    assert_eq!(streamed.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(streamed.usage.output_tokens, 12);
    assert!(streamed.usage.input_tokens > 0);
    assert_eq!(streamed.request_id.as_deref(), Some("req_mock"));
    assert_eq!(server.stats().get(Served::Ok), 2);
}

#[tokio::test]
async fn events_arrive_in_protocol_order() {
    let server = server(FaultScript::new().chunks(3)).await;
    let stream = client(&server)
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let events: Vec<StreamEvent> = stream.map(Result::unwrap).collect().await;
    assert!(matches!(events[0], StreamEvent::MessageStart { .. }));
    assert!(matches!(
        events[1],
        StreamEvent::BlockStart { index: 0, .. }
    ));
    let deltas = events
        .iter()
        .filter(|e| matches!(e, StreamEvent::TextDelta { .. }))
        .count();
    assert_eq!(deltas, 3);
    assert!(matches!(
        events.last().unwrap(),
        StreamEvent::MessageDelta { stop_reason: Some(r), .. } if r == "end_turn"
    ));
}

#[tokio::test]
async fn a_streamed_tool_call_is_assembled_like_the_plain_one() {
    let server = server(FaultScript::new()).await;
    let c = client(&server);
    let req = MessagesRequest::user("Weather in Paris?").tool(weather_tool());
    let plain = c.clone().oneshot(req.clone()).await.unwrap();
    let mut stream = c.streaming().oneshot(req).await.unwrap();
    let mut fragments = 0;
    while let Some(e) = stream.next().await {
        if let StreamEvent::InputJsonDelta { .. } = e.unwrap() {
            fragments += 1;
        }
    }
    assert!(fragments >= 2);
    let mut streamed = stream.message().clone();
    streamed.rate_limit = plain.rate_limit;
    assert_eq!(streamed, plain);
    let (_, name, input) = streamed.tool_uses().next().unwrap();
    assert_eq!(name, "get_weather");
    assert_eq!(input, &json!({"city": "Paris", "days": 3}));
    assert!(streamed.wants_tools());
}

#[tokio::test]
async fn an_error_event_mid_stream_is_typed_classified_and_keeps_the_output() {
    let server =
        server(FaultScript::new().then(MockFault::StreamErrorEvent { after_chunks: 2 })).await;
    // Through the retry layer: once output reached the caller, nothing is
    // retried.
    let mut stream = fast_retry()
        .layer(client(&server).streaming())
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let mut text = String::new();
    let err = loop {
        match stream.next().await.unwrap() {
            Ok(StreamEvent::TextDelta { text: t, .. }) => text.push_str(&t),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(stream.next().await.is_none());
    assert_eq!(text, "part0 part1 ");
    assert_eq!(err.kind(), AnthropicErrorKind::StreamError);
    assert_eq!(err.error_type(), Some("overloaded_error"));
    assert_eq!(err.status_code(), Some(529));
    assert!(err.is_mid_stream());
    assert_eq!(err.partial_text(), "part0 part1 ");
    assert_eq!(err.partial().unwrap().stop_reason, None);
    assert_eq!(err.request_id(), Some("req_mock"));
    assert_eq!(classify(err), Outcome::transient(Reason::Overloaded));
    assert_eq!(server.total(), 1);
}

#[tokio::test]
async fn a_drop_mid_stream_is_an_interrupted_stream_with_the_partial_output() {
    let server =
        server(FaultScript::new().then(MockFault::MidStreamDrop { after_chunks: 2 })).await;
    let stream = client(&server)
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let err = stream.collect_message().await.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamInterrupted);
    assert_eq!(err.partial_text(), "part0 part1 ");
    assert_eq!(classify(err), Outcome::transient(Reason::StreamInterrupted));
}

#[tokio::test]
async fn failures_before_any_output_are_retried() {
    let server = server(
        FaultScript::new()
            .then(MockFault::StreamErrorEvent { after_chunks: 0 })
            .then(MockFault::MidStreamDrop { after_chunks: 0 }),
    )
    .await;
    let text = fast_retry()
        .layer(client(&server).streaming())
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap()
        .collect_text()
        .await
        .unwrap();
    assert_eq!(text.split(' ').count(), 12);
    assert_eq!(
        server.stats().nonzero(),
        [
            (Served::Ok, 1),
            (Served::MidStreamDrop, 1),
            (Served::StreamErrorEvent, 1)
        ]
    );
}

#[tokio::test]
async fn an_error_status_on_a_streamed_call_is_the_same_typed_error() {
    let server = server(FaultScript::new().then(MockFault::overloaded())).await;
    let err = client(&server)
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::Status);
    assert_eq!(err.status_code(), Some(529));
    assert!(!err.is_mid_stream());
    assert_eq!(classify(err), Outcome::transient(Reason::Overloaded));
}

#[tokio::test]
async fn a_silent_stream_hits_the_idle_timeout() {
    let server = server(FaultScript::new().chunk_gap(Duration::from_secs(3))).await;
    let stream = builder(&server)
        .stream_idle_timeout(Duration::from_millis(150))
        .build()
        .unwrap()
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await;
    // The gap comes before the first event carrying output: the call
    // itself fails, before anything reached the caller.
    let err = stream.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamInterrupted);
    assert!(!err.is_mid_stream());
    assert!(classify(err).is_target_failure());
}

#[tokio::test]
async fn oversized_events_and_streams_are_typed_errors() {
    let server = server(FaultScript::new().reply_words(400).chunks(1)).await;
    let err = builder(&server)
        .max_event_bytes(512)
        .build()
        .unwrap()
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
    let server = server_of_many_chunks().await;
    let stream = builder(&server)
        .max_body_bytes(2048)
        .build()
        .unwrap()
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let err = stream.collect_message().await.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
    assert!(err.is_mid_stream());
    assert_eq!(classify(err), Outcome::permanent(Reason::ServerError));
}

async fn server_of_many_chunks() -> MockServer {
    server(FaultScript::new().reply_words(200).chunks(50)).await
}
