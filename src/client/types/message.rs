//! Chat messages: text or parts (text, images), tool calls and tool answers.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::nullable;

/// Who wrote a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the model.
    System,
    /// Instructions for reasoning models (OpenAI's newer name for system).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's answer.
    Tool,
}

/// What a message says: plain text, or parts (text and images).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts, in order.
    Parts(Vec<ContentPart>),
    /// Any other shape a provider answers with (parts of types the crate
    /// does not model, such as a reasoning model's `thinking` parts), kept
    /// as it came rather than rejected.
    Other(serde_json::Value),
}

impl Content {
    /// The text, for plain text; the text parts joined, for parts.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(s) => s.as_str().into(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect::<String>()
                .into(),
            Content::Other(_) => "".into(),
        }
    }

    /// Bytes of text (and of image URLs), for size estimates.
    pub(crate) fn len(&self) -> usize {
        match self {
            Content::Text(s) => s.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => text.len(),
                    // A small image costs about 85 tokens at low detail.
                    ContentPart::ImageUrl { .. } => 340,
                })
                .sum(),
            Content::Other(v) => v.to_string().len(),
        }
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_owned())
    }
}

/// One part of a multi-part message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentPart {
    /// A piece of text.
    Text {
        /// The text.
        text: String,
    },
    /// An image, by URL or as a `data:` URL with base64 bytes.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

impl ContentPart {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart::Text { text: text.into() }
    }

    /// An image at `url` (`https://…` or a `data:` URL).
    pub fn image_url(url: impl Into<String>) -> Self {
        ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: url.into(),
                detail: None,
            },
        }
    }

    /// An image given as base64 bytes of type `mime` (`image/png`,
    /// `image/jpeg`, …), sent as a `data:` URL.
    pub fn image_base64(mime: &str, base64: &str) -> Self {
        Self::image_url(format!("data:{mime};base64,{base64}"))
    }

    /// Sets an image part's `detail` (`low`, `high` or `auto`); no effect on
    /// a text part.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        if let ContentPart::ImageUrl { image_url } = &mut self {
            image_url.detail = Some(detail.into());
        }
        self
    }
}

impl fmt::Debug for ContentPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentPart::Text { text } => write!(f, "Text {{ len: {} }}", text.len()),
            ContentPart::ImageUrl { image_url } => image_url.fmt(f),
        }
    }
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Text(s) => write!(f, "Text {{ len: {} }}", s.len()),
            Content::Parts(p) => f.debug_tuple("Parts").field(p).finish(),
            Content::Other(_) => f.write_str("Other"),
        }
    }
}

impl fmt::Debug for ImageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageUrl")
            .field("url_len", &self.url.len())
            .field("detail", &self.detail)
            .finish()
    }
}

/// The image of a [`ContentPart::ImageUrl`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImageUrl {
    /// `https://…` or `data:image/png;base64,…`.
    pub url: String,
    /// `low`, `high` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A call of a function tool the model asked for.
///
/// `Debug` shows the id and function name, and only the length of the
/// arguments (they can quote the conversation).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolCall {
    /// The call's id, echoed by the tool message that answers it.
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    /// Always `function` today.
    #[serde(
        rename = "type",
        default = "function_kind",
        deserialize_with = "nullable_kind"
    )]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_owned()
}

fn nullable_kind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(function_kind))
}

impl ToolCall {
    /// A call of `name` with `arguments` (a JSON object as a string).
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            kind: function_kind(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }
}

impl fmt::Debug for ToolCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolCall")
            .field("id", &self.id)
            .field("name", &self.function.name)
            .field("arguments_len", &self.function.arguments.len())
            .finish()
    }
}

/// The function of a [`ToolCall`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionCall {
    /// The function's name.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// Its arguments, a JSON object as a string exactly as the model wrote
    /// it (it may not be valid JSON; parse and check before use).
    #[serde(default, deserialize_with = "nullable")]
    pub arguments: String,
}

/// One chat message: a request's turn, or the model's answer in a
/// [`Choice`](super::Choice).
///
/// Build one with [`Message::user`], [`Message::system`],
/// [`Message::assistant`], [`Message::assistant_tool_calls`],
/// [`Message::tool`] or [`Message::user_parts`]; an answer's message can be
/// pushed back into the next request as it is.
///
/// `Debug` shows the role and lengths, never the text: a request can be
/// logged without logging the prompt.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written; `None` for an assistant turn that only calls tools
    /// (sent as no `content` field, read from `null` or absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// An optional name of the participant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tools an assistant turn calls.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The model's refusal, when it declined to answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

impl Message {
    /// A text message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self::with_content(role, Some(Content::Text(content.into())))
    }

    fn with_content(role: Role, content: Option<Content>) -> Self {
        Self {
            role,
            content,
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            refusal: None,
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

    /// A user message of text and image parts.
    pub fn user_parts(parts: Vec<ContentPart>) -> Self {
        Self::with_content(Role::User, Some(Content::Parts(parts)))
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant turn that calls tools (no text).
    pub fn assistant_tool_calls(calls: Vec<ToolCall>) -> Self {
        let mut m = Self::with_content(Role::Assistant, None);
        m.tool_calls = calls;
        m
    }

    /// A tool's answer to the call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        let mut m = Self::new(Role::Tool, content);
        m.tool_call_id = Some(tool_call_id.into());
        m
    }

    /// Sets the participant's `name`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The text of the message (empty when there is none).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match &self.content {
            Some(c) => c.text(),
            None => "".into(),
        }
    }

    /// Bytes the message carries (text, tool-call arguments), for estimates.
    pub(crate) fn size(&self) -> usize {
        self.content.as_ref().map_or(0, Content::len)
            + self
                .tool_calls
                .iter()
                .map(|c| c.function.arguments.len() + c.function.name.len())
                .sum::<usize>()
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Message");
        d.field("role", &self.role);
        d.field("content", &self.content);
        if !self.tool_calls.is_empty() {
            d.field("tool_calls", &self.tool_calls);
        }
        if let Some(id) = &self.tool_call_id {
            d.field("tool_call_id", id);
        }
        if let Some(r) = &self.refusal {
            d.field("refusal_len", &r.len());
        }
        d.finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_any_content_shape_are_read() {
        let m: Message = serde_json::from_str(
            r#"{"role":"assistant","content":[{"type":"thinking","thinking":[]},
                {"type":"text","text":"hi"}],"tool_calls":null,"refusal":null}"#,
        )
        .unwrap();
        assert!(matches!(m.content, Some(Content::Other(_))));
        let m: Message = serde_json::from_str(
            r#"{"role":"assistant","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.text(), "ab");
        let m: Message =
            serde_json::from_str(r#"{"role":"tool","content":"x","tool_call_id":"c"}"#).unwrap();
        assert_eq!(m.tool_call_id.as_deref(), Some("c"));
    }
}
