//! What the fallback decided, for listeners, tracing and metrics.

use std::sync::Arc;

use crate::classify::Reason;

/// One decision of a [`Fallback`](super::Fallback).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FallbackEvent {
    /// What happened.
    pub kind: FallbackEventKind,
    /// The target it happened to.
    pub target: Arc<str>,
    /// Why (the failure's reason; [`Reason::Ok`] for an answer).
    pub reason: Reason,
}

/// The kinds of [`FallbackEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FallbackEventKind {
    /// The target answered.
    Answered,
    /// The target failed or was skipped and the next one is tried.
    MovedOn,
    /// The target failed with a context-length error and the larger-context
    /// target is tried.
    ToLargerContext,
    /// The target's failure stops the call (a bad request no target can fix).
    Stopped,
    /// Every target failed and the degrade step answered.
    Degraded,
    /// The overall deadline passed; nothing more is sent.
    DeadlineExceeded,
}

impl FallbackEventKind {
    /// A stable `snake_case` name, for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            FallbackEventKind::Answered => "answered",
            FallbackEventKind::MovedOn => "moved_on",
            FallbackEventKind::ToLargerContext => "to_larger_context",
            FallbackEventKind::Stopped => "stopped",
            FallbackEventKind::Degraded => "degraded",
            FallbackEventKind::DeadlineExceeded => "deadline_exceeded",
        }
    }
}
