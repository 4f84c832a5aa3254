//! One limiter per key, in a bounded map.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock};

use tokio::time::Instant;

use crate::util::clock::Origin;

use super::limiter::{Limiter, Settings};

/// One limiter per key that a function extracts from the request, in a map
/// bounded by `max_keys`.
pub(crate) struct Keyed<K, F> {
    key_fn: F,
    map: RwLock<HashMap<K, Arc<Limiter>>>,
    max_keys: usize,
    settings: Arc<Settings>,
    /// Shared by every key's limiter: made once, not per key.
    origin: Origin,
}

impl<K, F> fmt::Debug for Keyed<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, F> Keyed<K, F> {
    pub(crate) fn new(key_fn: F, max_keys: usize, settings: Arc<Settings>) -> Self {
        Self {
            key_fn,
            map: RwLock::new(HashMap::new()),
            max_keys,
            settings,
            origin: Origin::new(Instant::now()),
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<Arc<Limiter>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    pub(crate) fn keys(&self) -> Vec<K> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// The request's key.
    #[inline]
    pub(crate) fn key<Req>(&self, req: &Req) -> K
    where
        F: Fn(&Req) -> K,
    {
        (self.key_fn)(req)
    }

    /// `f` on the key's limiter under the map's read lock, if the key has
    /// one (no reference count touched). `f` must not call back into the
    /// map.
    #[inline]
    pub(crate) fn with_existing<T>(
        &self,
        key: &K,
        f: impl FnOnce(&Arc<Limiter>) -> T,
    ) -> Option<T> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(key).map(f)
    }

    pub(crate) fn get_or_insert(&self, key: K) -> Arc<Limiter> {
        if let Some(found) = self.get(&key) {
            return found;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = map.get(&key) {
            return Arc::clone(found);
        }
        if map.len() >= self.max_keys {
            // Evict a key whose history has left the window and that nobody
            // holds (nothing is lost); failing that, the least recently used.
            let mut quiet = None;
            let mut oldest: Option<(&K, u64)> = None;
            for (k, l) in map.iter() {
                let (idle, last) = l.idle();
                if idle && Arc::strong_count(l) == 1 {
                    quiet = Some(k);
                    break;
                }
                if oldest.is_none_or(|(_, t)| last < t) {
                    oldest = Some((k, last));
                }
            }
            if let Some(victim) = quiet.or(oldest.map(|(k, _)| k)).cloned() {
                map.remove(&victim);
            }
        }
        let limiter = super::registry::new_limiter(Arc::clone(&self.settings), self.origin);
        map.insert(key, Arc::clone(&limiter));
        limiter
    }
}
