//! The Anthropic client over real HTTP on loopback, against the mock
//! server's Messages API: success, tool use, every error type classified,
//! the retry layer and breaker over it unchanged, timeouts and size caps,
//! the tower contract.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::anthropic::{
    AnthropicClient, AnthropicError, AnthropicErrorKind, ContentBlock, Message, MessagesRequest,
    Role, Tool,
};
use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::classify::{Outcome, Reason};
use llm_resilience::retry::{RetryEvent, RetryEventKind, RetryLayer};
use llm_resilience::testing::contract;
use llm_resilience::testing::mock_server::{ErrorReply, FaultScript, MockFault, Served};
use llm_resilience::Error;
use serde_json::json;
use tower::{Layer, ServiceBuilder, ServiceExt};

mod anthropic_support;
use anthropic_support::{builder, classify, client, keyed_server};

fn weather_tool() -> Tool {
    Tool::new(
        "get_weather",
        "Current weather of a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    )
}

fn fast() -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(5))
        .max_delay(Duration::from_millis(10))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

type Events = Arc<Mutex<Vec<RetryEvent>>>;

fn retry_layer(events: &Events) -> RetryLayer {
    let events = Arc::clone(events);
    RetryLayer::builder()
        .max_attempts(3)
        .backoff(fast())
        .throttle_backoff(fast())
        .seed(7)
        .on_event(move |e| events.lock().unwrap().push(*e))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_message_comes_back_with_usage_rate_limits_and_request_id() {
    let server = keyed_server(FaultScript::new()).await;
    let resp = client(&server)
        .oneshot(
            MessagesRequest::user("Say hello")
                .with_system("Be brief.")
                .temperature(0.3)
                .stop_sequences(vec!["END".into()]),
        )
        .await
        .unwrap();
    assert_eq!(resp.id, "msg_mock");
    assert_eq!(resp.model, "claude-mock");
    assert_eq!(resp.role, Role::Assistant);
    assert_eq!(resp.text().split(' ').count(), 12);
    assert_eq!(resp.stop_reason.as_deref(), Some("end_turn"));
    assert!(resp.usage.input_tokens > 0);
    assert_eq!(resp.usage.output_tokens, 12);
    assert_eq!(resp.usage.cache_read_input_tokens, Some(0));
    assert_eq!(resp.request_id.as_deref(), Some("req_mock"));
    assert_eq!(resp.rate_limit.limit_requests, Some(10_000));
    assert!(resp.rate_limit.reset_requests.is_some());
    assert_eq!(server.stats().get(Served::Ok), 1);
}

#[tokio::test]
async fn max_tokens_comes_from_the_client_unless_the_request_sets_it() {
    let server = keyed_server(FaultScript::new()).await;
    let c = builder(&server).max_tokens(5).build().unwrap();
    let resp = c
        .clone()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    assert_eq!(resp.usage.output_tokens, 5);
    assert_eq!(resp.stop_reason.as_deref(), Some("max_tokens"));
    let resp = c
        .oneshot(
            MessagesRequest::user("hi")
                .max_tokens(3)
                .model("claude-other"),
        )
        .await
        .unwrap();
    assert_eq!(resp.usage.output_tokens, 3);
    assert_eq!(resp.model, "claude-other");
}

#[tokio::test]
async fn a_tool_call_round_trip() {
    let server = keyed_server(FaultScript::new()).await;
    let c = client(&server);
    let question = MessagesRequest::user("Weather in Paris?").tool(weather_tool());
    let first = c.clone().oneshot(question.clone()).await.unwrap();
    assert!(first.wants_tools());
    let calls: Vec<_> = first.tool_uses().collect();
    assert_eq!(calls.len(), 1);
    let (id, name, input) = calls[0];
    assert_eq!(name, "get_weather");
    assert_eq!(input, &json!({"city": "Paris"}));
    // The assistant's turn goes back as it came, with the tool's answer.
    let answered = question
        .push(Message::new(Role::Assistant, first.content.clone()))
        .push(Message::tool_results(vec![ContentBlock::tool_result(
            id,
            "18C, sunny",
        )]));
    let done = c.oneshot(answered).await.unwrap();
    assert_eq!(done.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(done.tool_uses().count(), 0);
    assert!(!done.text().is_empty());
    assert_eq!(server.stats().get(Served::Ok), 2);
}

#[tokio::test]
async fn image_blocks_by_base64_and_url_are_accepted() {
    let server = keyed_server(FaultScript::new()).await;
    let req = MessagesRequest::new(vec![Message::new(
        Role::User,
        vec![
            ContentBlock::image_base64("image/png", "iVBORw0KGgo="),
            ContentBlock::image_url("https://example.invalid/map.png"),
            ContentBlock::text("What is in these images?").cached(),
        ],
    )]);
    let resp = client(&server).oneshot(req).await.unwrap();
    assert_eq!(resp.stop_reason.as_deref(), Some("end_turn"));
}

fn anthropic(status: u16, kind: &str, message: &str) -> MockFault {
    MockFault::Error(ErrorReply::anthropic(status, kind, message))
}

/// Every Anthropic error type, through the real client and the classifier.
#[tokio::test]
async fn every_error_type_is_classified() {
    let tr = Outcome::transient;
    let bad = |reason| Outcome::BadRequest { reason };
    let rows: Vec<(MockFault, u16, &str, Outcome)> = vec![
        (
            MockFault::overloaded(),
            529,
            "overloaded_error",
            tr(Reason::Overloaded),
        ),
        (
            anthropic(400, "invalid_request_error", "messages: field required"),
            400,
            "invalid_request_error",
            bad(Reason::InvalidRequest),
        ),
        (
            anthropic(
                400,
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum",
            ),
            400,
            "invalid_request_error",
            bad(Reason::ContextLength),
        ),
        (
            anthropic(401, "authentication_error", "invalid x-api-key"),
            401,
            "authentication_error",
            Outcome::permanent(Reason::Auth),
        ),
        (
            anthropic(403, "permission_error", "no access to this model"),
            403,
            "permission_error",
            Outcome::permanent(Reason::Auth),
        ),
        (
            anthropic(404, "not_found_error", "model: claude-nope"),
            404,
            "not_found_error",
            Outcome::permanent(Reason::NotFound),
        ),
        (
            anthropic(413, "request_too_large", "Request exceeds the maximum size"),
            413,
            "request_too_large",
            bad(Reason::ContextLength),
        ),
        (
            MockFault::Error(
                ErrorReply::anthropic(429, "rate_limit_error", "Number of requests exceeded")
                    .header("retry-after", "2")
                    .header("anthropic-ratelimit-requests-remaining", "0"),
            ),
            429,
            "rate_limit_error",
            Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_secs(2)),
            },
        ),
        (
            anthropic(500, "api_error", "Internal server error"),
            500,
            "api_error",
            tr(Reason::ServerError),
        ),
        // The shared script's OpenAI-style faults come in Anthropic's shape.
        (
            MockFault::insufficient_quota(),
            429,
            "billing_error",
            Outcome::permanent(Reason::Quota),
        ),
        (
            MockFault::context_length(),
            400,
            "invalid_request_error",
            bad(Reason::ContextLength),
        ),
    ];
    let mut script = FaultScript::new();
    for (fault, ..) in &rows {
        script = script.then(fault.clone());
    }
    let server = keyed_server(script).await;
    let c = client(&server);
    for (fault, status, kind, outcome) in rows {
        let err = c
            .clone()
            .oneshot(MessagesRequest::user("hi"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), AnthropicErrorKind::Status, "{fault:?}");
        assert_eq!(err.status_code(), Some(status), "{fault:?}");
        assert_eq!(err.error_type(), Some(kind), "{fault:?}");
        assert_eq!(err.request_id(), Some("req_mock"), "{fault:?}");
        assert!(err.body_excerpt().unwrap().contains(kind));
        assert_eq!(classify(err), outcome, "{fault:?}");
    }
}

#[tokio::test]
async fn a_wrong_key_or_a_missing_version_is_refused_as_the_api_would() {
    let server = keyed_server(FaultScript::new()).await;
    let err = builder(&server)
        .api_key("sk-ant-wrong")
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), Some("authentication_error"));
    assert_eq!(classify(err), Outcome::permanent(Reason::Auth));
    // The client always sends `anthropic-version`: a custom one arrives.
    let ok = builder(&server)
        .version("2023-01-01")
        .beta("prompt-caching-2024-07-31")
        .header("x-gateway", "1")
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn the_retry_layer_retries_overload_and_rate_limits_until_success() {
    let server = keyed_server(
        FaultScript::new()
            .then(MockFault::overloaded())
            .then(MockFault::Error(
                ErrorReply::anthropic(429, "rate_limit_error", "slow down")
                    .header("retry-after", "0.05"),
            )),
    )
    .await;
    let events = Events::default();
    let resp = retry_layer(&events)
        .layer(client(&server))
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    assert_eq!(resp.stop_reason.as_deref(), Some("end_turn"));
    let retries: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == RetryEventKind::Retrying)
        .map(|e| (e.reason, e.delay))
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert_eq!(retries[0].0, Reason::Overloaded);
    assert_eq!(retries[1].0, Reason::RateLimited);
    // The decision, not a measured time: never shorter than the hint.
    assert!(retries[1].1.unwrap() >= Duration::from_millis(50));
    assert_eq!(
        server.stats().nonzero(),
        [
            (Served::Ok, 1),
            (Served::RateLimited, 1),
            (Served::Overloaded, 1)
        ]
    );
}

#[tokio::test]
async fn permanent_errors_and_bad_requests_are_sent_once() {
    for fault in [
        anthropic(401, "authentication_error", "bad key"),
        anthropic(403, "permission_error", "no"),
        anthropic(400, "invalid_request_error", "bad"),
        anthropic(413, "request_too_large", "too large"),
    ] {
        let server = keyed_server(FaultScript::new().then(fault.clone())).await;
        let events = Events::default();
        let err = retry_layer(&events)
            .layer(client(&server))
            .oneshot(MessagesRequest::user("hi"))
            .await
            .unwrap_err();
        assert!(err.upstream_ref::<AnthropicError>().is_some(), "{err:?}");
        assert_eq!(server.total(), 1, "{fault:?}");
    }
}

#[tokio::test]
async fn the_breaker_opens_on_overload_and_spares_the_server() {
    let server = keyed_server(FaultScript::new().then_n(3, MockFault::overloaded())).await;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .open_duration(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .service(client(&server));
    for _ in 0..3 {
        let err = svc
            .clone()
            .oneshot(MessagesRequest::user("hi"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    }
    assert_eq!(handle.state(), State::Open);
    let err = svc
        .clone()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CircuitOpen { .. }), "{err:?}");
    assert_eq!(server.total(), 3);
}

#[tokio::test]
async fn bad_requests_never_trip_the_breaker() {
    let server = keyed_server(FaultScript::new().then_n(
        5,
        anthropic(400, "invalid_request_error", "prompt is too long: 9 > 8"),
    ))
    .await;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = breaker.layer(client(&server));
    for _ in 0..5 {
        let _ = svc.clone().oneshot(MessagesRequest::user("hi")).await;
    }
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(server.total(), 5);
}

#[tokio::test]
async fn hangs_resets_and_connect_failures_are_transient_transport_errors() {
    let server = keyed_server(
        FaultScript::new()
            .then(MockFault::Hang)
            .then(MockFault::Reset),
    )
    .await;
    let c = builder(&server)
        .first_byte_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = c
        .clone()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::Transport);
    assert_eq!(classify(err), Outcome::transient(Reason::Timeout));
    let err = c.oneshot(MessagesRequest::user("hi")).await.unwrap_err();
    assert_eq!(classify(err), Outcome::transient(Reason::Network));
    let addr = server.addr();
    drop(server);
    let err = AnthropicClient::builder()
        .base_url(format!("http://{addr}"))
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(classify(err), Outcome::transient(Reason::Connect));
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_typed_error() {
    let server = keyed_server(FaultScript::new().reply_words(2000)).await;
    let err = builder(&server)
        .max_body_bytes(4096)
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
    // The same request would get the same answer: not retried.
    assert_eq!(classify(err), Outcome::permanent(Reason::ServerError));
}

#[tokio::test]
async fn the_client_keeps_the_tower_contract() {
    let server = keyed_server(FaultScript::new()).await;
    let c = client(&server);
    contract::check_service(|| c.clone(), || MessagesRequest::user("hi")).await;
    let s = c.streaming();
    contract::check_service(|| s.clone(), || MessagesRequest::user("hi")).await;
    assert!(server.stats().get(Served::Ok) >= 8);
}

/// The whole agent pipeline (queue, fallback, retry, breaker) over two
/// Anthropic endpoints, unchanged: an overloaded primary moves every
/// request to the secondary, and its breaker opens.
#[tokio::test]
async fn the_agent_pipeline_falls_back_between_anthropic_endpoints() {
    use llm_resilience::anthropic::MessagesResponse;
    use llm_resilience::pipeline::AgentPipeline;
    use llm_resilience::report::with_report;

    let primary = keyed_server(FaultScript::new().rate(MockFault::overloaded(), 1.0)).await;
    let secondary = keyed_server(FaultScript::new()).await;
    let agent: AgentPipeline<AnthropicClient, MessagesRequest, MessagesResponse> =
        AgentPipeline::builder()
            .target("primary", client(&primary))
            .fallback("secondary", client(&secondary))
            .queue(16, 4)
            .deadline(Duration::from_secs(10))
            .retry(|r| {
                r.max_attempts(2)
                    .backoff(fast())
                    .throttle_backoff(fast())
                    .seed(5)
            })
            .breaker(|b| {
                b.consecutive_failures(3)
                    .no_failure_rate()
                    .open_duration(Duration::from_secs(60))
            })
            .build()
            .unwrap();
    for i in 0..6 {
        let (out, report) = with_report(
            agent
                .clone()
                .oneshot(MessagesRequest::user(format!("question {i}"))),
        )
        .await;
        assert_eq!(out.unwrap().stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(report.answered_by.as_deref(), Some("secondary"));
    }
    assert_eq!(agent.breaker("primary").unwrap().state(), State::Open);
    // Two attempts for the first request, one for the second that trips
    // the breaker; after that the open breaker spares the primary.
    assert_eq!(primary.total(), 3);
    assert_eq!(secondary.stats().get(Served::Ok), 6);
}
