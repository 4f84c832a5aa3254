//! Rate limiter cost: one admitted call under the limit, in one run against
//! `governor`'s direct limiter wrapped as a tower layer the obvious way,
//! tower-resilience's rate limiter, and (keyed) `governor`'s keyed limiter;
//! plus the contended case (64 tasks on 2 workers).
//!
//! `cargo bench -p llm-resilience-bench --bench ratelimit`
//!
//! Every variant is driven the way a service is called (`ready().await`
//! then `call().await` in an async loop inside a runtime); the variants run
//! round-robin, 151 rounds of short samples, and the medians and the
//! medians of the per-round ratios are printed (the machine is shared:
//! load drift hits every variant of a round alike).
//! Heap allocations per call are counted first with a counting allocator.
//!
//! What each side does that the other does not: ours checks a request
//! limit and (in `ours_tokens`) a token limit with an exact sliding window
//! on top of the GCRA (an admitted call takes both from a lease with one
//! compare-and-swap; the lock opens the lease and books it), keeps a
//! waiting line, settles each response (the future holds the limiter's
//! `Arc`, or with `ignore_usage`, as here, its number, looked up only when
//! the call fails), and reads the kernel's coarse clock
//! (`CLOCK_MONOTONIC_COARSE`, up to two ticks behind, which the lease
//! allows for); its windows are per minute, as LLM providers' are (a
//! lease then lasts 1/128 of a minute); governor checks
//! one GCRA cell with a compare-and-swap and reads quanta's TSC clock,
//! refuses when over (no waiting) and reads nothing back;
//! tower-resilience (default fixed window) readies the inner service,
//! takes a permit and boxes its future.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use llm_resilience::ratelimit::RateLimitLayer;
use tower::{Layer, Service, ServiceExt};

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/drive.rs"]
mod drive;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const TASKS: u64 = 64;

type Inner = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn inner() -> Inner {
    tower::service_fn(|x: u64| ready(Ok::<u64, Infallible>(x)))
}

/// A limit no benchmark reaches: every call is admitted.
const HUGE: u64 = 1_000_000_000_000;

fn ours() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    RateLimitLayer::builder()
        .requests(HUGE)
        .no_token_limit()
        .window(Duration::from_secs(60))
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .build()
        .unwrap()
        .layer(inner())
}

fn ours_tokens() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    RateLimitLayer::builder()
        .requests(HUGE)
        .tokens(HUGE)
        .window(Duration::from_secs(60))
        .estimate_tokens(|_: &u64| 100)
        .ignore_usage()
        .build()
        .unwrap()
        .layer(inner())
}

fn ours_keyed() -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    RateLimitLayer::builder()
        .requests(HUGE)
        .no_token_limit()
        .window(Duration::from_secs(60))
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .key_by(|x: &u64| x % 4)
        .build()
        .unwrap()
        .layer(inner())
}

#[derive(Debug)]
struct Limited;

/// `governor` wrapped as a tower layer the obvious way: ready the inner
/// service, `check()` in `call`, refuse when over.
struct Governor<L> {
    limiter: Arc<L>,
    inner: Inner,
}

impl<L> Clone for Governor<L> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            inner: self.inner,
        }
    }
}

impl Service<u64> for Governor<DefaultDirectRateLimiter> {
    type Response = u64;
    type Error = Limited;
    type Future = Ready<Result<u64, Limited>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Limited>> {
        self.inner.poll_ready(cx).map_err(|e| match e {})
    }

    fn call(&mut self, x: u64) -> Self::Future {
        match self.limiter.check() {
            Ok(()) => ready(self.inner.call(x).into_inner().map_err(|e| match e {})),
            Err(_) => ready(Err(Limited)),
        }
    }
}

impl Service<u64> for Governor<DefaultKeyedRateLimiter<u64>> {
    type Response = u64;
    type Error = Limited;
    type Future = Ready<Result<u64, Limited>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Limited>> {
        self.inner.poll_ready(cx).map_err(|e| match e {})
    }

    fn call(&mut self, x: u64) -> Self::Future {
        match self.limiter.check_key(&(x % 4)) {
            Ok(()) => ready(self.inner.call(x).into_inner().map_err(|e| match e {})),
            Err(_) => ready(Err(Limited)),
        }
    }
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::MAX)
}

fn governor_direct() -> Governor<DefaultDirectRateLimiter> {
    Governor {
        limiter: Arc::new(governor::RateLimiter::direct(quota())),
        inner: inner(),
    }
}

fn governor_keyed() -> Governor<DefaultKeyedRateLimiter<u64>> {
    Governor {
        limiter: Arc::new(governor::RateLimiter::keyed(quota())),
        inner: inner(),
    }
}

fn tower_resilience(
) -> impl Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
       + Clone
       + Send
       + 'static {
    use tower_resilience::ratelimiter::RateLimiterLayer;
    RateLimiterLayer::builder()
        .limit_for_period(usize::MAX / 4)
        .refresh_period(Duration::from_secs(1))
        .timeout_duration(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(inner())
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

/// The same, with a clone of the service per request.
async fn run_cloned<S>(svc: &S, n: u64)
where
    S: Service<u64, Response = u64> + Clone,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let r = svc.clone().oneshot(i).await.unwrap();
        black_box(r);
    }
}

fn current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn per_call<S>(svc: &mut S, n: u64) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    run(svc, n).await;
    start.elapsed().as_nanos() as f64 / n as f64
}

async fn per_call_cloned<S>(svc: &S, n: u64) -> f64
where
    S: Service<u64, Response = u64> + Clone,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    run_cloned(svc, n).await;
    start.elapsed().as_nanos() as f64 / n as f64
}

fn allocations() {
    let rt = current();
    let n = 10_000u64;
    macro_rules! count {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            rt.block_on(run(&mut svc, 100));
            let before = alloc::allocations();
            rt.block_on(run(&mut svc, n));
            println!(
                "allocations per call, {}: {:.3}",
                $name,
                (alloc::allocations() - before) as f64 / n as f64
            );
        }};
    }
    count!("baseline", inner());
    count!("llm-resilience requests", ours());
    count!("llm-resilience requests+tokens", ours_tokens());
    count!("llm-resilience keyed", ours_keyed());
    count!("governor direct", governor_direct());
    count!("governor keyed", governor_keyed());
    count!("tower-resilience", tower_resilience());
}

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

/// As `contended_once`, but every task calls a service made for it alone
/// (`mk()`, a limiter of its own): nothing shared, so what this saves
/// against `contended_once` is what sharing one limiter costs.
fn contended_apart<S>(mt: &tokio::runtime::Runtime, mk: fn() -> S, per_task: u64) -> f64
where
    S: Service<u64, Response = u64, Error: std::fmt::Debug + Send, Future: Send>
        + Clone
        + Send
        + 'static,
{
    let svcs: Vec<S> = (0..TASKS).map(|_| mk()).collect();
    mt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = svcs
            .into_iter()
            .map(|mut svc| tokio::spawn(async move { run(&mut svc, per_task).await }))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed().as_nanos() as f64 / (per_task * TASKS) as f64
    })
}

/// The median of the per-round ratios `a[r] / b[r]`, with its quartiles.
fn ratio(a: &[f64], b: &[f64]) -> String {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |f: f64| r[((r.len() - 1) as f64 * f) as usize];
    format!("{:.2} ({:.2}–{:.2})", q(0.5), q(0.25), q(0.75))
}

fn main() {
    allocations();
    // Many short samples, round-robin: on a shared machine most short
    // samples run uninterrupted, and load drift hits every variant of a
    // round alike; each ratio is the median of the per-round ratios.
    const ROUNDS: usize = 151;
    let n = 2_000;
    let rt = current();
    let (mut base, mut o, mut ot, mut ok) = (inner(), ours(), ours_tokens(), ours_keyed());
    let (mut gd, mut gk, mut tr) = (governor_direct(), governor_keyed(), tower_resilience());
    let mut t = [(); 10].map(|_| Vec::new());
    for _ in 0..ROUNDS {
        rt.block_on(async {
            t[0].push(per_call(&mut base, n).await);
            t[1].push(per_call(&mut o, n).await);
            t[2].push(per_call(&mut ot, n).await);
            t[3].push(per_call(&mut ok, n).await);
            t[4].push(per_call(&mut gd, n).await);
            t[5].push(per_call(&mut gk, n).await);
            t[6].push(per_call(&mut tr, n / 10).await);
            t[7].push(per_call_cloned(&o, n).await);
            t[8].push(per_call_cloned(&gd, n).await);
            t[9].push(per_call_cloned(&tr, n / 10).await);
        });
    }
    let clock = rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            black_box(tokio::time::Instant::now());
        }
        start.elapsed().as_nanos() as f64 / n as f64
    });
    // Ours reads this one per call (Linux, no `test-util`).
    let coarse = drive::coarse_read(1_000_000);
    let m = t.clone().map(|mut v| median(&mut v));
    println!(
        "clock read (ns): tokio::time::Instant::now inside the runtime {clock:.1}, \
         {coarse}; future size: ours {} bytes",
        std::mem::size_of_val(&o.clone().call(0))
    );
    println!(
        "uncontended (median ns/call of {ROUNDS} rounds): baseline {:.1}, ours {:.1}, ours requests+tokens {:.1}, ours keyed {:.1}, governor direct {:.1}, governor keyed {:.1}, tower-resilience {:.1}",
        m[0], m[1], m[2], m[3], m[4], m[5], m[6]
    );
    println!(
        "uncontended ratios (median of per-round ratios, quartiles): ours/governor {}, ours+tokens/governor {}, ours/tower-resilience {}, keyed ours/governor keyed {}",
        ratio(&t[1], &t[4]),
        ratio(&t[2], &t[4]),
        ratio(&t[1], &t[6]),
        ratio(&t[3], &t[5])
    );
    println!(
        "clone per request (median ns/call): ours {:.1}, governor direct {:.1}, tower-resilience {:.1}; ours/governor {}, ours/tower-resilience {}",
        m[7],
        m[8],
        m[9],
        ratio(&t[7], &t[8]),
        ratio(&t[7], &t[9])
    );

    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let per_task = 200u64;
    let (o, ok, gd, gk, tr) = (
        ours(),
        ours_keyed(),
        governor_direct(),
        governor_keyed(),
        tower_resilience(),
    );
    let mut c = [(); 7].map(|_| Vec::new());
    for round in 0..ROUNDS {
        // Each variant goes first in turn: the first sample of a round
        // also pays for waking the idle workers.
        for k in 0..7 {
            match (round + k) % 7 {
                0 => c[0].push(contended_once(&mt, &o, per_task)),
                1 => c[1].push(contended_once(&mt, &gd, per_task)),
                2 => c[2].push(contended_once(&mt, &ok, per_task)),
                3 => c[3].push(contended_once(&mt, &gk, per_task)),
                4 => c[4].push(contended_once(&mt, &tr, per_task / 10)),
                5 => c[5].push(contended_apart(&mt, ours, per_task)),
                _ => c[6].push(contended_apart(&mt, governor_direct, per_task)),
            }
        }
    }
    let m = c.clone().map(|mut v| median(&mut v));
    println!(
        "contended, 64 tasks on 2 workers (median ns/call): ours {:.1}, governor direct {:.1}, ours keyed {:.1}, governor keyed {:.1}, tower-resilience {:.1}",
        m[0], m[1], m[2], m[3], m[4]
    );
    println!(
        "contended throughput (ours / theirs, median of per-round ratios): vs governor {}x, keyed vs governor keyed {}x, vs tower-resilience {}x",
        ratio(&c[1], &c[0]),
        ratio(&c[3], &c[2]),
        ratio(&c[4], &c[0])
    );
    println!(
        "contended, a limiter of its own per task (nothing shared; median ns/call): ours {:.1}, governor direct {:.1}",
        m[5], m[6]
    );
}
