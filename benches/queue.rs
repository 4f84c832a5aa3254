//! Queue benchmarks against `tower::buffer::Buffer`, in the same run.
//!
//! - `queue_uncontended`: one caller, `ready().await` + `call().await` per
//!   request, on a current-thread runtime: our queue, `Buffer`, tower's
//!   `ConcurrencyLimit` and the bare service for reference.
//! - `queue_contended`: 64 tasks on a 2-worker runtime, 64 requests each per
//!   iteration (4 096 requests), through one queue with concurrency 16 and
//!   capacity 1 000, vs `Buffer` with bound 1 000 (and, for reference,
//!   tower's `ConcurrencyLimit(16)` alone and under a `Buffer`: tokio's fair
//!   semaphore, the other way to bound in-flight calls); the inner service
//!   answers at once, or after one `yield_now`.
//! - Heap allocations per call on the uncontended path, counted by a global
//!   allocator, and the size of the queue's response future, printed before
//!   the criterion runs.
//!
//! Run: `cargo bench --bench queue -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use llm_resilience::queue::QueueLayer;
use llm_resilience::BoxError;
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};

#[path = "support/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// The inner service: answers at once (or after one `yield_now`), no
/// allocation of its own.
#[derive(Clone, Copy)]
struct Echo {
    yields: bool,
}

struct EchoFuture {
    value: u64,
    yielded: bool,
}

impl Future for EchoFuture {
    type Output = Result<u64, BoxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.value))
    }
}

impl Service<u64> for Echo {
    type Response = u64;
    type Error = BoxError;
    type Future = EchoFuture;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, value: u64) -> EchoFuture {
        EchoFuture {
            value,
            yielded: !self.yields,
        }
    }
}

fn queue(
    concurrency: usize,
    capacity: usize,
    yields: bool,
) -> impl Service<u64, Response = u64, Error = llm_resilience::Error, Future = impl Send>
       + Clone
       + Send
       + 'static {
    QueueLayer::builder()
        .concurrency(concurrency)
        .capacity(capacity)
        .build()
        .unwrap()
        .layer(Echo { yields })
}

async fn round_trip<S>(svc: &mut S, i: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap();
    let out = svc.call(i).await.unwrap();
    assert_eq!(out, i);
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `iters` round trips inside one `block_on`, timed as a whole.
fn timed<S>(rt: &tokio::runtime::Runtime, svc: &mut S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            round_trip(svc, i).await;
        }
        start.elapsed()
    })
}

fn uncontended(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("queue_uncontended");
    g.throughput(Throughput::Elements(1));
    let mut bare = Echo { yields: false };
    g.bench_function("bare_service", |b| {
        b.iter_custom(|n| timed(&rt, &mut bare, n))
    });
    let mut q = queue(32, 1_000, false);
    g.bench_function("llm_resilience_queue", |b| {
        b.iter_custom(|n| timed(&rt, &mut q, n))
    });
    let mut limit = ConcurrencyLimit::new(Echo { yields: false }, 32);
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|n| timed(&rt, &mut limit, n))
    });
    let mut buf = rt.block_on(async { Buffer::new(Echo { yields: false }, 1_000) });
    g.bench_function("tower_buffer", |b| {
        b.iter_custom(|n| timed(&rt, &mut buf, n))
    });
    g.finish();
}

const TASKS: u64 = 64;
const PER_TASK: u64 = 64;

async fn contended_batch<S>(svc: S) -> Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(TASKS as usize);
    for t in 0..TASKS {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                round_trip(&mut s, t * PER_TASK + k).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// One contended variant: `contended_batch` on clones of `svc`.
fn bench_contended<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    inner: &str,
    svc: S,
) where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    g.bench_with_input(BenchmarkId::new(name, inner), &svc, |b, svc| {
        b.to_async(rt).iter_custom(|iters| {
            let svc = svc.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += contended_batch(svc.clone()).await;
                }
                total
            }
        });
    });
}

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("queue_contended");
    g.throughput(Throughput::Elements(TASKS * PER_TASK));
    for yields in [false, true] {
        let inner = if yields {
            "inner_yields"
        } else {
            "inner_instant"
        };
        let echo = Echo { yields };
        bench_contended(
            &mut g,
            &rt,
            "llm_resilience_queue",
            inner,
            queue(16, 1_000, yields),
        );
        let limited = rt.block_on(async { Buffer::new(ConcurrencyLimit::new(echo, 16), 1_000) });
        bench_contended(
            &mut g,
            &rt,
            "tower_buffer_over_concurrency_limit",
            inner,
            limited,
        );
        let limit = ConcurrencyLimit::new(echo, 16);
        bench_contended(&mut g, &rt, "tower_concurrency_limit", inner, limit);
        let buf = rt.block_on(async { Buffer::new(echo, 1_000) });
        bench_contended(&mut g, &rt, "tower_buffer", inner, buf);
    }
    g.finish();
}

/// Heap allocations per call on the uncontended path (after warm-up).
fn report_allocations() {
    fn per_call<S>(rt: &tokio::runtime::Runtime, mut svc: S) -> f64
    where
        S: Service<u64, Response = u64>,
        S::Error: std::fmt::Debug,
    {
        const N: u64 = 10_000;
        rt.block_on(async {
            for i in 0..100 {
                round_trip(&mut svc, i).await;
            }
            let before = alloc::allocations();
            for i in 0..N {
                round_trip(&mut svc, i).await;
            }
            (alloc::allocations() - before) as f64 / N as f64
        })
    }
    let rt = current_thread();
    let q = per_call(&rt, queue(32, 1_000, false));
    let limit = per_call(&rt, ConcurrencyLimit::new(Echo { yields: false }, 32));
    let buffer = {
        let b = rt.block_on(async { Buffer::new(Echo { yields: false }, 1_000) });
        per_call(&rt, b)
    };
    let future_size = rt.block_on(async {
        let mut q = queue(32, 1_000, false);
        q.ready().await.unwrap();
        let fut = q.call(0);
        let size = std::mem::size_of_val(&fut);
        drop(fut);
        size
    });
    println!("the queue's response future over Echo: {future_size} bytes");
    println!("heap allocations per call (uncontended, ready + call + await):");
    println!("  llm_resilience_queue     {q:.3}");
    println!("  tower_concurrency_limit  {limit:.3}");
    println!("  tower_buffer             {buffer:.3}");
}

/// Queue and `Buffer` measured in alternation, round after round, so that
/// load from other processes hits both alike; prints the median ratio.
fn paired_ratios() {
    fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }
    const ROUNDS: usize = 21;
    let rt = current_thread();
    let mut q = queue(32, 1_000, false);
    let mut buf = rt.block_on(async { Buffer::new(Echo { yields: false }, 1_000) });
    let mut ratios = Vec::new();
    for _ in 0..ROUNDS {
        let tq = timed(&rt, &mut q, 20_000);
        let tb = timed(&rt, &mut buf, 20_000);
        ratios.push(tb.as_secs_f64() / tq.as_secs_f64());
    }
    let (med, lo, hi) = median(ratios);
    println!(
        "paired uncontended: Buffer round trip / queue round trip = {med:.1} (median of {ROUNDS}; min {lo:.1}, max {hi:.1})"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for yields in [false, true] {
        let q = queue(16, 1_000, yields);
        let buf = rt.block_on(async { Buffer::new(Echo { yields }, 1_000) });
        let limit = ConcurrencyLimit::new(Echo { yields }, 16);
        let (mut vs_buffer, mut vs_limit) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (tq, tb, tl) = rt.block_on(async {
                let (mut tq, mut tb, mut tl) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
                for _ in 0..4 {
                    tq += contended_batch(q.clone()).await;
                    tb += contended_batch(buf.clone()).await;
                    tl += contended_batch(limit.clone()).await;
                }
                (tq, tb, tl)
            });
            vs_buffer.push(tb.as_secs_f64() / tq.as_secs_f64());
            vs_limit.push(tl.as_secs_f64() / tq.as_secs_f64());
        }
        let inner = if yields { "yields" } else { "instant" };
        let (med, lo, hi) = median(vs_buffer);
        println!(
            "paired contended (inner {inner}): queue throughput / Buffer throughput = {med:.1} (median of {ROUNDS}; min {lo:.1}, max {hi:.1})"
        );
        let (med, lo, hi) = median(vs_limit);
        println!(
            "paired contended (inner {inner}): queue throughput / ConcurrencyLimit(16) throughput = {med:.2} (median of {ROUNDS}; min {lo:.2}, max {hi:.2})"
        );
    }
}

criterion_group!(benches, uncontended, contended);

fn main() {
    report_allocations();
    if std::env::args().any(|a| a == "--bench") {
        paired_ratios();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
