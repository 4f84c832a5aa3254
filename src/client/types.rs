//! The crate-owned request and response types of the chat client.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::classify::hint;

/// Who wrote a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's answer.
    Tool,
}

/// One chat message.
///
/// `Debug` shows the role and the length of the content, never the text: a
/// request can be logged without logging the prompt.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("role", &self.role)
            .field("content_len", &self.content.len())
            .finish()
    }
}

#[derive(Clone, Serialize)]
struct Body {
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

#[derive(Clone)]
struct Inner {
    model: Option<Arc<str>>,
    body: Body,
    // The body serialized once, without `model` and `stream`; shared by
    // every clone (a retry's copy included).
    encoded: OnceLock<Bytes>,
    // The full body of the first send, with the model and stream flag it
    // was built for: every retry of the same request to the same client
    // reuses it without copying.
    full: OnceLock<(Arc<str>, bool, Bytes)>,
}

/// An OpenAI-compatible chat completion request.
///
/// Cheap to clone: the messages live behind an `Arc`, and the JSON body is
/// serialized once, on first send, and then shared by every clone, so a
/// retry re-sends the same bytes without serializing again. Changing a field
/// of a shared request copies it first (copy on write).
///
/// The model is optional: without one, the client's default model is used.
///
/// ```
/// use llm_resilience::client::{ChatRequest, Message};
///
/// let req = ChatRequest::user("Summarise this ticket")
///     .with_system("Be brief")
///     .max_tokens(200)
///     .temperature(0.2);
/// assert_eq!(req.messages().len(), 2);
/// ```
#[derive(Clone)]
pub struct ChatRequest {
    inner: Arc<Inner>,
}

impl ChatRequest {
    /// A request with these messages.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            inner: Arc::new(Inner {
                model: None,
                body: Body {
                    messages,
                    max_tokens: None,
                    temperature: None,
                    top_p: None,
                    stop: None,
                    user: None,
                },
                encoded: OnceLock::new(),
                full: OnceLock::new(),
            }),
        }
    }

    /// A request with one user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(vec![Message::user(content)])
    }

    fn edit(&mut self) -> &mut Inner {
        let inner = Arc::make_mut(&mut self.inner);
        inner.encoded = OnceLock::new();
        inner.full = OnceLock::new();
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

    /// Appends a message.
    pub fn push(mut self, message: Message) -> Self {
        self.edit().body.messages.push(message);
        self
    }

    /// Sets the model (overrides the client's default).
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        // The model is not part of the cached rest of the body: only the
        // full body is built again.
        let inner = Arc::make_mut(&mut self.inner);
        inner.model = Some(model.into());
        inner.full = OnceLock::new();
        self
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.edit().body.max_tokens = Some(n);
        self
    }

    /// Sets `temperature`.
    pub fn temperature(mut self, t: f32) -> Self {
        self.edit().body.temperature = Some(t);
        self
    }

    /// Sets `top_p`.
    pub fn top_p(mut self, p: f32) -> Self {
        self.edit().body.top_p = Some(p);
        self
    }

    /// Sets the stop sequences.
    pub fn stop(mut self, stop: Vec<String>) -> Self {
        self.edit().body.stop = Some(stop);
        self
    }

    /// Sets the end-user id sent to the provider (for its abuse monitoring).
    pub fn end_user(mut self, user: impl Into<String>) -> Self {
        self.edit().body.user = Some(user.into());
        self
    }

    /// The messages.
    pub fn messages(&self) -> &[Message] {
        &self.inner.body.messages
    }

    /// The model set on the request, if any.
    pub fn model_name(&self) -> Option<&str> {
        self.inner.model.as_deref()
    }

    /// `max_tokens`, if set.
    pub fn max_tokens_value(&self) -> Option<u32> {
        self.inner.body.max_tokens
    }

    /// A rough token estimate of the prompt (4 bytes a token, plus a few per
    /// message), for a rate limiter's up-front charge; settle with the
    /// response's [`Usage`].
    pub fn estimated_prompt_tokens(&self) -> u32 {
        let bytes: usize = self
            .inner
            .body
            .messages
            .iter()
            .map(|m| m.content.len() + 16)
            .sum();
        u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
    }

    /// The cached body without `model` and `stream`: `{"messages":…}`.
    fn encoded(&self) -> &Bytes {
        self.inner.encoded.get_or_init(|| {
            // Serializing plain strings and numbers cannot fail; an empty
            // object is a harmless fallback that the server will reject.
            serde_json::to_vec(&self.inner.body)
                .map(Bytes::from)
                .unwrap_or_else(|_| Bytes::from_static(b"{}"))
        })
    }

    /// The JSON body to send: `{"model":…,"stream":…,` followed by the
    /// cached rest. Built once per request (and model and stream flag):
    /// every retry shares the same bytes.
    pub(crate) fn body(&self, default_model: &str, stream: bool) -> Bytes {
        let model = self.inner.model.as_deref().unwrap_or(default_model);
        if let Some((m, s, full)) = self.inner.full.get() {
            if &**m == model && *s == stream {
                return full.clone();
            }
        }
        let full = self.build_body(model, stream);
        let _ = self
            .inner
            .full
            .set((Arc::from(model), stream, full.clone()));
        full
    }

    fn build_body(&self, model: &str, stream: bool) -> Bytes {
        let rest = self.encoded();
        let mut out = BytesMut::with_capacity(rest.len() + model.len() + 80);
        out.put_slice(b"{\"model\":");
        // A JSON string of the model name (escapes quotes, if any).
        match serde_json::to_vec(model) {
            Ok(m) => out.put_slice(&m),
            Err(_) => out.put_slice(b"\"\""),
        }
        if stream {
            out.put_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
        }
        // `rest` starts with `{`; the messages array is always there.
        if rest.len() > 2 {
            out.put_u8(b',');
            out.put_slice(&rest[1..]);
        } else {
            out.put_u8(b'}');
        }
        out.freeze()
    }
}

impl fmt::Debug for ChatRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatRequest")
            .field("model", &self.inner.model)
            .field("messages", &self.inner.body.messages)
            .field("max_tokens", &self.inner.body.max_tokens)
            .field("temperature", &self.inner.body.temperature)
            .finish_non_exhaustive()
    }
}

/// Token usage as the provider reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Tokens of the completion.
    #[serde(default)]
    pub completion_tokens: u32,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u32,
}

/// The rate-limit state a response reported: OpenAI's
/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, or, when those
/// are absent, Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,
/// remaining,reset}` (its RFC 3339 reset instants read against the system
/// clock). Absent or malformed headers are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// Requests allowed per window.
    pub limit_requests: Option<u64>,
    /// Requests left in the window.
    pub remaining_requests: Option<u64>,
    /// Time until the request window resets.
    pub reset_requests: Option<Duration>,
    /// Tokens allowed per window.
    pub limit_tokens: Option<u64>,
    /// Tokens left in the window.
    pub remaining_tokens: Option<u64>,
    /// Time until the token window resets.
    pub reset_tokens: Option<Duration>,
}

impl RateLimitHeaders {
    /// Reads the headers from a response's header map.
    pub(crate) fn from_headers(h: &reqwest::header::HeaderMap) -> Self {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let num = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let openai = Self {
            limit_requests: num("x-ratelimit-limit-requests"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            reset_requests: text("x-ratelimit-reset-requests").and_then(hint::go_duration),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_tokens: text("x-ratelimit-reset-tokens").and_then(hint::go_duration),
        };
        if !openai.is_empty() {
            return openai;
        }
        let now = std::time::SystemTime::now();
        let reset = |name: &str| text(name).and_then(|v| hint::rfc3339(v, now));
        Self {
            limit_requests: num("anthropic-ratelimit-requests-limit"),
            remaining_requests: num("anthropic-ratelimit-requests-remaining"),
            reset_requests: reset("anthropic-ratelimit-requests-reset"),
            limit_tokens: num("anthropic-ratelimit-tokens-limit"),
            remaining_tokens: num("anthropic-ratelimit-tokens-remaining"),
            reset_tokens: reset("anthropic-ratelimit-tokens-reset"),
        }
    }

    /// Whether any rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A chat completion.
///
/// `Debug` shows the length of the content, never the text.
#[derive(Clone)]
pub struct ChatResponse {
    /// The provider's id of the completion.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// The text of the first choice.
    pub content: String,
    /// Why generation stopped (`stop`, `length`, `content_filter`, …);
    /// `length` is not an error.
    pub finish_reason: Option<String>,
    /// Token usage, when reported.
    pub usage: Option<Usage>,
    /// The rate-limit headers of the response.
    pub rate_limit: RateLimitHeaders,
    /// The provider's request id (`x-request-id` or `request-id`), for support
    /// tickets.
    pub request_id: Option<String>,
}

impl fmt::Debug for ChatResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatResponse")
            .field("id", &self.id)
            .field("model", &self.model)
            .field("content_len", &self.content.len())
            .field("finish_reason", &self.finish_reason)
            .field("usage", &self.usage)
            .field("rate_limit", &self.rate_limit)
            .field("request_id", &self.request_id)
            .finish()
    }
}

// ---- wire types (OpenAI chat completions) ----

#[derive(Deserialize)]
pub(crate) struct WireResponse {
    #[serde(default)]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) choices: Vec<WireChoice>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
}

#[derive(Deserialize)]
pub(crate) struct WireChoice {
    #[serde(default)]
    pub(crate) message: Option<WireMessage>,
    #[serde(default)]
    pub(crate) delta: Option<WireMessage>,
    #[serde(default)]
    pub(crate) finish_reason: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct WireMessage {
    #[serde(default)]
    pub(crate) content: Option<String>,
}

/// The error object of OpenAI (`{"error":{"message","type","param","code"}}`),
/// Anthropic (`{"type":"error","error":{"type","message"}}`) and Gemini
/// (`{"error":{"code","message","status"}}`) bodies.
#[derive(Deserialize)]
pub(crate) struct WireErrorBody {
    pub(crate) error: Option<WireError>,
}

#[derive(Deserialize)]
pub(crate) struct WireError {
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) status: Option<String>,
}

impl WireError {
    /// `(type, code, message)`: Gemini's `status` stands in for the type; a
    /// numeric `code` (Gemini's HTTP status) is not a provider code.
    pub(crate) fn parts(self) -> (Option<String>, Option<String>, Option<String>) {
        let code = match self.code {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        (self.kind.or(self.status), code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_encoded_once_and_shared_by_clones() {
        let req = ChatRequest::user("hi").max_tokens(5);
        let copy = req.clone();
        let a = req.body("m", false);
        // The clone sees the cached bytes of the original.
        assert!(copy.inner.encoded.get().is_some());
        let b = copy.body("m", false);
        assert_eq!(a, b);
        // Not even copied: the retry's body is the same allocation.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let other = copy.body("n", false);
        assert_ne!(a, other);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["max_tokens"], 5);
        assert_eq!(v["messages"][0]["role"], "user");
        assert!(v.get("stream").is_none());
        let s: serde_json::Value =
            serde_json::from_slice(&req.clone().model("x\"y").body("m", true)).unwrap();
        assert_eq!(s["model"], "x\"y");
        assert_eq!(s["stream"], true);
    }

    #[test]
    fn editing_a_shared_request_copies_it() {
        let req = ChatRequest::user("hi");
        let _ = req.body("m", false);
        let edited = req.clone().max_tokens(9);
        assert!(edited.inner.encoded.get().is_none());
        let v: serde_json::Value = serde_json::from_slice(&edited.body("m", false)).unwrap();
        assert_eq!(v["max_tokens"], 9);
        let v: serde_json::Value = serde_json::from_slice(&req.body("m", false)).unwrap();
        assert!(v.get("max_tokens").is_none());
    }

    #[test]
    fn rate_limit_headers_of_both_providers() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("500"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("12"),
        );
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("soon"),
        );
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.limit_requests, Some(500));
        assert_eq!(r.remaining_tokens, Some(12));
        assert_eq!(r.reset_tokens, Some(Duration::from_secs(360)));
        assert_eq!(r.reset_requests, None);
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_static("2000-01-01T00:00:00Z"),
        );
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.limit_requests, Some(50));
        assert_eq!(r.remaining_tokens, Some(0));
        // A reset in the past means now.
        assert_eq!(r.reset_tokens, Some(Duration::ZERO));
        assert!(RateLimitHeaders::from_headers(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn debug_never_shows_the_prompt() {
        let req = ChatRequest::user("top secret prompt");
        assert!(!format!("{req:?}").contains("secret"));
    }
}
