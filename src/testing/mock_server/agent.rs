//! What the mock server does for agents: tool calls when the request offers
//! tools, `n` choices, JSON answers for `response_format`, optional `null`
//! fields, header and query auth (Azure style), and a record of requests.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::script::{ErrorReply, FaultScript};
use bytes::Bytes;

use super::{json_response, paced, stream_response, Part, Reply, WORDS};

/// The most requests [`MockServer::requests`](super::MockServer::requests)
/// keeps (the latest ones).
pub const RECORDED_REQUESTS: usize = 64;

/// A request as the mock server received it, for tests that check what a
/// client sent. `Debug` shows the header names, not their values (a key
/// is among them).
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// The path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The query string, if any (without `?`).
    pub query: Option<String>,
    /// Every header, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` if it was not JSON).
    pub body: Value,
    /// When the server received it (its body read).
    pub received: std::time::Instant,
}

impl std::fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedRequest")
            .field("path", &self.path)
            .field("query", &self.query)
            .field("received", &self.received)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RecordedRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(super) fn record(
    log: &Mutex<VecDeque<RecordedRequest>>,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) {
    let rec = RecordedRequest {
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        received: std::time::Instant::now(),
    };
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    if log.len() == RECORDED_REQUESTS {
        log.pop_front();
    }
    log.push_back(rec);
}

/// The script's auth and query requirements: `None` when met, else the
/// error answer (401 for a wrong key, 400 for a missing query parameter,
/// as Azure OpenAI answers a missing `api-version`).
pub(super) fn check_auth(
    script: &FaultScript,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<ErrorReply> {
    if let Some(key) = &script.api_key {
        let ok = match &script.api_key_header {
            None => {
                let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
                sent == Some(format!("Bearer {key}").as_str())
            }
            Some(name) => {
                headers.get(name.as_str()).and_then(|v| v.to_str().ok()) == Some(key.as_str())
            }
        };
        if !ok {
            return Some(ErrorReply::openai(
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided.",
            ));
        }
    }
    let pairs: Vec<(&str, &str)> = query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .collect();
    for (k, v) in &script.required_query {
        if !pairs.iter().any(|(pk, pv)| pk == k && pv == v) {
            return Some(ErrorReply::openai(
                400,
                "invalid_request_error",
                Some("missing_required_parameter"),
                "A required query parameter is missing or wrong.",
            ));
        }
    }
    None
}

/// The tools to call: those the request offers, unless `tool_choice` is
/// `none`; the named one if `tool_choice` names one; the first only if
/// `parallel_tool_calls` is false; at most four.
fn tools_to_call(req: &Value) -> Vec<(String, Value)> {
    let Some(tools) = req["tools"].as_array() else {
        return Vec::new();
    };
    let choice = &req["tool_choice"];
    if choice.as_str() == Some("none") {
        return Vec::new();
    }
    let named = choice["function"]["name"].as_str();
    let mut out: Vec<(String, Value)> = tools
        .iter()
        .filter_map(|t| {
            let name = t["function"]["name"].as_str()?;
            Some((name.to_owned(), t["function"]["parameters"].clone()))
        })
        .filter(|(n, _)| named.is_none_or(|w| w == n))
        .take(4)
        .collect();
    if req["parallel_tool_calls"].as_bool() == Some(false) {
        out.truncate(1);
    }
    out
}

/// Deterministic arguments that fit the schema's top-level properties.
fn arguments(schema: &Value) -> String {
    let mut args = Map::new();
    if let Some(props) = schema["properties"].as_object() {
        for (k, p) in props.iter().take(4) {
            let v = match p["type"].as_str() {
                Some("number" | "integer") => json!(42),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("resilient \"agents\""),
            };
            args.insert(k.clone(), v);
        }
    }
    Value::Object(args).to_string()
}

/// One choice's answer: text (JSON when asked for), or tool calls.
struct Answer {
    text: Option<Vec<String>>,
    calls: Vec<(String, String, String)>,
    finish: String,
}

fn answers(req: &Value, n_words: usize, finish: &str, choices: usize) -> Vec<Answer> {
    let tools = tools_to_call(req);
    let json_format = matches!(
        req["response_format"]["type"].as_str(),
        Some("json_object" | "json_schema")
    );
    (0..choices)
        .map(|i| {
            if !tools.is_empty() {
                return Answer {
                    text: None,
                    calls: tools
                        .iter()
                        .enumerate()
                        .map(|(k, (name, schema))| {
                            (format!("call_{i}_{k}"), name.clone(), arguments(schema))
                        })
                        .collect(),
                    finish: "tool_calls".into(),
                };
            }
            let mut words = reply_words(n_words + i);
            words.drain(..i);
            if let Some(first) = words.first_mut() {
                *first = first.trim_start().to_owned();
            }
            if json_format {
                words = vec![json!({ "answer": words.concat() }).to_string()];
            }
            Answer {
                text: Some(words),
                calls: Vec::new(),
                finish: finish.to_owned(),
            }
        })
        .collect()
}

/// Puts `null` where a provider may send it, or the value.
fn or_null(nulls: bool, v: Value) -> Value {
    if nulls {
        Value::Null
    } else {
        v
    }
}

/// A completion of `n` words per choice (or tool calls), streamed in
/// `chunks` pieces or as one body.
pub(super) fn completion(
    r: &Reply<'_>,
    req: &Value,
    nulls: bool,
    prompt: u64,
    n: usize,
    finish: &str,
) -> Response {
    let choices = req["n"].as_u64().unwrap_or(1).clamp(1, 8) as usize;
    let answers = answers(req, n, finish, choices);
    let completion_tokens = (n * choices) as u64;
    let usage = json!({
        "prompt_tokens": or_null(nulls, json!(prompt)),
        "completion_tokens": completion_tokens,
        "total_tokens": or_null(nulls, json!(prompt + completion_tokens)),
        "prompt_tokens_details": or_null(nulls, json!({"cached_tokens": prompt / 2})),
        "completion_tokens_details": or_null(nulls, json!({"reasoning_tokens": 0})),
    });
    let id = or_null(nulls, json!("chatcmpl-mock"));
    let fingerprint = or_null(nulls, json!("fp_mock"));
    if !r.stream {
        let choices: Vec<Value> = answers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let calls: Vec<Value> = a
                    .calls
                    .iter()
                    .map(|(id, name, args)| {
                        json!({"id": id, "type": "function",
                               "function": {"name": name, "arguments": args}})
                    })
                    .collect();
                let mut message = json!({
                    "role": "assistant",
                    "content": a.text.as_ref().map(|t| t.concat()),
                    "refusal": null,
                });
                if !calls.is_empty() {
                    message["tool_calls"] = Value::Array(calls);
                } else if nulls {
                    message["tool_calls"] = Value::Null;
                }
                json!({"index": i, "message": message, "logprobs": null, "finish_reason": a.finish})
            })
            .collect();
        return json_response(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": 0,
                "model": r.model, "system_fingerprint": fingerprint,
                "choices": choices, "usage": usage,
            }),
        );
    }
    let event = |choice: Value| {
        let mut v = json!({
            "id": id, "object": "chat.completion.chunk", "model": r.model,
            "system_fingerprint": fingerprint, "choices": [choice],
        });
        if nulls {
            v["usage"] = Value::Null;
            v["error"] = Value::Null;
        }
        Ok(sse(&v))
    };
    let delta = |i: usize, d: Value, finish: Option<&str>| {
        let mut d = d;
        if nulls {
            d["refusal"] = Value::Null;
            if d.get("tool_calls").is_none() {
                d["tool_calls"] = Value::Null;
            }
        }
        json!({"index": i, "delta": d, "logprobs": null, "finish_reason": finish})
    };
    let mut parts: Vec<Part> = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        // OpenAI opens a text answer with `""` and a tool-call one with null.
        let content = a.text.as_ref().map(|_| "");
        parts.push(event(delta(
            i,
            json!({"role": "assistant", "content": content}),
            None,
        )));
    }
    // Pieces of every choice, interleaved: choice 0's first piece, choice
    // 1's first piece, …
    let mut pieces: Vec<VecDeque<Value>> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut q = VecDeque::new();
            if let Some(words) = &a.text {
                let per = words.len().div_ceil(r.chunks.max(1)).max(1);
                for c in words.chunks(per) {
                    q.push_back(delta(i, json!({"content": c.concat()}), None));
                }
            }
            for (k, (id, name, args)) in a.calls.iter().enumerate() {
                q.push_back(delta(
                    i,
                    json!({"tool_calls": [{"index": k, "id": id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]}),
                    None,
                ));
                let bytes: Vec<char> = args.chars().collect();
                for frag in bytes.chunks(7) {
                    let frag: String = frag.iter().collect();
                    q.push_back(delta(
                        i,
                        json!({"tool_calls": [{"index": k, "function": {"arguments": frag}}]}),
                        None,
                    ));
                }
            }
            // The finish reason rides on the last piece (text), or on a
            // piece of its own after tool calls (as OpenAI sends them).
            match q.back_mut() {
                Some(last) if a.calls.is_empty() => last["finish_reason"] = json!(a.finish),
                _ => q.push_back(delta(i, json!({}), Some(&a.finish))),
            }
            q
        })
        .collect();
    while pieces.iter().any(|q| !q.is_empty()) {
        for q in &mut pieces {
            if let Some(p) = q.pop_front() {
                parts.push(event(p));
            }
        }
    }
    let mut last = json!({
        "id": id, "object": "chat.completion.chunk", "model": r.model,
        "system_fingerprint": fingerprint, "choices": [], "usage": usage,
    });
    if nulls {
        last["error"] = Value::Null;
    }
    parts.push(Ok(sse(&last)));
    parts.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    stream_response(paced(parts, r.gap))
}

// ---- OpenAI reply shapes shared by every answer ----

pub(super) fn reply_words(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let w = WORDS[i % WORDS.len()];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

pub(super) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn chunk_event(model: &str, text: &str, finish: Option<&str>) -> Bytes {
    sse(&json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }))
}

/// `after` chunks (`part0 `, `part1 `, …), then `tail`, and no `[DONE]`.
pub(super) fn partial_stream(r: &Reply<'_>, after: usize, tail: Part) -> Response {
    let mut parts: Vec<Part> = (0..after)
        .map(|i| Ok(chunk_event(r.model, &format!("part{i} "), None)))
        .collect();
    parts.push(tail);
    stream_response(paced(parts, r.gap))
}
