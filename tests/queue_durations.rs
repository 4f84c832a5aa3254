//! Every duration the queue's builder accepts works: `Duration::MAX` (or
//! any value too large to add to the clock) for the maximum wait and the
//! aging step, a shutdown timeout and a far deadline mean "no limit", never
//! a panic. On a paused clock.

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{Priority, QueueLayer, WhenFull};
use llm_resilience::{BoxError, Error};
use tokio::time::{sleep, Instant};
use tower::{Layer, Service, ServiceExt};

/// Requests: (id, class, deadline). The upstream records the order it is
/// called in and answers after one second (request 0: after 10^7 s).
type Req = (u64, Priority, Option<Instant>);

#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<u64>>>,
}

impl Service<Req> for Upstream {
    type Response = u64;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (id, _, _): Req) -> Self::Future {
        self.seen.lock().unwrap().push(id);
        let work = if id == 0 { 10_000_000 } else { 1 };
        Box::pin(async move {
            sleep(Duration::from_secs(work)).await;
            Ok(id)
        })
    }
}

async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn req(id: u64) -> Req {
    (id, Priority::Normal, None)
}

const HUGE: [Duration; 3] = [
    Duration::MAX,
    Duration::from_secs(u64::MAX / 2),
    // Fits the clock (about 3 000 years): a real timer far away.
    Duration::from_secs(100_000_000_000),
];

#[tokio::test(start_paused = true)]
async fn a_huge_max_wait_means_no_limit_for_queued_and_place_waiting_requests() {
    for max_wait in HUGE {
        let up = Upstream::default();
        let l = QueueLayer::builder()
            .concurrency(1)
            .capacity(1)
            .max_wait(max_wait)
            .priority_by(|r: &Req| r.1)
            .build()
            .expect("a huge max_wait is valid");
        let handle = l.handle();
        let svc = l.layer(up.clone());
        let first = tokio::spawn(svc.clone().oneshot(req(0)));
        settle().await;
        // Queued for a permit.
        let queued = tokio::spawn(svc.clone().oneshot(req(1)));
        settle().await;
        // Waits in poll_ready for a place.
        let waiting = tokio::spawn(svc.clone().oneshot(req(2)));
        settle().await;
        assert_eq!(handle.depth(), 1);
        assert_eq!(handle.waiting_for_place(), 1);
        for (i, t) in [first, queued, waiting].into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u64, "max_wait {max_wait:?}");
        }
        assert_eq!(*up.seen.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(handle.stats().timed_out, 0);
        assert!(handle.is_idle());
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_max_wait_in_a_call_without_poll_ready_means_no_limit() {
    let up = Upstream::default();
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(1)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let handle = l.handle();
    let svc = l.layer(up);
    let first = tokio::spawn(svc.clone().oneshot(req(0)));
    settle().await;
    let queued = tokio::spawn(svc.clone().oneshot(req(1)));
    settle().await;
    // Full: this one calls without poll_ready, so its future admits.
    let mut late = svc.clone();
    let late = tokio::spawn(late.call(req(2)));
    settle().await;
    assert_eq!(handle.waiting_for_place(), 1);
    assert_eq!(first.await.unwrap().unwrap(), 0);
    assert_eq!(queued.await.unwrap().unwrap(), 1);
    assert_eq!(late.await.unwrap().unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_huge_aging_step_makes_the_classes_strict() {
    for age_after in HUGE {
        let up = Upstream::default();
        let l = QueueLayer::builder()
            .concurrency(1)
            .capacity(10)
            .age_after(age_after)
            .priority_by(|r: &Req| r.1)
            .build()
            .expect("a huge age_after is valid");
        let svc = l.layer(up.clone());
        let mut tasks = vec![tokio::spawn(svc.clone().oneshot(req(0)))];
        settle().await;
        // Low first, then Normal, then High, a long time apart: with a
        // finite step the Low one would have aged past the others.
        for (id, class) in [
            (1, Priority::Low),
            (2, Priority::Normal),
            (3, Priority::High),
        ] {
            tasks.push(tokio::spawn(svc.clone().oneshot((id, class, None))));
            settle().await;
            sleep(Duration::from_secs(1_000_000)).await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            *up.seen.lock().unwrap(),
            vec![0, 3, 2, 1],
            "age_after {age_after:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_far_deadline_is_no_deadline_and_a_huge_shutdown_timeout_waits_for_the_drain() {
    let up = Upstream::default();
    let far = Instant::now()
        .checked_add(Duration::from_secs(100_000_000_000))
        .expect("fits the clock");
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(2)
        .when_full(WhenFull::Reject)
        .max_wait(Duration::MAX)
        .deadline_by(|r: &Req| r.2)
        .build()
        .unwrap();
    let handle = l.handle();
    let svc = l.layer(up);
    let calls: Vec<_> = (0..3)
        .map(|id| tokio::spawn(svc.clone().oneshot((id, Priority::Normal, Some(far)))))
        .collect();
    settle().await;
    let report = handle.shutdown(Duration::MAX).await;
    assert!(report.drained);
    assert_eq!(report.failed, 0);
    for (i, t) in calls.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i as u64);
    }
    assert!(matches!(svc.oneshot(req(9)).await, Err(Error::Shutdown)));
    assert_eq!(handle.stats().expired, 0);
}
