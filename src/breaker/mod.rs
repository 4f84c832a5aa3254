//! Circuit breaker: closed / open / half-open, per target or per key, with a
//! closed path that takes no lock.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::breaker::{CircuitBreakerLayer, State};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .time_window(Duration::from_secs(30))
//!     .min_calls(20)
//!     .failure_rate(0.5)
//!     .open_duration(Duration::from_secs(15))
//!     .build()?;
//! let handle = breaker.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|prompt: &'static str| async move {
//!         Ok::<_, std::io::Error>(prompt.len())
//!     }));
//! assert_eq!(svc.oneshot("hello").await?, 5);
//! assert_eq!(handle.state(), State::Closed);
//! # Ok(()) }
//! ```
//!
//! # States
//!
//! - **Closed**: calls pass; each result is classified and recorded.
//! - **Open**: calls fail at once with [`Error::CircuitOpen`], carrying the
//!   time until the next probe; the inner service is not called.
//! - **Half-open**: once the open period has passed, exactly
//!   [`half_open_probes`](CircuitBreakerLayerBuilder::half_open_probes)
//!   calls are admitted, each reserving a permit with one compare-and-swap;
//!   everyone else fails fast. That many successes close the breaker, one
//!   failure opens it again. A probe whose future is dropped, or whose
//!   outcome is neutral, gives its permit back; when every permit has been
//!   held longer than the
//!   [`probe_timeout`](CircuitBreakerLayerBuilder::probe_timeout), a fresh
//!   half-open period starts, so a hung probe never leaves the breaker stuck.
//! - Operator states, through the [`BreakerHandle`]: forced open, forced
//!   closed, disabled (calls pass and are recorded, the breaker never trips),
//!   and reset.
//!
//! Every transition bumps a generation stamped on each admitted call:
//! the result of a call admitted before a transition is ignored after it.
//!
//! # When it trips
//!
//! On any of: `n` consecutive failures; a failure rate at or above the
//! threshold over the sliding window; a slow-call rate at or above its
//! threshold (a call slower than the slow threshold is slow, success or
//! not); or at once on a failure whose reason is in
//! [`trip_on`](CircuitBreakerLayerBuilder::trip_on) (quota and auth by
//! default). Rates are judged only once the window holds
//! [`min_calls`](CircuitBreakerLayerBuilder::min_calls) calls. The window is
//! count-based (the last N calls) or time-based (the last N seconds, in
//! one-second buckets); both record in O(1) with subtract-on-evict totals,
//! and old results leave them.
//!
//! What counts as a failure is the shared classifier's verdict
//! ([`Outcome::is_target_failure`]): transient and permanent upstream
//! failures count; bad requests (context too long, invalid request) are
//! neutral, since the target answered correctly; a caller that drops its
//! future is neutral too.
//!
//! # Streamed responses
//!
//! A call's outcome is recorded when its response future completes; for a
//! streamed response that is the first chunk, before the stream can break
//! off. Built with
//! [`record_at_stream_end`](CircuitBreakerLayerBuilder::record_at_stream_end),
//! the breaker attaches its admission to the response (a
//! [`GuardedResponse`](crate::guard::GuardedResponse), see
//! [`crate::guard`]) and records it when the stream ends: a clean end is a
//! success; an error after the response was delivered (an error event, a
//! cut connection, an idle timeout) is classified by
//! [`classify_stream_error`](crate::classify::Classify::classify_stream_error)
//! and counts as a failure like any other (so a run of streams cut
//! mid-stream trips the breaker); a stream the caller drops before its end
//! records nothing (the caller's choice says nothing about the upstream; a
//! half-open probe gives its permit back). A half-open probe lasts its
//! whole stream, bounded by the
//! [`probe_timeout`](CircuitBreakerLayerBuilder::probe_timeout). The
//! slow-call rule judges the time to the response (the first chunk): a
//! stream's length follows its output's. A response the classifier calls a
//! failure is recorded at once.
//!
//! # How long it stays open
//!
//! The open period starts at
//! [`open_duration`](CircuitBreakerLayerBuilder::open_duration), grows by a
//! multiplier on each consecutive trip up to a cap, and is shortened by a
//! seeded jitter. It is at least the tripping failure's server hint
//! (`retry-after-ms`, `retry-after`, the rate-limit reset headers: the
//! classifier's [`Outcome::retry_after`], so a client error registered with
//! [`LlmClassifier::with_view`] or a closure classifier can give one too), up
//! to a cap: a 429
//! `insufficient_quota` with a `retry-after` of an hour holds the breaker
//! open for that hour.
//!
//! # Readiness
//!
//! `poll_ready` never fails because the breaker is open. While the breaker
//! lets calls through it readies the inner service (so backpressure passes
//! through); while it is open it answers ready at once without readying the
//! inner service, and `call` fails fast. An admitted call without a readied
//! inner service (a probe, or `call` without `poll_ready`) readies a clone
//! of the inner service inside the response future (hence `S: Clone`, as
//! for the retry layer). A refused call leaves a readied inner service
//! ready for the next call.
//!
//! # Clone
//!
//! Every clone of the service, and every service the same layer makes,
//! shares one breaker (one `Arc`, created with the layer); readiness is not
//! shared: a clone must be polled ready itself.
//!
//! # Keyed breakers
//!
//! [`key_by`](CircuitBreakerLayerBuilder::key_by) makes a
//! [`KeyedCircuitBreakerLayer`]: one breaker per key extracted from the
//! request (provider, model, credential), each independent, in a map
//! bounded by `max_keys`. Events and `tracing` records never carry the key
//! (it may be a credential); query a key's breaker through the
//! [`KeyedBreakerHandle`].
//!
//! # Observability
//!
//! State changes are `tracing` info events and rejections debug events
//! (target `llm_resilience::breaker`); an
//! [event hook](CircuitBreakerLayerBuilder::on_event) sees both as
//! [`BreakerEvent`]s, never under a lock. With no hook nothing is built,
//! timestamped or allocated for it. With the `metrics` feature, under the
//! breaker's [`name`](CircuitBreakerLayerBuilder::name) as the `breaker`
//! label: the gauge `llm_resilience_breaker_state`, and the counters
//! `llm_resilience_breaker_transitions_total{from, to}`,
//! `llm_resilience_breaker_rejected_total{state}` and
//! `llm_resilience_breaker_probes_total` (all names:
//! [the table](crate::observability)); the gauge and the rejection and
//! probe counters are registered when the layer is built, and a closed
//! breaker emits nothing.
//!
//! # Cost
//!
//! A closed breaker with a count window costs, per call: an atomic load in
//! `poll_ready` and one in `call`, an `Arc` clone for the response future
//! (dropped with it), and on a success a few atomic loads: a success in a
//! full window that holds no failure writes nothing shared, otherwise one
//! `fetch_add` and one slot swap. No lock, no allocation, no clock read.
//! A time window adds a clock read and two atomic adds per call (and a short
//! lock once per second to roll its buckets); the slow-call rule adds two
//! clock reads. The breaker's clock (its window and its open periods) is,
//! on Linux, the kernel's coarse monotonic clock, about 10 ns a read
//! against 20 to 45 for a precise one and behind the true time by up to
//! about two kernel ticks (8 ms at 250 Hz): a call lands in the window's
//! one-second bucket of that reading, and an open period can last that
//! much longer. With the feature `test-util` it is tokio's clock, which
//! follows a paused clock in tests exactly. A keyed breaker adds a read lock on its map per call. See
//! `BENCHMARKS.md` for the figures against tower-resilience and failsafe.
//!
//! [`Error::CircuitOpen`]: crate::Error::CircuitOpen
//! [`Outcome::is_target_failure`]: crate::classify::Outcome::is_target_failure
//! [`Outcome::retry_after`]: crate::classify::Outcome::retry_after
//! [`LlmClassifier::with_view`]: crate::classify::LlmClassifier::with_view

mod event;
mod future;
mod handle;
mod keyed;
mod layer;
mod settings;
mod state;
mod window;

use crate::util::sync;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower_service::Service;

pub use self::event::{BreakerEvent, State};
pub use self::future::ResponseFuture;
pub use self::handle::BreakerHandle;
pub use self::keyed::{KeyedBreakerHandle, KeyedCircuitBreaker, KeyedCircuitBreakerLayer};
pub use self::layer::{
    CircuitBreakerLayer, CircuitBreakerLayerBuilder, KeyedCircuitBreakerLayerBuilder,
};
use self::state::Core;
#[cfg(feature = "redis")]
pub(crate) use self::state::{Core as SharedCore, Link};
pub use self::window::WindowCounts;
use crate::classify::{Classify, LlmClassifier};
use crate::error::{BoxError, Error};

/// One breaker and its classifier, shared by every clone in one `Arc`.
pub(crate) struct Shared<C> {
    pub(crate) core: Core,
    pub(crate) classifier: Arc<C>,
}

/// Type erasure of [`Shared`] for the handles.
pub(crate) trait HasCore: Send + Sync {
    fn core(&self) -> &Core;
}

impl<C: Send + Sync> HasCore for Shared<C> {
    fn core(&self) -> &Core {
        &self.core
    }
}

/// The circuit-breaker middleware; made by [`CircuitBreakerLayer`].
pub struct CircuitBreaker<S, C = LlmClassifier> {
    inner: S,
    shared: Arc<Shared<C>>,
    ready: bool,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<C>>) -> Self {
        Self {
            inner,
            shared,
            ready: false,
        }
    }

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

impl<S, C: Send + Sync + 'static> CircuitBreaker<S, C> {
    /// A handle to this service's breaker (the layer's).
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(Arc::clone(&self.shared) as Arc<dyn HasCore>)
    }
}

impl<S: Clone, C> Clone for CircuitBreaker<S, C> {
    /// The clone shares the breaker but not readiness: it must be polled
    /// ready itself.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            ready: false,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.shared.core.state())
            .field("ready", &self.ready)
            .finish()
    }
}

impl<S, Req, C> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        if !self.shared.core.is_passing() {
            // Open: `call` answers at once; do not wait on (or hold) the
            // inner service's readiness for a call that will not reach it.
            return Poll::Ready(Ok(()));
        }
        crate::util::ready::poll_inner(&mut self.inner, &mut self.ready, cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        start(&self.shared, &mut self.inner, &mut self.ready, req)
    }
}

/// Admits (or refuses) one call and starts it on the readied inner service,
/// or on a clone to be readied in the future.
#[inline]
fn start<S, Req, C>(
    shared: &Arc<Shared<C>>,
    inner: &mut S,
    ready: &mut bool,
    req: Req,
) -> ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
{
    let core = &shared.core;
    // The per-call clock (see `Core::now_ms`).
    let ticket = match core.acquire(|| core.now_ms()) {
        Ok(ticket) => ticket,
        // Refused: the readied inner service (if any) stays ready for the
        // next call.
        Err(retry_after) => return ResponseFuture::rejected(retry_after),
    };
    if std::mem::take(ready) {
        let begin = core.settings().slow_threshold.map(|_| Instant::now());
        let fut = inner.call(req);
        ResponseFuture::calling(fut, Arc::clone(shared), ticket, begin)
    } else {
        ResponseFuture::readying(inner.clone(), req, Arc::clone(shared), ticket)
    }
}
