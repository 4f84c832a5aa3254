//! The crate's one flat error type.
//!
//! Every layer in this crate answers with [`Error`], whatever it wraps and
//! however the layers are stacked, so a caller matches one enum and never
//! downcasts to learn *what happened*.
//!
//! # How stacking keeps it flat
//!
//! Every layer requires only `S::Error: Into<BoxError>` of the service it
//! wraps, and turns the inner error into an [`Error`] with one function,
//! [`Error::from_inner`]: it first tries `BoxError::downcast::<Error>()`. An
//! inner error that is already ours (a breaker's [`Error::CircuitOpen`] seen
//! by the retry layer above it, say) is taken back exactly as it was; anything
//! else becomes [`Error::Upstream`]. So a `Retry` over a `CircuitBreaker` over
//! a client, or the same layers in the other order, all return
//! `llm_resilience::Error` with the breaker's and the retry's variants side by
//! side, never `Error::Upstream(Error::Upstream(..))`.
//!
//! The upstream error itself is kept by value, as a [`BoxError`]; typed access
//! is a downcast helper: [`Error::upstream_ref`] borrows it,
//! [`Error::into_upstream`] takes it out.
//!
//! # Converting
//!
//! [`Error`] implements [`std::error::Error`] (so it converts into
//! [`BoxError`] with `?` or `.into()`), its `Display` is one lowercase line,
//! and [`source`](std::error::Error::source) chains to the upstream error.

use std::time::Duration;

use crate::reason::Reason;

/// A type-erased error, as tower uses (`tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, as one flat enum for every layer of the crate.
///
/// `#[non_exhaustive]`: later layers add variants, so keep a `_ =>` arm;
/// and every variant with fields may gain fields, so match them with `..`
/// (`Error::CircuitOpen { retry_after, .. }`). Other crates make an
/// [`Error`] with [`Error::from_inner`]; the variants are made by the
/// layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The wrapped service failed and the layer that saw it passed the failure
    /// on without a verdict of its own (for example a breaker in front of a
    /// client that returned an error).
    #[error("upstream call failed")]
    #[non_exhaustive]
    Upstream {
        /// The upstream error, by value.
        #[source]
        source: BoxError,
    },

    /// Every allowed attempt failed with a transient error.
    #[error("retries exhausted after {attempts} attempts ({reason})")]
    #[non_exhaustive]
    RetriesExhausted {
        /// How many attempts were made (the first call included).
        attempts: u32,
        /// Why the last attempt failed.
        reason: Reason,
        /// The last attempt's error.
        #[source]
        source: BoxError,
    },

    /// The upstream answered with a failure that retrying cannot fix and that
    /// says the target is unhealthy for this caller (authentication, quota
    /// exhausted, model missing, or `x-should-retry: false`).
    #[error("permanent upstream failure ({reason})")]
    #[non_exhaustive]
    Permanent {
        /// Why the failure is permanent.
        reason: Reason,
        /// How many attempts were made.
        attempts: u32,
        /// The upstream error.
        #[source]
        source: BoxError,
    },

    /// The request itself was refused (context too long, invalid request,
    /// content policy): the target is healthy, retrying is pointless.
    #[error("request rejected by upstream ({reason})")]
    #[non_exhaustive]
    BadRequest {
        /// What was wrong with the request.
        reason: Reason,
        /// How many attempts were made.
        attempts: u32,
        /// The upstream error.
        #[source]
        source: BoxError,
    },

    /// A retry was due but the retry budget had no balance left.
    #[error("retry budget exhausted after {attempts} attempts ({reason})")]
    #[non_exhaustive]
    BudgetExhausted {
        /// How many attempts were made.
        attempts: u32,
        /// Why the last attempt failed.
        reason: Reason,
        /// The last attempt's error.
        #[source]
        source: BoxError,
    },

    /// The overall deadline passed, or the next sleep or attempt could not
    /// finish before it.
    #[error("deadline exceeded after {attempts} attempts")]
    #[non_exhaustive]
    DeadlineExceeded {
        /// How many attempts were made (0 when the request never left a queue).
        attempts: u32,
        /// The last attempt's error, when an attempt had failed.
        #[source]
        source: Option<BoxError>,
    },

    /// The server asked to wait longer than the configured cap on server
    /// hints, or longer than the time left before the deadline; the caller is
    /// told at once instead of sleeping.
    #[error("server asked to retry after {retry_after:?}, beyond the limit of {limit:?}")]
    #[non_exhaustive]
    RetryAfterTooLong {
        /// The server's hint.
        retry_after: Duration,
        /// The limit it exceeded: the hint cap or the time left.
        limit: Duration,
        /// How many attempts were made.
        attempts: u32,
        /// The error that carried the hint.
        #[source]
        source: BoxError,
    },

    /// A retry was due but the request could not be cloned, so it was sent
    /// only once.
    #[error("request could not be cloned for a retry ({reason})")]
    #[non_exhaustive]
    NotCloneable {
        /// Why the one attempt failed.
        reason: Reason,
        /// The attempt's error.
        #[source]
        source: BoxError,
    },

    /// One attempt took longer than the attempt timeout.
    #[error("attempt timed out after {after:?}")]
    #[non_exhaustive]
    Timeout {
        /// The timeout that elapsed.
        after: Duration,
    },

    /// The circuit breaker is open (or half-open with every probe taken): the
    /// call was not made.
    #[error("circuit open, next probe in {retry_after:?}")]
    #[non_exhaustive]
    CircuitOpen {
        /// Time until the breaker admits a probe.
        retry_after: Duration,
    },

    /// The queue was full and is configured to reject.
    #[error("queue full ({depth} waiting)")]
    #[non_exhaustive]
    QueueFull {
        /// How many requests were waiting.
        depth: usize,
    },

    /// The request waited in the queue longer than the maximum queue wait.
    #[error("queue wait exceeded {waited:?}")]
    #[non_exhaustive]
    QueueTimeout {
        /// How long it waited.
        waited: Duration,
    },

    /// A rate limit would be exceeded; the call was not made.
    #[error("rate limited, retry after {retry_after:?}")]
    #[non_exhaustive]
    RateLimited {
        /// Time until capacity is expected.
        retry_after: Duration,
    },

    /// The layer is shutting down and no longer admits or finishes work.
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// Turns an inner service's error into an [`Error`] without nesting: an
    /// error that is already an [`Error`] is returned as it was; anything else
    /// becomes [`Error::Upstream`].
    pub fn from_inner<E: Into<BoxError>>(err: E) -> Self {
        match err.into().downcast::<Error>() {
            Ok(ours) => *ours,
            Err(source) => Error::Upstream { source },
        }
    }

    /// [`Error::CircuitOpen`]: for a middleware of one's own that refuses a
    /// call the way a breaker does.
    pub const fn circuit_open(retry_after: Duration) -> Self {
        Error::CircuitOpen { retry_after }
    }

    /// [`Error::RateLimited`]: for a limiter of one's own.
    pub const fn rate_limited(retry_after: Duration) -> Self {
        Error::RateLimited { retry_after }
    }

    /// [`Error::Timeout`]: for a timeout of one's own around an attempt.
    pub const fn timeout(after: Duration) -> Self {
        Error::Timeout { after }
    }

    /// The upstream error, when this error carries one, by reference.
    ///
    /// Looks through the source chain for a `T` (through our own variants
    /// too), so `err.upstream_ref::<reqwest::Error>()` works whichever layer
    /// produced `err`.
    pub fn upstream_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }

    /// The upstream error, by value, when this error carries one directly
    /// (the variants with a `source` field). Returns `Err(self)` otherwise.
    pub fn into_upstream(self) -> Result<BoxError, Self> {
        match self {
            Error::Upstream { source }
            | Error::RetriesExhausted { source, .. }
            | Error::Permanent { source, .. }
            | Error::BadRequest { source, .. }
            | Error::BudgetExhausted { source, .. }
            | Error::RetryAfterTooLong { source, .. }
            | Error::NotCloneable { source, .. } => Ok(source),
            Error::DeadlineExceeded {
                source: Some(source),
                ..
            } => Ok(source),
            other => Err(other),
        }
    }

    /// The server's or the layer's "try again after" hint, when the error
    /// has one (circuit open, rate limited, hint too long).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::CircuitOpen { retry_after }
            | Error::RateLimited { retry_after }
            | Error::RetryAfterTooLong { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short, stable, lowercase name of the variant, for metrics labels and
    /// log fields (never includes upstream text).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Upstream { .. } => "upstream",
            Error::RetriesExhausted { .. } => "retries_exhausted",
            Error::Permanent { .. } => "permanent",
            Error::BadRequest { .. } => "bad_request",
            Error::BudgetExhausted { .. } => "budget_exhausted",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::RetryAfterTooLong { .. } => "retry_after_too_long",
            Error::NotCloneable { .. } => "not_cloneable",
            Error::Timeout { .. } => "timeout",
            Error::CircuitOpen { .. } => "circuit_open",
            Error::QueueFull { .. } => "queue_full",
            Error::QueueTimeout { .. } => "queue_timeout",
            Error::RateLimited { .. } => "rate_limited",
            Error::Shutdown => "shutdown",
        }
    }

    /// Takes the upstream cause out of `self` for a terminal variant: our
    /// [`Error::Upstream`] is unwrapped (so terminal variants never hold
    /// `Upstream(Upstream(..))`), any other variant is boxed as it is.
    pub(crate) fn into_cause(self) -> BoxError {
        match self {
            Error::Upstream { source } => source,
            other => Box::new(other),
        }
    }
}

/// A configuration value was out of range. Names the field and what is
/// allowed; returned by every builder's `build()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("invalid configuration: `{field}` {problem}")]
pub struct ConfigError {
    /// The builder field, as its method is named.
    pub field: &'static str,
    /// What the value must be, e.g. "must be at least 1".
    pub problem: &'static str,
}

impl ConfigError {
    /// A new error for `field`, saying what was expected.
    pub const fn new(field: &'static str, problem: &'static str) -> Self {
        Self { field, problem }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[test]
    fn from_inner_takes_our_own_error_back_unchanged() {
        let inner: BoxError = Box::new(Error::CircuitOpen {
            retry_after: Duration::from_secs(3),
        });
        match Error::from_inner(inner) {
            Error::CircuitOpen { retry_after } => assert_eq!(retry_after, Duration::from_secs(3)),
            other => panic!("nested or changed: {other:?}"),
        }
    }

    #[test]
    fn from_inner_wraps_foreign_errors_once() {
        let err = Error::from_inner(Boom);
        assert!(matches!(err, Error::Upstream { .. }));
        assert!(err.upstream_ref::<Boom>().is_some());
        let err = Error::from_inner(Box::new(Boom) as BoxError);
        assert!(matches!(err, Error::Upstream { .. }));
    }

    #[test]
    fn display_is_one_lowercase_line_and_source_chains() {
        let err = Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::Overloaded,
            source: Box::new(Boom),
        };
        let text = err.to_string();
        assert_eq!(text, "retries exhausted after 3 attempts (overloaded)");
        assert!(!text.contains('\n'));
        assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "boom");
        let boxed: BoxError = err.into();
        assert!(boxed.downcast_ref::<Error>().is_some());
    }

    #[test]
    fn into_cause_unwraps_upstream() {
        let cause = Error::Upstream {
            source: Box::new(Boom),
        }
        .into_cause();
        assert!(cause.downcast_ref::<Boom>().is_some());
        let cause = Error::Timeout {
            after: Duration::from_secs(1),
        }
        .into_cause();
        assert!(cause.downcast_ref::<Error>().is_some());
    }
}
