//! [`ChaosLayer`], its builder and its run-time [`ChaosHandle`].

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower_layer::Layer;

use super::fault::{Fault, Latency, Window};
use super::Chaos;
use crate::error::ConfigError;
use crate::util::rng::{splitmix, SplitMix};

#[derive(Clone, Debug)]
enum Action {
    Fail(Fault),
    Delay(Latency),
}

#[derive(Clone, Debug)]
struct Rule {
    action: Action,
    probability: f64,
    window: Window,
}

/// What to do with one call.
pub(crate) enum Plan {
    Pass,
    Delay(Duration),
    Fail { wait: Duration, fault: Fault },
}

/// State shared by the layer, every service it made and every handle.
pub(crate) struct Shared {
    enabled: AtomicBool,
    rules: Vec<Rule>,
    // Whether any rule is limited in time (else the clock is never read).
    timed: bool,
    seed: u64,
    sequence: AtomicU64,
    base: Instant,
    offset_nanos: AtomicU64,
    forced: AtomicBool,
    forced_fault: Mutex<Option<Fault>>,
    passed: AtomicU64,
    failed: AtomicU64,
    delayed: AtomicU64,
    metrics: Metrics,
}

/// `llm_resilience_chaos_injected_total{chaos, kind}` (feature `metrics`),
/// one handle per kind registered when the layer is built: `error`,
/// `timeout` (a [`Fault::Timeout`]) and `latency` (a call delayed).
struct Metrics {
    #[cfg(feature = "metrics")]
    injected: [metrics::Counter; 3],
}

impl Metrics {
    const KINDS: [&'static str; 3] = ["error", "timeout", "latency"];

    fn new(name: Cow<'static, str>) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = name;
        Self {
            #[cfg(feature = "metrics")]
            injected: Self::KINDS.map(|kind| {
                metrics::counter!(
                    "llm_resilience_chaos_injected_total",
                    "chaos" => name.clone(),
                    "kind" => kind
                )
            }),
        }
    }

    /// Counts one injection: 0 error, 1 timeout, 2 latency.
    #[inline]
    fn injected(&self, kind: usize) {
        #[cfg(feature = "metrics")]
        self.injected[kind].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = (kind, Self::KINDS);
    }

    fn failed(&self, fault: &Fault) {
        self.injected(usize::from(matches!(fault, Fault::Timeout(_))));
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Shared {
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn elapsed(&self) -> Duration {
        let offset = Duration::from_nanos(self.offset_nanos.load(Ordering::Relaxed));
        Instant::now()
            .saturating_duration_since(self.base)
            .saturating_sub(offset)
    }

    /// Decides one call. Every rule draws once, in order, whether or not it
    /// applies, so one rule's window never shifts another rule's draws.
    pub(crate) fn plan(&self) -> Plan {
        if self.forced.load(Ordering::Acquire) {
            let fault = self
                .forced_fault
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(fault) = fault {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.failed(&fault);
                return Plan::Fail {
                    wait: fault.wait(),
                    fault,
                };
            }
        }
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        // SplitMix64 draws for one call: a pure function of (seed, call
        // number), so the same seed gives the same sequence whatever the
        // clock or the tasks do.
        let stream = splitmix(seq.wrapping_mul(GOLDEN).wrapping_sub(GOLDEN));
        let mut draws = SplitMix(self.seed ^ stream);
        let elapsed = if self.timed {
            self.elapsed()
        } else {
            Duration::ZERO
        };
        let mut delay = Duration::ZERO;
        let mut delayed = false;
        let mut fail: Option<&Fault> = None;
        for rule in &self.rules {
            let hit = draws.next_f64() < rule.probability;
            let sample = draws.next_f64();
            if !hit || !rule.window.contains(elapsed) {
                continue;
            }
            match &rule.action {
                Action::Delay(l) => {
                    delay = delay.saturating_add(l.sample(sample));
                    delayed = true;
                }
                Action::Fail(f) => {
                    if fail.is_none() {
                        fail = Some(f);
                    }
                }
            }
        }
        if delayed {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            self.metrics.injected(2);
        }
        match fail {
            Some(f) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.failed(f);
                Plan::Fail {
                    wait: delay.saturating_add(f.wait()),
                    fault: f.clone(),
                }
            }
            None => {
                self.passed.fetch_add(1, Ordering::Relaxed);
                if delayed && !delay.is_zero() {
                    Plan::Delay(delay)
                } else {
                    Plan::Pass
                }
            }
        }
    }
}

/// Injects faults, latency, outages and timeouts; see the
/// [module docs](crate::chaos).
///
/// Clones share one state (switch, counters, call sequence).
#[derive(Clone)]
pub struct ChaosLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for ChaosLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosLayer")
            .field("enabled", &self.shared.enabled())
            .field("rules", &self.shared.rules)
            .field("seed", &self.shared.seed)
            .finish_non_exhaustive()
    }
}

impl ChaosLayer {
    /// A builder with no rules, enabled, seed 0.
    pub fn builder() -> ChaosLayerBuilder {
        ChaosLayerBuilder {
            rules: Vec::new(),
            seed: 0,
            enabled: true,
            name: Cow::Borrowed("default"),
        }
    }

    /// A layer that injects nothing until switched (a handle can force an
    /// outage).
    pub fn disabled() -> Self {
        Self::builder()
            .enabled(false)
            .build()
            .expect("an empty configuration is valid")
    }

    /// A handle to switch the layer at run time and read its counters.
    pub fn handle(&self) -> ChaosHandle {
        ChaosHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> Layer<S> for ChaosLayer {
    type Service = Chaos<S>;

    fn layer(&self, inner: S) -> Chaos<S> {
        Chaos::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Builds a validated [`ChaosLayer`].
#[derive(Debug)]
pub struct ChaosLayerBuilder {
    rules: Vec<Rule>,
    seed: u64,
    enabled: bool,
    name: Cow<'static, str>,
}

fn probability(p: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(ConfigError::new("probability", "must be between 0 and 1"))
    }
}

impl ChaosLayerBuilder {
    /// The layer's name: the `chaos` label of its metrics (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The seed of every random decision; the same seed gives the same
    /// sequence of injections.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Whether the layer starts enabled (default `true`).
    pub fn enabled(mut self, on: bool) -> Self {
        self.enabled = on;
        self
    }

    /// Answers `fault` to a fraction `probability` of calls, all the time.
    pub fn error_rate(self, fault: Fault, probability: f64) -> Self {
        self.error_rate_during(Window::ALWAYS, fault, probability)
    }

    /// Answers `fault` to a fraction `probability` of the calls made inside
    /// `window`.
    pub fn error_rate_during(mut self, window: Window, fault: Fault, probability: f64) -> Self {
        self.rules.push(Rule {
            action: Action::Fail(fault),
            probability,
            window,
        });
        self
    }

    /// Adds latency from `latency` to a fraction `probability` of calls.
    pub fn latency(self, latency: Latency, probability: f64) -> Self {
        self.latency_during(Window::ALWAYS, latency, probability)
    }

    /// Adds latency to a fraction of the calls made inside `window`.
    pub fn latency_during(mut self, window: Window, latency: Latency, probability: f64) -> Self {
        self.rules.push(Rule {
            action: Action::Delay(latency),
            probability,
            window,
        });
        self
    }

    /// Every call inside `window` fails with `fault` (an outage).
    pub fn outage(self, window: Window, fault: Fault) -> Self {
        self.error_rate_during(window, fault, 1.0)
    }

    /// A fraction `probability` of calls hang for `after`, then answer
    /// [`Error::Timeout`](crate::Error::Timeout).
    pub fn timeout_rate(self, after: Duration, probability: f64) -> Self {
        self.error_rate(Fault::Timeout(after), probability)
    }

    /// Validates and builds the layer. Time windows count from now.
    pub fn build(self) -> Result<ChaosLayer, ConfigError> {
        for rule in &self.rules {
            probability(rule.probability)?;
            if let Some(until) = rule.window.until {
                if until < rule.window.from {
                    return Err(ConfigError::new("window", "needs from <= until"));
                }
            }
            if let Action::Delay(l) = &rule.action {
                l.validate("latency")?;
            }
        }
        Ok(ChaosLayer {
            shared: Arc::new(Shared {
                enabled: AtomicBool::new(self.enabled),
                timed: self.rules.iter().any(|r| r.window != Window::ALWAYS),
                rules: self.rules,
                seed: self.seed,
                sequence: AtomicU64::new(0),
                base: Instant::now(),
                offset_nanos: AtomicU64::new(0),
                forced: AtomicBool::new(false),
                forced_fault: Mutex::new(None),
                passed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
                metrics: Metrics::new(self.name),
            }),
        })
    }
}

/// Switches a [`ChaosLayer`] at run time and reads what it did.
#[derive(Clone)]
pub struct ChaosHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for ChaosHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosHandle")
            .field("enabled", &self.is_enabled())
            .field("injected_errors", &self.injected_errors())
            .finish_non_exhaustive()
    }
}

impl ChaosHandle {
    /// Starts injecting.
    pub fn enable(&self) {
        self.shared.enabled.store(true, Ordering::Relaxed);
    }

    /// Stops injecting: every call goes straight to the inner service.
    pub fn disable(&self) {
        self.shared.enabled.store(false, Ordering::Relaxed);
    }

    /// Whether the layer injects.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled()
    }

    /// Starts an outage now: every call fails with `fault` until
    /// [`end_outage`](Self::end_outage). Enables the layer.
    pub fn start_outage(&self, fault: Fault) {
        *self
            .shared
            .forced_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(fault);
        self.shared.forced.store(true, Ordering::Release);
        self.enable();
    }

    /// Ends an outage started with [`start_outage`](Self::start_outage).
    pub fn end_outage(&self) {
        self.shared.forced.store(false, Ordering::Release);
    }

    /// Makes time windows count from now.
    pub fn restart_clock(&self) {
        let since = Instant::now().saturating_duration_since(self.shared.base);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.shared.offset_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Calls answered with an injected fault.
    pub fn injected_errors(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Calls that got added latency.
    pub fn injected_delays(&self) -> u64 {
        self.shared.delayed.load(Ordering::Relaxed)
    }

    /// Calls passed on to the inner service while enabled.
    pub fn passed(&self) -> u64 {
        self.shared.passed.load(Ordering::Relaxed)
    }
}
