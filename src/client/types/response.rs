//! A chat completion as the provider answered it.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{nullable, Message, RateLimitHeaders, ToolCall};

/// Token usage as the provider reported it. A count sent as `null` or left
/// out is 0; the details (`cached_tokens`, `reasoning_tokens`) are `None`
/// when the provider does not report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WireUsage", into = "WireUsage")]
#[non_exhaustive]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens of the completion (reasoning tokens included).
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// Prompt tokens served from the provider's prompt cache
    /// (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u32>,
    /// Completion tokens spent on hidden reasoning
    /// (`completion_tokens_details.reasoning_tokens`).
    pub reasoning_tokens: Option<u32>,
}

impl Usage {
    /// Usage of `prompt` and `completion` tokens (their sum as the total).
    pub fn new(prompt: u32, completion: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: None,
            reasoning_tokens: None,
        }
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct WireUsage {
    #[serde(default, deserialize_with = "nullable")]
    prompt_tokens: u32,
    #[serde(default, deserialize_with = "nullable")]
    completion_tokens: u32,
    #[serde(default, deserialize_with = "nullable")]
    total_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Self {
        Self {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            total_tokens: w.total_tokens,
            cached_tokens: w.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: w.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            prompt_tokens_details: u.cached_tokens.map(|c| PromptDetails {
                cached_tokens: Some(c),
            }),
            completion_tokens_details: u.reasoning_tokens.map(|r| CompletionDetails {
                reasoning_tokens: Some(r),
            }),
        }
    }
}

/// One of a completion's answers (`n` of them when the request asked for
/// `n`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Choice {
    /// Its position among the choices.
    #[serde(default, deserialize_with = "nullable")]
    pub index: u32,
    /// The answer: text (may be `None`), tool calls, refusal.
    #[serde(default = "empty_assistant", deserialize_with = "nullable_message")]
    pub message: Message,
    /// Why generation stopped: `stop`, `length` (cut by `max_tokens`, not
    /// an error), `tool_calls`, `content_filter`, …; `None` when the
    /// provider did not say (or a stream broke off first).
    #[serde(default)]
    pub finish_reason: Option<String>,
}

fn empty_assistant() -> Message {
    Message::assistant_tool_calls(Vec::new())
}

fn nullable_message<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Message, D::Error> {
    Ok(Option::<Message>::deserialize(d)?.unwrap_or_else(empty_assistant))
}

impl Choice {
    /// A choice: its index, the message, and why generation stopped.
    pub fn new(index: u32, message: Message, finish_reason: Option<String>) -> Self {
        Self {
            index,
            message,
            finish_reason,
        }
    }
}

/// A chat completion: every choice, usage, ids, and the response's
/// rate-limit headers; the raw body is kept for what the typed view does
/// not cover ([`raw_json`](Self::raw_json)).
///
/// The same shape whether it came whole or was collected from a stream
/// ([`ChatStream::collect`](crate::client::ChatStream::collect)).
///
/// `Debug` shows lengths, never the text.
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatResponse {
    /// The provider's id of the completion (empty if it sent none).
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    /// The model that answered.
    #[serde(default, deserialize_with = "nullable")]
    pub model: String,
    /// The backend configuration that answered, when the provider says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// The answers, in index order.
    #[serde(default, deserialize_with = "nullable")]
    pub choices: Vec<Choice>,
    /// Token usage, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The rate-limit headers of the response.
    #[serde(skip)]
    pub rate_limit: RateLimitHeaders,
    /// The provider's request id (`x-request-id` or `request-id`), for
    /// support tickets.
    #[serde(skip)]
    pub request_id: Option<String>,
    #[serde(skip)]
    raw: Bytes,
}

impl ChatResponse {
    /// A response with these choices (no usage, headers or raw body), for
    /// tests and adapters that build one by hand.
    pub fn new(id: impl Into<String>, model: impl Into<String>, choices: Vec<Choice>) -> Self {
        Self {
            id: id.into(),
            model: model.into(),
            system_fingerprint: None,
            choices,
            usage: None,
            rate_limit: RateLimitHeaders::default(),
            request_id: None,
            raw: Bytes::new(),
        }
    }

    pub(crate) fn with_raw(mut self, raw: Bytes) -> Self {
        self.raw = raw;
        self
    }

    /// The first choice's message, if there is a choice.
    pub fn message(&self) -> Option<&Message> {
        self.choices.first().map(|c| &c.message)
    }

    /// The first choice's text (empty when it has none, e.g. only tool
    /// calls). A provider that answers with content parts instead of a
    /// string: [`Message::text`] joins their text.
    pub fn content(&self) -> &str {
        match self.message().and_then(|m| m.content.as_ref()) {
            Some(super::Content::Text(s)) => s,
            _ => "",
        }
    }

    /// The first choice's tool calls.
    pub fn tool_calls(&self) -> &[ToolCall] {
        self.message().map_or(&[], |m| &m.tool_calls)
    }

    /// The first choice's refusal, when the model declined.
    pub fn refusal(&self) -> Option<&str> {
        self.message().and_then(|m| m.refusal.as_deref())
    }

    /// The first choice's finish reason.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }

    /// The body exactly as received (empty for a response collected from a
    /// stream). May quote the conversation: do not log it.
    pub fn raw_body(&self) -> &[u8] {
        &self.raw
    }

    /// The body as JSON, for fields the typed view does not cover
    /// (`logprobs`, vendor extensions). `None` for a collected stream.
    pub fn raw_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.raw).ok()
    }
}

impl fmt::Debug for ChatResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatResponse")
            .field("id", &self.id)
            .field("model", &self.model)
            .field("choices", &self.choices)
            .field("usage", &self.usage)
            .field("rate_limit", &self.rate_limit)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ChatResponse {
    /// Compares what the provider said (ids, choices, usage), not the
    /// headers or the raw bytes.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.model == other.model
            && self.system_fingerprint == other.system_fingerprint
            && self.choices == other.choices
            && self.usage == other.usage
    }
}
