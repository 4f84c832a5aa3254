//! Advancing an `Instant` without overflow: every duration a builder
//! accepts (up to `Duration::MAX`) must work, so no layer writes
//! `Instant::now() + d`: a limit uses `checked_add` (too far to represent
//! is no limit), a sleep uses [`after`].
//!
//! And one clock reading per poll of a whole pipeline: [`one_reading`]
//! runs one synchronous poll during which [`now`] reads the clock the
//! first time it is asked and gives that reading to every later asker.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: what tokio itself uses for "never" (`Instant::far_future`
/// is private). A timer this far away never fires in practice.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d`, saturating at about 30 years from `now` (a sleep that long
/// never ends in practice, and the timer's arithmetic stays in range).
#[inline]
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// Whether a poll shares one reading, and the reading once taken.
#[derive(Clone, Copy)]
enum Reading {
    /// No poll shares one: [`now`] reads the clock.
    Off,
    /// Shared, not yet read.
    Unread,
    /// Shared, read.
    Read(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Off) };
}

/// Runs `poll` (one synchronous poll of a whole stack, which never waits
/// inside) with one clock reading shared by every layer that asks [`now`]
/// during it: the first asker reads the clock, the others reuse its
/// reading, which is then behind the clock by the work done since inside
/// the same poll (as a thread preempted between reading the clock and using
/// it would be). Nothing is kept across polls: the next poll (after the
/// task waited) reads afresh. Nested, the outermost poll's reading is
/// shared.
#[inline]
pub(crate) fn one_reading<T>(poll: impl FnOnce() -> T) -> T {
    struct End;
    impl Drop for End {
        #[inline]
        fn drop(&mut self) {
            let _ = READING.try_with(|r| r.set(Reading::Off));
        }
    }
    let outermost = READING
        .try_with(|r| match r.get() {
            Reading::Off => {
                r.set(Reading::Unread);
                true
            }
            _ => false,
        })
        .unwrap_or(false);
    let _end = outermost.then(|| End);
    poll()
}

/// tokio's clock (paused time in tests): the reading shared by the
/// current [`one_reading`] poll, or a fresh one outside any.
#[inline]
pub(crate) fn now() -> Instant {
    // A `const` thread-local without a destructor: always accessible.
    READING.with(|r| match r.get() {
        Reading::Read(at) => at,
        Reading::Unread => {
            let at = Instant::now();
            r.set(Reading::Read(at));
            at
        }
        Reading::Off => Instant::now(),
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn never_overflows() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FAR);
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_reading_per_poll_fresh_outside() {
        let outside = now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (a, b, inner) = one_reading(|| {
            let a = now();
            let inner = one_reading(now);
            (a, now(), inner)
        });
        assert_eq!(a, b, "shared within the poll");
        assert_eq!(a, inner, "a nested poll shares the outer reading");
        assert_eq!(a, outside + Duration::from_secs(1), "read afresh");
        tokio::time::advance(Duration::from_secs(1)).await;
        let next = one_reading(now);
        assert_eq!(
            next,
            a + Duration::from_secs(1),
            "the next poll reads afresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_poll_sees_the_time_that_passed() {
        let first = one_reading(now);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(one_reading(now), first + Duration::from_secs(3));
        assert_eq!(now(), first + Duration::from_secs(3));
    }
}
