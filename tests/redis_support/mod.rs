//! Shared by the Redis test files: where the server is, and fresh queues.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use llm_resilience::redis::{JobQueue, QueueConfig};

/// The env var naming the Redis server the tests use.
pub const URL_VAR: &str = "LLM_RESILIENCE_REDIS_URL";

/// The test server's URL. Without it: a failure under `CI=true` (a missing
/// Redis must never pass silently there), a printed skip otherwise.
pub fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but {URL_VAR} is not set: the Redis tests must run in CI")
        }
        _ => {
            eprintln!(
                "skipping: set {URL_VAR}=redis://127.0.0.1:PORT/ (a redis-server 7+) to run the Redis tests"
            );
            None
        }
    }
}

/// A queue name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Connects a fresh queue with short timeouts.
pub async fn fresh_queue(url: &str, prefix: &str) -> JobQueue {
    let config = QueueConfig::builder(unique(prefix))
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    JobQueue::connect(url, config).await.unwrap()
}

/// Every entry of a stream as (field -> value) maps, via XRANGE in pages.
pub async fn read_stream(url: &str, key: &str) -> Vec<std::collections::HashMap<String, String>> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        let n = page.len();
        out.extend(page.into_iter().map(|(_, f)| f.into_iter().collect()));
        if n < 1000 {
            break;
        }
    }
    out
}

/// A raw connection for poking at keys.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// How long a test waits for what it expects before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `done` holds, checking every 10 ms; fails with `what()` after
/// [`WAIT`] instead of hanging the test run.
pub async fn until(what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Worker settings short enough for tests: retries, reclaims and
/// shutdowns within a few seconds.
pub fn fast() -> llm_resilience::redis::WorkerConfigBuilder {
    llm_resilience::redis::WorkerConfig::builder()
        .idle_wait(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(10))
        .max_retry_delay(Duration::from_millis(50))
        .visibility_timeout(Duration::from_secs(2))
        .job_timeout(Duration::from_secs(1))
        .shutdown_grace(Duration::from_secs(2))
}
