//! The client adapter over real HTTP on loopback, against the fault-injecting
//! mock server: classification of every provider error class, errors, headers
//! and usage, key redaction, seeded fault rates and the tower contract.
//! Retries are in `http_client_retry.rs`, streams in `http_client_stream.rs`.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

mod http_client_support;

use std::time::Duration;

use http_client_support::{bad, classify, client, perm, tr, KEY};
use llm_resilience::classify::{Outcome, Reason};
use llm_resilience::client::{ChatRequest, ClientErrorKind, OpenAiClient};
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::contract;
use llm_resilience::testing::mock_server::{
    ErrorReply, FaultScript, MockFault, MockServer, Served,
};
use tower::{Layer, Service, ServiceExt};

fn openai(status: u16, t: &str, code: Option<&str>) -> MockFault {
    MockFault::Error(ErrorReply::openai(status, t, code, "mock"))
}

/// Every provider error class (status, type, code, hint) that an HTTP
/// server can produce, through the real client and the LLM classifier.
#[tokio::test]
async fn reference_table_rows_from_real_http_responses() {
    let rows: Vec<(&str, MockFault, Outcome, Served)> = vec![
        (
            "429 rate_limit_exceeded with retry-after-ms",
            MockFault::rate_limited(Some(Duration::from_millis(1500))),
            Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_millis(1500)),
            },
            Served::RateLimited,
        ),
        (
            "429 retry-after seconds only",
            MockFault::Error(
                ErrorReply::openai(429, "requests", Some("rate_limit_exceeded"), "slow down")
                    .header("retry-after", "2"),
            ),
            Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_secs(2)),
            },
            Served::RateLimited,
        ),
        (
            "429 anthropic rate_limit_error",
            MockFault::Error(ErrorReply::anthropic(429, "rate_limit_error", "slow down")),
            tr(Reason::RateLimited),
            Served::RateLimited,
        ),
        (
            "429 gemini per-minute RESOURCE_EXHAUSTED",
            MockFault::Error(ErrorReply::gemini(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for GenerateRequestsPerMinute",
            )),
            tr(Reason::RateLimited),
            Served::RateLimited,
        ),
        (
            "429 insufficient_quota",
            MockFault::insufficient_quota(),
            perm(Reason::Quota),
            Served::Quota,
        ),
        (
            "429 monthly spend limit",
            openai(429, "requests", Some("monthly_spend_limit_exceeded")),
            perm(Reason::Quota),
            Served::Quota,
        ),
        (
            "429 gemini daily quota",
            MockFault::Error(ErrorReply::gemini(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for GenerateRequestsPerDay (per day)",
            )),
            perm(Reason::Quota),
            Served::RateLimited,
        ),
        (
            "400 context_length_exceeded",
            MockFault::context_length(),
            bad(Reason::ContextLength),
            Served::ContextLength,
        ),
        (
            "400 anthropic prompt is too long",
            MockFault::Error(ErrorReply::anthropic(
                400,
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum",
            )),
            bad(Reason::ContextLength),
            Served::OtherError,
        ),
        (
            "413 request_too_large",
            MockFault::Error(ErrorReply::anthropic(413, "request_too_large", "too large")),
            bad(Reason::ContextLength),
            Served::OtherError,
        ),
        (
            "400 invalid_request_error",
            openai(400, "invalid_request_error", None),
            bad(Reason::InvalidRequest),
            Served::OtherError,
        ),
        (
            "422",
            openai(422, "invalid_request_error", None),
            bad(Reason::InvalidRequest),
            Served::OtherError,
        ),
        (
            "400 content policy",
            openai(
                400,
                "invalid_request_error",
                Some("content_policy_violation"),
            ),
            bad(Reason::ContentPolicy),
            Served::OtherError,
        ),
        (
            "401",
            openai(401, "invalid_request_error", Some("invalid_api_key")),
            perm(Reason::Auth),
            Served::OtherError,
        ),
        (
            "403",
            MockFault::Error(ErrorReply::anthropic(403, "permission_error", "no")),
            perm(Reason::Auth),
            Served::OtherError,
        ),
        (
            "404 model not found",
            openai(404, "invalid_request_error", Some("model_not_found")),
            perm(Reason::NotFound),
            Served::OtherError,
        ),
        (
            "408",
            openai(408, "timeout", None),
            tr(Reason::Timeout),
            Served::OtherError,
        ),
        (
            "409",
            openai(409, "conflict", None),
            tr(Reason::Conflict),
            Served::OtherError,
        ),
        (
            "500",
            MockFault::server_error(500),
            tr(Reason::ServerError),
            Served::ServerError,
        ),
        (
            "502",
            MockFault::server_error(502),
            tr(Reason::ServerError),
            Served::ServerError,
        ),
        (
            "503",
            MockFault::server_error(503),
            tr(Reason::Unavailable),
            Served::Unavailable,
        ),
        (
            "504",
            MockFault::server_error(504),
            tr(Reason::ServerError),
            Served::ServerError,
        ),
        (
            "529 overloaded_error",
            MockFault::overloaded(),
            tr(Reason::Overloaded),
            Served::Overloaded,
        ),
        (
            "503 with x-should-retry: false",
            MockFault::Error(
                ErrorReply::openai(503, "server_error", None, "no")
                    .header("x-should-retry", "false"),
            ),
            perm(Reason::ServerSaidNoRetry),
            Served::Unavailable,
        ),
        (
            "400 with x-should-retry: true",
            MockFault::Error(
                ErrorReply::openai(400, "invalid_request_error", None, "x")
                    .header("x-should-retry", "true"),
            ),
            tr(Reason::InvalidRequest),
            Served::OtherError,
        ),
        (
            "timeout before the first byte",
            MockFault::Hang,
            tr(Reason::Timeout),
            Served::Hang,
        ),
        (
            "connection reset",
            MockFault::Reset,
            tr(Reason::Network),
            Served::Reset,
        ),
    ];
    for (name, fault, expected, served) in rows {
        let server = MockServer::start(FaultScript::new().then(fault))
            .await
            .unwrap();
        let err = client(&server)
            .oneshot(ChatRequest::user("hello"))
            .await
            .expect_err(name);
        assert_eq!(classify(err), expected, "{name}");
        let stats = server.stats();
        assert_eq!(stats.total, 1, "{name}: requests");
        assert_eq!(stats.get(served), 1, "{name}: served as {served:?}");
    }
}

#[tokio::test]
async fn connect_failure_is_transient_connect() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = OpenAiClient::builder(format!("http://127.0.0.1:{port}/v1"))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = client.oneshot(ChatRequest::user("hi")).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert_eq!(classify(err), tr(Reason::Connect));
}

#[tokio::test]
async fn error_keeps_status_type_code_headers_and_an_excerpt() {
    let server = MockServer::start(FaultScript::new().then(MockFault::insufficient_quota()))
        .await
        .unwrap();
    let err = client(&server)
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    use llm_resilience::classify::HttpView;
    assert_eq!(err.kind(), ClientErrorKind::Status);
    assert_eq!(err.status_code(), Some(429));
    assert_eq!(err.error_type(), Some("insufficient_quota"));
    assert_eq!(err.error_code(), Some("insufficient_quota"));
    assert_eq!(err.header("x-request-id"), Some("req_mock"));
    // Only the headers that matter are kept.
    assert_eq!(err.header("content-type"), None);
    let server = MockServer::start(
        FaultScript::new().then(MockFault::rate_limited(Some(Duration::from_millis(1500)))),
    )
    .await
    .unwrap();
    let limited = client(&server)
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(limited.header("retry-after-ms"), Some("1500"));
    assert_eq!(limited.header("retry-after"), Some("2"));
    assert!(err.body_excerpt().unwrap().contains("insufficient_quota"));
    // Display names the status and code, never the message or body.
    let text = err.to_string();
    assert!(
        text.contains("429") && text.contains("insufficient_quota"),
        "{text}"
    );
    assert!(!text.contains("billing details"), "{text}");
}

#[tokio::test]
async fn completion_exposes_content_usage_and_rate_limit_headers() {
    let server = MockServer::start(FaultScript::new().reply_words(5).then(MockFault::Length))
        .await
        .unwrap();
    let mut c = client(&server);
    // finish_reason: length is not an error.
    let first = c
        .ready()
        .await
        .unwrap()
        .call(ChatRequest::user("hi"))
        .await
        .unwrap();
    assert_eq!(first.finish_reason(), Some("length"));
    let resp = c
        .ready()
        .await
        .unwrap()
        .call(ChatRequest::user("hello there").model("other-model"))
        .await
        .unwrap();
    assert_eq!(resp.content().split_whitespace().count(), 5);
    assert_eq!(resp.finish_reason(), Some("stop"));
    assert_eq!(resp.model, "other-model");
    let usage = resp.usage.expect("usage");
    assert_eq!(usage.completion_tokens, 5);
    assert_eq!(usage.total_tokens, usage.prompt_tokens + 5);
    assert_eq!(resp.rate_limit.limit_requests, Some(10_000));
    assert_eq!(resp.rate_limit.remaining_requests, Some(10_000 - 2));
    assert!(resp.rate_limit.reset_requests.is_some());
    assert_eq!(resp.request_id.as_deref(), Some("req_mock"));
    assert_eq!(server.stats().get(Served::Ok), 2);
    let first_total = first.usage.expect("usage").total_tokens;
    assert_eq!(
        server.stats().tokens,
        u64::from(first_total) + u64::from(usage.total_tokens)
    );
}

#[tokio::test]
async fn the_servers_own_rate_limit_answers_429_with_a_hint() {
    let server = MockServer::start(FaultScript::new().requests_per_minute(2))
        .await
        .unwrap();
    let c = client(&server);
    for _ in 0..2 {
        c.clone().oneshot(ChatRequest::user("hi")).await.unwrap();
    }
    let err = c
        .clone()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    match classify(err) {
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(wait),
        } => assert!(wait <= Duration::from_secs(60)),
        other => panic!("expected a rate limit with a hint, got {other:?}"),
    }
    let stats = server.stats();
    assert_eq!(
        (stats.get(Served::Ok), stats.get(Served::LimitExceeded)),
        (2, 1)
    );
}

#[tokio::test]
async fn debug_output_never_contains_the_key() {
    let server = MockServer::start(FaultScript::new().require_api_key(KEY))
        .await
        .unwrap();
    let c = client(&server);
    // The key reaches the server ...
    c.clone().oneshot(ChatRequest::user("hi")).await.unwrap();
    // ... and a wrong key is refused as auth.
    let wrong = OpenAiClient::new(server.base_url(), "sk-wrong").unwrap();
    let err = wrong
        .clone()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    let err_text = format!("{err:?} {err}");
    assert_eq!(classify(err), perm(Reason::Auth));
    let wrapped = RetryLayer::llm_defaults().layer(c.clone());
    let builder = OpenAiClient::builder(server.base_url()).api_key(KEY);
    for text in [
        format!("{c:?}"),
        format!("{c:#?}"),
        format!("{:?}", c.streaming()),
        format!("{wrapped:?}"),
        format!("{builder:?}"),
        err_text,
    ] {
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains("DO-NOT-LEAK"), "{text}");
    }
    assert!(format!("{c:?}").contains("<redacted>"));
}

#[tokio::test]
async fn the_client_keeps_the_tower_contract() {
    let server = MockServer::start(FaultScript::new()).await.unwrap();
    let c = client(&server);
    contract::check_service(|| c.clone(), || ChatRequest::user("hi")).await;
    let s = c.streaming();
    contract::check_service(|| s.clone(), || ChatRequest::user("hi")).await;
    assert!(server.stats().get(Served::Ok) >= 8);
}

#[tokio::test]
async fn seeded_fault_rates_count_every_request() {
    let script = || {
        FaultScript::new()
            .seed(11)
            .rate(MockFault::server_error(500), 0.3)
            .rate(MockFault::rate_limited(None), 0.2)
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let server = MockServer::start(script()).await.unwrap();
        let c = client(&server);
        let mut outcomes = Vec::new();
        for _ in 0..40 {
            let r = c.clone().oneshot(ChatRequest::user("hi")).await;
            outcomes.push(r.err().and_then(|e| e.status_code()));
        }
        let stats = server.stats();
        assert_eq!(stats.total, 40);
        assert_eq!(
            stats.get(Served::Ok) + stats.get(Served::ServerError) + stats.get(Served::RateLimited),
            40
        );
        assert_eq!(
            outcomes.iter().filter(|o| **o == Some(500)).count() as u64,
            stats.get(Served::ServerError)
        );
        assert!(stats.get(Served::ServerError) > 0 && stats.get(Served::RateLimited) > 0);
        runs.push(outcomes);
    }
    assert_eq!(runs[0], runs[1], "the same seed gives the same answers");
}
