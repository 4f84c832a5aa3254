//! The request of the Messages API, serialized once and shared by retries.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::{Map, Value};

use super::types::{ContentBlock, Message, Tool, ToolChoice};

#[derive(Clone, Serialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

#[derive(Clone, Serialize)]
struct Metadata {
    user_id: String,
}

#[derive(Clone, Serialize)]
struct Body {
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<System>,
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// The body fields the request sets itself.
const MODELLED: [&str; 12] = [
    "model",
    "max_tokens",
    "stream",
    "system",
    "messages",
    "tools",
    "tool_choice",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
];

/// The full body of the last send: model, `max_tokens`, stream flag, bytes.
type Full = (Arc<str>, u32, bool, Bytes);

#[derive(Clone)]
struct Inner {
    model: Option<Arc<str>>,
    max_tokens: Option<u32>,
    body: Body,
    // The body serialized once, without `model`, `max_tokens` and `stream`;
    // shared by every clone (a retry's copy included).
    encoded: OnceLock<Bytes>,
    // The full body of the first send: every retry of the same request
    // through the same client reuses these bytes (a reference count).
    full: OnceLock<Full>,
    // The caller's own idempotency key; cleared by any change to the body.
    idempotency_key: Option<reqwest::header::HeaderValue>,
}

/// A Messages API request: a system prompt, the conversation, tools, and
/// sampling settings.
///
/// Cheap to clone (an `Arc`); the JSON body is built once, on the first
/// send, and every retry sends the same bytes. Editing a shared request
/// copies it first. `Debug` never shows the prompt.
///
/// The model and `max_tokens` come from the client unless the request sets
/// them ([`model`](Self::model), [`max_tokens`](Self::max_tokens)).
///
/// ```
/// use llm_resilience::anthropic::{ContentBlock, Message, MessagesRequest, Role, Tool};
/// use serde_json::json;
///
/// let req = MessagesRequest::user("What is the weather in Paris?")
///     .with_system("You are terse.")
///     .tool(Tool::new(
///         "get_weather",
///         "Current weather of a city",
///         json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
///     ))
///     .push(Message::new(Role::Assistant, vec![ContentBlock::tool_use("toolu_1", "get_weather", json!({"city": "Paris"}))]))
///     .push(Message::tool_results(vec![ContentBlock::tool_result("toolu_1", "18C, sunny")]))
///     .max_tokens(256)
///     .temperature(0.2);
/// assert_eq!(req.messages().len(), 3);
/// ```
#[derive(Clone)]
pub struct MessagesRequest {
    inner: Arc<Inner>,
}

impl MessagesRequest {
    /// A request with these messages.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            inner: Arc::new(Inner {
                model: None,
                max_tokens: None,
                body: Body {
                    system: None,
                    messages,
                    tools: Vec::new(),
                    tool_choice: None,
                    stop_sequences: None,
                    temperature: None,
                    top_p: None,
                    top_k: None,
                    metadata: None,
                    extra: Map::new(),
                },
                encoded: OnceLock::new(),
                full: OnceLock::new(),
                idempotency_key: None,
            }),
        }
    }

    /// A request with one user text message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new(vec![Message::user(text)])
    }

    fn edit(&mut self) -> &mut Body {
        let inner = Arc::make_mut(&mut self.inner);
        inner.encoded = OnceLock::new();
        inner.full = OnceLock::new();
        inner.idempotency_key = None;
        &mut inner.body
    }

    /// Sets the system prompt.
    pub fn with_system(mut self, text: impl Into<String>) -> Self {
        self.edit().system = Some(System::Text(text.into()));
        self
    }

    /// Sets the system prompt as text blocks (for `cache_control`).
    pub fn with_system_blocks(mut self, blocks: Vec<ContentBlock>) -> Self {
        self.edit().system = Some(System::Blocks(blocks));
        self
    }

    /// Appends a message.
    pub fn push(mut self, message: Message) -> Self {
        self.edit().messages.push(message);
        self
    }

    /// Offers a tool to the model.
    pub fn tool(mut self, tool: Tool) -> Self {
        self.edit().tools.push(tool);
        self
    }

    /// Sets how the model may use the tools.
    pub fn tool_choice(mut self, choice: ToolChoice) -> Self {
        self.edit().tool_choice = Some(choice);
        self
    }

    /// Sets the model (overrides the client's default).
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        // Not part of the cached rest of the body: only the full body is
        // built again.
        let inner = Arc::make_mut(&mut self.inner);
        inner.model = Some(model.into());
        inner.full = OnceLock::new();
        inner.idempotency_key = None;
        self
    }

    /// Sets `max_tokens` (overrides the client's default).
    pub fn max_tokens(mut self, n: u32) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        inner.max_tokens = Some(n);
        inner.full = OnceLock::new();
        inner.idempotency_key = None;
        self
    }

    /// Sets `stop_sequences`.
    pub fn stop_sequences(mut self, stop: Vec<String>) -> Self {
        self.edit().stop_sequences = Some(stop);
        self
    }

    /// Sets `temperature` (0 to 1).
    pub fn temperature(mut self, t: f32) -> Self {
        self.edit().temperature = Some(t);
        self
    }

    /// Sets `top_p`.
    pub fn top_p(mut self, p: f32) -> Self {
        self.edit().top_p = Some(p);
        self
    }

    /// Sets `top_k`.
    pub fn top_k(mut self, k: u32) -> Self {
        self.edit().top_k = Some(k);
        self
    }

    /// Sets `metadata.user_id`, an opaque id of the end user for the
    /// provider's abuse detection.
    pub fn end_user(mut self, user_id: impl Into<String>) -> Self {
        self.edit().metadata = Some(Metadata {
            user_id: user_id.into(),
        });
        self
    }

    /// Adds a top-level body field this type does not model (`thinking`,
    /// `service_tier`, a vendor's own): merged into the JSON body as is.
    /// The name of a field the request models (`messages`, `system`,
    /// `model`, `max_tokens`, `stream`, …) is ignored here: use its setter,
    /// so the body never holds a key twice.
    pub fn extra(mut self, name: impl Into<String>, value: Value) -> Self {
        let name = name.into();
        if !MODELLED.contains(&name.as_str()) {
            self.edit().extra.insert(name, value);
        }
        self
    }

    /// Sends this `Idempotency-Key` on every attempt of every call with this
    /// request (or a clone of it), in place of the key the client draws per
    /// logical request: for a caller that retries by hand, or a gateway
    /// that forwards its own caller's key. Set it last: any later change to
    /// the request drops it, so that one key never names two different
    /// bodies. Ignored when the client does not send keys
    /// ([`send_idempotency_key`](super::AnthropicClientBuilder::send_idempotency_key)).
    pub fn idempotency_key(mut self, key: reqwest::header::HeaderValue) -> Self {
        Arc::make_mut(&mut self.inner).idempotency_key = Some(key);
        self
    }

    /// The key set with [`idempotency_key`](Self::idempotency_key), if any.
    pub fn idempotency_key_value(&self) -> Option<&reqwest::header::HeaderValue> {
        self.inner.idempotency_key.as_ref()
    }

    /// The messages.
    pub fn messages(&self) -> &[Message] {
        &self.inner.body.messages
    }

    /// The model set on the request, if any.
    pub fn model_name(&self) -> Option<&str> {
        self.inner.model.as_deref()
    }

    /// `max_tokens` set on the request, if any.
    pub fn max_tokens_value(&self) -> Option<u32> {
        self.inner.max_tokens
    }

    /// A rough token estimate of the prompt (4 bytes a token, plus a few per
    /// block), for a rate limiter's up-front charge; settle with the
    /// response's [`Usage`](super::Usage).
    pub fn estimated_prompt_tokens(&self) -> u32 {
        let body = &self.inner.body;
        let system = match &body.system {
            Some(System::Text(t)) => t.len(),
            Some(System::Blocks(b)) => b.iter().map(ContentBlock::weight).sum(),
            None => 0,
        };
        let blocks: usize = body
            .messages
            .iter()
            .flat_map(|m| &m.content)
            .map(|b| b.weight() + 8)
            .sum();
        let bytes = system + blocks + 16 * body.messages.len();
        u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
    }

    /// The cached body without `model`, `max_tokens` and `stream`.
    fn encoded(&self) -> &Bytes {
        self.inner.encoded.get_or_init(|| {
            // Strings, numbers and JSON values cannot fail to serialize; an
            // empty object is a harmless fallback the server will reject.
            serde_json::to_vec(&self.inner.body)
                .map(Bytes::from)
                .unwrap_or_else(|_| Bytes::from_static(b"{}"))
        })
    }

    /// The JSON body to send. Built once per request (for a model,
    /// `max_tokens` and stream flag): every retry shares the same bytes.
    pub(crate) fn body(&self, default_model: &str, default_max_tokens: u32, stream: bool) -> Bytes {
        let model = self.inner.model.as_deref().unwrap_or(default_model);
        let max_tokens = self.inner.max_tokens.unwrap_or(default_max_tokens);
        if let Some((m, n, s, full)) = self.inner.full.get() {
            if &**m == model && *n == max_tokens && *s == stream {
                return full.clone();
            }
        }
        let full = self.build_body(model, max_tokens, stream);
        let _ = self
            .inner
            .full
            .set((Arc::from(model), max_tokens, stream, full.clone()));
        full
    }

    fn build_body(&self, model: &str, max_tokens: u32, stream: bool) -> Bytes {
        let rest = self.encoded();
        let mut out = BytesMut::with_capacity(rest.len() + model.len() + 64);
        out.put_slice(b"{\"model\":");
        // A JSON string of the model name (escapes quotes, if any).
        match serde_json::to_vec(model) {
            Ok(m) => out.put_slice(&m),
            Err(_) => out.put_slice(b"\"\""),
        }
        out.put_slice(b",\"max_tokens\":");
        out.put_slice(max_tokens.to_string().as_bytes());
        if stream {
            out.put_slice(b",\"stream\":true");
        }
        // `rest` is an object that always holds `messages`.
        if rest.len() > 2 {
            out.put_u8(b',');
            out.put_slice(&rest[1..]);
        } else {
            out.put_u8(b'}');
        }
        out.freeze()
    }
}

impl fmt::Debug for MessagesRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.inner.body;
        f.debug_struct("MessagesRequest")
            .field("model", &self.inner.model)
            .field("max_tokens", &self.inner.max_tokens)
            .field("system", &b.system.is_some())
            .field("messages", &b.messages)
            .field("tools", &b.tools)
            .field("temperature", &b.temperature)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn body_is_encoded_once_and_shared_by_clones() {
        let req = MessagesRequest::user("hi").with_system("sys");
        let copy = req.clone();
        let a = req.body("m", 100, false);
        assert!(copy.inner.encoded.get().is_some());
        let b = copy.body("m", 100, false);
        // A retry's body is the same allocation, not a copy.
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_ne!(a, copy.body("m", 101, false));
        let v = parse(&a);
        assert_eq!(v["model"], "m");
        assert_eq!(v["max_tokens"], 100);
        assert_eq!(v["system"], "sys");
        assert_eq!(v["messages"][0]["content"][0]["type"], "text");
        assert!(v.get("stream").is_none());
        assert!(v.get("tools").is_none());
        let s = parse(&req.clone().model("x\"y").max_tokens(7).body("m", 100, true));
        assert_eq!(s["model"], "x\"y");
        assert_eq!(s["max_tokens"], 7);
        assert_eq!(s["stream"], true);
    }

    #[test]
    fn every_field_reaches_the_body() {
        let req = MessagesRequest::user("q")
            .tool(Tool::new("f", "does f", json!({"type": "object"})))
            .tool_choice(ToolChoice::Any {
                disable_parallel_tool_use: true,
            })
            .stop_sequences(vec!["END".into()])
            .temperature(0.5)
            .top_p(0.9)
            .top_k(40)
            .end_user("u-1")
            .extra(
                "thinking",
                json!({"type": "enabled", "budget_tokens": 1024}),
            )
            .extra("messages", json!([]))
            .with_system_blocks(vec![ContentBlock::text("long").cached()]);
        let v = parse(&req.body("m", 1, false));
        assert_eq!(v["tools"][0]["name"], "f");
        assert_eq!(v["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(
            v["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(v["stop_sequences"][0], "END");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["top_k"], 40);
        assert_eq!(v["metadata"]["user_id"], "u-1");
        assert_eq!(v["thinking"]["budget_tokens"], 1024);
        assert_eq!(v["system"][0]["cache_control"]["type"], "ephemeral");
        // An extra never shadows a modelled field.
        assert_eq!(v["messages"][0]["role"], "user");
        let text = std::str::from_utf8(&req.body("m", 1, false))
            .unwrap()
            .to_owned();
        assert_eq!(text.matches("\"messages\"").count(), 1);
    }

    #[test]
    fn editing_a_shared_request_copies_it_and_debug_hides_the_prompt() {
        let req = MessagesRequest::user("top secret prompt");
        let _ = req.body("m", 1, false);
        let edited = req.clone().temperature(0.1);
        assert!(edited.inner.encoded.get().is_none());
        assert!(parse(&req.body("m", 1, false)).get("temperature").is_none());
        assert!(!format!("{edited:?}").contains("secret"));
        assert!(req.estimated_prompt_tokens() > 0);
    }
}
