//! The builder of [`AgentPipeline`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{AgentPipeline, Handles, PipelineQueue, ReportQueued, TargetStack};
use crate::breaker::{CircuitBreakerLayer, CircuitBreakerLayerBuilder};
use crate::error::{ConfigError, Error};
use crate::fallback::Fallback;
use crate::queue::{QueueLayer, WhenFull};
use crate::retry::{RetryLayer, RetryLayerBuilder};

type Rewrite<Req> = Arc<dyn Fn(&mut Req) + Send + Sync + 'static>;
type Degrade<Req, Res> = Box<dyn Fn(&Req, &Error) -> Option<Res> + Send + Sync + 'static>;
type RetrySettings = Box<dyn Fn(RetryLayerBuilder) -> RetryLayerBuilder + Send + Sync>;
type BreakerSettings =
    Box<dyn Fn(CircuitBreakerLayerBuilder) -> CircuitBreakerLayerBuilder + Send + Sync>;

/// The default deadline of one logical call, queue wait and every target
/// included: 5 minutes, several slow LLM calls long (a long completion takes
/// 30–60 s) and well below the 10 minutes the OpenAI SDK allows one attempt.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Builds an [`AgentPipeline`]; every setting has an LLM default.
pub struct AgentPipelineBuilder<C, Req, Res> {
    targets: Vec<(Arc<str>, C, Option<Rewrite<Req>>)>,
    larger: Option<(Arc<str>, C, Option<Rewrite<Req>>)>,
    capacity: usize,
    concurrency: usize,
    when_full: WhenFull,
    max_wait: Option<Duration>,
    deadline: Duration,
    retry: Option<RetrySettings>,
    breaker: Option<BreakerSettings>,
    degrade: Option<Degrade<Req, Res>>,
}

impl<C, Req, Res> fmt::Debug for AgentPipelineBuilder<C, Req, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentPipelineBuilder")
            .field(
                "targets",
                &self.targets.iter().map(|t| &*t.0).collect::<Vec<_>>(),
            )
            .field("capacity", &self.capacity)
            .field("concurrency", &self.concurrency)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<C, Req, Res> Default for AgentPipelineBuilder<C, Req, Res> {
    fn default() -> Self {
        AgentPipelineBuilder {
            targets: Vec::new(),
            larger: None,
            capacity: 1_000,
            concurrency: 32,
            when_full: WhenFull::Wait,
            max_wait: None,
            deadline: DEFAULT_DEADLINE,
            retry: None,
            breaker: None,
            degrade: None,
        }
    }
}

impl<C, Req, Res> AgentPipelineBuilder<C, Req, Res> {
    /// The primary target (tried first): a name for reports, metrics and
    /// health, and its client.
    pub fn target(mut self, name: impl Into<Arc<str>>, client: C) -> Self {
        self.targets.push((name.into(), client, None));
        self
    }

    /// A fallback target, tried after the ones added before it.
    pub fn fallback(self, name: impl Into<Arc<str>>, client: C) -> Self {
        self.target(name, client)
    }

    /// A target whose requests are rewritten first (its model name, …).
    pub fn target_with(
        mut self,
        name: impl Into<Arc<str>>,
        client: C,
        rewrite: impl Fn(&mut Req) + Send + Sync + 'static,
    ) -> Self {
        self.targets
            .push((name.into(), client, Some(Arc::new(rewrite))));
        self
    }

    /// The larger-context target, tried only for requests a target refused
    /// as too long for its context.
    pub fn larger_context(mut self, name: impl Into<Arc<str>>, client: C) -> Self {
        self.larger = Some((name.into(), client, None));
        self
    }

    /// The queue's bounds: `capacity` requests may wait, `concurrency` are in
    /// flight (defaults 1 000 and 32).
    pub fn queue(mut self, capacity: usize, concurrency: usize) -> Self {
        self.capacity = capacity;
        self.concurrency = concurrency;
        self
    }

    /// Reject at once when the queue is full, instead of waiting (the
    /// default).
    pub fn reject_when_full(mut self) -> Self {
        self.when_full = WhenFull::Reject;
        self
    }

    /// The longest a request waits in the queue (default and at most: the
    /// deadline).
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_wait = Some(wait);
        self
    }

    /// The deadline of one logical call (default [`DEFAULT_DEADLINE`]): a
    /// request waits in the queue at most this long, and once admitted its
    /// attempts, backoff sleeps and targets together take at most this long
    /// (so a caller waits at most twice the deadline, and only when the
    /// queue was full for most of it). `Duration::MAX` means none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Changes each target's retry settings, starting from
    /// [`RetryLayer::builder`]'s LLM defaults.
    pub fn retry(
        mut self,
        f: impl Fn(RetryLayerBuilder) -> RetryLayerBuilder + Send + Sync + 'static,
    ) -> Self {
        self.retry = Some(Box::new(f));
        self
    }

    /// Changes each target's breaker settings, starting from
    /// [`CircuitBreakerLayer::builder`]'s LLM defaults. Each target gets its
    /// own breaker.
    pub fn breaker(
        mut self,
        f: impl Fn(CircuitBreakerLayerBuilder) -> CircuitBreakerLayerBuilder + Send + Sync + 'static,
    ) -> Self {
        self.breaker = Some(Box::new(f));
        self
    }

    /// The last resort when every target failed: see
    /// [`FallbackBuilder::degrade`](crate::fallback::FallbackBuilder::degrade).
    pub fn degrade(
        mut self,
        f: impl Fn(&Req, &Error) -> Option<Res> + Send + Sync + 'static,
    ) -> Self {
        self.degrade = Some(Box::new(f));
        self
    }

    /// The pipeline, or the first setting out of range.
    pub fn build(self) -> Result<AgentPipeline<C, Req, Res>, ConfigError>
    where
        C: Clone,
        Req: 'static,
        Res: 'static,
    {
        if self.targets.is_empty() {
            return Err(ConfigError::new("targets", "needs at least one target"));
        }
        if self.deadline.is_zero() {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        let mut fallback = Fallback::builder().deadline(self.deadline);
        let mut breakers = Vec::new();
        let all = self
            .targets
            .into_iter()
            .map(|t| (t, false))
            .chain(self.larger.map(|t| (t, true)));
        for ((name, client, rewrite), larger) in all {
            let mut retry = RetryLayer::builder().on_event(crate::report::record_retry);
            if let Some(f) = &self.retry {
                retry = f(retry);
            }
            let retry = retry.build()?;
            let mut breaker = CircuitBreakerLayer::builder();
            if let Some(f) = &self.breaker {
                breaker = f(breaker);
            }
            let breaker = breaker.build()?;
            breakers.push((name.clone(), breaker.handle()));
            let stack: TargetStack<C> = retry.layer(breaker.layer(client));
            fallback = if larger {
                fallback.larger_context(name, stack, rewrite)
            } else {
                fallback.target_rewritten(name, stack, rewrite)
            };
        }
        if let Some(degrade) = self.degrade {
            fallback = fallback.degrade(degrade);
        }
        let fallback = fallback.build()?;
        let mut queue = QueueLayer::builder()
            .capacity(self.capacity)
            .concurrency(self.concurrency)
            .when_full(self.when_full);
        // A request waits in the queue at most its deadline (or the shorter
        // max wait): one whose deadline passes there is never sent.
        let max_wait = self.max_wait.unwrap_or(self.deadline).min(self.deadline);
        if max_wait != Duration::MAX {
            queue = queue.max_wait(max_wait);
        }
        let queue = queue.build()?;
        let handles = Arc::new(Handles {
            queue: queue.handle(),
            breakers,
        });
        let inner: PipelineQueue<C, Req, Res> = queue.layer(ReportQueued { inner: fallback });
        Ok(AgentPipeline { inner, handles })
    }
}
