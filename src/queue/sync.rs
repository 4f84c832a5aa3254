//! The atomics, lock and `Arc` the queue's permit protocol uses: `std`'s, or
//! loom's when `tests/queue_loom.rs` compiles `state/` into its own crate
//! under `--cfg loom` (it includes the files with `#[path]`), so that the
//! model checker explores the interleavings of the real code and checks that
//! the core is freed exactly once.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicUsize};
#[cfg(all(loom, test))]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicUsize};
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
