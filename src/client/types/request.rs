//! The chat completion request and its one-time JSON encoding.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use super::Message;

// Reading a request from OpenAI's JSON (`Deserialize`), losslessly.
mod de;

/// A function the model may call: its name, what it does, and a JSON
/// Schema of its parameters.
#[derive(Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionDef,
}

#[derive(Clone, PartialEq, Serialize)]
struct FunctionDef {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    parameters: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

impl Tool {
    /// A function tool; `parameters` is a JSON Schema object.
    pub fn function(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Value,
    ) -> Self {
        Self {
            kind: "function",
            function: FunctionDef {
                name: name.into(),
                description: Some(description.into()),
                parameters,
                strict: None,
            },
        }
    }

    /// Asks the provider to follow the schema exactly (OpenAI's `strict`).
    pub fn strict(mut self, strict: bool) -> Self {
        self.function.strict = Some(strict);
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.function.name
    }
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.function.name)
            .finish_non_exhaustive()
    }
}

/// Whether and which tool the model must call.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolChoice {
    /// Never call a tool (`"none"`).
    None,
    /// The model decides (`"auto"`, the provider's default with tools).
    Auto,
    /// Call at least one tool (`"required"`).
    Required,
    /// Call this function.
    Function(String),
}

impl Serialize for ToolChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ToolChoice::None => s.serialize_str("none"),
            ToolChoice::Auto => s.serialize_str("auto"),
            ToolChoice::Required => s.serialize_str("required"),
            ToolChoice::Function(name) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("type", "function")?;
                m.serialize_entry("function", &serde_json::json!({ "name": name }))?;
                m.end()
            }
        }
    }
}

/// The shape of the answer (`response_format`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ResponseFormat {
    /// Plain text (the default).
    Text,
    /// Any JSON object (`json_object`; the prompt must ask for JSON).
    JsonObject,
    /// JSON that follows a schema (`json_schema`, "structured outputs").
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The JSON Schema.
        schema: Value,
        /// Follow the schema exactly.
        strict: bool,
    },
}

impl Serialize for ResponseFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            ResponseFormat::Text => m.serialize_entry("type", "text")?,
            ResponseFormat::JsonObject => m.serialize_entry("type", "json_object")?,
            ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            } => {
                m.serialize_entry("type", "json_schema")?;
                m.serialize_entry(
                    "json_schema",
                    &serde_json::json!({ "name": name, "schema": schema, "strict": strict }),
                )?;
            }
        }
        m.end()
    }
}

#[derive(Clone, Default, Serialize)]
struct Body {
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
}

/// How the client sends a request: its default model and stream settings.
#[derive(Clone, Copy)]
pub(crate) struct EncodeOptions<'a> {
    pub(crate) default_model: &'a Arc<str>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

impl EncodeOptions<'_> {
    fn flags(&self) -> u8 {
        u8::from(self.stream) | (u8::from(self.include_usage) << 1)
    }
}

/// The whole body: the client's fields first, then the request's.
#[derive(Serialize)]
struct Full<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    body: &'a Body,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Clone, Default)]
struct Inner {
    model: Option<Arc<str>>,
    body: Body,
    extra: Map<String, Value>,
    // The body of the first send, with the model and stream settings it
    // was built for: every retry of the same request to the same client
    // (and every clone of the request) reuses it without copying.
    full: OnceLock<(Arc<str>, u8, Bytes)>,
    idempotency_key: Option<reqwest::header::HeaderValue>, // cleared by `edit`
}

/// An OpenAI-compatible chat completion request: messages (text, images,
/// tool calls and tool answers) and every field agents use (`tools`,
/// `tool_choice`, `response_format`, `seed`, `n`, penalties, `logprobs`,
/// …), plus [`extra`](Self::extra) for vendor fields.
///
/// Cheap to clone: the content lives behind an `Arc`, and the JSON body is
/// serialized once, on first send, and then shared by every clone, so a
/// retry re-sends the same bytes without serializing again. Changing a
/// field of a shared request copies it first (copy on write).
///
/// The model is optional: without one, the client's default model is used.
///
/// ```
/// use llm_resilience::client::{ChatRequest, Message, Tool, ToolChoice};
/// use serde_json::json;
///
/// let req = ChatRequest::user("What is the weather in Paris?")
///     .with_system("Be brief")
///     .max_tokens(200)
///     .temperature(0.2)
///     .tool(Tool::function(
///         "get_weather",
///         "The current weather in a city",
///         json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
///     ))
///     .tool_choice(ToolChoice::Auto);
/// assert_eq!(req.messages().len(), 2);
/// ```
#[derive(Clone)]
pub struct ChatRequest {
    inner: Arc<Inner>,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident, $field:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.edit().body.$field = Some(value);
            self
        }
    };
}

impl ChatRequest {
    /// A request with these messages.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            inner: Arc::new(Inner {
                body: Body {
                    messages,
                    ..Body::default()
                },
                ..Inner::default()
            }),
        }
    }

    /// A request with one user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(vec![Message::user(content)])
    }

    fn edit(&mut self) -> &mut Inner {
        let inner = Arc::make_mut(&mut self.inner);
        inner.full = OnceLock::new();
        inner.idempotency_key = None;
        inner
    }

    /// Puts a system message first.
    pub fn with_system(mut self, content: impl Into<String>) -> Self {
        self.edit()
            .body
            .messages
            .insert(0, Message::system(content));
        self
    }

    /// Appends a message (for example the assistant's answer with its tool
    /// calls, then a [`Message::tool`] per call).
    pub fn push(mut self, message: Message) -> Self {
        self.edit().body.messages.push(message);
        self
    }

    /// Sets the model (overrides the client's default).
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.edit().model = Some(model.into());
        self
    }

    setter!(
        /// Sets `max_tokens`.
        max_tokens, max_tokens: u32
    );
    setter!(
        /// Sets `max_completion_tokens` (OpenAI's name for reasoning models;
        /// it counts reasoning tokens too).
        max_completion_tokens, max_completion_tokens: u32
    );
    setter!(
        /// Sets `temperature`.
        temperature, temperature: f32
    );
    setter!(
        /// Sets `top_p`.
        top_p, top_p: f32
    );
    setter!(
        /// Asks for `n` choices.
        n, n: u32
    );
    setter!(
        /// Sets `seed`, for (best-effort) reproducible sampling.
        seed, seed: i64
    );
    setter!(
        /// Sets the stop sequences.
        stop, stop: Vec<String>
    );
    setter!(
        /// Sets `presence_penalty` (-2.0 to 2.0).
        presence_penalty, presence_penalty: f32
    );
    setter!(
        /// Sets `frequency_penalty` (-2.0 to 2.0).
        frequency_penalty, frequency_penalty: f32
    );
    setter!(
        /// Asks for the log probabilities of the output tokens (read them
        /// from [`ChatResponse::raw_json`](super::ChatResponse::raw_json)).
        logprobs, logprobs: bool
    );
    setter!(
        /// How many most likely tokens to report at each position (0 to 20;
        /// needs `logprobs`).
        top_logprobs, top_logprobs: u8
    );
    setter!(
        /// Sets the tool choice.
        tool_choice, tool_choice: ToolChoice
    );
    setter!(
        /// Allows (or forbids) several tool calls in one answer.
        parallel_tool_calls, parallel_tool_calls: bool
    );
    setter!(
        /// Sets the `response_format`.
        response_format, response_format: ResponseFormat
    );

    /// Sets the end-user id sent to the provider as `user` (for its abuse
    /// monitoring).
    pub fn end_user(mut self, user: impl Into<String>) -> Self {
        self.edit().body.user = Some(user.into());
        self
    }

    /// Offers a tool to the model (adds to the `tools` list).
    pub fn tool(mut self, tool: Tool) -> Self {
        self.edit().body.tools.push(tool);
        self
    }

    /// Sets the whole `tools` list.
    pub fn tools(mut self, tools: Vec<Tool>) -> Self {
        self.edit().body.tools = tools;
        self
    }

    /// Adds a vendor field to the JSON body (`top_k`, `repetition_penalty`,
    /// `reasoning_effort`, …), so nothing a provider accepts is out of
    /// reach. A key that names a typed field replaces it; `model` and
    /// `stream` are the client's and are ignored here.
    pub fn extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.edit().extra.insert(key.into(), value);
        self
    }

    pub(crate) fn pinned_key(&mut self) -> &mut Option<reqwest::header::HeaderValue> {
        &mut Arc::make_mut(&mut self.inner).idempotency_key
    }

    /// The key set with [`idempotency_key`](Self::idempotency_key), if any.
    pub fn idempotency_key_value(&self) -> Option<&reqwest::header::HeaderValue> {
        self.inner.idempotency_key.as_ref()
    }

    /// The messages.
    pub fn messages(&self) -> &[Message] {
        &self.inner.body.messages
    }

    /// The tools offered.
    pub fn tool_list(&self) -> &[Tool] {
        &self.inner.body.tools
    }

    /// The model set on the request, if any.
    pub fn model_name(&self) -> Option<&str> {
        self.inner.model.as_deref()
    }

    /// `max_tokens` (or else `max_completion_tokens`), if set.
    pub fn max_tokens_value(&self) -> Option<u32> {
        self.inner
            .body
            .max_tokens
            .or(self.inner.body.max_completion_tokens)
    }

    /// A rough token estimate of the prompt (4 bytes a token, plus a few per
    /// message), for a rate limiter's up-front charge; settle with the
    /// response's [`Usage`](super::Usage).
    pub fn estimated_prompt_tokens(&self) -> u32 {
        let bytes: usize = self.inner.body.messages.iter().map(|m| m.size() + 16).sum();
        u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
    }

    /// The JSON body to send, built once per request (and model and stream
    /// settings): every retry shares the same bytes. A request sent with
    /// other settings than its first send (a fallback to another model) is
    /// serialized for that send.
    pub(crate) fn body(&self, opts: EncodeOptions<'_>) -> Bytes {
        let model = self.inner.model.as_ref().unwrap_or(opts.default_model);
        let flags = opts.flags();
        if let Some((m, f, full)) = self.inner.full.get() {
            if (Arc::ptr_eq(m, model) || **m == **model) && *f == flags {
                return full.clone();
            }
        }
        let full = self.encode(model, opts);
        let _ = self
            .inner
            .full
            .set((Arc::clone(model), flags, full.clone()));
        full
    }

    fn encode(&self, model: &str, opts: EncodeOptions<'_>) -> Bytes {
        let inner = &*self.inner;
        let full = Full {
            model,
            stream: opts.stream,
            stream_options: (opts.stream && opts.include_usage).then_some(StreamOptions {
                include_usage: true,
            }),
            body: &inner.body,
        };
        let estimate = 96
            + model.len()
            + inner
                .body
                .messages
                .iter()
                .map(|m| m.size() + 48)
                .sum::<usize>();
        let mut out = BytesMut::with_capacity(estimate).writer();
        let written = if inner.extra.is_empty() {
            serde_json::to_writer(&mut out, &full)
        } else {
            // Vendor fields: merge into the typed body (they win), never
            // over the client's `model` and `stream`.
            serde_json::to_value(&full).and_then(|mut v| {
                if let Value::Object(m) = &mut v {
                    for (k, val) in &inner.extra {
                        if !matches!(k.as_str(), "model" | "stream") {
                            m.insert(k.clone(), val.clone());
                        }
                    }
                }
                serde_json::to_writer(&mut out, &v)
            })
        };
        match written {
            Ok(()) => out.into_inner().freeze(),
            // Strings, numbers and JSON values do not fail to serialize; an
            // empty object would be a body the server rejects as a bad
            // request, never a panic.
            Err(_) => Bytes::from_static(b"{}"),
        }
    }
}

impl fmt::Debug for ChatRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.inner.body;
        f.debug_struct("ChatRequest")
            .field("model", &self.inner.model)
            .field("messages", &b.messages)
            .field("max_tokens", &b.max_tokens)
            .field("temperature", &b.temperature)
            .field("tools", &b.tools)
            .field("extra_keys", &self.inner.extra.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(model: &Arc<str>, stream: bool) -> EncodeOptions<'_> {
        EncodeOptions {
            default_model: model,
            stream,
            include_usage: true,
        }
    }

    fn json(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn body_is_encoded_once_and_shared_by_clones() {
        let m: Arc<str> = "m".into();
        let req = ChatRequest::user("hi").max_tokens(5);
        let copy = req.clone();
        let a = req.body(opts(&m, false));
        let b = copy.body(opts(&m, false));
        // Not even copied: the retry's body is the same allocation.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let other = copy.body(opts(&"n".into(), false));
        assert_ne!(a, other);
        let v = json(&a);
        assert_eq!(v["model"], "m");
        assert_eq!(v["max_tokens"], 5);
        assert_eq!(v["messages"][0]["role"], "user");
        assert!(v.get("stream").is_none());
        let s = json(&req.clone().model("x\"y").body(opts(&m, true)));
        assert_eq!(s["model"], "x\"y");
        assert_eq!(s["stream"], true);
        assert_eq!(s["stream_options"]["include_usage"], true);
        let no_usage = req.body(EncodeOptions {
            default_model: &m,
            stream: true,
            include_usage: false,
        });
        assert!(json(&no_usage).get("stream_options").is_none());
    }

    #[test]
    fn editing_a_shared_request_copies_it() {
        let m: Arc<str> = "m".into();
        let req = ChatRequest::user("hi");
        let _ = req.body(opts(&m, false));
        let edited = req.clone().max_tokens(9);
        assert!(edited.inner.full.get().is_none());
        assert_eq!(json(&edited.body(opts(&m, false)))["max_tokens"], 9);
        assert!(json(&req.body(opts(&m, false))).get("max_tokens").is_none());
    }

    #[test]
    fn extra_fields_merge_and_win_but_not_over_model() {
        let m: Arc<str> = "m".into();
        let v = json(
            &ChatRequest::user("hi")
                .temperature(0.5)
                .extra("top_k", serde_json::json!(40))
                .extra("temperature", serde_json::json!(0.0))
                .extra("model", serde_json::json!("evil"))
                .body(opts(&m, false)),
        );
        assert_eq!(v["top_k"], 40);
        assert_eq!(v["temperature"], 0.0);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn debug_never_shows_the_prompt() {
        let req =
            ChatRequest::user("top secret prompt").push(Message::tool("c1", "secret tool out"));
        assert!(!format!("{req:?}").contains("secret"));
    }
}
