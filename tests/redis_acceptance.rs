//! Acceptance of the Redis job queue against a real `redis-server`:
//! workers killed at random while 10,000 jobs go through, and the server
//! itself killed and restarted. Real time; nothing asserts on durations.

mod redis_support;

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use llm_resilience::redis::{
    Enqueue, JobId, JobOutcome, JobQueue, QueueConfig, Worker, WorkerConfig, WorkerEvent,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis_support::{fast, fresh_queue, raw, read_stream, unique, until, url, WAIT};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u32,
}

#[derive(Debug)]
struct Flaky;
impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("flaky upstream")
    }
}
impl std::error::Error for Flaky {}

fn worker_config() -> WorkerConfig {
    WorkerConfig::builder()
        .max_in_flight(16)
        .idle_wait(Duration::from_millis(100))
        .visibility_timeout(Duration::from_millis(1500))
        .job_timeout(Duration::from_millis(1000))
        .retry_delay(Duration::from_millis(20))
        .max_retry_delay(Duration::from_millis(100))
        .max_deliveries(50)
        .build()
        .unwrap()
}

/// Processing calls per job number, shared by every worker of a test.
type Calls = Arc<Mutex<HashMap<u32, u32>>>;

/// What the test does to a worker thread.
enum Command {
    /// Drop the runtime with everything in flight, as a crash would.
    Kill,
    /// Block the runtime's thread until the sender of this channel is
    /// dropped, as a stalled process would: its jobs get reclaimed, and
    /// when it wakes it tries to finish them too.
    Freeze(std::sync::mpsc::Receiver<()>),
}

/// A worker on a thread with a runtime of its own.
struct WorkerThread {
    control: tokio::sync::mpsc::UnboundedSender<Command>,
    thread: JoinHandle<()>,
}

impl WorkerThread {
    fn kill(self) {
        let _ = self.control.send(Command::Kill);
        self.thread.join().unwrap();
    }
}

fn start_worker(url: String, name: String, calls: Calls, dups: Arc<AtomicU32>) -> WorkerThread {
    let (control, mut commands) = tokio::sync::mpsc::unbounded_channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config = QueueConfig::builder(name).build().unwrap();
            let Ok(queue) = JobQueue::connect(&url, config).await else {
                return;
            };
            let svc = tower::service_fn(move |j: Job| {
                let first = {
                    let mut c = calls.lock().unwrap();
                    let k = c.entry(j.n).or_insert(0);
                    *k += 1;
                    *k == 1
                };
                async move {
                    tokio::time::sleep(Duration::from_micros(u64::from(j.n % 7) * 200)).await;
                    // Every 50th job fails on its first call (a transient
                    // failure after the pipeline's retries).
                    if j.n.is_multiple_of(50) && first {
                        return Err(Flaky);
                    }
                    Ok(j.n)
                }
            });
            let _worker = Worker::new(&queue, svc, worker_config())
                .on_event(move |e| {
                    if let WorkerEvent::Duplicate { .. } = e {
                        dups.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .spawn()
                .await
                .unwrap();
            while let Some(Command::Freeze(until)) = commands.recv().await {
                let _ = until.recv();
            }
        });
        // The runtime is dropped here with the worker and its jobs mid-way.
        drop(rt);
    });
    WorkerThread { control, thread }
}

#[test]
fn ten_thousand_jobs_through_four_workers_killed_at_random_end_exactly_once() {
    let Some(url) = url() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = unique("acceptance");
    let queue = rt.block_on(async {
        JobQueue::connect(&url, QueueConfig::builder(name.clone()).build().unwrap())
            .await
            .unwrap()
    });
    const JOBS: u32 = 10_000;
    const POISON: u32 = 10;
    // Enqueue: 9,990 jobs and 10 that do not deserialize, 32 at a time.
    let ids: Vec<(u32, JobId)> = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in 0..32u32 {
            let q = queue.clone();
            tasks.spawn(async move {
                let mut ids = Vec::new();
                for n in (chunk..JOBS).step_by(32) {
                    let id = if n % (JOBS / POISON) == 1 {
                        q.enqueue(&format!("poison {n}")).await.unwrap()
                    } else {
                        q.enqueue(&Job { n }).await.unwrap()
                    };
                    ids.push((n, id));
                }
                ids
            });
        }
        tasks.join_all().await.into_iter().flatten().collect()
    });
    assert_eq!(ids.len(), JOBS as usize);
    let calls: Calls = Arc::default();
    let dups = Arc::new(AtomicU32::new(0));
    let start = || start_worker(url.clone(), name.clone(), calls.clone(), dups.clone());
    let mut workers: Vec<_> = (0..4).map(|_| start()).collect();
    let mut rng = StdRng::seed_from_u64(16);
    let (mut kills, mut freezes) = (0, 0);
    let mut frozen: Vec<Option<(std::time::Instant, std::sync::mpsc::Sender<()>)>> =
        (0..4).map(|_| None).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = rt.block_on(queue.stats()).unwrap();
        if s.output + s.dead_letters >= u64::from(JOBS) && s.total_depth() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs left unfinished: {s:?}"
        );
        let pause = Duration::from_millis(rng.random_range(20..120));
        rt.block_on(async { tokio::time::sleep(pause).await });
        for f in &mut frozen {
            if f.as_ref()
                .is_some_and(|(until, _)| std::time::Instant::now() >= *until)
            {
                *f = None; // drops the sender: the worker wakes
            }
        }
        // Kill a random worker and start a new one in its place, or stall
        // one for longer than the visibility timeout, until most jobs are
        // done (then let the reclaims finish).
        if s.output + s.dead_letters < u64::from(JOBS) * 9 / 10 {
            let i = rng.random_range(0..workers.len());
            if frozen[i].is_some() {
                // Left alone until it wakes and races the reclaimer.
            } else if rng.random_ratio(1, 5) {
                let (wake, until) = std::sync::mpsc::channel::<()>();
                let _ = workers[i].control.send(Command::Freeze(until));
                let stall = Duration::from_millis(rng.random_range(1600..2500));
                frozen[i] = Some((std::time::Instant::now() + stall, wake));
                freezes += 1;
            } else {
                std::mem::replace(&mut workers[i], start()).kill();
                kills += 1;
            }
        }
    }
    drop(frozen);
    // Acknowledged entries are trimmed away by the workers (in whole
    // stream nodes of up to 100 entries), not kept for ever.
    let stream = format!("llmq:{{{name}}}:jobs:normal");
    let trimmed = rt.block_on(async {
        let mut c = redis_support::raw(&url).await;
        for _ in 0..200 {
            let len: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut c)
                .await
                .unwrap();
            if len <= 100 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(trimmed, "the job stream was not trimmed");
    for w in workers {
        w.kill();
    }
    let output = rt.block_on(read_stream(&url, &format!("llmq:{{{name}}}:output")));
    let dead = rt.block_on(read_stream(&url, &format!("llmq:{{{name}}}:dead")));
    let mut seen = HashSet::new();
    for e in output.iter().chain(&dead) {
        assert!(
            seen.insert(e["job"].clone()),
            "job {} recorded twice",
            e["job"]
        );
    }
    let dead_ids: HashSet<_> = dead.iter().map(|e| e["job"].clone()).collect();
    for (n, id) in &ids {
        let poison = n % (JOBS / POISON) == 1;
        assert!(seen.contains(id.as_str()), "job {id} (n {n}) lost");
        assert_eq!(dead_ids.contains(id.as_str()), poison, "job {id} (n {n})");
    }
    assert_eq!(
        (output.len(), dead.len()),
        ((JOBS - POISON) as usize, POISON as usize)
    );
    for e in &output {
        assert_eq!(e["status"], "ok");
    }
    let calls = calls.lock().unwrap();
    let repeated = calls.values().filter(|&&c| c > 1).count();
    let dups = dups.load(Ordering::Relaxed);
    eprintln!(
        "{kills} worker kills, {freezes} stalls; {repeated} jobs processed more than once \
         (at-least-once), {dups} second outcomes refused (entry already acknowledged); one output each"
    );
    assert!(
        kills >= 5 && freezes >= 1,
        "only {kills} kills and {freezes} stalls"
    );
    // The stalls really raced two workers to one job's outcome.
    assert!(dups > 0);
}

/// A `redis-server` of the test's own (so it can be killed), with AOF and
/// `appendfsync always`.
struct OwnServer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnServer {
    fn binary() -> Option<String> {
        let bin =
            std::env::var("LLM_RESILIENCE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        match std::process::Command::new(&bin).arg("--version").output() {
            Ok(o) if o.status.success() => Some(bin),
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true but `{bin}` cannot run: the Redis restart test must run in CI")
            }
            _ => {
                eprintln!("skipping: no `{bin}` to start (set LLM_RESILIENCE_REDIS_SERVER)");
                None
            }
        }
    }

    fn start(bin: &str, port: u16, dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--save", "", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL: no shutdown, no final fsync.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_until_up(url: &str) {
    for _ in 0..200 {
        if let Ok(c) = redis::Client::open(url) {
            if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis-server at {url} did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_redis_loses_no_acknowledged_job_and_workers_reconnect() {
    let Some(bin) = OwnServer::binary() else {
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(unique("llm-resilience-redis"));
    let mut server = OwnServer::start(&bin, port, dir.clone());
    let url = server.url();
    wait_until_up(&url).await;
    let config = QueueConfig::builder("restart")
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let queue = JobQueue::connect(&url, config).await.unwrap();
    let svc = tower::service_fn(|j: Job| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, Flaky>(j.n)
    });
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::new(&queue, svc, worker_config())
                .spawn()
                .await
                .unwrap(),
        );
    }
    const JOBS: u32 = 2_000;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (q, acked) = (queue.clone(), acknowledged.clone());
        tokio::spawn(async move {
            for n in 0..JOBS {
                // Retried with the same idempotency key while Redis is
                // down: a lost reply never enqueues the job twice.
                let opts = Enqueue::new().idempotency_key(format!("job-{n}"));
                loop {
                    match q.enqueue_with(&Job { n }, &opts).await {
                        Ok((id, _)) => break acked.lock().unwrap().push((n, id)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_kill = acknowledged.lock().unwrap().len();
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _restarted = OwnServer::start(&bin, port, dir);
    wait_until_up(&url).await;
    producer.await.unwrap();
    let acked = acknowledged.lock().unwrap().clone();
    assert_eq!(acked.len(), JOBS as usize);
    for (n, id) in &acked {
        match queue.wait_for::<u32>(id, Duration::from_secs(30)).await {
            Ok(JobOutcome::Completed(m)) => assert_eq!(m, *n),
            other => panic!(
                "job {id} (n {n}, {} acknowledged before the kill): {other:?}",
                before_kill
            ),
        }
    }
    let output = read_stream(&url, "llmq:{restart}:output").await;
    let mut seen = HashSet::new();
    for e in &output {
        assert!(
            seen.insert(e["job"].clone()),
            "job {} output twice",
            e["job"]
        );
    }
    assert_eq!(seen.len(), JOBS as usize);
    for w in workers {
        w.shutdown().await;
    }
}

/// An entry that names a job which already has an outcome (as a forged or
/// replayed entry would) is run, but its outcome is refused: one output
/// per job id, and the recorded outcome stays the first one.
#[tokio::test]
async fn an_entry_naming_a_finished_job_writes_no_second_output() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "named").await;
    let dups = Arc::new(AtomicU32::new(0));
    let d = dups.clone();
    let svc = tower::service_fn(|j: Job| async move { Ok::<_, Flaky>(j.n) });
    let w = Worker::new(&q, svc, fast().build().unwrap())
        .on_event(move |e| {
            if let WorkerEvent::Duplicate { .. } = e {
                d.fetch_add(1, Ordering::Relaxed);
            }
        })
        .spawn()
        .await
        .unwrap();
    let id = q.enqueue(&Job { n: 1 }).await.unwrap();
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Completed(1)
    );
    let name = q.config().name().to_owned();
    let mut c = raw(&url).await;
    let _: String = redis::cmd("XADD")
        .arg(format!("llmq:{{{name}}}:jobs:normal"))
        .arg("*")
        .arg("job")
        .arg(id.as_str())
        .arg("payload")
        .arg(r#"{"n":2}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    until(
        || "the second entry was not refused".into(),
        || dups.load(Ordering::Relaxed) > 0,
    )
    .await;
    let out = read_stream(&url, &format!("llmq:{{{name}}}:output")).await;
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0]["job"].as_str(), out[0]["result"].as_str()),
        (id.as_str(), "1")
    );
    assert_eq!(
        q.outcome::<u32>(&id).await.unwrap(),
        Some(JobOutcome::Completed(1))
    );
    // Refused, but acknowledged: nothing is left pending.
    assert_eq!(q.stats().await.unwrap().pending, [0; 3]);
    w.shutdown().await;
}

/// A worker that stalls past the visibility timeout finishes its job after
/// another worker reclaimed it and re-queued it (a transient failure): the
/// stale outcome is refused, and the job's only output is that of its
/// later delivery.
#[tokio::test]
async fn a_stale_finisher_of_a_re_queued_entry_writes_nothing() {
    let Some(url) = url() else { return };
    let q = fresh_queue(&url, "stale").await;
    let (calls, release) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let (c, r) = (calls.clone(), release.clone());
    // The stalled worker: its first call waits to be released, then answers
    // 1000 + n (a stale answer); later calls answer n.
    let stalled = tower::service_fn(move |j: Job| {
        let (first, r) = (c.fetch_add(1, Ordering::SeqCst) == 0, r.clone());
        async move {
            if first {
                r.notified().await;
                return Ok::<_, Flaky>(1000 + j.n);
            }
            Ok(j.n)
        }
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let e1 = events.clone();
    let slow = fast()
        .max_in_flight(1)
        .visibility_timeout(Duration::from_secs(10))
        .job_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let w1 = Worker::new(&q, stalled, slow)
        .on_event(move |e| e1.lock().unwrap().push(format!("w1 {}", e.kind())))
        .spawn()
        .await
        .unwrap();
    let id = q.enqueue(&Job { n: 7 }).await.unwrap();
    until(
        || "the job never reached the first worker".into(),
        || calls.load(Ordering::SeqCst) > 0,
    )
    .await;
    // The reclaimer: its first call fails (transient), re-queued for later.
    let f = Arc::new(AtomicU32::new(0));
    let flaky = tower::service_fn(move |j: Job| {
        let first = f.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(Flaky)
            } else {
                Ok(j.n)
            }
        }
    });
    let e2 = events.clone();
    let quick = fast()
        .visibility_timeout(Duration::from_millis(300))
        .job_timeout(Duration::from_millis(200))
        .retry_delay(Duration::from_millis(1500))
        .max_retry_delay(Duration::from_millis(1500))
        .build()
        .unwrap();
    let w2 = Worker::new(&q, flaky, quick)
        .on_event(move |e| e2.lock().unwrap().push(format!("w2 {}", e.kind())))
        .spawn()
        .await
        .unwrap();
    let seen = |what: &str| events.lock().unwrap().iter().any(|e| e == what);
    let log = || format!("{:?}", events.lock().unwrap());
    until(
        || format!("not reclaimed: {}", log()),
        || seen("w2 retried"),
    )
    .await;
    // The stalled worker wakes and finishes the entry it no longer owns.
    release.notify_one();
    until(
        || format!("stale outcome not refused: {}", log()),
        || seen("w1 duplicate"),
    )
    .await;
    assert_eq!(q.outcome::<u32>(&id).await.unwrap(), None);
    assert_eq!(
        q.wait_for::<u32>(&id, WAIT).await.unwrap(),
        JobOutcome::Completed(7)
    );
    let out = read_stream(&url, &format!("llmq:{{{}}}:output", q.config().name())).await;
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0]["job"].as_str(), out[0]["result"].as_str()),
        (id.as_str(), "7")
    );
    w1.shutdown().await;
    w2.shutdown().await;
}
