//! The builder of [`Fallback`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{Degrade, Fallback, FallbackEvent, Listener, Rewrite, Shared, Target};
use crate::error::{ConfigError, Error};

/// Builds a [`Fallback`]: targets in order, an optional larger-context
/// target, an optional degrade step and an overall deadline.
pub struct FallbackBuilder<S, Req, Res> {
    targets: Vec<Target<S, Req>>,
    larger: Option<usize>,
    degrade: Option<Degrade<Req, Res>>,
    deadline: Option<Duration>,
    listener: Option<Listener>,
}

impl<S, Req, Res> fmt::Debug for FallbackBuilder<S, Req, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBuilder")
            .field(
                "targets",
                &self.targets.iter().map(|t| &*t.name).collect::<Vec<_>>(),
            )
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, Req, Res> Default for FallbackBuilder<S, Req, Res> {
    fn default() -> Self {
        FallbackBuilder {
            targets: Vec::new(),
            larger: None,
            degrade: None,
            deadline: None,
            listener: None,
        }
    }
}

impl<S, Req, Res> FallbackBuilder<S, Req, Res> {
    /// Adds a target, tried after the ones added before it.
    pub fn target(mut self, name: impl Into<Arc<str>>, service: S) -> Self {
        self.targets.push(Target {
            name: name.into(),
            service,
            rewrite: None,
        });
        self
    }

    /// Adds a target whose request is rewritten first (its model name, its
    /// `max_tokens`, …).
    pub fn target_with(
        mut self,
        name: impl Into<Arc<str>>,
        service: S,
        rewrite: impl Fn(&mut Req) + Send + Sync + 'static,
    ) -> Self {
        self.targets.push(Target {
            name: name.into(),
            service,
            rewrite: Some(Arc::new(rewrite) as Rewrite<Req>),
        });
        self
    }

    pub(crate) fn target_rewritten(
        mut self,
        name: Arc<str>,
        service: S,
        rewrite: Option<Rewrite<Req>>,
    ) -> Self {
        self.targets.push(Target {
            name,
            service,
            rewrite,
        });
        self
    }

    /// Adds the larger-context target: tried only when a target answers that
    /// the request does not fit its context (never in the normal order).
    pub fn larger_context(
        mut self,
        name: impl Into<Arc<str>>,
        service: S,
        rewrite: Option<Rewrite<Req>>,
    ) -> Self {
        self.larger = Some(self.targets.len());
        self.targets.push(Target {
            name: name.into(),
            service,
            rewrite,
        });
        self
    }

    /// The last resort when every target failed with an error another target
    /// could have fixed: a cached or canned answer, or `None` to return the
    /// last error. The report marks such an answer as degraded.
    pub fn degrade(
        mut self,
        f: impl Fn(&Req, &Error) -> Option<Res> + Send + Sync + 'static,
    ) -> Self {
        self.degrade = Some(Arc::new(f));
        self
    }

    /// The overall deadline across every target: nothing is sent after it,
    /// and a call in flight when it passes ends with
    /// [`Error::DeadlineExceeded`]. No deadline by default (the pipeline
    /// sets one); `Duration::MAX` means none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Calls `f` for every decision (synchronously, in the caller's task).
    pub fn on_event(mut self, f: impl Fn(&FallbackEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// The fallback service.
    pub fn build(self) -> Result<Fallback<S, Req, Res>, ConfigError> {
        let normal = self.targets.len() - usize::from(self.larger.is_some());
        if normal == 0 {
            return Err(ConfigError::new("targets", "needs at least one target"));
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        let (services, targets): (Vec<S>, Vec<_>) = self
            .targets
            .into_iter()
            .map(|t| (t.service, (t.name, t.rewrite)))
            .unzip();
        #[cfg(feature = "metrics")]
        let answered = targets
            .iter()
            .map(|(name, _)| {
                metrics::counter!(
                    "llm_resilience_fallback_decisions_total",
                    "target" => name.to_string(),
                    "decision" => super::FallbackEventKind::Answered.as_str(),
                    "reason" => crate::classify::Reason::Ok.as_str(),
                )
            })
            .collect();
        Ok(Fallback {
            shared: Arc::new(Shared {
                services,
                targets,
                larger: self.larger,
                degrade: self.degrade,
                deadline: self.deadline.filter(|d| *d != Duration::MAX),
                listener: self.listener,
                #[cfg(feature = "metrics")]
                answered,
            }),
        })
    }
}
