//! The client's error: an [`HttpError`] plus what a caller needs to act on.

use std::fmt;

use crate::classify::{HttpError, HttpView, Transport};

use super::types::{ChatChunk, ChatResponse, WireError, WireErrorBody};

/// How many bytes of an error body are kept.
pub const BODY_EXCERPT_LIMIT: usize = 2048;

/// What kind of failure a [`ClientError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientErrorKind {
    /// The server answered with a non-2xx status.
    Status,
    /// The call failed below HTTP (connect, timeout, reset) before a
    /// complete response.
    Transport,
    /// A 2xx response whose body was not a chat completion.
    Decode,
    /// A stream carried an error event.
    StreamError,
    /// A stream broke off (connection dropped, idle gap exceeded, or ended
    /// without its `[DONE]` terminator).
    StreamInterrupted,
    /// A 2xx body over the client's `max_body_bytes`, or one server-sent
    /// event over its `max_event_bytes`. Permanent: the same request would
    /// get the same answer. Its source chain holds
    /// [`Error::Permanent`](crate::Error::Permanent), which the classifier
    /// reads as [`Reason::ServerError`](crate::classify::Reason::ServerError).
    BodyTooLarge,
}

/// A failed chat call.
///
/// Its [`source`](std::error::Error::source) is the [`HttpError`] (status,
/// the provider's error type and code, the headers that matter, or the
/// transport failure), so the crate's
/// [`LlmClassifier`](crate::classify::LlmClassifier) classifies it with no
/// extra setup, through any stack of layers. It also implements
/// [`HttpView`] itself.
///
/// A streamed call that fails after chunks reached the caller keeps those
/// chunks ([`partial`](Self::partial)). The body excerpt and the provider's
/// message are kept for the caller but never shown by `Debug` or `Display`
/// (they can quote the prompt).
pub struct ClientError {
    // Boxed: errors travel through every layer's `Result`; one pointer keeps
    // the happy path's `Result`s small.
    inner: Box<Inner>,
}

struct Inner {
    kind: ClientErrorKind,
    http: HttpError,
    body_excerpt: Option<String>,
    partial: Vec<ChatChunk>,
    partial_response: Option<ChatResponse>,
    /// A verdict of the client itself (a permanent "body too large"),
    /// shown first in the source chain so the classifier reads it.
    verdict: Option<crate::Error>,
}

impl ClientError {
    fn from_parts(inner: Inner) -> Self {
        Self {
            inner: Box::new(inner),
        }
    }

    pub(crate) fn status(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> Self {
        let http = HttpError::from_response(status, headers, body);
        Self::from_parts(Inner {
            kind: ClientErrorKind::Status,
            http,
            body_excerpt: Some(excerpt(body)),
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    pub(crate) fn transport(kind: Transport, err: Option<reqwest::Error>) -> Self {
        Self::from_parts(Inner {
            kind: ClientErrorKind::Transport,
            http: with_cause(HttpError::transport(kind), err),
            body_excerpt: None,
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    /// A 2xx body (or one stream event) over the client's limit.
    pub(crate) fn too_large(
        status: u16,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let http = HttpError::new(status).with_source(cause);
        let verdict = crate::Error::Permanent {
            reason: crate::classify::Reason::ServerError,
            attempts: 1,
            source: Box::new(http.clone()),
        };
        Self::from_parts(Inner {
            kind: ClientErrorKind::BodyTooLarge,
            http,
            body_excerpt: None,
            partial: Vec::new(),
            partial_response: None,
            verdict: Some(verdict),
        })
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

    pub(crate) fn decode(body: &[u8], cause: Option<serde_json::Error>) -> Self {
        let mut http = HttpError::transport(Transport::Reset);
        if let Some(c) = cause {
            http = http.with_source(c);
        }
        Self::from_parts(Inner {
            kind: ClientErrorKind::Decode,
            // A 200 that is not a completion: a broken proxy or a truncated
            // body. Classified as a broken connection (transient).
            http,
            body_excerpt: Some(excerpt(body)),
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    /// A stream event whose data is not a chat chunk (malformed JSON or a
    /// schema mismatch).
    pub(crate) fn decode_stream(data: &[u8], cause: serde_json::Error) -> Self {
        Self::from_parts(Inner {
            kind: ClientErrorKind::Decode,
            http: HttpError::transport(Transport::StreamInterrupted).with_source(cause),
            body_excerpt: Some(excerpt(data)),
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    /// An error event inside a stream (`data: {"error":…}` or
    /// `event: error`).
    pub(crate) fn stream_event(data: &[u8]) -> Self {
        let http = HttpError::transport(Transport::StreamInterrupted).with_error_body(data);
        Self::from_parts(Inner {
            kind: ClientErrorKind::StreamError,
            http,
            body_excerpt: Some(excerpt(data)),
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    pub(crate) fn interrupted(err: Option<reqwest::Error>) -> Self {
        Self::from_parts(Inner {
            kind: ClientErrorKind::StreamInterrupted,
            http: with_cause(HttpError::transport(Transport::StreamInterrupted), err),
            body_excerpt: None,
            partial: Vec::new(),
            partial_response: None,
            verdict: None,
        })
    }

    pub(crate) fn with_partial(mut self, partial: Vec<ChatChunk>) -> Self {
        self.inner.partial = partial;
        self
    }

    pub(crate) fn with_partial_response(mut self, partial: ChatResponse) -> Self {
        self.inner.partial_response = Some(partial);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ClientErrorKind {
        self.inner.kind
    }

    /// The HTTP facts: status, headers that matter, provider type and code.
    pub fn http(&self) -> &HttpError {
        &self.inner.http
    }

    /// The HTTP status, when a response arrived.
    pub fn status_code(&self) -> Option<u16> {
        self.inner.http.status()
    }

    /// The first [`BODY_EXCERPT_LIMIT`] bytes of the error body (lossy
    /// UTF-8), when there was one. May quote the request: do not log it.
    pub fn body_excerpt(&self) -> Option<&str> {
        self.inner.body_excerpt.as_deref()
    }

    /// The chunks a stream had delivered to the caller before it failed
    /// (empty for a non-streamed call or a failure before the first chunk).
    pub fn partial(&self) -> &[ChatChunk] {
        &self.inner.partial
    }

    /// The text of [`partial`](Self::partial), concatenated.
    pub fn partial_text(&self) -> String {
        self.inner.partial.iter().map(ChatChunk::text).collect()
    }

    /// What a failed stream had received, in the shape of a whole response:
    /// each choice's text, the tool calls (the last one possibly cut short,
    /// its arguments incomplete JSON), ids and usage; `None` for a failure
    /// that was not a stream's.
    pub fn partial_response(&self) -> Option<&ChatResponse> {
        self.inner.partial_response.as_ref()
    }

    /// The reqwest error behind a transport failure, if any (also in the
    /// [`source`](std::error::Error::source) chain).
    pub fn reqwest_error(&self) -> Option<&reqwest::Error> {
        std::error::Error::source(&self.inner.http)?.downcast_ref()
    }

    /// Whether a streamed response had already handed chunks to the caller
    /// (so retrying or falling back would duplicate output).
    pub fn is_mid_stream(&self) -> bool {
        !self.inner.partial.is_empty()
    }
}

fn with_cause(http: HttpError, err: Option<reqwest::Error>) -> HttpError {
    match err {
        Some(e) => http.with_source(e),
        None => http,
    }
}

fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(BODY_EXCERPT_LIMIT)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Decodes a 2xx body as a completion. A body that is the provider's error
/// object (`{"error":{…}}`) is that error, classified as it would be on the
/// status it implies (see [`implied_status`]); anything else that is not a
/// completion is a [`ClientErrorKind::Decode`] error.
pub(crate) fn decode_completion(
    headers: &reqwest::header::HeaderMap,
    body: &bytes::Bytes,
) -> Result<ChatResponse, ClientError> {
    match serde_json::from_slice::<ChatResponse>(body) {
        Ok(r) if !r.choices.is_empty() => Ok(r.with_raw(body.clone())),
        Ok(_) => match serde_json::from_slice::<WireErrorBody>(body) {
            Ok(WireErrorBody { error: Some(e) }) => {
                Err(ClientError::status(implied_status(&e), headers, body))
            }
            _ => Err(ClientError::decode(body, None)),
        },
        Err(e) => Err(ClientError::decode(body, Some(e))),
    }
}

/// The HTTP status a provider's error object stands for, when it came in a
/// 2xx body: Gemini's numeric `code` when it is a status, else the OpenAI
/// and Anthropic error types and codes mapped to the status those APIs send
/// them with (500 for anything unknown: a server error, transient).
pub(crate) fn implied_status(e: &WireError) -> u16 {
    if let Some(n) = e.code.as_ref().and_then(serde_json::Value::as_u64) {
        if (400..=599).contains(&n) {
            return n as u16;
        }
    }
    let code = e.code.as_ref().and_then(serde_json::Value::as_str);
    let words = [e.kind.as_deref(), code, e.status.as_deref()];
    let has = |list: &[&str]| {
        words
            .iter()
            .flatten()
            .any(|w| list.iter().any(|l| w.eq_ignore_ascii_case(l)))
    };
    if has(&[
        "insufficient_quota",
        "rate_limit_error",
        "rate_limit_exceeded",
        "RESOURCE_EXHAUSTED",
    ]) {
        429
    } else if has(&["authentication_error", "invalid_api_key", "UNAUTHENTICATED"]) {
        401
    } else if has(&["permission_error", "PERMISSION_DENIED"]) {
        403
    } else if has(&["not_found_error", "model_not_found", "NOT_FOUND"]) {
        404
    } else if has(&["request_too_large"]) {
        413
    } else if has(&["overloaded_error"]) {
        529
    } else if has(&[
        "invalid_request_error",
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
    ]) || code.is_some_and(|c| c.contains("context_length"))
    {
        400
    } else if has(&["UNAVAILABLE"]) {
        503
    } else {
        500
    }
}

/// `HttpView` for a client error that keeps its [`HttpError`] in
/// `self.inner.http`: every method reads that one (the OpenAI-compatible
/// and the Anthropic client's errors).
macro_rules! http_view_of_inner_http {
    ($ty:ty) => {
        impl $crate::classify::HttpView for $ty {
            fn status(&self) -> Option<u16> {
                self.inner.http.status()
            }
            fn header(&self, name: &str) -> Option<&str> {
                self.inner.http.header(name)
            }
            fn error_type(&self) -> Option<&str> {
                self.inner.http.error_type()
            }
            fn error_code(&self) -> Option<&str> {
                self.inner.http.error_code()
            }
            fn error_message(&self) -> Option<&str> {
                self.inner.http.error_message()
            }
            fn transport(&self) -> Option<$crate::classify::Transport> {
                self.inner.http.transport()
            }
        }
    };
}
pub(crate) use http_view_of_inner_http;

http_view_of_inner_http!(ClientError);

impl fmt::Debug for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientError")
            .field("kind", &self.inner.kind)
            .field("http", &self.inner.http)
            .field(
                "body_excerpt_len",
                &self.inner.body_excerpt.as_ref().map(String::len),
            )
            .field("partial_chunks", &self.inner.partial.len())
            .finish()
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.inner.kind {
            ClientErrorKind::Status => "chat completion failed",
            ClientErrorKind::Transport => "chat request failed",
            ClientErrorKind::Decode => "chat response could not be decoded",
            ClientErrorKind::StreamError => "chat stream carried an error event",
            ClientErrorKind::StreamInterrupted => "chat stream broke off",
            ClientErrorKind::BodyTooLarge => "chat response larger than the client's limit",
        };
        write!(f, "{what}: {}", self.inner.http)?;
        if !self.inner.partial.is_empty() {
            write!(f, " after {} chunks", self.inner.partial.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for ClientError {
    /// The client's own verdict when it has one (a permanent
    /// [`crate::Error`]), otherwise the [`HttpError`]; the HTTP library's or
    /// the JSON decoder's error follows further down the chain.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner.verdict {
            Some(v) => Some(v),
            None => Some(&self.inner.http),
        }
    }
}
/// A `reqwest::Error` as the classifier sees it: the status of an
/// `error_for_status()` error, or the transport failure (connect, timeout,
/// a broken request or body). So a user's own reqwest call, wrapped in the
/// layers with its error as it is, is classified like the crate's client.
impl HttpView for reqwest::Error {
    fn status(&self) -> Option<u16> {
        reqwest::Error::status(self).map(|s| s.as_u16())
    }
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
    fn transport(&self) -> Option<Transport> {
        if self.is_timeout() {
            Some(Transport::Timeout)
        } else if self.is_connect() {
            Some(Transport::Connect)
        } else if self.is_request() || self.is_body() || self.is_decode() {
            Some(Transport::Reset)
        } else {
            None
        }
    }
}

fn reqwest_view<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a dyn HttpView> {
    let r = e.downcast_ref::<reqwest::Error>()?;
    // A reqwest error that is neither a status nor a transport failure (a
    // builder or redirect error) says nothing: let the chain go on.
    (r.status().is_some() || HttpView::transport(r).is_some()).then_some(r as &dyn HttpView)
}

/// How [`LlmClassifier`](crate::classify::LlmClassifier) finds a
/// `reqwest::Error` in a source chain.
pub(crate) const REQWEST_VIEW: crate::classify::ViewFn = reqwest_view;
