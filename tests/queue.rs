//! The queue layer on a paused clock: capacity boundaries in both modes,
//! maximum wait, deadlines, priorities and aging, events, configuration
//! errors, the tower contract and `call` without `poll_ready`. Cancellation,
//! failures and shutdown are in `queue_lifecycle.rs`.

mod queue_support;

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{Priority, QueueEvent, QueueEventKind, QueueLayer, WhenFull};
use llm_resilience::Error;
use queue_support::{job, job_p, layer, seen, settle, upstream, Job};
use tokio::time::{sleep, Instant};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

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

#[tokio::test(start_paused = true)]
async fn a_max_wait_before_the_deadline_ends_the_wait_at_the_max_wait() {
    let (up, seen_ids) = upstream();
    let l = QueueLayer::builder()
        .concurrency(1)
        .capacity(4)
        .max_wait(Duration::from_secs(2))
        .deadline_by(|j: &Job| j.deadline)
        .build()
        .unwrap();
    let svc = l.layer(up);
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(Job {
        work: Duration::from_secs(5),
        ..job(0)
    }));
    settle().await;
    // Queued with a deadline at 10 s: its one timer, armed for the
    // deadline, is pointed at the end of the 2 s wait instead.
    let queued = svc.clone().oneshot(Job {
        deadline: Some(start + Duration::from_secs(10)),
        ..job(1)
    });
    match queued.await {
        Err(Error::QueueTimeout { waited, .. }) => assert_eq!(waited, Duration::from_secs(2)),
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(first.await.unwrap().unwrap(), 0);
    assert_eq!(seen(&seen_ids), vec![0]);
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
