//! The Anthropic client under a subscriber at TRACE (with `log` records
//! forwarded too): its spans appear, and neither the API key nor a prompt
//! nor a completion ever does, on success, streaming, tool use and errors.
//! Neither does `Debug` output of anything the client hands out.
//!
//! One test per binary: it installs the global subscriber.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use llm_resilience::anthropic::{AnthropicClient, MessagesRequest, Tool};
use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::mock_server::{ErrorReply, FaultScript, MockFault, MockServer};
use serde_json::json;
use tower::{Layer, ServiceExt};
use tracing_subscriber::util::SubscriberInitExt;

const KEY: &str = "sk-ant-TRACE-DO-NOT-LEAK-5555";
const PROMPT: &str = "SECRET-PROMPT-about-the-merger";
const SYSTEM: &str = "SECRET-SYSTEM-instructions";

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn trace_output_never_holds_the_key_the_prompt_or_the_completion() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish()
        .try_init()
        .unwrap();

    let server = MockServer::start(
        FaultScript::new()
            .require_api_key(KEY)
            .then(MockFault::overloaded())
            .then(MockFault::Ok)
            .then(MockFault::Ok)
            .then(MockFault::Ok)
            .then(MockFault::Error(ErrorReply::anthropic(
                400,
                "invalid_request_error",
                &format!("prompt is too long: {PROMPT}"),
            )))
            .then(MockFault::StreamErrorEvent { after_chunks: 2 }),
    )
    .await
    .unwrap();
    let client = AnthropicClient::builder()
        .base_url(server.anthropic_base_url())
        .api_key(KEY)
        .total_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let req = MessagesRequest::user(PROMPT).with_system(SYSTEM);
    let mut seen = Vec::new();

    // A retried call, a tool call, a streamed call, a failed call, a
    // stream that fails mid-way.
    let resp = RetryLayer::llm_defaults()
        .layer(client.clone())
        .oneshot(req.clone())
        .await
        .unwrap();
    let completion = resp.text();
    seen.push(format!(
        "{resp:?} {req:?} {client:?} {:?}",
        client.streaming()
    ));
    let tool = Tool::new(
        "lookup",
        "SECRET-TOOL-description",
        json!({"type": "object", "properties": {"q": {"type": "string"}}}),
    );
    let resp = client
        .clone()
        .oneshot(req.clone().tool(tool))
        .await
        .unwrap();
    seen.push(format!("{resp:?}"));
    let mut stream = client.streaming().oneshot(req.clone()).await.unwrap();
    while let Some(e) = stream.next().await {
        seen.push(format!("{:?}", e.unwrap()));
    }
    seen.push(format!("{stream:?}"));
    let err = client.clone().oneshot(req.clone()).await.unwrap_err();
    seen.push(format!("{err:?} {err}"));
    let mut stream = client.streaming().oneshot(req.clone()).await.unwrap();
    while let Some(e) = stream.next().await {
        match e {
            Ok(e) => seen.push(format!("{e:?}")),
            Err(e) => seen.push(format!("{e:?} {e}")),
        }
    }

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("llm_resilience.anthropic"), "{logs}");
    let all = format!("{logs}\n{}", seen.join("\n"));
    let first_word = completion.split(' ').next().unwrap();
    for secret in [
        KEY,
        "DO-NOT-LEAK",
        PROMPT,
        "SECRET",
        completion.as_str(),
        first_word,
        "part0",
    ] {
        assert!(!all.contains(secret), "{secret:?} leaked:\n{all}");
    }
}
