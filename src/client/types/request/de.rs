//! Reading a [`ChatRequest`] from OpenAI's request JSON, losslessly: every
//! field the typed request models is read into it, and every field it does
//! not model, or that its typed view would not send back byte for byte, is
//! kept in its [`extra`](ChatRequest::extra) map, which wins on the wire.
//! So `serialize(deserialize(json))` sends what the caller sent.

use std::sync::Arc;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::{Body, ChatRequest, FunctionDef, Inner, ResponseFormat, Tool, ToolChoice};
use crate::client::types::Message;

/// Reads `v` as `T`; keeps `v` in `extra` when it is not a `T` or when the
/// `T` would not serialize back to exactly `v` (a `null`, an integer
/// temperature, a field of a message the crate does not model).
fn typed<T: DeserializeOwned + Serialize>(
    key: &str,
    v: Value,
    extra: &mut Map<String, Value>,
) -> Option<T> {
    if v.is_null() {
        extra.insert(key.to_owned(), v);
        return None;
    }
    match T::deserialize(&v) {
        Ok(t) => {
            if serde_json::to_value(&t).ok().as_ref() != Some(&v) {
                extra.insert(key.to_owned(), v);
            }
            Some(t)
        }
        Err(_) => {
            extra.insert(key.to_owned(), v);
            None
        }
    }
}

/// The messages: each one the typed view can read is read (for estimates
/// and [`ChatRequest::messages`]); the array is kept as it came when any
/// message is not read exactly.
fn messages(v: Value, extra: &mut Map<String, Value>) -> Vec<Message> {
    let Value::Array(items) = &v else {
        extra.insert("messages".to_owned(), v);
        return Vec::new();
    };
    let mut exact = true;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match Message::deserialize(item) {
            Ok(m) => {
                exact &= serde_json::to_value(&m).ok().as_ref() == Some(item);
                out.push(m);
            }
            Err(_) => exact = false,
        }
    }
    if !exact {
        extra.insert("messages".to_owned(), v);
    }
    out
}

impl<'de> Deserialize<'de> for ChatRequest {
    /// Reads OpenAI's chat completion request body; see the module docs of
    /// [`ChatRequest`]. `model` must be a string when present; `stream`,
    /// `stream_options` and every field the typed request does not model
    /// are kept in [`extra`](ChatRequest::extra_field).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        let mut extra = Map::new();
        let mut body = Body::default();
        let mut model: Option<Arc<str>> = None;
        for (key, v) in map {
            let x = &mut extra;
            match key.as_str() {
                "model" => match v {
                    Value::String(s) => model = Some(s.into()),
                    Value::Null => {}
                    _ => return Err(D::Error::custom("`model` must be a string")),
                },
                "messages" => body.messages = messages(v, x),
                "max_tokens" => body.max_tokens = typed(&key, v, x),
                "max_completion_tokens" => body.max_completion_tokens = typed(&key, v, x),
                "temperature" => body.temperature = typed(&key, v, x),
                "top_p" => body.top_p = typed(&key, v, x),
                "n" => body.n = typed(&key, v, x),
                "seed" => body.seed = typed(&key, v, x),
                "stop" => body.stop = typed(&key, v, x),
                "presence_penalty" => body.presence_penalty = typed(&key, v, x),
                "frequency_penalty" => body.frequency_penalty = typed(&key, v, x),
                "logprobs" => body.logprobs = typed(&key, v, x),
                "top_logprobs" => body.top_logprobs = typed(&key, v, x),
                "user" => body.user = typed(&key, v, x),
                // An empty list is not sent by the typed view: kept as is.
                "tools" if v.as_array().is_some_and(Vec::is_empty) => {
                    x.insert(key, v);
                }
                "tools" => body.tools = typed(&key, v, x).unwrap_or_default(),
                "tool_choice" => body.tool_choice = typed(&key, v, x),
                "parallel_tool_calls" => body.parallel_tool_calls = typed(&key, v, x),
                "response_format" => body.response_format = typed(&key, v, x),
                _ => {
                    x.insert(key, v);
                }
            }
        }
        Ok(ChatRequest {
            inner: Arc::new(Inner {
                model,
                body,
                extra,
                ..Inner::default()
            }),
        })
    }
}

impl ChatRequest {
    /// A field kept beside the typed ones: set with
    /// [`extra`](Self::extra), or read from JSON that the typed request
    /// does not model (`stream`, `stream_options`, vendor fields) or would
    /// not send back exactly.
    pub fn extra_field(&self, key: &str) -> Option<&Value> {
        self.inner.extra.get(key)
    }
}

#[derive(Deserialize)]
struct WireFunctionDef {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Value,
    #[serde(default)]
    strict: Option<bool>,
}

impl<'de> Deserialize<'de> for Tool {
    /// A function tool (`{"type": "function", "function": {…}}`); other
    /// tool types are an error (a request keeps them as they came).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "type")]
            kind: String,
            function: WireFunctionDef,
        }
        let w = Wire::deserialize(d)?;
        if w.kind != "function" {
            return Err(D::Error::custom("only function tools are modelled"));
        }
        let f = w.function;
        Ok(Tool {
            kind: "function",
            function: FunctionDef {
                name: f.name,
                description: f.description,
                parameters: f.parameters,
                strict: f.strict,
            },
        })
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    /// `"none"`, `"auto"`, `"required"` or
    /// `{"type": "function", "function": {"name": …}}`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                _ => Err(D::Error::custom("unknown tool_choice")),
            },
            Value::Object(m) if m.get("type").and_then(Value::as_str) == Some("function") => m
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Function(n.to_owned()))
                .ok_or_else(|| D::Error::custom("tool_choice function without a name")),
            _ => Err(D::Error::custom("unknown tool_choice")),
        }
    }
}

impl<'de> Deserialize<'de> for ResponseFormat {
    /// `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(ResponseFormat::Text),
            Some("json_object") => Ok(ResponseFormat::JsonObject),
            Some("json_schema") => {
                let s = v
                    .get("json_schema")
                    .ok_or_else(|| D::Error::custom("json_schema is missing"))?;
                Ok(ResponseFormat::JsonSchema {
                    name: s
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| D::Error::custom("json_schema.name is missing"))?
                        .to_owned(),
                    schema: s.get("schema").cloned().unwrap_or(Value::Null),
                    strict: s.get("strict").and_then(Value::as_bool).unwrap_or(false),
                })
            }
            _ => Err(D::Error::custom("unknown response_format")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::EncodeOptions;
    use super::*;
    use serde_json::json;

    fn sent(req: &ChatRequest, stream: bool) -> Value {
        let model: Arc<str> = "default-model".into();
        let body = req.body(EncodeOptions {
            default_model: &model,
            stream,
            include_usage: true,
        });
        serde_json::from_slice(&body).unwrap()
    }

    /// Requests as the OpenAI SDKs and agents send them: every typed field,
    /// shapes the typed view reads differently (a lone `stop` string, an
    /// integer temperature, `null`s, a custom tool, a schema with a
    /// description), vendor fields and fields of messages the crate does
    /// not model.
    fn varied() -> Vec<Value> {
        vec![
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
                    ], "name": "ann"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\":21}"},
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
                    {"role": "assistant", "content": "ok", "audio": {"id": "audio_1"}}
                ],
                "max_tokens": 200, "max_completion_tokens": 300, "temperature": 0.7, "top_p": 1,
                "n": 2, "seed": -42, "stop": "END", "presence_penalty": 0.5,
                "frequency_penalty": -0.25, "logprobs": true, "top_logprobs": 3, "user": "u-1",
                "tools": [
                    {"type": "function", "function": {"name": "get_weather", "description": "weather",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}}
                ],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": false,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
                "reasoning_effort": "low", "metadata": {"k": "v"}, "store": false,
                "service_tier": null, "top_k": 40
            }),
            json!({
                "model": "m", "messages": [{"role": "user", "content": "x"}],
                "stop": ["a", "b"], "tool_choice": "required", "max_tokens": null,
                "tools": [{"type": "custom", "custom": {"name": "grep"}}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "description": "d", "schema": {}}},
                "temperature": 1
            }),
            json!({"messages": [{"role": "function", "name": "f", "content": "legacy"}], "tool_choice": "auto",
                   "response_format": {"type": "json_object"}, "prediction": {"type": "content", "content": "x"}}),
        ]
    }

    #[test]
    fn varied_openai_requests_round_trip() {
        for original in varied() {
            let req: ChatRequest = serde_json::from_value(original.clone()).unwrap();
            let mut expected = original.clone();
            if expected.get("model").is_none() {
                expected["model"] = json!("default-model");
            }
            assert_eq!(sent(&req, false), expected, "request {original}");
        }
    }

    #[test]
    fn typed_fields_are_read() {
        let req: ChatRequest = serde_json::from_value(varied()[1].clone()).unwrap();
        assert_eq!(req.model_name(), Some("gpt-4o-mini"));
        assert_eq!(req.messages().len(), 6);
        assert_eq!(req.tool_list()[0].name(), "get_weather");
        assert_eq!(req.max_tokens_value(), Some(200));
        assert_eq!(req.extra_field("reasoning_effort"), Some(&json!("low")));
        assert!(req.extra_field("max_tokens").is_none());
        // A request that its typed view sends exactly keeps nothing extra.
        let req: ChatRequest = serde_json::from_value(varied()[0].clone()).unwrap();
        assert!(req.inner.extra.is_empty());
    }

    #[test]
    fn stream_is_kept_and_the_client_decides() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [], "stream": true,
            "stream_options": {"include_usage": false}
        }))
        .unwrap();
        assert_eq!(req.extra_field("stream"), Some(&json!(true)));
        // Sent unstreamed, the body carries no `stream` (the client's);
        // streamed, the caller's `stream_options` win.
        assert!(sent(&req, false).get("stream").is_none());
        let streamed = sent(&req, true);
        assert_eq!(streamed["stream"], true);
        assert_eq!(streamed["stream_options"]["include_usage"], false);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        assert!(serde_json::from_value::<ChatRequest>(json!({"model": 3})).is_err());
        assert!(serde_json::from_value::<ChatRequest>(json!([1, 2])).is_err());
        assert!(serde_json::from_str::<ChatRequest>("{").is_err());
        let req: ChatRequest = serde_json::from_value(json!({"messages": "nope"})).unwrap();
        assert!(req.messages().is_empty());
        assert_eq!(sent(&req, false)["messages"], "nope");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (0u32..300).prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                prop::sample::select(vec![0.0, 0.5, 0.7, 1.0, 2.0]).prop_map(Value::from),
                "[a-z ]{0,8}".prop_map(Value::from),
                prop::sample::select(vec!["none", "auto", "required", "function", "text"])
                    .prop_map(Value::from),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// The typed fields' names (and the ones of their insides) half of
        /// the time, so that the typed paths are taken.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "messages",
                    "max_tokens",
                    "max_completion_tokens",
                    "temperature",
                    "top_p",
                    "n",
                    "seed",
                    "stop",
                    "presence_penalty",
                    "frequency_penalty",
                    "logprobs",
                    "top_logprobs",
                    "user",
                    "tools",
                    "tool_choice",
                    "parallel_tool_calls",
                    "response_format",
                    "role",
                    "content",
                    "type",
                    "function",
                    "name",
                    "parameters",
                    "json_schema",
                    "schema",
                    "tool_calls",
                    "text",
                    "image_url",
                    "url",
                ])
                .prop_map(str::to_owned),
                "[a-z_]{1,8}",
            ]
        }

        fn message() -> impl Strategy<Value = Value> {
            (
                prop::sample::select(vec!["system", "developer", "user", "assistant", "tool"]),
                prop_oneof!["[a-z ]{0,8}".prop_map(Value::from), value()],
                prop::collection::btree_map(key(), value(), 0..3),
            )
                .prop_map(|(role, content, more)| {
                    let mut m: Map<String, Value> = more.into_iter().collect();
                    m.insert("role".into(), json!(role));
                    m.insert("content".into(), content);
                    Value::Object(m)
                })
        }

        fn request() -> impl Strategy<Value = Value> {
            (
                prop::collection::vec(message(), 0..4),
                prop::collection::btree_map(key(), value(), 0..8),
                prop::option::of("[a-z0-9-]{1,10}"),
            )
                .prop_map(|(messages, fields, model)| {
                    let mut m: Map<String, Value> = fields.into_iter().collect();
                    m.insert("messages".into(), Value::Array(messages));
                    m.insert(
                        "model".into(),
                        json!(model.unwrap_or_else(|| "default-model".into())),
                    );
                    // The stream flag is the client's to send.
                    m.remove("stream");
                    Value::Object(m)
                })
        }

        proptest! {
            /// Whatever a caller sends (well-typed or not), the body sent
            /// upstream is what it sent.
            #[test]
            fn any_request_is_sent_as_it_came(original in request()) {
                let req: ChatRequest = serde_json::from_value(original.clone()).unwrap();
                // Both sides through one parse of the same text: serde_json
                // reads some extreme floats a last digit off (its default,
                // fast float parsing), on either side alike.
                let text = serde_json::to_string(&original).unwrap();
                let expected: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(sent(&req, false), expected);
            }
        }
    }
}
