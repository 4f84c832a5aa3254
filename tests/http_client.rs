//! The client adapter over real HTTP on loopback, against the fault-injecting
//! mock server: classification of every REFERENCE.md §1 row, Retry-After end
//! to end, streaming failures, key redaction and the tower contract.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{ChatRequest, ClientError, ClientErrorKind, OpenAiClient};
use llm_resilience::retry::{RetryEvent, RetryEventKind, RetryLayer};
use llm_resilience::testing::contract;
use llm_resilience::testing::mock_server::{
    ErrorReply, FaultScript, MockFault, MockServer, Served,
};
use llm_resilience::Error;
use tower::{Layer, Service, ServiceExt};

const KEY: &str = "sk-test-DO-NOT-LEAK-1234567890";

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key(KEY)
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

fn classify(err: ClientError) -> Outcome {
    let err = Error::from_inner(err);
    Classify::<()>::classify(&LlmClassifier::new(), Err(&err))
}

fn tr(reason: Reason) -> Outcome {
    Outcome::transient(reason)
}

fn perm(reason: Reason) -> Outcome {
    Outcome::permanent(reason)
}

fn bad(reason: Reason) -> Outcome {
    Outcome::BadRequest { reason }
}

fn openai(status: u16, t: &str, code: Option<&str>) -> MockFault {
    MockFault::Error(ErrorReply::openai(status, t, code, "mock"))
}

/// Every row of REFERENCE.md §1 that an HTTP server can produce, through the
/// real client and the LLM classifier.
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

type Events = Arc<Mutex<Vec<RetryEvent>>>;

fn retry_layer(events: &Events) -> RetryLayer {
    let events = Arc::clone(events);
    RetryLayer::builder()
        .max_attempts(3)
        .seed(7)
        .on_event(move |e| events.lock().unwrap().push(*e))
        .build()
        .unwrap()
}

#[tokio::test]
async fn retry_after_is_honoured_end_to_end() {
    let hint = Duration::from_millis(60);
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::rate_limited(Some(hint)))
            .then(MockFault::rate_limited(Some(hint))),
    )
    .await
    .unwrap();
    let events = Events::default();
    let svc = retry_layer(&events).layer(client(&server));
    let resp = svc.oneshot(ChatRequest::user("hi")).await.unwrap();
    assert!(!resp.content().is_empty());
    let events = events.lock().unwrap().clone();
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.kind == RetryEventKind::Retrying)
        .collect();
    assert_eq!(retries.len(), 2, "{events:?}");
    for r in &retries {
        assert_eq!(r.reason, Reason::RateLimited);
        // The decision (not a measured time): never shorter than the hint.
        assert!(r.delay.unwrap() >= hint, "{r:?}");
    }
    assert_eq!(events.last().unwrap().kind, RetryEventKind::Recovered);
    assert_eq!(events.last().unwrap().attempt, 3);
    let stats = server.stats();
    assert_eq!(stats.total, 3);
    assert_eq!(stats.get(Served::RateLimited), 2);
    assert_eq!(stats.get(Served::Ok), 1);
}

#[tokio::test]
async fn permanent_and_bad_requests_are_sent_exactly_once() {
    for (fault, quota) in [
        (MockFault::insufficient_quota(), true),
        (MockFault::context_length(), false),
    ] {
        let server = MockServer::start(FaultScript::new().then(fault))
            .await
            .unwrap();
        let events = Events::default();
        let err = retry_layer(&events)
            .layer(client(&server))
            .oneshot(ChatRequest::user("hi"))
            .await
            .unwrap_err();
        match (quota, &err) {
            (
                true,
                Error::Permanent {
                    reason: Reason::Quota,
                    attempts: 1,
                    ..
                },
            ) => {}
            (
                false,
                Error::BadRequest {
                    reason: Reason::ContextLength,
                    attempts: 1,
                    ..
                },
            ) => {}
            _ => panic!("unexpected {err:?}"),
        }
        assert!(err.upstream_ref::<ClientError>().is_some());
        assert_eq!(server.stats().total, 1);
    }
}

#[tokio::test]
async fn a_hint_beyond_the_cap_ends_at_once() {
    let server = MockServer::start(
        FaultScript::new().then(MockFault::rate_limited(Some(Duration::from_secs(600)))),
    )
    .await
    .unwrap();
    let err = RetryLayer::llm_defaults()
        .layer(client(&server))
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    match err {
        Error::RetryAfterTooLong {
            retry_after,
            attempts: 1,
            ..
        } => {
            assert_eq!(retry_after, Duration::from_secs(600));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.stats().total, 1);
}

#[tokio::test]
async fn transient_5xx_and_resets_are_retried_until_success() {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::server_error(503))
            .then(MockFault::Reset),
    )
    .await
    .unwrap();
    let events = Events::default();
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(
            llm_resilience::backoff::Backoff::builder()
                .initial(Duration::from_millis(5))
                .max_delay(Duration::from_millis(10))
                .build()
                .unwrap(),
        )
        .on_event({
            let events = Arc::clone(&events);
            move |e| events.lock().unwrap().push(*e)
        })
        .build()
        .unwrap();
    layer
        .layer(client(&server))
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let reasons: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == RetryEventKind::Retrying)
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons, [Reason::Unavailable, Reason::Network]);
    let stats = server.stats();
    assert_eq!(
        stats.nonzero(),
        [
            (Served::Ok, 1),
            (Served::Unavailable, 1),
            (Served::Reset, 1)
        ]
    );
}

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
