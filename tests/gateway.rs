//! The gateway over real HTTP on loopback: a reqwest client and the crate's
//! own `OpenAiClient` → the gateway (its pipeline from a TOML config) → two
//! mock LLM servers with fault scripts. Whole and streamed answers,
//! failover when the primary is down, 429 with `Retry-After` when every
//! target throttles, a mid-stream failure ending the caller's stream with
//! an error event, `/healthz` and `/metrics`.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "axum", feature = "config", feature = "testing"))]

mod gateway_support;

use std::time::Duration;

use futures::StreamExt;
use llm_resilience::breaker::State;
use llm_resilience::client::{ChatRequest, ClientErrorKind, OpenAiClient};
use llm_resilience::testing::mock_server::{FaultScript, MockFault, Served};
use serde_json::{json, Value};
use tower::ServiceExt;

use gateway_support::{start, start_edited, Running};

fn ask(stream: bool) -> Value {
    json!({
        "model": "whatever-the-caller-names",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16,
        "stream": stream,
    })
}

async fn post(gw: &Running, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.base_url))
        .json(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn crate_client(gw: &Running) -> OpenAiClient {
    OpenAiClient::builder(gw.base_url.clone())
        .api_key("sk-gateway")
        .model("gpt-4o-mini")
        .total_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_whole_answer_comes_back_as_the_target_sent_it() {
    let gw = start(FaultScript::new(), FaultScript::new()).await;
    let resp = post(&gw, &ask(false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    // The target's configured model was asked for, not the caller's.
    let sent = gw.primary.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body["model"], "primary-model");

    // The crate's own client reads it as from any provider.
    let reply = crate_client(&gw)
        .oneshot(ChatRequest::user("hi").max_tokens(8))
        .await
        .unwrap();
    assert!(!reply.content().is_empty());
    assert_eq!(gw.primary.stats().get(Served::Ok), 2);
    assert_eq!(gw.secondary.total(), 0);
}

#[tokio::test]
async fn a_streamed_answer_is_forwarded_as_openai_events() {
    let gw = start(FaultScript::new().chunks(4), FaultScript::new()).await;
    let resp = post(&gw, &ask(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let events = events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 4, "{body}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c.get("error").is_none()));
    // The last chunk carries the usage.
    assert!(chunks.last().unwrap()["usage"]["total_tokens"].is_u64());

    let text = crate_client(&gw)
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap()
        .collect_text()
        .await
        .unwrap();
    assert!(!text.is_empty());
}

#[tokio::test]
async fn a_primary_that_is_down_moves_traffic_to_the_secondary() {
    let down = FaultScript::new().rate(MockFault::server_error(503), 1.0);
    let gw = start(down, FaultScript::new()).await;
    for i in 0..6 {
        let resp = post(&gw, &ask(i % 2 == 1)).await;
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        assert!(!body.contains("\"error\""), "{body}");
    }
    assert_eq!(gw.secondary.stats().get(Served::Ok), 6);
    // The breaker trips after 3 failures; the primary sees no more.
    assert_eq!(gw.primary.total(), 3);
    assert_eq!(
        gw.gateway.pipeline().breaker("primary").unwrap().state(),
        State::Open
    );

    let health = reqwest::get(format!("{}/healthz", gw.root)).await.unwrap();
    assert_eq!(health.status(), 200);
    let h: Value = health.json().await.unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["targets"][0]["name"], "primary");
    assert_eq!(h["targets"][0]["breaker"], "open");
    assert_eq!(h["targets"][1]["breaker"], "closed");
    assert_eq!(h["queue"]["in_flight"], 0);
}

#[tokio::test]
async fn when_every_target_throttles_the_caller_gets_429_with_retry_after() {
    let throttled =
        || FaultScript::new().rate(MockFault::rate_limited(Some(Duration::from_secs(7))), 1.0);
    let gw = start(throttled(), throttled()).await;
    let resp = post(&gw, &ask(false)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["reason"], "rate_limited");
    // Each target was asked once (one attempt each in this config).
    assert_eq!(gw.primary.total(), 1);
    assert_eq!(gw.secondary.total(), 1);

    // Streamed: the same answer, before any event.
    let resp = post(&gw, &ask(true)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
}

#[tokio::test]
async fn every_target_open_answers_503_with_the_time_to_the_next_probe() {
    let gw = start(FaultScript::new(), FaultScript::new()).await;
    for (_, b) in gw.gateway.pipeline().breakers() {
        b.force_open();
    }
    let resp = post(&gw, &ask(false)).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "circuit_open");
    assert_eq!(gw.primary.total() + gw.secondary.total(), 0);
    let health = reqwest::get(format!("{}/healthz", gw.root)).await.unwrap();
    assert_eq!(health.status(), 503);
    let h: Value = health.json().await.unwrap();
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["targets"][0]["breaker"], "forced_open");
}

#[tokio::test]
async fn a_mid_stream_failure_ends_the_stream_with_an_error_event() {
    let drop_after_two = FaultScript::new()
        .chunks(6)
        .rate(MockFault::MidStreamDrop { after_chunks: 2 }, 1.0);
    let gw = start(drop_after_two, FaultScript::new()).await;
    let resp = post(&gw, &ask(true)).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let events = events(&body);
    // Two chunks, then the error; no [DONE], nothing from the secondary
    // (output had reached the caller: no failover after it).
    assert_eq!(events.len(), 3, "{body}");
    let last: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(!body.contains("[DONE]"));
    assert_eq!(gw.secondary.total(), 0);

    // The crate's client reads the event as the stream's error, keeping
    // what arrived.
    let mut stream = crate_client(&gw)
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(item) = stream.next().await {
        got.push(item);
    }
    let err = got.pop().unwrap().unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamError);
    assert_eq!(err.partial().len(), 2);
}

#[tokio::test]
async fn bad_bodies_and_keys_are_answered_in_the_openai_shape() {
    let gw = start(FaultScript::new(), FaultScript::new()).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.base_url))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["reason"], "invalid_request");

    let locked = gateway_support::start_with_key(FaultScript::new(), "sk-gw").await;
    let resp = post(&locked, &ask(false)).await;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["reason"], "auth");
    let ok = reqwest::Client::new()
        .post(format!("{}/chat/completions", locked.base_url))
        .bearer_auth("sk-gw")
        .json(&ask(false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(gw.primary.total() + locked.primary.total(), 1);
}

#[tokio::test]
async fn metrics_are_served_in_the_prometheus_format() {
    let gw = start(
        FaultScript::new().rate(MockFault::server_error(503), 1.0),
        FaultScript::new(),
    )
    .await;
    assert_eq!(post(&gw, &ask(false)).await.status(), 200);
    let resp = reqwest::get(format!("{}/metrics", gw.root)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    // The fallback's decisions, labelled by target: the primary failed and
    // the secondary answered.
    assert!(
        text.contains("# TYPE llm_resilience_fallback_decisions_total counter"),
        "{text}"
    );
    let line = |target: &str, decision: &str| {
        text.lines().any(|l| {
            l.starts_with("llm_resilience_fallback_decisions_total{")
                && l.contains(&format!("target=\"{target}\""))
                && l.contains(&format!("decision=\"{decision}\""))
        })
    };
    assert!(line("secondary", "answered"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("llm_resilience_retry_")),
        "{text}"
    );
}

#[tokio::test]
async fn a_deadline_that_passes_answers_504() {
    let hang = || FaultScript::new().rate(MockFault::Hang, 1.0);
    let gw = start_edited(hang(), hang(), |c| {
        c.deadline = Some(Duration::from_millis(600));
        c.retry.attempt_timeout = Some(Duration::from_millis(300));
    })
    .await;
    for stream in [false, true] {
        let resp = post(&gw, &ask(stream)).await;
        assert_eq!(resp.status(), 504);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "timeout");
    }
}

#[tokio::test]
async fn tool_calls_come_through_whole_and_streamed() {
    let gw = start(FaultScript::new(), FaultScript::new()).await;
    let weather = llm_resilience::client::Tool::function(
        "get_weather",
        "The weather in a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    );
    let req = ChatRequest::user("Weather in Paris?").tool(weather);
    let client = crate_client(&gw);
    let whole = client.clone().oneshot(req.clone()).await.unwrap();
    let streamed = client
        .streaming()
        .oneshot(req)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    for reply in [whole, streamed] {
        let calls = reply.tool_calls();
        assert!(!calls.is_empty());
        assert_eq!(calls[0].function.name, "get_weather");
        assert!(!calls[0].id.is_empty());
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert!(args["city"].is_string(), "{args}");
    }
}

#[tokio::test]
async fn many_concurrent_callers_each_get_one_whole_answer() {
    // A flaky primary (30 % 503s, seeded): every caller still gets one
    // complete answer, whole or streamed, from one target or the other.
    let flaky = FaultScript::new()
        .seed(5)
        .rate(MockFault::server_error(503), 0.3);
    let gw = start(flaky, FaultScript::new()).await;
    let calls = (0..40).map(|i| {
        let gw = &gw;
        async move {
            let resp = post(gw, &ask(i % 2 == 0)).await;
            assert_eq!(resp.status(), 200);
            let body = resp.text().await.unwrap();
            if i % 2 == 0 {
                assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
                assert!(!body.contains("\"error\""), "{body}");
            } else {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert!(v["choices"][0]["message"]["content"].is_string());
            }
        }
    });
    futures::future::join_all(calls).await;
    let served = gw.primary.stats().get(Served::Ok) + gw.secondary.stats().get(Served::Ok);
    assert_eq!(served, 40);
}

#[test]
fn the_shipped_gateway_config_builds() {
    let mut config = llm_resilience::pipeline::PipelineConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gateway.toml"
    ))
    .unwrap();
    assert_eq!(config.targets.len(), 2);
    // The keys are read from the environment; without them, none is sent.
    for t in &mut config.targets {
        assert!(t.api_key_env.is_some());
        t.api_key_env = None;
    }
    let gateway = llm_resilience::axum::gateway::Gateway::from_config(&config).unwrap();
    let names: Vec<&str> = gateway.pipeline().breakers().map(|(n, _)| n).collect();
    assert_eq!(names, ["primary", "secondary"]);
}
