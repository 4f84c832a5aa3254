//! The HTTP-like view of an LLM error and the table that classifies it.

use std::fmt;
use std::time::SystemTime;

use super::hint;
use super::{Outcome, Reason};

/// How a call failed below HTTP, when it never got a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// Connect, DNS or TLS failure: nothing was sent.
    Connect,
    /// Timed out before the first byte (the call may already be billed).
    Timeout,
    /// The connection broke before a complete response.
    Reset,
    /// A streamed response broke off after it started.
    StreamInterrupted,
}

impl Transport {
    /// What the transport failure means: always transient (the request may
    /// not have reached the server, or its answer was lost).
    pub const fn outcome(self) -> Outcome {
        Outcome::transient(match self {
            Transport::Connect => Reason::Connect,
            Transport::Timeout => Reason::Timeout,
            Transport::Reset => Reason::Network,
            Transport::StreamInterrupted => Reason::StreamInterrupted,
        })
    }
}

/// The facts about a failed LLM call that classification needs: status,
/// headers, the provider's error type and code, or a transport failure.
///
/// Implement it for a client's own error type to make [`LlmClassifier`]
/// understand it (see [`LlmClassifier::with_view`]).
///
/// [`LlmClassifier`]: super::LlmClassifier
/// [`LlmClassifier::with_view`]: super::LlmClassifier::with_view
pub trait HttpView {
    /// The HTTP status, if a response arrived.
    fn status(&self) -> Option<u16>;
    /// A response header's value; `name` is lowercase ASCII.
    fn header(&self, name: &str) -> Option<&str>;
    /// The provider's error type (OpenAI `error.type`, Anthropic
    /// `error.type`, Gemini `error.status`).
    fn error_type(&self) -> Option<&str> {
        None
    }
    /// The provider's error code (OpenAI `error.code`).
    fn error_code(&self) -> Option<&str> {
        None
    }
    /// The provider's error message, used only to recognise a few providers'
    /// context-length and daily-quota errors; never logged.
    fn error_message(&self) -> Option<&str> {
        None
    }
    /// A failure below HTTP, if there was no response.
    fn transport(&self) -> Option<Transport> {
        None
    }
}

/// A failed LLM HTTP call, as the crate's adapters report it and as any
/// client can build it: status, the headers that matter, the provider's error
/// type, code and message, or a transport failure.
///
/// `Display` names the status and the provider's type and code only: no
/// message, no body.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpError {
    status: Option<u16>,
    transport: Option<Transport>,
    headers: Vec<(String, String)>,
    error_type: Option<String>,
    error_code: Option<String>,
    message: Option<String>,
    cause: Option<Cause>,
}

/// The error behind an [`HttpError`] (e.g. the HTTP library's), shown in
/// its `source()` chain; not part of equality.
#[derive(Clone)]
struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl PartialEq for Cause {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Cause {}

impl HttpError {
    /// An error for an HTTP response with `status`.
    pub fn new(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// An error for a call that failed below HTTP.
    pub fn transport(kind: Transport) -> Self {
        Self {
            transport: Some(kind),
            ..Self::default()
        }
    }

    /// Adds a response header (the name is stored lowercase).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the provider's error type.
    pub fn with_error_type(mut self, t: impl Into<String>) -> Self {
        self.error_type = Some(t.into());
        self
    }

    /// Sets the provider's error code.
    pub fn with_error_code(mut self, c: impl Into<String>) -> Self {
        self.error_code = Some(c.into());
        self
    }

    /// Sets the provider's error message (kept, never logged).
    pub fn with_message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }

    /// Sets the underlying error (the HTTP library's), returned by
    /// [`source`](std::error::Error::source) so error reports show the real
    /// cause. Not compared by `==`.
    pub fn with_source(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Cause(std::sync::Arc::new(cause)));
        self
    }

    /// Every header kept, lowercase names.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The response headers an [`HttpError`] built by
/// [`from_response`](HttpError::from_response) keeps: wait hints
/// (`retry-after`, `retry-after-ms`, Azure's `x-ms-retry-after-ms`),
/// `x-should-retry`, the rate-limit state (`x-ratelimit-*`,
/// `anthropic-ratelimit-*`) and request ids. `name` is lowercase.
pub fn header_matters(name: &str) -> bool {
    matches!(
        name,
        "retry-after"
            | "retry-after-ms"
            | "x-ms-retry-after-ms"
            | "x-should-retry"
            | "x-request-id"
            | "request-id"
    ) || name.starts_with("x-ratelimit-")
        || name.starts_with("anthropic-ratelimit-")
}

#[cfg(feature = "json")]
impl HttpError {
    /// The error of an HTTP response, from what any client has at hand: the
    /// status, the headers (any `(name, value)` pairs, e.g. `&http::HeaderMap`)
    /// and the body. Keeps the headers that matter ([`header_matters`]) and
    /// reads the provider's error type, code and message from the body in
    /// OpenAI (`{"error":{"type","code","message"}}`), Anthropic
    /// (`{"type":"error","error":{"type","message"}}`) and Gemini
    /// (`{"error":{"status","message"}}`) shapes. Feature `json` (enabled
    /// by `reqwest` and `axum`).
    ///
    /// ```
    /// use llm_resilience::classify::{classify_http, HttpError, Outcome, Reason};
    ///
    /// let body = br#"{"error":{"message":"...","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    /// let headers = [("Retry-After", "20")];
    /// let err = HttpError::from_response(429, headers, body);
    /// assert_eq!(classify_http(&err).reason(), Reason::Quota);
    /// ```
    pub fn from_response<H, K, V>(status: u16, headers: H, body: &[u8]) -> Self
    where
        H: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut http = Self::new(status);
        for (name, value) in headers {
            let name = name.as_ref();
            let lower = name.to_ascii_lowercase();
            if header_matters(&lower) {
                if let Ok(v) = std::str::from_utf8(value.as_ref()) {
                    http.headers.push((lower, v.to_owned()));
                }
            }
        }
        http.with_error_body(body)
    }

    /// Reads the provider's error type, code and message from an error body
    /// (the shapes of [`from_response`](Self::from_response)); a body that
    /// is not one changes nothing. Feature `json`.
    pub fn with_error_body(mut self, body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            error: Option<Wire>,
        }
        #[derive(serde::Deserialize)]
        struct Wire {
            #[serde(default, rename = "type")]
            kind: Option<String>,
            #[serde(default)]
            code: Option<serde_json::Value>,
            #[serde(default)]
            message: Option<String>,
            #[serde(default)]
            status: Option<String>,
        }
        if let Ok(Body { error: Some(e) }) = serde_json::from_slice(body) {
            // Gemini's `status` stands in for the type; a numeric `code`
            // (Gemini's HTTP status) is not a provider code.
            if let Some(t) = e.kind.or(e.status) {
                self.error_type = Some(t);
            }
            if let Some(serde_json::Value::String(c)) = e.code {
                self.error_code = Some(c);
            }
            if let Some(m) = e.message {
                self.message = Some(m);
            }
        }
        self
    }
}

impl HttpView for HttpError {
    fn status(&self) -> Option<u16> {
        self.status
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn error_type(&self) -> Option<&str> {
        self.error_type.as_deref()
    }
    fn error_code(&self) -> Option<&str> {
        self.error_code.as_deref()
    }
    fn error_message(&self) -> Option<&str> {
        self.message.as_deref()
    }
    fn transport(&self) -> Option<Transport> {
        self.transport
    }
}

impl fmt::Debug for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Messages can quote the request; headers are kept for classification
        // only. Show neither.
        f.debug_struct("HttpError")
            .field("status", &self.status)
            .field("transport", &self.transport)
            .field("error_type", &self.error_type)
            .field("error_code", &self.error_code)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, self.transport) {
            (Some(s), _) => write!(f, "http status {s}")?,
            (None, Some(t)) => write!(f, "transport failure: {t:?}")?,
            (None, None) => f.write_str("http call failed")?,
        }
        if let Some(t) = &self.error_type {
            write!(f, ", type {t}")?;
        }
        if let Some(c) = &self.error_code {
            write!(f, ", code {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|c| &*c.0 as &(dyn std::error::Error + 'static))
    }
}

/// Classifies an [`HttpView`] by the table in the
/// [module docs](crate::classify), with the server's wait hint
/// ([`hint::server_hint`]) read against the system clock.
pub fn classify_http(view: &dyn HttpView) -> Outcome {
    classify_http_at(view, SystemTime::now())
}

/// [`classify_http`] with an explicit "now" for date-valued hints.
pub fn classify_http_at(view: &dyn HttpView, now: SystemTime) -> Outcome {
    let base = base_outcome(view);
    // `x-should-retry` is authoritative and overrides the status (§1).
    let base = match view.header("x-should-retry").and_then(hint::should_retry) {
        Some(true) => match base {
            Outcome::Transient { .. } => base,
            other => Outcome::transient(match other.reason() {
                Reason::Ok => Reason::Unknown,
                r => r,
            }),
        },
        Some(false) => match base {
            Outcome::Transient { .. } | Outcome::Success => {
                Outcome::permanent(Reason::ServerSaidNoRetry)
            }
            other => other,
        },
        None => base,
    };
    // The hint goes with every failure that the target will get over: a
    // transient one (when to retry) and a permanent one (when the breaker
    // may try again, e.g. a quota that resets).
    match base {
        Outcome::Transient { reason, .. } => Outcome::Transient {
            reason,
            retry_after: hint::server_hint(view, now),
        },
        Outcome::Permanent { reason, .. } => Outcome::Permanent {
            reason,
            retry_after: hint::server_hint(view, now),
        },
        other => other,
    }
}

fn eq(a: Option<&str>, b: &str) -> bool {
    a.is_some_and(|a| a.eq_ignore_ascii_case(b))
}

fn message_has(view: &dyn HttpView, needles: &[&str]) -> bool {
    view.error_message().is_some_and(|m| {
        let m = m.to_ascii_lowercase();
        needles.iter().any(|n| m.contains(n))
    })
}

fn is_quota(view: &dyn HttpView) -> bool {
    let t = view.error_type();
    let c = view.error_code();
    let quota_word = |s: Option<&str>| {
        s.is_some_and(|s| {
            let s = s.to_ascii_lowercase();
            s == "insufficient_quota"
                || s.ends_with("_spend_limit_exceeded")
                || s == "credit_balance_exhausted"
                || s == "enforced_spend_limit_reached"
                || s == "billing_error"
        })
    };
    if quota_word(t) || quota_word(c) {
        return true;
    }
    // Gemini: a daily quota is RESOURCE_EXHAUSTED whose message names the day.
    eq(t, "RESOURCE_EXHAUSTED") && message_has(view, &["per day", "perday", "daily"])
}

fn is_context_length(view: &dyn HttpView) -> bool {
    let words = [
        "context_length_exceeded",
        "request_too_large",
        "string_above_max_length",
    ];
    words
        .iter()
        .any(|w| eq(view.error_code(), w) || eq(view.error_type(), w))
        || message_has(
            view,
            &[
                "prompt is too long",
                "maximum context length",
                "context window",
            ],
        )
}

fn is_content_policy(view: &dyn HttpView) -> bool {
    [
        "content_policy_violation",
        "content_filter",
        "content_policy",
    ]
    .iter()
    .any(|w| eq(view.error_code(), w) || eq(view.error_type(), w))
}

fn base_outcome(view: &dyn HttpView) -> Outcome {
    let Some(status) = view.status() else {
        return match view.transport() {
            Some(t) => t.outcome(),
            None => Outcome::transient(Reason::Unknown),
        };
    };
    let t = view.error_type();
    let bad = |reason| Outcome::BadRequest { reason };
    let permanent = Outcome::permanent;
    match status {
        200..=399 => Outcome::Success,
        408 => Outcome::transient(Reason::Timeout),
        409 => Outcome::transient(Reason::Conflict),
        429 if is_quota(view) => permanent(Reason::Quota),
        429 => Outcome::transient(Reason::RateLimited),
        401 | 403 => permanent(Reason::Auth),
        402 => permanent(Reason::Quota),
        404 => permanent(Reason::NotFound),
        413 => bad(Reason::ContextLength),
        400..=499 if is_quota(view) => permanent(Reason::Quota),
        400..=499 if is_context_length(view) => bad(Reason::ContextLength),
        400..=499 if is_content_policy(view) => bad(Reason::ContentPolicy),
        400..=499 => bad(Reason::InvalidRequest),
        529 => Outcome::transient(Reason::Overloaded),
        _ if eq(t, "overloaded_error") => Outcome::transient(Reason::Overloaded),
        503 => Outcome::transient(Reason::Unavailable),
        _ => Outcome::transient(Reason::ServerError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn c(e: &HttpError) -> Outcome {
        classify_http(e)
    }

    #[test]
    fn reference_table_rows() {
        let bad = |r| Outcome::BadRequest { reason: r };
        let perm = Outcome::permanent;
        let tr = Outcome::transient;
        assert_eq!(
            c(&HttpError::transport(Transport::Connect)),
            tr(Reason::Connect)
        );
        assert_eq!(
            c(&HttpError::transport(Transport::Timeout)),
            tr(Reason::Timeout)
        );
        assert_eq!(c(&HttpError::new(408)), tr(Reason::Timeout));
        assert_eq!(c(&HttpError::new(409)), tr(Reason::Conflict));
        assert_eq!(
            c(&HttpError::new(429).with_error_code("rate_limit_exceeded")),
            tr(Reason::RateLimited)
        );
        assert_eq!(
            c(&HttpError::new(429).with_error_type("rate_limit_error")),
            tr(Reason::RateLimited)
        );
        for code in [
            "insufficient_quota",
            "monthly_spend_limit_exceeded",
            "credit_balance_exhausted",
            "enforced_spend_limit_reached",
        ] {
            assert_eq!(
                c(&HttpError::new(429).with_error_code(code)),
                perm(Reason::Quota),
                "{code}"
            );
        }
        assert_eq!(
            c(&HttpError::new(429)
                .with_error_type("RESOURCE_EXHAUSTED")
                .with_message("Quota exceeded for GenerateRequestsPerDay")),
            perm(Reason::Quota)
        );
        assert_eq!(
            c(&HttpError::new(429)
                .with_error_type("RESOURCE_EXHAUSTED")
                .with_message("per minute")),
            tr(Reason::RateLimited)
        );
        assert_eq!(
            c(&HttpError::new(400).with_error_code("context_length_exceeded")),
            bad(Reason::ContextLength)
        );
        assert_eq!(
            c(&HttpError::new(400)
                .with_error_type("invalid_request_error")
                .with_message("prompt is too long: 210000 tokens > 200000 maximum")),
            bad(Reason::ContextLength)
        );
        assert_eq!(c(&HttpError::new(413)), bad(Reason::ContextLength));
        assert_eq!(c(&HttpError::new(422)), bad(Reason::InvalidRequest));
        assert_eq!(
            c(&HttpError::new(400).with_error_code("content_policy_violation")),
            bad(Reason::ContentPolicy)
        );
        assert_eq!(c(&HttpError::new(401)), perm(Reason::Auth));
        assert_eq!(c(&HttpError::new(403)), perm(Reason::Auth));
        assert_eq!(c(&HttpError::new(404)), perm(Reason::NotFound));
        for s in [500, 502, 504] {
            assert_eq!(c(&HttpError::new(s)), tr(Reason::ServerError));
        }
        assert_eq!(c(&HttpError::new(503)), tr(Reason::Unavailable));
        assert_eq!(
            c(&HttpError::new(529).with_error_type("overloaded_error")),
            tr(Reason::Overloaded)
        );
        assert_eq!(c(&HttpError::new(200)), Outcome::Success);
    }

    #[test]
    fn should_retry_header_overrides_status() {
        assert_eq!(
            c(&HttpError::new(503).with_header("x-should-retry", "false")),
            Outcome::permanent(Reason::ServerSaidNoRetry)
        );
        assert_eq!(
            c(&HttpError::new(400).with_header("X-Should-Retry", "true")),
            Outcome::transient(Reason::InvalidRequest)
        );
        // A malformed value is ignored.
        assert_eq!(
            c(&HttpError::new(503).with_header("x-should-retry", "maybe")),
            Outcome::transient(Reason::Unavailable)
        );
    }

    #[test]
    fn transient_outcomes_carry_the_hint() {
        let e = HttpError::new(429)
            .with_header("retry-after", "3")
            .with_header("retry-after-ms", "1500");
        assert_eq!(
            c(&e),
            Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_millis(1500))
            }
        );
        // A permanent one carries it too (when the quota resets), and bad
        // requests never do.
        let e = HttpError::new(429)
            .with_error_code("insufficient_quota")
            .with_header("retry-after", "3");
        assert_eq!(
            c(&e),
            Outcome::Permanent {
                reason: Reason::Quota,
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let e = HttpError::new(400)
            .with_error_code("context_length_exceeded")
            .with_header("retry-after", "3");
        assert_eq!(
            c(&e),
            Outcome::BadRequest {
                reason: Reason::ContextLength
            }
        );
    }

    #[test]
    fn display_and_debug_hide_the_message() {
        let e = HttpError::new(400)
            .with_error_code("context_length_exceeded")
            .with_message("secret prompt text");
        assert!(!e.to_string().contains("secret"));
        assert!(!format!("{e:?}").contains("secret"));
        assert_eq!(
            e.to_string(),
            "http status 400, code context_length_exceeded"
        );
    }
}
