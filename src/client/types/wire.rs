//! The provider's error object inside a 2xx body, for the client's own
//! decoding (the public parser is `HttpError::from_response`).

use serde::Deserialize;

/// The error object of OpenAI (`{"error":{"message","type","param","code"}}`),
/// Anthropic (`{"type":"error","error":{"type","message"}}`) and Gemini
/// (`{"error":{"code","message","status"}}`) bodies.
#[derive(Deserialize)]
pub(crate) struct WireErrorBody {
    #[serde(default)]
    pub(crate) error: Option<WireError>,
}

#[derive(Deserialize)]
pub(crate) struct WireError {
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) status: Option<String>,
}
