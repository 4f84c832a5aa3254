//! The mock server's Anthropic Messages API (`POST /v1/messages`), driven by
//! the same [`FaultScript`](super::FaultScript) as the OpenAI route.
//!
//! It checks `x-api-key` (when the script requires a key) and
//! `anthropic-version`, requires `max_tokens`, and answers in Anthropic's
//! shapes: a message with text or, when the request offers tools and the
//! last user turn holds no `tool_result`, a `tool_use` of the first tool
//! (input built from its schema's properties) with `stop_reason:
//! tool_use`; streamed as `message_start`, `ping`, `content_block_*`
//! (`text_delta`, `input_json_delta`), `message_delta`, `message_stop`.
//! Scripted errors in another provider's body shape are sent in
//! Anthropic's, with the type its status documents (a quota error becomes
//! `billing_error`, a context-length error "prompt is too long"). A
//! mid-stream error event is `overloaded_error`. Rate-limit state goes in
//! `anthropic-ratelimit-*` headers (RFC 3339 reset instants), the request
//! id in `request-id`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use super::agent::reply_words;
use super::{
    decide, error_response, json_response, lock, paced, reset_body, stream_response, Decision,
    ErrorReply, ErrorStyle, InFlight, MockFault, Part, Served, Shared,
};

impl super::MockServer {
    /// The Anthropic-style base URL, `http://127.0.0.1:PORT`, for the
    /// Messages API at `POST /v1/messages`: its headers, body shapes, tool
    /// use, stream events (a mid-stream error is an `overloaded_error`
    /// event) and error types.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

fn err(status: u16, kind: &str, message: &str) -> Response {
    error_response(&ErrorReply::anthropic(status, kind, message).header("request-id", "req_mock"))
}

/// The scripted error in Anthropic's shape.
fn anthropic_style(e: ErrorReply) -> ErrorReply {
    if e.style == ErrorStyle::Anthropic {
        return e;
    }
    let word = |w: &str| e.code.as_deref() == Some(w) || e.error_type.as_deref() == Some(w);
    let quota = matches!(Served::of(&MockFault::Error(e.clone())), Served::Quota);
    let (kind, message) = match e.status {
        _ if quota => ("billing_error", e.message.clone()),
        400 if word("context_length_exceeded") => (
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum".to_owned(),
        ),
        400 | 422 => ("invalid_request_error", e.message.clone()),
        401 => ("authentication_error", e.message.clone()),
        403 => ("permission_error", e.message.clone()),
        404 => ("not_found_error", e.message.clone()),
        413 => ("request_too_large", e.message.clone()),
        429 => ("rate_limit_error", e.message.clone()),
        529 => ("overloaded_error", e.message.clone()),
        _ => ("api_error", e.message.clone()),
    };
    let mut out = ErrorReply::anthropic(e.status, kind, &message);
    out.headers = e.headers;
    out
}

/// An RFC 3339 UTC instant (`2026-11-30T13:05:00Z`).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn with_limits(mut resp: Response, d: &Decision) -> Response {
    let h = resp.headers_mut();
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    let [(lr, rr, tr), (lt, rt, tt)] = d.limits;
    let at = |d: Duration| rfc3339(SystemTime::now() + d);
    put("anthropic-ratelimit-requests-limit", lr.to_string());
    put("anthropic-ratelimit-requests-remaining", rr.to_string());
    put("anthropic-ratelimit-requests-reset", at(tr));
    put("anthropic-ratelimit-tokens-limit", lt.to_string());
    put("anthropic-ratelimit-tokens-remaining", rt.to_string());
    put("anthropic-ratelimit-tokens-reset", at(tt));
    put("request-id", "req_mock".to_owned());
    resp
}

fn block_text_len(b: &Value) -> usize {
    match b {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(block_text_len).sum(),
        Value::Object(o) => ["text", "content"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(block_text_len)
            .sum(),
        _ => 0,
    }
}

fn prompt_tokens(req: &Value) -> u64 {
    let messages: usize = req["messages"].as_array().map_or(0, |ms| {
        ms.iter().map(|m| block_text_len(&m["content"]) + 16).sum()
    });
    (block_text_len(&req["system"]) + messages).div_ceil(4) as u64
}

/// The tool to call, when the request offers tools and the last user turn
/// is not already answering one.
fn tool_to_call(req: &Value) -> Option<Value> {
    let tool = req["tools"].as_array()?.first()?.clone();
    if req["tool_choice"]["type"] == "none" {
        return None;
    }
    let last = req["messages"].as_array()?.last()?;
    let answered = last["content"]
        .as_array()
        .is_some_and(|bs| bs.iter().any(|b| b["type"] == "tool_result"));
    (!answered).then_some(tool)
}

/// A plausible input for a tool: each property of its schema, by type.
fn tool_input(tool: &Value) -> Value {
    let mut input = serde_json::Map::new();
    if let Some(props) = tool["input_schema"]["properties"].as_object() {
        for (name, schema) in props {
            let v = match schema["type"].as_str() {
                Some("number") => json!(21.5),
                Some("integer") => json!(3),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("Paris"),
            };
            input.insert(name.clone(), v);
        }
    }
    Value::Object(input)
}

fn sse(name: &str, v: &Value) -> Part {
    Ok(Bytes::from(format!("event: {name}\ndata: {v}\n\n")))
}

fn message_start(model: &str, prompt: u64) -> Part {
    sse(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
    )
}

fn block_start(index: usize, block: Value) -> Part {
    sse(
        "content_block_start",
        &json!({"type": "content_block_start", "index": index, "content_block": block}),
    )
}

fn delta(index: usize, delta: Value) -> Part {
    sse(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

fn block_stop(index: usize) -> Part {
    sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": index}),
    )
}

pub(super) async fn messages(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.total.fetch_add(1, Ordering::SeqCst);
    super::agent::record(&shared.recorded, &uri, &headers, &body);
    let _in_flight = InFlight::enter(&shared);
    let count = |s: Served| {
        shared.counts[s.index()].fetch_add(1, Ordering::SeqCst);
    };
    let required = lock(&shared.runtime).script.api_key.clone();
    if let Some(key) = required {
        let sent = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        if sent != Some(key.as_str()) {
            count(Served::OtherError);
            return err(401, "authentication_error", "invalid x-api-key");
        }
    }
    if headers.get("anthropic-version").is_none() {
        count(Served::OtherError);
        return err(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        count(Served::OtherError);
        return err(400, "invalid_request_error", "invalid JSON body");
    };
    let Some(max_tokens) = req["max_tokens"].as_u64() else {
        count(Served::OtherError);
        return err(400, "invalid_request_error", "max_tokens: Field required");
    };
    if !req["messages"].is_array() {
        count(Served::OtherError);
        return err(400, "invalid_request_error", "messages: Field required");
    }
    let stream = req["stream"].as_bool() == Some(true);
    let model = req["model"].as_str().unwrap_or("mock-model").to_owned();
    let (words, chunks, gap) = {
        let rt = lock(&shared.runtime);
        (rt.script.reply_words, rt.script.chunks, rt.script.chunk_gap)
    };
    let max_tokens = usize::try_from(max_tokens).unwrap_or(usize::MAX).max(1);
    let prompt = prompt_tokens(&req);
    let mut decision = decide(&shared, prompt, words.min(max_tokens) as u64);
    count(decision.served);
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    let mut fault = std::mem::replace(&mut decision.fault, MockFault::Ok);
    if !stream {
        fault = match fault {
            MockFault::MidStreamDrop { .. } => MockFault::Reset,
            MockFault::StreamErrorEvent { .. } => MockFault::overloaded(),
            f => f,
        };
    }
    let resp = match fault {
        MockFault::Hang => {
            let mut rx = shared.shutdown.clone();
            let _ = rx.wait_for(|v| *v).await;
            err(529, "overloaded_error", "shutting down")
        }
        MockFault::Reset => Response::new(reset_body()),
        // Scripted errors carry only their own headers (and the request
        // id): the rate-limit state belongs to successes and to the
        // server's own limit.
        MockFault::Error(e) if decision.served != Served::LimitExceeded => {
            return error_response(&anthropic_style(e).header("request-id", "req_mock"));
        }
        MockFault::Error(e) => error_response(&anthropic_style(e)),
        MockFault::Ok | MockFault::Length => {
            let length = matches!(fault, MockFault::Length);
            let n = if length { (words / 2).max(1) } else { words }.min(max_tokens);
            let truncated = length || n < words;
            shared.tokens.fetch_add(prompt + n as u64, Ordering::SeqCst);
            let tool = tool_to_call(&req).filter(|_| !truncated);
            let reply = Reply {
                model: &model,
                prompt,
                n,
                stop: if tool.is_some() {
                    "tool_use"
                } else if truncated {
                    "max_tokens"
                } else {
                    "end_turn"
                },
                tool,
            };
            if stream {
                streamed(&reply, chunks, gap)
            } else {
                whole(&reply)
            }
        }
        MockFault::MidStreamDrop { after_chunks } => partial(
            &model,
            prompt,
            after_chunks,
            gap,
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock mid-stream drop",
            )),
        ),
        MockFault::StreamErrorEvent { after_chunks } => partial(
            &model,
            prompt,
            after_chunks,
            gap,
            sse(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
        ),
    };
    with_limits(resp, &decision)
}

struct Reply<'a> {
    model: &'a str,
    prompt: u64,
    n: usize,
    stop: &'static str,
    tool: Option<Value>,
}

impl Reply<'_> {
    fn text(&self) -> Vec<String> {
        if self.tool.is_some() {
            vec!["Let me check.".to_owned()]
        } else {
            reply_words(self.n)
        }
    }

    fn tool_use(&self) -> Option<(Value, Value)> {
        let tool = self.tool.as_ref()?;
        let input = tool_input(tool);
        Some((
            json!({"type": "tool_use", "id": "toolu_mock_1", "name": tool["name"], "input": {}}),
            input,
        ))
    }
}

fn whole(r: &Reply<'_>) -> Response {
    let mut content = vec![json!({"type": "text", "text": r.text().concat()})];
    if let Some((mut block, input)) = r.tool_use() {
        block["input"] = input;
        content.push(block);
    }
    json_response(
        200,
        &json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": r.model,
            "content": content, "stop_reason": r.stop, "stop_sequence": null,
            "usage": {"input_tokens": r.prompt, "output_tokens": r.n,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }),
    )
}

fn streamed(r: &Reply<'_>, chunks: usize, gap: Duration) -> Response {
    let mut parts = vec![
        message_start(r.model, r.prompt),
        sse("ping", &json!({"type": "ping"})),
        block_start(0, json!({"type": "text", "text": ""})),
    ];
    let text = r.text();
    let per = text.len().div_ceil(chunks.max(1)).max(1);
    for piece in text.chunks(per) {
        parts.push(delta(
            0,
            json!({"type": "text_delta", "text": piece.concat()}),
        ));
    }
    parts.push(block_stop(0));
    if let Some((block, input)) = r.tool_use() {
        parts.push(block_start(1, block));
        let json = input.to_string();
        let cut = json.len() / 2;
        let cut = (cut..json.len())
            .find(|i| json.is_char_boundary(*i))
            .unwrap_or(0);
        for fragment in [&json[..cut], &json[cut..]] {
            parts.push(delta(
                1,
                json!({"type": "input_json_delta", "partial_json": fragment}),
            ));
        }
        parts.push(block_stop(1));
    }
    parts.push(sse(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": r.stop, "stop_sequence": null},
                "usage": {"output_tokens": r.n}}),
    ));
    parts.push(sse("message_stop", &json!({"type": "message_stop"})));
    stream_response(paced(parts, gap))
}

/// `message_start`, a text block with `after` deltas (`part0 `, `part1 `,
/// …), then `tail`, and no `message_stop`.
fn partial(model: &str, prompt: u64, after: usize, gap: Duration, tail: Part) -> Response {
    let mut parts = vec![
        message_start(model, prompt),
        block_start(0, json!({"type": "text", "text": ""})),
    ];
    for i in 0..after {
        parts.push(delta(
            0,
            json!({"type": "text_delta", "text": format!("part{i} ")}),
        ));
    }
    parts.push(tail);
    stream_response(paced(parts, gap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_the_crates_parser() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let text = rfc3339(t);
        let parsed = crate::classify::hint::rfc3339(&text, t - Duration::from_secs(10)).unwrap();
        assert_eq!(parsed, Duration::from_secs(10));
        assert_eq!(text, "2026-11-30T00:53:20Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn scripted_openai_errors_take_anthropics_shape() {
        let MockFault::Error(e) = MockFault::insufficient_quota() else {
            unreachable!()
        };
        assert_eq!(
            anthropic_style(e).error_type.as_deref(),
            Some("billing_error")
        );
        let MockFault::Error(e) = MockFault::rate_limited(Some(Duration::from_secs(2))) else {
            unreachable!()
        };
        let a = anthropic_style(e);
        assert_eq!(a.error_type.as_deref(), Some("rate_limit_error"));
        assert!(a.headers.iter().any(|(k, _)| k == "retry-after"));
        let MockFault::Error(e) = MockFault::context_length() else {
            unreachable!()
        };
        assert!(anthropic_style(e).message.starts_with("prompt is too long"));
    }
}
