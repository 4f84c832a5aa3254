//! Shared by the benches, `benches/instructions.rs` and
//! `benches/queue_instructions.rs`: the always-ready inner service every
//! variant wraps, and tower's retry policy written like tower's own example.

#![allow(dead_code)]

use std::future::{ready, Ready};
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::Service;

/// The inner service of every variant: always ready, answers `n + 1` at once.
#[derive(Clone, Copy, Debug)]
pub struct Always;

impl Service<u64> for Always {
    type Response = u64;
    type Error = io::Error;
    type Future = Ready<Result<u64, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u64) -> Self::Future {
        ready(Ok(n.wrapping_add(1)))
    }
}

/// tower's retry policy, written like tower's own budget example: deposit on
/// a success, withdraw for each retry; at most `attempts_left` attempts.
#[derive(Clone, Debug)]
pub struct TowerPolicy {
    pub budget: Arc<TpsBudget>,
    pub attempts_left: u32,
}

impl<Req: Clone, Res, E> Policy<Req, Res, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) => {
                if self.attempts_left <= 1 || !self.budget.withdraw() {
                    return None;
                }
                self.attempts_left -= 1;
                Some(ready(()))
            }
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// The least a retry layer can be, a yardstick rather than a peer: its
/// future owns a readied clone of the inner service, the request (to send
/// again) and the configuration `A`, polls the inner future and, on an
/// error, calls again up to the configured attempts. No classification,
/// budget, backoff, timer, event or tracing. With `A = Arc<u32>` the
/// configuration is shared, as in every retry layer whose future must reach
/// shared state such as a budget: the service and each future hold a
/// reference (a clone and a drop per call, and per service clone). With
/// `A = u32` it is copied: nothing is shared at all.
#[derive(Clone, Debug)]
pub struct LeastRetry<S, A> {
    pub inner: S,
    pub attempts: A,
}

/// The yardstick's configuration: how many attempts, shared or copied.
pub trait Attempts: Clone {
    fn limit(&self) -> u32;
}

impl Attempts for u32 {
    fn limit(&self) -> u32 {
        *self
    }
}

impl Attempts for Arc<u32> {
    fn limit(&self) -> u32 {
        **self
    }
}

pin_project_lite::pin_project! {
    pub struct LeastRetryFuture<S: Service<u64>, A> {
        #[pin]
        future: S::Future,
        service: S,
        request: u64,
        attempts: A,
        attempt: u32,
    }
}

impl<S, A> Service<u64> for LeastRetry<S, A>
where
    S: Service<u64> + Clone,
    A: Attempts,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = LeastRetryFuture<S, A>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: u64) -> Self::Future {
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        LeastRetryFuture {
            future: service.call(request),
            service,
            request,
            attempts: self.attempts.clone(),
            attempt: 1,
        }
    }
}

impl<S: Service<u64>, A: Attempts> std::future::Future for LeastRetryFuture<S, A> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match std::task::ready!(this.future.as_mut().poll(cx)) {
                Ok(r) => return Poll::Ready(Ok(r)),
                Err(e) => {
                    if *this.attempt >= this.attempts.limit() {
                        return Poll::Ready(Err(e));
                    }
                    *this.attempt += 1;
                    let next = this.service.call(*this.request);
                    this.future.set(next);
                }
            }
        }
    }
}
