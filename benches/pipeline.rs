//! The whole agent pipeline, a first-try success: `AgentPipeline` with one
//! target (queue → deadline → fallback → retry → breaker → rate limit →
//! attempt timeout → client) against the same order of tower-resilience layers
//! (bulkhead → time limiter → retry → breaker → rate limiter → time
//! limiter) and of tower's own (`ConcurrencyLimit` → `Timeout` → `Retry`
//! → `Timeout`; no breaker, no shareable rate limit).
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench pipeline
//! ```
//!
//! Driven like the other benches (`support/drive.rs`): reused, a clone per
//! request, 64 tasks on 2 workers; round-robin, ratios per round; heap
//! allocations per call first, and the floor. Configurations and what each
//! side does: `support/variants.rs` and BENCHMARKS.md. Instructions per
//! call: `benches/instructions.rs` (`pipeline_ours`, `pipeline_tower`,
//! `pipeline_tower_resilience`).
//!
//! Last measured (30 November 2026, 19:31–19:33 UTC, three runs, load 3–4):
//! ours / tower-resilience 0.238–0.240 reused, 0.235–0.241 cloned,
//! 0.165–0.189 contended; ours / tower 1.50–1.54; 0 allocations per call
//! (tower-resilience 14). Callgrind: 2 342 / 2 496 instructions per call
//! (reused / cloned) against tower-resilience's 6 560 / 6 839 and tower's
//! 998 / 1 152. Details: BENCHMARKS.md, "The agent pipeline".

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
            "llm_resilience pipeline",
            &mut pipeline_ours(),
            mode,
            &rts.0,
            count,
        );
        drive::allocations("tower pipeline", &mut pipeline_tower(), mode, &rts.0, count);
        let mut tr = pipeline_tower_resilience();
        drive::allocations("tower_resilience pipeline", &mut tr, mode, &rts.0, count);
    }
    for (mode, n) in [
        (Mode::Reused, 2_000),
        (Mode::Cloned, 2_000),
        (Mode::Contended, 12_800),
    ] {
        let mut variants = vec![
            Variant::new("llm_resilience AgentPipeline", pipeline_ours(), mode, &rts),
            Variant::new(
                "tower_resilience stack",
                pipeline_tower_resilience(),
                mode,
                &rts,
            ),
            Variant::new(
                "tower stack (no breaker, no rate limit)",
                pipeline_tower(),
                mode,
                &rts,
            ),
            Variant::new("bare inner service", bare(), mode, &rts),
        ];
        drive::round_robin(
            &format!("agent pipeline, first-try success, {}", mode.name()),
            &mut variants,
            ROUNDS,
            n,
            &[(0, 1), (0, 2)],
        );
    }
}
