//! The job queue's error type.

use std::time::Duration;

/// What went wrong talking to the job queue.
///
/// `#[non_exhaustive]`: keep a `_ =>` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisQueueError {
    /// Redis could not be reached or answered with an error (connection
    /// refused, timed out, dropped, or a server error). The connection
    /// reconnects by itself; the call may be repeated.
    #[error("redis error: {source}")]
    Redis {
        /// The client's error.
        #[from]
        source: redis::RedisError,
    },

    /// The job could not be serialized (to JSON) for enqueueing.
    #[error("job does not serialize: {source}")]
    Serialize {
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// The serialized job is larger than the queue's `max_payload_bytes`.
    #[error("job payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The serialized size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A stored entry or result does not have the shape this crate writes
    /// (a field missing, not UTF-8, not a number): written by something
    /// else, or by an incompatible version.
    #[error("malformed stored entry {entry}: {reason}")]
    Malformed {
        /// The stream entry id or key.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A job or a result does not deserialize into the type asked for.
    #[error("job {job} does not deserialize: {source}")]
    Deserialize {
        /// The job id.
        job: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// No outcome was recorded for the job within the time waited.
    #[error("no outcome for job {job} within {waited:?}")]
    WaitTimedOut {
        /// The job id.
        job: String,
        /// How long the caller waited.
        waited: Duration,
    },
}

impl RedisQueueError {
    pub(crate) fn malformed(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Malformed {
            entry: entry.into(),
            reason: reason.into(),
        }
    }
}
