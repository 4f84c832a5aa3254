//! The whole stack: queue → retry (attempt timeout, budget) → breaker
//! (30 s time window), against the same stack of tower-resilience layers
//! (bulkhead → retry → time limiter → breaker with its default count
//! window) and tower's own stack, which
//! has no breaker (`ConcurrencyLimit` → `Retry` with `TpsBudget` →
//! `Timeout`).
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench stack
//! ```
//!
//! Driven like the other benches (`support/drive.rs`): reused, a clone per
//! request, 64 tasks on 2 workers; round-robin, ratios per round; heap
//! allocations per call and the floor first. Configurations:
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
            "llm_resilience stack",
            &mut stack_ours(),
            mode,
            &rts.0,
            count,
        );
        drive::allocations("tower stack", &mut stack_tower(), mode, &rts.0, count);
        let mut tr = stack_tower_resilience();
        drive::allocations("tower_resilience stack", &mut tr, mode, &rts.0, count);
    }
    for (mode, n) in [
        (Mode::Reused, 2_000),
        (Mode::Cloned, 2_000),
        (Mode::Contended, 12_800),
    ] {
        let mut variants = vec![
            Variant::new(
                "llm_resilience stack, time window",
                stack_ours(),
                mode,
                &rts,
            ),
            Variant::new(
                "llm_resilience stack, count window",
                stack_ours_count(),
                mode,
                &rts,
            ),
            Variant::new(
                "tower_resilience stack",
                stack_tower_resilience(),
                mode,
                &rts,
            ),
            Variant::new("tower stack (no breaker)", stack_tower(), mode, &rts),
            Variant::new("bare inner service", bare(), mode, &rts),
        ];
        drive::round_robin(
            &format!("whole stack, first-try success, {}", mode.name()),
            &mut variants,
            ROUNDS,
            n,
            &[(0, 2), (1, 2), (0, 3), (1, 3)],
        );
    }
}
