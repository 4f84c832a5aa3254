//! Why a request stops being retried, and what error that answers with.

use std::time::Duration;

use crate::classify::Outcome;
use crate::error::Error;

/// Why the retry layer stops.
#[derive(Clone, Copy)]
pub(super) enum Stop {
    Exhausted,
    Permanent,
    BadRequest,
    Budget,
    Deadline,
    HintTooLong { hint: Duration, limit: Duration },
    NotCloneable,
    Accept,
}

impl Stop {
    /// The error a stop answers with, from the last attempt's.
    pub(super) fn error(self, attempts: u32, outcome: Outcome, err: Error) -> Error {
        let reason = outcome.reason();
        // A typed error from a layer below already says what happened.
        let foreign = matches!(err, Error::Upstream { .. });
        match self {
            Self::Accept => err,
            Self::Permanent if foreign => Error::Permanent {
                reason,
                attempts,
                source: err.into_cause(),
            },
            Self::BadRequest if foreign => Error::BadRequest {
                reason,
                attempts,
                source: err.into_cause(),
            },
            Self::Permanent | Self::BadRequest => err,
            Self::Exhausted => Error::RetriesExhausted {
                attempts,
                reason,
                source: err.into_cause(),
            },
            Self::Budget => Error::BudgetExhausted {
                attempts,
                reason,
                source: err.into_cause(),
            },
            Self::Deadline => Error::DeadlineExceeded {
                attempts,
                source: Some(err.into_cause()),
            },
            Self::HintTooLong { hint, limit } => Error::RetryAfterTooLong {
                retry_after: hint,
                limit,
                attempts,
                source: err.into_cause(),
            },
            Self::NotCloneable => Error::NotCloneable {
                reason,
                source: err.into_cause(),
            },
        }
    }
}
