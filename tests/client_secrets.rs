//! The key, prompts and completions never appear in `Debug` output or in
//! traces at TRACE level. A binary of its own: the trace capture is a
//! thread-local subscriber, and other tests in the same process can leave
//! the callsites cached as uninteresting.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::client::{ChatRequest, Message, OpenAiClient, Tool};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};
use serde_json::json;
use tower::ServiceExt;

const KEY: &str = "sk-agent-DO-NOT-LEAK-0987654321";

fn builder(base_url: String) -> llm_resilience::client::OpenAiClientBuilder {
    OpenAiClient::builder(base_url)
        .api_key(KEY)
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
}

fn weather_tool() -> Tool {
    Tool::function(
        "get_weather",
        "The current weather in a city",
        json!({"type": "object", "properties": {"city": {"type": "string"},
               "days": {"type": "integer"}}, "required": ["city"]}),
    )
}

#[tokio::test]
async fn no_key_prompt_or_completion_in_debug_or_traces() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests of this binary may run first without a subscriber and
    // leave the callsites cached as uninteresting: ask again.
    tracing::callsite::rebuild_interest_cache();

    let server = MockServer::start(FaultScript::new().require_api_key(KEY))
        .await
        .unwrap();
    let c = builder(server.base_url())
        .organization("org-x")
        .build()
        .unwrap();
    let prompt = "PROMPT-SECRET-about-the-merger";
    let req = ChatRequest::user(prompt)
        .with_system("SYSTEM-SECRET")
        .push(Message::tool("call_1", "TOOL-OUTPUT-SECRET"))
        .tool(weather_tool());
    let mut seen = Vec::new();
    let whole = c.clone().oneshot(req.clone()).await.unwrap();
    let stream = c.streaming().oneshot(req.clone()).await.unwrap();
    seen.push(format!("{stream:?}"));
    let collected = stream.collect().await.unwrap();
    let plain = c.clone().oneshot(ChatRequest::user(prompt)).await.unwrap();
    let wrong = builder(server.base_url())
        .api_key("sk-wrong-KEY-also-secret")
        .build()
        .unwrap();
    let err = wrong.oneshot(req.clone()).await.unwrap_err();
    seen.extend([
        format!("{c:?}"),
        format!("{:?}", c.streaming()),
        format!("{:?}", builder(server.base_url())),
        format!("{req:?}"),
        format!("{whole:?}"),
        format!("{collected:?}"),
        format!("{plain:?}"),
        format!("{err:?}"),
        format!("{err}"),
    ]);
    drop(_guard);
    let traces = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(
        traces.contains("llm_resilience.client"),
        "spans were traced: {traces}"
    );
    let secrets = [
        KEY,
        "sk-wrong-KEY-also-secret",
        prompt,
        "SYSTEM-SECRET",
        "TOOL-OUTPUT-SECRET",
        plain.content(),
        &whole.tool_calls()[0].function.arguments,
    ];
    for text in seen.iter().chain([&traces]) {
        for s in secrets {
            assert!(!text.contains(s), "{s:?} leaked into {text}");
        }
    }
}
