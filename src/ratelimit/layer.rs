//! [`RateLimitLayer`], [`KeyedRateLimitLayer`] and their builders.

use std::borrow::Cow;
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::util::clock::Origin;
use tower_layer::Layer;

use super::event::{Listener, RateLimitEvent};
use super::handle::{KeyedAccess, KeyedRateLimitHandle, RateLimitHandle};
use super::keyed::Keyed;
use super::limiter::{Limiter, Settings, WhenLimited};
use super::registry;
use super::usage::{ChatEstimate, IgnoreUsage, Reported};
use super::{KeyedRateLimit, RateLimit, Shared};
use crate::classify::LlmClassifier;
use crate::error::ConfigError;

/// The longest window and server window: one day.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest limit per window.
const MAX_LIMIT: u64 = 1_000_000_000_000;

/// Puts a rate limiter in front of a service; see the
/// [module docs](crate::ratelimit).
///
/// Every service this layer makes, and every clone of them, draws from the
/// **same** limiter: build one layer per target (provider, model, key), or
/// use [`key_by`](RateLimitLayerBuilder::key_by) for one limiter per key.
pub struct RateLimitLayer<E = ChatEstimate, U = Reported> {
    shared: Arc<Shared<Arc<Limiter>, E, U>>,
}

impl<E, U> Clone for RateLimitLayer<E, U> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<E, U> fmt::Debug for RateLimitLayer<E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("settings", &*self.shared.part.settings)
            .finish()
    }
}

impl RateLimitLayer {
    /// The LLM defaults: 500 requests and 200,000 tokens a minute (the
    /// order of OpenAI's first usage tier for its small models: set your
    /// own account's limits; the server's headers only ever lower these), a
    /// burst of a tenth of each; wait in line for at most one minute
    /// (a window); a 429's hint pauses the key for up to 2 minutes (the
    /// longest hint the OpenAI SDK honours); steered by per-minute server
    /// headers; the [`ChatEstimate`] for the crate's chat requests, settled
    /// with the reported usage.
    pub fn llm_defaults() -> Self {
        Self::builder()
            .build()
            .expect("the LLM defaults are a valid configuration")
    }

    /// A builder starting from [`RateLimitLayer::llm_defaults`].
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            knobs: Knobs::llm_defaults(),
            listener: None,
            estimate: ChatEstimate,
            usage: Reported,
        }
    }
}

impl<E, U> RateLimitLayer<E, U> {
    /// A cheap handle to query the limiter, usable from any thread.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(Arc::clone(&self.shared.part))
    }
}

impl<S, E, U> Layer<S> for RateLimitLayer<E, U> {
    type Service = RateLimit<S, E, U>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// Puts one rate limiter per key in front of a service; made by
/// [`RateLimitLayerBuilder::key_by`].
///
/// The key function runs once per call: return something cheap (an enum, a
/// `&'static str`, an `Arc<str>`). Keys are never logged.
pub struct KeyedRateLimitLayer<K, F, E = ChatEstimate, U = Reported> {
    shared: Arc<Shared<Keyed<K, F>, E, U>>,
}

impl<K, F, E, U> Clone for KeyedRateLimitLayer<K, F, E, U> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, F, E, U> fmt::Debug for KeyedRateLimitLayer<K, F, E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("keys", &self.shared.part)
            .finish()
    }
}

impl<K, F, E, U> KeyedRateLimitLayer<K, F, E, U>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Send + Sync + 'static,
    E: Send + Sync + 'static,
    U: Send + Sync + 'static,
{
    /// A cheap handle to the map of limiters: per-key queries.
    pub fn handle(&self) -> KeyedRateLimitHandle<K> {
        KeyedRateLimitHandle {
            shared: Arc::new(KeyedView(Arc::clone(&self.shared))) as Arc<dyn KeyedAccess<K>>,
        }
    }
}

struct KeyedView<K, F, E, U>(Arc<Shared<Keyed<K, F>, E, U>>);

impl<K, F, E, U> KeyedAccess<K> for KeyedView<K, F, E, U>
where
    K: Hash + Eq + Clone + Send + Sync,
    F: Send + Sync,
    E: Send + Sync,
    U: Send + Sync,
{
    fn get(&self, key: &K) -> Option<Arc<Limiter>> {
        self.0.part.get(key)
    }
    fn get_or_insert(&self, key: K) -> Arc<Limiter> {
        self.0.part.get_or_insert(key)
    }
    fn keys(&self) -> Vec<K> {
        self.0.part.keys()
    }
}

impl<S, K, F, E, U> Layer<S> for KeyedRateLimitLayer<K, F, E, U> {
    type Service = KeyedRateLimit<S, K, F, E, U>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// The knobs both rate-limit builders share (this module's and the fleet's
/// on Redis), at their LLM defaults until set.
#[derive(Clone)]
pub(crate) struct Knobs {
    pub(crate) requests: Option<u64>,
    pub(crate) tokens: Option<u64>,
    pub(crate) window: Duration,
    pub(crate) burst: f64,
    pub(crate) when_limited: WhenLimited,
    pub(crate) hint_cap: Duration,
    pub(crate) server_window: Option<Duration>,
    pub(crate) name: Cow<'static, str>,
    pub(crate) classifier: LlmClassifier,
}

impl Knobs {
    /// The LLM defaults (see [`RateLimitLayer::llm_defaults`]).
    pub(crate) fn llm_defaults() -> Self {
        Self {
            requests: Some(500),
            tokens: Some(200_000),
            window: Duration::from_secs(60),
            burst: 0.1,
            when_limited: WhenLimited::Wait {
                max_wait: Duration::from_secs(60),
            },
            hint_cap: Duration::from_secs(120),
            server_window: Some(Duration::from_secs(60)),
            name: Cow::Borrowed("default"),
            classifier: LlmClassifier::new(),
        }
    }

    /// `(limit, burst)` of a limit: the burst is the configured share of it,
    /// at least 1 and at most the limit.
    pub(crate) fn with_burst(&self, limit: u64) -> (u64, u64) {
        (
            limit,
            ((limit as f64 * self.burst).floor() as u64).clamp(1, limit),
        )
    }

    /// Checks the shared knobs; the request and token limits with their
    /// bursts.
    #[allow(clippy::type_complexity)]
    pub(crate) fn check(&self) -> Result<(Option<(u64, u64)>, Option<(u64, u64)>), ConfigError> {
        if self.window.is_zero() || self.window > MAX_WINDOW {
            return Err(ConfigError::new(
                "window",
                "must be above zero and at most one day",
            ));
        }
        if !(self.burst.is_finite() && self.burst > 0.0 && self.burst <= 1.0) {
            return Err(ConfigError::new("burst", "must be above 0 and at most 1"));
        }
        let dim = |limit: Option<u64>, field| match limit {
            None => Ok(None),
            Some(l) if l == 0 || l > MAX_LIMIT => {
                Err(ConfigError::new(field, "must be from 1 to 10^12"))
            }
            Some(l) => Ok(Some(self.with_burst(l))),
        };
        let requests = dim(self.requests, "requests")?;
        let tokens = dim(self.tokens, "tokens")?;
        if requests.is_none() && tokens.is_none() {
            return Err(ConfigError::new(
                "requests",
                "or `tokens` must be set: there is nothing to limit",
            ));
        }
        if self.hint_cap.is_zero() {
            return Err(ConfigError::new("hint_cap", "must be above zero"));
        }
        if self
            .server_window
            .is_some_and(|w| w.is_zero() || w > MAX_WINDOW)
        {
            return Err(ConfigError::new(
                "server_window",
                "must be above zero and at most one day",
            ));
        }
        Ok((requests, tokens))
    }
}

/// The setters of the [`Knobs`] both rate-limit builders share, on a
/// builder with a `knobs` field.
macro_rules! knob_setters {
    () => {
        /// Requests allowed per window (1 to 10^12). Default 500.
        pub fn requests(mut self, n: u64) -> Self {
            self.knobs.requests = Some(n);
            self
        }

        /// No request limit (tokens only).
        pub fn no_request_limit(mut self) -> Self {
            self.knobs.requests = None;
            self
        }

        /// Tokens allowed per window (1 to 10^12). Default 200,000.
        pub fn tokens(mut self, n: u64) -> Self {
            self.knobs.tokens = Some(n);
            self
        }

        /// No token limit (requests only; the estimator is still called).
        pub fn no_token_limit(mut self) -> Self {
            self.knobs.tokens = None;
            self
        }

        /// The window the limits are counted over (above zero, at most a
        /// day; any length, e.g. 10 requests per 2 s). Default one minute.
        pub fn window(mut self, window: ::std::time::Duration) -> Self {
            self.knobs.window = window;
            self
        }

        /// The share of each limit that may go at once, before the pace
        /// applies (above 0, at most 1; at least one request and one token).
        /// Default 0.1.
        pub fn burst(mut self, fraction: f64) -> Self {
            self.knobs.burst = fraction;
            self
        }

        /// What a call does when the limit is reached. Default: wait up to
        /// one minute.
        pub fn when_limited(mut self, w: $crate::ratelimit::WhenLimited) -> Self {
            self.knobs.when_limited = w;
            self
        }

        /// Wait in line for at most `max_wait` (any duration).
        pub fn max_wait(mut self, max_wait: ::std::time::Duration) -> Self {
            self.knobs.when_limited = $crate::ratelimit::WhenLimited::Wait { max_wait };
            self
        }

        /// Fail at once with [`Error::RateLimited`](crate::Error::RateLimited)
        /// instead of waiting.
        pub fn reject(mut self) -> Self {
            self.knobs.when_limited = $crate::ratelimit::WhenLimited::Reject;
            self
        }

        /// The longest pause a 429's hint imposes on a key (above zero, at
        /// most a day). Default 2 minutes (the longest hint the OpenAI SDK
        /// honours).
        pub fn hint_cap(mut self, cap: ::std::time::Duration) -> Self {
            self.knobs.hint_cap = cap;
            self
        }

        /// The window the server's limit headers count over (above zero, at
        /// most a day): their limits are scaled from it to ours. Default one
        /// minute (OpenAI's and Anthropic's limits are per minute).
        pub fn server_window(mut self, window: ::std::time::Duration) -> Self {
            self.knobs.server_window = Some(window);
            self
        }

        /// Do not follow the servers' rate-limit headers (429 pauses still
        /// apply).
        pub fn ignore_server_headers(mut self) -> Self {
            self.knobs.server_window = None;
            self
        }

        /// The layer's name: the `limiter` label of its metrics and logs.
        /// Default `"default"`.
        pub fn name(mut self, name: impl Into<::std::borrow::Cow<'static, str>>) -> Self {
            self.knobs.name = name.into();
            self
        }

        /// The classifier that finds a failure's 429, hint and headers
        /// ([`LlmClassifier::with_view`](crate::classify::LlmClassifier::with_view)
        /// for a client's own error type).
        pub fn classifier(mut self, classifier: $crate::classify::LlmClassifier) -> Self {
            self.knobs.classifier = classifier;
            self
        }
    };
}
#[cfg(feature = "redis")]
pub(crate) use knob_setters;

/// Builds a validated [`RateLimitLayer`] (or, after
/// [`key_by`](Self::key_by), a [`KeyedRateLimitLayer`]); every knob starts
/// at its LLM default.
pub struct RateLimitLayerBuilder<E = ChatEstimate, U = Reported> {
    knobs: Knobs,
    listener: Option<Listener>,
    estimate: E,
    usage: U,
}

impl<E, U> fmt::Debug for RateLimitLayerBuilder<E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("requests", &self.knobs.requests)
            .field("tokens", &self.knobs.tokens)
            .field("window", &self.knobs.window)
            .field("burst", &self.knobs.burst)
            .field("when_limited", &self.knobs.when_limited)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayerBuilder {
    /// A builder with these knobs (the fleet limiter's local fallback).
    #[cfg(feature = "redis")]
    pub(crate) fn from_knobs(knobs: Knobs) -> Self {
        Self {
            knobs,
            ..RateLimitLayer::builder()
        }
    }
}

impl<E, U> RateLimitLayerBuilder<E, U> {
    knob_setters!();

    /// Called on every slow-path event, never under a lock. Runs on the
    /// caller's task; keep it short.
    pub fn on_event(mut self, f: impl Fn(&RateLimitEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// The token estimator: any `Fn(&Req) -> u32` (or
    /// [`EstimateTokens`](super::EstimateTokens)).
    pub fn estimate_tokens<E2>(self, estimate: E2) -> RateLimitLayerBuilder<E2, U> {
        RateLimitLayerBuilder {
            knobs: self.knobs,
            listener: self.listener,
            estimate,
            usage: self.usage,
        }
    }

    /// Read nothing from responses (for response types that do not
    /// implement [`ReportsUsage`](super::ReportsUsage)): estimates stand.
    pub fn ignore_usage(self) -> RateLimitLayerBuilder<E, IgnoreUsage> {
        self.read_usage(IgnoreUsage)
    }

    /// How responses are read ([`ReadUsage`](super::ReadUsage)); default
    /// [`Reported`].
    pub fn read_usage<U2>(self, usage: U2) -> RateLimitLayerBuilder<E, U2> {
        RateLimitLayerBuilder {
            knobs: self.knobs,
            listener: self.listener,
            estimate: self.estimate,
            usage,
        }
    }

    /// One limiter per key that `key` extracts from the request (provider,
    /// model, credential), each with this configuration, in a map bounded
    /// by [`max_keys`](KeyedRateLimitLayerBuilder::max_keys).
    pub fn key_by<Req, K, F>(self, key: F) -> KeyedRateLimitLayerBuilder<E, U, F, K>
    where
        F: Fn(&Req) -> K,
    {
        KeyedRateLimitLayerBuilder {
            base: self,
            key,
            max_keys: 1_024,
            _key: PhantomData,
        }
    }

    pub(super) fn settings(&self) -> Result<Settings, ConfigError> {
        let (requests, tokens) = self.knobs.check()?;
        let k = &self.knobs;
        Ok(Settings {
            window: k.window.as_nanos() as u64,
            requests,
            tokens,
            when_limited: k.when_limited,
            hint_cap: k.hint_cap,
            server_window: k.server_window.map(|w| w.as_nanos() as u64),
            name: k.name.clone(),
            listener: self.listener.clone(),
            classifier: k.classifier.clone(),
        })
    }

    /// Checks the values and creates the layer.
    pub fn build(self) -> Result<RateLimitLayer<E, U>, ConfigError> {
        let settings = Arc::new(self.settings()?);
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                part: registry::new_limiter(settings, Origin::new(Instant::now())),
                estimate: self.estimate,
                usage: self.usage,
            }),
        })
    }
}

/// Builds a validated [`KeyedRateLimitLayer`]; made by
/// [`RateLimitLayerBuilder::key_by`].
pub struct KeyedRateLimitLayerBuilder<E, U, F, K> {
    base: RateLimitLayerBuilder<E, U>,
    key: F,
    max_keys: usize,
    _key: PhantomData<fn() -> K>,
}

impl<E, U, F, K> fmt::Debug for KeyedRateLimitLayerBuilder<E, U, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayerBuilder")
            .field("base", &self.base)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<E, U, F, K: Hash + Eq + Clone> KeyedRateLimitLayerBuilder<E, U, F, K> {
    /// The most keys (limiters) kept at once (at least 1). Default 1,024.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Checks the values and creates the layer.
    pub fn build(self) -> Result<KeyedRateLimitLayer<K, F, E, U>, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::new("max_keys", "must be at least 1"));
        }
        let settings = Arc::new(self.base.settings()?);
        Ok(KeyedRateLimitLayer {
            shared: Arc::new(Shared {
                part: Keyed::new(self.key, self.max_keys, settings),
                estimate: self.base.estimate,
                usage: self.base.usage,
            }),
        })
    }
}
