//! axum integration: what a service built on the crate answers its own
//! callers when a call fails.
//!
//! An axum handler that calls an LLM pipeline returns
//! `Result<_, llm_resilience::Error>`; its callers get a status, a
//! `Retry-After` where a wait is known, and the body OpenAI clients parse,
//! `{"error": {"message", "type", "param", "code"}}` (plus `reason`), so an
//! OpenAI SDK pointed at the service raises its typed exceptions
//! (`RateLimitError` for 429, `InternalServerError` for 5xx, …) and honours
//! the wait.
//!
//! | error | status | `Retry-After` | `error.type` |
//! |---|---|---|---|
//! | [`Error::RateLimited`] (this service's own limit) | 429 | the limiter's wait | `rate_limit_error` |
//! | [`Error::RetriesExhausted`] / [`Error::BudgetExhausted`] on a 429 | 429 | the provider's hint, when it sent one | `rate_limit_error` |
//! | [`Error::Permanent`] for an exhausted quota | 429 | the provider's hint, when it sent one | `insufficient_quota` |
//! | [`Error::RetryAfterTooLong`] on a 429 | 429 | the provider's wait | `rate_limit_error` |
//! | [`Error::RetryAfterTooLong`] otherwise | 503 | the provider's wait | `service_unavailable` |
//! | [`Error::QueueFull`] | 503 | 1 s, or as configured | `server_overloaded` |
//! | [`Error::CircuitOpen`] | 503 | the time to the breaker's next probe | `service_unavailable` |
//! | [`Error::Shutdown`] | 503 | — | `service_unavailable` |
//! | [`Error::Timeout`], [`Error::DeadlineExceeded`], [`Error::QueueTimeout`], retries that all timed out | 504 | — | `timeout` |
//! | [`Error::BadRequest`] | 400 | — | `invalid_request_error` |
//! | anything else (an upstream failure) | 502 | — | `upstream_error` |
//!
//! `error.code` is always [`Error::kind`] (`queue_full`, `circuit_open`,
//! `retries_exhausted`, …) and `error.reason` the stable
//! [`Reason`](crate::classify::Reason) code (`rate_limited`, `quota`,
//! `context_length`, …), both filled for every error. `error.message` is a
//! sentence the crate writes: it never quotes the prompt, the completion or
//! the upstream's own message (which can quote the prompt). `Retry-After` is
//! in whole seconds, rounded up, so a client that waits it never comes back
//! early.
//!
//! # Why a full queue answers 503, not 429
//!
//! 429 tells a client that *it* sent too much; a full queue means the
//! service as a whole is over capacity, whoever sent the load. 503 with
//! `Retry-After` says that, lets a load balancer try another replica, and is
//! still retried by the OpenAI SDKs (they retry 408, 409, 429 and every 5xx,
//! honouring `Retry-After`). A service that prefers 429 changes it in one
//! line with [`ErrorMapping`].
//!
//! # Changing the mapping
//!
//! [`ErrorMapping`] changes statuses, the queue's `Retry-After` and any body
//! field, and is installed once as a layer; handlers do not change.
//!
//! ```
//! use axum::response::IntoResponse;
//! use std::time::Duration;
//!
//! let resp = llm_resilience::Error::circuit_open(Duration::from_millis(2500)).into_response();
//! assert_eq!(resp.status(), 503);
//! assert_eq!(resp.headers()["retry-after"], "3");
//! ```

#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod gateway;
mod mapping;
mod response;

use axum::response::{IntoResponse, Response};

use crate::error::Error;

pub use self::mapping::{
    ErrorMapping, ErrorMappingBuilder, ErrorMappingLayer, ErrorMappingService, MappedResponse,
};
pub use self::response::{ErrorResponse, DEFAULT_QUEUE_FULL_RETRY_AFTER};

impl Error {
    /// The HTTP status this error maps to by default (see the
    /// [module docs](crate::axum)).
    pub fn status_code(&self) -> axum::http::StatusCode {
        self.to_error_response().status
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.to_error_response().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{HttpError, Reason};
    use std::time::Duration;

    async fn body(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn statuses_headers_and_bodies() {
        let resp = Error::RateLimited {
            retry_after: Duration::from_secs(2),
        }
        .into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");

        let resp = Error::QueueFull { depth: 10 }.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
        let json = body(resp).await;
        assert_eq!(json["error"]["code"], "queue_full");
        assert_eq!(json["error"]["reason"], "queue_full");

        let resp = Error::DeadlineExceeded {
            attempts: 2,
            source: None,
        }
        .into_response();
        assert_eq!(resp.status(), 504);

        let resp = Error::BadRequest {
            reason: Reason::ContextLength,
            attempts: 1,
            source: Box::new(HttpError::new(400).with_message("the secret prompt")),
        }
        .into_response();
        assert_eq!(resp.status(), 400);
        let json = body(resp).await;
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["code"], "bad_request");
        assert_eq!(json["error"]["reason"], "context_length");
        assert!(json["error"]["param"].is_null());
        assert!(!json.to_string().contains("secret"));

        let resp = Error::Upstream {
            source: "boom".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 502);
    }

    #[tokio::test]
    async fn throttling_that_outlasted_retries_is_429_with_the_hint() {
        let last = HttpError::new(429)
            .with_error_code("rate_limit_exceeded")
            .with_header("retry-after", "7");
        let err = Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::RateLimited,
            source: Box::new(last),
        };
        let resp = err.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");

        let quota = HttpError::new(429)
            .with_error_code("insufficient_quota")
            .with_header("retry-after", "30");
        let err = Error::Permanent {
            reason: Reason::Quota,
            attempts: 1,
            source: Box::new(quota),
        };
        let resp = err.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "30");
        assert_eq!(body(resp).await["error"]["type"], "insufficient_quota");

        // Without a hint: 429 and no header.
        let err = Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::RateLimited,
            source: Box::new(HttpError::new(429)),
        };
        let resp = err.into_response();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().get("retry-after").is_none());
    }

    #[test]
    fn whole_seconds_round_up_and_never_overflow() {
        use super::response::whole_seconds;
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::MAX), u64::MAX);
    }
}
