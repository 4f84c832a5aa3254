//! The response of the Messages API.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::types::{ContentBlock, Role};
use crate::client::RateLimitHeaders;

/// A message the model wrote, streamed and collected or not.
///
/// `Debug` shows the blocks' kinds and lengths, never their text.
#[derive(Clone, PartialEq)]
pub struct MessagesResponse {
    /// The provider's id of the message (`msg_…`).
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// Always [`Role::Assistant`].
    pub role: Role,
    /// What the model wrote: text, tool calls, thinking, and blocks this
    /// crate does not model.
    pub content: Vec<ContentBlock>,
    /// Why generation stopped: `end_turn`, `max_tokens`, `stop_sequence`,
    /// `tool_use`, `pause_turn`, `refusal` (`None` in the partial output of
    /// a stream that broke off). `max_tokens` is not an error.
    pub stop_reason: Option<String>,
    /// The stop sequence that ended generation, for `stop_sequence`.
    pub stop_sequence: Option<String>,
    /// Token usage.
    pub usage: Usage,
    /// The rate-limit headers of the response
    /// (`anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`).
    pub rate_limit: RateLimitHeaders,
    /// The provider's `request-id` header, for support tickets.
    pub request_id: Option<String>,
}

impl MessagesResponse {
    /// The text blocks, concatenated.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(ContentBlock::as_text)
            .collect()
    }

    /// The tool calls, in order: `(id, name, input)`.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.content.iter().filter_map(|b| match b {
            ContentBlock::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }

    /// Whether the model stopped to call tools (`stop_reason: tool_use`).
    pub fn wants_tools(&self) -> bool {
        self.stop_reason.as_deref() == Some("tool_use")
    }

    pub(crate) fn empty() -> Self {
        Self {
            id: String::new(),
            model: String::new(),
            role: Role::Assistant,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: Usage::default(),
            rate_limit: RateLimitHeaders::default(),
            request_id: None,
        }
    }
}

impl fmt::Debug for MessagesResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessagesResponse")
            .field("id", &self.id)
            .field("model", &self.model)
            .field("content", &self.content)
            .field("stop_reason", &self.stop_reason)
            .field("usage", &self.usage)
            .field("rate_limit", &self.rate_limit)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// The body of a non-streamed response, and the `message` of a stream's
/// `message_start`.
#[derive(Deserialize)]
pub(crate) struct WireMessage {
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) content: Option<Vec<ContentBlock>>,
    #[serde(default)]
    pub(crate) stop_reason: Option<String>,
    #[serde(default)]
    pub(crate) stop_sequence: Option<String>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
}

impl WireMessage {
    /// Whether this is a message at all (`"type":"message"`, or at least a
    /// `content` array), not some other JSON object.
    pub(crate) fn is_message(&self) -> bool {
        self.kind.as_deref() == Some("message") || self.content.is_some()
    }

    pub(crate) fn into_response(
        self,
        rate_limit: RateLimitHeaders,
        request_id: Option<String>,
    ) -> MessagesResponse {
        MessagesResponse {
            id: self.id,
            model: self.model,
            role: Role::Assistant,
            content: self.content.unwrap_or_default(),
            stop_reason: self.stop_reason,
            stop_sequence: self.stop_sequence,
            usage: self.usage.unwrap_or_default(),
            rate_limit,
            request_id,
        }
    }
}

/// Token usage as the provider reported it. Counts the provider sends as
/// `null` or leaves out are zero (cache counts: `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens not read from or written to the cache.
    #[serde(default, deserialize_with = "null_zero")]
    pub input_tokens: u32,
    /// Output tokens.
    #[serde(default, deserialize_with = "null_zero")]
    pub output_tokens: u32,
    /// Input tokens written to the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u32>,
    /// Input tokens read from the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u32>,
}

impl Usage {
    /// Every input token: uncached, cache writes and cache reads.
    pub fn total_input_tokens(&self) -> u64 {
        u64::from(self.input_tokens)
            + u64::from(self.cache_creation_input_tokens.unwrap_or(0))
            + u64::from(self.cache_read_input_tokens.unwrap_or(0))
    }

    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.total_input_tokens() + u64::from(self.output_tokens)
    }

    /// Takes every count `later` reports (a stream's `message_delta` usage
    /// is cumulative and may repeat or refine `message_start`'s).
    pub(crate) fn merge(&mut self, later: &WireUsage) {
        if let Some(n) = later.input_tokens {
            self.input_tokens = n;
        }
        if let Some(n) = later.output_tokens {
            self.output_tokens = n;
        }
        if later.cache_creation_input_tokens.is_some() {
            self.cache_creation_input_tokens = later.cache_creation_input_tokens;
        }
        if later.cache_read_input_tokens.is_some() {
            self.cache_read_input_tokens = later.cache_read_input_tokens;
        }
    }
}

fn null_zero<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.unwrap_or(0))
}

/// Usage with every count optional (a stream's `message_delta`).
#[derive(Clone, Copy, Default, Deserialize)]
pub(crate) struct WireUsage {
    #[serde(default)]
    pub(crate) input_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) output_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) cache_read_input_tokens: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_reads_nulls_as_zero_and_sums_cache_counts() {
        let u: Usage = serde_json::from_value(json!({
            "input_tokens": 10, "output_tokens": null, "cache_read_input_tokens": 5
        }))
        .unwrap();
        assert_eq!(u.output_tokens, 0);
        assert_eq!(u.total_input_tokens(), 15);
        assert_eq!(u.total_tokens(), 15);
    }
}
