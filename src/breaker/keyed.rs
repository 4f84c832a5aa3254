//! Keyed breakers: one breaker per provider, model or credential, in a
//! bounded map.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::util::clock::Origin;
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::handle::BreakerHandle;
use super::state::{Core, Link, Settings, State};
use super::{start, HasCore, Shared};
use crate::classify::{Classify, LlmClassifier};
use crate::error::{BoxError, Error};

struct Entry<C> {
    shared: Arc<Shared<C>>,
    order: u64,
}

struct Map<K, C> {
    entries: HashMap<K, Entry<C>>,
    next: u64,
}

/// The state every clone of a keyed layer shares.
pub(crate) struct KeyedShared<K, F, C> {
    key_fn: F,
    settings: Arc<Settings>,
    classifier: Arc<C>,
    /// Shared by every key's breaker: made once, not per key.
    origin: Origin,
    max_keys: usize,
    map: RwLock<Map<K, C>>,
    // A shared coordination's link, given to every breaker the map makes.
    link: std::sync::OnceLock<Arc<Link>>,
}

impl<K, F, C> KeyedShared<K, F, C> {
    pub(crate) fn new(
        key_fn: F,
        settings: Arc<Settings>,
        classifier: Arc<C>,
        max_keys: usize,
    ) -> Self {
        Self {
            key_fn,
            settings,
            classifier,
            origin: Origin::new(Instant::now()),
            max_keys,
            map: RwLock::new(Map {
                entries: HashMap::new(),
                next: 0,
            }),
            link: std::sync::OnceLock::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, F, C> KeyedShared<K, F, C> {
    fn get(&self, key: &K) -> Option<Arc<Shared<C>>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.entries.get(key).map(|e| Arc::clone(&e.shared))
    }

    fn get_or_insert(&self, key: K) -> Arc<Shared<C>> {
        if let Some(found) = self.get(&key) {
            return found;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.entries.get(&key) {
            return Arc::clone(&e.shared);
        }
        if map.entries.len() >= self.max_keys {
            // Evict a closed breaker (healthy: only its window is lost); if
            // every breaker is open or forced, the oldest.
            let victim = map
                .entries
                .iter()
                .filter(|(_, e)| e.shared.core.state() == State::Closed)
                .min_by_key(|(_, e)| e.order)
                .or_else(|| map.entries.iter().min_by_key(|(_, e)| e.order))
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                map.entries.remove(&victim);
            }
        }
        let shared = Arc::new(Shared {
            core: Core::new(Arc::clone(&self.settings), self.origin),
            classifier: Arc::clone(&self.classifier),
        });
        let order = map.next;
        map.next += 1;
        map.entries.insert(
            key,
            Entry {
                shared: Arc::clone(&shared),
                order,
            },
        );
        if let Some(link) = self.link.get() {
            shared.core.attach(Arc::clone(link));
            link.changed
                .store(true, std::sync::atomic::Ordering::Release);
            link.notify.notify_one();
        }
        shared
    }
}

trait KeyedAccess<K>: Send + Sync {
    fn get(&self, key: &K) -> Option<BreakerHandle>;
    fn get_or_insert(&self, key: K) -> BreakerHandle;
    fn keys(&self) -> Vec<K>;
    fn entries(&self) -> Vec<(K, BreakerHandle)>;
    fn attach(&self, link: Arc<Link>) -> bool;
}

impl<K, F, C> KeyedAccess<K> for KeyedShared<K, F, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Send + Sync,
    C: Send + Sync + 'static,
{
    fn get(&self, key: &K) -> Option<BreakerHandle> {
        KeyedShared::get(self, key).map(|s| BreakerHandle::new(s as Arc<dyn HasCore>))
    }

    fn get_or_insert(&self, key: K) -> BreakerHandle {
        BreakerHandle::new(KeyedShared::get_or_insert(self, key) as Arc<dyn HasCore>)
    }

    fn keys(&self) -> Vec<K> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.entries.keys().cloned().collect()
    }

    fn entries(&self) -> Vec<(K, BreakerHandle)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.entries
            .iter()
            .map(|(k, e)| {
                let shared = Arc::clone(&e.shared) as Arc<dyn HasCore>;
                (k.clone(), BreakerHandle::new(shared))
            })
            .collect()
    }

    fn attach(&self, link: Arc<Link>) -> bool {
        // Under the write lock, so that no breaker is added unlinked.
        let map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.link.set(Arc::clone(&link)).is_err() {
            return false;
        }
        for e in map.entries.values() {
            e.shared.core.attach(Arc::clone(&link));
        }
        true
    }
}

/// Puts one circuit breaker per key in front of a service; made by
/// [`CircuitBreakerLayerBuilder::key_by`](super::CircuitBreakerLayerBuilder::key_by).
///
/// Every service this layer makes shares one bounded map of breakers. The
/// key function runs once per call: return something cheap (an enum, a
/// `&'static str`, an `Arc<str>`), never a freshly allocated string on the
/// hot path if it can be helped. Keys are never logged (they may be
/// credentials).
pub struct KeyedCircuitBreakerLayer<K, F, C = LlmClassifier> {
    shared: Arc<KeyedShared<K, F, C>>,
}

impl<K, F, C> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("max_keys", &self.shared.max_keys)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    pub(crate) fn from_shared(shared: Arc<KeyedShared<K, F, C>>) -> Self {
        Self { shared }
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    /// A cheap handle to the map of breakers: per-key queries and controls.
    pub fn handle(&self) -> KeyedBreakerHandle<K> {
        KeyedBreakerHandle {
            shared: Arc::clone(&self.shared) as Arc<dyn KeyedAccess<K>>,
        }
    }
}

impl<S, K, F, C> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            shared: Arc::clone(&self.shared),
            ready: false,
        }
    }
}

/// A handle to a keyed breaker's map: each key's [`BreakerHandle`].
pub struct KeyedBreakerHandle<K> {
    shared: Arc<dyn KeyedAccess<K>>,
}

impl<K> Clone for KeyedBreakerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K> fmt::Debug for KeyedBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakerHandle").finish_non_exhaustive()
    }
}

impl<K> KeyedBreakerHandle<K> {
    /// The breaker of `key`, if it exists.
    pub fn get(&self, key: &K) -> Option<BreakerHandle> {
        self.shared.get(key)
    }

    /// The breaker of `key`, created (closed) if it does not exist yet; for
    /// example to force a key open before its first call.
    pub fn breaker(&self, key: K) -> BreakerHandle {
        self.shared.get_or_insert(key)
    }

    /// The state of `key`'s breaker, if it exists.
    pub fn state(&self, key: &K) -> Option<State> {
        self.get(key).map(|h| h.state())
    }

    /// The keys that have a breaker now.
    pub fn keys(&self) -> Vec<K> {
        self.shared.keys()
    }

    /// Every key's breaker now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn entries(&self) -> Vec<(K, BreakerHandle)> {
        self.shared.entries()
    }

    /// Links every breaker of the map, now and to come, to a coordination;
    /// false if one already is.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn attach(&self, link: Arc<Link>) -> bool {
        self.shared.attach(link)
    }
}

/// One circuit breaker per key in front of a service; made by
/// [`KeyedCircuitBreakerLayer`].
///
/// `poll_ready` readies the inner service (the key is not known before
/// `call`); `call` finds or creates the key's breaker (a read lock on the
/// map, a write lock only for a new key) and proceeds as
/// [`CircuitBreaker`](super::CircuitBreaker) does.
pub struct KeyedCircuitBreaker<S, K, F, C = LlmClassifier> {
    inner: S,
    shared: Arc<KeyedShared<K, F, C>>,
    ready: bool,
}

impl<S: Clone, K, F, C> Clone for KeyedCircuitBreaker<S, K, F, C> {
    /// The clone shares the breakers but not readiness.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            ready: false,
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl<S, Req, K, F, C> Service<Req> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: Fn(&Req) -> K,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        crate::util::ready::poll_inner(&mut self.inner, &mut self.ready, cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.shared.key_fn)(&req);
        let breaker = self.shared.get_or_insert(key);
        start(&breaker, &mut self.inner, &mut self.ready, req)
    }
}
