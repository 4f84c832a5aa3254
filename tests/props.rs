//! Property tests for the arithmetic: backoff bounds and budget ratios.

use std::time::Duration;

use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::budget::RetryBudget;
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

/// The reference: Finagle's rule over ten buckets of ttl/10, from a log.
struct Model {
    ratio: f64,
    reserve: f64,
    bucket_ms: u64,
    deposits: Vec<u64>,    // bucket of each deposit
    withdrawals: Vec<u64>, // bucket of each withdrawal
}

impl Model {
    fn count(v: &[u64], lo: i64, hi: u64) -> f64 {
        v.iter().filter(|&&b| b as i64 >= lo && b <= hi).count() as f64
    }
    fn allows(&self, bucket: u64) -> bool {
        let lo = bucket as i64 - 9;
        let d = Self::count(&self.deposits, lo, bucket);
        let w = Self::count(&self.withdrawals, lo, bucket);
        d * self.ratio + self.reserve - w >= 1.0 - 1e-9
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn the_budget_agrees_with_finagles_rule_and_never_overdraws_a_window(
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
                bucket_ms,
                deposits: vec![],
                withdrawals: vec![],
            };
            let mut now_ms = 0u64;
            for op in ops {
                let bucket = now_ms / model.bucket_ms;
                match op {
                    Op::Advance(ms) => {
                        tokio::time::advance(Duration::from_millis(ms)).await;
                        now_ms += ms;
                    }
                    Op::Deposit(n) => {
                        for _ in 0..n {
                            budget.deposit();
                            model.deposits.push(bucket);
                        }
                    }
                    Op::Withdraw(n) => {
                        for _ in 0..n {
                            let expected = model.allows(bucket);
                            let got = budget.try_withdraw();
                            prop_assert_eq!(got, expected, "at {} ms", now_ms);
                            if got {
                                model.withdrawals.push(bucket);
                            }
                        }
                    }
                }
            }
            // Over every window of ten buckets, withdrawals never exceed the
            // ratio of the deposits that backed them plus the reserve.
            let last = now_ms / bucket_ms;
            for end in 0..=last {
                let w = Model::count(&model.withdrawals, end as i64 - 9, end);
                let d = Model::count(&model.deposits, end as i64 - 18, end);
                prop_assert!(w <= d * ratio + model.reserve + 1e-9, "window ending {end}: {w} > {d}·{ratio} + reserve");
            }
            Ok(())
        })?;
    }
}
