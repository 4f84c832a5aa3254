//! [`Reason`]: why a call failed, as a stable code.
//!
//! The bottom floor of the crate: it depends on nothing else in it, so the
//! error type and the classifiers can both use it without importing each
//! other. Re-exported as [`classify::Reason`](crate::classify::Reason).

use std::fmt;

/// Why a call failed: a stable code shared by every layer and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Not a failure.
    Ok,
    /// 429 rate limit (requests or tokens per minute).
    RateLimited,
    /// 529 or `overloaded_error`: the provider is overloaded for everyone.
    Overloaded,
    /// 503: the service is unavailable.
    Unavailable,
    /// 500, 502, 504 and other server errors.
    ServerError,
    /// A timeout: 408, an attempt timeout, a transport timeout.
    Timeout,
    /// The connection could not be made (connect, DNS, TLS).
    Connect,
    /// The connection broke (reset, closed before the response).
    Network,
    /// 409 conflict.
    Conflict,
    /// Quota or spend limit exhausted (429 `insufficient_quota`, 402, …).
    Quota,
    /// 401 or 403: the credential is wrong or lacks permission.
    Auth,
    /// 404: model or endpoint not found.
    NotFound,
    /// The prompt does not fit the model's context, or the body is too large.
    ContextLength,
    /// The content was refused by policy.
    ContentPolicy,
    /// Any other invalid request (400, 422).
    InvalidRequest,
    /// A streamed response broke off or carried an error event.
    StreamInterrupted,
    /// The server said `x-should-retry: false`.
    ServerSaidNoRetry,
    /// A circuit breaker below was open.
    CircuitOpen,
    /// A queue was full or timed out.
    QueueFull,
    /// A layer is shutting down.
    Shutdown,
    /// Nothing recognised the error.
    Unknown,
}

impl Reason {
    /// The code as a lowercase `snake_case` string, for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::RateLimited => "rate_limited",
            Reason::Overloaded => "overloaded",
            Reason::Unavailable => "unavailable",
            Reason::ServerError => "server_error",
            Reason::Timeout => "timeout",
            Reason::Connect => "connect",
            Reason::Network => "network",
            Reason::Conflict => "conflict",
            Reason::Quota => "quota",
            Reason::Auth => "auth",
            Reason::NotFound => "not_found",
            Reason::ContextLength => "context_length",
            Reason::ContentPolicy => "content_policy",
            Reason::InvalidRequest => "invalid_request",
            Reason::StreamInterrupted => "stream_interrupted",
            Reason::ServerSaidNoRetry => "server_said_no_retry",
            Reason::CircuitOpen => "circuit_open",
            Reason::QueueFull => "queue_full",
            Reason::Shutdown => "shutdown",
            Reason::Unknown => "unknown",
        }
    }

    /// Whether this is throttling (rate limit or overload), which backs off
    /// from a larger base than other transient failures: a per-minute limit
    /// does not clear in a few hundred milliseconds, so the retry layer uses
    /// its throttling backoff (1 s doubling to 30 s by default) for these.
    pub const fn is_throttling(&self) -> bool {
        matches!(self, Reason::RateLimited | Reason::Overloaded)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
