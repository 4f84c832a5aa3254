//! Variants of [`Error`] that only the crate's layers make, for tests of
//! code that handles every variant (an axum handler, a metrics exporter).
//!
//! The variants' fields are `#[non_exhaustive]` (they may grow), so code
//! outside the crate cannot write them as struct expressions. Outside
//! tests, [`Error::from_inner`], [`Error::circuit_open`],
//! [`Error::rate_limited`] and [`Error::timeout`] make the ones a
//! middleware of one's own may answer with.

use std::time::Duration;

use crate::classify::Reason;
use crate::error::{BoxError, Error};

/// [`Error::QueueTimeout`].
pub fn queue_timeout(waited: Duration) -> Error {
    Error::QueueTimeout { waited }
}

/// [`Error::QueueFull`].
pub fn queue_full(depth: usize) -> Error {
    Error::QueueFull { depth }
}

/// [`Error::NotCloneable`].
pub fn not_cloneable(reason: Reason, source: BoxError) -> Error {
    Error::NotCloneable { reason, source }
}

/// [`Error::RetryAfterTooLong`].
pub fn retry_after_too_long(
    retry_after: Duration,
    limit: Duration,
    attempts: u32,
    source: BoxError,
) -> Error {
    Error::RetryAfterTooLong {
        retry_after,
        limit,
        attempts,
        source,
    }
}

/// [`Error::BudgetExhausted`].
pub fn budget_exhausted(attempts: u32, reason: Reason, source: BoxError) -> Error {
    Error::BudgetExhausted {
        attempts,
        reason,
        source,
    }
}

/// [`Error::RetriesExhausted`].
pub fn retries_exhausted(attempts: u32, reason: Reason, source: BoxError) -> Error {
    Error::RetriesExhausted {
        attempts,
        reason,
        source,
    }
}

/// [`Error::Permanent`].
pub fn permanent(reason: Reason, attempts: u32, source: BoxError) -> Error {
    Error::Permanent {
        reason,
        attempts,
        source,
    }
}

/// [`Error::BadRequest`].
pub fn bad_request(reason: Reason, attempts: u32, source: BoxError) -> Error {
    Error::BadRequest {
        reason,
        attempts,
        source,
    }
}

/// [`Error::DeadlineExceeded`].
pub fn deadline_exceeded(attempts: u32, source: Option<BoxError>) -> Error {
    Error::DeadlineExceeded { attempts, source }
}
