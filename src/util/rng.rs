//! SplitMix64: the small generator behind the layers' jitter and chaos
//! draws. Each draw is a pure function of a seed and a counter, so a seeded
//! run reproduces whatever the clock or the task scheduling do.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Spreads consecutive numbers into unrelated 64-bit values (the SplitMix64
/// output function applied to `z + GOLDEN`).
#[inline]
pub(crate) fn splitmix(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` from 64 random bits (their top 53).
#[inline]
pub(crate) fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A SplitMix64 stream.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    /// The next 64 random bits.
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        let out = splitmix(self.0);
        self.0 = self.0.wrapping_add(GOLDEN);
        out
    }

    /// The next draw in `[0, 1)`.
    #[inline]
    pub(crate) fn next_f64(&mut self) -> f64 {
        unit(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_unit_range() {
        // SplitMix64's reference output for seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(unit(0), 0.0);
        assert!(unit(u64::MAX) < 1.0);
        assert!((0..1000)
            .map(|_| r.next_f64())
            .all(|u| (0.0..1.0).contains(&u)));
    }
}
