//! Instructions per round trip on the queue's uncontended path, for
//! callgrind.
//!
//! Times on a shared 2-core machine are noisy; instruction counts are not.
//! This runs `N` round trips (`poll_ready`, `call`, poll the future to its
//! answer, no runtime needed) through one variant, so that the difference
//! between two runs divided by the difference in `N` is the cost of one
//! round trip, harness included:
//!
//! ```text
//! cargo build --release --example queue_instructions
//! for v in ours limit bare; do for n in 10000 20000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/queue_instructions $v $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! `limit` is tower's `ConcurrencyLimit` (tokio's semaphore), the cheapest
//! other way to bound calls in flight; `bare` the inner service alone.
//! Instructions are not time: a compare-and-swap counts one instruction.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use llm_resilience::queue::QueueLayer;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service};

#[path = "../benches/support/peers.rs"]
mod peers;
use peers::Always;

#[inline(never)]
fn run<S>(svc: &mut S, n: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut acc = 0u64;
    for i in 0..n {
        let Poll::Ready(Ok(())) = svc.poll_ready(&mut cx) else {
            panic!("not ready")
        };
        let fut = pin!(svc.call(i));
        let Poll::Ready(Ok(v)) = fut.poll(&mut cx) else {
            panic!("not done")
        };
        acc = acc.wrapping_add(v);
    }
    acc
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let acc = match variant.as_str() {
        "ours" => {
            let layer = QueueLayer::builder()
                .concurrency(32)
                .capacity(1_000)
                .build()
                .expect("valid");
            run(&mut layer.layer(Always), n)
        }
        "limit" => run(&mut ConcurrencyLimit::new(Always, 32), n),
        "bare" => run(&mut Always, n),
        other => panic!("unknown variant {other}: ours, limit or bare"),
    };
    println!("{variant}: {n} calls, checksum {acc}");
}
