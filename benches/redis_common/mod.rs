//! What the Redis benches share: the job, the producers' enqueue loops
//! (the floor's plain `XADD` and `JobQueue::enqueue`) and the process's CPU
//! time.

use std::time::Instant;

use llm_resilience::redis::JobQueue;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Job {
    pub n: u64,
}

/// Producer tasks per enqueue phase, sharing one connection.
pub const PRODUCERS: u64 = 64;

/// Enqueues `jobs` with one plain `XADD` each on clones of `conn` (one per
/// task); jobs/s.
pub async fn xadd<C: ConnectionLike + Clone + Send + 'static>(
    conn: C,
    stream: &str,
    jobs: u64,
) -> f64 {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (mut c, s) = (conn.clone(), stream.to_owned());
        tasks.spawn(async move {
            for n in (p..jobs).step_by(PRODUCERS as usize) {
                let payload = serde_json::to_vec(&Job { n }).unwrap();
                let _: String = redis::cmd("XADD")
                    .arg(&s)
                    .arg("*")
                    .arg("payload")
                    .arg(payload)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        });
    }
    tasks.join_all().await;
    jobs as f64 / t.elapsed().as_secs_f64()
}

/// Enqueues `jobs` with `JobQueue::enqueue` (a clone of the queue per
/// task); jobs/s.
pub async fn enqueue(queue: &JobQueue, jobs: u64) -> f64 {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let q = queue.clone();
        tasks.spawn(async move {
            for n in (p..jobs).step_by(PRODUCERS as usize) {
                q.enqueue(&Job { n }).await.unwrap();
            }
        });
    }
    tasks.join_all().await;
    jobs as f64 / t.elapsed().as_secs_f64()
}

/// CPU time of every thread of this process so far, in µs (the first field
/// of each thread's `schedstat`, in ns; Linux; 0 elsewhere).
pub fn client_cpu_us() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        / 1000
}
