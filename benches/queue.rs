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
//!   allocator, the size of the queue's response future, and the heap bytes
//!   per waiting request (queue vs `Buffer` over `ConcurrencyLimit`, 10 000
//!   waiting behind one permit), printed before the criterion runs.
//! - With `--bench` (what `cargo bench` passes), paired ratios measured in
//!   alternating rounds: uncontended round trip vs `ConcurrencyLimit(32)`
//!   and `Buffer`; 64 tasks on 2 workers vs `Buffer`; the queued path (16
//!   permits, an inner that yields, 50 and 1 000 callers) vs
//!   `ConcurrencyLimit(16)`. On the two workers, each side goes first in
//!   every other round.
//!
//! Run: `cargo bench --bench queue -- --warm-up-time 1 --measurement-time 3`;
//! only the printed figures (no criterion groups):
//! `cargo bench --bench queue -- no_criterion_group`

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

/// A global allocator that counts allocations and live bytes (kept in this
/// file so that the bench stands alone).
mod alloc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

    static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
    static LIVE: AtomicI64 = AtomicI64::new(0);

    /// Allocations (and reallocations) made so far.
    pub fn allocations() -> u64 {
        ALLOCATIONS.load(Ordering::Relaxed)
    }

    /// Bytes allocated and not yet freed (as requested, before the
    /// allocator's rounding).
    pub fn live_bytes() -> i64 {
        LIVE.load(Ordering::Relaxed)
    }

    /// `System`, counting.
    pub struct Counting;

    // SAFETY: every method forwards to `System` with the caller's arguments
    // unchanged; the counters have no effect on the memory handed out.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            // SAFETY: forwarded unchanged.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            // SAFETY: forwarded unchanged.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            // SAFETY: forwarded unchanged.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
            // SAFETY: forwarded unchanged.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

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

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

const ROUNDS: usize = 15;

/// Prints the median (min, max) of `ROUNDS` ratios.
fn print_ratio(what: &str, ratios: Vec<f64>) {
    let (med, lo, hi) = median(ratios);
    println!("{what} = {med:.2} (median of {ROUNDS}; min {lo:.2}, max {hi:.2})");
}

/// Runs two batches one after the other, `a` first in even rounds and `b`
/// first in odd ones (the first batch of a round also pays for waking the
/// idle workers); their times in seconds, `(a, b)`.
async fn in_turn(
    round: usize,
    a: impl std::future::Future<Output = Duration>,
    b: impl std::future::Future<Output = Duration>,
) -> (f64, f64) {
    let (ta, tb) = if round.is_multiple_of(2) {
        let ta = a.await;
        (ta, b.await)
    } else {
        let tb = b.await;
        (a.await, tb)
    };
    (ta.as_secs_f64(), tb.as_secs_f64())
}

/// `tasks` tasks, each `per_task` round trips on its own clone of `svc`.
async fn batch<S>(svc: &S, tasks: u64, per_task: u64) -> Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks as usize);
    for t in 0..tasks {
        let mut s = svc.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..per_task {
                round_trip(&mut s, t * per_task + k).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

/// The queue and its peers measured in alternation, round after round, so
/// that load from other processes hits all alike; prints median ratios.
fn paired_ratios() {
    // Uncontended: one caller, the same service value, current thread.
    let rt = current_thread();
    let mut q = queue(32, 1_000, false);
    let mut limit = ConcurrencyLimit::new(Echo { yields: false }, 32);
    let mut buf = rt.block_on(async { Buffer::new(Echo { yields: false }, 1_000) });
    let (mut vs_limit, mut vs_buffer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let tq = timed(&rt, &mut q, 20_000).as_secs_f64();
        let tl = timed(&rt, &mut limit, 20_000).as_secs_f64();
        let tb = timed(&rt, &mut buf, 2_000).as_secs_f64() * 10.0;
        vs_limit.push(tq / tl);
        vs_buffer.push(tb / tq);
    }
    print_ratio(
        "uncontended round trip: queue time / ConcurrencyLimit(32) time",
        vs_limit,
    );
    print_ratio(
        "uncontended round trip: Buffer time / queue time",
        vs_buffer,
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Contended, inner answers at once: throughput against Buffer.
    let q = queue(16, 1_000, false);
    let buf = rt.block_on(async { Buffer::new(Echo { yields: false }, 1_000) });
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        // Each side goes first in every other round, so that whatever
        // the first batch of a round pays (idle workers waking up) is paid
        // by both alike.
        let (tq, tb) = rt.block_on(in_turn(
            round,
            batch(&q, TASKS, PER_TASK),
            batch(&buf, TASKS, PER_TASK),
        ));
        ratios.push(tb / tq);
    }
    print_ratio(
        "contended, 64 tasks on 2 workers, inner instant: queue throughput / Buffer throughput",
        ratios,
    );

    // The queued path: 16 permits, an inner that yields once, so that
    // every permit is held across a task switch and the other callers wait.
    for waiters in [50u64, 1_000] {
        let per_task = (20_000 / waiters).max(4);
        let q = queue(16, 1_000, true);
        let limit = ConcurrencyLimit::new(Echo { yields: true }, 16);
        let mut ratios = Vec::new();
        for round in 0..ROUNDS {
            // Alternating which side goes first, as above.
            let (tq, tl) = rt.block_on(in_turn(
                round,
                batch(&q, waiters, per_task),
                batch(&limit, waiters, per_task),
            ));
            ratios.push(tq / tl);
        }
        print_ratio(
            &format!("queued path, {waiters} callers on 16 permits, inner yields: queue time / ConcurrencyLimit(16) time"),
            ratios,
        );
    }
}

/// An inner service whose calls never answer: holds the permit (or the
/// `ConcurrencyLimit` permit) so that the requests behind it wait.
#[derive(Clone, Copy)]
struct Hold;

impl Service<u64> for Hold {
    type Response = u64;
    type Error = BoxError;
    type Future = std::future::Pending<Result<u64, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: u64) -> Self::Future {
        std::future::pending()
    }
}

/// Heap bytes per waiting request: `n` requests behind one that holds the
/// only permit, each made on its own clone of the service (as a server
/// does), polled once, and kept as a boxed future (as a spawned task keeps
/// it). Everything a waiting request costs, its future included.
fn memory_per_waiting() {
    const N: usize = 10_000;
    fn waiting<S>(rt: &tokio::runtime::Runtime, svc: S) -> f64
    where
        S: Service<u64, Response = u64> + Clone + 'static,
        S::Error: std::fmt::Debug,
    {
        rt.block_on(async {
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let mut first = svc.clone();
            first.ready().await.unwrap();
            let mut held = Box::pin(first.call(0));
            assert!(held.as_mut().poll(&mut cx).is_pending());
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            let mut futs: Vec<Pin<Box<S::Future>>> = Vec::with_capacity(N);
            let before = alloc::live_bytes();
            for i in 0..N as u64 {
                let mut s = svc.clone();
                // `ready().await`, not one poll: tokio's budget makes
                // `Buffer`'s semaphore yield every 128 acquisitions.
                s.ready().await.unwrap();
                let mut fut = Box::pin(s.call(i));
                assert!(fut.as_mut().poll(&mut cx).is_pending());
                futs.push(fut);
            }
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            let per = (alloc::live_bytes() - before) as f64 / N as f64;
            drop(futs);
            drop(held);
            per
        })
    }
    let rt = current_thread();
    let q = {
        let layer = QueueLayer::builder()
            .concurrency(1)
            .capacity(N)
            .build()
            .unwrap();
        waiting(&rt, layer.layer(Hold))
    };
    let buffer = {
        let b = rt.block_on(async { Buffer::new(ConcurrencyLimit::new(Hold, 1), N + 1) });
        waiting(&rt, b)
    };
    println!("heap bytes per waiting request ({N} waiting behind one permit, future boxed):");
    println!("  llm_resilience_queue                    {q:.0}");
    println!("  tower_buffer_over_concurrency_limit(1)  {buffer:.0}");
}

criterion_group!(benches, uncontended, contended);

fn main() {
    report_allocations();
    memory_per_waiting();
    if std::env::args().any(|a| a == "--bench") {
        paired_ratios();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
