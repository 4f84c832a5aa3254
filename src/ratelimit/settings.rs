//! The limiter's validated configuration, shared by every key's limiter.

use std::borrow::Cow;
use std::time::Duration;

use super::event::{emit, Listener, RateLimitEventKind as Kind};
use crate::classify::LlmClassifier;

/// What to do when a call cannot go at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenLimited {
    /// Wait in line (first come, first served) for at most this long; a call
    /// that would wait longer fails with
    /// [`Error::RateLimited`](crate::Error::RateLimited).
    Wait {
        /// The longest a call waits.
        max_wait: Duration,
    },
    /// Fail at once with [`Error::RateLimited`](crate::Error::RateLimited),
    /// carrying the wait the call would have had.
    Reject,
}

/// The validated configuration, shared by every key's limiter.
pub(crate) struct Settings {
    pub(crate) window: u64,
    pub(crate) requests: Option<(u64, u64)>,
    pub(crate) tokens: Option<(u64, u64)>,
    pub(crate) when_limited: WhenLimited,
    pub(crate) hint_cap: Duration,
    pub(crate) server_window: Option<u64>,
    pub(crate) name: Cow<'static, str>,
    pub(crate) listener: Option<Listener>,
    pub(crate) classifier: LlmClassifier,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("window", &Duration::from_nanos(self.window))
            .field("requests", &self.requests)
            .field("tokens", &self.tokens)
            .field("when_limited", &self.when_limited)
            .field("hint_cap", &self.hint_cap)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub(crate) fn emit(&self, kind: Kind, waited: Option<Duration>, retry: Option<Duration>) {
        emit(&self.name, self.listener.as_ref(), kind, waited, retry);
    }
}
