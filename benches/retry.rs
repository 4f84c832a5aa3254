//! The retry layer's success path (a call that succeeds on its first
//! attempt) against tower's `Retry` with a `TpsBudget` policy and
//! tower-resilience's retry layer with its defaults.
//!
//! ```text
//! cargo bench -p llm-resilience-bench --bench retry
//! ```
//!
//! Every variant wraps the same always-ready inner service (its future is
//! `std::future::Ready`) and is driven the way a server calls it (see
//! `support/drive.rs`): one service value reused, a clone per request, and
//! 64 tasks on 2 workers. All variants are sampled round-robin in the same
//! run; the ratios are taken per round. Heap allocations per call and the
//! machine's floor (bare call, atomic, clock read) are printed first.
//!
//! Beside the peers runs a yardstick, "least retry"
//! (`support/peers.rs`): the least any retry layer can do, its
//! configuration in an `Arc` (as a layer whose future reaches shared
//! state, such as a budget, must) or copied (nothing shared).

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
        drive::allocations("llm_resilience", &mut retry_ours(), mode, &rts.0, count);
        drive::allocations("tower", &mut retry_tower(), mode, &rts.0, count);
        let mut tr = retry_tower_resilience();
        drive::allocations("tower_resilience", &mut tr, mode, &rts.0, count);
    }
    for (mode, n) in [
        (Mode::Reused, 2_000),
        (Mode::Cloned, 2_000),
        (Mode::Contended, 12_800),
    ] {
        let mut variants = vec![
            Variant::new("llm_resilience", retry_ours(), mode, &rts),
            Variant::new(
                "llm_resilience_no_budget",
                retry_ours_no_budget(),
                mode,
                &rts,
            ),
            Variant::new("tower Retry+TpsBudget", retry_tower(), mode, &rts),
            Variant::new(
                "tower_resilience retry",
                retry_tower_resilience(),
                mode,
                &rts,
            ),
            Variant::new("bare inner service", bare(), mode, &rts),
            Variant::new("least retry, Arc", retry_least_shared(), mode, &rts),
            Variant::new("least retry, inline", retry_least_inline(), mode, &rts),
        ];
        drive::round_robin(
            &format!("retry, first-try success, {}", mode.name()),
            &mut variants,
            ROUNDS,
            n,
            // Ours against tower and tower-resilience, ours without a
            // budget against tower, and the yardstick against
            // tower-resilience (what any retry holding shared state costs
            // at least, as a share of it).
            &[(0, 2), (0, 3), (1, 2), (5, 3), (6, 3)],
        );
    }
}
