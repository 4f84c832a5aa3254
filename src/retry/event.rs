//! What the retry layer decided: the event hook's type, and where every
//! decision goes (the hook, and the `metrics` counters).

use std::time::Duration;

use super::layer::Config;
use super::stop::Stop;
use crate::classify::Reason;

/// What the retry layer decided, for the [event hook](super::RetryLayerBuilder::on_event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// What happened.
    pub kind: RetryEventKind,
    /// The attempt the decision follows (1 for the first call).
    pub attempt: u32,
    /// Why the attempt failed ([`Reason::Ok`] for a success).
    pub reason: Reason,
    /// The wait before the next attempt, for [`RetryEventKind::Retrying`].
    pub delay: Option<Duration>,
}

/// The kinds of [`RetryEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryEventKind {
    /// Another attempt follows after `delay`.
    Retrying,
    /// An attempt after the first succeeded.
    Recovered,
    /// Every attempt was used.
    Exhausted,
    /// A permanent failure stopped the request.
    Permanent,
    /// A bad request stopped the request.
    BadRequest,
    /// The budget refused the retry.
    BudgetExhausted,
    /// The deadline left no room for another attempt.
    DeadlineExceeded,
    /// The server's hint was beyond the cap or the deadline.
    RetryAfterTooLong,
    /// The request could not be cloned, so it is sent only once.
    NotCloneable,
}

impl RetryEventKind {
    /// A stable `snake_case` name, for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            RetryEventKind::Retrying => "retrying",
            RetryEventKind::Recovered => "recovered",
            RetryEventKind::Exhausted => "exhausted",
            RetryEventKind::Permanent => "permanent",
            RetryEventKind::BadRequest => "bad_request",
            RetryEventKind::BudgetExhausted => "budget_exhausted",
            RetryEventKind::DeadlineExceeded => "deadline_exceeded",
            RetryEventKind::RetryAfterTooLong => "retry_after_too_long",
            RetryEventKind::NotCloneable => "not_cloneable",
        }
    }
}

/// Tells the hook and the metrics of one decision.
pub(super) fn emit<C, K>(
    config: &Config<C, K>,
    kind: RetryEventKind,
    attempt: u32,
    reason: Reason,
    delay: Option<Duration>,
) {
    if let Some(listener) = &config.listener {
        listener(&RetryEvent {
            kind,
            attempt,
            reason,
            delay,
        });
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(
            "llm_resilience_retry_decisions_total",
            "retry" => config.name.clone(),
            "decision" => kind.as_str(),
            "reason" => reason.as_str()
        )
        .increment(1);
        if let Some(budget) = &config.budget {
            metrics::gauge!("llm_resilience_retry_budget_balance", "retry" => config.name.clone())
                .set(budget.balance());
        }
    }
}

/// The event kind of a decision to stop.
pub(super) fn stop_kind(stop: Stop) -> RetryEventKind {
    match stop {
        Stop::Exhausted => RetryEventKind::Exhausted,
        Stop::Permanent | Stop::Accept => RetryEventKind::Permanent,
        Stop::BadRequest => RetryEventKind::BadRequest,
        Stop::Budget => RetryEventKind::BudgetExhausted,
        Stop::Deadline => RetryEventKind::DeadlineExceeded,
        Stop::HintTooLong { .. } => RetryEventKind::RetryAfterTooLong,
        Stop::NotCloneable => RetryEventKind::NotCloneable,
    }
}
