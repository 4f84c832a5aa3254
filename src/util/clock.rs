//! The clock of the per-call paths: the rate limiter's lease and the
//! breaker's time window read it on every call.
//!
//! On Linux it is `CLOCK_MONOTONIC_COARSE`, the monotonic clock as of the
//! kernel's last tick: the same timeline as `Instant::now` (which is
//! `CLOCK_MONOTONIC`), read without asking the clock hardware: about 10 ns
//! instead of 20 to 45 ns on the machines that run this crate's benchmarks
//! (their floor prints both). It is never ahead of the true time, and is
//! behind it by up to about two kernel ticks (`clock_getres` gives the
//! tick: 1 to 10 ms, 4 ms at the common 250 Hz; `cargo test --lib
//! util::clock -- --nocapture` prints the lag seen on the machine at hand:
//! 3.9 to 5.0 ms on average and 6.5 to 7.4 ms at most over runs on this
//! project's 250 Hz development VM). [`lag`] is taken as two ticks. A
//! reading further behind than that (a stalled virtual CPU) is like a
//! precise reading taken just before a preemption: what it decides is
//! decided as of its time. Elsewhere it is `Instant::now`, exact.
//!
//! With the `test-util` feature it is tokio's clock (as every other
//! reading in the crate is), which follows a paused clock in tests
//! exactly, and inside an agent pipeline's poll it is the reading the
//! layers share ([`super::time::now`]).
//!
//! An [`Origin`] is an instant on tokio's clock and the same instant on the
//! coarse clock's timeline, so that a cheap reading can be taken as the
//! time since that instant.

use std::time::Duration;

use tokio::time::Instant;

/// An instant from which the per-call paths measure time (see the module's
/// docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Origin {
    at: Instant,
    /// `at` on the per-call clock's own timeline, in nanoseconds.
    raw: u64,
    /// [`lag`] in nanoseconds.
    lag: u64,
}

impl Origin {
    /// The origin `at`, an instant at or before now on tokio's clock.
    pub(crate) fn new(at: Instant) -> Self {
        Self {
            at,
            raw: imp::origin(at),
            lag: nanos(lag()),
        }
    }

    /// The origin on tokio's clock.
    #[inline]
    pub(crate) fn instant(&self) -> Instant {
        self.at
    }

    /// Nanoseconds from the origin to `at` (0 before it).
    #[inline]
    pub(crate) fn nanos_at(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.at))
    }

    /// Nanoseconds since the origin, read cheaply: behind the true time by
    /// up to [`lag`].
    #[inline]
    pub(crate) fn elapsed_nanos(&self) -> u64 {
        imp::since(self.raw, self.at)
    }

    /// Nanoseconds since the origin, never behind the true time while the
    /// coarse clock lags by no more than [`lag`] (ahead of it by up to
    /// that much): what a deadline that must not be overrun is checked
    /// against.
    #[inline]
    pub(crate) fn elapsed_nanos_late(&self) -> u64 {
        self.elapsed_nanos().saturating_add(self.lag)
    }

    /// Milliseconds since the origin, read cheaply (see
    /// [`elapsed_nanos`](Self::elapsed_nanos)).
    #[inline]
    pub(crate) fn elapsed_millis(&self) -> u64 {
        self.elapsed_nanos() / 1_000_000
    }
}

/// How far behind the true time a cheap reading is taken to be: two ticks
/// of the coarse clock on Linux (without `test-util`), zero elsewhere.
pub(crate) fn lag() -> Duration {
    imp::lag()
}

/// A duration in nanoseconds, saturating (at about 584 years).
#[inline]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// Linux, without `test-util`: the kernel's coarse clock.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(feature = "test-util")
))]
mod imp {
    use std::sync::OnceLock;
    use std::time::Duration;

    use rustix::time::{clock_getres, clock_gettime, ClockId, Timespec};
    use tokio::time::Instant;

    #[inline]
    fn nanos(t: Timespec) -> u64 {
        // A monotonic reading: seconds since boot, never negative, so
        // neither cast changes the value nor the product overflows.
        (t.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(t.tv_nsec as u64)
    }

    /// `at` on the coarse clock's timeline (`CLOCK_MONOTONIC`'s, which
    /// `Instant::now` reads). The precise reading is taken first: mapped
    /// back to `at`, it is then at or before `at`'s true position, so a
    /// reading measured from it is never short of the true time since `at`
    /// by more than the coarse clock's own lag.
    pub(super) fn origin(at: Instant) -> u64 {
        let raw = nanos(clock_gettime(ClockId::Monotonic));
        raw.saturating_sub(super::nanos(Instant::now().saturating_duration_since(at)))
    }

    /// `CLOCK_MONOTONIC_COARSE` since `raw`.
    #[inline]
    pub(super) fn since(raw: u64, _at: Instant) -> u64 {
        nanos(clock_gettime(ClockId::MonotonicCoarse)).saturating_sub(raw)
    }

    /// Two ticks of the coarse clock, the tick read once per process. A
    /// kernel that reports no resolution (or one above 10 ms, the tick of
    /// the slowest common setting, 100 Hz) is taken as 10 ms.
    pub(super) fn lag() -> Duration {
        static TICK: OnceLock<Duration> = OnceLock::new();
        let tick = *TICK.get_or_init(|| {
            let res = nanos(clock_getres(ClockId::MonotonicCoarse));
            let res = if res == 0 || res > 10_000_000 {
                10_000_000
            } else {
                res
            };
            Duration::from_nanos(res)
        });
        tick * 2
    }
}

/// With `test-util`, or off Linux: tokio's clock (inside an agent
/// pipeline's poll, the reading its layers share).
#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    not(feature = "test-util")
)))]
mod imp {
    use std::time::Duration;

    use tokio::time::Instant;

    pub(super) fn origin(_at: Instant) -> u64 {
        0
    }

    #[inline]
    pub(super) fn since(_raw: u64, at: Instant) -> u64 {
        super::nanos(super::super::time::now().saturating_duration_since(at))
    }

    pub(super) fn lag() -> Duration {
        Duration::ZERO
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A cheap reading is never ahead of the true time and never goes
    /// back; the late one is the cheap one plus the lag. (How far behind a
    /// reading is depends on the machine's load: not asserted.)
    #[test]
    fn readings_are_never_ahead_and_never_go_back() {
        let origin = Origin::new(Instant::now());
        assert!(lag() <= Duration::from_millis(20));
        let mut last = 0;
        let (mut behind, mut sum) = (0, 0);
        for _ in 0..100_000 {
            let cheap = origin.elapsed_nanos();
            let late = origin.elapsed_nanos_late();
            let after = origin.nanos_at(Instant::now());
            assert!(cheap <= after, "ahead: {cheap} > {after}");
            assert!(cheap >= last, "went back: {cheap} < {last}");
            assert!(late >= cheap + nanos(lag()), "the lag not added");
            behind = behind.max(after - cheap);
            sum += after - cheap;
            last = cheap;
        }
        // `cargo test --lib util::clock -- --nocapture` (no `test-util`):
        // how far behind the coarse clock is on this machine.
        println!(
            "lag {:?}; behind the precise clock by {} ns on average, {behind} ns at most",
            lag(),
            sum / 100_000
        );
    }

    /// An origin in the past: readings count from it, not from the moment
    /// the origin was made.
    #[test]
    fn an_origin_in_the_past_counts_from_itself() {
        let Some(at) = Instant::now().checked_sub(Duration::from_secs(10)) else {
            return; // A machine up for less than 10 s.
        };
        let origin = Origin::new(at);
        let cheap = origin.elapsed_nanos();
        assert!(cheap <= origin.nanos_at(Instant::now()));
        assert!(cheap >= 9_000_000_000, "{cheap}");
        assert_eq!(origin.instant(), at);
    }

    #[tokio::test(start_paused = true)]
    #[cfg(feature = "test-util")]
    async fn follows_a_paused_clock_exactly() {
        let origin = Origin::new(Instant::now());
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(origin.elapsed_nanos(), 1_500_000_000);
        assert_eq!(origin.elapsed_millis(), 1_500);
        assert_eq!(origin.elapsed_nanos_late(), 1_500_000_000);
    }
}
