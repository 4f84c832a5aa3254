//! What a service built on the crate answers its own callers, over real
//! HTTP on loopback: an axum service fronts the mock LLM server through the
//! crate's layers, and a real HTTP client (reqwest) reads every answer's
//! status, `Retry-After` and OpenAI-shaped body.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "axum", feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use llm_resilience::axum::ErrorMapping;
use llm_resilience::backoff::Backoff;
use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::chaos::Latency;
use llm_resilience::classify::{HttpError, Reason};
use llm_resilience::client::{ChatRequest, ChatResponse, OpenAiClient};
use llm_resilience::queue::{QueueLayer, WhenFull};
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::errors;
use llm_resilience::testing::mock_server::{ErrorReply, FaultScript, MockFault, MockServer};
use llm_resilience::Error;
use serde_json::Value;
use tower::util::BoxCloneSyncService as BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Agent = BoxCloneService<ChatRequest, ChatResponse, Error>;

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key("sk-edge-test")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(5))
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn fast_backoff() -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .build()
        .unwrap()
}

/// Retry (2 attempts, fast backoff) over a breaker over the client.
fn pipeline(server: &MockServer, breaker: CircuitBreakerLayer) -> Agent {
    let retry = RetryLayer::builder()
        .max_attempts(2)
        .backoff(fast_backoff())
        .throttle_backoff(fast_backoff())
        .seed(7)
        .build()
        .unwrap();
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(retry)
            .layer(breaker)
            .service(client(server)),
    )
}

async fn chat(State(agent): State<Agent>, prompt: String) -> Result<String, Error> {
    let reply = agent
        .oneshot(ChatRequest::user(prompt).max_tokens(8))
        .await?;
    Ok(reply.content().to_owned())
}

/// Serves `app` on loopback; returns its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

async fn post_prompt(url: &str, prompt: &str) -> Answer {
    let resp = reqwest::Client::new()
        .post(url)
        .body(prompt.to_owned())
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

/// Every error body is the OpenAI shape, filled, and quotes nothing.
fn check_shape(a: &Answer, code: &str, error_type: &str, reason: &str) {
    let e = &a.body["error"];
    assert_eq!(e["code"], code, "{}", a.body);
    assert_eq!(e["type"], error_type, "{}", a.body);
    assert_eq!(e["reason"], reason, "{}", a.body);
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e.get("param").is_some());
    let text = a.body.to_string();
    for secret in [
        "SECRET-PROMPT",
        "sk-edge-test",
        "maximum context",
        "quota, please",
    ] {
        assert!(!text.contains(secret), "{secret} leaked in {text}");
    }
}

async fn app_over(script: FaultScript, breaker: CircuitBreakerLayer) -> (String, MockServer) {
    let server = MockServer::start(script).await.unwrap();
    let agent = pipeline(&server, breaker);
    let app = Router::new().route("/chat", post(chat)).with_state(agent);
    (format!("{}/chat", serve(app).await), server)
}

fn lenient_breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .no_failure_rate()
        .no_consecutive_failures()
        .trip_on(&[])
        .build()
        .unwrap()
}

#[tokio::test]
async fn throttling_that_outlasts_the_retries_is_429_with_the_providers_hint() {
    let script = FaultScript::new().rate(
        MockFault::rate_limited(Some(Duration::from_millis(30))),
        1.0,
    );
    let (url, server) = app_over(script, lenient_breaker()).await;
    let a = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(a.status, 429);
    // The provider said 30 ms: whole seconds, rounded up.
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    check_shape(&a, "retries_exhausted", "rate_limit_error", "rate_limited");
    assert_eq!(server.total(), 2);
}

#[tokio::test]
async fn exhausted_quota_is_429_with_the_reset_hint() {
    let quota = ErrorReply::openai(
        429,
        "insufficient_quota",
        Some("insufficient_quota"),
        "You exceeded your current quota, please check your plan",
    )
    .header("retry-after", "42");
    let script = FaultScript::new().rate(MockFault::Error(quota), 1.0);
    let (url, server) = app_over(script, lenient_breaker()).await;
    let a = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.retry_after.as_deref(), Some("42"));
    check_shape(&a, "permanent", "insufficient_quota", "quota");
    // Permanent: sent once.
    assert_eq!(server.total(), 1);
}

#[tokio::test]
async fn an_open_circuit_is_503_with_the_time_to_the_next_probe() {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .no_failure_rate()
        .open_duration(Duration::from_secs(20))
        .open_jitter(0.0)
        .build()
        .unwrap();
    let script = FaultScript::new().rate(MockFault::server_error(500), 1.0);
    let (url, server) = app_over(script, breaker).await;
    let first = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(first.status, 502);
    check_shape(
        &first,
        "retries_exhausted",
        "upstream_error",
        "server_error",
    );
    let a = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(a.status, 503);
    let wait: u64 = a.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    check_shape(&a, "circuit_open", "service_unavailable", "circuit_open");
    assert_eq!(server.total(), 2);
}

#[tokio::test]
async fn a_request_too_long_for_the_context_is_400_and_sent_once() {
    let script = FaultScript::new().rate(MockFault::context_length(), 1.0);
    let (url, server) = app_over(script, lenient_breaker()).await;
    let a = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.retry_after, None);
    check_shape(&a, "bad_request", "invalid_request_error", "context_length");
    assert_eq!(server.total(), 1);
}

#[tokio::test]
async fn a_deadline_is_504() {
    let server = MockServer::start(FaultScript::new().rate(MockFault::Hang, 1.0))
        .await
        .unwrap();
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .attempt_timeout(Duration::from_millis(50))
        .deadline(Duration::from_millis(120))
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let agent: Agent =
        BoxCloneService::new(ServiceBuilder::new().layer(retry).service(client(&server)));
    let app = Router::new().route("/chat", post(chat)).with_state(agent);
    let url = format!("{}/chat", serve(app).await);
    let a = post_prompt(&url, "SECRET-PROMPT").await;
    assert_eq!(a.status, 504);
    assert_eq!(a.body["error"]["type"], "timeout");
    assert_eq!(a.body["error"]["reason"], "timeout");
}

/// A full queue in reject mode: 503 with the default 1 s `Retry-After`, or
/// whatever an installed [`ErrorMapping`] says.
#[tokio::test]
async fn a_full_queue_is_503_with_retry_after_and_a_mapping_changes_it() {
    let server =
        MockServer::start(FaultScript::new().latency(Latency::Fixed(Duration::from_secs(2))))
            .await
            .unwrap();
    let queue = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .when_full(WhenFull::Reject)
        .build()
        .unwrap();
    let handle = queue.handle();
    let agent: Agent =
        BoxCloneService::new(ServiceBuilder::new().layer(queue).service(client(&server)));
    let mapping = ErrorMapping::builder()
        .status("queue_full", StatusCode::TOO_MANY_REQUESTS)
        .queue_full_retry_after(Duration::from_secs(5))
        .rewrite(|r| r.param = Some("gateway".into()))
        .build();
    let plain = Router::new()
        .route("/chat", post(chat))
        .with_state(agent.clone());
    let mapped = Router::new()
        .route("/chat", post(chat))
        .with_state(agent)
        .layer(mapping.layer());
    let plain = format!("{}/chat", serve(plain).await);
    let mapped = format!("{}/chat", serve(mapped).await);

    // One in flight, one waiting: the queue is full for 2 s (the test only
    // asks while it sees both).
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = plain.clone();
            tokio::spawn(async move { post_prompt(&url, "first").await })
        })
        .collect();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.total() == 0 || handle.depth() == 0 {
        assert!(tokio::time::Instant::now() < give_up);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let a = post_prompt(&plain, "SECRET-PROMPT").await;
    assert_eq!(a.status, 503);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    check_shape(&a, "queue_full", "server_overloaded", "queue_full");
    assert!(a.body["error"]["param"].is_null());

    let b = post_prompt(&mapped, "SECRET-PROMPT").await;
    assert_eq!(b.status, 429);
    assert_eq!(b.retry_after.as_deref(), Some("5"));
    check_shape(&b, "queue_full", "server_overloaded", "queue_full");
    assert_eq!(b.body["error"]["param"], "gateway");

    for t in busy {
        assert_eq!(t.await.unwrap().status, 200);
    }
}

/// The variants no scripted upstream produces, through the same server.
#[tokio::test]
async fn every_other_variant_over_http() {
    async fn fail(Path(kind): Path<String>) -> Result<String, Error> {
        let secret = || -> llm_resilience::BoxError {
            Box::new(HttpError::new(500).with_message("SECRET-PROMPT"))
        };
        Err(match kind.as_str() {
            "rate_limited" => Error::rate_limited(Duration::from_millis(1500)),
            "shutdown" => Error::Shutdown,
            "queue_timeout" => errors::queue_timeout(Duration::from_secs(3)),
            "timeout" => Error::timeout(Duration::from_secs(3)),
            "not_cloneable" => errors::not_cloneable(Reason::ServerError, secret()),
            "upstream" => Error::from_inner(secret()),
            "too_long" => errors::retry_after_too_long(
                Duration::from_secs(600),
                Duration::from_secs(120),
                1,
                Box::new(HttpError::new(503).with_header("retry-after", "600")),
            ),
            _ => errors::budget_exhausted(1, Reason::Overloaded, secret()),
        })
    }
    let base = serve(Router::new().route("/fail/{kind}", post(fail))).await;
    let cases = [
        (
            "rate_limited",
            429,
            Some("2"),
            "rate_limit_error",
            "rate_limited",
        ),
        ("shutdown", 503, None, "service_unavailable", "shutdown"),
        ("queue_timeout", 504, None, "timeout", "queue_full"),
        ("timeout", 504, None, "timeout", "timeout"),
        ("not_cloneable", 502, None, "upstream_error", "server_error"),
        ("upstream", 502, None, "upstream_error", "server_error"),
        (
            "too_long",
            503,
            Some("600"),
            "service_unavailable",
            "unavailable",
        ),
        ("budget", 502, None, "upstream_error", "overloaded"),
    ];
    for (path, status, retry_after, error_type, reason) in cases {
        let a = post_prompt(&format!("{base}/fail/{path}"), "").await;
        assert_eq!(a.status, status, "{path}");
        assert_eq!(a.retry_after.as_deref(), retry_after, "{path}");
        let code = a.body["error"]["code"].as_str().unwrap().to_owned();
        check_shape(&a, &code, error_type, reason);
    }
}
