//! The queue layer on a paused clock: capacity boundaries in both modes,
//! maximum wait, deadlines, priorities and aging, cancellation, shutdown,
//! panics, events and configuration errors.

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{
    DeadlineOf, InnerPanicked, Priority, PriorityOf, QueueEvent, QueueEventKind, QueueLayer,
    WhenFull,
};
use llm_resilience::{BoxError, Error};
use tokio::time::{sleep, Instant};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Debug)]
struct Job {
    id: u64,
    prio: Priority,
    deadline: Option<Instant>,
    work: Duration,
    fail: bool,
}

fn job(id: u64) -> Job {
    Job {
        id,
        prio: Priority::Normal,
        deadline: None,
        work: Duration::from_secs(10),
        fail: false,
    }
}

fn job_p(id: u64, prio: Priority, work: Duration) -> Job {
    Job {
        prio,
        work,
        ..job(id)
    }
}

type Seen = Arc<Mutex<Vec<u64>>>;

/// An upstream that records every request it is called with (by id) and
/// answers after the request's `work` time.
#[derive(Clone)]
struct Upstream {
    seen: Seen,
}

impl Service<Job> for Upstream {
    type Response = u64;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, j: Job) -> Self::Future {
        self.seen.lock().unwrap().push(j.id);
        Box::pin(async move {
            sleep(j.work).await;
            if j.fail {
                Err("upstream failed".into())
            } else {
                Ok(j.id)
            }
        })
    }
}

fn upstream() -> (Upstream, Seen) {
    let seen = Seen::default();
    (
        Upstream {
            seen: Arc::clone(&seen),
        },
        seen,
    )
}

fn layer(
    concurrency: usize,
    capacity: usize,
    mode: WhenFull,
) -> QueueLayer<impl PriorityOf<Job>, impl DeadlineOf<Job>> {
    QueueLayer::builder()
        .concurrency(concurrency)
        .capacity(capacity)
        .when_full(mode)
        .priority_by(|j: &Job| j.prio)
        .deadline_by(|j: &Job| j.deadline)
        .build()
        .unwrap()
}

async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn seen(s: &Seen) -> Vec<u64> {
    s.lock().unwrap().clone()
}

// ---------------------------------------------------------------- capacity

#[tokio::test(start_paused = true)]
async fn wait_mode_accepts_exactly_concurrency_plus_capacity() {
    let (up, seen_ids) = upstream();
    let l = layer(2, 3, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let mut svcs: Vec<_> = (0..6).map(|_| svc.clone()).collect();
    let mut t = tokio_test::task::spawn(());
    for (i, s) in svcs.iter_mut().enumerate().take(5) {
        let r = t.enter(|cx, _| s.poll_ready(cx));
        assert!(matches!(r, Poll::Ready(Ok(()))), "request {i} not admitted");
    }
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(handle.depth(), 3, "capacity counts waiting requests only");
    // The sixth waits: backpressure in poll_ready.
    let mut t6 = tokio_test::task::spawn(());
    assert_pending!(t6.enter(|cx, _| svcs[5].poll_ready(cx)));
    assert_eq!(handle.waiting_for_place(), 1);
    assert_eq!(handle.depth(), 3);

    // Send the five; two go upstream, three queue.
    let futs: Vec<_> = (0..5)
        .map(|i| tokio::spawn(svcs[i].call(job(i as u64))))
        .collect();
    settle().await;
    assert_eq!(seen(&seen_ids), vec![0, 1]);
    assert!(!t6.is_woken());
    // When the first two finish, two queued requests get permits and the
    // sixth caller gets a place.
    sleep(Duration::from_secs(10)).await;
    settle().await;
    assert!(t6.is_woken());
    assert_ready_ok!(t6.enter(|cx, _| svcs[5].poll_ready(cx)));
    assert_eq!(seen(&seen_ids), vec![0, 1, 2, 3]);
    let f6 = tokio::spawn(svcs[5].call(job(5)));
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(f.await.unwrap().unwrap(), i as u64);
    }
    assert_eq!(f6.await.unwrap().unwrap(), 5);
    assert!(handle.is_idle());
}

#[tokio::test(start_paused = true)]
async fn reject_mode_rejects_the_first_request_beyond_capacity() {
    let (up, seen_ids) = upstream();
    let l = layer(2, 3, WhenFull::Reject);
    let handle = l.handle();
    let svc = l.layer(up);
    let mut futs = Vec::new();
    for i in 0..5 {
        let mut s = svc.clone();
        s.ready().await.unwrap();
        futs.push(tokio::spawn(s.call(job(i))));
    }
    settle().await;
    assert_eq!(handle.depth(), 3);
    let mut s = svc.clone();
    s.ready().await.expect("reject mode is ready; call answers");
    match s.call(job(5)).await {
        Err(Error::QueueFull { depth, .. }) => assert_eq!(depth, 3),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(handle.stats().rejected, 1);
    for f in futs {
        f.await.unwrap().unwrap();
    }
    assert!(!seen(&seen_ids).contains(&5));
    assert!(handle.is_idle());
}

#[tokio::test(start_paused = true)]
async fn reject_mode_with_capacity_zero_sheds_at_the_concurrency_bound() {
    let (up, seen_ids) = upstream();
    let l = layer(2, 0, WhenFull::Reject);
    let svc = l.layer(up);
    let a = tokio::spawn(svc.clone().oneshot(job(0)));
    let b = tokio::spawn(svc.clone().oneshot(job(1)));
    settle().await;
    let c = svc.clone().oneshot(job(2)).await;
    assert!(matches!(c, Err(Error::QueueFull { depth: 0, .. })), "{c:?}");
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(seen(&seen_ids), vec![0, 1]);
}

/// Rejection follows the queue's own counts, not the inner service being
/// pending: an inner service that is not ready makes callers wait, and
/// nothing is rejected while the queue has room.
#[tokio::test(start_paused = true)]
async fn an_unready_inner_service_is_not_a_reason_to_reject() {
    let (mock, mut h) = tower_test::mock::pair::<u32, u32>();
    h.allow(0);
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .when_full(WhenFull::Reject)
        .build()
        .unwrap();
    let svc = l.layer(mock);
    let mut t = tokio_test::task::spawn(svc.oneshot(1));
    assert_pending!(t.poll());
    h.allow(1);
    assert!(t.is_woken());
    assert_pending!(t.poll());
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req, 1);
    send.send_response(7);
    assert_eq!(assert_ready!(t.poll()).unwrap(), 7);
}

// ---------------------------------------------------------------- max wait

#[tokio::test(start_paused = true)]
async fn max_wait_bounds_both_the_wait_for_a_place_and_the_queue() {
    let (up, seen_ids) = upstream();
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .max_wait(Duration::from_secs(2))
        .priority_by(|j: &Job| j.prio)
        .build()
        .unwrap();
    let handle = l.handle();
    let svc = l.layer(up);
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    let queued = tokio::spawn(svc.clone().oneshot(job(1)));
    settle().await;
    let waiting = tokio::spawn(svc.clone().oneshot(job(2)));
    settle().await;
    assert_eq!(handle.depth(), 1);
    assert_eq!(handle.waiting_for_place(), 1);
    match queued.await.unwrap() {
        Err(Error::QueueTimeout { waited, .. }) => assert_eq!(waited, Duration::from_secs(2)),
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    // The third got the freed place at 2 s, having waited since 0: its
    // budget ends at 2 s too.
    match waiting.await.unwrap() {
        Err(Error::QueueTimeout { waited, .. }) => assert_eq!(waited, Duration::from_secs(2)),
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    assert_eq!(first.await.unwrap().unwrap(), 0);
    assert_eq!(seen(&seen_ids), vec![0]);
    assert_eq!(handle.stats().timed_out, 2);
    assert!(handle.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_request_that_gets_a_permit_in_time_is_not_timed_out() {
    let (up, seen_ids) = upstream();
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(4)
        .max_wait(Duration::from_secs(3))
        .build()
        .unwrap();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(Job {
        work: Duration::from_secs(2),
        ..job(0)
    }));
    settle().await;
    let second = tokio::spawn(svc.clone().oneshot(job(1)));
    assert_eq!(first.await.unwrap().unwrap(), 0);
    // It waited 2 s (< 3 s), then ran 10 s: the wait bound does not cut the call.
    assert_eq!(second.await.unwrap().unwrap(), 1);
    assert_eq!(seen(&seen_ids), vec![0, 1]);
}

// ---------------------------------------------------------------- deadlines

#[tokio::test(start_paused = true)]
async fn a_deadline_that_passes_in_the_queue_is_answered_and_never_sent() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 10, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    let late = tokio::spawn(svc.clone().oneshot(Job {
        deadline: Some(start + Duration::from_secs(1)),
        ..job(1)
    }));
    let on_time = tokio::spawn(svc.clone().oneshot(Job {
        deadline: Some(start + Duration::from_secs(60)),
        ..job(2)
    }));
    settle().await;
    assert_eq!(handle.depth(), 2);
    match late.await.unwrap() {
        Err(Error::DeadlineExceeded {
            attempts, source, ..
        }) => {
            assert_eq!(attempts, 0);
            assert!(source.is_none());
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(
        handle.depth(),
        1,
        "the expired request left the queue at once"
    );
    first.await.unwrap().unwrap();
    on_time.await.unwrap().unwrap();
    assert_eq!(seen(&seen_ids), vec![0, 2]);
    assert_eq!(handle.stats().expired, 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_already_past_its_deadline_is_not_sent_even_with_a_free_permit() {
    let (up, seen_ids) = upstream();
    let svc = layer(4, 4, WhenFull::Wait).layer(up);
    let past = Instant::now();
    sleep(Duration::from_millis(1)).await;
    let r = svc
        .oneshot(Job {
            deadline: Some(past),
            ..job(9)
        })
        .await;
    assert!(
        matches!(
            r,
            Err(Error::DeadlineExceeded {
                attempts: 0,
                source: None,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(seen(&seen_ids).is_empty());
}

// ---------------------------------------------------------------- priorities

#[tokio::test(start_paused = true)]
async fn queued_requests_are_served_by_priority_then_fifo() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 10, WhenFull::Wait);
    let svc = l.layer(up);
    let w = Duration::from_secs(1);
    let mut futs = vec![tokio::spawn(svc.clone().oneshot(job_p(
        0,
        Priority::Normal,
        w,
    )))];
    settle().await;
    for (id, p) in [
        (1, Priority::Low),
        (2, Priority::Normal),
        (3, Priority::High),
        (4, Priority::Low),
        (5, Priority::High),
        (6, Priority::Normal),
    ] {
        futs.push(tokio::spawn(svc.clone().oneshot(job_p(id, p, w))));
        settle().await;
    }
    for f in futs {
        f.await.unwrap().unwrap();
    }
    assert_eq!(seen(&seen_ids), vec![0, 3, 5, 2, 6, 1, 4]);
}

/// A steady flood of High work (arriving every 50 ms, twice the service
/// rate) does not starve a Low request that arrives at 225 ms: with
/// `age_after` = 1 s it competes as if queued at 225 ms - 2 s, so it goes
/// after exactly the 45 High requests that arrived before 2 225 ms and
/// before every later one. Without aging (a huge `age_after`) it waits for
/// the whole flood, which shows the test can tell the two apart.
#[tokio::test(start_paused = true)]
async fn aging_keeps_a_flood_of_high_work_from_starving_the_low_class() {
    async fn low_position(age_after: Duration) -> (usize, Vec<u64>) {
        let (up, seen_ids) = upstream();
        let l = QueueLayer::builder()
            .concurrency(1)
            .capacity(1_000)
            .age_after(age_after)
            .priority_by(|j: &Job| j.prio)
            .build()
            .unwrap();
        let svc = l.layer(up);
        let work = Duration::from_millis(100);
        let flood = {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for i in 0..200u64 {
                    tasks.push(tokio::spawn(svc.clone().oneshot(job_p(
                        1_000 + i,
                        Priority::High,
                        work,
                    ))));
                    sleep(Duration::from_millis(50)).await;
                }
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            })
        };
        sleep(Duration::from_millis(225)).await;
        let low = svc.clone().oneshot(job_p(1, Priority::Low, work)).await;
        assert_eq!(low.unwrap(), 1);
        flood.await.unwrap();
        let ids = seen(&seen_ids);
        (ids.iter().position(|&id| id == 1).unwrap(), ids)
    }
    let (pos, ids) = low_position(Duration::from_secs(1)).await;
    assert_eq!(
        pos, 45,
        "served after the High requests that arrived before its virtual time"
    );
    assert_eq!(ids[..45], (1_000..1_045).collect::<Vec<_>>()[..]);
    assert_eq!(ids[46], 1_045);
    let (strict, _) = low_position(Duration::from_secs(1_000)).await;
    assert_eq!(strict, 200, "without aging the whole flood goes first");
}

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

// ---------------------------------------------------------------- events

#[tokio::test(start_paused = true)]
async fn the_event_hook_sees_the_slow_paths() {
    let events: Arc<Mutex<Vec<QueueEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let (up, _) = upstream();
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .when_full(WhenFull::Reject)
        .priority_by(|j: &Job| j.prio)
        .deadline_by(|j: &Job| j.deadline)
        .on_event(move |e: &QueueEvent| sink.lock().unwrap().push(*e))
        .build()
        .unwrap();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    assert!(
        events.lock().unwrap().is_empty(),
        "the fast path emits nothing"
    );
    let second = tokio::spawn(svc.clone().oneshot(job_p(
        1,
        Priority::High,
        Duration::from_secs(1),
    )));
    settle().await;
    let _ = svc.clone().oneshot(job(2)).await;
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    let kinds: Vec<_> = events.lock().unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            QueueEventKind::Queued,
            QueueEventKind::Rejected,
            QueueEventKind::Dispatched
        ]
    );
    let ev = events.lock().unwrap();
    assert_eq!(ev[0].priority, Some(Priority::High));
    assert_eq!(ev[0].depth, 1);
    assert_eq!(ev[2].waited, Some(Duration::from_secs(10)));
}

// ---------------------------------------------------------------- config

#[test]
fn bad_configuration_is_a_config_error_naming_the_field() {
    let field = |r: Result<QueueLayer, llm_resilience::ConfigError>| r.unwrap_err().field;
    assert_eq!(
        field(QueueLayer::builder().concurrency(0).build()),
        "concurrency"
    );
    assert_eq!(field(QueueLayer::builder().capacity(0).build()), "capacity");
    assert_eq!(
        field(QueueLayer::builder().capacity(1 << 31).build()),
        "capacity"
    );
    assert_eq!(
        field(QueueLayer::builder().concurrency(1 << 31).build()),
        "concurrency"
    );
    assert_eq!(
        field(QueueLayer::builder().max_wait(Duration::ZERO).build()),
        "max_wait"
    );
    assert!(QueueLayer::builder()
        .capacity(0)
        .when_full(WhenFull::Reject)
        .build()
        .is_ok());
}

// ---------------------------------------------------------------- contract

mod contract {
    use super::*;
    use llm_resilience::testing::contract;

    #[tokio::test(start_paused = true)]
    async fn queue_layer_keeps_the_tower_contract() {
        contract::check_layer(|| {
            QueueLayer::builder()
                .concurrency(4)
                .capacity(4)
                .build()
                .unwrap()
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_keeps_the_tower_contract() {
        contract::check_layer(|| {
            QueueLayer::builder()
                .concurrency(2)
                .capacity(0)
                .when_full(WhenFull::Reject)
                .build()
                .unwrap()
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn queue_with_priorities_deadlines_and_max_wait_keeps_the_tower_contract() {
        contract::check_layer(|| {
            QueueLayer::builder()
                .concurrency(2)
                .capacity(8)
                .max_wait(Duration::from_secs(5))
                .priority_by(|n: &u32| {
                    if n.is_multiple_of(2) {
                        Priority::High
                    } else {
                        Priority::Low
                    }
                })
                .deadline_by(|_: &u32| Some(Instant::now() + Duration::from_secs(30)))
                .build()
                .unwrap()
        })
        .await;
    }
}

// ---------------------------------------------------------------- call without poll_ready

/// `call` without `poll_ready` on a full queue in wait mode: the response
/// future does the admission itself (waits for a place, then for a permit),
/// and a deadline still applies while it waits for the place.
#[tokio::test(start_paused = true)]
async fn call_without_poll_ready_waits_for_a_place_and_honours_the_deadline() {
    let (up, seen_ids) = upstream();
    let l = layer(1, 1, WhenFull::Wait);
    let handle = l.handle();
    let svc = l.layer(up);
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(job(0)));
    settle().await;
    let queued = tokio::spawn(svc.clone().oneshot(job(1)));
    settle().await;
    assert_eq!(handle.depth(), 1);
    // Full: these two call without poll_ready.
    let mut late_svc = svc.clone();
    let late = tokio::spawn(late_svc.call(Job {
        deadline: Some(start + Duration::from_secs(5)),
        ..job(2)
    }));
    let mut patient_svc = svc.clone();
    let patient = tokio::spawn(patient_svc.call(job(3)));
    settle().await;
    assert_eq!(handle.waiting_for_place(), 2);
    assert!(matches!(
        late.await.unwrap(),
        Err(Error::DeadlineExceeded {
            attempts: 0,
            source: None,
            ..
        })
    ));
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(handle.waiting_for_place(), 1, "the expired caller left");
    assert_eq!(first.await.unwrap().unwrap(), 0);
    assert_eq!(queued.await.unwrap().unwrap(), 1);
    assert_eq!(patient.await.unwrap().unwrap(), 3);
    assert_eq!(seen(&seen_ids), vec![0, 1, 3]);
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
