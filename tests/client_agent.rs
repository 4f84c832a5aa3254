//! The client as an agent uses it, over real HTTP on loopback against the
//! mock server: every request field reaches the server, tool calls and
//! `n > 1` come back whole (streamed and not, in the same shape), fields
//! sent as `null` are read, Azure-style auth works, and a user's own
//! reqwest errors are classified by their status.
//!
//! Real time with short timeouts; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::classify::{classify_http, HttpError, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{
    Auth, ChatRequest, ChatResponse, ClientErrorKind, ContentPart, Message, OpenAiClient,
    ResponseFormat, Role, Tool, ToolCall, ToolChoice,
};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};
use serde_json::{json, Value};
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

fn client(server: &MockServer) -> OpenAiClient {
    builder(server.base_url()).build().unwrap()
}

fn weather_tool() -> Tool {
    Tool::function(
        "get_weather",
        "The current weather in a city",
        json!({"type": "object", "properties": {"city": {"type": "string"},
               "days": {"type": "integer"}}, "required": ["city"]}),
    )
}

fn time_tool() -> Tool {
    Tool::function(
        "get_time",
        "The time in a zone",
        json!({"type": "object", "properties": {"zone": {"type": "string"}}}),
    )
    .strict(true)
}

async fn both(client: &OpenAiClient, req: ChatRequest) -> (ChatResponse, ChatResponse) {
    let whole = client.clone().oneshot(req.clone()).await.unwrap();
    let stream = client.streaming().oneshot(req).await.unwrap();
    let collected = stream.collect().await.unwrap();
    (whole, collected)
}

#[tokio::test]
async fn every_request_field_reaches_the_server() {
    let server = MockServer::start(FaultScript::new().require_api_key(KEY))
        .await
        .unwrap();
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}});
    let req = ChatRequest::new(vec![
        Message::system("be brief"),
        Message::user_parts(vec![
            ContentPart::text("what is in this image?"),
            ContentPart::image_url("https://example.com/cat.png").detail("low"),
            ContentPart::image_base64("image/png", "iVBORw0KGgo="),
        ])
        .name("alice"),
        Message::assistant_tool_calls(vec![ToolCall::function(
            "call_1",
            "get_weather",
            r#"{"city":"Paris"}"#,
        )]),
        Message::tool("call_1", r#"{"temp":21}"#),
    ])
    .tool(weather_tool())
    .tool(time_tool())
    .tool_choice(ToolChoice::Function("get_weather".into()))
    .parallel_tool_calls(false)
    .response_format(ResponseFormat::JsonSchema {
        name: "answer".into(),
        schema: schema.clone(),
        strict: true,
    })
    .seed(7)
    .n(2)
    .stop(vec!["END".into()])
    .presence_penalty(0.5)
    .frequency_penalty(-0.5)
    .logprobs(true)
    .top_logprobs(3)
    .end_user("user-42")
    .max_completion_tokens(300)
    .temperature(0.25)
    .top_p(0.5)
    .extra("top_k", json!(40))
    .extra("reasoning_effort", json!("low"));
    let resp = client(&server).oneshot(req.clone()).await.unwrap();
    assert_eq!(resp.choices.len(), 2);
    let sent = &server.requests()[0];
    let b = &sent.body;
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(b["model"], "mock-model");
    assert!(b.get("stream").is_none());
    let m = &b["messages"];
    assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
    assert_eq!(m[1]["name"], "alice");
    assert_eq!(
        m[1]["content"],
        json!([
            {"type": "text", "text": "what is in this image?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ])
    );
    assert_eq!(
        m[2],
        json!({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]})
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "content": "{\"temp\":21}", "tool_call_id": "call_1"})
    );
    assert_eq!(b["tools"][0]["type"], "function");
    assert_eq!(b["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        b["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
    assert_eq!(b["tools"][1]["function"]["strict"], true);
    assert_eq!(
        b["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(b["parallel_tool_calls"], false);
    assert_eq!(
        b["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}})
    );
    assert_eq!(b["seed"], 7);
    assert_eq!(b["n"], 2);
    assert_eq!(b["stop"], json!(["END"]));
    assert_eq!(b["presence_penalty"], 0.5);
    assert_eq!(b["frequency_penalty"], -0.5);
    assert_eq!(b["logprobs"], true);
    assert_eq!(b["top_logprobs"], 3);
    assert_eq!(b["user"], "user-42");
    assert_eq!(b["max_completion_tokens"], 300);
    assert_eq!(b["temperature"], 0.25);
    assert_eq!(b["top_p"], 0.5);
    assert_eq!(b["top_k"], 40);
    assert_eq!(b["reasoning_effort"], "low");
    // The named tool was called, once per choice.
    for c in &resp.choices {
        assert_eq!(c.message.tool_calls.len(), 1);
        assert_eq!(c.message.tool_calls[0].function.name, "get_weather");
    }

    // Streaming asks for usage by default; the setting turns it off.
    let _ = client(&server)
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let quiet = builder(server.base_url())
        .stream_include_usage(false)
        .build()
        .unwrap();
    let s = quiet
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let _ = s.collect().await.unwrap();
    let reqs = server.requests();
    assert_eq!(reqs[1].body["stream"], true);
    assert_eq!(
        reqs[1].body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(reqs[1].header("accept"), Some("text/event-stream"));
    assert_eq!(reqs[2].body["stream"], true);
    assert!(reqs[2].body.get("stream_options").is_none());
}

#[tokio::test]
async fn tool_calls_come_back_whole_streamed_or_not() {
    let server = MockServer::start(FaultScript::new().chunks(3))
        .await
        .unwrap();
    let c = client(&server);
    let req = ChatRequest::user("weather and time in Paris?")
        .tool(weather_tool())
        .tool(time_tool());
    let (whole, collected) = both(&c, req.clone()).await;
    assert_eq!(whole.finish_reason(), Some("tool_calls"));
    assert_eq!(whole.content(), "");
    assert!(whole.message().unwrap().content.is_none());
    let calls = whole.tool_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].id, "call_0_0");
    assert_eq!(calls[0].function.name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
    assert_eq!(args["city"], "resilient \"agents\"");
    assert_eq!(args["days"], 42);
    assert_eq!(calls[1].function.name, "get_time");
    // The stream came as an id and name, then argument fragments: joined,
    // it is the same response, usage and ids included.
    assert_eq!(collected, whole);
    assert!(collected.usage.is_some());
    assert_eq!(collected.system_fingerprint.as_deref(), Some("fp_mock"));
    assert_eq!(collected.request_id.as_deref(), Some("req_mock"));
    assert!(!collected.rate_limit.is_empty());
    assert!(collected.raw_body().is_empty());
    assert_eq!(
        whole.raw_json().unwrap()["choices"][0]["message"]["tool_calls"][1]["id"],
        "call_0_1"
    );

    // The agent loop: push the answer and the tool results back.
    let mut next = req.push(whole.message().unwrap().clone());
    for call in calls {
        next = next.push(Message::tool(call.id.clone(), "{\"ok\":true}"));
    }
    let _ = c.clone().oneshot(next).await.unwrap();
    let sent = server.requests().pop().unwrap().body;
    assert_eq!(sent["messages"][1]["tool_calls"][1]["id"], "call_0_1");
    assert!(sent["messages"][1].get("content").is_none());
    assert_eq!(sent["messages"][3]["tool_call_id"], "call_0_1");

    // tool_choice none: text, no calls.
    let (plain, _) = both(
        &c,
        ChatRequest::user("hi")
            .tool(weather_tool())
            .tool_choice(ToolChoice::None),
    )
    .await;
    assert!(plain.tool_calls().is_empty());
    assert!(!plain.content().is_empty());
}

#[tokio::test]
async fn n_choices_come_back_in_order_streamed_or_not() {
    let server = MockServer::start(FaultScript::new().reply_words(6).chunks(3))
        .await
        .unwrap();
    let c = client(&server);
    let (whole, collected) = both(&c, ChatRequest::user("three ideas").n(3)).await;
    assert_eq!(whole.choices.len(), 3);
    for (i, ch) in whole.choices.iter().enumerate() {
        assert_eq!(ch.index, i as u32);
        assert_eq!(ch.message.role, Role::Assistant);
        assert_eq!(ch.finish_reason.as_deref(), Some("stop"));
    }
    assert_ne!(
        whole.choices[0].message.text(),
        whole.choices[1].message.text()
    );
    assert_eq!(collected, whole);
    let usage = whole.usage.unwrap();
    assert_eq!(usage.completion_tokens, 18);
    assert_eq!(usage.cached_tokens, Some(usage.prompt_tokens / 2));
    assert_eq!(usage.reasoning_tokens, Some(0));

    // JSON mode.
    let json_reply = c
        .clone()
        .oneshot(ChatRequest::user("as json").response_format(ResponseFormat::JsonObject))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(json_reply.content()).unwrap();
    assert!(v["answer"].is_string());
}

/// Issue regression: a completion whose `id` is `null` was rejected (and
/// retried), and a stream whose chunks carry `null`s (`id`, `usage`,
/// `error`) lost its text or failed.
#[tokio::test]
async fn fields_sent_as_null_are_read() {
    let server = MockServer::start(FaultScript::new().null_fields().chunks(3))
        .await
        .unwrap();
    let c = client(&server);
    let (whole, collected) = both(&c, ChatRequest::user("hi")).await;
    assert_eq!(whole.id, "");
    assert_eq!(whole.system_fingerprint, None);
    assert_eq!(
        whole.content(),
        "resilient agents retry politely and never stampede upstream resilient agents retry politely"
    );
    let usage = whole.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 0);
    assert_eq!(usage.completion_tokens, 12);
    assert_eq!(usage.cached_tokens, None);
    assert_eq!(collected, whole);
    assert_eq!(server.total(), 2, "nothing was retried or re-sent");
    // Tool calls under nulls too.
    let (whole, collected) = both(&c, ChatRequest::user("x").tool(weather_tool())).await;
    assert_eq!(whole.tool_calls().len(), 1);
    assert_eq!(collected, whole);
}

#[tokio::test]
async fn azure_style_query_and_header_auth() {
    let server = MockServer::start(
        FaultScript::new()
            .require_api_key_header("api-key", KEY)
            .require_query("api-version", "2024-10-21"),
    )
    .await
    .unwrap();
    let base = format!("http://{}/openai/deployments/gpt-4o", server.addr());
    let azure = builder(base.clone())
        .auth(Auth::Header("api-key".into()))
        .query("api-version", "2024-10-21")
        .build()
        .unwrap();
    let reply = azure
        .clone()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    assert!(!reply.content().is_empty());
    let streamed = azure
        .streaming()
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(!streamed.content().is_empty());
    let sent = &server.requests()[0];
    assert_eq!(sent.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(sent.header("api-key"), Some(KEY));
    assert_eq!(sent.header("authorization"), None);

    // Bearer auth, or no api-version: refused, and classified as such.
    let bearer = builder(base.clone())
        .query("api-version", "2024-10-21")
        .build()
        .unwrap();
    let err = bearer.oneshot(ChatRequest::user("hi")).await.unwrap_err();
    assert_eq!(err.status_code(), Some(401));
    assert_eq!(
        LlmClassifier::new().classify_error(&err),
        Outcome::permanent(Reason::Auth)
    );
    let no_version = builder(base)
        .auth(Auth::Header("api-key".into()))
        .build()
        .unwrap();
    let err = no_version
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), Some(400));
    assert_eq!(err.kind(), ClientErrorKind::Status);
}

#[tokio::test]
async fn default_headers_and_organization_reach_the_server_and_no_key_sends_no_auth() {
    let server = MockServer::start(FaultScript::new()).await.unwrap();
    let c = builder(server.base_url())
        .organization("org-1")
        .project("proj-2")
        .header("OpenAI-Beta", "assistants=v2")
        .header("x-gateway-route", "eu")
        .build()
        .unwrap();
    let _ = c.oneshot(ChatRequest::user("hi")).await.unwrap();
    let local = OpenAiClient::builder(server.base_url()).build().unwrap();
    let _ = local.oneshot(ChatRequest::user("hi")).await.unwrap();
    let reqs = server.requests();
    assert_eq!(reqs[0].header("openai-organization"), Some("org-1"));
    assert_eq!(reqs[0].header("openai-project"), Some("proj-2"));
    assert_eq!(reqs[0].header("openai-beta"), Some("assistants=v2"));
    assert_eq!(reqs[0].header("x-gateway-route"), Some("eu"));
    assert_eq!(
        reqs[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(reqs[1].header("authorization"), None);
}

#[tokio::test]
async fn from_env_reads_the_openai_variables_and_names_a_missing_one() {
    // The only test of this binary that touches the environment.
    let server = MockServer::start(FaultScript::new().require_api_key(KEY))
        .await
        .unwrap();
    for v in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
    ] {
        std::env::remove_var(v);
    }
    assert_eq!(
        OpenAiClient::from_env().unwrap_err().field,
        "OPENAI_API_KEY"
    );
    std::env::set_var("OPENAI_API_KEY", KEY);
    std::env::set_var("OPENAI_BASE_URL", "not a url");
    assert_eq!(
        OpenAiClient::from_env().unwrap_err().field,
        "OPENAI_BASE_URL"
    );
    std::env::set_var("OPENAI_BASE_URL", server.base_url());
    std::env::set_var("OPENAI_ORG_ID", "org-env");
    std::env::set_var("OPENAI_PROJECT_ID", "proj\nbad");
    assert_eq!(
        OpenAiClient::from_env().unwrap_err().field,
        "OPENAI_PROJECT_ID"
    );
    std::env::set_var("OPENAI_PROJECT_ID", "proj-env");
    let c = OpenAiClient::from_env().unwrap();
    assert!(!format!("{c:?}").contains(KEY));
    let _ = c.oneshot(ChatRequest::user("hi")).await.unwrap();
    let sent = &server.requests()[0];
    assert_eq!(sent.header("openai-organization"), Some("org-env"));
    assert_eq!(sent.header("openai-project"), Some("proj-env"));
    for v in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
    ] {
        std::env::remove_var(v);
    }
}

/// A user's own reqwest call with `error_for_status()?`: classified by its
/// status (it was "unknown", so every 4xx was retried); with the headers
/// and body at hand, `HttpError::from_response` gives the provider's type,
/// code and wait hint too.
#[tokio::test]
async fn a_users_own_reqwest_errors_are_classified() {
    use llm_resilience::testing::mock_server::MockFault;
    let server = MockServer::start(
        FaultScript::new()
            .require_api_key("right")
            .then(MockFault::rate_limited(Some(Duration::from_secs(3))))
            .then(MockFault::insufficient_quota()),
    )
    .await
    .unwrap();
    let url = format!("{}/chat/completions", server.base_url());
    let http = reqwest::Client::new();
    let post = |key: &str| {
        http.post(&url)
            .bearer_auth(key)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let c = LlmClassifier::new();
    let wrong = post("wrong").await.unwrap().error_for_status().unwrap_err();
    assert_eq!(c.classify_error(&wrong), Outcome::permanent(Reason::Auth));
    let resp = post("right").await.unwrap();
    let limited = resp.error_for_status_ref().unwrap_err();
    assert_eq!(
        c.classify_error(&limited),
        Outcome::transient(Reason::RateLimited)
    );
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await.unwrap();
    let err = HttpError::from_response(status, &headers, &body);
    assert_eq!(
        classify_http(&err),
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(Duration::from_secs(3))
        }
    );
    let resp = post("right").await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await.unwrap();
    let err = HttpError::from_response(status, &headers, &body);
    assert_eq!(c.classify_error(&err), Outcome::permanent(Reason::Quota));
    // Through the crate's Error, as a layer sees it.
    let wrapped = llm_resilience::Error::from_inner(wrong);
    assert_eq!(c.classify_error(&wrapped), Outcome::permanent(Reason::Auth));
    // A connect failure is still a transport failure.
    let refused = reqwest::Client::new()
        .get("http://127.0.0.1:1/")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        c.classify_error(&refused),
        Outcome::transient(Reason::Connect)
    );
}

/// A server on raw TCP that answers one request with these SSE bytes and
/// then closes the connection (no `[DONE]`).
async fn cut_stream_server(events: Vec<String>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        // Read the request head and its body (content-length).
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(n) = sock.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + len {
                    break;
                }
            }
        }
        let mut out = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        );
        for e in events {
            out.push_str(&format!("data: {e}\n\n"));
        }
        let _ = sock.write_all(out.as_bytes()).await;
        let _ = sock.shutdown().await;
    });
    addr
}

#[tokio::test]
async fn a_stream_cut_inside_a_tool_call_is_a_typed_error_keeping_what_arrived() {
    let piece = |v: Value| {
        json!({"id": "chatcmpl-cut", "model": "m", "choices": [{"index": 0, "delta": v, "finish_reason": null}]})
            .to_string()
    };
    let addr = cut_stream_server(vec![
        piece(json!({"role": "assistant", "content": null})),
        piece(
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]}),
        ),
        piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]})),
        piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Par"}}]})),
    ])
    .await;
    let c = builder(format!("http://{addr}/v1")).build().unwrap();
    let stream = c
        .streaming()
        .oneshot(ChatRequest::user("weather?").tool(weather_tool()))
        .await
        .unwrap();
    let err = stream.collect().await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
    assert!(err.is_mid_stream());
    assert_eq!(
        LlmClassifier::new().classify_error(&err),
        Outcome::transient(Reason::StreamInterrupted)
    );
    let partial = err.partial_response().expect("what arrived");
    assert_eq!(partial.id, "chatcmpl-cut");
    assert_eq!(partial.finish_reason(), None, "never finished");
    let calls = partial.tool_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].id, "call_a");
    assert_eq!(calls[0].function.name, "get_weather");
    assert_eq!(calls[0].function.arguments, "{\"city\":\"Par");
    assert!(serde_json::from_str::<Value>(&calls[0].function.arguments).is_err());
}
