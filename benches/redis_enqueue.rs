//! What an enqueue costs the client: `JobQueue::enqueue` against the same
//! `XADD` sent on a plain multiplexed connection and on a
//! `ConnectionManager` (the self-reconnecting connection the queue uses),
//! alternating, 64 producer tasks on a 2-worker runtime.
//!
//! ```sh
//! LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:6391/ \
//!   cargo bench --features redis --bench redis_enqueue
//! ```
//!
//! `PROBE=plain|manager|ours` runs one side, `JOBS` and `ROUNDS` set the
//! size (40 000 and 7). Rates and the client's CPU per job (every thread's
//! `schedstat`) swing with the machine; instructions per enqueue do not:
//! run one side under `valgrind --tool=callgrind` with `JOBS=4000` and
//! `JOBS=8000`, `ROUNDS=1`, and divide the difference by 4 000.

use std::time::Duration;

use llm_resilience::redis::{JobQueue, QueueConfig};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

mod redis_common;

use redis_common::{client_cpu_us, enqueue, median, spread, xadd, PRODUCERS};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let Ok(url) = std::env::var("LLM_RESILIENCE_REDIS_URL") else {
        eprintln!("skipping: set LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:PORT/ to run the enqueue benchmark");
        return;
    };
    let (jobs, rounds) = (env("JOBS", 40_000), env("ROUNDS", 7));
    let only = std::env::var("PROBE").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let plain = client.get_multiplexed_async_connection().await.unwrap();
        // The queue's own settings: a response timeout bounds every command.
        let manager = ConnectionManager::new_with_config(
            client.clone(),
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .unwrap();
        let name = format!("bench-enqueue-{:x}", rand::random::<u64>());
        let queue = JobQueue::connect(&url, QueueConfig::builder(name.clone()).build().unwrap())
            .await
            .unwrap();
        let ours_stream = format!("llmq:{{{name}}}:jobs:normal");
        let sides = ["plain", "manager", "ours"];
        let mut rates = vec![Vec::new(); sides.len()];
        let mut cpu = vec![Vec::new(); sides.len()];
        for round in 0..rounds {
            for i in 0..sides.len() {
                // Every other round in reverse, so no side always follows
                // the same one.
                let i = if round % 2 == 1 {
                    sides.len() - 1 - i
                } else {
                    i
                };
                if only.as_deref().is_some_and(|o| o != sides[i]) {
                    continue;
                }
                let stream = format!("bench-enqueue-{:x}", rand::random::<u64>());
                let before = client_cpu_us();
                let rate = match sides[i] {
                    "plain" => xadd(plain.clone(), &stream, jobs).await,
                    "manager" => xadd(manager.clone(), &stream, jobs).await,
                    _ => enqueue(&queue, jobs).await,
                };
                rates[i].push(rate);
                cpu[i].push((client_cpu_us() - before) as f64 / jobs as f64);
                let _: () = redis::cmd("DEL")
                    .arg(&stream)
                    .arg(&ours_stream)
                    .query_async(&mut plain.clone())
                    .await
                    .unwrap();
            }
        }
        let _: () = redis::cmd("DEL")
            .arg(format!("llmq:{{{name}}}:jobs:high"))
            .arg(format!("llmq:{{{name}}}:jobs:low"))
            .query_async(&mut plain.clone())
            .await
            .unwrap();
        println!(
            "{jobs} enqueues per round, {rounds} rounds (medians), {PRODUCERS} producer tasks"
        );
        println!("{:<8} {:>10} {:>14}", "side", "enqueue/s", "client µs/job");
        for (i, side) in sides.iter().enumerate() {
            if rates[i].is_empty() {
                continue;
            }
            let (r, c) = (median(&mut rates[i].clone()), median(&mut cpu[i]));
            println!("{side:<8} {r:>10.0} {c:>14.2}");
        }
        // Rates swing between rounds for every side alike; a side over
        // plain in the same round pairs runs made a moment apart.
        if rates[0].len() == rates[2].len() && !rates[0].is_empty() {
            let mut ratio: Vec<f64> = rates[2].iter().zip(&rates[0]).map(|(o, p)| o / p).collect();
            println!(
                "ours / plain in the same round: median {}",
                spread(&mut ratio)
            );
        }
    });
}
