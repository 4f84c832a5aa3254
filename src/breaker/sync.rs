//! The atomics and lock the breaker's shared state uses: `std`'s, or loom's
//! when `tests/breaker_loom.rs` compiles these same files into its own crate
//! under `--cfg loom` (it includes them with `#[path]`), so that the model
//! checker explores every interleaving of the real code.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(all(loom, test))]
pub(crate) use loom::sync::Mutex;

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::Mutex;
