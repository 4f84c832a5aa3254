//! The tower contract suite: the rules every layer in this crate keeps, as
//! reusable checks.
//!
//! [`check_layer`] wraps a [`Probe`] in the layer under test and checks:
//!
//! 1. **call after `poll_ready`** reaches the inner service, readied;
//! 2. **`call` without `poll_ready`** neither panics nor calls the inner
//!    service un-readied: the layer readies it itself or answers with an
//!    error;
//! 3. **readiness after clone**: a clone of a readied service is not ready
//!    (calling it must not reach the inner service un-readied), and the
//!    original's readiness survives the clone;
//! 4. **repeated `poll_ready`** is harmless: one call follows, not more;
//! 5. **waker registration and inner backpressure**: with the inner service
//!    not ready, a request is not passed on and the caller's task is
//!    pending; when the inner service becomes ready the task is woken and
//!    the request completes;
//! 6. **dropped futures release everything**: a response future dropped
//!    mid-call releases the inner call (and any permit it held), and the
//!    service keeps working;
//! 7. **`Send + Sync + 'static`** service and futures (checked by the
//!    bounds of [`check_layer`], at compile time).
//!
//! [`check_service`] checks what applies to a leaf service (a client):
//! repeated `poll_ready`, `call` without `poll_ready`, a clone's independent
//! readiness, dropped futures, and the same `Send + Sync + 'static` bounds.
//!
//! Run them on a paused clock:
//!
//! ```
//! use llm_resilience::retry::RetryLayer;
//! use llm_resilience::testing::contract;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! contract::check_layer(|| RetryLayer::llm_defaults()).await;
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::task::ArcWake;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;

#[derive(Default)]
struct ProbeState {
    open: AtomicBool,
    hold: AtomicBool,
    ready_wakers: Mutex<Vec<Waker>>,
    held_wakers: Mutex<Vec<Waker>>,
    calls: AtomicUsize,
    unready_calls: AtomicUsize,
    in_flight: AtomicUsize,
}

/// The inner service of the contract suite: an echo service whose readiness
/// and response timing the test controls, and which records every contract
/// breach (a `call` that was not preceded by its own `poll_ready`).
///
/// Each clone starts not ready, like a buffer's or a concurrency limit's.
#[derive(Clone)]
pub struct Probe {
    state: Arc<ProbeState>,
    readied: bool,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("open", &self.state.open.load(Ordering::SeqCst))
            .field("calls", &self.calls())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    /// A probe that is ready and answers at once.
    pub fn new() -> Self {
        let p = Self {
            state: Arc::default(),
            readied: false,
        };
        p.state.open.store(true, Ordering::SeqCst);
        p
    }

    /// Opens or closes the readiness gate; opening wakes every task that
    /// waited on it.
    pub fn set_ready(&self, open: bool) {
        self.state.open.store(open, Ordering::SeqCst);
        if open {
            for w in self.state.ready_wakers.lock().unwrap().drain(..) {
                w.wake();
            }
        }
    }

    /// Holds responses (they stay pending) or releases them.
    pub fn set_hold(&self, hold: bool) {
        self.state.hold.store(hold, Ordering::SeqCst);
        if !hold {
            for w in self.state.held_wakers.lock().unwrap().drain(..) {
                w.wake();
            }
        }
    }

    /// Calls that reached the probe.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Calls that reached the probe without its `poll_ready` first.
    pub fn unready_calls(&self) -> usize {
        self.state.unready_calls.load(Ordering::SeqCst)
    }

    /// Response futures alive now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }
}

impl<Req: Send + Sync + 'static> Service<Req> for Probe {
    type Response = Req;
    type Error = BoxError;
    type Future = ProbeFuture<Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.state.open.load(Ordering::SeqCst) {
            self.readied = true;
            return Poll::Ready(Ok(()));
        }
        self.state
            .ready_wakers
            .lock()
            .unwrap()
            .push(cx.waker().clone());
        // Re-check: the gate may have opened before the waker was stored.
        if self.state.open.load(Ordering::SeqCst) {
            self.readied = true;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn call(&mut self, req: Req) -> ProbeFuture<Req> {
        self.state.calls.fetch_add(1, Ordering::SeqCst);
        let readied = std::mem::take(&mut self.readied);
        if !readied {
            self.state.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        ProbeFuture {
            state: Arc::clone(&self.state),
            req: Some(req),
            readied,
        }
    }
}

/// The response future of [`Probe`].
pub struct ProbeFuture<Req> {
    state: Arc<ProbeState>,
    req: Option<Req>,
    readied: bool,
}

impl<Req> std::fmt::Debug for ProbeFuture<Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeFuture").finish_non_exhaustive()
    }
}

impl<Req> Unpin for ProbeFuture<Req> {}

impl<Req> Future for ProbeFuture<Req> {
    type Output = Result<Req, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.state.hold.load(Ordering::SeqCst) {
            self.state
                .held_wakers
                .lock()
                .unwrap()
                .push(cx.waker().clone());
            if self.state.hold.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        if !self.readied {
            return Poll::Ready(Err("probe called without poll_ready".into()));
        }
        let req = self
            .req
            .take()
            .expect("ProbeFuture polled after completion");
        Poll::Ready(Ok(req))
    }
}

impl<Req> Drop for ProbeFuture<Req> {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Flag(AtomicBool);

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.store(true, Ordering::SeqCst);
    }
}

/// A task context whose waker records that it was woken.
struct TestTask {
    flag: Arc<Flag>,
    waker: Waker,
}

impl TestTask {
    fn new() -> Self {
        let flag = Arc::new(Flag::default());
        let waker = futures::task::waker(Arc::clone(&flag));
        Self { flag, waker }
    }

    fn poll<F: Future + Unpin>(&self, f: &mut F) -> Poll<F::Output> {
        self.flag.0.store(false, Ordering::SeqCst);
        Pin::new(f).poll(&mut Context::from_waker(&self.waker))
    }

    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
}

async fn settle() {
    // Let timers and spawned tasks of the layer under test run; on a paused
    // clock this costs no real time.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn ready<S: Service<R>, R>(svc: &mut S) -> Result<(), S::Error> {
    futures::future::poll_fn(|cx| svc.poll_ready(cx)).await
}

fn assert_bounds<T: Send + Sync + 'static>() {}

/// Runs the contract checks on the layer that `make` builds (a fresh one per
/// check). Panics, naming the rule, on the first one broken.
pub async fn check_layer<L, F>(make: F)
where
    F: Fn() -> L,
    L: Layer<Probe>,
    L::Service: Service<u32, Response = u32> + Clone + Send + Sync + 'static,
    <L::Service as Service<u32>>::Error: Into<BoxError> + std::fmt::Debug,
    <L::Service as Service<u32>>::Future: Send + Sync + 'static,
{
    assert_bounds::<L::Service>();
    assert_bounds::<<L::Service as Service<u32>>::Future>();

    // 1. call after poll_ready.
    let probe = Probe::new();
    let mut svc = make().layer(probe.clone());
    ready(&mut svc).await.expect("rule 1: poll_ready failed");
    let out = svc.call(1).await.expect("rule 1: call failed");
    assert_eq!(out, 1, "rule 1: wrong response");
    assert_eq!(probe.unready_calls(), 0, "rule 1: inner called un-readied");

    // 2. call without poll_ready.
    let probe = Probe::new();
    let mut svc = make().layer(probe.clone());
    let answer = svc.call(2).await;
    assert_eq!(
        probe.unready_calls(),
        0,
        "rule 2: call without poll_ready reached the inner service un-readied"
    );
    if let Ok(v) = answer {
        assert_eq!(v, 2, "rule 2: wrong response");
    }

    // 3. readiness after clone.
    let probe = Probe::new();
    let mut svc = make().layer(probe.clone());
    ready(&mut svc).await.expect("rule 3: poll_ready failed");
    let mut clone = svc.clone();
    let _ = clone.call(3).await;
    assert_eq!(
        probe.unready_calls(),
        0,
        "rule 3: a clone of a readied service called the inner service un-readied"
    );
    let out = svc
        .call(3)
        .await
        .expect("rule 3: the original lost its readiness");
    assert_eq!(out, 3);
    assert_eq!(probe.unready_calls(), 0, "rule 3: inner called un-readied");

    // 4. repeated poll_ready.
    let probe = Probe::new();
    let mut svc = make().layer(probe.clone());
    for _ in 0..3 {
        ready(&mut svc).await.expect("rule 4: poll_ready failed");
    }
    assert_eq!(svc.call(4).await.expect("rule 4: call failed"), 4);
    assert_eq!(
        probe.calls(),
        1,
        "rule 4: repeated poll_ready made extra calls"
    );
    // The service is still usable afterwards.
    ready(&mut svc)
        .await
        .expect("rule 4: poll_ready after call failed");
    assert_eq!(svc.call(5).await.expect("rule 4: second call failed"), 5);

    // 5. inner backpressure and waker registration.
    let probe = Probe::new();
    probe.set_ready(false);
    let svc = make().layer(probe.clone());
    let task = TestTask::new();
    let mut fut = Box::pin(tower::util::ServiceExt::oneshot(svc, 6));
    assert!(
        task.poll(&mut fut).is_pending(),
        "rule 5: not pending while the inner service is not ready"
    );
    settle().await;
    assert!(
        task.poll(&mut fut).is_pending(),
        "rule 5: not pending while the inner service is not ready"
    );
    assert_eq!(
        probe.calls(),
        0,
        "rule 5: a request passed an inner service that was not ready"
    );
    probe.set_ready(true);
    settle().await;
    assert!(
        task.woken(),
        "rule 5: the task was not woken when the inner service became ready"
    );
    let mut out = None;
    for _ in 0..16 {
        if let Poll::Ready(r) = task.poll(&mut fut) {
            out = Some(r);
            break;
        }
        settle().await;
    }
    let out = out.expect("rule 5: no answer after the inner service became ready");
    assert_eq!(out.expect("rule 5: call failed"), 6);
    assert_eq!(probe.unready_calls(), 0, "rule 5: inner called un-readied");

    // 6. dropped futures release everything.
    let probe = Probe::new();
    probe.set_hold(true);
    let mut svc = make().layer(probe.clone());
    ready(&mut svc).await.expect("rule 6: poll_ready failed");
    let task = TestTask::new();
    let mut fut = Box::pin(svc.call(7));
    for _ in 0..4 {
        assert!(
            task.poll(&mut fut).is_pending(),
            "rule 6: a held call completed"
        );
        settle().await;
    }
    drop(fut);
    settle().await;
    assert_eq!(
        probe.in_flight(),
        0,
        "rule 6: a dropped future kept the inner call alive"
    );
    probe.set_hold(false);
    ready(&mut svc)
        .await
        .expect("rule 6: poll_ready after a dropped future failed");
    assert_eq!(
        svc.call(8)
            .await
            .expect("rule 6: call after a dropped future failed"),
        8
    );
    assert_eq!(probe.in_flight(), 0);
    assert_eq!(probe.unready_calls(), 0, "rule 6: inner called un-readied");
}

/// Runs the checks that apply to a leaf service (a client): `make` builds a
/// fresh service, `request` a request that the service answers with `Ok`.
pub async fn check_service<S, Req, F, R>(make: F, request: R)
where
    F: Fn() -> S,
    R: Fn() -> Req,
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send + 'static,
{
    assert_bounds::<S>();

    // Repeated poll_ready, then a call.
    let mut svc = make();
    for _ in 0..3 {
        ready(&mut svc).await.expect("poll_ready failed");
    }
    svc.call(request())
        .await
        .expect("call after repeated poll_ready failed");

    // call without poll_ready answers (Ok or a typed error), never panics.
    let mut svc = make();
    let _ = svc.call(request()).await;

    // A clone is independent: readying and calling it leaves the original usable.
    let mut svc = make();
    ready(&mut svc).await.expect("poll_ready failed");
    let mut clone = svc.clone();
    ready(&mut clone).await.expect("clone: poll_ready failed");
    clone.call(request()).await.expect("clone: call failed");
    svc.call(request())
        .await
        .expect("original after clone: call failed");

    // A dropped future leaves the service working.
    let mut svc = make();
    ready(&mut svc).await.expect("poll_ready failed");
    let task = TestTask::new();
    let mut fut = Box::pin(svc.call(request()));
    let _ = task.poll(&mut fut);
    drop(fut);
    ready(&mut svc)
        .await
        .expect("poll_ready after a dropped future failed");
    svc.call(request())
        .await
        .expect("call after a dropped future failed");
}
