//! A [`ChatStream`] forwarded as OpenAI's server-sent events: one
//! `data: {chat.completion.chunk}` per chunk, `data: [DONE]` at the end, and
//! on a failure after output was sent, one `data: {"error": {…}}` event
//! (what OpenAI sends and its SDKs raise as an error) instead of `[DONE]`,
//! so that a caller never mistakes a cut-off answer for a whole one.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use crate::classify::{LlmClassifier, Reason};
use crate::client::{ChatChunk, ChatStream, ClientError, ClientErrorKind};

/// What every chunk of one completion repeats.
struct Head {
    id: String,
    model: String,
    created: u64,
}

/// The chunk in OpenAI's `chat.completion.chunk` shape. The text, refusal,
/// role, tool-call pieces, finish reasons and usage are forwarded; what the
/// crate's typed chunk does not keep (`logprobs`, vendor fields) is not.
fn chunk_json(c: &ChatChunk, head: &Head) -> Value {
    let choices: Vec<Value> = c
        .choices
        .iter()
        .map(|d| {
            let mut delta = Map::new();
            if let Some(role) = d.role {
                delta.insert("role".into(), json!(role));
            }
            if let Some(text) = &d.content {
                delta.insert("content".into(), json!(text));
            }
            if let Some(refusal) = &d.refusal {
                delta.insert("refusal".into(), json!(refusal));
            }
            if !d.tool_calls.is_empty() {
                let calls: Vec<Value> = d
                    .tool_calls
                    .iter()
                    .map(|t| {
                        let mut call = Map::new();
                        call.insert("index".into(), json!(t.index));
                        if let Some(id) = &t.id {
                            call.insert("id".into(), json!(id));
                            call.insert("type".into(), json!("function"));
                        }
                        let mut function = Map::new();
                        if let Some(name) = &t.name {
                            function.insert("name".into(), json!(name));
                        }
                        if let Some(args) = &t.arguments {
                            function.insert("arguments".into(), json!(args));
                        }
                        call.insert("function".into(), Value::Object(function));
                        Value::Object(call)
                    })
                    .collect();
                delta.insert("tool_calls".into(), Value::Array(calls));
            }
            json!({
                "index": d.index,
                "delta": delta,
                "logprobs": null,
                "finish_reason": d.finish_reason,
            })
        })
        .collect();
    let mut v = json!({
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "choices": choices,
    });
    if let Some(u) = c.usage {
        v["usage"] = json!(u);
    }
    v
}

/// The error event that ends a stream which failed after output was sent:
/// OpenAI's error shape, a message the crate writes (never the upstream's
/// text, which can quote the prompt), the failure's kind as `code` and its
/// [`Reason`] as `reason`.
pub(super) fn error_event(err: &ClientError) -> Value {
    let reason = match LlmClassifier::new().classify_error(err) {
        crate::classify::Outcome::Success => Reason::Unknown,
        other => other.reason(),
    };
    let (code, message) = match err.kind() {
        ClientErrorKind::StreamError => (
            "stream_error",
            "the upstream provider sent an error in the middle of the stream; the answer is incomplete",
        ),
        ClientErrorKind::BodyTooLarge => (
            "stream_event_too_large",
            "the upstream provider sent a stream event over the size limit; the answer is incomplete",
        ),
        ClientErrorKind::Decode => (
            "stream_decode_error",
            "the upstream provider sent an event that is not a chat chunk; the answer is incomplete",
        ),
        _ => (
            "stream_interrupted",
            "the upstream stream broke off after output was sent; the answer is incomplete",
        ),
    };
    json!({"error": {
        "message": message,
        "type": "server_error",
        "param": null,
        "code": code,
        "reason": reason.as_str(),
    }})
}

fn frame(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // A `Value` always serializes.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The streamed response: `text/event-stream`, the chunks as they arrive.
/// Dropping the response (the caller went away) drops the upstream stream
/// and its connection.
pub(super) fn stream_response(stream: ChatStream) -> Response {
    let snap = stream.snapshot();
    let head = Head {
        id: snap.id,
        model: snap.model,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let frames = futures::stream::unfold(Some((stream, head)), |state| async move {
        let (mut stream, head) = state?;
        let bytes = match stream.next().await {
            Some(Ok(chunk)) => {
                let bytes = frame(&chunk_json(&chunk, &head));
                return Some((Ok::<_, Infallible>(bytes), Some((stream, head))));
            }
            Some(Err(e)) => frame(&error_event(&e)),
            None => Bytes::from_static(b"data: [DONE]\n\n"),
        };
        Some((Ok(bytes), None))
    });
    let mut resp = Response::new(Body::from_stream(frames));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ChoiceDelta, ToolCallDelta};

    #[test]
    fn chunks_keep_the_openai_shape() {
        let d = ChoiceDelta {
            content: Some("hi".into()),
            tool_calls: vec![ToolCallDelta::new(
                0,
                Some("call_1".into()),
                Some("f".into()),
                None,
            )],
            ..ChoiceDelta::default()
        };
        let c = ChatChunk {
            choices: vec![d],
            ..ChatChunk::default()
        };
        let head = Head {
            id: "chatcmpl-1".into(),
            model: "m".into(),
            created: 7,
        };
        let v = chunk_json(&c, &head);
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["content"], "hi");
        assert_eq!(
            v["choices"][0]["delta"]["tool_calls"][0]["type"],
            "function"
        );
        assert_eq!(
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            "f"
        );
        assert!(v["choices"][0]["finish_reason"].is_null());
        assert!(v.get("usage").is_none());
        assert_eq!(&frame(&json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
    }
}
