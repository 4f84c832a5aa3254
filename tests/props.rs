//! Property tests for the arithmetic: backoff bounds and budget ratios.

use std::time::Duration;

use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::budget::{RetryBudget, CLOCK_READ_EVERY};
use proptest::prelude::*;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated)
    ]
}

proptest! {
    #[test]
    fn backoff_stays_inside_its_documented_bounds(
        initial_ms in 1u64..10_000,
        multiplier in 1.0f64..10.0,
        extra_ms in 0u64..120_000,
        jitter in jitter(),
        seed in any::<u64>(),
    ) {
        let b = Backoff::builder()
            .initial(Duration::from_millis(initial_ms))
            .multiplier(multiplier)
            .max_delay(Duration::from_millis(initial_ms + extra_ms))
            .jitter(jitter)
            .build()
            .unwrap();
        for (n, d) in b.iter(seed).take(40).enumerate() {
            let (lo, hi) = b.bounds(n as u32);
            prop_assert!(lo <= d && d <= hi, "retry {n}: {d:?} outside [{lo:?}, {hi:?}]");
            prop_assert!(d <= b.max_delay());
        }
        // Without jitter the sequence is exactly min(initial · m^n, max).
        if jitter == Jitter::None {
            let first: Vec<_> = b.iter(seed).take(3).collect();
            prop_assert_eq!(first[0], b.initial());
        }
    }

    #[test]
    fn backoff_is_reproducible_from_its_seed(seed in any::<u64>(), jitter in jitter()) {
        let b = Backoff::builder().jitter(jitter).build().unwrap();
        let a: Vec<_> = b.iter(seed).take(20).collect();
        let c: Vec<_> = b.iter(seed).take(20).collect();
        prop_assert_eq!(a, c);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Deposit(u32),
    Withdraw(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..3_000).prop_map(Op::Advance),
        (1u32..20).prop_map(Op::Deposit),
        (1u32..20).prop_map(Op::Withdraw),
    ]
}

/// Counts entries of `v` (bucket numbers) in the window of ten buckets
/// ending at `end`.
fn in_window(v: &[u64], end: u64) -> f64 {
    v.iter().filter(|&&b| b + 9 >= end && b <= end).count() as f64
}

/// The documented rule: Finagle's condition over ten buckets of ttl/10, with
/// deposits dated as the budget dates them (to its last clock read, which
/// happens at every withdrawal and whenever a bucket's deposits reach a
/// multiple of `CLOCK_READ_EVERY`).
struct Model {
    ratio: f64,
    reserve: f64,
    seen: u64,
    dated: Vec<u64>,       // bucket each deposit is counted in
    exact: Vec<u64>,       // bucket each deposit was really made in
    withdrawals: Vec<u64>, // bucket of each allowed withdrawal
}

impl Model {
    fn read_clock(&mut self, now: u64) {
        self.seen = self.seen.max(now);
    }
    fn deposit(&mut self, now: u64) {
        self.exact.push(now);
        self.dated.push(self.seen);
        let in_bucket = self.dated.iter().filter(|&&b| b == self.seen).count() as u64;
        if in_bucket.is_multiple_of(CLOCK_READ_EVERY) {
            self.read_clock(now);
        }
    }
    fn balance(&self, deposits: &[u64], now: u64) -> f64 {
        in_window(deposits, now) * self.ratio + self.reserve - in_window(&self.withdrawals, now)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn the_budget_keeps_finagles_rule_and_is_never_more_permissive(
        ttl_s in 1u64..=60,
        min_per_sec in 0u32..5,
        ratio_pct in 0u32..=150,
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let ratio = f64::from(ratio_pct) / 100.0;
            let budget = RetryBudget::builder()
                .ttl(Duration::from_secs(ttl_s))
                .min_per_sec(min_per_sec)
                .ratio(ratio)
                .build()
                .unwrap();
            let bucket_ms = ttl_s * 100;
            let mut model = Model {
                ratio,
                reserve: f64::from(min_per_sec) * ttl_s as f64,
                seen: 0,
                dated: vec![],
                exact: vec![],
                withdrawals: vec![],
            };
            let mut now_ms = 0u64;
            for op in ops {
                let now = now_ms / bucket_ms;
                match op {
                    Op::Advance(ms) => {
                        tokio::time::advance(Duration::from_millis(ms)).await;
                        now_ms += ms;
                    }
                    Op::Deposit(n) => {
                        for _ in 0..n {
                            budget.deposit();
                            model.deposit(now);
                        }
                    }
                    Op::Withdraw(n) => {
                        for _ in 0..n {
                            model.read_clock(now);
                            let expected = model.balance(&model.dated, now) >= 1.0 - 1e-9;
                            let got = budget.try_withdraw();
                            prop_assert_eq!(got, expected, "at {} ms", now_ms);
                            if got {
                                // Never more permissive than exact timestamps.
                                prop_assert!(
                                    model.balance(&model.exact, now) >= 1.0 - 1e-9,
                                    "allowed at {} ms where exact dating refuses", now_ms
                                );
                                model.withdrawals.push(now);
                            }
                        }
                    }
                }
            }
            // Over every window of ten buckets, withdrawals never exceed the
            // ratio of the deposits made (exact times) in the window ending at
            // the window's last withdrawal plus the nine before, plus the
            // reserve.
            let last = now_ms / bucket_ms;
            for end in 0..=last {
                let w = in_window(&model.withdrawals, end);
                let d = model.exact.iter().filter(|&&b| b + 18 >= end && b <= end).count() as f64;
                prop_assert!(w <= d * ratio + model.reserve + 1e-9, "window ending {}: {} > {}·{} + reserve", end, w, d, ratio);
            }
            Ok(())
        })?;
    }
}
