//! axum integration: [`Error`] as an HTTP response.
//!
//! An axum handler that calls an LLM pipeline can return
//! `Result<_, llm_resilience::Error>` and its callers get the status that
//! says what happened, with `Retry-After` where a wait is known:
//!
//! | error | status | `Retry-After` |
//! |---|---|---|
//! | [`Error::RateLimited`] | 429 | the limiter's wait |
//! | [`Error::CircuitOpen`], [`Error::RetryAfterTooLong`] | 503 | the wait, rounded up to whole seconds |
//! | [`Error::QueueFull`], [`Error::Shutdown`], [`Error::WorkerGone`] | 503 | — |
//! | [`Error::Timeout`], [`Error::DeadlineExceeded`], [`Error::QueueTimeout`] | 504 | — |
//! | [`Error::BadRequest`] | 400 | — |
//! | anything else (an upstream failure) | 502 | — |
//!
//! The body is `{"error":{"type":…,"reason":…}}` with the stable names of
//! [`Error::kind`] and [`Reason`](crate::classify::Reason): never the
//! upstream's message, which can quote the prompt.
//!
//! ```
//! use axum::response::IntoResponse;
//! use std::time::Duration;
//!
//! let resp = llm_resilience::Error::CircuitOpen { retry_after: Duration::from_millis(2500) }.into_response();
//! assert_eq!(resp.status(), 503);
//! assert_eq!(resp.headers()["retry-after"], "3");
//! ```

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::Error;

impl Error {
    /// The HTTP status this error maps to (see the [module docs](crate::axum)).
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::CircuitOpen { .. }
            | Error::RetryAfterTooLong { .. }
            | Error::QueueFull { .. }
            | Error::Shutdown
            | Error::WorkerGone { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout { .. } | Error::DeadlineExceeded { .. } | Error::QueueTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    fn reason_str(&self) -> Option<&'static str> {
        match self {
            Error::RetriesExhausted { reason, .. }
            | Error::Permanent { reason, .. }
            | Error::BadRequest { reason, .. }
            | Error::BudgetExhausted { reason, .. }
            | Error::NotCloneable { reason, .. } => Some(reason.as_str()),
            _ => None,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "type": self.kind(), "reason": self.reason_str() }
        });
        let mut resp = (self.status_code(), axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up: a client that waits the header's
            // value never comes back early.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
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
        assert!(resp.headers().get("retry-after").is_none());

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
        assert_eq!(json["error"]["type"], "bad_request");
        assert_eq!(json["error"]["reason"], "context_length");
        assert!(!json.to_string().contains("secret"));

        let resp = Error::Upstream {
            source: "boom".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 502);
    }
}
