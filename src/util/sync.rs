//! The atomics, locks and `Arc` that lock-free state uses: `std`'s, or
//! loom's when a loom test (`tests/*_loom.rs`) compiles the layer's files
//! into its own crate under `--cfg loom` (it includes them, and this file as
//! their `sync` module, with `#[path]`), so that the model checker explores
//! every interleaving of the real code. Also the cache-padded wrapper.
#![allow(unused_imports)]

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(all(loom, test))]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Keeps a value on a cache line of its own, so that atomics written on
/// every call do not share a line with ones read on every call (false
/// sharing). 128 bytes, as crossbeam's `CachePadded` on x86-64 and aarch64:
/// their prefetchers pull cache lines in pairs.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}
