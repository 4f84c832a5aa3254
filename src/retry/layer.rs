//! [`RetryLayer`] and its builder.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{Retry, RetryEvent, UseClone};
use crate::backoff::Backoff;
use crate::budget::RetryBudget;
use crate::classify::LlmClassifier;
use crate::error::ConfigError;

/// The attempt timeout of [`RetryLayer::llm_defaults`]: 120 s.
pub const LLM_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The deadline of [`RetryLayer::llm_defaults`]: 5 min for a logical call,
/// its attempts and its sleeps.
pub const LLM_DEADLINE: Duration = Duration::from_secs(300);

pub(crate) type Listener = crate::util::listener::Listener<RetryEvent>;

/// Everything a [`Retry`] decides with; shared by every clone in one `Arc`.
pub(crate) struct Config<C, K> {
    pub(crate) max_attempts: u32,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) classifier: C,
    pub(crate) clone: K,
    pub(crate) backoff: Backoff,
    pub(crate) throttle_backoff: Backoff,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) hint_cap: Duration,
    pub(crate) hint_jitter: f64,
    pub(crate) listener: Option<Listener>,
    // The `retry` label of the metrics.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) name: Cow<'static, str>,
    pub(crate) seed: u64,
    pub(crate) sequence: AtomicU64,
}

/// Retries transient failures of the wrapped service; see the
/// [module docs](crate::retry).
///
/// Clones share one configuration and one [`RetryBudget`].
pub struct RetryLayer<C = LlmClassifier, K = UseClone> {
    config: Arc<Config<C, K>>,
}

impl<C, K> Clone for RetryLayer<C, K> {
    fn clone(&self) -> Self {
        Self {
            config: Arc::clone(&self.config),
        }
    }
}

impl<C, K> fmt::Debug for RetryLayer<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("RetryLayer")
            .field("max_attempts", &c.max_attempts)
            .field("attempt_timeout", &c.attempt_timeout)
            .field("deadline", &c.deadline)
            .field("backoff", &c.backoff)
            .field("throttle_backoff", &c.throttle_backoff)
            .field("budget", &c.budget)
            .field("hint_cap", &c.hint_cap)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// The LLM defaults: 3 attempts (the OpenAI and Anthropic SDKs' 2
    /// retries), [`Backoff::llm_defaults`], [`Backoff::llm_throttling`] for
    /// rate limits without a hint, server hints honoured up to 120 s (the
    /// OpenAI SDK's cap) with 10 % jitter, Finagle's default retry budget
    /// (ratio 0.2, 10 per second, 10 s), the [`LlmClassifier`], and:
    ///
    /// - an attempt timeout of [`LLM_ATTEMPT_TIMEOUT`] (120 s): a
    ///   non-streamed completion of a few thousand tokens at the 30 to 100
    ///   tokens per second that hosted models generate fits in it, and a
    ///   hung attempt is retried after 2 minutes instead of the 10 minutes
    ///   of the OpenAI and Anthropic SDKs' request timeout;
    /// - a deadline of [`LLM_DEADLINE`] (5 min) for the whole logical call,
    ///   sleeps included: with the SDKs' 10-minute timeout and 2 retries one
    ///   call can take half an hour, which an agent in a loop cannot wait.
    ///   LiteLLM's router likewise bounds a call and its retries with one
    ///   timeout.
    ///
    /// Reasoning models that think for minutes want a longer attempt
    /// timeout (or streaming, whose attempt ends when the response starts).
    pub fn llm_defaults() -> Self {
        Self::builder()
            .build()
            .expect("the LLM defaults are a valid configuration")
    }

    /// A builder starting from [`RetryLayer::llm_defaults`].
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder {
            max_attempts: 3,
            attempt_timeout: Some(LLM_ATTEMPT_TIMEOUT),
            attempt_timeout_set: false,
            deadline: Some(LLM_DEADLINE),
            classifier: LlmClassifier::new(),
            clone: UseClone,
            backoff: Backoff::llm_defaults(),
            throttle_backoff: Backoff::llm_throttling(),
            budget: Some(RetryBudget::default()),
            hint_cap: Duration::from_secs(120),
            hint_jitter: 0.1,
            listener: None,
            name: Cow::Borrowed("default"),
            seed: None,
        }
    }
}

impl<C, K> RetryLayer<C, K> {
    /// The attempt timeout and the deadline in force (for the agent
    /// pipeline, which moves the attempt timeout under its rate limiter).
    pub(crate) fn timeouts(&self) -> (Option<Duration>, Option<Duration>) {
        (self.config.attempt_timeout, self.config.deadline)
    }

    /// The shared retry budget, if one is configured (to read its balance).
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.config.budget.as_ref()
    }
}

impl<S, C, K> Layer<S> for RetryLayer<C, K> {
    type Service = Retry<S, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_config(inner, Arc::clone(&self.config))
    }
}

/// Builds a validated [`RetryLayer`]; every knob starts at its LLM default.
pub struct RetryLayerBuilder<C = LlmClassifier, K = UseClone> {
    max_attempts: u32,
    attempt_timeout: Option<Duration>,
    // Whether `attempt_timeout` was chosen (else it is the default, which a
    // shorter deadline lowers instead of being refused).
    attempt_timeout_set: bool,
    deadline: Option<Duration>,
    classifier: C,
    clone: K,
    backoff: Backoff,
    throttle_backoff: Backoff,
    budget: Option<RetryBudget>,
    hint_cap: Duration,
    hint_jitter: f64,
    listener: Option<Listener>,
    name: Cow<'static, str>,
    seed: Option<u64>,
}

impl<C, K> fmt::Debug for RetryLayerBuilder<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayerBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<C, K> RetryLayerBuilder<C, K> {
    /// Attempts in all, the first call included. At least 1 (1 disables
    /// retrying). Default 3.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Time allowed for each attempt; an attempt that takes longer is dropped
    /// and counts as a transient [`Timeout`](crate::Error::Timeout). Above
    /// zero; a duration too long for the clock (`Duration::MAX`) means no
    /// limit. Default [`LLM_ATTEMPT_TIMEOUT`] (120 s).
    pub fn attempt_timeout(mut self, t: Duration) -> Self {
        self.attempt_timeout = Some(t);
        self.attempt_timeout_set = true;
        self
    }

    /// No attempt timeout: an attempt takes as long as the inner service.
    pub fn no_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = None;
        self.attempt_timeout_set = true;
        self
    }

    /// Time allowed for the whole logical request: attempts and sleeps. A
    /// sleep or attempt that cannot finish before it is not started; the
    /// last attempt is cut at it. Above zero and at least the attempt
    /// timeout; a duration too long for the clock (`Duration::MAX`) means
    /// no limit. Default [`LLM_DEADLINE`] (5 min).
    pub fn deadline(mut self, t: Duration) -> Self {
        self.deadline = Some(t);
        self
    }

    /// No deadline: only the attempts, the attempt timeout and the sleeps
    /// bound a request.
    pub fn no_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Backoff for transient failures without a server hint.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Backoff for rate limits and overloads without a server hint.
    pub fn throttle_backoff(mut self, b: Backoff) -> Self {
        self.throttle_backoff = b;
        self
    }

    /// The retry budget, shared by every clone of the layer.
    pub fn budget(mut self, b: RetryBudget) -> Self {
        self.budget = Some(b);
        self
    }

    /// No retry budget: only `max_attempts` bounds retries.
    pub fn no_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// The longest server hint honoured; a longer one ends the request at
    /// once with [`RetryAfterTooLong`](crate::Error::RetryAfterTooLong).
    /// Any duration (`Duration::MAX` honours every hint). Default 120 s (the
    /// OpenAI SDK's cap).
    pub fn hint_cap(mut self, cap: Duration) -> Self {
        self.hint_cap = cap;
        self
    }

    /// Jitter added to a server hint, as a fraction of it: a hint `h` waits
    /// `U[h, h · (1 + ratio))`, so callers released together do not
    /// stampede. 0 to 1, default 0.1 (Envoy uses 0.5).
    pub fn hint_jitter(mut self, ratio: f64) -> Self {
        self.hint_jitter = ratio;
        self
    }

    /// Seeds the jitter generators, for reproducible runs. Each logical
    /// request draws from its own stream derived from this seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Called for every retry decision (never on a first-attempt success).
    /// Runs on the caller's task; keep it short.
    pub fn on_event(mut self, f: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// The layer's name: the `retry` label of its metrics (default
    /// `"default"`; the agent pipeline names each target's retry after the
    /// target).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The classifier that decides what to retry.
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayerBuilder<C2, K> {
        RetryLayerBuilder {
            max_attempts: self.max_attempts,
            attempt_timeout: self.attempt_timeout,
            attempt_timeout_set: self.attempt_timeout_set,
            deadline: self.deadline,
            classifier,
            clone: self.clone,
            backoff: self.backoff,
            throttle_backoff: self.throttle_backoff,
            budget: self.budget,
            hint_cap: self.hint_cap,
            hint_jitter: self.hint_jitter,
            listener: self.listener,
            name: self.name,
            seed: self.seed,
        }
    }

    /// How requests are cloned for retries: a [`CloneRequest`](super::CloneRequest), such as a
    /// closure `Fn(&Req) -> Option<Req>` that returns `None` for a request
    /// that cannot be cloned. Default: [`UseClone`].
    pub fn clone_requests<K2>(self, clone: K2) -> RetryLayerBuilder<C, K2> {
        RetryLayerBuilder {
            max_attempts: self.max_attempts,
            attempt_timeout: self.attempt_timeout,
            attempt_timeout_set: self.attempt_timeout_set,
            deadline: self.deadline,
            classifier: self.classifier,
            clone,
            backoff: self.backoff,
            throttle_backoff: self.throttle_backoff,
            budget: self.budget,
            hint_cap: self.hint_cap,
            hint_jitter: self.hint_jitter,
            listener: self.listener,
            name: self.name,
            seed: self.seed,
        }
    }

    /// Checks the values and creates the layer.
    pub fn build(mut self) -> Result<RetryLayer<C, K>, ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be at least 1"));
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new("attempt_timeout", "must be above zero"));
        }
        if let Some(d) = self.deadline {
            if d.is_zero() {
                return Err(ConfigError::new("deadline", "must be above zero"));
            }
            if self.attempt_timeout.is_some_and(|t| t > d) {
                if self.attempt_timeout_set {
                    return Err(ConfigError::new(
                        "deadline",
                        "must be at least `attempt_timeout`",
                    ));
                }
                // The default attempt timeout never outlasts a shorter
                // deadline the caller chose.
                self.attempt_timeout = Some(d);
            }
        }
        if !self.hint_jitter.is_finite() || !(0.0..=1.0).contains(&self.hint_jitter) {
            return Err(ConfigError::new("hint_jitter", "must be from 0 to 1"));
        }
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(RetryLayer {
            config: Arc::new(Config {
                max_attempts: self.max_attempts,
                attempt_timeout: self.attempt_timeout,
                deadline: self.deadline,
                classifier: self.classifier,
                clone: self.clone,
                backoff: self.backoff,
                throttle_backoff: self.throttle_backoff,
                budget: self.budget,
                hint_cap: self.hint_cap,
                hint_jitter: self.hint_jitter,
                listener: self.listener,
                name: self.name,
                seed,
                sequence: AtomicU64::new(0),
            }),
        })
    }
}
