//! Content blocks, messages and tools of the Messages API.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Who wrote a [`Message`]. The Messages API has two roles; the system
/// prompt is a field of the request
/// ([`MessagesRequest::with_system`](super::MessagesRequest::with_system)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The end user, and tool results.
    User,
    /// The model.
    Assistant,
}

/// `cache_control` of a block or tool: marks the end of a prompt prefix the
/// provider may cache (`{"type":"ephemeral"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheControl {
    /// The cache type; `ephemeral` is the one the API documents.
    #[serde(rename = "type")]
    pub kind: String,
}

impl CacheControl {
    /// `{"type":"ephemeral"}`.
    pub fn ephemeral() -> Self {
        Self {
            kind: "ephemeral".to_owned(),
        }
    }
}

/// Where an image comes from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ImageSource {
    /// Inline, base64-encoded bytes.
    Base64 {
        /// `image/jpeg`, `image/png`, `image/gif` or `image/webp`.
        media_type: String,
        /// The base64 text.
        data: String,
    },
    /// An image the provider downloads.
    Url {
        /// The image's URL.
        url: String,
    },
}

impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Base64 { media_type, data } => f
                .debug_struct("Base64")
                .field("media_type", media_type)
                .field("data_len", &data.len())
                .finish(),
            ImageSource::Url { .. } => f.debug_struct("Url").finish_non_exhaustive(),
        }
    }
}

/// One block of a message's content, of a tool result, or of a response.
///
/// `Debug` shows the kind and lengths, never the text, tool input or image
/// data, so requests and responses can be logged without their content.
#[derive(Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentBlock {
    /// Text.
    Text {
        /// The text.
        text: String,
        /// Where a cacheable prompt prefix ends.
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
    /// An image (requests only).
    Image {
        /// The image's bytes or URL.
        source: ImageSource,
    },
    /// The model calls a tool (in a response, and echoed back in the
    /// assistant turn of the next request).
    ToolUse {
        /// The call's id, which the [`ToolResult`](Self::ToolResult) names.
        id: String,
        /// The tool's name.
        name: String,
        /// The arguments, a JSON object. In the partial output of a
        /// stream that broke off inside the call, the JSON text that
        /// arrived, as a string.
        input: Value,
    },
    /// A tool's answer to a [`ToolUse`](Self::ToolUse) (user turn).
    ToolResult {
        /// The id of the call answered.
        tool_use_id: String,
        /// What the tool returned: text and image blocks.
        content: Vec<ContentBlock>,
        /// Whether the tool failed.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    /// The model's extended thinking (responses; echoed back unchanged).
    Thinking {
        /// The thinking text.
        thinking: String,
        /// The provider's signature of it.
        signature: String,
    },
    /// A block type this crate does not model, kept as the provider sent it
    /// (and sent back as is).
    #[serde(untagged)]
    Other(Value),
}

impl ContentBlock {
    /// A text block.
    pub fn text(text: impl Into<String>) -> Self {
        ContentBlock::Text {
            text: text.into(),
            cache_control: None,
        }
    }

    /// A base64 image block.
    pub fn image_base64(media_type: impl Into<String>, data: impl Into<String>) -> Self {
        ContentBlock::Image {
            source: ImageSource::Base64 {
                media_type: media_type.into(),
                data: data.into(),
            },
        }
    }

    /// An image block the provider downloads from `url`.
    pub fn image_url(url: impl Into<String>) -> Self {
        ContentBlock::Image {
            source: ImageSource::Url { url: url.into() },
        }
    }

    /// A tool call (to echo the model's call back in an assistant turn).
    pub fn tool_use(id: impl Into<String>, name: impl Into<String>, input: Value) -> Self {
        ContentBlock::ToolUse {
            id: id.into(),
            name: name.into(),
            input,
        }
    }

    /// A tool's text answer to the call `tool_use_id`.
    pub fn tool_result(tool_use_id: impl Into<String>, content: impl Into<String>) -> Self {
        ContentBlock::ToolResult {
            tool_use_id: tool_use_id.into(),
            content: vec![ContentBlock::text(content)],
            is_error: false,
        }
    }

    /// A tool's failure answer to the call `tool_use_id`.
    pub fn tool_error(tool_use_id: impl Into<String>, content: impl Into<String>) -> Self {
        ContentBlock::ToolResult {
            tool_use_id: tool_use_id.into(),
            content: vec![ContentBlock::text(content)],
            is_error: true,
        }
    }

    /// The same block marked as the end of a cacheable prefix (text blocks
    /// only; others are returned unchanged).
    pub fn cached(self) -> Self {
        match self {
            ContentBlock::Text { text, .. } => ContentBlock::Text {
                text,
                cache_control: Some(CacheControl::ephemeral()),
            },
            other => other,
        }
    }

    /// The text of a text block.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            ContentBlock::Text { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The block's `type` as the API names it.
    pub fn kind(&self) -> &str {
        match self {
            ContentBlock::Text { .. } => "text",
            ContentBlock::Image { .. } => "image",
            ContentBlock::ToolUse { .. } => "tool_use",
            ContentBlock::ToolResult { .. } => "tool_result",
            ContentBlock::Thinking { .. } => "thinking",
            ContentBlock::Other(v) => v.get("type").and_then(Value::as_str).unwrap_or("unknown"),
        }
    }

    /// Bytes of text, input or data the block carries (for rough token
    /// estimates).
    pub(crate) fn weight(&self) -> usize {
        match self {
            ContentBlock::Text { text, .. } => text.len(),
            ContentBlock::Image { source } => match source {
                ImageSource::Base64 { data, .. } => data.len(),
                ImageSource::Url { url } => url.len(),
            },
            ContentBlock::ToolUse { name, input, .. } => name.len() + json_len(input),
            ContentBlock::ToolResult { content, .. } => content.iter().map(Self::weight).sum(),
            ContentBlock::Thinking { thinking, .. } => thinking.len(),
            ContentBlock::Other(v) => json_len(v),
        }
    }
}

fn json_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Null => 0,
        other => other.to_string().len(),
    }
}

impl fmt::Debug for ContentBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentBlock::Text {
                text,
                cache_control,
            } => f
                .debug_struct("Text")
                .field("text_len", &text.len())
                .field("cache_control", cache_control)
                .finish(),
            ContentBlock::Image { source } => {
                f.debug_struct("Image").field("source", source).finish()
            }
            ContentBlock::ToolUse { name, input, .. } => f
                .debug_struct("ToolUse")
                .field("name", name)
                .field("input_len", &json_len(input))
                .finish_non_exhaustive(),
            ContentBlock::ToolResult {
                content, is_error, ..
            } => f
                .debug_struct("ToolResult")
                .field("content", content)
                .field("is_error", is_error)
                .finish_non_exhaustive(),
            ContentBlock::Thinking { thinking, .. } => f
                .debug_struct("Thinking")
                .field("thinking_len", &thinking.len())
                .finish_non_exhaustive(),
            ContentBlock::Other(_) => f.debug_tuple("Other").field(&self.kind()).finish(),
        }
    }
}

/// The known block shapes, for deserializing; anything else becomes
/// [`ContentBlock::Other`].
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Known {
    Text {
        text: String,
        #[serde(default)]
        cache_control: Option<CacheControl>,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: ToolResultContent,
        #[serde(default)]
        is_error: bool,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: String,
    },
}

/// A tool result's content: the API accepts a string or blocks.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum ToolResultContent {
    Text(String),
    Blocks(Vec<ContentBlock>),
    #[default]
    None,
}

impl<'de> Deserialize<'de> for ContentBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        if !value.is_object() {
            return Err(D::Error::custom("a content block is a JSON object"));
        }
        let known = match value.get("type").and_then(Value::as_str) {
            Some("text" | "image" | "tool_use" | "tool_result" | "thinking") => {
                Known::deserialize(&value).ok()
            }
            _ => None,
        };
        Ok(match known {
            Some(Known::Text {
                text,
                cache_control,
            }) => ContentBlock::Text {
                text,
                cache_control,
            },
            Some(Known::Image { source }) => ContentBlock::Image { source },
            Some(Known::ToolUse { id, name, input }) => ContentBlock::ToolUse { id, name, input },
            Some(Known::ToolResult {
                tool_use_id,
                content,
                is_error,
            }) => ContentBlock::ToolResult {
                tool_use_id,
                content: match content {
                    ToolResultContent::Text(t) => vec![ContentBlock::text(t)],
                    ToolResultContent::Blocks(b) => b,
                    ToolResultContent::None => Vec::new(),
                },
                is_error,
            },
            Some(Known::Thinking {
                thinking,
                signature,
            }) => ContentBlock::Thinking {
                thinking,
                signature,
            },
            None => ContentBlock::Other(value),
        })
    }
}

/// One turn of the conversation.
///
/// `Debug` shows the role and the blocks' kinds and lengths, never the text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written: text, images, tool calls and tool results. (Read
    /// from JSON, a plain string is one text block, as the API accepts.)
    #[serde(deserialize_with = "text_or_blocks")]
    pub content: Vec<ContentBlock>,
}

fn text_or_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ContentBlock>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Blocks(Vec<ContentBlock>),
    }
    Ok(match Either::deserialize(d)? {
        Either::Text(t) => vec![ContentBlock::text(t)],
        Either::Blocks(b) => b,
    })
}

impl Message {
    /// A turn of `role` made of `content`.
    pub fn new(role: Role, content: Vec<ContentBlock>) -> Self {
        Self { role, content }
    }

    /// A user turn with one text block.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new(Role::User, vec![ContentBlock::text(text)])
    }

    /// An assistant turn with one text block.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, vec![ContentBlock::text(text)])
    }

    /// A user turn answering tool calls: pass
    /// [`ContentBlock::tool_result`]s.
    pub fn tool_results(results: Vec<ContentBlock>) -> Self {
        Self::new(Role::User, results)
    }
}

/// A tool the model may call.
///
/// `Debug` shows the name only.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The tool's name (`^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its input (an object schema).
    pub input_schema: Value,
    /// Where a cacheable prefix ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<CacheControl>,
}

impl Tool {
    /// A tool `name` described by `description`, taking input of
    /// `input_schema`.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        input_schema: Value,
    ) -> Self {
        Self {
            name: name.into(),
            description: Some(description.into()),
            input_schema,
            cache_control: None,
        }
    }
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How the model may use the tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToolChoice {
    /// The model decides (the API's default).
    Auto {
        /// Allow at most one tool call.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    /// The model must call some tool.
    Any {
        /// Allow at most one tool call.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    /// The model must call this tool.
    Tool {
        /// The tool's name.
        name: String,
        /// Allow at most one tool call.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    /// The model must not call a tool.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blocks_round_trip_and_unknown_ones_are_kept() {
        let wire = json!([
            {"type": "text", "text": "hi", "citations": null},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
        ]);
        let blocks: Vec<ContentBlock> = serde_json::from_value(wire).unwrap();
        assert_eq!(blocks[0], ContentBlock::text("hi"));
        assert_eq!(
            blocks[1],
            ContentBlock::tool_use("toolu_1", "get_weather", json!({"city": "Paris"}))
        );
        assert_eq!(blocks[2], ContentBlock::tool_result("toolu_1", "18C"));
        assert_eq!(blocks[3], ContentBlock::image_base64("image/png", "AAAA"));
        assert_eq!(blocks[4].kind(), "thinking");
        assert_eq!(blocks[5].kind(), "server_tool_use");
        let back = serde_json::to_value(&blocks).unwrap();
        assert_eq!(back[5]["type"], "server_tool_use");
        assert_eq!(back[2]["content"][0]["text"], "18C");
        assert!(back[2].get("is_error").is_none());
        assert!(back[0].get("cache_control").is_none());
        let cached = serde_json::to_value(ContentBlock::text("x").cached()).unwrap();
        assert_eq!(cached["cache_control"]["type"], "ephemeral");
    }

    #[test]
    fn a_message_reads_a_plain_string_as_one_text_block() {
        let m: Message = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(m, Message::user("hi"));
        let m: Message = serde_json::from_value(
            json!({"role": "assistant", "content": [{"type": "text", "text": "yo"}]}),
        )
        .unwrap();
        assert_eq!(m, Message::assistant("yo"));
    }

    #[test]
    fn debug_never_shows_content() {
        let m = Message::new(
            Role::User,
            vec![
                ContentBlock::text("secret prompt"),
                ContentBlock::tool_use("t", "f", json!({"q": "secret arg"})),
                ContentBlock::tool_result("t", "secret result"),
                ContentBlock::image_base64("image/png", "secretdata"),
                ContentBlock::image_url("https://secret.example"),
            ],
        );
        let text = format!("{m:?}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn tool_choice_wire_shape() {
        assert_eq!(
            serde_json::to_value(ToolChoice::Tool {
                name: "f".into(),
                disable_parallel_tool_use: false
            })
            .unwrap(),
            json!({"type": "tool", "name": "f"})
        );
    }
}
