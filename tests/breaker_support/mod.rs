//! Shared by the circuit breaker's paused-clock tests (`breaker.rs`,
//! `breaker_open.rs`): a scripted upstream, a builder with every rule off,
//! and small helpers to send a request and read an open period.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::breaker::{CircuitBreakerLayer, CircuitBreakerLayerBuilder};
use llm_resilience::classify::HttpError;
use llm_resilience::{BoxError, Error};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};

/// What the scripted upstream does with a request.
#[derive(Debug)]
pub enum Req {
    Ok,
    /// A 503.
    Fail,
    /// A 400 `context_length_exceeded` (neutral for the breaker).
    BadRequest,
    /// A 429 `insufficient_quota`, with an optional `retry-after` in seconds.
    Quota(Option<u64>),
    /// A 503 with `retry-after` in seconds.
    FailWithHint(u64),
    /// Sleeps (on the paused clock), then succeeds or fails.
    Sleep(Duration, bool),
    /// Waits for the sender side, then succeeds (`true`) or fails.
    Wait(oneshot::Receiver<bool>),
}

#[derive(Clone, Default)]
pub struct Upstream {
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Req> for Upstream {
    type Response = &'static str;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<&'static str, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let fail = |e: HttpError| -> Result<&'static str, BoxError> { Err(Box::new(e)) };
            match req {
                Req::Ok => Ok("ok"),
                Req::Fail => fail(HttpError::new(503)),
                Req::BadRequest => {
                    fail(HttpError::new(400).with_error_code("context_length_exceeded"))
                }
                Req::Quota(hint) => {
                    let mut e = HttpError::new(429).with_error_code("insufficient_quota");
                    if let Some(s) = hint {
                        e = e.with_header("retry-after", s.to_string());
                    }
                    fail(e)
                }
                Req::FailWithHint(s) => {
                    fail(HttpError::new(503).with_header("retry-after", s.to_string()))
                }
                Req::Sleep(d, ok) => {
                    tokio::time::sleep(d).await;
                    if ok {
                        Ok("ok")
                    } else {
                        fail(HttpError::new(503))
                    }
                }
                Req::Wait(rx) => {
                    if rx.await.unwrap_or(false) {
                        Ok("ok")
                    } else {
                        fail(HttpError::new(503))
                    }
                }
            }
        })
    }
}

/// A builder with every rule off but the ones a test turns on, no jitter.
pub fn base() -> CircuitBreakerLayerBuilder {
    CircuitBreakerLayer::builder()
        .count_window(10)
        .min_calls(10)
        .no_failure_rate()
        .no_consecutive_failures()
        .trip_on(&[])
        .open_duration(Duration::from_secs(10))
        .open_growth(1.0, Duration::from_secs(10))
        .open_jitter(0.0)
        .half_open_probes(1)
        .seed(7)
}

pub type Svc = llm_resilience::breaker::CircuitBreaker<Upstream>;

pub fn service(layer: &CircuitBreakerLayer) -> (Svc, Upstream) {
    let up = Upstream::default();
    (layer.layer(up.clone()), up)
}

pub async fn send(svc: &mut Svc, req: Req) -> Result<&'static str, Error> {
    svc.ready().await?.call(req).await
}

pub fn open_for(r: Result<&'static str, Error>) -> Duration {
    match r {
        Err(Error::CircuitOpen { retry_after, .. }) => retry_after,
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
}
