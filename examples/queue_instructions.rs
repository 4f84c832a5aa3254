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

use llm_resilience::queue::QueueLayer;
use tower::limit::ConcurrencyLimit;
use tower::Layer;

#[path = "../benches/support/instructions.rs"]
mod instructions;
#[path = "../benches/support/peers.rs"]
mod peers;
use instructions::run;
use peers::Always;

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
