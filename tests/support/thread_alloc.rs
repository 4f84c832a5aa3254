//! A global allocator that counts allocations made on the current thread
//! only, for the tests that measure a call's request path while a mock
//! server allocates on other threads. Install it with
//! `#[global_allocator] static GLOBAL: thread_alloc::Counting = thread_alloc::Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Allocations (and reallocations) made so far on this thread.
pub fn allocations() -> u64 {
    COUNT.with(Cell::get)
}

/// `System`, counting every allocation and reallocation per thread.
pub struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the thread-local counter (const-initialised, no destructor)
// has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations made on this thread by each call of `svc` (`ready`, then
/// `call` and its answer), sorted: 40 calls of which the first 10 open the
/// connection and warm the client's pool and are not counted. Prints the
/// median, minimum and maximum, and `building` (what making one request
/// took), and returns the median.
// Not every test that counts allocations measures a client call.
#[allow(dead_code)]
pub fn median_per_call<S, Req>(
    rt: &tokio::runtime::Runtime,
    svc: &mut S,
    building: u64,
    mut make: impl FnMut() -> Req,
) -> u64
where
    S: tower::Service<Req>,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let mut per_call = Vec::new();
    rt.block_on(async {
        for i in 0..40 {
            let req = make();
            let ready = svc.ready().await.unwrap();
            let before = allocations();
            let resp = ready.call(req).await.unwrap();
            let n = allocations() - before;
            drop(resp);
            if i >= 10 {
                per_call.push(n);
            }
        }
    });
    per_call.sort_unstable();
    let median = per_call[per_call.len() / 2];
    println!(
        "building a plain request: {building} allocations; a whole call \
         (encode, send, receive, decode) on the calling thread: median {median}, \
         min {}, max {}",
        per_call[0],
        per_call[per_call.len() - 1]
    );
    median
}
