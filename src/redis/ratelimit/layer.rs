//! [`FleetRateLimitLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::event::{FleetRateLimitEvent, Listener};
use super::script::{Limits, Store};
use super::{ArcEstimate, ArcUsage, Fleet, FleetRateLimit, FleetSettings};
use crate::error::ConfigError;
use crate::ratelimit::{
    knob_setters, ChatEstimate, IgnoreUsage, Knobs, RateLimitLayerBuilder, Reported,
};
use crate::redis::config::{check_duration_in, check_name};

/// The longest window and server window: one day.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest fleet.
const MAX_FLEET: u64 = 10_000;

/// Puts a fleet-wide rate limiter in front of a service: every process
/// with a layer for the same key and Redis shares one limit; see the
/// [module docs](crate::redis::ratelimit).
pub struct FleetRateLimitLayer<E = ChatEstimate, U = Reported> {
    fleet: Arc<Fleet<E, U>>,
}

impl<E, U> Clone for FleetRateLimitLayer<E, U> {
    fn clone(&self) -> Self {
        Self {
            fleet: Arc::clone(&self.fleet),
        }
    }
}

impl<E, U> fmt::Debug for FleetRateLimitLayer<E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetRateLimitLayer")
            .field("name", &self.fleet.settings.name)
            .field("local", &self.fleet.is_local())
            .finish_non_exhaustive()
    }
}

impl FleetRateLimitLayer {
    /// The LLM defaults for the shared limit named `key` on the Redis at
    /// `url`: those of [`RateLimitLayer::llm_defaults`](crate::ratelimit::RateLimitLayer::llm_defaults) (500 requests and
    /// 200,000 tokens a minute, a burst of a tenth, wait up to a minute,
    /// 429 pauses capped at 2 minutes, per-minute server headers), shared
    /// by the whole fleet; a fleet of one for the fallback (set
    /// [`fleet_size`](FleetRateLimitLayerBuilder::fleet_size)); Redis
    /// calls bounded by 250 ms; a probe of Redis every 5 s while it is
    /// unreachable. Fails only on a bad URL or key.
    pub fn llm_defaults(
        url: impl Into<String>,
        key: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        Self::builder(url, key).build()
    }

    /// A builder for the shared limit named `key` (the same in every
    /// process that shares it; never logged) on the Redis at `url`
    /// (`redis://host:port/db`, `rediss://` for TLS), starting from
    /// [`llm_defaults`](Self::llm_defaults).
    pub fn builder(url: impl Into<String>, key: impl Into<String>) -> FleetRateLimitLayerBuilder {
        FleetRateLimitLayerBuilder {
            url: url.into(),
            key: key.into(),
            knobs: Knobs::llm_defaults(),
            listener: None,
            fleet_size: 1,
            send_margin: None,
            redis_timeout: Duration::from_millis(250),
            probe_interval: Duration::from_secs(5),
            estimate: ChatEstimate,
            usage: Reported,
        }
    }
}

impl<E, U> FleetRateLimitLayer<E, U> {
    /// Whether calls go through the local fallback now (Redis was
    /// unreachable and no probe has found it since).
    pub fn is_local(&self) -> bool {
        self.fleet.is_local()
    }
}

impl<S, E, U> Layer<S> for FleetRateLimitLayer<E, U> {
    type Service = FleetRateLimit<S, E, U>;

    fn layer(&self, inner: S) -> Self::Service {
        FleetRateLimit {
            inner,
            fleet: Arc::clone(&self.fleet),
        }
    }
}

/// Builds a validated [`FleetRateLimitLayer`]; every knob starts at its LLM
/// default. The limits are the whole fleet's (every process sharing the
/// key draws from them); the name labels the local fallback's metrics and
/// logs too; the window is at least 1 ms.
pub struct FleetRateLimitLayerBuilder<E = ChatEstimate, U = Reported> {
    url: String,
    key: String,
    knobs: Knobs,
    listener: Option<Listener>,
    fleet_size: u64,
    send_margin: Option<Duration>,
    redis_timeout: Duration,
    probe_interval: Duration,
    estimate: E,
    usage: U,
}

impl<E, U> fmt::Debug for FleetRateLimitLayerBuilder<E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetRateLimitLayerBuilder")
            .field("requests", &self.knobs.requests)
            .field("tokens", &self.knobs.tokens)
            .field("window", &self.knobs.window)
            .field("burst", &self.knobs.burst)
            .field("when_limited", &self.knobs.when_limited)
            .field("fleet_size", &self.fleet_size)
            .finish_non_exhaustive()
    }
}

impl<E, U> FleetRateLimitLayerBuilder<E, U> {
    knob_setters!();

    /// Called on every slow-path event. Runs on the caller's task; keep it
    /// short.
    pub fn on_event(mut self, f: impl Fn(&FleetRateLimitEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// How many processes share the limit (1 to 10,000). Default 1. Only
    /// the fallback uses it: while Redis is unreachable each process limits
    /// itself to the limits divided by this (at least one request and one
    /// token), so the fleet stays within the limit.
    pub fn fleet_size(mut self, n: u64) -> Self {
        self.fleet_size = n;
        self
    }

    /// How much longer than the window each admitted call stays counted
    /// (at most the window). Default 1/64 of the window (about 1 s for a
    /// minute). The decision is made on the Redis server; the request
    /// reaches the provider a little later, by a delay that varies from
    /// call to call (scheduling, connection setup). Without a margin, a
    /// call admitted exactly one window after another could reach the
    /// provider less than a window after it. The margin covers that
    /// variation; the price is a rate lower by the same share.
    pub fn send_margin(mut self, margin: Duration) -> Self {
        self.send_margin = Some(margin);
        self
    }

    /// Bound on connecting to Redis and on each script's answer (1 ms to
    /// 60 s). Default 250 ms: past it the call goes through the fallback.
    pub fn redis_timeout(mut self, d: Duration) -> Self {
        self.redis_timeout = d;
        self
    }

    /// While Redis is unreachable, how often one call tries it again (1 ms
    /// to one hour); the others use the fallback without waiting. Default
    /// 5 s.
    pub fn probe_interval(mut self, d: Duration) -> Self {
        self.probe_interval = d;
        self
    }

    /// The token estimator: any `Fn(&Req) -> u32` (or
    /// [`EstimateTokens`](crate::ratelimit::EstimateTokens)).
    pub fn estimate_tokens<E2>(self, estimate: E2) -> FleetRateLimitLayerBuilder<E2, U> {
        self.map(|_| estimate, |u| u)
    }

    /// Read nothing from responses: estimates stand.
    pub fn ignore_usage(self) -> FleetRateLimitLayerBuilder<E, IgnoreUsage> {
        self.read_usage(IgnoreUsage)
    }

    /// How responses are read ([`ReadUsage`](crate::ratelimit::ReadUsage));
    /// default [`Reported`].
    pub fn read_usage<U2>(self, usage: U2) -> FleetRateLimitLayerBuilder<E, U2> {
        self.map(|e| e, |_| usage)
    }

    fn map<E2, U2>(
        self,
        estimate: impl FnOnce(E) -> E2,
        usage: impl FnOnce(U) -> U2,
    ) -> FleetRateLimitLayerBuilder<E2, U2> {
        FleetRateLimitLayerBuilder {
            url: self.url,
            key: self.key,
            knobs: self.knobs,
            listener: self.listener,
            fleet_size: self.fleet_size,
            send_margin: self.send_margin,
            redis_timeout: self.redis_timeout,
            probe_interval: self.probe_interval,
            estimate: estimate(self.estimate),
            usage: usage(self.usage),
        }
    }

    /// Checks the values and creates the layer. Does not connect: the first
    /// call does (and falls back if Redis cannot be reached).
    pub fn build(self) -> Result<FleetRateLimitLayer<E, U>, ConfigError> {
        check_name(
            "key",
            &self.key,
            256,
            &['{', '}'],
            "must be 1 to 256 bytes without braces or control characters",
        )?;
        let client = redis::Client::open(self.url.as_str())
            .map_err(|_| ConfigError::new("url", "must be a redis:// or rediss:// URL"))?;
        // What the local builder checks too (limits, burst, windows, the
        // hint cap), then what only the fleet has.
        let (requests, tokens) = self.knobs.check()?;
        let k = &self.knobs;
        if k.window < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "window",
                "must be at least 1 ms and at most one day",
            ));
        }
        if k.hint_cap > MAX_WINDOW {
            return Err(ConfigError::new(
                "hint_cap",
                "must be above zero and at most one day",
            ));
        }
        if self.fleet_size == 0 || self.fleet_size > MAX_FLEET {
            return Err(ConfigError::new("fleet_size", "must be from 1 to 10000"));
        }
        let margin = self.send_margin.unwrap_or(k.window / 64);
        if margin > k.window {
            return Err(ConfigError::new(
                "send_margin",
                "must be at most the window",
            ));
        }
        let ms = Duration::from_millis(1);
        check_duration_in(
            "redis_timeout",
            self.redis_timeout,
            ms,
            Duration::from_secs(60),
            "must be from 1 ms to 60 s",
        )?;
        check_duration_in(
            "probe_interval",
            self.probe_interval,
            ms,
            Duration::from_secs(3600),
            "must be from 1 ms to one hour",
        )?;
        let estimate = Arc::new(self.estimate);
        let usage = Arc::new(self.usage);
        // The fallback: the in-process limiter with the fleet's share.
        let share = |l: u64| (l / self.fleet_size).max(1);
        let local = RateLimitLayerBuilder::from_knobs(Knobs {
            requests: k.requests.map(share),
            tokens: k.tokens.map(share),
            ..k.clone()
        })
        .estimate_tokens(ArcEstimate(Arc::clone(&estimate)))
        .read_usage(ArcUsage(Arc::clone(&usage)))
        .build()?;
        let limits = Limits {
            window_us: k.window.as_micros() as u64,
            hold_us: (k.window + margin).as_micros() as u64,
            requests,
            tokens,
        };
        let store = Store::new(client, &self.key, self.redis_timeout, limits);
        let settings = FleetSettings {
            name: self.knobs.name,
            listener: self.listener,
            classifier: self.knobs.classifier,
            when_limited: self.knobs.when_limited,
            hint_cap: self.knobs.hint_cap,
            window: self.knobs.window,
            server_window: self.knobs.server_window,
            probe_interval: self.probe_interval,
        };
        Ok(FleetRateLimitLayer {
            fleet: Arc::new(Fleet::new(store, settings, estimate, usage, local)),
        })
    }
}
