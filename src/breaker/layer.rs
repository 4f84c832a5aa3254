//! [`CircuitBreakerLayer`], its builder and the keyed variant's builder.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::util::clock::Origin;
use tower_layer::Layer;

use super::event::Metrics;
use super::handle::BreakerHandle;
use super::keyed::{KeyedCircuitBreakerLayer, KeyedShared};
use super::state::{BreakerEvent, Core, Listener, Settings, WindowSpec};
use super::{CircuitBreaker, Shared};
use crate::classify::{LlmClassifier, Reason};
use crate::error::ConfigError;
use crate::guard::StreamClassifier;

/// The largest count window, in calls.
const MAX_COUNT_WINDOW: u32 = 1_000_000;
/// The largest time window, in seconds (one day).
const MAX_TIME_WINDOW: u64 = 24 * 60 * 60;
/// The most half-open probes.
const MAX_PROBES: u32 = 1_000;
/// The longest open period, and the largest cap on its growth (one day).
const MAX_OPEN: Duration = Duration::from_secs(24 * 60 * 60);

/// Puts one circuit breaker in front of a service; see the
/// [module docs](crate::breaker).
///
/// Every service this layer makes, and every clone of them, shares **one**
/// breaker: build one layer per target (provider, model, key), or use
/// [`key_by`](CircuitBreakerLayerBuilder::key_by) for one breaker per key.
pub struct CircuitBreakerLayer<C = LlmClassifier> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("state", &self.shared.core.state())
            .field("settings", self.shared.core.settings())
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// The LLM defaults: a time-based window of 30 s (Polly's 30 s window), at
    /// least 20 calls before a rate is judged, trip at a 50 % failure rate
    /// (Resilience4j's default) or after 5 consecutive failures (Finagle's),
    /// or at once on an exhausted quota or a refused credential (no call to
    /// that key can succeed until billing or the credential is fixed, so the
    /// breaker opens at once and for long); open for 15 s, doubling on each
    /// consecutive trip up to 5 min, shortened by up to 10 % jitter, and at
    /// least as long as a server hint (`retry-after`, rate-limit resets) up
    /// to one hour; 3 half-open probes, a probe held longer than 2 min gives
    /// its permit up; the [`LlmClassifier`]. No slow-call rule: an LLM call's
    /// latency follows its output length.
    pub fn llm_defaults() -> Self {
        Self::builder()
            .build()
            .expect("the LLM defaults are a valid configuration")
    }

    /// A builder starting from [`CircuitBreakerLayer::llm_defaults`].
    pub fn builder() -> CircuitBreakerLayerBuilder {
        CircuitBreakerLayerBuilder {
            window: Window::Time(Duration::from_secs(30)),
            min_calls: 20,
            failure_rate: Some(0.5),
            slow: None,
            consecutive: Some(5),
            open_base: Duration::from_secs(15),
            open_multiplier: 2.0,
            open_cap: Duration::from_secs(300),
            open_jitter: 0.1,
            probes: 3,
            probe_timeout: Duration::from_secs(120),
            hint_cap: Some(Duration::from_secs(3600)),
            trip_on: vec![Reason::Quota, Reason::Auth],
            seed: None,
            listener: None,
            name: Cow::Borrowed("default"),
            classifier: LlmClassifier::new(),
        }
    }
}

impl<C: Send + Sync + 'static> CircuitBreakerLayer<C> {
    /// A cheap handle to query and control the breaker (state, force open,
    /// force closed, disable, reset), usable from any thread.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(Arc::clone(&self.shared) as Arc<dyn super::HasCore>)
    }
}

impl<S, C> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_shared(inner, Arc::clone(&self.shared))
    }
}

#[derive(Clone, Copy, Debug)]
enum Window {
    Count(u32),
    Time(Duration),
}

/// Builds a validated [`CircuitBreakerLayer`] (or, after
/// [`key_by`](Self::key_by), a [`KeyedCircuitBreakerLayer`]); every knob
/// starts at its LLM default.
pub struct CircuitBreakerLayerBuilder<C = LlmClassifier> {
    window: Window,
    min_calls: u32,
    failure_rate: Option<f64>,
    slow: Option<(Duration, f64)>,
    consecutive: Option<u32>,
    open_base: Duration,
    open_multiplier: f64,
    open_cap: Duration,
    open_jitter: f64,
    probes: u32,
    probe_timeout: Duration,
    hint_cap: Option<Duration>,
    trip_on: Vec<Reason>,
    seed: Option<u64>,
    listener: Option<Listener>,
    name: Cow<'static, str>,
    classifier: C,
}

impl<C> fmt::Debug for CircuitBreakerLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayerBuilder")
            .field("window", &self.window)
            .field("min_calls", &self.min_calls)
            .field("failure_rate", &self.failure_rate)
            .field("slow", &self.slow)
            .field("consecutive", &self.consecutive)
            .field("open_base", &self.open_base)
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

impl<C> CircuitBreakerLayerBuilder<C> {
    /// Judge rates over the last `calls` calls (1 to 1,000,000).
    pub fn count_window(mut self, calls: u32) -> Self {
        self.window = Window::Count(calls);
        self
    }

    /// Judge rates over the last `span`, in one-second buckets (a fraction
    /// of a second is rounded up; 1 s to one day). Default 30 s.
    pub fn time_window(mut self, span: Duration) -> Self {
        self.window = Window::Time(span);
        self
    }

    /// Calls the window must hold before a rate is judged. At least 1, and at
    /// most the size of a count window. Default 20.
    pub fn min_calls(mut self, n: u32) -> Self {
        self.min_calls = n;
        self
    }

    /// Trip when at least this fraction of the calls in the window failed
    /// (0 to 1). Default 0.5.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Do not trip on the failure rate.
    pub fn no_failure_rate(mut self) -> Self {
        self.failure_rate = None;
        self
    }

    /// A call slower than `threshold` (success or not) is slow; trip when at
    /// least `rate` (0 to 1) of the calls in the window were slow. Default:
    /// off. A slow half-open probe counts as a failed probe.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.slow = Some((threshold, rate));
        self
    }

    /// Trip after `n` failures in a row (at least 1). Default 5.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive = Some(n);
        self
    }

    /// Do not trip on consecutive failures.
    pub fn no_consecutive_failures(mut self) -> Self {
        self.consecutive = None;
        self
    }

    /// Trip at once on a failure with one of these reasons. Default:
    /// [`Reason::Quota`] and [`Reason::Auth`].
    pub fn trip_on(mut self, reasons: &[Reason]) -> Self {
        self.trip_on = reasons.to_vec();
        self
    }

    /// How long the breaker stays open after a first trip (above zero, at
    /// most one day). Default 15 s.
    pub fn open_duration(mut self, base: Duration) -> Self {
        self.open_base = base;
        self
    }

    /// Each consecutive trip (without closing in between) multiplies the open
    /// period by `multiplier` (at least 1), up to `cap` (at least the base,
    /// at most one day). Default ×2 up to 5 min.
    pub fn open_growth(mut self, multiplier: f64, cap: Duration) -> Self {
        self.open_multiplier = multiplier;
        self.open_cap = cap;
        self
    }

    /// Shortens each open period by a random fraction of up to `ratio`
    /// (0 to below 1), so breakers that tripped together do not probe
    /// together. Default 0.1.
    pub fn open_jitter(mut self, ratio: f64) -> Self {
        self.open_jitter = ratio;
        self
    }

    /// Probes admitted in half-open (1 to 1,000); that many successes close
    /// the breaker, one failure re-opens it. Default 3.
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.probes = n;
        self
    }

    /// When a half-open period has lasted this long and every probe permit
    /// is still taken, the next caller starts a new half-open period with
    /// fresh permits (the late results of the old probes are ignored), so a
    /// hung probe never leaves the breaker stuck. Above zero; a duration too
    /// long for the breaker's clock (`Duration::MAX`) means no limit.
    /// Default 2 min.
    pub fn probe_timeout(mut self, t: Duration) -> Self {
        self.probe_timeout = t;
        self
    }

    /// Stay open at least as long as the tripping failure's server hint
    /// (`retry-after-ms`, `retry-after`, rate-limit reset headers; see
    /// [`hint`](crate::classify::hint)), up to `cap` (above zero;
    /// `Duration::MAX` honours every hint). Default one hour.
    pub fn server_hints(mut self, cap: Duration) -> Self {
        self.hint_cap = Some(cap);
        self
    }

    /// Ignore server hints: the open period is the configured one only.
    pub fn ignore_server_hints(mut self) -> Self {
        self.hint_cap = None;
        self
    }

    /// Seeds the open-period jitter, for reproducible runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Called on every state change and every rejected call, never under a
    /// lock. Nothing is built for it when none is set. Runs on the caller's
    /// task; keep it short.
    pub fn on_event(mut self, f: impl Fn(&BreakerEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// The breaker's name: the `breaker` label of its metrics (default
    /// `"default"`; the agent pipeline names each target's breaker after
    /// the target).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The classifier that decides what a failure is (any
    /// [`Classify`](crate::classify::Classify), or a closure). Failures are
    /// the outcomes for which
    /// [`Outcome::is_target_failure`](crate::classify::Outcome::is_target_failure)
    /// holds; bad requests are neutral.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayerBuilder<C2> {
        self.map_classifier(|_| classifier)
    }

    /// A streamed response's outcome is recorded when its stream ends, not
    /// when the response (its first chunk) arrives: a clean end is a
    /// success, an error mid-stream a failure (classified by
    /// [`Classify::classify_stream_error`](crate::classify::Classify::classify_stream_error)),
    /// and a stream the caller drops before its end records nothing (a
    /// half-open probe gives its permit back). The slow-call rule still
    /// judges the time to the response. The inner service's response must
    /// be a [`GuardedResponse`](crate::guard::GuardedResponse); see
    /// [`crate::guard`].
    pub fn record_at_stream_end(self) -> CircuitBreakerLayerBuilder<StreamClassifier<C>> {
        self.map_classifier(StreamClassifier)
    }

    pub(crate) fn map_classifier<C2>(
        self,
        f: impl FnOnce(C) -> C2,
    ) -> CircuitBreakerLayerBuilder<C2> {
        let classifier = f(self.classifier);
        CircuitBreakerLayerBuilder {
            window: self.window,
            min_calls: self.min_calls,
            failure_rate: self.failure_rate,
            slow: self.slow,
            consecutive: self.consecutive,
            open_base: self.open_base,
            open_multiplier: self.open_multiplier,
            open_cap: self.open_cap,
            open_jitter: self.open_jitter,
            probes: self.probes,
            probe_timeout: self.probe_timeout,
            hint_cap: self.hint_cap,
            trip_on: self.trip_on,
            seed: self.seed,
            listener: self.listener,
            name: self.name,
            classifier,
        }
    }

    /// One breaker per key that `key` extracts from the request (provider,
    /// model, credential), each with this configuration, in a map bounded by
    /// [`max_keys`](KeyedCircuitBreakerLayerBuilder::max_keys).
    pub fn key_by<Req, K, F>(self, key: F) -> KeyedCircuitBreakerLayerBuilder<C, F, K>
    where
        F: Fn(&Req) -> K,
    {
        KeyedCircuitBreakerLayerBuilder {
            base: self,
            key,
            max_keys: 1_024,
            _key: PhantomData,
        }
    }

    pub(crate) fn settings(&self, keyed: bool) -> Result<Settings, ConfigError> {
        let window = match self.window {
            Window::Count(0) => return Err(ConfigError::new("count_window", "must be at least 1")),
            Window::Count(n) if n > MAX_COUNT_WINDOW => {
                return Err(ConfigError::new("count_window", "must be at most 1000000"))
            }
            Window::Count(n) => WindowSpec::Count(n),
            Window::Time(d) if d.is_zero() => {
                return Err(ConfigError::new("time_window", "must be above zero"))
            }
            Window::Time(d) => {
                // Not `as u64`: `Duration::MAX` rounds up to 2^64 seconds,
                // which would wrap to a zero-second window.
                let secs = u64::try_from(d.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX);
                if secs > MAX_TIME_WINDOW {
                    return Err(ConfigError::new("time_window", "must be at most one day"));
                }
                WindowSpec::Time(secs as u32)
            }
        };
        if self.min_calls == 0 {
            return Err(ConfigError::new("min_calls", "must be at least 1"));
        }
        if let WindowSpec::Count(n) = window {
            if self.min_calls > n {
                return Err(ConfigError::new(
                    "min_calls",
                    "must be at most the count window's size",
                ));
            }
        }
        let rate_ok = |r: f64| r.is_finite() && (0.0..=1.0).contains(&r);
        if self.failure_rate.is_some_and(|r| !rate_ok(r)) {
            return Err(ConfigError::new("failure_rate", "must be from 0 to 1"));
        }
        if let Some((threshold, rate)) = self.slow {
            if threshold.is_zero() {
                return Err(ConfigError::new(
                    "slow_calls",
                    "threshold must be above zero",
                ));
            }
            if !rate_ok(rate) {
                return Err(ConfigError::new("slow_calls", "rate must be from 0 to 1"));
            }
        }
        if self.consecutive == Some(0) {
            return Err(ConfigError::new(
                "consecutive_failures",
                "must be at least 1",
            ));
        }
        if self.open_base.is_zero() {
            return Err(ConfigError::new("open_duration", "must be above zero"));
        }
        if self.open_base > MAX_OPEN {
            return Err(ConfigError::new("open_duration", "must be at most one day"));
        }
        if !self.open_multiplier.is_finite() || self.open_multiplier < 1.0 {
            return Err(ConfigError::new(
                "open_growth",
                "multiplier must be at least 1",
            ));
        }
        if self.open_cap < self.open_base {
            return Err(ConfigError::new(
                "open_growth",
                "cap must be at least `open_duration`",
            ));
        }
        if self.open_cap > MAX_OPEN {
            return Err(ConfigError::new(
                "open_growth",
                "cap must be at most one day",
            ));
        }
        if !self.open_jitter.is_finite() || !(0.0..1.0).contains(&self.open_jitter) {
            return Err(ConfigError::new("open_jitter", "must be from 0 to below 1"));
        }
        if self.probes == 0 {
            return Err(ConfigError::new("half_open_probes", "must be at least 1"));
        }
        if self.probes > MAX_PROBES {
            return Err(ConfigError::new("half_open_probes", "must be at most 1000"));
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::new("probe_timeout", "must be above zero"));
        }
        if self.hint_cap.is_some_and(|c| c.is_zero()) {
            return Err(ConfigError::new("server_hints", "cap must be above zero"));
        }
        Ok(Settings {
            window,
            min_calls: u64::from(self.min_calls),
            failure_rate: self.failure_rate,
            slow_threshold: self.slow.map(|(t, _)| t),
            slow_rate: self.slow.map_or(1.0, |(_, r)| r),
            consecutive: self.consecutive,
            open_base: self.open_base,
            open_multiplier: self.open_multiplier,
            open_cap: self.open_cap,
            open_jitter: self.open_jitter,
            probes: self.probes,
            probe_timeout: self.probe_timeout,
            hint_cap: self.hint_cap,
            trip_on: self.trip_on.clone(),
            seed: self.seed.unwrap_or_else(rand::random),
            listener: self.listener.clone(),
            metrics: Metrics::new(self.name.clone(), keyed),
        })
    }

    /// Checks the values and creates the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        let settings = Arc::new(self.settings(false)?);
        Ok(CircuitBreakerLayer {
            shared: Arc::new(Shared {
                core: Core::new(settings, Origin::new(Instant::now())),
                classifier: Arc::new(self.classifier),
            }),
        })
    }
}

/// Builds a validated [`KeyedCircuitBreakerLayer`]; made by
/// [`CircuitBreakerLayerBuilder::key_by`].
pub struct KeyedCircuitBreakerLayerBuilder<C, F, K> {
    base: CircuitBreakerLayerBuilder<C>,
    key: F,
    max_keys: usize,
    _key: PhantomData<fn() -> K>,
}

impl<C, F, K> fmt::Debug for KeyedCircuitBreakerLayerBuilder<C, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayerBuilder")
            .field("base", &self.base)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<C, F, K> KeyedCircuitBreakerLayerBuilder<C, F, K> {
    /// The most keys (breakers) kept at once (at least 1). When a new key
    /// arrives at the bound, a closed breaker is evicted first (its window
    /// is lost, its state was healthy); only if none is closed does the
    /// oldest breaker go. Default 1,024.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Checks the values and creates the layer.
    pub fn build(self) -> Result<KeyedCircuitBreakerLayer<K, F, C>, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::new("max_keys", "must be at least 1"));
        }
        let settings = Arc::new(self.base.settings(true)?);
        Ok(KeyedCircuitBreakerLayer::from_shared(Arc::new(
            KeyedShared::new(
                self.key,
                settings,
                Arc::new(self.base.classifier),
                self.max_keys,
            ),
        )))
    }
}
