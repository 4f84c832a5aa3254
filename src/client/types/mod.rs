//! The crate-owned request and response types of the chat client.
//!
//! Everything a provider may send as `null` is read as absent (an empty
//! string, zero, an empty list or `None`), never rejected: OpenAI-compatible
//! servers differ in which fields they fill.

mod chunk;
mod headers;
mod message;
mod request;
mod response;
mod wire;

use serde::{Deserialize, Deserializer};

pub(crate) use self::chunk::decode_chunk;
pub use self::chunk::{ChatChunk, ChoiceDelta, ToolCallDelta};
pub use self::headers::RateLimitHeaders;
pub use self::message::{Content, ContentPart, FunctionCall, ImageUrl, Message, Role, ToolCall};
pub(crate) use self::request::EncodeOptions;
pub use self::request::{ChatRequest, ResponseFormat, Tool, ToolChoice};
pub use self::response::{ChatResponse, Choice, Usage};
pub(crate) use self::wire::{WireError, WireErrorBody};

/// Reads `null` as the type's default (serde's `default` covers only an
/// absent field).
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
