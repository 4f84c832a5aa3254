//! The circuit breaker's closed path (all successes) against
//! tower-resilience's breaker and failsafe's default policy.
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench breaker
//! ```
//!
//! Every variant wraps the same always-ready inner service and is driven the
//! way a server calls it (see `support/drive.rs`): one service value reused,
//! a clone per request, and 64 tasks on 2 workers sharing one breaker. All
//! variants are sampled round-robin in the same run; the ratios are taken
//! per round. Heap allocations per call and the machine's floor (bare call,
//! atomic, clock read) are printed first. The configurations are in
//! `support/variants.rs`.

use std::rc::Rc;

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/drive.rs"]
mod drive;
#[path = "support/peers.rs"]
mod peers;
#[path = "support/variants.rs"]
mod variants;

use drive::{Mode, Variant};
use variants::*;

/// Short samples, many rounds: on a shared machine most samples then run
/// uninterrupted, and the median per-round ratio ignores the rest.
const ROUNDS: usize = 151;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

fn main() {
    let rts = Rc::new((drive::current(), drive::two_workers()));
    drive::floor(bare(), &rts.0, &rts.1);
    let count = alloc::allocations;
    for mode in [Mode::Reused, Mode::Cloned] {
        drive::allocations(
            "llm_resilience count",
            &mut breaker_count(),
            mode,
            &rts.0,
            count,
        );
        drive::allocations(
            "llm_resilience time",
            &mut breaker_time(),
            mode,
            &rts.0,
            count,
        );
        drive::allocations(
            "tower_resilience time",
            &mut breaker_tr_time(),
            mode,
            &rts.0,
            count,
        );
        drive::allocations("failsafe", &mut breaker_failsafe(), mode, &rts.0, count);
    }
    for (mode, n) in [
        (Mode::Reused, 2_000),
        (Mode::Cloned, 2_000),
        (Mode::Contended, 12_800),
    ] {
        let mut variants = vec![
            Variant::new("llm_resilience count window", breaker_count(), mode, &rts),
            Variant::new(
                "llm_resilience 30 s time window",
                breaker_time(),
                mode,
                &rts,
            ),
            Variant::new(
                "tower_resilience count window",
                breaker_tr_count(),
                mode,
                &rts,
            ),
            Variant::new(
                "tower_resilience 30 s time window",
                breaker_tr_time(),
                mode,
                &rts,
            ),
            Variant::new("failsafe default policy", breaker_failsafe(), mode, &rts),
            Variant::new("bare inner service", bare(), mode, &rts),
        ];
        drive::round_robin(
            &format!("breaker, closed, all successes, {}", mode.name()),
            &mut variants,
            ROUNDS,
            n,
            &[(0, 2), (0, 4), (1, 3), (1, 4)],
        );
    }
}
