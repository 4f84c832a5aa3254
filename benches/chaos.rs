//! What the chaos layer costs a call that it does not touch.
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench chaos -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Three variants over the same always-ready inner service, driven the same
//! way (`poll_ready`, `call`, one poll with a no-op waker): the inner service
//! alone, the layer disabled, and the layer enabled with a rule that never
//! fires (probability 0), which pays for the draw.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};
use llm_resilience::chaos::{ChaosLayer, Fault};
use tower::{Layer, Service};

#[path = "support/peers.rs"]
mod peers;
use peers::Always;

fn call_once<S>(svc: &mut S, cx: &mut Context<'_>, n: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let Poll::Ready(Ok(())) = svc.poll_ready(cx) else {
        panic!("not ready")
    };
    let fut = pin!(svc.call(n));
    match fut.poll(cx) {
        Poll::Ready(Ok(v)) => v,
        other => panic!("not answered at once: {other:?}"),
    }
}

fn bench<S>(c: &mut Criterion, name: &str, mut svc: S)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0u64;
    c.bench_function(name, |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            call_once(&mut svc, &mut cx, black_box(n))
        })
    });
}

fn chaos(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _context = rt.enter();
    bench(c, "chaos/inner_only", Always);
    bench(c, "chaos/disabled", ChaosLayer::disabled().layer(Always));
    let idle = ChaosLayer::builder()
        .seed(1)
        .error_rate(Fault::overloaded(), 0.0)
        .build()
        .expect("valid");
    bench(c, "chaos/enabled_not_injecting", idle.layer(Always));
}

criterion_group!(benches, chaos);
criterion_main!(benches);
