//! Retry budget: retries stay a bounded fraction of requests.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::budget::RetryBudget;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_resilience::ConfigError> {
//! let budget = RetryBudget::builder()
//!     .ttl(Duration::from_secs(10))
//!     .min_per_sec(0)
//!     .ratio(0.2)
//!     .build()?;
//! for _ in 0..10 {
//!     budget.deposit(); // one per logical request
//! }
//! assert!(budget.try_withdraw()); // one per retry: 10 × 0.2 = 2 retries
//! assert!(budget.try_withdraw());
//! assert!(!budget.try_withdraw());
//! # Ok(()) }
//! ```
//!
//! # Semantics (Finagle's `RetryBudget`)
//!
//! Every logical request deposits once ([`RetryBudget::deposit`]), never once
//! per attempt; every retry withdraws once ([`RetryBudget::try_withdraw`]). A
//! retry is allowed while
//!
//! ```text
//! deposits_in_window · ratio + min_per_sec · ttl − withdrawals_in_window ≥ 1
//! ```
//!
//! over a sliding window of `ttl`, kept as ten buckets of `ttl / 10`. In
//! steady state retries stay under `ratio` of requests plus `min_per_sec`.
//! The ratio is applied exactly: tower's `TpsBudget`, a port of the same
//! rule, truncates `1 / ratio` to an integer, so a ratio of 0.6 allows 100 %.
//!
//! # Cost, and how deposits are dated
//!
//! A deposit is on every request's path, so it does not read the clock: it
//! is dated to the last time the budget did read it (the earliest its request
//! can have been made) and added to that bucket with one atomic operation.
//! The budget reads the clock when a withdrawal or a balance query needs
//! "now", and whenever a bucket's deposits reach a multiple of
//! [`CLOCK_READ_EVERY`], so under traffic the date is at most that many
//! deposits old. Dating a deposit early only makes it leave the window
//! sooner, so the budget is never more permissive than Finagle's rule with
//! exact timestamps (a property test holds it to that); at a few requests
//! per second deposits are counted short, where the `min_per_sec` reserve
//! dominates anyway.
//!
//! # Why budgets and not only max attempts
//!
//! `max_attempts` bounds one request; under an outage every request retries
//! that many times and the upstream sees `max_attempts ×` its normal load
//! exactly when it can least take it. A budget bounds retries across all
//! requests, so a retry storm cannot start.
//!
//! # Clone
//!
//! Clones share one budget (it lives in an `Arc`). The counters are atomics:
//! no lock is taken, on any path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ConfigError;

const BUCKETS: u64 = 10;
/// Deposits in a bucket between two reads of the clock; see the
/// [module docs](self).
pub const CLOCK_READ_EVERY: u64 = 16;
const COUNT_MASK: u64 = u32::MAX as u64;

/// A retry budget shared by every clone; see the [module docs](self).
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    ratio: f64,
    reserve: f64,
    bucket_ms: u64,
    start: Instant,
    // The epoch the clock was last read at; deposits are dated to it.
    seen_epoch: AtomicU64,
    deposits: [AtomicU64; BUCKETS as usize],
    withdrawals: [AtomicU64; BUCKETS as usize],
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.inner.ratio)
            .field("reserve", &self.inner.reserve)
            .field("balance", &self.balance())
            .finish()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudgetBuilder::default()
            .build()
            .expect("the defaults are valid")
    }
}

/// Builds a validated [`RetryBudget`]. Defaults: ttl 10 s, 10 retries per
/// second in reserve, ratio 0.2 (Finagle's defaults).
#[derive(Clone, Copy, Debug)]
pub struct RetryBudgetBuilder {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
}

impl Default for RetryBudgetBuilder {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            ratio: 0.2,
        }
    }
}

impl RetryBudgetBuilder {
    /// How long a deposit counts. 1 s to 60 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Retries per second allowed whatever the traffic, so that a service
    /// with little traffic can still retry.
    pub fn min_per_sec(mut self, n: u32) -> Self {
        self.min_per_sec = n;
        self
    }

    /// Retries allowed per request deposited: 0.2 allows one retry per five
    /// requests. Finite, 0 to 1000.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Checks the values and creates the budget.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(60) {
            return Err(ConfigError::new("ttl", "must be between 1 s and 60 s"));
        }
        if !self.ratio.is_finite() || !(0.0..=1000.0).contains(&self.ratio) {
            return Err(ConfigError::new("ratio", "must be finite, from 0 to 1000"));
        }
        let bucket_ms = (self.ttl.as_millis() as u64 / BUCKETS).max(1);
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                ratio: self.ratio,
                reserve: f64::from(self.min_per_sec) * (bucket_ms * BUCKETS) as f64 / 1000.0,
                bucket_ms,
                start: Instant::now(),
                seen_epoch: AtomicU64::new(0),
                deposits: Default::default(),
                withdrawals: Default::default(),
            }),
        })
    }
}

/// Adds `n` to the packed (epoch, count) cell for `epoch`, starting the cell
/// anew when it holds an older epoch. Saturates. Returns the cell's count
/// after the add, or `None` when the cell already holds a newer epoch (then
/// `epoch` has left the window and the add is dropped).
fn add(cell: &AtomicU64, epoch: u64, n: u64) -> Option<u64> {
    let tag = epoch << 32;
    let n = n.min(COUNT_MASK);
    let mut cur = cell.load(Ordering::Relaxed);
    loop {
        let held = cur >> 32;
        let next = if held == epoch {
            tag | ((cur & COUNT_MASK) + n).min(COUNT_MASK)
        } else if held.wrapping_sub(epoch) & COUNT_MASK < COUNT_MASK / 2 {
            return None; // newer
        } else {
            tag | n
        };
        match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Some(next & COUNT_MASK),
            Err(actual) => cur = actual,
        }
    }
}

/// Takes one back from the cell if it still holds `epoch`.
fn sub(cell: &AtomicU64, epoch: u64) {
    let tag = epoch << 32;
    let mut cur = cell.load(Ordering::Relaxed);
    while cur & !COUNT_MASK == tag && cur & COUNT_MASK > 0 {
        match cell.compare_exchange_weak(cur, cur - 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

fn sum(cells: &[AtomicU64], epoch: u64) -> u64 {
    cells
        .iter()
        .map(|c| c.load(Ordering::Acquire))
        .filter(|v| (epoch.wrapping_sub(v >> 32) & COUNT_MASK) < BUCKETS)
        .map(|v| v & COUNT_MASK)
        .sum()
}

impl RetryBudget {
    /// A builder with Finagle's defaults.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder::default()
    }

    fn epoch(&self) -> u64 {
        let ms = self.inner.start.elapsed().as_millis() as u64;
        (ms / self.inner.bucket_ms) & COUNT_MASK
    }

    /// Records one logical request. Call it once per request, not per
    /// attempt. One atomic add; reads the clock once per
    /// [`CLOCK_READ_EVERY`] deposits.
    #[inline]
    pub fn deposit(&self) {
        self.deposit_at(self.mark(), 1);
    }

    /// The date the budget gives a deposit made now: the epoch of its last
    /// clock read. With [`deposit_at`](Self::deposit_at), a caller that
    /// batches deposits dates the whole batch to the mark taken at its
    /// first one, which is never later than any of them.
    #[inline]
    pub fn mark(&self) -> u64 {
        self.inner.seen_epoch.load(Ordering::Acquire)
    }

    /// Records `n` logical requests made at or after `mark` (from
    /// [`mark`](Self::mark)).
    pub fn deposit_at(&self, mark: u64, n: u64) {
        if n == 0 {
            return;
        }
        match add(&self.inner.deposits[(mark % BUCKETS) as usize], mark, n) {
            Some(after) if after / CLOCK_READ_EVERY == (after - n) / CLOCK_READ_EVERY => {}
            _ => {
                self.read_clock();
            }
        }
    }

    /// Reads the clock and moves the date of later deposits to now.
    fn read_clock(&self) -> u64 {
        let now = self.epoch();
        self.inner.seen_epoch.fetch_max(now, Ordering::AcqRel);
        now
    }

    /// Takes one retry from the budget if its balance allows it.
    ///
    /// Withdraws first and gives back when the balance went short, so
    /// concurrent callers can be refused together but never over-draw.
    pub fn try_withdraw(&self) -> bool {
        let e = self.read_clock();
        let cell = &self.inner.withdrawals[(e % BUCKETS) as usize];
        add(cell, e, 1);
        if self.balance_at(e) >= -1e-9 {
            true
        } else {
            sub(cell, e);
            false
        }
    }

    fn balance_at(&self, epoch: u64) -> f64 {
        let d = sum(&self.inner.deposits, epoch) as f64;
        let w = sum(&self.inner.withdrawals, epoch) as f64;
        d * self.inner.ratio + self.inner.reserve - w
    }

    /// Retries the budget would allow now: `deposits · ratio + reserve −
    /// withdrawals` over the current window.
    pub fn balance(&self) -> f64 {
        let e = self.read_clock();
        self.balance_at(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact_not_truncated() {
        // tower's TpsBudget truncates 1/0.6 to 1 and allows 100 %.
        let b = RetryBudget::builder()
            .min_per_sec(0)
            .ratio(0.6)
            .build()
            .unwrap();
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..200).filter(|_| b.try_withdraw()).count();
        assert_eq!(allowed, 60);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_ttl() {
        let b = RetryBudget::builder()
            .min_per_sec(0)
            .ratio(1.0)
            .build()
            .unwrap();
        for _ in 0..5 {
            b.deposit();
        }
        assert_eq!(b.balance(), 5.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.balance(), 0.0);
        assert!(!b.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_min_per_sec_times_ttl() {
        let b = RetryBudget::builder()
            .min_per_sec(2)
            .ratio(0.0)
            .build()
            .unwrap();
        let allowed = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(allowed, 20);
    }

    /// A refused withdrawal is given back: refusals never pile up as debt,
    /// so one more deposit (at ratio 1) pays for exactly one more retry.
    #[tokio::test(start_paused = true)]
    async fn refused_withdrawals_are_given_back() {
        let b = RetryBudget::builder()
            .min_per_sec(0)
            .ratio(1.0)
            .build()
            .unwrap();
        b.deposit();
        b.deposit();
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        for _ in 0..5 {
            assert!(!b.try_withdraw());
        }
        assert_eq!(b.balance(), 0.0);
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    /// A bucket whose slot comes round again (one ttl later) starts anew:
    /// the old epoch's count is not added to the new one's.
    #[tokio::test(start_paused = true)]
    async fn a_stale_bucket_starts_anew() {
        let b = RetryBudget::builder()
            .ttl(Duration::from_secs(10))
            .min_per_sec(0)
            .ratio(1.0)
            .build()
            .unwrap();
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        // Exactly one ttl later the same slot (epoch 10, slot 0) is reused.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.balance(), 0.0);
        b.deposit();
        b.deposit();
        assert_eq!(
            b.balance(),
            2.0,
            "the old 5 deposits and 1 withdrawal are gone"
        );
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    /// A deposit dated to an epoch whose slot already holds a newer epoch
    /// has left the window: it is dropped, never counted in the new epoch.
    #[tokio::test(start_paused = true)]
    async fn a_deposit_older_than_its_slot_is_dropped() {
        let b = RetryBudget::builder()
            .min_per_sec(0)
            .ratio(1.0)
            .build()
            .unwrap();
        let old = b.mark();
        tokio::time::advance(Duration::from_secs(10)).await;
        b.deposit_at(b.mark(), 0); // nothing
        assert_eq!(b.balance(), 0.0);
        b.deposit(); // slot 0 now holds epoch 10
        assert_eq!(b.balance(), 1.0);
        b.deposit_at(old, 3);
        assert_eq!(b.balance(), 1.0);
        // A deposit within the window (one bucket old) does count.
        let recent = b.mark();
        tokio::time::advance(Duration::from_secs(1)).await;
        b.deposit_at(recent, 3);
        assert_eq!(b.balance(), 4.0);
        // Nine buckets later it still counts; ten later it has left.
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(b.balance(), 4.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.balance(), 0.0);
    }

    /// Deposits read the clock once per `CLOCK_READ_EVERY` in a bucket: the
    /// mark moves on exactly at the multiple, not before.
    #[tokio::test(start_paused = true)]
    async fn deposits_read_the_clock_every_clock_read_every() {
        let b = RetryBudget::builder().build().unwrap();
        assert_eq!(b.mark(), 0);
        tokio::time::advance(Duration::from_secs(3)).await;
        for _ in 0..CLOCK_READ_EVERY - 1 {
            b.deposit();
        }
        assert_eq!(b.mark(), 0, "no clock read before the multiple");
        b.deposit();
        assert_eq!(b.mark(), 3, "the multiple reads the clock (1 s buckets)");
        // A batch that crosses a multiple reads it too.
        tokio::time::advance(Duration::from_secs(2)).await;
        b.deposit_at(b.mark(), 3);
        assert_eq!(b.mark(), 3);
        b.deposit_at(b.mark(), CLOCK_READ_EVERY);
        assert_eq!(b.mark(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn defaults_are_finagles_and_debug_shows_the_balance() {
        let b = RetryBudget::default();
        // 10 per second over 10 s in reserve, ratio 0.2.
        assert_eq!(b.balance(), 100.0);
        for _ in 0..10 {
            b.deposit();
        }
        assert!((b.balance() - 102.0).abs() < 1e-9);
        let text = format!("{b:?}");
        assert!(
            text.contains("ratio: 0.2") && text.contains("balance: 102"),
            "{text}"
        );
    }

    /// A cell counts its own epoch, starts anew on an older one, and drops
    /// an add dated before the epoch it holds: "newer" is less than half
    /// the 32-bit tag space ahead, so the order survives the tags' wrap.
    #[test]
    fn a_cell_starts_anew_on_older_epochs_and_drops_older_adds() {
        let half = COUNT_MASK / 2;
        for epoch in [7u64, COUNT_MASK - 1, COUNT_MASK] {
            let cell = |held: u64, n: u64| AtomicU64::new((held & COUNT_MASK) << 32 | n);
            let own = cell(epoch, 2);
            assert_eq!(add(&own, epoch, 3), Some(5));
            for ahead in [1, half - 1] {
                let newer = cell(epoch + ahead, 2);
                assert_eq!(add(&newer, epoch, 3), None, "{ahead} ahead");
                assert_eq!(newer.load(Ordering::Relaxed) & COUNT_MASK, 2);
            }
            for behind in [1, half + 2] {
                let older = cell(epoch.wrapping_sub(behind), 9);
                assert_eq!(add(&older, epoch, 3), Some(3), "{behind} behind");
            }
            // Half the tag space away counts as older.
            let far = cell(epoch + half, 9);
            assert_eq!(add(&far, epoch, 3), Some(3));
        }
    }

    /// Giving a withdrawal back never takes a cell below zero (a borrow
    /// would corrupt its epoch) and leaves a cell of another epoch alone.
    #[test]
    fn giving_back_stops_at_zero_and_at_another_epoch() {
        let empty = AtomicU64::new(5 << 32);
        sub(&empty, 5);
        assert_eq!(empty.load(Ordering::Relaxed), 5 << 32);
        let other = AtomicU64::new(6 << 32 | 2);
        sub(&other, 5);
        assert_eq!(other.load(Ordering::Relaxed), 6 << 32 | 2);
        let own = AtomicU64::new(5 << 32 | 2);
        sub(&own, 5);
        assert_eq!(own.load(Ordering::Relaxed), 5 << 32 | 1);
    }

    #[test]
    fn the_ranges_edges_are_allowed() {
        for ttl in [1, 60] {
            assert!(RetryBudget::builder()
                .ttl(Duration::from_secs(ttl))
                .build()
                .is_ok());
        }
        for ratio in [0.0, 1000.0] {
            assert!(RetryBudget::builder().ratio(ratio).build().is_ok());
        }
        assert_eq!(
            RetryBudget::builder()
                .ratio(1000.001)
                .build()
                .unwrap_err()
                .field,
            "ratio"
        );
    }

    #[test]
    fn bad_configuration_names_the_field() {
        assert_eq!(
            RetryBudget::builder()
                .ratio(-0.1)
                .build()
                .unwrap_err()
                .field,
            "ratio"
        );
        assert_eq!(
            RetryBudget::builder()
                .ratio(f64::INFINITY)
                .build()
                .unwrap_err()
                .field,
            "ratio"
        );
        assert_eq!(
            RetryBudget::builder()
                .ttl(Duration::from_millis(10))
                .build()
                .unwrap_err()
                .field,
            "ttl"
        );
        assert_eq!(
            RetryBudget::builder()
                .ttl(Duration::from_secs(61))
                .build()
                .unwrap_err()
                .field,
            "ttl"
        );
    }
}
