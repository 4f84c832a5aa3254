//! Internals shared by the layers: nothing here is public.
//!
//! - [`sync`]: the atomics, locks and the cache-padded wrapper, `std`'s or
//!   loom's (the loom tests compile layer files against this one facade);
//! - [`rng`]: SplitMix64, the small generator the layers' jitter and chaos
//!   draws use (a pure function of a seed, so seeded runs reproduce);
//! - [`listener`]: the event hook every layer offers (`on_event`);
//! - [`ready`]: readying the inner service once per `call`;
//! - [`time`]: advancing an `Instant` without overflow;
//! - [`clock`]: the cheap clock of the per-call paths.

pub(crate) mod clock;
pub(crate) mod listener;
pub(crate) mod ready;
pub(crate) mod rng;
pub(crate) mod sync;
pub(crate) mod time;
