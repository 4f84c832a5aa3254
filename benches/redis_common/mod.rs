//! What the Redis benches share: the job, the producers' enqueue loops
//! (the floor's plain `XADD` and `JobQueue::enqueue`), the process's CPU
//! time and the medians.

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

/// The median (of an even count, the mean of the two middle values); sorts
/// `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

/// `median (least to most)` of `v`, two decimals; sorts `v`.
pub fn spread(v: &mut [f64]) -> String {
    let m = median(v);
    format!("{m:.2} ({:.2} to {:.2})", v[0], v[v.len() - 1])
}
