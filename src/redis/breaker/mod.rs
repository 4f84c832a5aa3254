//! Breaker state shared across processes through Redis (feature `redis`):
//! a trip in one process opens the same key's breaker in the others, and
//! the processes together send one half-open probe budget, as LiteLLM's
//! proxies share their deployments' cooldowns.
//!
//! ```no_run
//! use std::time::Duration;
//! use llm_resilience::breaker::CircuitBreakerLayer;
//! use llm_resilience::redis::breaker::{SharedBreaker, SharedBreakerConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = CircuitBreakerLayer::builder()
//!     .consecutive_failures(5)
//!     .open_duration(Duration::from_secs(30))
//!     .build()?;
//! let config = SharedBreakerConfig::builder("gateway").build()?;
//! // Every process attaches its own breaker under the same namespace and
//! // name; keep the returned guard for as long as the sharing should last.
//! let shared = SharedBreaker::attach("redis://127.0.0.1:6379/", &config, "openai", &layer.handle())?;
//! // ... build services with `layer` and serve ...
//! # drop(shared);
//! # Ok(()) }
//! ```
//!
//! A [keyed breaker](crate::breaker::KeyedCircuitBreakerLayer) shares each
//! key under the name a function gives it
//! ([`SharedBreaker::attach_keyed`]): only breakers of the same name (and
//! namespace) share state.
//!
//! # How it works
//!
//! Local state stays the fast path: a call never waits on Redis, and a
//! closed breaker does exactly what an unshared one does (no Redis call, no
//! lock, nothing read that an unshared breaker does not read). Each
//! attachment runs one background task on the runtime it was attached in;
//! the breakers wake it on their state changes.
//!
//! - **Trips.** When a breaker opens (closed or half-open to open), the task
//!   runs one script that numbers the trip (an epoch that only grows),
//!   stores the open period's end by the Redis server's clock in the key's
//!   record, and publishes the trip on the namespace's channel. Every other
//!   process subscribed there opens its breaker for the same name until
//!   the shared end (counting a trip, as its own would; an open breaker's
//!   period is moved to the shared end). A process that subscribes late,
//!   or resubscribes after losing its connection, and a keyed breaker made
//!   after the trip, read the record instead (in pipelines of 256 names per
//!   round trip).
//! - **Probes.** When a breaker's open period ends, the breaker does not go
//!   half-open until its task has taken the key's probe permit. The first
//!   call after the end asks for it (so the permit goes to a process with
//!   traffic), and the task runs one script: the first process to ask gets
//!   it, once the shared end has passed; a process refused is held open
//!   until the holder's lease would lapse, unless the outcome comes first;
//!   a process asking after the holder closed closes too. Meanwhile calls
//!   are refused as open, told to retry after 50 ms. The
//!   process with the permit sends its usual
//!   [`half_open_probes`](crate::breaker::CircuitBreakerLayerBuilder::half_open_probes);
//!   the others stay open until it publishes the outcome: its breaker
//!   closed (the others close) or opened again (a new trip, as above). So
//!   the processes together send one half-open budget per open period
//!   (give every process the same breaker settings). If the prober goes
//!   away, its permit lapses after the breaker's
//!   [`probe_timeout`](crate::breaker::CircuitBreakerLayerBuilder::probe_timeout)
//!   and another process takes it.
//! - **How fast.** A trip is published as soon as the task runs after the
//!   state change (one script round trip) and reaches the subscribers in
//!   one more hop: milliseconds on a healthy network (2.6 to 3.9 ms between
//!   two runtimes on one machine over loopback, as printed by `cargo test
//!   --all-features --test redis_breaker -- --nocapture`). The bound this module
//!   documents is **one second** from the trip to the other processes'
//!   breakers being open, while both are connected. A
//!   process that was disconnected catches up when it resubscribes: it
//!   retries 50 ms doubling to at most 1 s, so within about a second of
//!   Redis answering again.
//! - **Redis unreachable.** Every breaker keeps working alone, exactly as
//!   an unshared one (its open periods end by its own clock); the task
//!   reports [`SharedBreakerEvent::Disconnected`], sets the gauge below to
//!   0, and reconnects by itself. Every Redis command is bounded by the
//!   [`response_timeout`](SharedBreakerConfigBuilder::response_timeout).
//!   Dropping the [`SharedBreaker`] guard (or shutting down its runtime)
//!   stops the task and leaves the breakers working alone.
//!
//! Operators' states ([`force_open`](crate::breaker::BreakerHandle::force_open),
//! forced closed, disabled) stay local: they are neither published nor
//! overridden by another process's trip or close. A
//! [`reset`](crate::breaker::BreakerHandle::reset) is local too (unless this
//! process holds the probe permit: then it counts as its probes' success
//! and is published).
//! [`BreakerHandle::trip`](crate::breaker::BreakerHandle::trip) opens a
//! breaker as a failure would, so it is published.
//!
//! # Keys
//!
//! For a namespace `ns`: the channel `llmbrk:{ns}`, the epoch counter
//! `llmbrk:{ns}:epoch`, and per name a hash `llmbrk:{ns}:key:<name>`
//! (`epoch`, `until`, `prober`, `lease`, `closed`) that expires two probe
//! timeouts after its open period ends or the prober's breaker closes (a
//! process that asks for the permit after the close, having missed the
//! message, closes instead of probing).
//! Names are stored and published in clear: name a key after a credential's
//! id or a digest, never the credential.
//!
//! # Events and metrics
//!
//! [`SharedBreakerEvent`]s go to the
//! [`on_event`](SharedBreakerConfigBuilder::on_event) hook; they never carry
//! a name. With the `metrics` feature, labelled by `namespace`: the gauge
//! `llm_resilience_shared_breaker_connected` (1 while connected, 0 while the
//! breakers work alone) and the counter
//! `llm_resilience_shared_breaker_events_total{kind}` (the
//! [`kind`](SharedBreakerEvent::kind) names).

mod event;
mod scripts;
mod task;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use self::event::Metrics;
pub use self::event::SharedBreakerEvent;
use self::task::{Ctx, Source};
use crate::breaker::{BreakerHandle, KeyedBreakerHandle, Link};
use crate::error::ConfigError;
use crate::redis::config::{check_duration_in, check_name};

type Listener = Arc<dyn Fn(&SharedBreakerEvent) + Send + Sync>;

/// The longest duration a timeout accepts (one minute): a coordination
/// that waits longer on Redis keeps its breakers waiting for a permit.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Validated settings of a shared breaker namespace.
#[derive(Clone)]
pub struct SharedBreakerConfig {
    namespace: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    listener: Option<Listener>,
}

impl fmt::Debug for SharedBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBreakerConfig")
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

impl SharedBreakerConfig {
    /// A builder for the namespace `namespace` (part of every key and the
    /// channel: processes share breakers within one namespace), with 2 s
    /// connect and 1 s response timeouts: a probe decision waits at most a
    /// response timeout before the breakers fall back to working alone.
    pub fn builder(namespace: impl Into<String>) -> SharedBreakerConfigBuilder {
        SharedBreakerConfigBuilder(Self {
            namespace: namespace.into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            listener: None,
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// Builder of [`SharedBreakerConfig`].
#[derive(Clone)]
pub struct SharedBreakerConfigBuilder(SharedBreakerConfig);

impl fmt::Debug for SharedBreakerConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl SharedBreakerConfigBuilder {
    /// Bound on one connection attempt (default 2 s, at most 60 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.0.connect_timeout = d;
        self
    }

    /// Bound on one command's answer (default 1 s, at most 60 s); a Redis
    /// that does not answer within it counts as unreachable.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.0.response_timeout = d;
        self
    }

    /// A hook for the coordination's [`SharedBreakerEvent`]s, called on its
    /// task (keep it short).
    pub fn on_event(mut self, f: impl Fn(&SharedBreakerEvent) + Send + Sync + 'static) -> Self {
        self.0.listener = Some(Arc::new(f));
        self
    }

    /// Checks every field.
    pub fn build(self) -> Result<SharedBreakerConfig, ConfigError> {
        let c = self.0;
        check_name(
            "namespace",
            &c.namespace,
            128,
            &['{', '}', ' '],
            "must be 1 to 128 bytes without braces, spaces or control characters",
        )?;
        for (field, d) in [
            ("connect_timeout", c.connect_timeout),
            ("response_timeout", c.response_timeout),
        ] {
            let one_ms = Duration::from_millis(1);
            check_duration_in(field, d, one_ms, MAX_TIMEOUT, "must be from 1 ms to 60 s")?;
        }
        Ok(c)
    }
}

/// What the task shares with its configuration.
pub(super) struct Inner {
    namespace: String,
    channel: String,
    epoch_key: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    listener: Option<Listener>,
    metrics: Metrics,
}

/// A running coordination: one breaker (or one keyed breaker's map) shared
/// with the other processes of its namespace. Dropping it stops the
/// coordination; the breakers then work alone. A breaker can be attached
/// once in its life.
pub struct SharedBreaker {
    link: Arc<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for SharedBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBreaker")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Drop for SharedBreaker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Single(String, BreakerHandle);

impl Source for Single {
    fn list(&self, out: &mut Vec<(String, BreakerHandle)>) {
        out.push((self.0.clone(), self.1.clone()));
    }
}

struct Keyed<K, F> {
    handle: KeyedBreakerHandle<K>,
    name: F,
}

impl<K, F> Source for Keyed<K, F>
where
    K: Send + Sync + 'static,
    F: Fn(&K) -> String + Send + Sync + 'static,
{
    fn list(&self, out: &mut Vec<(String, BreakerHandle)>) {
        out.extend(
            self.handle
                .entries()
                .into_iter()
                .map(|(k, h)| ((self.name)(&k), h)),
        );
    }
}

impl SharedBreaker {
    /// Shares `breaker` under `name` with the processes attached to the
    /// same namespace on the Redis at `url`, from a task spawned on the
    /// current tokio runtime. Connecting happens on that task: an
    /// unreachable Redis is not an error here (the breaker works alone until
    /// it answers).
    ///
    /// Errors: a malformed URL, an empty or over-long name (at most 256
    /// bytes, no control characters), no tokio runtime, or a breaker
    /// already attached.
    pub fn attach(
        url: &str,
        config: &SharedBreakerConfig,
        name: &str,
        breaker: &BreakerHandle,
    ) -> Result<Self, ConfigError> {
        check_name(
            "name",
            name,
            256,
            &[],
            "must be 1 to 256 bytes without control characters",
        )?;
        let link = Arc::new(Link::default());
        let (client, runtime) = prepare(url)?;
        if !breaker.core().attach(Arc::clone(&link)) {
            return Err(ConfigError::new("breaker", "is already shared"));
        }
        let source = Box::new(Single(name.to_owned(), breaker.clone()));
        Ok(Self::spawn(config, client, runtime, link, source))
    }

    /// Shares every breaker of a keyed breaker's map, now and to come, each
    /// under the name `name` gives its key (a key's breaker is shared only
    /// with the breakers of the same name). `name` runs on the
    /// coordination's task when breakers change state, never on a call.
    /// Errors as [`attach`](Self::attach).
    pub fn attach_keyed<K, F>(
        url: &str,
        config: &SharedBreakerConfig,
        breakers: &KeyedBreakerHandle<K>,
        name: F,
    ) -> Result<Self, ConfigError>
    where
        K: Send + Sync + 'static,
        F: Fn(&K) -> String + Send + Sync + 'static,
    {
        let link = Arc::new(Link::default());
        let (client, runtime) = prepare(url)?;
        if !breakers.attach(Arc::clone(&link)) {
            return Err(ConfigError::new("breakers", "are already shared"));
        }
        let source = Box::new(Keyed {
            handle: breakers.clone(),
            name,
        });
        Ok(Self::spawn(config, client, runtime, link, source))
    }

    fn spawn(
        config: &SharedBreakerConfig,
        client: redis::Client,
        runtime: tokio::runtime::Handle,
        link: Arc<Link>,
        source: Box<dyn Source>,
    ) -> Self {
        let ns = &config.namespace;
        let inner = Arc::new(Inner {
            namespace: ns.clone(),
            channel: format!("llmbrk:{{{ns}}}"),
            epoch_key: format!("llmbrk:{{{ns}}}:epoch"),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            listener: config.listener.clone(),
            metrics: Metrics::new(ns),
        });
        let ctx = Ctx {
            inner,
            client,
            link: Arc::clone(&link),
            source,
            origin: format!("{:016x}", rand::random::<u64>()),
        };
        let task = runtime.spawn(task::run(ctx));
        Self { link, task }
    }

    /// Whether the coordination is connected now (the breakers wait for the
    /// shared probe permit); false while they work alone.
    pub fn is_connected(&self) -> bool {
        self.link
            .connected
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

fn prepare(url: &str) -> Result<(redis::Client, tokio::runtime::Handle), ConfigError> {
    let client = redis::Client::open(url)
        .map_err(|_| ConfigError::new("url", "is not a valid Redis URL"))?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| ConfigError::new("runtime", "attach needs a tokio runtime"))?;
    Ok((client, runtime))
}
