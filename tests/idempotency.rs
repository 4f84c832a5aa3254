//! Idempotency keys and retry counts over real HTTP on loopback: the mock
//! LLM server records the headers of every request it receives, and the
//! crate's retry layer drives the crate's clients through scripted faults.
//!
//! Real time with short backoffs; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use futures::StreamExt;
use llm_resilience::anthropic::{AnthropicClient, MessagesRequest, MessagesResponse};
use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::client::{
    ChatRequest, ChatResponse, OpenAiClient, IDEMPOTENCY_KEY_HEADER, RETRY_COUNT_HEADER,
};
use llm_resilience::pipeline::AgentPipeline;
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, RecordedRequest};
use reqwest::header::HeaderValue;
use tower::{Layer, ServiceExt};

fn fast() -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(2))
        .max_delay(Duration::from_millis(5))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn retry() -> RetryLayer {
    RetryLayer::builder()
        .max_attempts(3)
        .backoff(fast())
        .throttle_backoff(fast())
        .seed(3)
        .build()
        .unwrap()
}

/// 503, 503, then answers; every later request answers at once.
async fn flaky_server() -> MockServer {
    MockServer::start(FaultScript::new().then_n(2, MockFault::server_error(503)))
        .await
        .unwrap()
}

fn openai(server: &MockServer) -> llm_resilience::client::OpenAiClientBuilder {
    OpenAiClient::builder(server.base_url())
        .api_key("sk-test")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
}

fn anthropic(server: &MockServer) -> llm_resilience::anthropic::AnthropicClientBuilder {
    AnthropicClient::builder()
        .base_url(server.anthropic_base_url())
        .api_key("sk-ant-test")
        .model("claude-mock")
        .connect_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
}

/// Every value of `name` in each recorded request, in order.
fn values(reqs: &[RecordedRequest], name: &str) -> Vec<Vec<String>> {
    reqs.iter()
        .map(|r| {
            r.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        })
        .collect()
}

/// The one value of `name` in each request (fails if a request has none or
/// several).
fn one(reqs: &[RecordedRequest], name: &str) -> Vec<String> {
    values(reqs, name)
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            assert_eq!(v.len(), 1, "request {i}: {name} sent {} times", v.len());
            v.into_iter().next().unwrap()
        })
        .collect()
}

fn is_uuid_v4(key: &str) -> bool {
    let groups: Vec<&str> = key.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && key
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && key.as_bytes()[14] == b'4'
}

/// Three attempts of the first logical request (503, 503, 200) and one of
/// the second: one key shared by the first three, another for the fourth;
/// retry counts 0, 1, 2 and 0.
fn assert_one_key_per_logical_request(reqs: &[RecordedRequest]) {
    assert_eq!(reqs.len(), 4, "three attempts, then one");
    let keys = one(reqs, IDEMPOTENCY_KEY_HEADER);
    assert!(keys.iter().all(|k| is_uuid_v4(k)), "{keys:?}");
    assert_eq!(keys[0], keys[1], "a retry keeps the key");
    assert_eq!(keys[1], keys[2], "a retry keeps the key");
    assert_ne!(keys[3], keys[0], "a new logical request has a new key");
    assert_eq!(one(reqs, RETRY_COUNT_HEADER), ["0", "1", "2", "0"]);
}

#[tokio::test]
async fn openai_one_key_across_retries_and_a_new_one_per_request() {
    let server = flaky_server().await;
    let svc = retry().layer(openai(&server).build().unwrap());
    let req = ChatRequest::user("Say hello");
    // The same request value twice: two logical requests.
    svc.clone().oneshot(req.clone()).await.unwrap();
    svc.clone().oneshot(req).await.unwrap();
    assert_one_key_per_logical_request(&server.requests());
}

#[tokio::test]
async fn anthropic_one_key_across_retries_and_a_new_one_per_request() {
    let server = flaky_server().await;
    let svc = retry().layer(anthropic(&server).build().unwrap());
    let req = MessagesRequest::user("Say hello");
    svc.clone().oneshot(req.clone()).await.unwrap();
    svc.clone().oneshot(req).await.unwrap();
    assert_one_key_per_logical_request(&server.requests());
}

#[tokio::test]
async fn streaming_clients_send_them_too() {
    let server = flaky_server().await;
    let svc = retry().layer(openai(&server).build().unwrap().streaming());
    let mut stream = svc.clone().oneshot(ChatRequest::user("hi")).await.unwrap();
    while stream.next().await.is_some() {}
    svc.oneshot(ChatRequest::user("hi")).await.unwrap();
    assert_one_key_per_logical_request(&server.requests());

    let server = flaky_server().await;
    let svc = retry().layer(anthropic(&server).build().unwrap().streaming());
    let stream = svc
        .clone()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    stream.collect_message().await.unwrap();
    svc.oneshot(MessagesRequest::user("hi")).await.unwrap();
    assert_one_key_per_logical_request(&server.requests());
}

#[tokio::test]
async fn switched_off_no_header_is_sent() {
    let server = flaky_server().await;
    let client = openai(&server)
        .send_idempotency_key(false)
        .send_retry_count(false)
        .build()
        .unwrap();
    retry()
        .layer(client)
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let server_a = flaky_server().await;
    let client = anthropic(&server_a)
        .send_idempotency_key(false)
        .send_retry_count(false)
        .build()
        .unwrap();
    retry()
        .layer(client)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    for reqs in [server.requests(), server_a.requests()] {
        assert_eq!(reqs.len(), 3);
        for name in [IDEMPOTENCY_KEY_HEADER, RETRY_COUNT_HEADER] {
            assert!(values(&reqs, name).iter().all(Vec::is_empty), "{name}");
        }
    }
}

#[tokio::test]
async fn each_switch_is_independent() {
    let server = flaky_server().await;
    let client = openai(&server).send_retry_count(false).build().unwrap();
    retry()
        .layer(client)
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let server_a = flaky_server().await;
    let client = anthropic(&server_a)
        .send_idempotency_key(false)
        .build()
        .unwrap();
    retry()
        .layer(client)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    let reqs = server.requests();
    let keys = one(&reqs, IDEMPOTENCY_KEY_HEADER);
    assert!(keys.iter().all(|k| *k == keys[0]));
    assert!(values(&reqs, RETRY_COUNT_HEADER).iter().all(Vec::is_empty));
    let reqs = server_a.requests();
    assert!(values(&reqs, IDEMPOTENCY_KEY_HEADER)
        .iter()
        .all(Vec::is_empty));
    assert_eq!(one(&reqs, RETRY_COUNT_HEADER), ["0", "1", "2"]);
}

/// Without a retry layer every call is its own logical request, a retry by
/// hand included: a new key each time, and a count of 0 (the client cannot
/// know the caller's loop).
#[tokio::test]
async fn without_a_retry_layer_each_call_is_a_logical_request() {
    let server = MockServer::start(FaultScript::new()).await.unwrap();
    let client = openai(&server).build().unwrap();
    let req = ChatRequest::user("hi");
    for _ in 0..3 {
        client.clone().oneshot(req.clone()).await.unwrap();
    }
    let reqs = server.requests();
    let keys = one(&reqs, IDEMPOTENCY_KEY_HEADER);
    assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
    assert_eq!(one(&reqs, RETRY_COUNT_HEADER), ["0", "0", "0"]);
}

/// A caller that retries by hand and wants one logical request pins the
/// key on the request; an edit drops it.
#[tokio::test]
async fn a_pinned_key_goes_on_every_attempt_and_every_call_until_an_edit() {
    let server = flaky_server().await;
    let svc = retry().layer(openai(&server).build().unwrap());
    let pinned = HeaderValue::from_static("caller-key-42");
    let req = ChatRequest::user("hi").idempotency_key(pinned.clone());
    svc.clone().oneshot(req.clone()).await.unwrap();
    svc.clone().oneshot(req.clone()).await.unwrap();
    let edited = req.max_tokens(10);
    assert!(edited.idempotency_key_value().is_none());
    svc.clone().oneshot(edited).await.unwrap();

    let server_a = flaky_server().await;
    let svc = retry().layer(anthropic(&server_a).build().unwrap());
    let req = MessagesRequest::user("hi").idempotency_key(pinned);
    svc.clone().oneshot(req.clone()).await.unwrap();
    assert!(req.clone().model("other").idempotency_key_value().is_none());

    let reqs = server.requests();
    let keys = one(&reqs, IDEMPOTENCY_KEY_HEADER);
    assert_eq!(keys[..4], ["caller-key-42"; 4]);
    assert!(is_uuid_v4(&keys[4]), "the edited request gets a drawn key");
    assert_eq!(one(&reqs, RETRY_COUNT_HEADER), ["0", "1", "2", "0", "0"]);
    assert_eq!(
        one(&server_a.requests(), IDEMPOTENCY_KEY_HEADER),
        ["caller-key-42"; 3]
    );
}

/// A default header of the same name is the caller's: sent once, in place
/// of the client's.
#[tokio::test]
async fn a_default_header_of_the_same_name_replaces_the_clients() {
    let server = flaky_server().await;
    let client = openai(&server)
        .header("Idempotency-Key", "static")
        .header("x-stainless-retry-count", "7")
        .build()
        .unwrap();
    retry()
        .layer(client)
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let reqs = server.requests();
    assert_eq!(one(&reqs, IDEMPOTENCY_KEY_HEADER), ["static"; 3]);
    assert_eq!(one(&reqs, RETRY_COUNT_HEADER), ["7"; 3]);
}

/// Under the agent pipeline (queue, fallback, per-target retry and
/// breaker): each target's retry layer makes its own logical request, so
/// the primary's two attempts share a key and the secondary gets another.
#[tokio::test]
async fn under_the_agent_pipeline_each_target_has_its_own_logical_request() {
    let primary = MockServer::start(FaultScript::new().rate(MockFault::server_error(503), 1.0))
        .await
        .unwrap();
    let secondary = MockServer::start(FaultScript::new()).await.unwrap();
    let agent: AgentPipeline<OpenAiClient, ChatRequest, ChatResponse> = AgentPipeline::builder()
        .target("primary", openai(&primary).build().unwrap())
        .fallback("secondary", openai(&secondary).build().unwrap())
        .queue(16, 4)
        .deadline(Duration::from_secs(10))
        .retry(|r| r.max_attempts(2).backoff(fast()).throttle_backoff(fast()))
        .build()
        .unwrap();
    agent
        .clone()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let p = primary.requests();
    let s = secondary.requests();
    let pk = one(&p, IDEMPOTENCY_KEY_HEADER);
    let sk = one(&s, IDEMPOTENCY_KEY_HEADER);
    assert_eq!(pk.len(), 2);
    assert_eq!(pk[0], pk[1]);
    assert_eq!(sk.len(), 1);
    assert_ne!(sk[0], pk[0]);
    assert_eq!(one(&p, RETRY_COUNT_HEADER), ["0", "1"]);
    assert_eq!(one(&s, RETRY_COUNT_HEADER), ["0"]);
}

#[tokio::test]
async fn the_anthropic_pipeline_too() {
    let primary = MockServer::start(FaultScript::new().rate(MockFault::overloaded(), 1.0))
        .await
        .unwrap();
    let secondary = MockServer::start(FaultScript::new()).await.unwrap();
    let agent: AgentPipeline<AnthropicClient, MessagesRequest, MessagesResponse> =
        AgentPipeline::builder()
            .target("primary", anthropic(&primary).build().unwrap())
            .fallback("secondary", anthropic(&secondary).build().unwrap())
            .deadline(Duration::from_secs(10))
            .retry(|r| r.max_attempts(3).backoff(fast()).throttle_backoff(fast()))
            .build()
            .unwrap();
    agent.oneshot(MessagesRequest::user("hi")).await.unwrap();
    let p = primary.requests();
    let pk = one(&p, IDEMPOTENCY_KEY_HEADER);
    assert_eq!(pk.len(), 3);
    assert!(pk.iter().all(|k| *k == pk[0]));
    assert_eq!(one(&p, RETRY_COUNT_HEADER), ["0", "1", "2"]);
    let sk = one(&secondary.requests(), IDEMPOTENCY_KEY_HEADER);
    assert_ne!(sk, [pk[0].clone()]);
}
