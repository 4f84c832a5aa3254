//! One limited dimension (requests or tokens): a GCRA bucket for the pace
//! and the burst, and a coarse sliding log that makes the window exact.
//!
//! Pure arithmetic on nanosecond timestamps (counted from the layer's
//! origin), driven by the caller's clock: no time is read here.

use std::collections::VecDeque;

/// Fixed-point shift of the per-unit interval (nanoseconds × 2^20), so a
/// cost's duration is a multiplication and a shift, never a division.
const FP: u32 = 20;

/// Entries of the sliding log per window: its granularity is window / 128.
pub(crate) const LOG_SLOTS: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// The first and last admission merged into this entry.
    first: u64,
    last: u64,
    cost: u64,
}

/// One dimension's state.
#[derive(Debug)]
pub(crate) struct Dimension {
    /// The configured limit per window, and the burst (bucket depth).
    limit: u64,
    burst: u64,
    window: u64,
    granularity: u64,
    /// The limit in force: the configured one, or less when the server said so.
    eff_limit: u64,
    eff_burst: u64,
    /// Nanoseconds per unit × 2^FP, rounded up (never faster than the limit).
    interval_fp: u128,
    burst_time: u64,
    /// GCRA: the theoretical arrival time; the bucket is full when `tat <= now`.
    tat: u64,
    log: VecDeque<Entry>,
    /// The sequence number of `log[0]`.
    head_seq: u64,
    total: u64,
}

fn interval_fp(window: u64, limit: u64) -> u128 {
    (u128::from(window) << FP).div_ceil(u128::from(limit))
}

impl Dimension {
    /// `limit` units per `window` ns, `burst` at once (both at least 1,
    /// `burst <= limit`, checked by the builder).
    pub(crate) fn new(limit: u64, burst: u64, window: u64) -> Self {
        let mut d = Self {
            limit,
            burst,
            window,
            granularity: (window / LOG_SLOTS).max(1),
            eff_limit: limit,
            eff_burst: burst,
            interval_fp: 0,
            burst_time: 0,
            tat: 0,
            log: VecDeque::with_capacity(LOG_SLOTS as usize + 2),
            head_seq: 0,
            total: 0,
        };
        d.set_effective(limit);
        d
    }

    fn set_effective(&mut self, limit: u64) {
        self.eff_limit = limit;
        self.eff_burst = self.burst.min(limit);
        self.interval_fp = interval_fp(self.window, limit);
        self.burst_time = self.time_for(self.eff_burst);
    }

    /// Nanoseconds for `cost` units at the effective pace, rounded up.
    #[inline]
    fn time_for(&self, cost: u64) -> u64 {
        let t = (u128::from(cost) * self.interval_fp + (1u128 << FP) - 1) >> FP;
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// The limit in force.
    pub(crate) fn effective_limit(&self) -> u64 {
        self.eff_limit
    }

    /// Drops the log entries whose window has passed at `now`.
    #[inline]
    fn expire(&mut self, now: u64) {
        while let Some(e) = self.log.front() {
            if e.last.saturating_add(self.window) > now {
                break;
            }
            self.total -= e.cost;
            self.log.pop_front();
            self.head_seq += 1;
        }
    }

    /// Whether `cost` can be admitted at `now`.
    #[inline]
    pub(crate) fn fits(&mut self, cost: u64, now: u64) -> bool {
        if cost == 0 {
            return true;
        }
        self.expire(now);
        if self.total + cost > self.eff_limit {
            return false;
        }
        let need = self.time_for(cost);
        if cost > self.eff_burst {
            // Larger than the bucket: only from a full bucket.
            self.tat <= now
        } else {
            self.tat.max(now).saturating_add(need) - now <= self.burst_time
        }
    }

    /// The earliest time at or after `now` when `cost` fits, with nothing
    /// else admitted before; `None` if it never fits (above the limit).
    pub(crate) fn earliest(&mut self, cost: u64, now: u64) -> Option<u64> {
        if cost == 0 {
            return Some(now);
        }
        if cost > self.eff_limit {
            return None;
        }
        self.expire(now);
        let bucket = if cost > self.eff_burst {
            self.tat
        } else {
            (self.tat.saturating_add(self.time_for(cost))).saturating_sub(self.burst_time)
        };
        let mut log = now;
        let over = (self.total + cost).saturating_sub(self.eff_limit);
        if over > 0 {
            let mut freed = 0;
            for e in &self.log {
                freed += e.cost;
                if freed >= over {
                    log = e.last.saturating_add(self.window);
                    break;
                }
            }
        }
        Some(now.max(bucket).max(log))
    }

    /// Charges `cost` at `now` (after [`fits`](Self::fits)); returns the log
    /// entry's sequence number, for a later refund.
    #[inline]
    pub(crate) fn admit(&mut self, cost: u64, now: u64) -> u64 {
        if cost == 0 {
            return u64::MAX;
        }
        self.tat = self.tat.max(now).saturating_add(self.time_for(cost));
        self.book(cost, now)
    }

    fn book(&mut self, cost: u64, now: u64) -> u64 {
        self.total += cost;
        if let Some(back) = self.log.back_mut() {
            if now.saturating_sub(back.first) < self.granularity {
                back.cost += cost;
                back.last = back.last.max(now);
                return self.head_seq + self.log.len() as u64 - 1;
            }
        }
        self.log.push_back(Entry {
            first: now,
            last: now,
            cost,
        });
        self.head_seq + self.log.len() as u64 - 1
    }

    /// Units that calls could take at once at `now`, and at any later
    /// instant (the bucket only refills and the log only empties), with
    /// nothing else admitted meanwhile: at most the burst.
    pub(crate) fn allowance(&mut self, now: u64) -> u64 {
        self.expire(now);
        let log_left = self.eff_limit.saturating_sub(self.total);
        let room = self.burst_time.saturating_sub(self.tat.saturating_sub(now));
        // The most units whose `time_for` fits in `room`.
        let bucket = (u128::from(room) << FP) / self.interval_fp.max(1);
        let bucket = u64::try_from(bucket).unwrap_or(u64::MAX);
        log_left.min(bucket).min(self.eff_burst)
    }

    /// The log entry that a lease opened at `now` books into, and the end
    /// of the lease (the entry covers at most one granularity).
    pub(crate) fn lease_entry(&mut self, now: u64) -> (u64, u64) {
        let seq = self.book(0, now);
        let first = self.log.back().map_or(now, |e| e.first);
        (seq, first.saturating_add(self.granularity))
    }

    /// Books what calls took from a lease that booked into `seq`, taken
    /// at or before `at`: the log entry lasts until `at`, and the bucket is
    /// charged as if they all came at `at` (never less than the GCRA would
    /// charge; exactly as much when the bucket was not full since the lease
    /// opened).
    pub(crate) fn fold(&mut self, seq: u64, used: u64, at: u64) {
        if used == 0 {
            return;
        }
        self.tat = self.tat.max(at).saturating_add(self.time_for(used));
        match seq
            .checked_sub(self.head_seq)
            .and_then(|i| self.log.get_mut(i as usize))
        {
            Some(e) => {
                e.cost += used;
                e.last = e.last.max(at);
                self.total += used;
            }
            // The entry is booked when the lease opens and nothing expires
            // while it is open; should it be gone, book anew.
            None => {
                self.book(used, at);
            }
        }
    }

    /// Gives back `amount` of a charge booked as `seq`: the bucket gets the
    /// time back (never beyond full), and the log entry, if still in its
    /// window, forgets that much.
    pub(crate) fn refund(&mut self, seq: u64, amount: u64, now: u64) {
        if amount == 0 || seq == u64::MAX {
            return;
        }
        self.tat = self.tat.saturating_sub(self.time_for(amount)).max(now);
        if let Some(i) = seq.checked_sub(self.head_seq) {
            if let Some(e) = self.log.get_mut(i as usize) {
                let take = amount.min(e.cost);
                e.cost -= take;
                self.total -= take;
            }
        }
    }

    /// Charges `amount` more than was estimated, at `now` (the call used it
    /// already: it is booked even past the limit, and later calls wait until
    /// it has left the window).
    pub(crate) fn overrun(&mut self, amount: u64, now: u64) {
        if amount == 0 {
            return;
        }
        self.tat = self.tat.max(now).saturating_add(self.time_for(amount));
        self.expire(now);
        self.book(amount, now);
    }

    /// What the server said: its limit for this dimension (scaled to our
    /// window) and what is left. Lowers the pace and the bucket; never raises
    /// either above the configuration. Returns whether anything was lowered.
    pub(crate) fn steer(&mut self, limit: Option<u64>, remaining: Option<u64>, now: u64) -> bool {
        let mut lowered = false;
        if let Some(server) = limit {
            let eff = server.clamp(1, self.limit);
            if eff != self.eff_limit {
                lowered = eff < self.eff_limit;
                self.set_effective(eff);
            }
        }
        if let Some(left) = remaining {
            if left < self.eff_burst {
                // Level = burst - (tat - now) / interval: at most `left`.
                let floor = now.saturating_add(self.time_for(self.eff_burst - left));
                if floor > self.tat {
                    self.tat = floor;
                    lowered = true;
                }
            }
        }
        lowered
    }

    /// Takes the whole burst away (a 429 without a hint: the server says the
    /// budget is spent).
    pub(crate) fn drain(&mut self, now: u64) {
        self.tat = self.tat.max(now.saturating_add(self.burst_time));
    }

    /// Units that could be admitted at once at `now`.
    pub(crate) fn remaining(&mut self, now: u64) -> u64 {
        self.expire(now);
        let log_left = self.eff_limit.saturating_sub(self.total);
        let debt = self.tat.saturating_sub(now);
        let used = (u128::from(debt) << FP).div_ceil(self.interval_fp.max(1));
        let bucket_left = u128::from(self.eff_burst).saturating_sub(used) as u64;
        log_left.min(bucket_left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_pace() {
        let mut d = Dimension::new(60, 3, 60 * S);
        for _ in 0..3 {
            assert!(d.fits(1, 0));
            d.admit(1, 0);
        }
        assert!(!d.fits(1, 0));
        assert_eq!(d.earliest(1, 0), Some(S));
        assert!(d.fits(1, S));
    }

    #[test]
    fn the_log_holds_the_window_after_a_burst() {
        // 10 per 10 s with a burst of 5: 5 at once, 5 more paced, then
        // nothing until the burst leaves the window.
        let mut d = Dimension::new(10, 5, 10 * S);
        let mut t = 0;
        let mut admitted = Vec::new();
        while admitted.len() < 15 {
            let at = d.earliest(1, t).unwrap();
            assert!(d.fits(1, at));
            d.admit(1, at);
            admitted.push(at);
            t = at;
        }
        for (i, &a) in admitted.iter().enumerate() {
            let in_window = admitted[..=i].iter().filter(|&&b| b + 10 * S > a).count();
            assert!(in_window <= 10, "{admitted:?}");
        }
        assert!(admitted[10] >= 10 * S, "{admitted:?}");
    }

    #[test]
    fn too_large_never_fits_and_large_needs_a_full_bucket() {
        let mut d = Dimension::new(100, 10, S);
        assert_eq!(d.earliest(101, 0), None);
        assert!(d.fits(50, 0));
        d.admit(50, 0);
        assert!(!d.fits(50, 0));
    }

    #[test]
    fn refund_and_steer() {
        let mut d = Dimension::new(100, 100, S);
        let seq = d.admit(100, 0);
        assert!(!d.fits(1, 0));
        d.refund(seq, 40, 0);
        assert_eq!(d.remaining(0), 40);
        assert!(d.steer(Some(50), Some(10), 0));
        assert_eq!(d.effective_limit(), 50);
        assert!(d.remaining(0) <= 10);
        // Never above the configuration.
        d.steer(Some(1_000), None, 0);
        assert_eq!(d.effective_limit(), 100);
    }

    proptest! {
        /// Whatever the arrivals, costs and refunds, no window of the
        /// configured length ever holds more than the limit of admitted
        /// (net of refunds made before) cost, and `earliest` agrees with
        /// `fits`.
        #[test]
        fn never_more_than_the_limit_in_any_window(
            limit in 1u64..500,
            burst_pct in 1u64..=100,
            steps in prop::collection::vec((0u64..2_000_000_000, 0u64..120, 0u64..100), 1..300),
        ) {
            let window = 10 * S;
            let burst = (limit * burst_pct / 100).max(1);
            let mut d = Dimension::new(limit, burst, window);
            let mut now = 0;
            // (time, cost now attributed)
            let mut hist: Vec<(u64, u64)> = Vec::new();
            for (gap, cost, refund_pct) in steps {
                now += gap;
                let cost = cost.min(limit);
                let e = d.earliest(cost, now).unwrap();
                prop_assert!(e >= now);
                if e > now && cost > 0 {
                    prop_assert!(!d.fits(cost, now));
                }
                prop_assert!(d.fits(cost, e));
                let seq = d.admit(cost, e);
                now = e;
                let sum: u64 = hist.iter().filter(|(t, _)| t + window > now).map(|(_, c)| c).sum();
                prop_assert!(sum + cost <= limit, "window holds {} + {}", sum, cost);
                let r = cost * refund_pct / 100;
                d.refund(seq, r, now);
                hist.push((now, cost - r));
            }
        }

        /// The lock-free path's arithmetic, mixed with calls admitted under
        /// the lock: a lease granted with `allowance` and taken from in two
        /// parts at any instants before its end, then folded at a later
        /// close, never lets a window hold more than the limit.
        #[test]
        fn leases_never_break_the_window(
            limit in 1u64..500,
            burst_pct in 1u64..=100,
            steps in prop::collection::vec(
                (0u64..2_000_000_000, 0u64..120, any::<bool>(), 0u64..1_000, 0u64..1_000),
                1..300,
            ),
        ) {
            let window = 10 * S;
            let burst = (limit * burst_pct / 100).max(1);
            let mut d = Dimension::new(limit, burst, window);
            let mut now = 0;
            let mut hist: Vec<(u64, u64)> = Vec::new();
            let in_window = |hist: &[(u64, u64)], t: u64| -> u64 {
                hist.iter().filter(|(a, _)| a + window > t).map(|(_, c)| c).sum()
            };
            for (gap, cost, lease, p1, p2) in steps {
                now += gap;
                if lease {
                    let allowed = d.allowance(now);
                    prop_assert!(allowed <= burst);
                    if allowed == 0 {
                        continue;
                    }
                    let (seq, end) = d.lease_entry(now);
                    prop_assert!(end > now && end - now <= window / LOG_SLOTS);
                    let used = cost.min(allowed);
                    let span = end - now;
                    let t1 = now + span * p1 / 1_000;
                    let t2 = t1 + (end - 1 - t1) * p2 / 1_000;
                    for (t, part) in [(t1, used / 2), (t2, used - used / 2)] {
                        prop_assert!(in_window(&hist, t) + part <= limit);
                        hist.push((t, part));
                    }
                    // Closed at or after the last take; folded at most at
                    // the end.
                    let close = t2 + gap / 4;
                    d.fold(seq, used, close.min(end - 1));
                    now = close;
                } else {
                    let cost = cost.min(limit);
                    let e = d.earliest(cost, now).unwrap();
                    prop_assert!(d.fits(cost, e));
                    d.admit(cost, e);
                    now = e;
                    prop_assert!(in_window(&hist, now) + cost <= limit);
                    hist.push((now, cost));
                }
            }
        }
    }
}
