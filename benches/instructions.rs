//! Instructions per call, for callgrind: the load-independent figure.
//!
//! Runs `N` calls of one variant (the configurations of
//! `support/variants.rs`) driven like the benches (`support/drive.rs`,
//! inside a current-thread runtime, with its waker), so that the
//! difference between two runs divided by the difference in `N` is the
//! cost of one call, harness included:
//!
//! ```text
//! cargo build --release -p llm-resilience-bench --bin instructions
//! for v in bare retry_ours retry_tower retry_tower_resilience; do
//!   for n in 10000 20000; do
//!     valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!       target/release/instructions $v reused $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! The mode is `reused` (one service value) or `cloned` (a clone per
//! request, `oneshot`). Instructions are not time: an atomic
//! read-modify-write or a clock read counts as a few instructions.

#[path = "support/drive.rs"]
mod drive;
#[path = "support/peers.rs"]
mod peers;
#[path = "support/variants.rs"]
mod variants;

use drive::Bench;
use variants::*;

fn run<S: Bench>(mut svc: S, cloned: bool, n: u64) {
    let rt = drive::current();
    rt.block_on(async {
        if cloned {
            drive::cloned(&svc, n).await
        } else {
            drive::reused(&mut svc, n).await
        }
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "retry_ours".into());
    let cloned = match args.next().as_deref() {
        None | Some("reused") => false,
        Some("cloned") => true,
        Some(other) => panic!("unknown mode {other}: reused or cloned"),
    };
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    match variant.as_str() {
        "bare" => run(bare(), cloned, n),
        "retry_ours" => run(retry_ours(), cloned, n),
        "retry_ours_no_budget" => run(retry_ours_no_budget(), cloned, n),
        "retry_tower" => run(retry_tower(), cloned, n),
        "retry_least_shared" => run(retry_least_shared(), cloned, n),
        "retry_least_inline" => run(retry_least_inline(), cloned, n),
        "retry_tower_resilience" => run(retry_tower_resilience(), cloned, n),
        "breaker_count" => run(breaker_count(), cloned, n),
        "breaker_time" => run(breaker_time(), cloned, n),
        "breaker_tr_count" => run(breaker_tr_count(), cloned, n),
        "breaker_tr_time" => run(breaker_tr_time(), cloned, n),
        "breaker_failsafe" => run(breaker_failsafe(), cloned, n),
        "stack_ours" => run(stack_ours(), cloned, n),
        "stack_ours_count" => run(stack_ours_count(), cloned, n),
        "stack_tower" => run(stack_tower(), cloned, n),
        "stack_tower_resilience" => run(stack_tower_resilience(), cloned, n),
        "pipeline_ours" => run(pipeline_ours(), cloned, n),
        "pipeline_tower" => run(pipeline_tower(), cloned, n),
        "pipeline_tower_resilience" => run(pipeline_tower_resilience(), cloned, n),
        other => panic!("unknown variant {other}; see support/variants.rs"),
    }
}
