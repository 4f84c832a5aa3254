//! Every limiter by number, so that an admitted call's future can reach
//! its limiter without holding a reference to it.
//!
//! A call admitted at once whose response the layer reads nothing from
//! (the layer set to ignore usage) needs its limiter again only if the
//! call fails: a 429 pauses the key, another failure settles what the
//! provider charged, a call that was never sent gives its charges back.
//! Holding the limiter's `Arc` for that would cost every call an increment
//! and a decrement of a count that every caller shares (the counter's cache
//! line moves between the cores that call). Such a future holds the
//! limiter's number instead and looks it up here on those paths only: a
//! failed call takes one global lock more.
//!
//! A limiter gone (its layer, services and keyed map dropped) is not found:
//! there is nothing left to settle. Entries of limiters gone are swept
//! when the registry has doubled since the last sweep.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::limiter::{Limiter, Settings};
use crate::util::clock::Origin;

struct Registry {
    live: BTreeMap<u64, Weak<Limiter>>,
    next: u64,
    /// The number of entries after the last sweep.
    swept: usize,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    live: BTreeMap::new(),
    next: 0,
    swept: 0,
});

/// A new limiter, registered under a number of its own.
pub(crate) fn new_limiter(settings: Arc<Settings>, origin: Origin) -> Arc<Limiter> {
    let mut r = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    let id = r.next;
    r.next += 1;
    let limiter = Arc::new(Limiter::new(settings, origin, id));
    r.live.insert(id, Arc::downgrade(&limiter));
    if r.live.len() >= 2 * r.swept.max(32) {
        r.live.retain(|_, l| l.strong_count() > 0);
        r.swept = r.live.len();
    }
    limiter
}

/// The limiter numbered `id`, if it is still there.
pub(crate) fn find(id: u64) -> Option<Arc<Limiter>> {
    let weak = REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .live
        .get(&id)
        .cloned();
    // Upgraded outside the lock: the last `Arc` of a limiter may be dropped
    // here, and nothing drops one under the lock.
    weak?.upgrade()
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::ratelimit::RateLimitLayer;

    fn settings() -> Arc<Settings> {
        Arc::new(
            RateLimitLayer::builder()
                .requests(10)
                .no_token_limit()
                .settings()
                .unwrap(),
        )
    }

    #[test]
    fn found_while_held_not_after_and_swept() {
        let a = new_limiter(settings(), Origin::new(Instant::now()));
        let b = new_limiter(settings(), Origin::new(Instant::now()));
        assert_ne!(a.id, b.id);
        assert!(Arc::ptr_eq(&find(a.id).unwrap(), &a));
        assert!(Arc::ptr_eq(&find(b.id).unwrap(), &b));
        let gone = a.id;
        drop(a);
        assert!(find(gone).is_none(), "a limiter gone is not found");
        // Many limiters made and dropped: the entries are swept, so the
        // registry stays bounded by what is alive.
        for _ in 0..10_000 {
            drop(new_limiter(settings(), Origin::new(Instant::now())));
        }
        let len = REGISTRY.lock().unwrap().live.len();
        assert!(len < 1_000, "{len} entries kept");
        assert!(find(b.id).is_some());
    }
}
