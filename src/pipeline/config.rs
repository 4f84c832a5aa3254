//! The pipeline from a file: TOML or JSON, validated like the builders, with
//! errors that name the bad key's path.
//!
//! ```
//! use llm_resilience::pipeline::PipelineConfig;
//!
//! let config = PipelineConfig::from_toml(r#"
//!     deadline = "60s"
//!     [queue]
//!     capacity = 1000
//!     concurrency = 32
//!     [[targets]]
//!     name = "primary"
//!     base_url = "http://127.0.0.1:8080/v1"
//!     model = "gpt-4o"
//!     [targets.breaker]
//!     failure_rate = 1.5
//! "#).unwrap();
//! let err = config.build().unwrap_err();
//! assert_eq!(err.path(), "targets[0].breaker.failure_rate");
//! ```
//!
//! Durations are strings with a unit (`"250ms"`, `"30s"`, `"6m0s"`, `"1h"`)
//! or a number of seconds. Every section and key is optional but `targets`
//! (and each target's `name`, `base_url` and `model`); what is absent keeps
//! the LLM default. A target's `retry`, `breaker` and `rate_limit` sections
//! override the pipeline-wide ones key by key (each target has its own
//! breaker and limiter either way). A target without `requests` or `tokens`
//! has no rate limit of its own: it pauses on 429 hints and follows the
//! provider's `x-ratelimit-*` headers. `examples/pipeline.toml` is a commented
//! example.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::builder::TargetSpec;
use super::AgentPipeline;
use crate::breaker::{CircuitBreakerLayer, CircuitBreakerLayerBuilder};
use crate::client::{ChatRequest, ChatResponse, OpenAiClient};
use crate::error::ConfigError;
use crate::guard::{AtStreamEnd, Mode};
use crate::ratelimit::{
    ChatEstimate, EstimateTokens, RateLimitLayer, RateLimitLayerBuilder, Reported,
};
use crate::retry::{RetryLayer, RetryLayerBuilder};

/// A pipeline's settings as read from a file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PipelineConfig {
    /// The deadline of one logical call.
    #[serde(default, deserialize_with = "duration")]
    pub deadline: Option<Duration>,
    /// The queue.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Retry settings for every target.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Breaker settings for every target.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Rate-limit settings for every target (each target has its own
    /// limiter).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// The targets, in order.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
}

/// The `[queue]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct QueueConfig {
    /// Requests that may wait.
    pub capacity: Option<usize>,
    /// Requests in flight.
    pub concurrency: Option<usize>,
    /// `"wait"` (default) or `"reject"`.
    pub when_full: Option<WhenFullConfig>,
    /// The longest wait in the queue.
    #[serde(default, deserialize_with = "duration")]
    pub max_wait: Option<Duration>,
}

/// What a full queue does.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WhenFullConfig {
    /// Wait for a place (backpressure).
    Wait,
    /// Reject at once.
    Reject,
}

/// A `[retry]` section (pipeline-wide or per target).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts, the first included.
    pub max_attempts: Option<u32>,
    /// The limit on one attempt.
    #[serde(default, deserialize_with = "duration")]
    pub attempt_timeout: Option<Duration>,
    /// The limit on one target's attempts and sleeps together.
    #[serde(default, deserialize_with = "duration")]
    pub deadline: Option<Duration>,
    /// The longest server hint honoured.
    #[serde(default, deserialize_with = "duration")]
    pub hint_cap: Option<Duration>,
}

/// A `[breaker]` section (pipeline-wide or per target).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Trip at this failure rate (0 to 1).
    pub failure_rate: Option<f64>,
    /// Trip after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    /// Calls needed before a rate is judged.
    pub min_calls: Option<u32>,
    /// The time window the rate is measured over.
    #[serde(default, deserialize_with = "duration")]
    pub time_window: Option<Duration>,
    /// How long the breaker stays open after its first trip.
    #[serde(default, deserialize_with = "duration")]
    pub open_duration: Option<Duration>,
    /// Probes admitted while half-open.
    pub half_open_probes: Option<u32>,
}

/// A `[rate_limit]` section (pipeline-wide or per target). Without
/// `requests` and `tokens` a target's limiter has no limit of its own: it
/// pauses on 429 hints and follows the provider's rate-limit headers.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// Requests per window (your account's limit, e.g. requests per minute).
    pub requests: Option<u64>,
    /// Tokens per window (prompt plus completion, estimated then settled
    /// with the reported usage).
    pub tokens: Option<u64>,
    /// The window the limits count over (default one minute).
    #[serde(default, deserialize_with = "duration")]
    pub window: Option<Duration>,
    /// The share of each limit that may go at once (default 0.1).
    pub burst: Option<f64>,
    /// `"wait"` (default) or `"reject"`: what a call does when the limit is
    /// reached. Rejected, the target is skipped and the next one tried.
    pub when_limited: Option<WhenLimitedConfig>,
    /// The longest a call waits in line (default one minute; never past
    /// the deadline).
    #[serde(default, deserialize_with = "duration")]
    pub max_wait: Option<Duration>,
    /// The longest pause a 429's hint imposes (default 2 minutes).
    #[serde(default, deserialize_with = "duration")]
    pub hint_cap: Option<Duration>,
    /// Follow the provider's `x-ratelimit-*` headers (default true).
    pub follow_server_headers: Option<bool>,
}

/// What a call does when its target's rate limit is reached.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WhenLimitedConfig {
    /// Wait in line, up to `max_wait` and the deadline.
    Wait,
    /// Skip the target at once.
    Reject,
}

/// One `[[targets]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TargetConfig {
    /// The target's name, for reports, metrics and health.
    pub name: String,
    /// The provider's API: `"openai"` (any OpenAI-compatible server, the
    /// default).
    #[serde(default)]
    pub provider: ProviderConfig,
    /// The API's base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The model asked for.
    pub model: String,
    /// The environment variable holding the API key (none: no key sent).
    pub api_key_env: Option<String>,
    /// Whether this is the larger-context target (tried only for requests
    /// too long for the others).
    #[serde(default)]
    pub larger_context: bool,
    /// The limit on the wait for response headers.
    #[serde(default, deserialize_with = "duration")]
    pub first_byte_timeout: Option<Duration>,
    /// Overrides of the pipeline-wide retry settings.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Overrides of the pipeline-wide breaker settings.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Overrides of the pipeline-wide rate-limit settings.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

/// The provider API a target speaks.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProviderConfig {
    /// An OpenAI-compatible chat completions API.
    #[default]
    Openai,
}

/// A config file that cannot be read or built: the key's path and what is
/// wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFileError {
    path: String,
    message: String,
}

impl ConfigFileError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigFileError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The bad key's path, e.g. `targets[1].breaker.failure_rate` (empty when
    /// the file as a whole could not be read).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "invalid pipeline config: {}", self.message)
        } else {
            write!(
                f,
                "invalid pipeline config: `{}` {}",
                self.path, self.message
            )
        }
    }
}

impl std::error::Error for ConfigFileError {}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    let bad =
        || serde::de::Error::custom("is not a duration (e.g. \"30s\", \"250ms\", or seconds)");
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(s)) => Duration::try_from_secs_f64(s).map(Some).map_err(|_| bad()),
        Some(Raw::Text(t)) => crate::classify::hint::go_duration(t.trim())
            .map(Some)
            .ok_or_else(bad),
    }
}

impl RetryConfig {
    fn apply(&self, mut b: RetryLayerBuilder) -> RetryLayerBuilder {
        if let Some(n) = self.max_attempts {
            b = b.max_attempts(n);
        }
        if let Some(t) = self.attempt_timeout {
            b = b.attempt_timeout(t);
        }
        if let Some(t) = self.deadline {
            b = b.deadline(t);
        }
        if let Some(t) = self.hint_cap {
            b = b.hint_cap(t);
        }
        b
    }
}

impl BreakerConfig {
    fn apply(&self, mut b: CircuitBreakerLayerBuilder) -> CircuitBreakerLayerBuilder {
        if let Some(r) = self.failure_rate {
            b = b.failure_rate(r);
        }
        if let Some(n) = self.consecutive_failures {
            b = b.consecutive_failures(n);
        }
        if let Some(n) = self.min_calls {
            b = b.min_calls(n);
        }
        if let Some(t) = self.time_window {
            b = b.time_window(t);
        }
        if let Some(t) = self.open_duration {
            b = b.open_duration(t);
        }
        if let Some(n) = self.half_open_probes {
            b = b.half_open_probes(n);
        }
        b
    }
}

impl RateLimitConfig {
    fn apply(&self, mut b: RateLimitLayerBuilder) -> RateLimitLayerBuilder {
        if let Some(n) = self.requests {
            b = b.requests(n);
        }
        if let Some(n) = self.tokens {
            b = b.tokens(n);
        }
        if let Some(t) = self.window {
            b = b.window(t);
        }
        if let Some(f) = self.burst {
            b = b.burst(f);
        }
        if let Some(t) = self.max_wait {
            b = b.max_wait(t);
        }
        if self.when_limited == Some(WhenLimitedConfig::Reject) {
            b = b.reject();
        }
        if let Some(t) = self.hint_cap {
            b = b.hint_cap(t);
        }
        if self.follow_server_headers == Some(false) {
            b = b.ignore_server_headers();
        }
        b
    }
}

/// `Err` with the path of the section whose settings are out of range: the
/// pipeline-wide one when it alone fails, else the target's.
fn check<T>(
    global: impl FnOnce() -> Result<T, ConfigError>,
    merged: impl FnOnce() -> Result<T, ConfigError>,
    section: &str,
    target: usize,
) -> Result<(), ConfigFileError> {
    if let Err(e) = global() {
        return Err(ConfigFileError::new(
            format!("{section}.{}", e.field),
            e.problem,
        ));
    }
    merged().map(drop).map_err(|e| {
        ConfigFileError::new(
            format!("targets[{target}].{section}.{}", e.field),
            e.problem,
        )
    })
}

impl PipelineConfig {
    /// Reads TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigFileError> {
        toml::from_str(text).map_err(|e| ConfigFileError::new("", e.to_string()))
    }

    /// Reads JSON.
    pub fn from_json(text: &str) -> Result<Self, ConfigFileError> {
        serde_json::from_str(text).map_err(|e| ConfigFileError::new("", e.to_string()))
    }

    /// Reads a file: JSON when its name ends in `.json`, TOML otherwise.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigFileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigFileError::new("", format!("cannot read {}: {e}", path.display()))
        })?;
        if path.extension().is_some_and(|x| x == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
    }

    /// Builds the pipeline over the crate's OpenAI-compatible client, reading
    /// each target's key from its environment variable. The rate limiters
    /// estimate each request's tokens ([`ChatEstimate`]) and settle them
    /// with the response's reported usage and rate-limit headers
    /// ([`Reported`]).
    pub fn build(
        &self,
    ) -> Result<AgentPipeline<OpenAiClient, ChatRequest, ChatResponse>, ConfigFileError> {
        finish(self.builder_with(|client| client)?.read_usage(Reported))
    }

    /// Builds the pipeline over each target's client as `wrap` makes it
    /// from the crate's OpenAI-compatible client (its streaming face, a
    /// service that picks streamed or whole answers per request, a layer
    /// of one's own). The rate limiters estimate each request's tokens
    /// ([`ChatEstimate`]); they read nothing from `Res` (estimates stand,
    /// 429 pauses apply).
    pub fn build_with<C: Clone, Req: 'static, Res: 'static>(
        &self,
        wrap: impl Fn(OpenAiClient) -> C,
    ) -> Result<AgentPipeline<C, Req, Res>, ConfigFileError>
    where
        ChatEstimate: EstimateTokens<Req>,
    {
        finish(self.builder_with(wrap)?)
    }

    /// [`build_with`](Self::build_with) for a client that streams: built
    /// with
    /// [`hold_until_stream_end`](super::AgentPipelineBuilder::hold_until_stream_end),
    /// so a stream keeps its queue slot until it ends and each breaker
    /// records how it ended.
    pub fn build_streaming_with<C: Clone, Req: 'static, Res: 'static>(
        &self,
        wrap: impl Fn(OpenAiClient) -> C,
    ) -> Result<AgentPipeline<C, Req, Res, AtStreamEnd>, ConfigFileError>
    where
        ChatEstimate: EstimateTokens<Req>,
    {
        finish(self.builder_with(wrap)?.release::<AtStreamEnd>())
    }

    fn builder_with<C, Req: 'static, Res>(
        &self,
        wrap: impl Fn(OpenAiClient) -> C,
    ) -> Result<super::AgentPipelineBuilder<C, Req, Res>, ConfigFileError>
    where
        ChatEstimate: EstimateTokens<Req>,
    {
        let mut b = AgentPipeline::builder();
        if self.targets.is_empty() {
            return Err(ConfigFileError::new("targets", "needs at least one target"));
        }
        for (i, t) in self.targets.iter().enumerate() {
            let (global, own) = (self.retry.clone(), t.retry.clone());
            check(
                || global.apply(RetryLayer::builder()).build(),
                || own.apply(global.apply(RetryLayer::builder())).build(),
                "retry",
                i,
            )?;
            let (global, own) = (self.breaker.clone(), t.breaker.clone());
            check(
                || global.apply(CircuitBreakerLayer::builder()).build(),
                || {
                    own.apply(global.apply(CircuitBreakerLayer::builder()))
                        .build()
                },
                "breaker",
                i,
            )?;
            let (global, own) = (self.rate_limit.clone(), t.rate_limit.clone());
            check(
                || global.apply(RateLimitLayer::builder()).build(),
                || own.apply(global.apply(RateLimitLayer::builder())).build(),
                "rate_limit",
                i,
            )?;
            let mut client = OpenAiClient::builder(t.base_url.clone()).model(t.model.as_str());
            if let Some(var) = &t.api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    ConfigFileError::new(
                        format!("targets[{i}].api_key_env"),
                        format!("names the environment variable {var}, which is not set"),
                    )
                })?;
                client = client.api_key(key);
            }
            if let Some(d) = t.first_byte_timeout {
                client = client.first_byte_timeout(d);
            }
            let client = client.build().map_err(|e| {
                ConfigFileError::new(format!("targets[{i}].{}", e.field), e.problem)
            })?;
            let mut spec = TargetSpec::new(t.name.as_str().into(), wrap(client));
            spec.larger = t.larger_context;
            let own = t.breaker.clone();
            spec.breaker = Some(Box::new(move |r| own.apply(r)));
            let own = t.retry.clone();
            spec.retry = Some(Box::new(move |r| own.apply(r)));
            let own = t.rate_limit.clone();
            spec.rate_limit = Some(Box::new(move |r| own.apply(r)));
            b = b.target_spec(spec);
        }
        let global = self.retry.clone();
        b = b.retry(move |r| global.apply(r));
        let global = self.breaker.clone();
        b = b.breaker(move |r| global.apply(r));
        let global = self.rate_limit.clone();
        b = b
            .rate_limit(move |r| global.apply(r))
            .estimate_tokens(ChatEstimate);
        if let Some(d) = self.deadline {
            b = b.deadline(d);
        }
        let q = &self.queue;
        b = b.queue(q.capacity.unwrap_or(1_000), q.concurrency.unwrap_or(32));
        if q.when_full == Some(WhenFullConfig::Reject) {
            b = b.reject_when_full();
        }
        if let Some(w) = q.max_wait {
            b = b.max_queue_wait(w);
        }
        Ok(b)
    }
}

fn finish<C: Clone, Req: 'static, Res: 'static, H: Mode>(
    b: super::AgentPipelineBuilder<C, Req, Res, H>,
) -> Result<AgentPipeline<C, Req, Res, H>, ConfigFileError> {
    b.build().map_err(|e| {
        let section = match e.field {
            "capacity" | "concurrency" | "max_wait" => "queue.",
            _ => "",
        };
        ConfigFileError::new(format!("{section}{}", e.field), e.problem)
    })
}
