//! Backoff: a plain iterator of delays, exponential with jitter.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::builder()
//!     .initial(Duration::from_millis(500))
//!     .multiplier(2.0)
//!     .max_delay(Duration::from_secs(8))
//!     .jitter(Jitter::None)
//!     .build()?;
//! let delays: Vec<_> = backoff.iter(42).take(5).collect();
//! assert_eq!(delays, [500, 1000, 2000, 4000, 8000].map(Duration::from_millis));
//! # Ok::<(), llm_resilience::ConfigError>(())
//! ```
//!
//! # The arithmetic
//!
//! For retry `n` (0 for the first retry) the base delay is
//! `d(n) = min(initial · multiplier^n, max_delay)`: the cap is applied before
//! jitter, so no delay ever exceeds `max_delay`. Then:
//!
//! | [`Jitter`] | delay | bounds |
//! |---|---|---|
//! | `None` | `d(n)` | exactly `d(n)` |
//! | `Full` | `U[0, d(n))` | `[0, d(n)]` |
//! | `Equal` | `d(n)/2 + U[0, d(n)/2)` | `[d(n)/2, d(n)]` |
//! | `Decorrelated` | `min(max_delay, U[initial, 3 · prev))` | `[initial, max_delay]` |
//!
//! [`Backoff::bounds`] returns these bounds; a property test holds every mode
//! and seed to them.
//!
//! # Defaults for LLM APIs
//!
//! [`Backoff::llm_defaults`] follows the OpenAI and Anthropic SDKs: 500 ms
//! doubling to a cap of 8 s, with equal jitter (the SDKs shorten each delay by
//! up to 25 %; equal jitter spreads callers further while keeping at least
//! half the delay). [`Backoff::llm_throttling`] is for 429 and 529 without a
//! server hint: full jitter on per-minute limits collapses to near-zero waits
//! and burns every retry inside the limit window, so it starts at 1 s (as the
//! AWS SDKs do for throttling) and is capped at 30 s.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::ConfigError;

/// How a delay is randomised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness: exactly the exponential delay.
    None,
    /// `U[0, d)`.
    Full,
    /// `d/2 + U[0, d/2)`.
    #[default]
    Equal,
    /// AWS's decorrelated jitter, `min(max, U[initial, 3 · prev))`.
    Decorrelated,
}

/// Exponential backoff settings; [`Backoff::iter`] yields the delays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    multiplier: f64,
    max_delay: Duration,
    jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::llm_defaults()
    }
}

impl Backoff {
    /// 500 ms × 2 up to 8 s, equal jitter (OpenAI and Anthropic SDKs).
    pub const fn llm_defaults() -> Self {
        Self {
            initial: Duration::from_millis(500),
            multiplier: 2.0,
            max_delay: Duration::from_secs(8),
            jitter: Jitter::Equal,
        }
    }

    /// 1 s × 2 up to 30 s, equal jitter: for rate limits and overloads that
    /// came without a server hint. Full jitter on a per-minute limit
    /// collapses to near-zero waits that burn every retry inside the limit's
    /// window; the AWS SDKs likewise start throttled retries at 1 s.
    pub const fn llm_throttling() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: Jitter::Equal,
        }
    }

    /// A builder starting from [`Backoff::llm_defaults`].
    pub fn builder() -> BackoffBuilder {
        BackoffBuilder(Self::llm_defaults())
    }

    /// The delay before the first retry, before jitter.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap on every delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The jitter mode.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The delays, randomised by a generator seeded with `seed`. The same
    /// seed gives the same sequence.
    pub fn iter(&self, seed: u64) -> BackoffIter {
        BackoffIter {
            config: *self,
            n: 0,
            prev: self.initial,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The exponential delay of retry `n` before jitter: `min(initial ·
    /// multiplier^n, max_delay)`.
    pub fn base_delay(&self, n: u32) -> Duration {
        let max = self.max_delay.as_secs_f64();
        let d = self.initial.as_secs_f64() * self.multiplier.powi(n.min(i32::MAX as u32) as i32);
        if !d.is_finite() || d >= max {
            self.max_delay
        } else {
            Duration::from_secs_f64(d)
        }
    }

    /// The smallest and largest delay retry `n` can have, as documented in
    /// the module table.
    pub fn bounds(&self, n: u32) -> (Duration, Duration) {
        let d = self.base_delay(n);
        match self.jitter {
            Jitter::None => (d, d),
            Jitter::Full => (Duration::ZERO, d),
            Jitter::Equal => (d / 2, d),
            Jitter::Decorrelated => (self.initial.min(self.max_delay), self.max_delay),
        }
    }
}

/// Builds a validated [`Backoff`].
#[derive(Clone, Copy, Debug)]
pub struct BackoffBuilder(Backoff);

impl BackoffBuilder {
    /// The delay before the first retry (before jitter). Must be above zero.
    pub fn initial(mut self, d: Duration) -> Self {
        self.0.initial = d;
        self
    }

    /// Growth per retry. Must be finite and at least 1.
    pub fn multiplier(mut self, m: f64) -> Self {
        self.0.multiplier = m;
        self
    }

    /// The cap on every delay, applied before jitter. Must be at least
    /// `initial`.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.0.max_delay = d;
        self
    }

    /// The jitter mode.
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.0.jitter = j;
        self
    }

    /// Checks the values.
    pub fn build(self) -> Result<Backoff, ConfigError> {
        let b = self.0;
        if b.initial.is_zero() {
            return Err(ConfigError::new("initial", "must be above zero"));
        }
        if !b.multiplier.is_finite() || b.multiplier < 1.0 {
            return Err(ConfigError::new(
                "multiplier",
                "must be finite and at least 1",
            ));
        }
        if b.max_delay < b.initial {
            return Err(ConfigError::new("max_delay", "must be at least `initial`"));
        }
        if b.max_delay > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::new("max_delay", "must be at most one day"));
        }
        Ok(b)
    }
}

/// The delays of one logical request; see [`Backoff::iter`]. Never ends.
#[derive(Clone, Debug)]
pub struct BackoffIter {
    config: Backoff,
    n: u32,
    prev: Duration,
    rng: SmallRng,
}

fn uniform(rng: &mut SmallRng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let (lo_ns, hi_ns) = (
        lo.as_nanos() as u64,
        hi.as_nanos().min(u64::MAX as u128) as u64,
    );
    Duration::from_nanos(rng.random_range(lo_ns..hi_ns))
}

impl BackoffIter {
    /// A uniform draw in `[0, 1)` from this iterator's generator, for
    /// jittering server hints with the same seeded stream.
    pub(crate) fn unit(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

impl Iterator for BackoffIter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let c = &self.config;
        let d = c.base_delay(self.n);
        self.n = self.n.saturating_add(1);
        let delay = match c.jitter {
            Jitter::None => d,
            Jitter::Full => uniform(&mut self.rng, Duration::ZERO, d),
            Jitter::Equal => d / 2 + uniform(&mut self.rng, Duration::ZERO, d - d / 2),
            Jitter::Decorrelated => {
                let hi = self.prev.saturating_mul(3);
                let next = uniform(&mut self.rng, c.initial, hi).min(c.max_delay);
                self.prev = next;
                next
            }
        };
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configuration_names_the_field() {
        let e = Backoff::builder().multiplier(0.5).build().unwrap_err();
        assert_eq!(e.field, "multiplier");
        let e = Backoff::builder().multiplier(f64::NAN).build().unwrap_err();
        assert_eq!(e.field, "multiplier");
        let e = Backoff::builder()
            .initial(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "initial");
        let e = Backoff::builder()
            .initial(Duration::from_secs(2))
            .max_delay(Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert_eq!(e.field, "max_delay");
    }

    #[test]
    fn same_seed_same_sequence() {
        let b = Backoff::llm_defaults();
        let a: Vec<_> = b.iter(7).take(10).collect();
        let c: Vec<_> = b.iter(7).take(10).collect();
        let d: Vec<_> = b.iter(8).take(10).collect();
        assert_eq!(a, c);
        assert_ne!(a, d);
    }

    /// Decorrelated jitter grows from the previous delay, not from
    /// `initial` each time: delays soon exceed three times `initial`.
    #[test]
    fn decorrelated_jitter_grows_from_the_previous_delay() {
        let b = Backoff::builder()
            .initial(Duration::from_millis(100))
            .max_delay(Duration::from_secs(100))
            .jitter(Jitter::Decorrelated)
            .build()
            .unwrap();
        for seed in 0..16 {
            let delays: Vec<_> = b.iter(seed).take(30).collect();
            assert!(
                delays.iter().any(|d| *d > Duration::from_millis(300)),
                "{delays:?}"
            );
            assert!(delays.iter().all(|d| *d >= Duration::from_millis(100)));
        }
    }

    #[test]
    fn accessors_and_presets() {
        let b = Backoff::llm_defaults();
        assert_eq!(b.initial(), Duration::from_millis(500));
        assert_eq!(b.max_delay(), Duration::from_secs(8));
        assert_eq!(b.jitter(), Jitter::Equal);
        assert_eq!(Backoff::default(), b);
        for j in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            assert_eq!(Backoff::builder().jitter(j).build().unwrap().jitter(), j);
        }
        let t = Backoff::llm_throttling();
        assert_eq!(
            (t.initial(), t.max_delay(), t.jitter()),
            (
                Duration::from_secs(1),
                Duration::from_secs(30),
                Jitter::Equal
            )
        );
        // The exponential part, exactly: 500 ms · 2^n up to the cap.
        assert_eq!(b.base_delay(0), Duration::from_millis(500));
        assert_eq!(b.base_delay(3), Duration::from_secs(4));
        assert_eq!(b.base_delay(4), Duration::from_secs(8));
        assert_eq!(b.base_delay(5), Duration::from_secs(8));
        assert_eq!(
            b.bounds(1),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        // A cap of exactly one day is allowed; a nanosecond more is not.
        let day = Duration::from_secs(24 * 3600);
        assert!(Backoff::builder().max_delay(day).build().is_ok());
        let e = Backoff::builder()
            .max_delay(day + Duration::from_nanos(1))
            .build()
            .unwrap_err();
        assert_eq!(e.field, "max_delay");
        // initial equal to the cap, and a multiplier of exactly 1, are fine.
        assert!(Backoff::builder()
            .initial(Duration::from_secs(8))
            .multiplier(1.0)
            .build()
            .is_ok());
    }

    #[test]
    fn huge_exponent_saturates_at_the_cap() {
        let b = Backoff::llm_defaults();
        assert_eq!(b.base_delay(u32::MAX), Duration::from_secs(8));
        assert_eq!(
            b.iter(1).nth(10_000).map(|d| d <= Duration::from_secs(8)),
            Some(true)
        );
    }
}
