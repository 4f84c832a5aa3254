//! Cost of the fleet rate limiter (`llm_resilience::redis::ratelimit`) per
//! call against the floor: one `EVALSHA` round trip of a script that only
//! reads `TIME`, on the same server, in the same run, round robin.
//!
//! ```sh
//! LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:6390/ \
//!   cargo bench --features redis --bench redis_ratelimit -- [CALLS] [ROUNDS]
//! ```
//!
//! What each side does per call:
//! - floor: one `EVALSHA` (a script returning `TIME`), nothing else.
//! - ours: `ready().await` then `call().await` on the layer around a
//!   service that answers at once: one admission script (GCRA and sliding
//!   log of the request dimension, expiry of old slots, `PEXPIRE` of the
//!   keys); with usage reported (`settled`), a second script settling it.
//!   The limit is far above the offered load: nothing waits.
//!
//! Each side runs sequentially on one task (`serial`: latency bound, one
//! round trip at a time), with a clone of the service per request, and
//! contended: 64 tasks on a 2-worker runtime (`x64`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_resilience::ratelimit::ReportsUsage;
use llm_resilience::redis::ratelimit::FleetRateLimitLayer;
use redis::aio::ConnectionManager;
use redis::Script;
use tower::{service_fn, Layer, Service, ServiceExt};

const TASKS: usize = 64;

#[derive(Clone, Copy)]
struct Reply;

impl ReportsUsage for Reply {
    fn tokens_used(&self) -> Option<u64> {
        Some(10)
    }
}

async fn floor(conn: &ConnectionManager, calls: usize, tasks: usize) -> Duration {
    let script = Arc::new(Script::new("return redis.call('TIME')"));
    let start = Instant::now();
    let per = calls / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (mut conn, script) = (conn.clone(), script.clone());
            tokio::spawn(async move {
                for _ in 0..per {
                    let _: Vec<String> = script.invoke_async(&mut conn).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed() / (per * tasks) as u32
}

async fn ours(url: &str, settled: bool, calls: usize, tasks: usize) -> Duration {
    let key = format!("bench-{:016x}", rand::random::<u64>());
    let builder = FleetRateLimitLayer::builder(url, key)
        .requests(1_000_000_000)
        .burst(1.0)
        .estimate_tokens(|_: &u32| 20);
    let inner = service_fn(|_: u32| async { Ok::<_, std::io::Error>(Reply) });
    let per = calls / tasks;
    let start;
    if settled {
        let svc = builder.tokens(1_000_000_000).build().unwrap().layer(inner);
        start = Instant::now();
        run(svc, per, tasks).await;
    } else {
        let svc = builder
            .no_token_limit()
            .ignore_usage()
            .build()
            .unwrap()
            .layer(inner);
        start = Instant::now();
        run(svc, per, tasks).await;
    }
    start.elapsed() / (per * tasks) as u32
}

async fn run<S>(svc: S, per: usize, tasks: usize)
where
    S: Service<u32> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for n in 0..per as u32 {
                    if tasks == 1 {
                        svc.ready().await.unwrap().call(n).await.unwrap();
                    } else {
                        svc.clone().oneshot(n).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
}

fn main() {
    let Ok(url) = std::env::var("LLM_RESILIENCE_REDIS_URL") else {
        eprintln!("set LLM_RESILIENCE_REDIS_URL=redis://127.0.0.1:PORT/ to run this bench");
        return;
    };
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let calls = args.first().copied().unwrap_or(4_096);
    let rounds = args.get(1).copied().unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        // Warm: connections and script caches.
        floor(&conn, 256, 1).await;
        ours(&url, false, 256, 1).await;
        ours(&url, true, 256, 1).await;
        for tasks in [1, TASKS] {
            let (mut f, mut o, mut s) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                f.push(floor(&conn, calls, tasks).await);
                o.push(ours(&url, false, calls, tasks).await);
                s.push(ours(&url, true, calls, tasks).await);
            }
            let median = |v: &mut Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let (f, o, s) = (median(&mut f), median(&mut o), median(&mut s));
            let name = if tasks == 1 { "serial" } else { "x64" };
            let ratio = |d: Duration| d.as_secs_f64() / f.as_secs_f64();
            println!(
                "{name:>6}: floor {f:>9.1?}/call | ours {o:>9.1?}/call ({:.2}x) | settled {s:>9.1?}/call ({:.2}x)  [{calls} calls, median of {rounds}]",
                ratio(o),
                ratio(s)
            );
        }
    });
}
