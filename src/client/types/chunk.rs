//! One event of a streamed completion, and its decoding.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use super::{nullable, Role, Usage};
use crate::client::error::ClientError;

/// One piece of a streamed completion: what each choice adds, and the usage
/// on the final chunk. The completion's id and model are on the stream
/// ([`ChatStream::snapshot`](crate::client::ChatStream::snapshot)) and on
/// the collected response.
///
/// `Debug` shows lengths, never the text.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ChatChunk {
    /// What each choice adds (usually one; none on a usage-only chunk).
    pub choices: Vec<ChoiceDelta>,
    /// Token usage, on the final chunk when the server reports it.
    pub usage: Option<Usage>,
}

impl ChatChunk {
    /// The text the first choice adds (empty if none).
    pub fn text(&self) -> &str {
        self.choices
            .first()
            .and_then(|c| c.content.as_deref())
            .unwrap_or("")
    }

    /// The first choice's finish reason, on its last chunk.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }

    /// Whether it adds nothing a caller would see (a role-only opening
    /// chunk, a keep-alive).
    pub(crate) fn is_empty(&self) -> bool {
        self.usage.is_none()
            && self.choices.iter().all(|c| {
                c.content.as_deref().is_none_or(str::is_empty)
                    && c.refusal.as_deref().is_none_or(str::is_empty)
                    && c.tool_calls.is_empty()
                    && c.finish_reason.is_none()
            })
    }
}

impl fmt::Debug for ChatChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatChunk")
            .field("choices", &self.choices)
            .field("usage", &self.usage)
            .finish()
    }
}

/// What one choice adds in a chunk.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "WireChoice")]
#[non_exhaustive]
pub struct ChoiceDelta {
    /// Which choice (for `n > 1`).
    pub index: u32,
    /// The role, on the choice's first chunk.
    pub role: Option<Role>,
    /// Text to append.
    pub content: Option<String>,
    /// Refusal text to append.
    pub refusal: Option<String>,
    /// Pieces of tool calls.
    pub tool_calls: Vec<ToolCallDelta>,
    /// Why generation stopped, on the choice's last chunk.
    pub finish_reason: Option<String>,
}

impl fmt::Debug for ChoiceDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChoiceDelta")
            .field("index", &self.index)
            .field("content_len", &self.content.as_ref().map(String::len))
            .field("tool_calls", &self.tool_calls)
            .field("finish_reason", &self.finish_reason)
            .finish_non_exhaustive()
    }
}

/// A piece of a tool call: the first piece of a call names its id and
/// function, the following ones carry fragments of the arguments.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ToolCallDelta {
    /// Which call of the choice (0 when the provider leaves it out).
    pub index: u32,
    /// The call's id, on its first piece.
    pub id: Option<String>,
    /// The function's name, on its first piece.
    pub name: Option<String>,
    /// A fragment of the arguments to append.
    pub arguments: Option<String>,
}

impl ToolCallDelta {
    /// A piece of call `index`.
    pub fn new(
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: Option<String>,
    ) -> Self {
        Self {
            index,
            id,
            name,
            arguments,
        }
    }
}

impl fmt::Debug for ToolCallDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolCallDelta")
            .field("index", &self.index)
            .field("id", &self.id)
            .field("name", &self.name)
            .field("arguments_len", &self.arguments.as_ref().map(String::len))
            .finish()
    }
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default, deserialize_with = "nullable")]
    index: u32,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireDelta {
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    tool_calls: Vec<WireToolCallDelta>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    #[serde(default, deserialize_with = "nullable")]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl From<WireChoice> for ChoiceDelta {
    fn from(w: WireChoice) -> Self {
        let d = w.delta.unwrap_or_default();
        Self {
            index: w.index,
            role: d.role,
            content: d.content,
            refusal: d.refusal,
            tool_calls: d
                .tool_calls
                .into_iter()
                .map(|t| {
                    let (name, arguments) = match t.function {
                        Some(f) => (f.name, f.arguments),
                        None => (None, None),
                    };
                    ToolCallDelta {
                        index: t.index,
                        id: t.id,
                        name,
                        arguments,
                    }
                })
                .collect(),
            finish_reason: w.finish_reason,
        }
    }
}

/// A chunk's JSON: the fields of [`ChatChunk`] plus the completion's ids
/// and an `error` (null in a normal chunk).
#[derive(Deserialize)]
pub(crate) struct WireChunk<'a> {
    #[serde(default, borrow)]
    pub(crate) id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(crate) model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(crate) system_fingerprint: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "nullable")]
    choices: Vec<ChoiceDelta>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// Decodes one `data:` payload of a chat completion stream: `Ok(None)` for
/// a chunk with nothing to hand out (a role-only opening chunk, a
/// keep-alive); an error event for a chunk whose `error` is set (`null` is
/// not an error); a decode error for anything else that is not a chunk.
pub(crate) fn decode_chunk(data: &[u8]) -> Result<(WireChunk<'_>, ChatChunk), ClientError> {
    let wire: WireChunk<'_> = match serde_json::from_slice(data) {
        Ok(w) => w,
        Err(e) => {
            // An error object with an unexpected shape is still an error.
            if serde_json::from_slice::<serde_json::Value>(data)
                .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
            {
                return Err(ClientError::stream_event(data));
            }
            return Err(ClientError::decode_stream(data, e));
        }
    };
    if wire.error.is_some() {
        return Err(ClientError::stream_event(data));
    }
    let mut wire = wire;
    let chunk = ChatChunk {
        choices: std::mem::take(&mut wire.choices),
        usage: wire.usage.take(),
    };
    Ok((wire, chunk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_are_read_as_absent() {
        let data = br#"{"id":null,"model":null,"system_fingerprint":null,"error":null,
            "choices":[{"index":0,"delta":{"role":"assistant","content":"hi","refusal":null,
            "tool_calls":null},"finish_reason":null,"logprobs":null}],
            "usage":null}"#;
        let (w, c) = decode_chunk(data).unwrap();
        assert!(w.id.is_none());
        assert_eq!(c.text(), "hi");
        let data = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":null,
            "completion_tokens":3,"total_tokens":null,"prompt_tokens_details":null}}"#;
        let (_, c) = decode_chunk(data).unwrap();
        let u = c.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (0, 3));
    }

    #[test]
    fn error_set_is_an_error_and_schema_mismatch_a_decode_error() {
        let e = decode_chunk(br#"{"error":{"type":"server_error","message":"x"}}"#)
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::client::ClientErrorKind::StreamError);
        let e = decode_chunk(br#"{"choices":"nope"}"#).err().unwrap();
        assert_eq!(e.kind(), crate::client::ClientErrorKind::Decode);
        let e = decode_chunk(b"{not json").err().unwrap();
        assert_eq!(e.kind(), crate::client::ClientErrorKind::Decode);
    }

    #[test]
    fn role_only_chunk_hands_out_nothing() {
        let data = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert!(decode_chunk(data).unwrap().1.is_empty());
    }
}
