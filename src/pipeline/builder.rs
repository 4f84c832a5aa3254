//! The builder of [`AgentPipeline`].

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::target::{AttemptTimeout, Estimate, TargetClassifier, Usage};
use super::{
    AgentPipeline, Handles, PipelineQueue, PriorityFn, ReportQueued, TargetService, TargetStack,
};
use crate::breaker::{CircuitBreakerLayer, CircuitBreakerLayerBuilder};
use crate::error::{ConfigError, Error};
use crate::fallback::Fallback;
use crate::guard::{AtResponse, AtStreamEnd, Mode};
use crate::queue::{Priority, QueueLayer, WhenFull};
use crate::ratelimit::{EstimateTokens, RateLimitLayer, RateLimitLayerBuilder, ReadUsage};
use crate::retry::{RetryLayer, RetryLayerBuilder};

type Rewrite<Req> = Arc<dyn Fn(&mut Req) + Send + Sync + 'static>;
type Degrade<Req, Res> = Box<dyn Fn(&Req, &Error) -> Option<Res> + Send + Sync + 'static>;
pub(crate) type RetrySettings = Box<dyn Fn(RetryLayerBuilder) -> RetryLayerBuilder + Send + Sync>;
pub(crate) type BreakerSettings =
    Box<dyn Fn(CircuitBreakerLayerBuilder) -> CircuitBreakerLayerBuilder + Send + Sync>;
pub(crate) type RateLimitSettings =
    Box<dyn Fn(RateLimitLayerBuilder) -> RateLimitLayerBuilder + Send + Sync>;

/// What "no limit of its own" is: a limit no account has (10^12 a minute,
/// the largest the rate limiter takes).
const UNLIMITED: u64 = 1_000_000_000_000;

/// One target as the builder holds it.
pub(crate) struct TargetSpec<C, Req> {
    pub(crate) name: Arc<str>,
    pub(crate) client: C,
    pub(crate) rewrite: Option<Rewrite<Req>>,
    pub(crate) larger: bool,
    /// Per-target settings, applied after the pipeline-wide ones.
    pub(crate) retry: Option<RetrySettings>,
    pub(crate) breaker: Option<BreakerSettings>,
    pub(crate) rate_limit: Option<RateLimitSettings>,
}

impl<C, Req> TargetSpec<C, Req> {
    pub(crate) fn new(name: Arc<str>, client: C) -> Self {
        TargetSpec {
            name,
            client,
            rewrite: None,
            larger: false,
            retry: None,
            breaker: None,
            rate_limit: None,
        }
    }
}

/// The default deadline of one logical call, queue wait and every target
/// included: 5 minutes, several slow LLM calls long (a long completion takes
/// 30–60 s) and well below the 10 minutes the OpenAI SDK allows one attempt.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Builds an [`AgentPipeline`]; every setting has an LLM default.
pub struct AgentPipelineBuilder<C, Req, Res, H = AtResponse> {
    targets: Vec<TargetSpec<C, Req>>,
    capacity: usize,
    concurrency: usize,
    when_full: WhenFull,
    max_wait: Option<Duration>,
    deadline: Duration,
    priority: Option<fn(&Req) -> Priority>,
    retry: Option<RetrySettings>,
    breaker: Option<BreakerSettings>,
    rate_limit: Option<RateLimitSettings>,
    estimate: Estimate<Req>,
    usage: Usage<Res>,
    unknown_target: bool,
    degrade: Option<Degrade<Req, Res>>,
    hold: PhantomData<fn() -> H>,
}

impl<C, Req, Res, H> fmt::Debug for AgentPipelineBuilder<C, Req, Res, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentPipelineBuilder")
            .field(
                "targets",
                &self.targets.iter().map(|t| &*t.name).collect::<Vec<_>>(),
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
            capacity: 1_000,
            concurrency: 32,
            when_full: WhenFull::Wait,
            max_wait: None,
            deadline: DEFAULT_DEADLINE,
            priority: None,
            retry: None,
            breaker: None,
            rate_limit: None,
            estimate: Estimate(None),
            usage: Usage(None),
            unknown_target: false,
            degrade: None,
            hold: PhantomData,
        }
    }
}

impl<C, Req, Res, H> AgentPipelineBuilder<C, Req, Res, H> {
    /// The primary target (tried first): a name for reports, metrics and
    /// health, and its client.
    pub fn target(mut self, name: impl Into<Arc<str>>, client: C) -> Self {
        self.targets.push(TargetSpec::new(name.into(), client));
        self
    }

    #[cfg_attr(not(feature = "config"), allow(dead_code))]
    pub(crate) fn target_spec(mut self, spec: TargetSpec<C, Req>) -> Self {
        self.targets.push(spec);
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
        let mut spec = TargetSpec::new(name.into(), client);
        spec.rewrite = Some(Arc::new(rewrite));
        self.targets.push(spec);
        self
    }

    /// The larger-context target, tried only for requests a target refused
    /// as too long for its context.
    pub fn larger_context(mut self, name: impl Into<Arc<str>>, client: C) -> Self {
        let mut spec = TargetSpec::new(name.into(), client);
        spec.larger = true;
        self.targets.push(spec);
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

    /// Reads a request's class for the queue: time-sensitive work
    /// ([`Priority::High`]) goes ahead of batch work ([`Priority::Low`]),
    /// with aging so that the low class never starves. Default: every
    /// request [`Priority::Normal`].
    pub fn priority_by(mut self, f: fn(&Req) -> Priority) -> Self {
        self.priority = Some(f);
        self
    }

    /// The longest a request waits in the queue (default and at most: the
    /// deadline).
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_wait = Some(wait);
        self
    }

    /// The deadline of one logical call (default [`DEFAULT_DEADLINE`]),
    /// counted from the pipeline's `call`: queue wait, attempts, backoff
    /// sleeps and every target together. A request whose deadline passes in
    /// the queue is never sent, and nothing is sent after it. `Duration::MAX`
    /// means none.
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

    /// Changes each target's rate limit. Each target gets its own limiter,
    /// counted over its own window (a minute by default), starting from
    /// **no limit of its own**: it then only pauses on a 429's hint (every
    /// call to the target waits out the pause, instead of each caller
    /// meeting its own 429) and follows the provider's `x-ratelimit-*`
    /// headers when [`read_usage`](Self::read_usage) reads them. Set your
    /// account's limits here (`r.requests(500).tokens(30_000)`: requests
    /// and tokens per minute) to pace calls before the provider refuses
    /// them; the other knobs keep
    /// [`RateLimitLayer::builder`]'s LLM defaults (wait in line up to a
    /// minute, a tenth of each limit as a burst, 429 hints honoured up to
    /// two minutes). There is no default tier: a tier's limits that are not
    /// your account's would either slow you down or not protect you.
    ///
    /// A call whose wait would outlast the pipeline's deadline (or the
    /// limiter's maximum wait) is not queued: the target is skipped without
    /// an upstream call, the fallback moves on, and the
    /// [report](crate::report) records it as
    /// [`Skipped(RateLimited)`](crate::report::TargetOutcome::Skipped).
    pub fn rate_limit(
        mut self,
        f: impl Fn(RateLimitLayerBuilder) -> RateLimitLayerBuilder + Send + Sync + 'static,
    ) -> Self {
        self.rate_limit = Some(Box::new(f));
        self
    }

    /// Changes the rate limit of the target named `name` (added before),
    /// after the settings of [`rate_limit`](Self::rate_limit):
    /// `.target_rate_limit("gpt-4o", |r| r.requests(500).tokens(30_000))`.
    pub fn target_rate_limit(
        mut self,
        name: &str,
        f: impl Fn(RateLimitLayerBuilder) -> RateLimitLayerBuilder + Send + Sync + 'static,
    ) -> Self {
        match self.targets.iter_mut().find(|t| &*t.name == name) {
            Some(t) => t.rate_limit = Some(Box::new(f)),
            None => self.unknown_target = true,
        }
        self
    }

    /// How the rate limiters estimate a request's tokens before it is sent
    /// (for a token limit): any `Fn(&Req) -> u32`, or
    /// [`ChatEstimate`](crate::ratelimit::ChatEstimate) for the crate's chat
    /// requests. Default: none (a token limit then needs one, and
    /// [`build`](Self::build) says so).
    pub fn estimate_tokens(mut self, estimate: impl EstimateTokens<Req>) -> Self {
        self.estimate = Estimate(Some(Arc::new(estimate)));
        self
    }

    /// How the rate limiters read a response's reported token usage and the
    /// provider's rate-limit headers:
    /// [`Reported`](crate::ratelimit::Reported) for the crate's chat
    /// responses. Default: nothing is read (estimates stand; a 429's hint
    /// still pauses the target).
    pub fn read_usage(mut self, usage: impl ReadUsage<Res>) -> Self {
        self.usage = Usage(Some(Arc::new(usage)));
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

    /// For a client whose response is a stream (a
    /// [`GuardedResponse`](crate::guard::GuardedResponse), such as
    /// `OpenAiClient::streaming()`'s): the queue keeps a call's slot until
    /// its stream ends (completes, fails or is dropped), and each target's
    /// breaker records the outcome then, so a stream cut mid-way counts as
    /// a failure. See [`crate::guard`].
    pub fn hold_until_stream_end(self) -> AgentPipelineBuilder<C, Req, Res, AtStreamEnd> {
        self.release()
    }

    /// The builder with release mode `H2`.
    pub(crate) fn release<H2>(self) -> AgentPipelineBuilder<C, Req, Res, H2> {
        AgentPipelineBuilder {
            targets: self.targets,
            capacity: self.capacity,
            concurrency: self.concurrency,
            when_full: self.when_full,
            max_wait: self.max_wait,
            deadline: self.deadline,
            priority: self.priority,
            retry: self.retry,
            breaker: self.breaker,
            rate_limit: self.rate_limit,
            estimate: self.estimate,
            usage: self.usage,
            unknown_target: self.unknown_target,
            degrade: self.degrade,
            hold: PhantomData,
        }
    }

    /// The pipeline, or the first setting out of range.
    pub fn build(self) -> Result<AgentPipeline<C, Req, Res, H>, ConfigError>
    where
        C: Clone,
        Req: 'static,
        Res: 'static,
        H: Mode,
    {
        if self.targets.iter().all(|t| t.larger) {
            return Err(ConfigError::new("targets", "needs at least one target"));
        }
        if self.deadline.is_zero() {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        if self.unknown_target {
            return Err(ConfigError::new(
                "target_rate_limit",
                "names no target added before it",
            ));
        }
        // The deadline reaches the fallback from the pipeline's `call`
        // (with the request, queue wait included): no timer of its own.
        let mut fallback = Fallback::builder();
        let mut breakers = Vec::new();
        let mut limits = Vec::new();
        if self.targets.iter().filter(|t| t.larger).count() > 1 {
            return Err(ConfigError::new(
                "larger_context",
                "at most one larger-context target",
            ));
        }
        for spec in self.targets {
            let TargetSpec {
                name,
                client,
                rewrite,
                larger,
                retry: target_retry,
                breaker: target_breaker,
                rate_limit: target_limit,
            } = spec;
            let retry_settings = || {
                let mut retry = RetryLayer::builder()
                    .name(name.to_string())
                    .on_event(crate::report::record_retry);
                if let Some(f) = &self.retry {
                    retry = f(retry);
                }
                if let Some(f) = &target_retry {
                    retry = f(retry);
                }
                retry
            };
            // The attempt timeout moves under the rate limiter (a wait for
            // the limiter's turn is not part of an attempt); the retry's
            // own deadline never outlasts the pipeline's.
            let (attempt_timeout, retry_deadline) = retry_settings().build()?.timeouts();
            let mut retry = retry_settings().no_attempt_timeout();
            let deadline = match retry_deadline {
                Some(d) => Some(d.min(self.deadline)),
                None => (self.deadline != Duration::MAX).then_some(self.deadline),
            };
            if let Some(d) = deadline {
                retry = retry.deadline(d);
            }
            let retry = retry.classifier(TargetClassifier::default()).build()?;
            let mut breaker = CircuitBreakerLayer::builder().name(name.to_string());
            if let Some(f) = &self.breaker {
                breaker = f(breaker);
            }
            if let Some(f) = &target_breaker {
                breaker = f(breaker);
            }
            let breaker = breaker
                .map_classifier(|c| TargetClassifier(H::classifier(c)))
                .build()?;
            let mut limit = RateLimitLayer::builder()
                .requests(UNLIMITED)
                .tokens(UNLIMITED)
                .name(name.to_string());
            if let Some(f) = &self.rate_limit {
                limit = f(limit);
            }
            if let Some(f) = &target_limit {
                limit = f(limit);
            }
            let limit = limit
                .estimate_tokens(self.estimate.clone())
                .read_usage(self.usage.clone())
                .build()?;
            let limited_tokens = limit
                .handle()
                .snapshot()
                .token_limit
                .is_some_and(|l| l < UNLIMITED);
            if limited_tokens && self.estimate.0.is_none() {
                return Err(ConfigError::new(
                    "estimate_tokens",
                    "must be set for a token limit (ChatEstimate for the crate's chat requests)",
                ));
            }
            breakers.push((name.clone(), breaker.handle()));
            limits.push((name.clone(), limit.handle()));
            let client = AttemptTimeout::new(client, attempt_timeout);
            let stack: TargetStack<C, Req, Res, H> =
                TargetService::new(retry.layer(breaker.layer(limit.layer(client))));
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
            .priority_by(PriorityFn(self.priority))
            .capacity(self.capacity)
            .concurrency(self.concurrency)
            .when_full(self.when_full)
            .release::<H>();
        // A request waits in the queue at most its deadline (or the shorter
        // max wait): one whose deadline passes there is never sent.
        let max_wait = self.max_wait.unwrap_or(self.deadline).min(self.deadline);
        if max_wait != Duration::MAX {
            queue = queue.max_wait(max_wait);
        }
        let queue = queue.build()?;
        let handles = Handles {
            deadline: self.deadline,
            queue: queue.handle(),
            breakers,
            limits,
        };
        let inner: PipelineQueue<C, Req, Res, H> =
            queue.layer(ReportQueued::new(fallback, handles));
        Ok(AgentPipeline { inner })
    }
}
