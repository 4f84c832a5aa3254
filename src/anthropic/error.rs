//! The Anthropic client's error: an [`HttpError`] plus what a caller needs
//! to act on.

use std::fmt;

use reqwest::header::HeaderMap;

use super::MessagesResponse;
use crate::classify::{HttpError, HttpView, Transport};

/// How many bytes of an error body are kept.
pub const BODY_EXCERPT_LIMIT: usize = 2048;

/// What kind of failure an [`AnthropicError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnthropicErrorKind {
    /// The server answered with an error: a non-2xx status, or a 2xx body
    /// that is an error object (given the status documented for its type).
    Status,
    /// The call failed below HTTP (connect, timeout, reset) before a
    /// complete response.
    Transport,
    /// A 2xx response whose body was not a message (or a stream event that
    /// was not valid JSON).
    Decode,
    /// A 2xx body, a whole stream or one event of a stream larger than the
    /// client's limit. Permanent (the same request would get the same
    /// answer): its [`source`](std::error::Error::source) is the verdict
    /// [`Error::Permanent`](crate::Error::Permanent) with
    /// [`Reason::ServerError`](crate::classify::Reason::ServerError).
    TooLarge,
    /// A stream carried an `error` event.
    StreamError,
    /// A stream broke off: the connection dropped, the idle gap was
    /// exceeded, or it ended without `message_stop`.
    StreamInterrupted,
}

/// A failed Messages API call.
///
/// Its [`source`](std::error::Error::source) is the [`HttpError`] (status,
/// the provider's `error.type`, the headers that matter: `retry-after`,
/// `anthropic-ratelimit-*`, `request-id`, `x-should-retry`; or the
/// transport failure), so the crate's
/// [`LlmClassifier`](crate::classify::LlmClassifier) classifies it with no
/// extra setup, through any stack of layers. It also implements
/// [`HttpView`] itself.
///
/// An `error` event inside a stream (say `overloaded_error`) has no status
/// of its own on the wire (the stream's status was 200); it is given the
/// status Anthropic documents for its type (529 for `overloaded_error`, 429
/// for `rate_limit_error`, 500 for `api_error`, …) so it is classified like
/// the same error on a non-2xx response. An unknown type is a broken-off
/// stream (transient).
///
/// A stream that fails after events reached the caller keeps the message
/// assembled so far ([`partial`](Self::partial)). The body excerpt and the
/// provider's message are kept for the caller but never shown by `Debug`
/// or `Display` (they can quote the prompt).
pub struct AnthropicError {
    // Boxed: errors travel through every layer's `Result`.
    inner: Box<Inner>,
}

struct Inner {
    kind: AnthropicErrorKind,
    http: HttpError,
    body_excerpt: Option<String>,
    partial: Option<MessagesResponse>,
    mid_stream: bool,
    transport: Option<reqwest::Error>,
    /// The client's own verdict, when it has one (a permanent "too large").
    verdict: Option<crate::Error>,
}

/// The HTTP status Anthropic documents for an error type.
fn status_of(error_type: &str) -> Option<u16> {
    Some(match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => return None,
    })
}

impl AnthropicError {
    fn from_parts(kind: AnthropicErrorKind, http: HttpError, body: Option<&[u8]>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                http,
                body_excerpt: body.map(excerpt),
                partial: None,
                mid_stream: false,
                transport: None,
                verdict: None,
            }),
        }
    }

    pub(crate) fn status(status: u16, headers: &HeaderMap, body: &[u8]) -> Self {
        let http = HttpError::from_response(status, headers, body);
        Self::from_parts(AnthropicErrorKind::Status, http, Some(body))
    }

    pub(crate) fn transport(kind: Transport, err: Option<reqwest::Error>) -> Self {
        let mut e = Self::from_parts(
            AnthropicErrorKind::Transport,
            HttpError::transport(kind),
            None,
        );
        e.inner.transport = err;
        e
    }

    pub(crate) fn from_reqwest(err: reqwest::Error) -> Self {
        let kind = if err.is_timeout() {
            Transport::Timeout
        } else if err.is_connect() {
            Transport::Connect
        } else {
            Transport::Reset
        };
        Self::transport(kind, Some(err))
    }

    /// A 2xx body that is not a message: a broken proxy or a truncated
    /// body, classified as a broken connection (transient).
    pub(crate) fn decode(body: &[u8]) -> Self {
        Self::from_parts(
            AnthropicErrorKind::Decode,
            HttpError::transport(Transport::Reset),
            Some(body),
        )
    }

    /// A body or event over the client's `limit`: permanent, the same
    /// request would get the same answer.
    pub(crate) fn too_large(limit: usize) -> Self {
        let mut e = Self::from_parts(
            AnthropicErrorKind::TooLarge,
            HttpError::transport(Transport::Reset),
            None,
        );
        e.inner.verdict = Some(crate::Error::Permanent {
            reason: crate::classify::Reason::ServerError,
            attempts: 1,
            source: Box::new(crate::client::body::TooLarge(limit)),
        });
        e
    }

    /// An `event: error` inside a stream.
    pub(crate) fn stream_event(data: &[u8]) -> Self {
        Self::error_object(data, AnthropicErrorKind::StreamError)
    }

    /// An error object (`{"type":"error","error":{…}}`) where a message or
    /// an event was expected, given the status documented for its type.
    pub(crate) fn error_object(data: &[u8], kind: AnthropicErrorKind) -> Self {
        let http = HttpError::transport(Transport::StreamInterrupted).with_error_body(data);
        let http = match http.error_type().and_then(status_of) {
            Some(status) => HttpError::new(status).with_error_body(data),
            None => http,
        };
        Self::from_parts(kind, http, Some(data))
    }

    pub(crate) fn interrupted(err: Option<reqwest::Error>) -> Self {
        let mut e = Self::from_parts(
            AnthropicErrorKind::StreamInterrupted,
            HttpError::transport(Transport::StreamInterrupted),
            None,
        );
        e.inner.transport = err;
        e
    }

    pub(crate) fn with_partial(mut self, partial: MessagesResponse, mid_stream: bool) -> Self {
        self.inner.partial = Some(partial);
        self.inner.mid_stream = mid_stream;
        self
    }

    pub(crate) fn with_request_id(mut self, id: Option<&str>) -> Self {
        if let Some(id) = id {
            if self.inner.http.header("request-id").is_none() {
                let http = std::mem::take(&mut self.inner.http);
                self.inner.http = http.with_header("request-id", id);
            }
        }
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> AnthropicErrorKind {
        self.inner.kind
    }

    /// The HTTP facts: status, headers that matter, provider type.
    pub fn http(&self) -> &HttpError {
        &self.inner.http
    }

    /// The HTTP status, when a response arrived (for a stream's `error`
    /// event, the status documented for its type).
    pub fn status_code(&self) -> Option<u16> {
        self.inner.http.status()
    }

    /// The provider's `error.type` (`overloaded_error`, …).
    pub fn error_type(&self) -> Option<&str> {
        self.inner.http.error_type()
    }

    /// The provider's `request-id`, when it sent one.
    pub fn request_id(&self) -> Option<&str> {
        self.inner.http.header("request-id")
    }

    /// The first [`BODY_EXCERPT_LIMIT`] bytes of the error body or event
    /// (lossy UTF-8). May quote the request: do not log it.
    pub fn body_excerpt(&self) -> Option<&str> {
        self.inner.body_excerpt.as_deref()
    }

    /// The message a stream had assembled when it failed: the blocks that
    /// arrived (a tool call cut inside its input keeps the JSON text that
    /// arrived, as a string), usage so far, no `stop_reason`. `None` for a
    /// failure that was not a stream's.
    pub fn partial(&self) -> Option<&MessagesResponse> {
        self.inner.partial.as_ref()
    }

    /// The text of [`partial`](Self::partial), concatenated.
    pub fn partial_text(&self) -> String {
        self.inner
            .partial
            .as_ref()
            .map(MessagesResponse::text)
            .unwrap_or_default()
    }

    /// Whether a stream had already handed output to the caller when it
    /// failed (so retrying or falling back would duplicate output).
    pub fn is_mid_stream(&self) -> bool {
        self.inner.mid_stream
    }

    /// The reqwest error behind a transport failure, if any.
    pub fn reqwest_error(&self) -> Option<&reqwest::Error> {
        self.inner.transport.as_ref()
    }
}

fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(BODY_EXCERPT_LIMIT)];
    String::from_utf8_lossy(cut).into_owned()
}

crate::client::http_view_of_inner_http!(AnthropicError);

impl fmt::Debug for AnthropicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicError")
            .field("kind", &self.inner.kind)
            .field("http", &self.inner.http)
            .field(
                "body_excerpt_len",
                &self.inner.body_excerpt.as_ref().map(String::len),
            )
            .field(
                "partial_blocks",
                &self.inner.partial.as_ref().map(|p| p.content.len()),
            )
            .field("mid_stream", &self.inner.mid_stream)
            .finish()
    }
}

impl fmt::Display for AnthropicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.inner.kind {
            AnthropicErrorKind::Status => "anthropic messages call failed",
            AnthropicErrorKind::Transport => "anthropic messages request failed",
            AnthropicErrorKind::Decode => "anthropic response could not be decoded",
            AnthropicErrorKind::TooLarge => "anthropic response exceeded the size limit",
            AnthropicErrorKind::StreamError => "anthropic stream carried an error event",
            AnthropicErrorKind::StreamInterrupted => "anthropic stream broke off",
        };
        write!(f, "{what}: {}", self.inner.http)?;
        if self.inner.mid_stream {
            f.write_str(" after output reached the caller")?;
        }
        Ok(())
    }
}

impl std::error::Error for AnthropicError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner.verdict {
            Some(v) => Some(v),
            None => Some(&self.inner.http),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn status_errors_keep_type_headers_and_hide_the_message() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        h.insert("request-id", HeaderValue::from_static("req_1"));
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("0"),
        );
        h.insert("set-cookie", HeaderValue::from_static("x"));
        let body =
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"secret prompt"}}"#;
        let e = AnthropicError::status(429, &h, body);
        assert_eq!(e.status_code(), Some(429));
        assert_eq!(e.error_type(), Some("rate_limit_error"));
        assert_eq!(e.request_id(), Some("req_1"));
        assert_eq!(
            e.http().header("anthropic-ratelimit-tokens-remaining"),
            Some("0")
        );
        assert_eq!(e.http().header("set-cookie"), None);
        assert!(!format!("{e} {e:?}").contains("secret"));
    }

    #[test]
    fn stream_error_events_get_their_documented_status() {
        let e = AnthropicError::stream_event(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(e.kind(), AnthropicErrorKind::StreamError);
        assert_eq!(e.status_code(), Some(529));
        assert_eq!(e.error_type(), Some("overloaded_error"));
        let e = AnthropicError::stream_event(br#"{"type":"error","error":{"type":"new_error"}}"#);
        assert_eq!(e.status_code(), None);
        assert_eq!(HttpView::transport(&e), Some(Transport::StreamInterrupted));
        let e = AnthropicError::stream_event(b"not json");
        assert_eq!(HttpView::transport(&e), Some(Transport::StreamInterrupted));
    }
}
