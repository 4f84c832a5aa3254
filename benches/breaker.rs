//! Circuit breaker cost, in one criterion run against tower-resilience's
//! circuit breaker layer and failsafe's state machine.
//!
//! `cargo bench -p llm-resilience-bench --bench breaker -- --warm-up-time 1 --measurement-time 3`
//!
//! - `breaker_closed/*`: one task, all successes, per call `ready()` +
//!   `call()` on a service whose inner answers at once (a bare inner service
//!   is the baseline).
//! - `breaker_contended/*`: 64 tasks on a 2-worker multi-thread runtime
//!   sharing one breaker; the time is per call (lower is better, throughput
//!   is its inverse).
//!
//! Before the groups run, the bench counts heap allocations per call of each
//! variant with a counting global allocator and prints them.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use llm_resilience::breaker::CircuitBreakerLayer;
use tower::{Layer, Service, ServiceExt};

#[path = "support/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Inner = tower::util::ServiceFn<fn(u64) -> std::future::Ready<Result<u64, Infallible>>>;

fn inner() -> Inner {
    tower::service_fn(|x: u64| std::future::ready(Ok::<u64, Infallible>(x)))
}

fn ours_count() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .min_calls(100)
        .build()
        .unwrap()
        .layer(inner())
}

fn ours_time() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(30))
        .min_calls(20)
        .build()
        .unwrap()
        .layer(inner())
}

fn ours_slow() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .min_calls(100)
        .slow_calls(Duration::from_secs(30), 0.5)
        .build()
        .unwrap()
        .layer(inner())
}

fn tower_resilience(
) -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    use tower_resilience::circuitbreaker::{CircuitBreakerLayer as TrLayer, SlidingWindowType};
    TrLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_type(SlidingWindowType::CountBased)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .build()
        .unwrap()
        .layer(inner())
}

/// failsafe is not a tower layer: its state machine wraps the inner
/// service's future, after the inner service is readied.
#[derive(Clone)]
struct Failsafe<SM> {
    sm: SM,
    inner: Inner,
}

impl<SM: failsafe::futures::CircuitBreaker> Failsafe<SM> {
    async fn call(&mut self, x: u64) -> u64 {
        let fut = self.inner.ready().await.unwrap().call(x);
        self.sm.call(fut).await.unwrap()
    }
}

fn failsafe() -> Failsafe<impl failsafe::futures::CircuitBreaker + Clone + Send + Sync + 'static> {
    Failsafe {
        sm: failsafe::Config::new().build(),
        inner: inner(),
    }
}

async fn run<S>(svc: &mut S, n: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let r = svc.ready().await.unwrap().call(i).await.unwrap();
        black_box(r);
    }
}

async fn run_failsafe<SM: failsafe::futures::CircuitBreaker>(svc: &mut Failsafe<SM>, n: u64) {
    for i in 0..n {
        black_box(svc.call(i).await);
    }
}

fn current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn allocations_per_call() {
    let rt = current();
    let n = 10_000u64;
    let measure = |name: &str, allocs: u64| {
        println!(
            "allocations per call, {name}: {:.3}",
            allocs as f64 / n as f64
        );
    };
    macro_rules! count {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            rt.block_on(run(&mut svc, 100));
            let before = alloc::allocations();
            rt.block_on(run(&mut svc, n));
            measure($name, alloc::allocations() - before);
        }};
    }
    count!("baseline (no breaker)", inner());
    count!("llm-resilience count window", ours_count());
    count!("llm-resilience time window", ours_time());
    count!("llm-resilience slow-call rule", ours_slow());
    count!("tower-resilience", tower_resilience());
    let mut fs = failsafe();
    rt.block_on(run_failsafe(&mut fs, 100));
    let before = alloc::allocations();
    rt.block_on(run_failsafe(&mut fs, n));
    measure("failsafe", alloc::allocations() - before);
}

/// Time per call (ns) of `n` sequential calls.
async fn per_call<S>(svc: &mut S, n: u64) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    run(svc, n).await;
    start.elapsed().as_nanos() as f64 / n as f64
}

async fn per_call_failsafe<SM: failsafe::futures::CircuitBreaker>(
    svc: &mut Failsafe<SM>,
    n: u64,
) -> f64 {
    let start = Instant::now();
    run_failsafe(svc, n).await;
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The machine is shared (other builds run at the same time), so criterion's
/// sequential groups can see different loads. This interleaves the variants
/// round-robin, many short samples each, and prints the median per call and
/// the ratios: drift in the machine's load hits every variant alike.
fn interleaved() {
    const ROUNDS: usize = 31;
    let rt = current();
    let n = 50_000;
    let mut ours = ours_count();
    let mut time = ours_time();
    let mut slow = ours_slow();
    let mut tr = tower_resilience();
    let mut fs = failsafe();
    let mut base = inner();
    let mut t = [(); 6].map(|_| Vec::new());
    for _ in 0..ROUNDS {
        rt.block_on(async {
            t[0].push(per_call(&mut base, n).await);
            t[1].push(per_call(&mut ours, n).await);
            t[2].push(per_call(&mut time, n).await);
            t[3].push(per_call(&mut slow, n).await);
            t[4].push(per_call(&mut tr, n / 10).await);
            t[5].push(per_call_failsafe(&mut fs, n).await);
        });
    }
    // What one clock read costs here: the time window reads the tokio clock
    // once per call, the slow-call rule twice. With tokio's `test-util`
    // feature (on in this crate's dev-dependencies, so in this bench) a read
    // also locks the runtime's clock to check for a paused clock; without
    // it, tokio's `Instant::now` is `std`'s.
    let clock = |f: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed().as_nanos() as f64 / n as f64
    };
    let tokio_now = rt.block_on(async {
        clock(&|| {
            black_box(tokio::time::Instant::now());
        })
    });
    let std_now = clock(&|| {
        black_box(Instant::now());
    });
    println!("clock read (ns): tokio::time::Instant::now inside the runtime {tokio_now:.1}, std::time::Instant::now {std_now:.1}");
    let m = t.map(|mut v| median(&mut v));
    println!("interleaved closed (median ns/call of {ROUNDS} rounds): baseline {:.1}, count {:.1}, time {:.1}, slow-call {:.1}, tower-resilience {:.1}, failsafe {:.1}", m[0], m[1], m[2], m[3], m[4], m[5]);
    println!(
        "interleaved closed ratios (ours / theirs): count/tower-resilience {:.3}, count/failsafe {:.3}, time/tower-resilience {:.3}, time/failsafe {:.3}, slow/tower-resilience {:.3}, slow/failsafe {:.3}",
        m[1] / m[4], m[1] / m[5], m[2] / m[4], m[2] / m[5], m[3] / m[4], m[3] / m[5]
    );

    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let per_task = 2_000u64;
    fn contended_once<S>(mt: &tokio::runtime::Runtime, svc: &S, per_task: u64) -> f64
    where
        S: Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
            + Clone
            + Send
            + 'static,
    {
        mt.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut svc = svc.clone();
                    tokio::spawn(async move { run(&mut svc, per_task).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            start.elapsed().as_nanos() as f64 / (per_task * TASKS) as f64
        })
    }
    let (ours, time, tr) = (ours_count(), ours_time(), tower_resilience());
    let fs = failsafe();
    let mut c = [(); 4].map(|_| Vec::new());
    for _ in 0..ROUNDS {
        c[0].push(contended_once(&mt, &ours, per_task));
        c[1].push(contended_once(&mt, &time, per_task));
        c[2].push(contended_once(&mt, &tr, per_task / 10));
        c[3].push(mt.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut fs = fs.clone();
                    tokio::spawn(async move { run_failsafe(&mut fs, per_task).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            start.elapsed().as_nanos() as f64 / (per_task * TASKS) as f64
        }));
    }
    let m = c.map(|mut v| median(&mut v));
    println!("interleaved contended (median ns/call, 64 tasks, 2 workers): count {:.1}, time {:.1}, tower-resilience {:.1}, failsafe {:.1}", m[0], m[1], m[2], m[3]);
    println!(
        "interleaved contended throughput (ours / theirs): count vs tower-resilience {:.1}x, count vs failsafe {:.1}x, time vs tower-resilience {:.1}x, time vs failsafe {:.1}x",
        m[2] / m[0], m[3] / m[0], m[2] / m[1], m[3] / m[1]
    );
}

fn closed(c: &mut Criterion) {
    allocations_per_call();
    interleaved();
    let rt = current();
    let mut g = c.benchmark_group("breaker_closed");
    macro_rules! bench {
        ($name:expr, $make:expr) => {{
            let mut svc = $make;
            g.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        run(&mut svc, iters).await;
                        start.elapsed()
                    })
                })
            });
        }};
    }
    bench!("baseline", inner());
    bench!("llm_resilience_count", ours_count());
    bench!("llm_resilience_time", ours_time());
    bench!("llm_resilience_slow_call", ours_slow());
    bench!("tower_resilience", tower_resilience());
    let mut fs = failsafe();
    g.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                run_failsafe(&mut fs, iters).await;
                start.elapsed()
            })
        })
    });
    g.finish();
}

const TASKS: u64 = 64;

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("breaker_contended");
    macro_rules! bench {
        ($name:expr, $make:expr) => {{
            let svc = $make;
            g.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    let per_task = iters.div_ceil(TASKS).max(1);
                    rt.block_on(async {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|_| {
                                let mut svc = svc.clone();
                                tokio::spawn(async move { run(&mut svc, per_task).await })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                        // Report per call, scaled to the calls criterion asked for.
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_task * TASKS) as f64)
                    })
                })
            });
        }};
    }
    bench!("baseline", inner());
    bench!("llm_resilience_count", ours_count());
    bench!("llm_resilience_time", ours_time());
    bench!("tower_resilience", tower_resilience());
    let fs = failsafe();
    g.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(TASKS).max(1);
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let mut fs = fs.clone();
                        tokio::spawn(async move { run_failsafe(&mut fs, per_task).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * TASKS) as f64)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, closed, contended);
criterion_main!(benches);
