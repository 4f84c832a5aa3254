//! The queue layer's lifecycle on a paused clock: cancellation (of queued
//! calls, granted permits and ready services), upstream errors and panics,
//! a runtime shutting down under it, and graceful shutdown.

mod queue_support;

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{InnerPanicked, Priority, QueueLayer, WhenFull};
use llm_resilience::{BoxError, Error};
use queue_support::{job, job_p, layer, seen, settle, upstream};
use tokio::time::sleep;
use tokio_test::assert_pending;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------- cancellation

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_frees_its_place_at_once_and_is_never_sent() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 1, WhenFull::Reject);
    let handle = l.handle();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    let mut queued = tokio_test::task::spawn(svc.clone().oneshot(job(1)));
    assert_pending!(queued.poll());
    assert_eq!(handle.depth(), 1);
    // The queue is full now.
    assert!(matches!(
        svc.clone().oneshot(job(2)).await,
        Err(Error::QueueFull { depth: 1, .. })
    ));
    drop(queued);
    assert_eq!(handle.depth(), 0, "the place is freed at once");
    assert_eq!(handle.stats().cancelled, 1);
    // And someone else can take it.
    let next = tokio::spawn(svc.clone().oneshot(job(3)));
    first.await.unwrap().unwrap();
    next.await.unwrap().unwrap();
    assert_eq!(seen(&seen_ids), vec![0, 3]);
    assert!(handle.is_idle());
}

/// A waker that owns another queued call: dropping the waker cancels it.
struct Owner {
    _call: Mutex<Option<QueuedCall>>,
}

type QueuedCall = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Error>> + Send>>;

impl futures::task::ArcWake for Owner {
    fn wake_by_ref(_: &Arc<Self>) {}
}

/// A caller polls its queued call with a new waker; the waker it replaces
/// was the last owner of another queued call, which is thus cancelled. The
/// queue drops the replaced waker after releasing its lock, so the
/// cancellation (which takes the lock) does not deadlock.
#[test]
fn a_replaced_waker_that_cancels_another_call_does_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (up, seen_ids) = upstream();
            let l = layer(1, 4, WhenFull::Wait);
            let handle = l.handle();
            let svc = l.layer(up);
            let first = tokio::spawn(svc.clone().oneshot(job(0)));
            settle().await;
            let noop = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&noop);
            // Two calls queue behind it.
            let mut other: QueuedCall = Box::pin(svc.clone().oneshot(job(1)));
            assert!(other.as_mut().poll(&mut cx).is_pending());
            let mut mine: QueuedCall = Box::pin(svc.clone().oneshot(job(2)));
            assert_eq!(handle.depth(), 1);
            // `mine` registers a waker that owns `other`...
            let owner = futures::task::waker(Arc::new(Owner {
                _call: Mutex::new(Some(other)),
            }));
            assert!(mine
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&owner))
                .is_pending());
            drop(owner);
            assert_eq!(handle.depth(), 2);
            // ...and then another one: the old waker goes, and `other` with it.
            assert!(mine.as_mut().poll(&mut cx).is_pending());
            assert_eq!(handle.depth(), 1, "the other call was cancelled");
            assert_eq!(handle.stats().cancelled, 1);
            first.await.unwrap().unwrap();
            assert_eq!(mine.await.unwrap(), 2);
            assert_eq!(seen(&seen_ids), vec![0, 2]);
            assert!(handle.is_idle());
        });
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the queue deadlocked (or the test panicked)");
}

#[tokio::test(start_paused = true)]
async fn a_permit_granted_to_a_cancelled_request_passes_to_the_next() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 4, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(job_p(
        0,
        Priority::Normal,
        Duration::from_secs(1),
    )));
    settle().await;
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(job(1)));
    assert_pending!(a.poll());
    let b = tokio::spawn(svc.clone().oneshot(job(2)));
    settle().await;
    first.await.unwrap().unwrap();
    // `a` was granted the permit (and woken) but has not run yet.
    assert!(a.is_woken());
    drop(a);
    b.await.unwrap().unwrap();
    assert_eq!(seen(&seen_ids), vec![0, 2]);
    assert!(handle.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_ready_service_gives_its_reservation_back() {
    let (up, _) = upstream();
    let l = layer(1, 1, WhenFull::Reject);
    let handle = l.handle();
    let svc = l.layer(up);
    let mut a = svc.clone();
    a.ready().await.unwrap();
    let mut b = svc.clone();
    b.ready().await.unwrap();
    assert_eq!((handle.in_flight(), handle.depth()), (1, 1));
    drop(a);
    drop(b);
    assert!(handle.is_idle());
}

// ---------------------------------------------------------------- failures

#[tokio::test(start_paused = true)]
async fn upstream_errors_and_panics_are_answered_and_permits_come_back() {
    #[derive(Clone)]
    struct Panicky;
    impl Service<u32> for Panicky {
        type Response = u32;
        type Error = BoxError;
        type Future =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, n: u32) -> Self::Future {
            if n == 1 {
                panic!("call exploded");
            }
            Box::pin(async move {
                sleep(Duration::from_millis(10)).await;
                match n {
                    2 => panic!("future exploded"),
                    3 => Err("plain failure".into()),
                    n => Ok(n),
                }
            })
        }
    }
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(8)
        .build()
        .unwrap();
    let handle = l.handle();
    let svc = l.layer(Panicky);
    let futs: Vec<_> = (0..5)
        .map(|n| tokio::spawn(svc.clone().oneshot(n)))
        .collect();
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await.expect("the panic stays inside the queue"));
    }
    assert_eq!(out[0].as_ref().unwrap(), &0);
    for (i, msg) in [(1, "call exploded"), (2, "future exploded")] {
        let e = out[i].as_ref().unwrap_err();
        assert!(matches!(e, Error::Upstream { .. }));
        assert_eq!(e.upstream_ref::<InnerPanicked>().unwrap().message(), msg);
    }
    assert!(matches!(out[3], Err(Error::Upstream { .. })));
    assert_eq!(out[4].as_ref().unwrap(), &4);
    assert!(handle.is_idle());
}

/// An inner service whose `poll_ready` fails: the error is answered (as
/// `Error::Upstream`) and the permit comes back.
#[tokio::test(start_paused = true)]
async fn an_inner_readiness_error_is_answered_and_the_permit_returned() {
    #[derive(Clone, Debug)]
    struct Broken;
    impl Service<u32> for Broken {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Err("not today".into()))
        }
        fn call(&mut self, n: u32) -> Self::Future {
            std::future::ready(Ok(n))
        }
    }
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .build()
        .unwrap();
    let handle = l.handle();
    let mut svc = l.layer(Broken);
    let err = svc.ready().await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }));
    assert!(handle.is_idle());
    // Through the queued path too.
    let err = svc.clone().call(1).await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }));
    assert!(handle.is_idle());
}

#[test]
fn a_runtime_shutdown_returns_every_place_and_permit() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let (up, seen_ids) = upstream();
    let l = rt.block_on(async { layer(2, 10, WhenFull::Wait) });
    let handle = l.handle();
    let svc = l.layer(up);
    rt.block_on(async {
        for i in 0..8 {
            tokio::spawn(svc.clone().oneshot(job(i)));
        }
        settle().await;
    });
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(handle.depth(), 6);
    drop(rt);
    assert!(handle.is_idle(), "permits or places leaked");
    assert_eq!(seen(&seen_ids), vec![0, 1]);
}

// ---------------------------------------------------------------- shutdown

#[tokio::test(start_paused = true)]
async fn shutdown_drains_within_the_timeout_and_refuses_new_work() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 10, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let futs: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(
                svc.clone()
                    .oneshot(job_p(i, Priority::Normal, Duration::from_secs(1))),
            )
        })
        .collect();
    settle().await;
    let report = {
        let h = handle.clone();
        let svc = svc.clone();
        let shutdown = tokio::spawn(async move { h.shutdown(Duration::from_secs(10)).await });
        settle().await;
        assert!(matches!(svc.oneshot(job(9)).await, Err(Error::Shutdown)));
        shutdown.await.unwrap()
    };
    assert!(report.drained);
    assert_eq!(report.failed, 0);
    for f in futs {
        f.await.unwrap().unwrap();
    }
    assert_eq!(seen(&seen_ids), vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_fails_what_is_still_queued_after_the_timeout() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 1, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    let queued = tokio::spawn(svc.clone().oneshot(job(1)));
    settle().await;
    let waiting = tokio::spawn(svc.clone().oneshot(job(2)));
    settle().await;
    assert_eq!(handle.waiting_for_place(), 1);
    let report = handle.shutdown(Duration::from_secs(1)).await;
    assert!(!report.drained);
    assert_eq!(report.failed, 1);
    assert_eq!(report.in_flight, 1);
    assert!(matches!(waiting.await.unwrap(), Err(Error::Shutdown)));
    assert!(matches!(queued.await.unwrap(), Err(Error::Shutdown)));
    assert_eq!(first.await.unwrap().unwrap(), 0, "in-flight calls finish");
    assert_eq!(seen(&seen_ids), vec![0]);
    assert!(handle.is_idle());
}
