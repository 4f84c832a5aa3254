//! The default mapping from [`Error`] to an [`ErrorResponse`].

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::classify::{LlmClassifier, Outcome, Reason};
use crate::error::Error;

/// The Retry-After a full queue answers with when nothing else is known:
/// one second, the order of magnitude of the shortest LLM call, so that a
/// client comes back about when the first in-flight call has made room.
pub const DEFAULT_QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What an [`Error`] answers an HTTP caller: status, `Retry-After`, and the
/// OpenAI error body `{"error": {"message", "type", "param", "code", "reason"}}`.
///
/// Built by [`Error::to_error_response`] (the default mapping, see the
/// [module docs](crate::axum)) and changed by an
/// [`ErrorMapping`](super::ErrorMapping). Every field is public so a mapping
/// can change any of them; the struct is `#[non_exhaustive]` so later fields
/// can be added.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The wait sent as `Retry-After` (whole seconds, rounded up), if any.
    pub retry_after: Option<Duration>,
    /// `error.type`: the category an OpenAI client reads (for example
    /// `rate_limit_error`, `server_error`, `invalid_request_error`).
    pub error_type: Cow<'static, str>,
    /// `error.code`: the crate's stable name of the error, [`Error::kind`]
    /// (for example `queue_full`, `circuit_open`).
    pub code: Cow<'static, str>,
    /// `error.reason`: why the call failed, a stable [`Reason`] code.
    pub reason: Cow<'static, str>,
    /// `error.message`: one sentence written by the crate. It never quotes
    /// the prompt, the completion or the upstream's own message.
    pub message: Cow<'static, str>,
    /// `error.param`: `null` unless a mapping sets it.
    pub param: Option<Cow<'static, str>>,
    /// The variant's kind, kept so a mapping can match on it even after
    /// `code` was changed.
    pub kind: &'static str,
}

impl ErrorResponse {
    /// The JSON body, in the OpenAI error shape.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
                "reason": self.reason,
            }
        })
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(wait) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(whole_seconds(wait)));
        }
        resp.extensions_mut().insert(self);
        resp
    }
}

/// Whole seconds, rounded up, at least 1 for a non-zero wait: a client that
/// waits the header's value never comes back early.
pub(crate) fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
}

/// The server's hint carried by the error's upstream cause, as the crate's
/// classifier reads it (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`,
/// `anthropic-ratelimit-*-reset`).
fn upstream_hint(err: &Error) -> Option<Duration> {
    let source = std::error::Error::source(err)?;
    LlmClassifier::new().classify_chain(source).retry_after()
}

fn reason_of(err: &Error) -> Reason {
    match err {
        Error::RetriesExhausted { reason, .. }
        | Error::Permanent { reason, .. }
        | Error::BadRequest { reason, .. }
        | Error::BudgetExhausted { reason, .. }
        | Error::NotCloneable { reason, .. } => *reason,
        Error::RetryAfterTooLong { .. } => match std::error::Error::source(err) {
            Some(source) => match LlmClassifier::new().classify_chain(source) {
                Outcome::Success => Reason::Unknown,
                other => other.reason(),
            },
            None => Reason::Unknown,
        },
        _ => LlmClassifier::new().classify_error(err).reason(),
    }
}

fn is_throttle(reason: Reason) -> bool {
    matches!(reason, Reason::RateLimited | Reason::Quota)
}

impl Error {
    /// The default HTTP answer for this error (see the
    /// [module docs](crate::axum) for the table).
    pub fn to_error_response(&self) -> ErrorResponse {
        self.to_error_response_with(DEFAULT_QUEUE_FULL_RETRY_AFTER)
    }

    pub(crate) fn to_error_response_with(&self, queue_full_retry_after: Duration) -> ErrorResponse {
        use StatusCode as S;
        let reason = reason_of(self);
        let (status, error_type, message, retry_after): (S, &'static str, &'static str, _) =
            match self {
                Error::RateLimited { retry_after } => (
                    S::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "the service's own rate limit is reached; retry after the given wait",
                    Some(*retry_after),
                ),
                Error::QueueFull { .. } => (
                    S::SERVICE_UNAVAILABLE,
                    "server_overloaded",
                    "the request queue is full; retry after the given wait",
                    Some(queue_full_retry_after),
                ),
                Error::CircuitOpen { retry_after } => (
                    S::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the upstream provider is failing and calls to it are paused",
                    Some(*retry_after),
                ),
                Error::Shutdown => (
                    S::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the service is shutting down",
                    None,
                ),
                Error::Timeout { .. } | Error::DeadlineExceeded { .. } => (
                    S::GATEWAY_TIMEOUT,
                    "timeout",
                    "the request did not complete within its time limit",
                    None,
                ),
                Error::QueueTimeout { .. } => (
                    S::GATEWAY_TIMEOUT,
                    "timeout",
                    "the request waited in the queue longer than allowed",
                    None,
                ),
                Error::BadRequest { reason, .. } => (
                    S::BAD_REQUEST,
                    "invalid_request_error",
                    match reason {
                        Reason::ContextLength => "the request does not fit the model's context",
                        Reason::ContentPolicy => {
                            "the request was refused by the provider's content policy"
                        }
                        _ => "the upstream provider rejected the request as invalid",
                    },
                    None,
                ),
                Error::RetryAfterTooLong { retry_after, .. } if is_throttle(reason) => (
                    S::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "the upstream provider is throttling; retry after the given wait",
                    Some(*retry_after),
                ),
                Error::RetryAfterTooLong { retry_after, .. } => (
                    S::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the upstream provider asked for a wait longer than this service allows",
                    Some(*retry_after),
                ),
                Error::Permanent {
                    reason: Reason::Quota,
                    ..
                } => (
                    S::TOO_MANY_REQUESTS,
                    "insufficient_quota",
                    "the upstream provider's quota for this service is exhausted",
                    upstream_hint(self),
                ),
                Error::RetriesExhausted { .. } | Error::BudgetExhausted { .. }
                    if is_throttle(reason) =>
                {
                    (
                        S::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "the upstream provider is throttling and the retries ran out",
                        upstream_hint(self),
                    )
                }
                Error::RetriesExhausted {
                    reason: Reason::Timeout,
                    ..
                }
                | Error::BudgetExhausted {
                    reason: Reason::Timeout,
                    ..
                } => (
                    S::GATEWAY_TIMEOUT,
                    "timeout",
                    "every attempt timed out",
                    None,
                ),
                Error::Permanent { .. } => (
                    S::BAD_GATEWAY,
                    "upstream_error",
                    "the upstream provider refused the call for a reason retrying cannot fix",
                    None,
                ),
                _ => (
                    S::BAD_GATEWAY,
                    "upstream_error",
                    "the upstream provider failed",
                    None,
                ),
            };
        ErrorResponse {
            status,
            retry_after: retry_after.filter(|d| !d.is_zero()),
            error_type: Cow::Borrowed(error_type),
            code: Cow::Borrowed(self.kind()),
            reason: Cow::Borrowed(reason.as_str()),
            message: Cow::Borrowed(message),
            param: None,
            kind: self.kind(),
        }
    }
}
