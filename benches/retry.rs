//! The retry layer's success path: a call that succeeds on the first attempt,
//! through `llm_resilience::retry` (with its default budget), tower's `Retry`
//! with a `TpsBudget` policy, and tower-resilience's retry layer.
//!
//! Every variant wraps the same always-ready inner service (its future is
//! `std::future::Ready`) and is driven the same way: `poll_ready` then `call`,
//! the response future polled once with a no-op waker, inside a current-thread
//! tokio runtime's context. Before timing, each variant is run 100,000 times
//! under a counting global allocator and its heap allocations per call are
//! printed.
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench retry -- --warm-up-time 2 --measurement-time 5
//! ```
//!
//! Before the criterion groups it prints the interleaved medians (every
//! variant round-robin, 31 rounds of 20,000 calls), which load drift on a
//! shared machine affects alike.

use std::fmt;
use std::future::Future;
use std::hint::black_box;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service};

#[path = "support/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[path = "support/peers.rs"]
mod peers;
use peers::{Always, TowerPolicy};

/// One call: `poll_ready`, `call`, one poll of the response future.
#[inline]
fn call_once<S>(svc: &mut S, cx: &mut Context<'_>, req: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => panic!("poll_ready failed: {e:?}"),
        Poll::Pending => panic!("the inner service is always ready"),
    }
    let mut fut = pin!(svc.call(req));
    match fut.as_mut().poll(cx) {
        Poll::Ready(Ok(v)) => v,
        Poll::Ready(Err(e)) => panic!("the call failed: {e:?}"),
        Poll::Pending => panic!("the inner future is always ready"),
    }
}

const WARM_UP_CALLS: u64 = 1_000;
const COUNTED_CALLS: u64 = 100_000;

/// Heap allocations per call, over `COUNTED_CALLS` calls after a warm-up.
fn allocations_per_call<S>(svc: &mut S, cx: &mut Context<'_>) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    for n in 0..WARM_UP_CALLS {
        assert_eq!(call_once(svc, cx, n), n + 1);
    }
    let before = alloc::allocations();
    for n in 0..COUNTED_CALLS {
        black_box(call_once(svc, cx, black_box(n)));
    }
    let after = alloc::allocations();
    (after - before) as f64 / COUNTED_CALLS as f64
}

fn bench_variant<S>(c: &mut Criterion, name: &str, mut svc: S)
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let allocs = allocations_per_call(&mut svc, &mut cx);
    eprintln!(
        "allocations per call, {name}: {allocs:.3} (over {COUNTED_CALLS} calls); \
         response future: {} bytes",
        std::mem::size_of::<S::Future>()
    );
    let mut group = c.benchmark_group("retry_success_first_try");
    group.bench_function(name, |b| {
        let mut n = 0u64;
        b.iter(|| {
            n = n.wrapping_add(1);
            call_once(&mut svc, &mut cx, black_box(n))
        });
    });
    group.finish();
}

fn retry_success(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let _context = rt.enter();
    interleaved();

    // The bare inner service: the harness's own cost.
    bench_variant(c, "baseline_inner_only", Always);

    // Ours: 3 attempts, the default budget (ratio 0.2, 10/s, 10 s TTL).
    let ours = llm_resilience::retry::RetryLayer::builder()
        .max_attempts(3)
        .build()
        .expect("a valid retry configuration");
    bench_variant(c, "llm_resilience", ours.layer(Always));

    // Ours without a budget: what the budget costs.
    let ours_plain = llm_resilience::retry::RetryLayer::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .expect("a valid retry configuration");
    bench_variant(c, "llm_resilience_no_budget", ours_plain.layer(Always));

    // tower 0.5: Retry with a TpsBudget policy, the same budget parameters.
    let policy = TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts_left: 3,
    };
    bench_variant(c, "tower", tower::retry::Retry::new(policy, Always));

    // tower-resilience 0.13: 3 attempts, exponential backoff, and its token
    // bucket budget (10 tokens per second, 100 at most) ...
    let budget = tower_resilience::retry::RetryBudgetBuilder::new()
        .token_bucket()
        .tokens_per_second(10.0)
        .max_tokens(100)
        .build()
        .expect("a valid token bucket");
    let tr = tower_resilience::retry::RetryLayer::<u64, u64, io::Error>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .budget(budget)
        .build();
    bench_variant(c, "tower_resilience", tr.layer(Always));

    // ... and without a budget, its cheapest configuration.
    let tr_plain = tower_resilience::retry::RetryLayer::<u64, u64, io::Error>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build();
    bench_variant(c, "tower_resilience_no_budget", tr_plain.layer(Always));
}

/// Criterion measures the variants one after another, so on a shared machine
/// they can see different loads. This runs them round-robin instead, many
/// short samples each, and prints the median time per call and the median of
/// the per-round ratios: the figure to trust when the machine is busy.
fn interleaved() {
    const ROUNDS: usize = 31;
    const CALLS: u64 = 20_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let _context = rt.enter();
    let mut cx = Context::from_waker(Waker::noop());

    type Driver = Box<dyn FnMut(&mut Context<'_>, u64) -> u64>;
    fn driver<S>(mut svc: S) -> Driver
    where
        S: Service<u64, Response = u64> + 'static,
        S::Error: fmt::Debug,
    {
        Box::new(move |cx, n| call_once(&mut svc, cx, n))
    }
    let ours = llm_resilience::retry::RetryLayer::builder()
        .max_attempts(3)
        .build()
        .expect("a valid retry configuration");
    let policy = TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts_left: 3,
    };
    let budget = tower_resilience::retry::RetryBudgetBuilder::new()
        .token_bucket()
        .tokens_per_second(10.0)
        .max_tokens(100)
        .build()
        .expect("a valid token bucket");
    let tr = tower_resilience::retry::RetryLayer::<u64, u64, io::Error>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .budget(budget)
        .build();
    let tr_plain = tower_resilience::retry::RetryLayer::<u64, u64, io::Error>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build();
    let mut variants: Vec<(&str, Driver)> = vec![
        ("llm_resilience", driver(ours.layer(Always))),
        ("tower", driver(tower::retry::Retry::new(policy, Always))),
        ("tower_resilience", driver(tr.layer(Always))),
        ("tower_resilience_no_budget", driver(tr_plain.layer(Always))),
    ];
    let mut samples = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, run)) in variants.iter_mut().enumerate() {
            let start = std::time::Instant::now();
            for n in 0..CALLS {
                black_box(run(&mut cx, black_box(n)));
            }
            samples[i].push(start.elapsed().as_nanos() as f64 / CALLS as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, (name, _)) in variants.iter().enumerate() {
        eprintln!(
            "interleaved {name}: median {:.1} ns/call",
            median(samples[i].clone())
        );
    }
    for (j, theirs) in [
        (1, "tower"),
        (2, "tower_resilience"),
        (3, "tower_resilience_no_budget"),
    ] {
        let ratios: Vec<f64> = (0..ROUNDS).map(|r| samples[0][r] / samples[j][r]).collect();
        eprintln!(
            "interleaved ratio llm_resilience / {theirs}: median {:.3}",
            median(ratios)
        );
    }
}

/// The budgets alone: one deposit, as on every successful call.
fn budget_deposit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let _context = rt.enter();
    let mut group = c.benchmark_group("budget_deposit");
    let ours = llm_resilience::budget::RetryBudget::default();
    group.bench_function("llm_resilience", |b| b.iter(|| black_box(&ours).deposit()));
    let tower = TpsBudget::new(Duration::from_secs(10), 10, 0.2);
    group.bench_function("tower", |b| b.iter(|| black_box(&tower).deposit()));
    group.bench_function("clock_read", |b| b.iter(tokio::time::Instant::now));
    group.finish();
}

criterion_group!(benches, retry_success, budget_deposit);
criterion_main!(benches);
