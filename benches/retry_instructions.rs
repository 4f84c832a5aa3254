//! Instructions per call on the retry layer's success path, for callgrind.
//!
//! Criterion's times on a shared 2-core machine are noisy; instruction counts
//! are not. This runs `N` first-attempt successes through one variant, so
//! that the difference between two runs divided by the difference in `N` is
//! the cost of one call, harness included (the inner service alone costs 7):
//!
//! ```text
//! cargo build --release -p llm-resilience-bench --bin retry_instructions
//! for v in ours ours_no_budget tower; do for n in 10000 20000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/retry_instructions $v $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! `tower` is tower's `Retry` with a `TpsBudget` policy written like tower's
//! own example (deposit on success), as in `benches/retry.rs`.

use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::TpsBudget;
use tower::retry::RetryLayer as TowerRetryLayer;
use tower::Layer;

#[path = "support/instructions.rs"]
mod instructions;
#[path = "support/peers.rs"]
mod peers;
use instructions::run;
use peers::{Always, TowerPolicy};

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let ours = llm_resilience::retry::RetryLayer::builder().max_attempts(3);
    let acc = match variant.as_str() {
        "ours" => run(&mut ours.build().expect("valid").layer(Always), n),
        "ours_no_budget" => run(
            &mut ours.no_budget().build().expect("valid").layer(Always),
            n,
        ),
        "tower" => {
            let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
            let policy = TowerPolicy {
                budget,
                attempts_left: 3,
            };
            run(&mut TowerRetryLayer::new(policy).layer(Always), n)
        }
        other => panic!("unknown variant {other}: ours, ours_no_budget or tower"),
    };
    println!("{variant}: {n} calls, checksum {acc}");
}
