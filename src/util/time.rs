//! Advancing an `Instant` without overflow: every duration a builder
//! accepts (up to `Duration::MAX`) must work, so no layer writes
//! `Instant::now() + d`: a limit uses `checked_add` (too far to represent
//! is no limit), a sleep uses [`after`].

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

#[cfg(test)]
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
}
