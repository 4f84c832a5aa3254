//! Throughput of the Redis job queue against the floor: a plain
//! `XADD` / `XREADGROUP` / `XACK` loop on the same server, in the same run,
//! round robin.
//!
//! ```sh
//! LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:6391/ \
//!   cargo bench --features redis --bench redis -- [JOBS] [ROUNDS]
//! ```
//!
//! (`BENCH_SIDE=floor,ours` runs only the sides named; `BENCH_VERBOSE=1`
//! prints every round.) Every other round runs the sides in reverse order.
//! The table gives each side's medians; the verdict is the last block: a
//! side's throughput over the floor's in the same round and worker count,
//! whose median over the rounds is robust to the machine's swings between
//! rounds (the table's medians come from different rounds). What each side
//! does per job:
//! - floor: enqueue = one `XADD`; worker = `XREADGROUP COUNT 16` per batch,
//!   one `XACK` per job, nothing written back.
//! - floor+output: as the floor, but the ack is a `MULTI` of `XADD` to an
//!   output stream and `XACK`, per job.
//! - floor+out-batch: the least a queue with an output can do: per batch
//!   one pipeline of an output `XADD` per job and one `XACK` (not atomic,
//!   and a reclaimed job could be output twice).
//! - floor+out-lua: the least a queue with "one output per job" can do: per
//!   batch one Lua script that acknowledges each job and writes its output
//!   entry (one field) only if the `XACK` counted; no result kept by id.
//! - ours: enqueue = one `XADD` (a script with an idempotency key, not
//!   measured here); worker = per batch of free slots, pipelined
//!   `XREADGROUP`s by weighted round robin over three class streams (the
//!   take script instead every `idle_wait`, when a delayed job is due and
//!   when idle), JSON decode of the job, a tower service call, JSON encode
//!   of the answer; per batch of finished jobs one finish script, on a
//!   connection of its own: one `XACK` per stream for the batch (per job
//!   checks only if it counted fewer), per job an output `XADD` (fields
//!   `job`, `deliveries`, `status`, `result`), one `HSET` of the outcomes
//!   into the results hash (for awaiting a job by id), its TTL and one
//!   `XTRIM` of the output.
//!
//! Round trips per job are counted by the server (`INFO commandstats`,
//! top-level commands; scripts' inner commands are not round trips, but the
//! server counts them too, so for ours only `XREADGROUP` among the stream
//! commands is summed: the take script's own, rare, are counted, and the up
//! to three `XREADGROUP`s of one pipeline count as up to three). The CPU
//! columns are the server's (`INFO cpu`) and this process's (every
//! thread's `schedstat`) per job over the run, enqueue included; they move
//! much less with the machine's load than the rates do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_resilience::redis::{JobQueue, QueueConfig, Worker, WorkerConfig, WorkerEvent};
use redis::aio::MultiplexedConnection;
use redis::Value;

mod redis_common;

use redis_common::{client_cpu_us, enqueue, median, spread, xadd, Job, PRODUCERS};

const IN_FLIGHT: usize = 16;

async fn conn(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Top-level command counts from `INFO commandstats`, and the server's CPU
/// time so far (µs, as `cpu`).
async fn command_counts(c: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(c).await.unwrap();
    let mut m = HashMap::new();
    let secs: f64 = cpu
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .map(|l| l.split_once(':').unwrap().1.trim().parse::<f64>().unwrap())
        .sum();
    m.insert("cpu".to_owned(), (secs * 1e6) as u64);
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let (name, stats) = rest.split_once(':').unwrap();
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .unwrap();
        m.insert(name.to_owned(), calls.parse().unwrap());
    }
    m
}

fn delta(a: &HashMap<String, u64>, b: &HashMap<String, u64>, names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| b.get(*n).unwrap_or(&0) - a.get(*n).unwrap_or(&0))
        .sum()
}

/// Plain floor: enqueue `XADD`, `XREADGROUP`, `XACK`. With output, one
/// pipelined `MULTI`/`XADD`/`XACK`/`EXEC` is one round trip, and the
/// output `XADD`s are counted instead of the `EXEC`s.
const FLOOR_CMDS: &[&str] = &["xadd", "xreadgroup", "xack"];
const FLOOR_OUTPUT_CMDS: &[&str] = &["xadd", "xreadgroup"];
const OUR_CMDS: &[&str] = &[
    "xreadgroup",
    "evalsha",
    "eval",
    "script|load",
    "xread",
    "get",
    "xgroup|create",
];

/// Measured: (enqueue jobs/s, end-to-end jobs/s, round trips per job,
/// Redis CPU µs per job, this process's CPU µs per job, both over the
/// whole run: enqueue and end to end).
type Figures = (f64, f64, f64, f64, f64);

/// How the floor writes back per batch of jobs read.
#[derive(Clone, Copy, PartialEq)]
enum Back {
    /// One `XACK` per job, nothing written (the issue's floor).
    Ack,
    /// Per job one `MULTI` of an output `XADD` and its `XACK`.
    OutputPerJob,
    /// The least a queue with an output can do: per batch one pipeline of
    /// an output `XADD` per job and one `XACK` of the batch (not atomic).
    OutputBatch,
    /// As `OutputBatch`, but atomic and without a duplicate output: per
    /// batch one Lua script that acknowledges each job (`XACK`) and writes
    /// its output entry only if the ack counted (the least a queue with
    /// "one output per job" can do; no result stored by id).
    OutputLua,
}

/// The `OutputLua` floor's script: `KEYS` = stream, output; `ARGV` =
/// group, entry ids.
const FLOOR_LUA: &str = r"
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'r', '1')
  end
end
return 0
";

async fn floor(url: &str, jobs: u64, workers: usize, back: Back) -> Figures {
    let mut admin = conn(url).await;
    let stream = format!("bench-floor-{:x}", rand::random::<u64>());
    let out = format!("{stream}-out");
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();
    let before = command_counts(&mut admin).await;
    let client_before = client_cpu_us();
    let enqueue = xadd(conn(url).await, &stream, jobs).await;
    let done = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (mut c, stream, out, done) =
            (conn(url).await, stream.clone(), out.clone(), done.clone());
        tasks.spawn(async move {
            let script = redis::Script::new(FLOOR_LUA);
            while done.load(Ordering::Relaxed) < jobs {
                let r: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{w}"))
                    .arg("COUNT")
                    .arg(IN_FLIGHT)
                    .arg("BLOCK")
                    .arg(50)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let Value::Array(streams) = r else { continue };
                let Some(Value::Array(s)) = streams.first() else {
                    continue;
                };
                let Some(Value::Array(entries)) = s.get(1) else {
                    continue;
                };
                if back == Back::OutputLua {
                    let mut inv = script.prepare_invoke();
                    inv.key(&stream).key(&out).arg("g");
                    for e in entries {
                        inv.arg(entry_id(e));
                    }
                    let _: i64 = inv.invoke_async(&mut c).await.unwrap();
                    done.fetch_add(entries.len() as u64, Ordering::Relaxed);
                    continue;
                }
                if back == Back::OutputBatch {
                    let mut pipe = redis::pipe();
                    let mut ack = redis::cmd("XACK");
                    ack.arg(&stream).arg("g");
                    for e in entries {
                        pipe.cmd("XADD")
                            .arg(&out)
                            .arg("*")
                            .arg("r")
                            .arg("1")
                            .ignore();
                        ack.arg(entry_id(e));
                    }
                    pipe.add_command(ack).ignore();
                    let () = pipe.query_async(&mut c).await.unwrap();
                    done.fetch_add(entries.len() as u64, Ordering::Relaxed);
                    continue;
                }
                let acks = entries.iter().map(|e| {
                    let (mut c, stream, out, id) =
                        (c.clone(), stream.clone(), out.clone(), entry_id(e).to_vec());
                    async move {
                        if back == Back::OutputPerJob {
                            let _: Value = redis::pipe()
                                .atomic()
                                .cmd("XADD")
                                .arg(&out)
                                .arg("*")
                                .arg("r")
                                .arg("1")
                                .cmd("XACK")
                                .arg(&stream)
                                .arg("g")
                                .arg(id)
                                .query_async(&mut c)
                                .await
                                .unwrap();
                        } else {
                            let _: i64 = redis::cmd("XACK")
                                .arg(&stream)
                                .arg("g")
                                .arg(id)
                                .query_async(&mut c)
                                .await
                                .unwrap();
                        }
                    }
                });
                let n = futures::future::join_all(acks).await.len() as u64;
                done.fetch_add(n, Ordering::Relaxed);
            }
        });
    }
    tasks.join_all().await;
    let e2e = jobs as f64 / t.elapsed().as_secs_f64();
    let client = (client_cpu_us() - client_before) as f64 / jobs as f64;
    let after = command_counts(&mut admin).await;
    let rt = match back {
        Back::Ack => delta(&before, &after, FLOOR_CMDS),
        Back::OutputPerJob => delta(&before, &after, FLOOR_OUTPUT_CMDS),
        // Per batch one pipeline (counted by its XACK) after the read; the
        // enqueues are one XADD each.
        Back::OutputBatch => jobs + delta(&before, &after, &["xreadgroup", "xack"]),
        Back::OutputLua => jobs + delta(&before, &after, &["xreadgroup", "evalsha", "eval"]),
    } as f64
        / jobs as f64;
    let cpu = delta(&before, &after, &["cpu"]) as f64 / jobs as f64;
    let _: Value = redis::cmd("DEL")
        .arg(&stream)
        .arg(&out)
        .query_async(&mut admin)
        .await
        .unwrap();
    (enqueue, e2e, rt, cpu, client)
}

async fn ours(url: &str, jobs: u64, workers: usize) -> Figures {
    let mut admin = conn(url).await;
    let name = format!("bench-{:x}", rand::random::<u64>());
    let config = QueueConfig::builder(name.clone())
        .result_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let queue = JobQueue::connect(url, config).await.unwrap();
    let before = command_counts(&mut admin).await;
    let client_before = client_cpu_us();
    let enqueue = enqueue(&queue, jobs).await;
    let done = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let d = done.clone();
        let svc =
            tower::service_fn(|j: Job| std::future::ready(Ok::<_, std::convert::Infallible>(j.n)));
        let config = WorkerConfig::builder()
            .max_in_flight(IN_FLIGHT)
            .idle_wait(Duration::from_millis(50))
            .build()
            .unwrap();
        let w = Worker::new(&queue, svc, config)
            .on_event(move |e| {
                if let WorkerEvent::Completed { .. } = e {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            })
            .spawn()
            .await
            .unwrap();
        handles.push(w);
    }
    while done.load(Ordering::Relaxed) < jobs {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let e2e = jobs as f64 / t.elapsed().as_secs_f64();
    let client = (client_cpu_us() - client_before) as f64 / jobs as f64;
    for w in handles {
        w.shutdown().await;
    }
    let after = command_counts(&mut admin).await;
    // Every enqueue here is one top-level XADD (no idempotency key); XADDs
    // inside scripts are counted by the server too, so they are not summed.
    let rt = (jobs + delta(&before, &after, OUR_CMDS)) as f64 / jobs as f64;
    let cpu = delta(&before, &after, &["cpu"]) as f64 / jobs as f64;
    let mut del = redis::cmd("DEL");
    for k in [
        "jobs:high",
        "jobs:normal",
        "jobs:low",
        "output",
        "dead",
        "seq",
        "delayed",
    ] {
        del.arg(format!("llmq:{{{name}}}:{k}"));
    }
    let _: Value = del.query_async(&mut admin).await.unwrap();
    // The results hashes too, so that every run starts from the same
    // keyspace (left to their TTL, what the rounds wrote piles up).
    let pattern = format!("llmq:{{{name}}}:results:*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut admin)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: Value = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    (enqueue, e2e, rt, cpu, client)
}

fn main() {
    let Ok(url) = std::env::var("LLM_RESILIENCE_REDIS_URL") else {
        eprintln!("skipping: set LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:PORT/ to run the Redis benchmark");
        return;
    };
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(20_000);
    let rounds = args.get(1).copied().unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sides = [
        "floor",
        "floor+output",
        "floor+out-batch",
        "floor+out-lua",
        "ours",
    ];
    let mut results: HashMap<(usize, &str), Vec<Figures>> = HashMap::new();
    for round in 0..rounds {
        for workers in [1, 4] {
            // Every other round runs the sides in reverse, so that no side
            // always follows the same one (what a side leaves behind, an
            // AOF rewrite or freed memory, lands on the next).
            let mut order = sides;
            if round % 2 == 1 {
                order.reverse();
            }
            for side in order {
                if std::env::var("BENCH_SIDE").is_ok_and(|only| !only.split(',').any(|s| s == side))
                {
                    results
                        .entry((workers, side))
                        .or_default()
                        .push((1.0, 1.0, 0.0, 0.0, 0.0));
                    continue;
                }
                let f = rt.block_on(async {
                    match side {
                        "floor" => floor(&url, jobs, workers, Back::Ack).await,
                        "floor+output" => floor(&url, jobs, workers, Back::OutputPerJob).await,
                        "floor+out-batch" => floor(&url, jobs, workers, Back::OutputBatch).await,
                        "floor+out-lua" => floor(&url, jobs, workers, Back::OutputLua).await,
                        _ => ours(&url, jobs, workers).await,
                    }
                });
                if std::env::var("BENCH_VERBOSE").is_ok() {
                    eprintln!(
                        "round {round}, {workers} worker(s), {side}: enqueue {:.0}/s, end to end {:.0}/s",
                        f.0, f.1
                    );
                }
                results.entry((workers, side)).or_default().push(f);
            }
        }
    }
    println!("{jobs} jobs, {rounds} rounds (medians), {PRODUCERS} producer tasks, {IN_FLIGHT} jobs in flight per worker");
    println!(
        "{:<8} {:<16} {:>10} {:>12} {:>7} {:>9} {:>10}",
        "workers", "side", "enqueue/s", "end-to-end/s", "trips", "redis µs", "client µs"
    );
    for workers in [1, 4] {
        let mut floor_cpu = 0.0;
        for side in sides {
            let r = &results[&(workers, side)];
            let med = |f: fn(&Figures) -> f64| median(&mut r.iter().map(f).collect::<Vec<_>>());
            let (enq, e2e, rts) = (med(|f| f.0), med(|f| f.1), med(|f| f.2));
            let (cpu, client) = (med(|f| f.3), med(|f| f.4));
            if side == "floor" {
                floor_cpu = cpu + client;
            }
            let vs = if side == "floor" {
                String::new()
            } else {
                // The rates are compared round by round below.
                format!(
                    "  CPU per job vs floor {:+.0} %",
                    ((cpu + client) / floor_cpu - 1.0) * 100.0
                )
            };
            println!(
                "{workers:<8} {side:<16} {enq:>10.0} {e2e:>12.0} {rts:>7.2} {cpu:>9.1} {client:>10.1}{vs}"
            );
        }
    }
    // The rates swing between runs with the machine, and the medians above
    // come from different rounds; a side's rate over the floor's in the
    // same round and worker count pairs runs made seconds apart.
    if std::env::var("BENCH_SIDE").is_ok_and(|only| !only.split(',').any(|s| s == "floor")) {
        return;
    }
    println!("throughput / the floor's in the same round: median (least to most) of the rounds");
    println!("(0.83 or more: at most 20 % more time per job than the floor; enqueue does not depend on the workers, so both counts' rounds are pooled)");
    for side in &sides[1..] {
        let (mut enq, mut e2e) = (Vec::new(), [Vec::new(), Vec::new()]);
        for (w, workers) in [1, 4].into_iter().enumerate() {
            let (f, s) = (&results[&(workers, "floor")], &results[&(workers, *side)]);
            for (f, s) in f.iter().zip(s) {
                enq.push(s.0 / f.0);
                e2e[w].push(s.1 / f.1);
            }
        }
        println!(
            "  {side:<16} enqueue {}, end to end 1 worker {}, 4 workers {}",
            spread(&mut enq),
            spread(&mut e2e[0]),
            spread(&mut e2e[1])
        );
    }
}

/// The id of a stream entry as `XREADGROUP` returns it.
fn entry_id(entry: &Value) -> &[u8] {
    let Value::Array(e) = entry else {
        panic!("entry")
    };
    let Value::BulkString(id) = &e[0] else {
        panic!("id")
    };
    id
}
