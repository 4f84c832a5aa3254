//! How the benches drive a service, the way a server calls it, and how they
//! sample and report. Shared by `retry.rs`, `breaker.rs`, `stack.rs` and
//! `chaos.rs` (and the `instructions` binary for callgrind).
//!
//! Three ways to call, each inside a tokio runtime with its real waker:
//!
//! - **reused**: one service value, `ready().await` then `call(req).await`
//!   in an async loop on a current-thread runtime;
//! - **cloned**: a clone per request, `svc.clone().oneshot(req).await`
//!   (what axum and hyper do), same runtime;
//! - **contended**: 64 tasks on a 2-worker runtime, each with its own clone,
//!   each calling like *reused*.
//!
//! Every variant of a bench is sampled round-robin (one sample of each per
//! round), so that load from other processes hits all of them alike; the
//! report gives each variant's median time per call and, for each
//! comparison, the median (and spread) of the per-round ratios.

#![allow(dead_code)]

use std::fmt;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

/// A service the benches can drive: `u64` in, `u64` out.
pub trait Bench:
    Service<u64, Response = u64, Error: fmt::Debug + Send, Future: Send> + Clone + Send + 'static
{
}
impl<S> Bench for S where
    S: Service<u64, Response = u64, Error: fmt::Debug + Send, Future: Send>
        + Clone
        + Send
        + 'static
{
}

pub const TASKS: u64 = 64;

pub fn current() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

pub fn two_workers() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a 2-worker runtime")
}

/// `n` calls on one service value: `ready().await`, then `call(i).await`.
pub async fn reused<S>(svc: &mut S, n: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    for i in 0..n {
        let r = svc.ready().await.unwrap().call(i).await.unwrap();
        black_box(r);
    }
}

/// `n` calls, each on a fresh clone: `svc.clone().oneshot(i).await`.
pub async fn cloned<S>(svc: &S, n: u64)
where
    S: Service<u64, Response = u64> + Clone,
    S::Error: fmt::Debug,
{
    for i in 0..n {
        black_box(svc.clone().oneshot(i).await.unwrap());
    }
}

/// How a variant is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Reused,
    Cloned,
    Contended,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Reused => "reused",
            Mode::Cloned => "clone per request",
            Mode::Contended => "64 tasks on 2 workers",
        }
    }
}

/// Runs about `n` calls of `svc` in `mode`; returns nanoseconds per call.
pub fn sample<S: Bench>(svc: &mut S, mode: Mode, n: u64, cur: &Runtime, mt: &Runtime) -> f64 {
    match mode {
        Mode::Reused => cur.block_on(async {
            let start = Instant::now();
            reused(svc, n).await;
            start.elapsed().as_nanos() as f64 / n as f64
        }),
        Mode::Cloned => cur.block_on(async {
            let start = Instant::now();
            cloned(svc, n).await;
            start.elapsed().as_nanos() as f64 / n as f64
        }),
        Mode::Contended => {
            let per_task = n.div_ceil(TASKS).max(1);
            mt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let mut svc = svc.clone();
                        tokio::spawn(async move { reused(&mut svc, per_task).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed().as_nanos() as f64 / (per_task * TASKS) as f64
            })
        }
    }
}

/// One variant: a name and a closure taking one sample of `n` calls.
pub struct Variant {
    pub name: String,
    pub run: Box<dyn FnMut(u64) -> f64>,
}

impl Variant {
    /// `svc` called in `mode`, on the given runtimes (cloned `Arc`s are not
    /// needed: each variant owns its runtimes' handles through `Rc`).
    pub fn new<S: Bench>(
        name: impl Into<String>,
        mut svc: S,
        mode: Mode,
        rts: &std::rc::Rc<(Runtime, Runtime)>,
    ) -> Self {
        let rts = rts.clone();
        Variant {
            name: name.into(),
            run: Box::new(move |n| sample(&mut svc, mode, n, &rts.0, &rts.1)),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Samples every variant round-robin, `rounds` times `n` calls each (after
/// one round of warm-up; each variant first in turn), and prints medians and the per-round ratios of
/// each `(ours, theirs)` pair of indices.
pub fn round_robin(
    title: &str,
    variants: &mut [Variant],
    rounds: usize,
    n: u64,
    pairs: &[(usize, usize)],
) {
    for v in variants.iter_mut() {
        (v.run)(n);
    }
    let mut samples = vec![Vec::with_capacity(rounds); variants.len()];
    let len = variants.len();
    for round in 0..rounds {
        // Each variant goes first in turn: the first sample of a round also
        // pays for waking the idle workers of the two-worker runtime.
        for k in 0..len {
            let i = (round + k) % len;
            samples[i].push((variants[i].run)(n));
        }
    }
    println!("\n## {title} ({rounds} rounds of {n} calls, round-robin)");
    for (i, v) in variants.iter().enumerate() {
        let mut s = samples[i].clone();
        println!(
            "{:>40}: median {:7.1} ns/call, best {:7.1}",
            v.name,
            median(&mut s),
            s[0]
        );
    }
    for &(ours, theirs) in pairs {
        let mut r: Vec<f64> = (0..rounds)
            .map(|k| samples[ours][k] / samples[theirs][k])
            .collect();
        let m = median(&mut r);
        let q = |f: f64| r[((r.len() - 1) as f64 * f) as usize];
        println!(
            "ratio {} / {}: median {:.3} (quartiles {:.3}..{:.3}) {}",
            variants[ours].name,
            variants[theirs].name,
            m,
            q(0.25),
            q(0.75),
            if m > 0.0 {
                format!("= {:.1}x their throughput", 1.0 / m)
            } else {
                String::new()
            }
        );
    }
}

/// Heap allocations per call of `svc` in `mode` (reused or cloned), over
/// `n` calls after a warm-up, counted by the bench's global allocator.
pub fn allocations<S: Bench>(
    name: &str,
    svc: &mut S,
    mode: Mode,
    cur: &Runtime,
    counter: fn() -> u64,
) {
    const N: u64 = 10_000;
    cur.block_on(async {
        match mode {
            Mode::Reused => reused(svc, 100).await,
            _ => cloned(svc, 100).await,
        }
        let before = counter();
        match mode {
            Mode::Reused => reused(svc, N).await,
            _ => cloned(svc, N).await,
        }
        let per_call = (counter() - before) as f64 / N as f64;
        println!(
            "allocations per call, {name}, {}: {per_call:.3}",
            mode.name()
        );
    });
}

/// The floor of this machine, measured in the same run: a bare service
/// call driven like the variants, one atomic read-modify-write, and a clock
/// read (std's, and tokio's inside the runtime).
pub fn floor<S: Bench>(bare: S, cur: &Runtime, mt: &Runtime) {
    const N: u64 = 1_000_000;
    let mut bare = bare;
    let reused = best_of_5(|| sample(&mut bare, Mode::Reused, N, cur, mt));
    let cloned = best_of_5(|| sample(&mut bare, Mode::Cloned, N, cur, mt));
    let contended = best_of_5(|| sample(&mut bare, Mode::Contended, N, cur, mt));
    let counter = AtomicU64::new(0);
    let rmw = best_of_5(|| per_call_ns(N, || black_box(&counter).fetch_add(1, Ordering::AcqRel)));
    let std_now = best_of_5(|| per_call_ns(N, Instant::now));
    let tokio_now = best_of_5(|| cur.block_on(async { per_call_ns(N, tokio::time::Instant::now) }));
    let coarse = coarse_read(N);
    println!(
        "floor (best of 5 x {N}): bare service {reused:.1} ns reused, {cloned:.1} ns cloned, \
         {contended:.1} ns contended; atomic fetch_add {rmw:.1} ns; clock read \
         std::time::Instant::now {std_now:.1} ns, tokio::time::Instant::now {tokio_now:.1} ns, \
         {coarse}"
    );
}

/// The least of five runs of `f` (each a time per call).
fn best_of_5(mut f: impl FnMut() -> f64) -> f64 {
    (0..5).map(|_| f()).fold(f64::MAX, f64::min)
}

/// Nanoseconds per call of `n` calls of `f` (each result kept from the
/// optimiser).
fn per_call_ns<T>(n: u64, mut f: impl FnMut() -> T) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// The rate limiter's and the breaker's per-call clock on Linux
/// (`CLOCK_MONOTONIC_COARSE`): the best of 5 runs of `n` reads, as printed.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn coarse_read(n: u64) -> String {
    use rustix::time::{clock_gettime, ClockId};
    let best = best_of_5(|| per_call_ns(n, || clock_gettime(ClockId::MonotonicCoarse)));
    format!("CLOCK_MONOTONIC_COARSE {best:.1} ns")
}

/// Elsewhere the per-call clock is tokio's (above).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn coarse_read(_n: u64) -> String {
    "no coarse clock on this platform".into()
}
