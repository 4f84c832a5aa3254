//! loom model of the rate limiter's lock-free fast path: calls taking from
//! the lease with a compare-and-swap while the locked side closes it (to
//! fold what was taken into the bucket and the log) and opens the next.
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release --test ratelimit_loom`
//!
//! `src/ratelimit/lease.rs` is compiled into this test crate from its
//! source file, where `src/util/sync.rs` picks loom's atomics
//! (`cfg(all(loom, test))`): loom checks the real code. What must hold:
//! a lease never gives more than it was granted; what its close reports as
//! left is exactly the grant less what calls took, summed over the words
//! the lease is split into; and every call that took something was told
//! the log entries of the lease it took from (so that its settlement
//! refunds the right entry), never a later lease's.
#![cfg(loom)]
#![allow(dead_code, unreachable_pub)]

#[path = "../src/ratelimit/lease.rs"]
mod lease;
#[path = "../src/util/sync.rs"]
mod sync;

use lease::{Grant, Lease, Left};
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Lease `n`: its entries are `10 * n` and `10 * n + 1`, it ends at
/// `100 * n`.
fn grant(n: u64, requests: u64, tokens: u64) -> Grant {
    Grant {
        end: 100 * n,
        req_seq: 10 * n,
        tok_seq: 10 * n + 1,
        requests,
        tokens,
    }
}

/// Which lease a call's entries belong to (both from the same one).
fn lease_of(seqs: (u64, u64)) -> u64 {
    assert_eq!(seqs.1, seqs.0 + 1, "entries of two leases: {seqs:?}");
    seqs.0 / 10
}

#[test]
fn concurrent_takes_never_exceed_the_grant() {
    model(|| {
        let lease = Arc::new(Lease::new(1));
        lease.open(1, &grant(1, 1, 10), 0);
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let lease = Arc::clone(&lease);
                thread::spawn(move || lease.take(50, 1, 4))
            })
            .collect();
        let got: Vec<_> = takers.into_iter().map(|t| t.join().unwrap()).collect();
        let taken = got.iter().filter(|g| g.is_some()).count();
        assert_eq!(taken, 1, "one request granted, {got:?}");
        assert_eq!(
            lease.close(),
            Some(Left {
                requests: 0,
                tokens: 6
            })
        );
    });
}

#[test]
fn a_close_racing_takes_accounts_for_each_exactly_once() {
    model(|| {
        let lease = Lease::new(1);
        race_a_close(lease, |lease, i| lease.take(50, 1, 10 + i as u64));
    });
}

/// Two threads take (thread `i` takes 1 request and `10 + i` tokens with
/// `take`) while the locked side closes lease 1 and opens lease 2 (each of
/// 5 requests and 100 tokens, split as the lease splits them): each close
/// reports exactly what is left, and a call's entries are those of the
/// lease it took from.
fn race_a_close(lease: Lease, take: fn(&Lease, usize) -> Option<(u64, u64)>) {
    let lease = Arc::new(lease);
    lease.open(1, &grant(1, 5, 100), 10);
    let takers: Vec<_> = (0..2)
        .map(|i| {
            let lease = Arc::clone(&lease);
            thread::spawn(move || (take(&lease, i), 10 + i as u64))
        })
        .collect();
    // The locked side: close lease 1, then open lease 2 with its own end
    // and entries.
    let left1 = lease.close().expect("lease 1 was open");
    lease.open(2, &grant(2, 5, 100), 10);
    let results: Vec<_> = takers.into_iter().map(|t| t.join().unwrap()).collect();
    let left2 = lease.close().expect("lease 2 was open");
    let mut used = [(0u64, 0u64); 3];
    for (got, tokens) in results {
        if let Some(seqs) = got {
            let n = lease_of(seqs) as usize;
            used[n].0 += 1;
            used[n].1 += tokens;
        }
    }
    assert_eq!(
        (5 - left1.requests, 100 - left1.tokens),
        used[1],
        "lease 1's close"
    );
    assert_eq!(
        (5 - left2.requests, 100 - left2.tokens),
        used[2],
        "lease 2's close"
    );
}

#[test]
fn a_call_past_the_end_takes_nothing_from_any_lease() {
    model(|| {
        let lease = Arc::new(Lease::new(1));
        lease.open(1, &grant(1, 5, 100), 0);
        let taker = {
            let lease = Arc::clone(&lease);
            // At 150: past lease 1's end (100), before lease 2's (200).
            thread::spawn(move || lease.take(150, 1, 1))
        };
        let left1 = lease.close().expect("open");
        lease.open(2, &grant(2, 5, 100), 0);
        let got = taker.join().unwrap();
        assert_eq!(left1.requests, 5, "nothing taken from lease 1 at 150");
        if let Some(seqs) = got {
            assert_eq!(lease_of(seqs), 2);
            assert_eq!(lease.close().unwrap().requests, 4);
        }
    });
}

/// The same on two words of a split lease (3 + 2 requests, 50 + 50
/// tokens), one thread on each: each close sums both words exactly.
#[test]
fn takes_on_two_words_racing_a_close_account_for_each_exactly_once() {
    model(|| {
        let lease = Lease::new(2);
        lease.split();
        race_a_close(lease, |lease, i| {
            lease.take_split(move || i, 50, 1, 10 + i as u64)
        });
    });
}
