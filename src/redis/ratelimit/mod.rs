//! A rate limit shared by a whole fleet: requests and tokens per window
//! per key, held in Redis and decided on the server, so every process with
//! the same key draws from one limit (feature `redis`; Redis 5 or later:
//! the scripts read `TIME` before writing, which Redis replicates by
//! effects since version 5).
//!
//! ```no_run
//! use std::time::Duration;
//! use llm_resilience::redis::ratelimit::FleetRateLimitLayer;
//! use tower::{service_fn, Layer, Service};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // The same in every process: 500 requests and 200,000 tokens a minute
//! // for the whole fleet of (at most) 4 processes.
//! let limit = FleetRateLimitLayer::builder("redis://127.0.0.1:6379/", "openai:gpt-4o-mini")
//!     .requests(500)
//!     .tokens(200_000)
//!     .window(Duration::from_secs(60))
//!     .fleet_size(4)
//!     .estimate_tokens(|prompt: &String| prompt.len() as u32 / 4 + 256)
//!     .ignore_usage()
//!     .build()?;
//! let mut svc = limit.layer(service_fn(|prompt: String| async move {
//!     Ok::<_, std::io::Error>(prompt.len())
//! }));
//! assert_eq!(svc.call("hello".to_string()).await?, 5);
//! # Ok(()) }
//! ```
//!
//! # The shared limit
//!
//! The same limits as the in-process [`RateLimitLayer`]: a request limit
//! and a token limit per window (a minute by default; any length from 1 ms
//! to a day, e.g. 10 requests per 2 s), each with a burst, both checked at
//! once. Each dimension is a GCRA (one theoretical arrival time: paces
//! calls at the limit's rate with a bucket of `burst` units) and a sliding
//! log of what was admitted in the last window, in at most about 128 slots
//! (a slot keeps the time of its latest call, so it leaves the window no
//! earlier than any call in it). A call goes only when both allow it: **no
//! window of the configured length admits more than the limit**, across
//! every process sharing the key. The log holds each call a
//! [`send_margin`](FleetRateLimitLayerBuilder::send_margin) longer than the
//! window (1/64 of it by default), so that the delay between the decision
//! and the request's arrival at the provider, which varies from call to
//! call, does not put more than the limit into one of the provider's
//! windows either, as long as it varies by less than the margin.
//!
//! Each decision is **one Lua script** run atomically by Redis, on the
//! server's own clock (`TIME`): the clients' clocks never matter. The
//! script admits and charges the call, or answers the wait after which it
//! could go. A waiting caller ([`WhenLimited::Wait`]) sleeps that long in
//! its own process and asks again, until it is admitted or its next wait
//! would take it past `max_wait`; it then fails with
//! [`Error::RateLimited`] carrying that wait, as
//! [`WhenLimited::Reject`] does at once. Waiters are therefore not served
//! in a strict line across the fleet: whoever asks first after the limit
//! frees up goes. A cost above the limit itself fails at once with one
//! window. Under an agent pipeline, a wait past the call's deadline fails
//! at once too.
//!
//! The processes sharing a key must use the same limits, window and burst
//! (each call's script uses its caller's).
//!
//! # Settled and steered, fleet-wide
//!
//! After the call a second script settles it, by the local limiter's
//! rules: the tokens the response reports ([`ReadUsage`]) replace the
//! estimate ([`EstimateTokens`]) (the difference is given back, or charged
//! at once); a 429 gives the call's request and tokens back and, with a
//! wait hint (`retry-after-ms`, `retry-after`, the reset headers), pauses
//! the key for every process until then (at most
//! [`hint_cap`](FleetRateLimitLayerBuilder::hint_cap)), or without one
//! empties the burst; a layer below that refused without sending gives
//! everything back; the provider's `x-ratelimit-*` and
//! `anthropic-ratelimit-*` headers ([`ServerLimits`], scaled from the
//! [server's window](FleetRateLimitLayerBuilder::server_window)) lower the
//! shared limit to the server's and cap the burst at what it says is left
//! (never above the configuration). The settlement is awaited before the
//! response is returned (one more round trip, bounded by the Redis
//! timeout), so the next call anywhere sees it. A caller that drops an
//! admitted call before it was sent gets its charge back (in a task of
//! its own).
//!
//! # When Redis cannot be reached
//!
//! Every Redis call (connecting, each script) is bounded by
//! [`redis_timeout`](FleetRateLimitLayerBuilder::redis_timeout) (250 ms by
//! default). When one fails (refused, timed out, a server error), the
//! layer falls back to an in-process [`RateLimitLayer`] with the same
//! settings and the limits divided by the
//! [`fleet_size`](FleetRateLimitLayerBuilder::fleet_size), so the fleet
//! as a whole stays within the limit while each process limits itself. It
//! says so once: a [`FellBack`](FleetRateLimitEventKind::FellBack) event
//! (a `tracing` warning) and the gauge
//! `llm_resilience_fleet_ratelimit_fallback` set to 1. Then at most one
//! call per [`probe_interval`](FleetRateLimitLayerBuilder::probe_interval)
//! (5 s by default) tries Redis; the others go straight to the fallback,
//! without waiting on Redis. When a probe is answered, calls share the
//! fleet's limit again ([`Recovered`](FleetRateLimitEventKind::Recovered),
//! gauge 0). What the fallback admitted is not known to Redis. The
//! connection reconnects by itself (and reloads the scripts after a Redis
//! restart). A Redis that restarts without persistence has forgotten the
//! window: the limit starts afresh.
//!
//! # Readiness
//!
//! `poll_ready` is always ready: each call waits in its future (for the
//! limit, then for a clone of the inner service to be ready), so a call
//! that waits never holds the inner service's permit (hence `S: Clone`).
//!
//! # Keys in Redis
//!
//! For the key `k`: the hash `llmrl:{k}:state` (per dimension the
//! theoretical arrival time, the total in the window and the limit the
//! server's headers set; the pause), and per dimension (`req`, `tok`) the
//! sorted set `llmrl:{k}:req:log` and the hash `llmrl:{k}:req:cost` (one
//! entry per 1/128 of the window held: about 130 with the default margin).
//! All expire a second after the log's last call has left it (or after the
//! pause's end). The hash tag `{k}` keeps them in one Redis Cluster
//! slot. The key is never logged or exported.
//!
//! # Observability
//!
//! Slow-path events ([`FleetRateLimitEvent`]) go to `tracing` (target
//! `llm_resilience::redis::ratelimit`), to the
//! [hook](FleetRateLimitLayerBuilder::on_event), and with feature
//! `metrics` to:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `llm_resilience_fleet_ratelimit_events_total` | counter | `limiter`, `kind` ([`FleetRateLimitEventKind::as_str`]) |
//! | `llm_resilience_fleet_ratelimit_fallback` | gauge | `limiter` (1 while on the local fallback, 0 after recovering) |
//!
//! The local fallback reports under the same `limiter` name through the
//! in-process limiter's own metrics (`llm_resilience_ratelimit_*`).
//!
//! # Cost
//!
//! An admitted call costs one script round trip before the call and, when
//! the response reports usage other than the estimate or rate-limit
//! headers, one after; one allocation for the boxed future, and the
//! script's arguments. The script's work is constant per call apart from
//! expiring old log slots (each slot once) and, on a wait, reading the
//! log (about 130 entries). On a loaded 2-core machine an admission took
//! 2.3 times one bare `EVALSHA` round trip serially and 3.8 times it with
//! 64 tasks, where the Redis server is the bottleneck (46.8 µs per
//! admitted call: some 20,000 decisions a second for one key); the
//! figures and their command are in `BENCHMARKS.md`.
//!
//! [`Error::RateLimited`]: crate::Error::RateLimited
//! [`RateLimitLayer`]: crate::ratelimit::RateLimitLayer
//! [`WhenLimited::Wait`]: crate::ratelimit::WhenLimited::Wait
//! [`WhenLimited::Reject`]: crate::ratelimit::WhenLimited::Reject
//! [`ReadUsage`]: crate::ratelimit::ReadUsage
//! [`EstimateTokens`]: crate::ratelimit::EstimateTokens
//! [`ServerLimits`]: crate::ratelimit::ServerLimits

mod event;
mod future;
mod layer;
mod script;

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::poll_fn;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

pub use self::event::{FleetRateLimitEvent, FleetRateLimitEventKind};
pub use self::future::ResponseFuture;
pub use self::layer::{FleetRateLimitLayer, FleetRateLimitLayerBuilder};

use self::event::{emit, FleetRateLimitEventKind as Kind, Listener};
use self::future::Charge;
use self::script::{Admit, Store};
use crate::classify::LlmClassifier;
use crate::error::{BoxError, Error};
use crate::ratelimit::{
    scale_limit, ChatEstimate, EstimateTokens, RateLimitLayer, ReadUsage, Reported, ServerLimits,
    WhenLimited,
};

/// The estimator, shared by the fleet limiter and its local fallback.
pub(crate) struct ArcEstimate<E>(Arc<E>);

impl<Req, E: EstimateTokens<Req>> EstimateTokens<Req> for ArcEstimate<E> {
    #[inline]
    fn estimate(&self, req: &Req) -> u32 {
        self.0.estimate(req)
    }
}

/// The usage reader, shared by the fleet limiter and its local fallback.
pub(crate) struct ArcUsage<U>(Arc<U>);

impl<U> Clone for ArcUsage<U> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<Res, U: ReadUsage<Res>> ReadUsage<Res> for ArcUsage<U> {
    #[inline]
    fn tokens_used(&self, res: &Res) -> Option<u64> {
        self.0.tokens_used(res)
    }
    #[inline]
    fn server_limits(&self, res: &Res) -> ServerLimits {
        self.0.server_limits(res)
    }
    #[inline]
    fn reads_nothing(&self) -> bool {
        self.0.reads_nothing()
    }
}

/// The validated settings the fleet side uses.
pub(crate) struct FleetSettings {
    pub(crate) name: Cow<'static, str>,
    pub(crate) listener: Option<Listener>,
    pub(crate) classifier: LlmClassifier,
    pub(crate) when_limited: WhenLimited,
    pub(crate) hint_cap: Duration,
    pub(crate) window: Duration,
    pub(crate) server_window: Option<Duration>,
    pub(crate) probe_interval: Duration,
}

/// Where a call's admission goes.
enum Mode {
    Redis,
    /// Redis was unreachable; this call tries it again.
    Probe,
    Local,
}

/// What every clone shares.
pub(crate) struct Fleet<E, U> {
    store: Store,
    settings: FleetSettings,
    estimate: Arc<E>,
    usage: Arc<U>,
    /// 0 while on Redis; else when (ms from `origin`, at least 1) the next
    /// probe of Redis is due.
    probe_at: AtomicU64,
    origin: Instant,
    /// The fallback, put around a clone of the inner service only when a
    /// call needs it.
    local: RateLimitLayer<ArcEstimate<E>, ArcUsage<U>>,
}

impl<E, U> Fleet<E, U> {
    pub(crate) fn new(
        store: Store,
        settings: FleetSettings,
        estimate: Arc<E>,
        usage: Arc<U>,
        local: RateLimitLayer<ArcEstimate<E>, ArcUsage<U>>,
    ) -> Self {
        Self {
            store,
            settings,
            estimate,
            usage,
            probe_at: AtomicU64::new(0),
            origin: Instant::now(),
            local,
        }
    }

    fn emit(&self, kind: Kind, waited: Option<Duration>, retry_after: Option<Duration>) {
        let s = &self.settings;
        emit(&s.name, s.listener.as_ref(), kind, waited, retry_after);
    }

    fn now_ms(&self) -> u64 {
        let ms = self.origin.elapsed().as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
    }

    fn next_probe(&self) -> u64 {
        let interval = self.settings.probe_interval.as_millis() as u64;
        self.now_ms().saturating_add(interval)
    }

    fn is_local(&self) -> bool {
        self.probe_at.load(Ordering::Acquire) != 0
    }

    fn mode(&self) -> Mode {
        let due = self.probe_at.load(Ordering::Acquire);
        if due == 0 {
            return Mode::Redis;
        }
        let now = self.now_ms();
        let claimed = now >= due
            && self
                .probe_at
                .compare_exchange(due, self.next_probe(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if claimed {
            Mode::Probe
        } else {
            Mode::Local
        }
    }

    /// A Redis call failed: fall back (once, with the event), unless
    /// already there.
    fn redis_failed(&self, probing: bool, err: &redis::RedisError) {
        tracing::debug!(
            target: "llm_resilience::redis::ratelimit",
            limiter = %self.settings.name,
            probing,
            error = %err,
            "fleet rate limiter: redis call failed"
        );
        let fell = self
            .probe_at
            .compare_exchange(0, self.next_probe(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if fell {
            self.emit(Kind::FellBack, None, None);
        }
    }

    /// A probe was answered: back to the shared limit.
    fn recovered(&self) {
        if self.probe_at.swap(0, Ordering::AcqRel) != 0 {
            self.emit(Kind::Recovered, None, None);
        }
    }

    /// The server's limits scaled to our window, and what it says is left.
    fn scaled(&self, server: &ServerLimits) -> [Option<u64>; 4] {
        let Some(server_window) = self.settings.server_window else {
            return [None; 4];
        };
        let scale = |l: Option<u64>| l.map(|l| scale_limit(l, self.settings.window, server_window));
        [
            scale(server.requests.limit),
            server.requests.remaining,
            scale(server.tokens.limit),
            server.tokens.remaining,
        ]
    }
}

/// The fleet rate-limit middleware; made by [`FleetRateLimitLayer`].
pub struct FleetRateLimit<S, E = ChatEstimate, U = Reported> {
    inner: S,
    fleet: Arc<Fleet<E, U>>,
}

impl<S: Clone, E, U> Clone for FleetRateLimit<S, E, U> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            fleet: Arc::clone(&self.fleet),
        }
    }
}

impl<S: fmt::Debug, E, U> fmt::Debug for FleetRateLimit<S, E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetRateLimit")
            .field("inner", &self.inner)
            .field("local", &self.fleet.is_local())
            .finish_non_exhaustive()
    }
}

impl<S, E, U> FleetRateLimit<S, E, U> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether calls go through the local fallback now.
    pub fn is_local(&self) -> bool {
        self.fleet.is_local()
    }
}

async fn call_ready<Svc: Service<Req>, Req>(mut svc: Svc, req: Req) -> Result<Svc::Response, Error>
where
    Svc::Error: Into<BoxError>,
{
    poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(Error::from_inner)?;
    svc.call(req).await.map_err(Error::from_inner)
}

/// One call: the shared admission (waiting as the script says), the inner
/// call, the settlement; or the local fallback.
async fn run<S, Req, E, U>(
    fleet: Arc<Fleet<E, U>>,
    mut svc: S,
    req: Req,
) -> Result<S::Response, Error>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    E: EstimateTokens<Req>,
    U: ReadUsage<S::Response>,
{
    let mut probing = match fleet.mode() {
        Mode::Redis => false,
        Mode::Probe => true,
        Mode::Local => return call_ready(fleet.local.layer(svc), req).await,
    };
    let tokens = u64::from(fleet.estimate.estimate(&req));
    let since = Instant::now();
    let mut waited = false;
    let slot = loop {
        let admit = match fleet.store.admit(tokens).await {
            Ok(a) => a,
            Err(e) => {
                fleet.redis_failed(probing, &e);
                return call_ready(fleet.local.layer(svc), req).await;
            }
        };
        if std::mem::take(&mut probing) {
            fleet.recovered();
        }
        let wait = match admit {
            Admit::Granted(slot) => break slot,
            Admit::Never => {
                let window = fleet.settings.window;
                fleet.emit(Kind::Rejected, None, Some(window));
                return Err(Error::RateLimited {
                    retry_after: window,
                });
            }
            Admit::Wait(wait) => wait,
        };
        let elapsed = since.elapsed();
        let within_deadline = crate::fallback::current_deadline()
            .is_none_or(|d| Instant::now().checked_add(wait).is_some_and(|at| at < d));
        let may_wait = match fleet.settings.when_limited {
            WhenLimited::Wait { max_wait } => {
                elapsed.saturating_add(wait) <= max_wait && within_deadline
            }
            _ => false,
        };
        if !may_wait {
            let (kind, waited_for) = if waited {
                (Kind::TimedOut, Some(elapsed))
            } else {
                (Kind::Rejected, None)
            };
            fleet.emit(kind, waited_for, Some(wait));
            return Err(Error::RateLimited { retry_after: wait });
        }
        if !waited {
            waited = true;
            fleet.emit(Kind::Waiting, None, Some(wait));
        }
        tokio::time::sleep(wait).await;
    };
    if waited {
        fleet.emit(Kind::Admitted, Some(since.elapsed()), None);
    }
    // Dropped before the call is sent (an error readying the inner
    // service, or the caller gave up), the charge goes back.
    let mut charge = Charge::new(Arc::clone(&fleet), slot, tokens);
    poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(Error::from_inner)?;
    let fut = svc.call(req);
    charge.sent();
    let result = fut.await.map_err(Error::from_inner);
    let settle = charge.settlement(result.as_ref());
    charge.finish(settle).await;
    result
}

impl<S, Req, E, U> Service<Req> for FleetRateLimit<S, E, U>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    Req: Send + 'static,
    E: EstimateTokens<Req>,
    U: ReadUsage<S::Response>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    /// Always ready: the call waits in its future.
    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = run(Arc::clone(&self.fleet), self.inner.clone(), req);
        ResponseFuture {
            inner: Box::pin(fut),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ratelimit::scale_limit as scale;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn scales_the_servers_limit_to_our_window() {
        let min = Duration::from_secs(60);
        assert_eq!(scale(600, Duration::from_secs(1), min), 10);
        assert_eq!(scale(10_000, Duration::from_secs(1), min), 166);
        assert_eq!(scale(59, Duration::from_secs(1), min), 0);
        assert_eq!(
            scale(
                u64::MAX,
                Duration::from_secs(86_400),
                Duration::from_nanos(1)
            ),
            u64::MAX
        );
    }

    proptest! {
        #[test]
        fn scaling_never_raises_a_limit_per_unit_of_time(
            l in any::<u64>(), w in 1u64..86_400_000, sw in 1u64..86_400_000,
        ) {
            let (w, sw) = (Duration::from_millis(w), Duration::from_millis(sw));
            let got = u128::from(scale(l, w, sw));
            // got / w <= l / sw
            prop_assert!(got * sw.as_nanos() <= u128::from(l) * w.as_nanos());
        }
    }
}
