//! Chaos: a fault-injection layer for tests, benchmarks and game days.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::chaos::{ChaosLayer, Fault, Latency, Window};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let chaos = ChaosLayer::builder()
//!     .seed(7)
//!     .error_rate(Fault::rate_limited(Some(Duration::from_secs(2))), 0.05)
//!     .error_rate(Fault::overloaded(), 0.02)
//!     .latency(Latency::Exponential { mean: Duration::from_millis(300), max: Duration::from_secs(5) }, 1.0)
//!     .outage(Window::between(Duration::from_secs(60), Duration::from_secs(90)), Fault::status(503))
//!     .build()?;
//! let handle = chaos.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(chaos)
//!     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n) }));
//! handle.disable(); // a plain pass-through until enabled again
//! assert_eq!(svc.oneshot(1).await?, 1);
//! # Ok(()) }
//! ```
//!
//! # What it injects
//!
//! Rules, each with a probability and a time [`Window`]:
//! [`error_rate`](ChaosLayerBuilder::error_rate) answers a [`Fault`]
//! instead of calling the inner service (LLM-shaped faults are
//! [`HttpError`](crate::classify::HttpError)s with status, provider type and
//! code and `retry-after` headers, so the classifier and every layer above
//! react as to a real provider);
//! [`latency`](ChaosLayerBuilder::latency) delays the call by a sample of a
//! [`Latency`] distribution; [`outage`](ChaosLayerBuilder::outage) fails
//! every call inside a window; [`timeout_rate`](ChaosLayerBuilder::timeout_rate)
//! holds a call for a while and answers [`crate::Error::Timeout`].
//! Every rule draws once per call, in the order the rules were added; the
//! first failing rule that hits decides the fault, and the delays of every
//! latency rule that hits add up.
//!
//! # Determinism
//!
//! Each call's draws are a pure function of the seed and the call's number
//! (SplitMix64), and time is `tokio::time`: under a paused clock the same
//! seed and the same calls give the same injections, and over many calls the
//! injected fraction converges to the configured probability.
//!
//! # Switching at run time
//!
//! [`ChaosLayer::handle`] gives a [`ChaosHandle`]: enable, disable, force an
//! outage now, restart the windows' clock, and read how many calls were
//! failed, delayed or passed.
//!
//! # Metrics
//!
//! With the `metrics` feature, each injection counts in
//! `llm_resilience_chaos_injected_total{chaos, kind}` (`chaos`: the layer's
//! [`name`](ChaosLayerBuilder::name); `kind`: `error`, `timeout` or
//! `latency`), through handles registered when the layer is built.
//!
//! # Cost
//!
//! Disabled, a call costs one relaxed atomic load and a branch on top of
//! the inner call: no lock, no allocation, no clock read. Enabled, two
//! atomic increments and a few arithmetic draws per call, plus a clock read
//! when a rule is limited to a time window; only an injected delay or fault
//! allocates (its timer). `cargo bench -p llm-resilience-bench --bench chaos` measures it; the
//! figures are in `BENCHMARKS.md`.
//!
//! # Readiness
//!
//! `poll_ready` readies the inner service. An injected fault answers without
//! calling it (the readiness is kept for the next call); an injected delay
//! moves the readied service into the future (leaving a clone behind), so a
//! delayed call never holds up the service's other callers.

mod fault;
mod future;
mod layer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

pub use self::fault::{Fault, Latency, Window};
pub use self::future::ResponseFuture;
pub use self::layer::{ChaosHandle, ChaosLayer, ChaosLayerBuilder};
use self::layer::{Plan, Shared};
use crate::error::{BoxError, Error};

/// The chaos middleware; made by [`ChaosLayer`].
pub struct Chaos<S> {
    inner: S,
    shared: Arc<Shared>,
    ready: bool,
}

impl<S> Chaos<S> {
    fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
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

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Chaos<S> {
    /// The clone shares the layer's state but not readiness.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            ready: false,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Chaos<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("inner", &self.inner)
            .field("enabled", &self.shared.enabled())
            .field("ready", &self.ready)
            .finish()
    }
}

impl<S, Req> Service<Req> for Chaos<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        crate::util::ready::poll_inner(&mut self.inner, &mut self.ready, cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if self.shared.enabled() {
            return self.inject(req);
        }
        self.pass(req)
    }
}

impl<S> Chaos<S> {
    #[inline]
    fn pass<Req>(&mut self, req: Req) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        if std::mem::take(&mut self.ready) {
            ResponseFuture::called(self.inner.call(req))
        } else {
            let fresh = self.inner.clone();
            ResponseFuture::readying(std::mem::replace(&mut self.inner, fresh), req)
        }
    }

    // Out of line, so that the disabled path stays a load and a branch.
    #[inline(never)]
    fn inject<Req>(&mut self, req: Req) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        match self.shared.plan() {
            Plan::Pass => self.pass(req),
            Plan::Delay(d) => {
                let readied = std::mem::take(&mut self.ready);
                let fresh = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::delaying(tokio::time::sleep(d), service, readied, req)
            }
            Plan::Fail { wait, fault } => {
                tracing::debug!(fault = ?fault, "chaos: injected fault");
                let sleep = (!wait.is_zero()).then(|| tokio::time::sleep(wait));
                ResponseFuture::failing(sleep, fault.to_error())
            }
        }
    }
}
