//! A per-request report: what the pipeline did for one logical call.
//!
//! ```
//! use llm_resilience::report::with_report;
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = service_fn(|q: &'static str| async move { Ok::<_, std::io::Error>(q.len()) });
//! let (answer, report) = with_report(svc.oneshot("hello")).await;
//! assert_eq!(answer.unwrap(), 5);
//! assert!(!report.degraded);
//! # }
//! ```
//!
//! # Why a task-local, not a response field
//!
//! The report rides beside the call instead of inside the request or the
//! response, so no service's types change for the users who ignore it: a
//! caller who wants it wraps the call in [`with_report`] and gets the report
//! next to the result, on success and on error alike; every other caller
//! pays one thread-local read per recorded decision (nothing on a first-try
//! success through the layers that record only failures and moves). The
//! layers of this crate run in the caller's task (the queue has no worker
//! task), so everything they record lands in the caller's report. Work moved
//! to another task (`tokio::spawn` inside a service) is not seen.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::Reason;

tokio::task_local! {
    static REPORT: RefCell<Report>;
}

/// What happened to one logical call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Each target tried or skipped, in order.
    pub targets: Vec<TargetReport>,
    /// The total time slept in retry backoff, across targets.
    pub backoff: Duration,
    /// How long the request waited in the queue before it was admitted.
    pub queued: Duration,
    /// The target whose answer the caller got, if one answered.
    pub answered_by: Option<Arc<str>>,
    /// Whether the answer came from the degrade step (a cached or canned
    /// answer) rather than from a target.
    pub degraded: bool,
    /// When the call was first polled (to measure the queue wait).
    pub(crate) started: Option<tokio::time::Instant>,
}

/// One target's part in a call.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetReport {
    /// The target's name.
    pub name: Arc<str>,
    /// Calls sent to it (0 when it was skipped or its circuit was open).
    pub attempts: u32,
    /// What came of it.
    pub outcome: TargetOutcome,
}

/// How a target's part in a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetOutcome {
    /// Still in progress (seen only in a report of a call that was dropped).
    Pending,
    /// It answered.
    Answered,
    /// It failed, and the call moved on or stopped, for this reason.
    Failed(Reason),
    /// It was not called, for this reason (for example its circuit was open).
    Skipped(Reason),
}

/// Runs `fut` and returns its output with the [`Report`] of what the
/// crate's layers did for it.
pub async fn with_report<F: Future>(fut: F) -> (F::Output, Report) {
    let (out, cell) = REPORT
        .scope(RefCell::new(Report::default()), async move {
            let out = fut.await;
            let report = REPORT.with(|r| std::mem::take(&mut *r.borrow_mut()));
            (out, report)
        })
        .await;
    (out, cell)
}

/// Whether the current task collects a report.
pub(crate) fn active() -> bool {
    REPORT.try_with(|_| ()).is_ok()
}

/// Records into the current call's report, if the caller asked for one.
pub(crate) fn record(f: impl FnOnce(&mut Report)) {
    let _ = REPORT.try_with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            f(&mut r);
        }
    });
}

impl Report {
    pub(crate) fn start_target(&mut self, name: &Arc<str>) {
        self.targets.push(TargetReport {
            name: name.clone(),
            attempts: 1,
            outcome: TargetOutcome::Pending,
        });
    }

    pub(crate) fn current(&mut self) -> Option<&mut TargetReport> {
        self.targets.last_mut()
    }

    /// Counts one more attempt on the current target and the backoff slept
    /// before it (what a retry layer inside a target reports).
    pub(crate) fn retried(&mut self, delay: Duration) {
        self.backoff = self.backoff.saturating_add(delay);
        if let Some(t) = self.targets.last_mut() {
            t.attempts = t.attempts.saturating_add(1);
        }
    }
}

/// Records a retry event into the current report: a listener to install on
/// a [`RetryLayer`](crate::retry::RetryLayer) so that the report
/// counts attempts and backoff.
pub fn record_retry(event: &crate::retry::RetryEvent) {
    if event.kind == crate::retry::RetryEventKind::Retrying {
        let delay = event.delay.unwrap_or_default();
        record(|r| {
            if r.targets.is_empty() {
                r.targets.push(TargetReport {
                    name: Arc::from("default"),
                    attempts: 1,
                    outcome: TargetOutcome::Pending,
                });
            }
            r.retried(delay)
        });
    }
}
