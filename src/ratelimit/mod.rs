//! Rate limit: requests and tokens per window, shared by every clone, per
//! key, and steered by the provider's own rate-limit headers.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::ratelimit::RateLimitLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let limit = RateLimitLayer::builder()
//!     .requests(500)
//!     .tokens(200_000)
//!     .window(Duration::from_secs(60))
//!     .estimate_tokens(|prompt: &String| prompt.len() as u32 / 4 + 256)
//!     .ignore_usage()
//!     .build()?;
//! let handle = limit.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(limit)
//!     .service(service_fn(|prompt: String| async move {
//!         Ok::<_, std::io::Error>(prompt.len())
//!     }));
//! assert_eq!(svc.oneshot("hello".to_string()).await?, 5);
//! assert_eq!(handle.snapshot().requests, Some(49));
//! # Ok(()) }
//! ```
//!
//! With the crate's client (feature `reqwest`) nothing else is needed:
//! `RateLimitLayer::builder().requests(500).tokens(200_000).build()?`
//! estimates each [`ChatRequest`](crate::client::ChatRequest)'s tokens
//! ([`ChatEstimate`]) and settles them with the
//! [`ChatResponse`](crate::client::ChatResponse)'s reported usage and
//! rate-limit headers ([`ReportsUsage`]).
//!
//! # Limits and the algorithm
//!
//! A request limit and a token limit per window (a minute by default; any
//! length), each with a burst, both checked at once: a call goes only when
//! both allow it. Each dimension combines two exact pieces:
//!
//! - a **GCRA** (generic cell rate algorithm: one "theoretical arrival
//!   time" per dimension) paces calls at the limit's rate, with a bucket of
//!   [`burst`](RateLimitLayerBuilder::burst) units for calls that arrive
//!   together. It is what releases waiters one after the other at the
//!   limit's pace, not all at once when a window opens.
//! - a **sliding log** of what was admitted in the last window, in at most
//!   128 entries per window (calls admitted within 1/128 of the window of
//!   each other share an entry, which leaves the window with its latest
//!   call). A call goes only if the log, plus its cost, stays within the
//!   limit.
//!
//! Why both: a GCRA alone at the full rate with a burst of `b` admits up to
//! `limit + b - 1` calls in some windows (the burst, then a window's worth
//! at the paced rate); made exact on its own it must slow its rate to
//! `(limit - b + 1)` per window, and a token bucket deep enough for one
//! large prompt would give up much of the token limit. The log makes the
//! window exact at the full rate: **no window of the configured length ever
//! admits more than the limit** (property-tested), and the coarse entries
//! only ever make a call wait longer (by at most 1/128 of the window),
//! never admit it early. Memory: one fixed buffer of 130 entries per
//! dimension per key, allocated when the key is first seen.
//!
//! A call costing more tokens than the whole token limit can never go: it
//! fails at once with [`Error::RateLimited`] carrying one window.
//!
//! **Without the lock.** A call that finds nobody waiting and no pause is
//! admitted with one compare-and-swap: under its lock the limiter grants a
//! *lease* of what could go at once (the requests and tokens that fit the
//! bucket and the log now, so at every later instant too, as the bucket
//! only refills and the log only empties), booked into the log's current
//! entry and valid until that entry's time is up (at most 1/128 of the
//! window); calls take their cost from it until it runs out or its time
//! is up. Everything else (a call that does not fit, the waiting line,
//! settling, steering, a pause, a snapshot) first closes the lease under
//! the lock and books what was taken, in the log and in the bucket, as if
//! it had all come at the close (or at the lease's end, if sooner). That
//! never admits anything early: the window stays exact. The trade is the
//! coarse log's: a call may wait up to 1/128 of the window longer than the
//! exact bucket alone would make it (when the bucket was full during a
//! lease and is needed right after it).
//!
//! **Per core under contention.** A lease is one word until calls from two
//! threads race for it; from then on each lease is split between one word
//! per core (up to 8, each on a cache line of its own), and a call takes
//! from its thread's word. On one word, every call of every worker writes
//! the same cache line, which moves between cores on each call; split,
//! a worker's calls stay on its own core's line (64 tasks on 2 workers:
//! about twice the throughput). A word that runs dry sends its call to
//! the lock, which folds every word back and splits the rest afresh, so a
//! split never refuses what the limit allows. The words take 128 bytes
//! each per key, one per core rounded up to a power of two (up to 8; none
//! on one core), allocated with the key's limiter whether or not its lease
//! ever splits.
//!
//! # Token cost: estimated, then settled
//!
//! Before the call, the estimator ([`EstimateTokens`]: [`ChatEstimate`] by
//! default, any `Fn(&Req) -> u32`) gives its cost. After the call, the
//! response's reported usage ([`ReportsUsage::tokens_used`], read through
//! [`ReadUsage`]) settles it: the difference is refunded (to the bucket,
//! and to the log while the call is still in the window) or, if the call
//! used more, charged at once (it is spent already: it can take a window
//! past the limit by that much, and later calls wait until it has left).
//! A failed call settles what a provider charges: a 429 gives the request
//! and all its tokens back; a layer below that refused without sending
//! (an open circuit, a full queue) gives everything back; other failures
//! keep the estimate. A caller that drops an admitted call before it was
//! sent gets its charges back; one that drops it in flight does not.
//!
//! # Steered by the provider
//!
//! Successes ([`ReportsUsage::server_limits`]) and failures (the
//! [`HttpView`](crate::classify::HttpView) that the
//! [classifier](RateLimitLayerBuilder::classifier) finds in the error)
//! carry the server's state: OpenAI's
//! `x-ratelimit-{limit,remaining}-{requests,tokens}` and Anthropic's
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining}`
//! ([`ServerLimits`]). A server limit below the configured one lowers the
//! pace and the window's limit to it (scaled from the
//! [server's window](RateLimitLayerBuilder::server_window), a minute for
//! both providers); what the server says is left caps the bucket. Neither
//! ever raises the budget above the configuration.
//!
//! A 429 (classified [`Reason::RateLimited`](crate::classify::Reason::RateLimited))
//! with a wait hint (`retry-after-ms`, `retry-after`, the reset headers:
//! see [`hint`](crate::classify::hint)) pauses **every** call on its key
//! until then, up to the [hint cap](RateLimitLayerBuilder::hint_cap): one
//! pause for the key, not one per caller; concurrent 429s only extend it.
//! A 429 without a hint empties the burst.
//!
//! # When the limit is reached
//!
//! By default a call waits in its key's line ([`WhenLimited::Wait`]), first
//! come first served, for at most the maximum wait; a call that would
//! wait longer on its own account fails at once, and one still waiting
//! when its wait runs out fails then, both with [`Error::RateLimited`] and
//! the expected wait. [`WhenLimited::Reject`] fails at once with the wait.
//! The decision uses the limiter's own state only, never the inner
//! service's readiness. Only the head of the line holds a timer; when it
//! goes, the next one becomes the head. A caller that drops its future
//! while in line leaves it at once, and the next in line takes its place.
//!
//! # Readiness and clones
//!
//! `poll_ready` readies the inner service only when the limiter has nobody
//! waiting and no pause (for a keyed limiter, always: the key is known in
//! `call`), so a call that has to wait never holds the inner service's
//! permit: it waits in its future, then readies a clone of the inner
//! service (hence `S: Clone`). Every clone of the service, and every service
//! the layer makes, draws from the same limiters (one `Arc`, created with
//! the layer).
//!
//! # Keys
//!
//! [`key_by`](RateLimitLayerBuilder::key_by) gives one limiter per key
//! (provider, model, credential) in a map bounded by `max_keys`: a new key
//! at the bound evicts a key that nobody holds and whose history has left
//! the window (nothing is lost), or else the least recently used. Keys are
//! never logged or exported. The map is kept in one copy per core (up to
//! 8), each behind its own lock: a call read-locks its thread's copy, so
//! calls on different cores do not write one lock's cache line; a new key
//! or an eviction changes every copy.
//!
//! # Observability
//!
//! Slow-path events ([`RateLimitEvent`]: queued, admitted after a wait,
//! rejected, timed out, cancelled, paused by a 429, steered by headers) go
//! to `tracing` (debug, target `llm_resilience::ratelimit`; a
//! `rate_limit_wait` span covers each wait), to the
//! [hook](RateLimitLayerBuilder::on_event), and with feature `metrics` to:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `llm_resilience_ratelimit_events_total` | counter | `limiter`, `kind` ([`RateLimitEventKind::as_str`]) |
//! | `llm_resilience_ratelimit_wait_seconds` | histogram | `limiter` |
//! | `llm_resilience_ratelimit_pause_seconds` | histogram | `limiter` |
//! | `llm_resilience_ratelimit_remaining` | gauge | `limiter`, `dimension` (`requests`, `tokens`), `key` (your label) |
//!
//! `limiter` is the [name](RateLimitLayerBuilder::name) of the layer. The
//! remaining-budget gauge is set by
//! [`RateLimitHandle::record_metrics`] and
//! [`KeyedRateLimitHandle::record_metrics`] (with a label you choose per
//! key, never the key itself).
//!
//! # Cost
//!
//! An admitted call costs a read of the per-call clock, one
//! compare-and-swap on the lease and no allocation. The per-call clock is,
//! on Linux, the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`,
//! about 10 ns against 20 to 45 for a precise read): it lags the true time
//! by up to about two kernel ticks (8 ms at 250 Hz), so the fast path
//! reads it as two ticks later than it says and a lease ends, if anything,
//! that much early (the locked path reads the precise clock). With the
//! feature `test-util` it is tokio's clock, which follows a paused clock
//! in tests; elsewhere it is `Instant::now`. The lock is taken to open a
//! lease (at most 128 times per window while calls keep coming under the
//! limit), and on the slow paths. The future holds the limiter's `Arc`
//! unless the layer reads nothing from responses
//! ([`ignore_usage`](RateLimitLayerBuilder::ignore_usage)): then a call
//! that succeeds touches nothing shared after its admission, and one that
//! fails finds its limiter by number in a registry (one global lock) to
//! settle. A response that reports no usage and no headers takes no lock;
//! one that does takes it once to settle. A keyed limiter adds a read lock
//! on its thread's copy of the key map and a hash of the key; a call to a
//! known key admitted from its lease and read for nothing takes no `Arc`
//! either. See `BENCHMARKS.md` for the figures
//! against `governor` and tower-resilience.
//!
//! [`Error::RateLimited`]: crate::Error::RateLimited

mod event;
mod future;
mod gcra;
mod handle;
mod keyed;
mod layer;
mod lease;
mod limiter;
mod registry;
mod settings;
mod usage;

use crate::util::sync;

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

pub use self::event::{RateLimitEvent, RateLimitEventKind};
pub use self::future::ResponseFuture;
pub use self::handle::{KeyedRateLimitHandle, RateLimitHandle, Snapshot};
use self::keyed::Keyed;
#[cfg(feature = "redis")]
pub(crate) use self::layer::{knob_setters, Knobs};
pub use self::layer::{
    KeyedRateLimitLayer, KeyedRateLimitLayerBuilder, RateLimitLayer, RateLimitLayerBuilder,
};
use self::limiter::{Arrival, Limiter};
pub use self::settings::WhenLimited;
pub(crate) use self::usage::scale_limit;
#[cfg(feature = "redis")]
pub(crate) use self::usage::Outcome;
pub use self::usage::{
    ChatEstimate, EstimateTokens, IgnoreUsage, ReadUsage, Reported, ReportsUsage, ServerDimension,
    ServerLimits,
};
use crate::error::{BoxError, Error};

/// A wait that never ends in practice (about a century).
pub(crate) const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What every clone shares: the limiter(s), the estimator and the usage
/// reader.
pub(crate) struct Shared<P, E, U> {
    pub(crate) part: P,
    pub(crate) estimate: E,
    pub(crate) usage: U,
}

/// The rate-limit middleware; made by [`RateLimitLayer`].
pub struct RateLimit<S, E = ChatEstimate, U = Reported> {
    inner: S,
    shared: Arc<Shared<Arc<Limiter>, E, U>>,
    ready: bool,
}

/// One limiter per key in front of a service; made by
/// [`KeyedRateLimitLayer`].
pub struct KeyedRateLimit<S, K, F, E = ChatEstimate, U = Reported> {
    inner: S,
    shared: Arc<Shared<Keyed<K, F>, E, U>>,
    ready: bool,
}

macro_rules! common {
    ($name:ident, [$($p:ident),*]) => {
        impl<S, $($p),*> $name<S, $($p),*> {
            /// The wrapped service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The wrapped service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// Unwraps the service.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }

        impl<S: Clone, $($p),*> Clone for $name<S, $($p),*> {
            /// The clone shares the limiters but not readiness: it must be
            /// polled ready itself.
            fn clone(&self) -> Self {
                Self {
                    inner: self.inner.clone(),
                    shared: Arc::clone(&self.shared),
                    ready: false,
                }
            }
        }

        impl<S: fmt::Debug, $($p),*> fmt::Debug for $name<S, $($p),*> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("inner", &self.inner)
                    .field("ready", &self.ready)
                    .finish_non_exhaustive()
            }
        }
    };
}

common!(RateLimit, [E, U]);
common!(KeyedRateLimit, [K, F, E, U]);

impl<S, E, U> RateLimit<S, E, U> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<Arc<Limiter>, E, U>>) -> Self {
        Self {
            inner,
            shared,
            ready: false,
        }
    }

    /// A handle to this service's limiter (the layer's).
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(Arc::clone(&self.shared.part))
    }
}

impl<S, K, F, E, U> KeyedRateLimit<S, K, F, E, U> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<Keyed<K, F>, E, U>>) -> Self {
        Self {
            inner,
            shared,
            ready: false,
        }
    }
}

#[inline]
fn ready_inner<S, Req>(
    inner: &mut S,
    ready: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    match inner.poll_ready(cx) {
        Poll::Ready(Ok(())) => {
            *ready = true;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(Error::from_inner(e))),
        Poll::Pending => Poll::Pending,
    }
}

/// Admits, queues or refuses one call on `limiter` and starts it.
#[inline]
fn start<S, Req, U>(
    limiter: &Arc<Limiter>,
    tokens: u64,
    usage: &U,
    inner: &mut S,
    ready: &mut bool,
    req: Req,
) -> ResponseFuture<S, Req, U>
where
    S: Service<Req> + Clone,
    U: ReadUsage<S::Response> + Clone,
{
    match limiter.arrive(tokens) {
        Arrival::Admitted(ticket) => {
            if std::mem::take(ready) {
                let fut = inner.call(req);
                // A response read for nothing: the future holds no
                // reference to the limiter (`registry.rs`).
                let detach = usage.reads_nothing();
                ResponseFuture::calling(fut, limiter, detach, ticket, usage.clone())
            } else {
                let limiter = Arc::clone(limiter);
                ResponseFuture::readying(inner.clone(), req, limiter, ticket, usage.clone())
            }
        }
        Arrival::Queued(id) => {
            let max_wait = match limiter.settings.when_limited {
                WhenLimited::Wait { max_wait } => max_wait,
                WhenLimited::Reject => Duration::ZERO,
            };
            let limiter = Arc::clone(limiter);
            ResponseFuture::waiting(inner.clone(), req, limiter, id, max_wait, usage.clone())
        }
        Arrival::Rejected(retry_after) => ResponseFuture::rejected(retry_after, usage.clone()),
    }
}

impl<S, Req, E, U> Service<Req> for RateLimit<S, E, U>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    E: EstimateTokens<Req>,
    U: ReadUsage<S::Response> + Clone,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, U>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.ready || !self.shared.part.is_clear() {
            // Waiting or paused: the call will wait in its future, without
            // holding the inner service.
            return Poll::Ready(Ok(()));
        }
        ready_inner(&mut self.inner, &mut self.ready, cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let tokens = u64::from(shared.estimate.estimate(&req));
        start(
            &shared.part,
            tokens,
            &shared.usage,
            &mut self.inner,
            &mut self.ready,
            req,
        )
    }
}

impl<S, Req, K, F, E, U> Service<Req> for KeyedRateLimit<S, K, F, E, U>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: Fn(&Req) -> K,
    E: EstimateTokens<Req>,
    U: ReadUsage<S::Response> + Clone,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, U>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        ready_inner(&mut self.inner, &mut self.ready, cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let tokens = u64::from(shared.estimate.estimate(&req));
        let key = shared.part.key(&req);
        if self.ready && shared.usage.reads_nothing() {
            // A known key admitted from its lease, under the map's read
            // lock, and sent at once with its response read for nothing:
            // no reference to its limiter is taken. Anything else (a new
            // key, the limiter's lock, its line, events) runs after the
            // map's lock is released.
            let fast = shared.part.with_existing(&key, |limiter| {
                Some((limiter.arrive_unlocked(tokens)?, limiter.id))
            });
            if let Some((ticket, id)) = fast.flatten() {
                self.ready = false;
                let fut = self.inner.call(req);
                return ResponseFuture::detached(fut, id, ticket, shared.usage.clone());
            }
        }
        let limiter = shared.part.get_or_insert(key);
        start(
            &limiter,
            tokens,
            &shared.usage,
            &mut self.inner,
            &mut self.ready,
            req,
        )
    }
}
