//! The Redis job queue against a real `redis-server` (set
//! `LLM_RESILIENCE_REDIS_URL`; see the README). Real time, short timeouts,
//! no assertion on durations.

mod redis_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use llm_resilience::redis::{
    Enqueue, JobOutcome, JobQueue, Priority, QueueConfig, RedisQueueError, Worker, WorkerEvent,
};
use redis_support::{fast, fresh_queue, raw, read_stream, until, url, WAIT};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Job {
    n: u32,
}

#[derive(Debug)]
struct Transient;
impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream 503")
    }
}
impl std::error::Error for Transient {}

#[tokio::test]
async fn a_job_runs_through_the_service_and_its_outcome_is_awaited_by_id() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "basic").await;
    let svc = tower::service_fn(|j: Job| async move { Ok::<_, Transient>(j.n * 2) });
    let w = Worker::new(&q, svc, fast().build().unwrap())
        .spawn()
        .await
        .unwrap();
    let id = q.enqueue(&Job { n: 21 }).await.unwrap();
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Completed(42)
    );
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["job"], id.as_str());
    assert_eq!(
        (out[0]["status"].as_str(), out[0]["result"].as_str()),
        ("ok", "42")
    );
    let s = q.stats().await.unwrap();
    assert_eq!((s.total_depth(), s.pending, s.output), (0, [0; 3], 1));
    w.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_idempotency_key_returns_the_first_id_and_enqueues_nothing() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "idem").await;
    let opts = Enqueue::new().idempotency_key("order-1");
    let (a, new_a) = q.enqueue_with(&Job { n: 1 }, &opts).await.unwrap();
    let (b, new_b) = q.enqueue_with(&Job { n: 2 }, &opts).await.unwrap();
    let (c, _) = q
        .enqueue_with(&Job { n: 3 }, &Enqueue::new().idempotency_key("order-2"))
        .await
        .unwrap();
    assert_eq!((a.clone(), new_a, new_b), (b, true, false));
    assert_ne!(a, c);
    assert_eq!(q.stats().await.unwrap().depth, [0, 2, 0]);
}

#[tokio::test]
async fn transient_failures_come_back_after_a_delay_and_then_succeed() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "retry").await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |j: Job| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if k < 2 {
                Err(Transient)
            } else {
                Ok(j.n)
            }
        }
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let w = Worker::new(&q, svc, fast().build().unwrap())
        .on_event(move |e| {
            if let WorkerEvent::Retried {
                deliveries, error, ..
            } = e
            {
                ev.lock().unwrap().push((*deliveries, error.to_string()));
            }
        })
        .spawn()
        .await
        .unwrap();
    let id = q.enqueue(&Job { n: 5 }).await.unwrap();
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Completed(5)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev,
        vec![
            (1, "upstream 503".to_owned()),
            (2, "upstream 503".to_owned())
        ]
    );
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    assert_eq!(out[0]["deliveries"], "3");
    assert_eq!(q.stats().await.unwrap().retried, 2);
    w.shutdown().await;
}

#[tokio::test]
async fn after_max_deliveries_and_on_a_permanent_error_jobs_go_to_dead_letters() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "dead").await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |j: Job| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if j.n == 0 {
                Err::<u32, llm_resilience::BoxError>(Box::new(Transient))
            } else {
                let e: llm_resilience::BoxError =
                    Box::new(llm_resilience::testing::errors::permanent(
                        llm_resilience::classify::Reason::Auth,
                        1,
                        Box::new(Transient),
                    ));
                Err(e)
            }
        }
    });
    let w = Worker::new(&q, svc, fast().max_deliveries(3).build().unwrap())
        .spawn()
        .await
        .unwrap();
    let transient = q.enqueue(&Job { n: 0 }).await.unwrap();
    match q.wait_for::<u32>(&transient, WAIT).await.unwrap() {
        JobOutcome::DeadLettered { error, deliveries } => {
            assert_eq!(deliveries, 3);
            assert!(error.contains("upstream 503"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let permanent = q.enqueue(&Job { n: 1 }).await.unwrap();
    match q.wait_for::<u32>(&permanent, WAIT).await.unwrap() {
        JobOutcome::DeadLettered { deliveries, .. } => assert_eq!(deliveries, 1),
        other => panic!("{other:?}"),
    }
    let dead = read_stream(&url, &format!("llmq:{{{}}}:dead", q.config().name())).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[1]["payload"], r#"{"n":1}"#);
    w.shutdown().await;
}

#[tokio::test]
async fn poison_entries_go_to_dead_letters_and_never_block_the_stream() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "poison").await;
    let name = q.config().name().to_owned();
    let stream = format!("llmq:{{{name}}}:jobs:normal");
    let mut conn = raw(&url).await;
    // Written by something else: no job id.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("hello")
        .arg("world")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A job of another type.
    let bad = q.enqueue(&"not a Job").await.unwrap();
    let good = q.enqueue(&Job { n: 9 }).await.unwrap();
    let svc = tower::service_fn(|j: Job| async move { Ok::<_, Transient>(j.n) });
    let w = Worker::new(&q, svc, fast().build().unwrap())
        .spawn()
        .await
        .unwrap();
    assert_eq!(
        q.wait_for::<u32>(&good, WAIT).await.unwrap(),
        JobOutcome::Completed(9)
    );
    match q.wait_for::<u32>(&bad, WAIT).await.unwrap() {
        JobOutcome::DeadLettered { error, .. } => assert!(error.contains("does not deserialize")),
        other => panic!("{other:?}"),
    }
    let dead = read_stream(&url, &format!("llmq:{{{name}}}:dead")).await;
    assert_eq!(dead.len(), 2);
    assert!(dead
        .iter()
        .any(|d| d["job"].starts_with("normal-") && d["error"].contains("malformed entry")));
    // A result of the wrong type is a typed error, not a panic.
    assert!(matches!(
        q.wait_for::<String>(&good, WAIT).await,
        Err(RedisQueueError::Deserialize { .. })
    ));
    w.shutdown().await;
}

#[tokio::test]
async fn an_expired_job_is_not_processed() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "expired").await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |j: Job| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Transient>(j.n) }
    });
    let past = SystemTime::now() - Duration::from_secs(1);
    let id = q
        .enqueue_with(&Job { n: 1 }, &Enqueue::new().deadline(past))
        .await
        .unwrap()
        .0;
    let w = Worker::new(&q, svc, fast().build().unwrap())
        .spawn()
        .await
        .unwrap();
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Expired
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    assert_eq!(out[0]["status"], "expired");
    w.shutdown().await;
}

#[tokio::test]
async fn weighted_round_robin_never_starves_the_low_class() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "prio").await;
    for n in 0..70 {
        q.enqueue_with(&Job { n }, &Enqueue::new().priority(Priority::High))
            .await
            .unwrap();
        q.enqueue_with(
            &Job { n: 1000 + n },
            &Enqueue::new().priority(Priority::Low),
        )
        .await
        .unwrap();
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let svc = tower::service_fn(move |j: Job| {
        o.lock().unwrap().push(j.n >= 1000);
        async move { Ok::<_, Transient>(j.n) }
    });
    // One at a time, so the order of calls is the order of taking.
    let w = Worker::new(&q, svc, fast().max_in_flight(1).build().unwrap())
        .spawn()
        .await
        .unwrap();
    let last = q
        .enqueue_with(&Job { n: 5000 }, &Enqueue::new().priority(Priority::Low))
        .await
        .unwrap();
    q.wait_for::<u32>(&last.0, WAIT).await.unwrap();
    let order = order.lock().unwrap().clone();
    // Turns 4:2:1 with normal empty: 6 high then 1 low in every 7.
    let low_in_first_70 = order[..70].iter().filter(|&&low| low).count();
    assert_eq!(low_in_first_70, 10, "{order:?}");
    w.shutdown().await;
}

#[tokio::test]
async fn a_worker_reads_no_more_than_it_can_start() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "backpressure").await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicU32::new(0));
    let (g, r) = (gate.clone(), running.clone());
    let svc = tower::service_fn(move |j: Job| {
        let (g, r) = (g.clone(), r.clone());
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            g.acquire().await.unwrap().forget();
            Ok::<_, Transient>(j.n)
        }
    });
    let w = Worker::new(&q, svc, fast().max_in_flight(2).build().unwrap())
        .spawn()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(q.enqueue(&Job { n }).await.unwrap());
    }
    until(
        || "two jobs never ran".into(),
        || running.load(Ordering::SeqCst) >= 2,
    )
    .await;
    for _ in 0..5 {
        let s = q.stats().await.unwrap();
        assert_eq!((s.pending[1], s.depth[1]), (2, 3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.add_permits(5);
    for id in &ids {
        assert!(matches!(
            q.wait_for::<u32>(id, WAIT).await.unwrap(),
            JobOutcome::Completed(_)
        ));
    }
    w.shutdown().await;
}

#[tokio::test]
async fn a_crashed_workers_job_is_reclaimed_after_the_visibility_timeout() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "reclaim").await;
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let hang = tower::service_fn(move |_j: Job| {
        s.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<u32, Transient>>()
    });
    let config = fast()
        .visibility_timeout(Duration::from_millis(600))
        .job_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let a = Worker::new(&q, hang, config.clone()).spawn().await.unwrap();
    let id = q.enqueue(&Job { n: 3 }).await.unwrap();
    until(
        || "the job never started".into(),
        || started.load(Ordering::SeqCst) > 0,
    )
    .await;
    a.abort();
    let ok = tower::service_fn(|j: Job| async move { Ok::<_, Transient>(j.n) });
    let b = Worker::new(&q, ok, config).spawn().await.unwrap();
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Completed(3)
    );
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    assert_eq!((out.len(), out[0]["deliveries"].as_str()), (1, "2"));
    b.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_jobs_within_the_grace_and_releases_the_rest() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "shutdown").await;
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let svc = tower::service_fn(move |j: Job| {
        s.fetch_add(1, Ordering::SeqCst);
        async move {
            if j.n == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Transient>(j.n)
            } else {
                std::future::pending().await
            }
        }
    });
    let config = fast()
        .shutdown_grace(Duration::from_millis(300))
        .build()
        .unwrap();
    let w = Worker::new(&q, svc, config).spawn().await.unwrap();
    let quick = q.enqueue(&Job { n: 0 }).await.unwrap();
    let stuck = q.enqueue(&Job { n: 1 }).await.unwrap();
    until(
        || "two jobs never started".into(),
        || started.load(Ordering::SeqCst) >= 2,
    )
    .await;
    w.shutdown().await;
    assert_eq!(
        q.outcome::<u32>(&quick).await.unwrap(),
        Some(JobOutcome::Completed(0))
    );
    assert_eq!(q.outcome::<u32>(&stuck).await.unwrap(), None);
    // Released, not lost, and its delivery not counted.
    let ok = tower::service_fn(|j: Job| async move { Ok::<_, Transient>(j.n) });
    let w = Worker::new(&q, ok, fast().build().unwrap())
        .spawn()
        .await
        .unwrap();
    assert_eq!(
        q.wait_for::<u32>(&stuck, WAIT).await.unwrap(),
        JobOutcome::Completed(1)
    );
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    let by_job: HashMap<_, _> = out
        .iter()
        .map(|e| (e["job"].clone(), e["deliveries"].clone()))
        .collect();
    assert_eq!(by_job[stuck.as_str()], "1");
    assert_eq!(q.stats().await.unwrap().retried, 0);
    w.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_redis_and_a_bad_url_are_typed_errors() {
    // No server needed: port 1 on loopback refuses.
    let config = QueueConfig::builder("x")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let e = JobQueue::connect("redis://127.0.0.1:1/", config.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, RedisQueueError::Redis { .. }), "{e:?}");
    let e = JobQueue::connect("not a url", config).await.unwrap_err();
    assert!(matches!(e, RedisQueueError::Redis { .. }), "{e:?}");
}

#[tokio::test]
async fn waiting_for_an_unknown_job_times_out_with_a_typed_error() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "wait").await;
    let e = q
        .wait_for::<u32>(&"404".into(), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(e, RedisQueueError::WaitTimedOut { .. }), "{e:?}");
    let big = "x".repeat(2 << 20);
    let e = q.enqueue(&big).await.unwrap_err();
    assert!(
        matches!(e, RedisQueueError::PayloadTooLarge { .. }),
        "{e:?}"
    );
}

/// A busy worker reads with plain `XREADGROUP`s; a job another worker
/// delayed must still come back while it is busy (its take script runs at
/// least every `idle_wait`), not only once it runs out of work; and a class
/// it found empty is read again (a high-priority job is not stuck behind
/// the normal ones it is busy with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_another_worker_delayed_comes_back_while_this_one_is_busy() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "busy-delayed").await;
    let (x, _) = q
        .enqueue_with(&Job { n: 0 }, &Enqueue::new().priority(Priority::High))
        .await
        .unwrap();
    // B fails the job once, delaying it by 300 ms, and stops.
    let retried = Arc::new(tokio::sync::Notify::new());
    let r = retried.clone();
    let b = Worker::new(
        &q,
        tower::service_fn(|_: Job| async { Err::<u32, _>(Transient) }),
        fast()
            .max_in_flight(1)
            .retry_delay(Duration::from_millis(300))
            .max_retry_delay(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
    .on_event(move |e| {
        if let WorkerEvent::Retried { .. } = e {
            r.notify_one();
        }
    })
    .spawn()
    .await
    .unwrap();
    tokio::time::timeout(WAIT, retried.notified())
        .await
        .expect("B delays the job");
    b.shutdown().await;
    // A starts before the job is due, then gets 5 000 other jobs, each
    // 1 ms, 4 at a time: over a second of work, so it is busy reading
    // normal jobs when the delayed one falls due.
    const FILLERS: u32 = 5_000;
    let done = Arc::new(AtomicU32::new(0));
    let at_x = Arc::new(AtomicU32::new(u32::MAX));
    let (d, ax) = (done.clone(), at_x.clone());
    let a = Worker::new(
        &q,
        tower::service_fn(move |j: Job| {
            let (d, ax) = (d.clone(), ax.clone());
            async move {
                if j.n == 0 {
                    ax.store(d.load(Ordering::SeqCst), Ordering::SeqCst);
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    d.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, Transient>(j.n)
            }
        }),
        fast().max_in_flight(4).build().unwrap(),
    )
    .spawn()
    .await
    .unwrap();
    for n in 1..=FILLERS {
        q.enqueue(&Job { n }).await.unwrap();
    }
    assert_eq!(
        q.wait_for::<u32>(&x, WAIT).await.unwrap(),
        JobOutcome::Completed(0)
    );
    let before = at_x.load(Ordering::SeqCst);
    assert!(
        before < FILLERS,
        "the delayed job ran only after all {FILLERS} other jobs ({before} done)"
    );
    eprintln!("the delayed job ran after {before} of {FILLERS} other jobs");
    a.abort();
}
