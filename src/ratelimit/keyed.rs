//! One limiter per key, in a bounded map.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::time::Instant;

use crate::util::clock::Origin;

use super::lease::{shards, thread_number};
use super::limiter::{Limiter, Settings};
use crate::util::sync::Padded;

/// A map from keys to their limiters.
type Map<K> = HashMap<K, Arc<Limiter>>;

/// One limiter per key that a function extracts from the request, in a map
/// bounded by `max_keys`.
///
/// The map is kept in one copy per core (up to 8, a power of two), each
/// behind a lock on a cache line of its own. A call reads its thread's
/// copy: taking a read lock writes the lock's word, and with one lock
/// every call of every core wrote the same line. A new key or an eviction
/// changes every copy under every copy's write lock (taken in order), so
/// the copies never differ while anyone reads them (unless the key's own
/// `Hash`, `Eq` or `Clone` panics midway: the next writer then makes every
/// copy a copy of the first again).
pub(crate) struct Keyed<K, F> {
    key_fn: F,
    maps: Box<[Padded<RwLock<Map<K>>>]>,
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
            maps: (0..shards())
                .map(|_| Padded(RwLock::new(HashMap::new())))
                .collect(),
            max_keys,
            settings,
            origin: Origin::new(Instant::now()),
        }
    }

    /// This thread's copy of the map, read-locked.
    #[inline]
    fn read(&self) -> RwLockReadGuard<'_, Map<K>> {
        let i = thread_number() & (self.maps.len() - 1);
        let lock = &self.maps[i].0;
        lock.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, key: &K) -> Option<Arc<Limiter>> {
        self.read().get(key).cloned()
    }

    pub(crate) fn keys(&self) -> Vec<K> {
        self.read().keys().cloned().collect()
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
        self.read().get(key).map(f)
    }

    pub(crate) fn get_or_insert(&self, key: K) -> Arc<Limiter> {
        if let Some(found) = self.get(&key) {
            return found;
        }
        let mut poisoned = false;
        let mut maps = Vec::with_capacity(self.maps.len());
        for m in self.maps.iter() {
            maps.push(m.0.write().unwrap_or_else(|p| {
                poisoned = true;
                p.into_inner()
            }));
        }
        if poisoned {
            // A panic under these locks (in the key's `Hash`, `Eq` or
            // `Clone`, while the copies were being changed one by one) may
            // have left them apart. Copy 0 is changed first, so it is
            // whole: the others become copies of it again.
            let whole = maps[0].clone();
            for map in &mut maps[1..] {
                **map = whole.clone();
            }
            for m in self.maps.iter() {
                m.0.clear_poison();
            }
        }
        if let Some(found) = maps[0].get(&key) {
            return Arc::clone(found);
        }
        if maps[0].len() >= self.max_keys {
            // Evict a key whose history has left the window and that nobody
            // holds but the copies (nothing is lost); failing that, the
            // least recently used.
            let mut quiet = None;
            let mut oldest: Option<(&K, u64)> = None;
            for (k, l) in maps[0].iter() {
                let (idle, last) = l.idle();
                if idle && Arc::strong_count(l) == self.maps.len() {
                    quiet = Some(k);
                    break;
                }
                if oldest.is_none_or(|(_, t)| last < t) {
                    oldest = Some((k, last));
                }
            }
            if let Some(victim) = quiet.or(oldest.map(|(k, _)| k)).cloned() {
                for map in &mut maps {
                    map.remove(&victim);
                }
            }
        }
        let limiter = super::registry::new_limiter(Arc::clone(&self.settings), self.origin);
        for map in &mut maps {
            map.insert(key.clone(), Arc::clone(&limiter));
        }
        limiter
    }
}
