//! Shared by the queue layer's paused-clock tests (`queue.rs`,
//! `queue_lifecycle.rs`): a scripted job, an upstream that records what it
//! is sent, and a queue layer over it.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use llm_resilience::queue::{DeadlineOf, Priority, PriorityOf, QueueLayer, WhenFull};
use llm_resilience::BoxError;
use tokio::time::{sleep, Instant};
use tower::Service;

#[derive(Clone, Debug)]
pub struct Job {
    pub id: u64,
    pub prio: Priority,
    pub deadline: Option<Instant>,
    pub work: Duration,
    pub fail: bool,
}

pub fn job(id: u64) -> Job {
    Job {
        id,
        prio: Priority::Normal,
        deadline: None,
        work: Duration::from_secs(10),
        fail: false,
    }
}

pub fn job_p(id: u64, prio: Priority, work: Duration) -> Job {
    Job {
        prio,
        work,
        ..job(id)
    }
}

pub type Seen = Arc<Mutex<Vec<u64>>>;

/// An upstream that records every request it is called with (by id) and
/// answers after the request's `work` time.
#[derive(Clone)]
pub struct Upstream {
    pub seen: Seen,
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

pub fn upstream() -> (Upstream, Seen) {
    let seen = Seen::default();
    (
        Upstream {
            seen: Arc::clone(&seen),
        },
        seen,
    )
}

pub fn layer(
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

pub async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

pub fn seen(s: &Seen) -> Vec<u64> {
    s.lock().unwrap().clone()
}
