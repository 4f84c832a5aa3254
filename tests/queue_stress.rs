//! Stress: 100 000 requests from 64 tasks through one queue, with seeded
//! random priorities, deadlines, cancellations, failures and slow calls, on
//! a paused clock. Every request gets exactly one answer, the upstream never
//! sees a request that was cancelled before it was sent or whose deadline
//! had passed, and the queue ends empty with every permit back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{Priority, QueueLayer, WhenFull};
use llm_resilience::{BoxError, Error};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::{sleep, Instant};
use tower::{Layer, Service, ServiceExt};

const TASKS: u64 = 64;
const PER_TASK: u64 = 1_563; // 64 × 1 563 = 100 032 requests
const TOTAL: usize = (TASKS * PER_TASK) as usize;

#[derive(Clone, Debug)]
struct Job {
    id: usize,
    prio: Priority,
    deadline: Option<Instant>,
    work: Duration,
    fail: bool,
}

struct Book {
    /// Times the upstream was called with each request.
    sent: Vec<AtomicU32>,
    /// The caller dropped the request before it was sent.
    cancelled_unsent: Vec<AtomicBool>,
    /// Answers (a result, or the caller giving up) per request.
    answers: Vec<AtomicU32>,
    /// Calls that arrived upstream after their deadline.
    late_sends: AtomicU64,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
}

#[derive(Clone)]
struct Upstream(Arc<Book>);

impl Service<Job> for Upstream {
    type Response = usize;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, j: Job) -> Self::Future {
        let book = Arc::clone(&self.0);
        book.sent[j.id].fetch_add(1, Ordering::SeqCst);
        if j.deadline.is_some_and(|d| d <= Instant::now()) {
            book.late_sends.fetch_add(1, Ordering::SeqCst);
        }
        let now = book.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        book.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Box::pin(async move {
            struct Leave(Arc<Book>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _leave = Leave(book);
            sleep(j.work).await;
            if j.fail {
                Err("random upstream failure".into())
            } else {
                Ok(j.id)
            }
        })
    }
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    upstream_err: u64,
    expired: u64,
    timed_out: u64,
    rejected: u64,
    cancelled: u64,
}

#[tokio::test(start_paused = true)]
async fn every_request_gets_exactly_one_answer_under_random_load() {
    run(WhenFull::Wait).await;
}

#[tokio::test(start_paused = true)]
async fn every_request_gets_exactly_one_answer_under_random_load_in_reject_mode() {
    run(WhenFull::Reject).await;
}

async fn run(mode: WhenFull) {
    let book = Arc::new(Book {
        sent: (0..TOTAL).map(|_| AtomicU32::new(0)).collect(),
        cancelled_unsent: (0..TOTAL).map(|_| AtomicBool::new(false)).collect(),
        answers: (0..TOTAL).map(|_| AtomicU32::new(0)).collect(),
        late_sends: AtomicU64::new(0),
        in_flight: AtomicU32::new(0),
        max_in_flight: AtomicU32::new(0),
    });
    let layer = QueueLayer::builder()
        .concurrency(8)
        .capacity(32)
        .when_full(mode)
        .max_wait(Duration::from_millis(100))
        .age_after(Duration::from_millis(50))
        .priority_by(|j: &Job| j.prio)
        .deadline_by(|j: &Job| j.deadline)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(Upstream(Arc::clone(&book)));

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let svc = svc.clone();
        let book = Arc::clone(&book);
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(0x5EED ^ t);
            let mut tally = Tally::default();
            for k in 0..PER_TASK {
                let id = (t * PER_TASK + k) as usize;
                let prio = match rng.random_range(0..3) {
                    0 => Priority::High,
                    1 => Priority::Normal,
                    _ => Priority::Low,
                };
                let deadline = rng
                    .random_bool(0.3)
                    .then(|| Instant::now() + Duration::from_millis(rng.random_range(0..150)));
                let job = Job {
                    id,
                    prio,
                    deadline,
                    work: Duration::from_millis(rng.random_range(0..30)),
                    fail: rng.random_bool(0.1),
                };
                let give_up = rng
                    .random_bool(0.2)
                    .then(|| Duration::from_millis(rng.random_range(0..100)));
                let fut = svc.clone().oneshot(job);
                let result = match give_up {
                    None => Some(fut.await),
                    Some(after) => tokio::time::timeout(after, fut).await.ok(),
                };
                book.answers[id].fetch_add(1, Ordering::SeqCst);
                match result {
                    None => {
                        // The future was dropped: a cancellation.
                        if book.sent[id].load(Ordering::SeqCst) == 0 {
                            book.cancelled_unsent[id].store(true, Ordering::SeqCst);
                        }
                        tally.cancelled += 1;
                    }
                    Some(Ok(got)) => {
                        assert_eq!(got, id, "answered with another request's response");
                        tally.ok += 1;
                    }
                    Some(Err(Error::Upstream { .. })) => tally.upstream_err += 1,
                    Some(Err(Error::DeadlineExceeded {
                        attempts: 0,
                        source: None,
                        ..
                    })) => {
                        assert_eq!(
                            book.sent[id].load(Ordering::SeqCst),
                            0,
                            "expired request was sent"
                        );
                        tally.expired += 1;
                    }
                    Some(Err(Error::QueueTimeout { .. })) => {
                        assert_eq!(
                            book.sent[id].load(Ordering::SeqCst),
                            0,
                            "timed-out request was sent"
                        );
                        tally.timed_out += 1;
                    }
                    Some(Err(Error::QueueFull { depth, .. })) => {
                        assert_eq!(depth, 32);
                        assert_eq!(
                            book.sent[id].load(Ordering::SeqCst),
                            0,
                            "rejected request was sent"
                        );
                        tally.rejected += 1;
                    }
                    Some(Err(other)) => panic!("unexpected answer: {other:?}"),
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        let tally = t.await.unwrap();
        total.ok += tally.ok;
        total.upstream_err += tally.upstream_err;
        total.expired += tally.expired;
        total.timed_out += tally.timed_out;
        total.cancelled += tally.cancelled;
        total.rejected += tally.rejected;
    }
    // Let nothing linger (there is no worker; this is only a safety margin).
    sleep(Duration::from_secs(1)).await;

    let answered = total.ok
        + total.upstream_err
        + total.expired
        + total.timed_out
        + total.rejected
        + total.cancelled;
    assert_eq!(answered, TOTAL as u64, "{total:?}");
    for id in 0..TOTAL {
        assert_eq!(
            book.answers[id].load(Ordering::SeqCst),
            1,
            "request {id} answered twice or never"
        );
        let sent = book.sent[id].load(Ordering::SeqCst);
        assert!(sent <= 1, "request {id} sent {sent} times");
        if book.cancelled_unsent[id].load(Ordering::SeqCst) {
            assert_eq!(
                sent, 0,
                "request {id} was sent after its caller cancelled it"
            );
        }
    }
    assert_eq!(
        book.late_sends.load(Ordering::SeqCst),
        0,
        "expired requests reached the upstream"
    );
    assert!(
        book.max_in_flight.load(Ordering::SeqCst) <= 8,
        "concurrency bound broken"
    );
    assert!(handle.is_idle(), "queue not empty or permits missing");
    assert_eq!((handle.depth(), handle.in_flight()), (0, 0));
    // Every path was exercised.
    assert!(total.ok > 0 && total.upstream_err > 0, "{total:?}");
    assert!(
        total.expired > 0 && total.cancelled > 0 && total.timed_out > 0,
        "{total:?}"
    );
    assert_eq!(total.rejected > 0, mode == WhenFull::Reject, "{total:?}");
    let stats = handle.stats();
    assert_eq!(stats.expired, total.expired);
    assert_eq!(stats.timed_out, total.timed_out);
    assert_eq!(stats.rejected, total.rejected);
    assert!(stats.cancelled > 0 && stats.cancelled <= total.cancelled);
    eprintln!("{total:?} {stats:?}");
}

/// The same bookkeeping on a real 2-worker runtime (no timers: the upstream
/// yields instead of sleeping), so the lock-free fast path and the hand-over
/// under the lock race for real. Cancellations drop a future after its
/// first poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_and_places_balance_on_a_multi_threaded_runtime() {
    balance(WhenFull::Wait).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_and_places_balance_on_a_multi_threaded_runtime_in_reject_mode() {
    balance(WhenFull::Reject).await;
}

async fn balance(mode: WhenFull) {
    const N: u64 = 20_000;
    let in_flight = Arc::new(AtomicU32::new(0));
    let max_in_flight = Arc::new(AtomicU32::new(0));
    let sent = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect::<Vec<_>>());
    let upstream = Spinner {
        in_flight: Arc::clone(&in_flight),
        max_in_flight: Arc::clone(&max_in_flight),
        sent: Arc::clone(&sent),
    };
    let layer = QueueLayer::builder()
        .concurrency(5)
        .capacity(16)
        .when_full(mode)
        .priority_by(|r: &(u64, u32)| match r.0 % 3 {
            0 => Priority::High,
            1 => Priority::Normal,
            _ => Priority::Low,
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(upstream);
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let svc = svc.clone();
        let sent = Arc::clone(&sent);
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(t);
            let (mut ok, mut dropped) = (0u64, 0u64);
            // An answer: the response (counted as ok) or, in reject mode,
            // `QueueFull` for a request that was then never sent.
            let check = |r: Result<u64, Error>, id: u64| match r {
                Ok(got) => {
                    assert_eq!(got, id);
                    1
                }
                Err(Error::QueueFull { .. }) if mode == WhenFull::Reject => {
                    assert_eq!(sent[id as usize].load(Ordering::SeqCst), 0);
                    0
                }
                Err(e) => panic!("unexpected answer {e:?}"),
            };
            for k in 0..N / 32 {
                let id = t * (N / 32) + k;
                let fut = svc.clone().oneshot((id, rng.random_range(0..4)));
                if rng.random_bool(0.1) {
                    let mut fut = Box::pin(fut);
                    if let Poll::Ready(r) = futures::poll!(fut.as_mut()) {
                        ok += check(r, id);
                    } else {
                        dropped += 1;
                    }
                } else {
                    ok += check(fut.await, id);
                }
            }
            (ok, dropped)
        }));
    }
    let (mut ok, mut dropped) = (0, 0);
    for t in tasks {
        let (o, d) = t.await.unwrap();
        ok += o;
        dropped += d;
    }
    let rejected = handle.stats().rejected;
    assert_eq!(ok + dropped + rejected, N);
    assert!(dropped > 0);
    assert_eq!(rejected > 0, mode == WhenFull::Reject);
    assert!(max_in_flight.load(Ordering::SeqCst) <= 5);
    let sent_total: u32 = sent.iter().map(|s| s.load(Ordering::SeqCst)).sum();
    assert!(sent.iter().all(|s| s.load(Ordering::SeqCst) <= 1));
    assert!(u64::from(sent_total) >= ok);
    assert!(handle.is_idle(), "queue not empty or permits missing");
}

#[derive(Clone)]
struct Spinner {
    in_flight: Arc<AtomicU32>,
    max_in_flight: Arc<AtomicU32>,
    sent: Arc<Vec<AtomicU32>>,
}

impl Service<(u64, u32)> for Spinner {
    type Response = u64;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (id, spins): (u64, u32)) -> Self::Future {
        self.sent[id as usize].fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        struct Leave(Arc<AtomicU32>);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let leave = Leave(Arc::clone(&self.in_flight));
        Box::pin(async move {
            let _leave = leave;
            for _ in 0..spins {
                tokio::task::yield_now().await;
            }
            Ok(id)
        })
    }
}
