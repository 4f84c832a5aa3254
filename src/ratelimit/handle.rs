//! [`RateLimitHandle`] and [`KeyedRateLimitHandle`]: queries, plain
//! functions.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::limiter::Limiter;

/// A cheap, cloneable handle to one limiter: what it would admit now, its
/// pause, its line. Every method is a plain function.
#[derive(Clone)]
pub struct RateLimitHandle {
    limiter: Arc<Limiter>,
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl RateLimitHandle {
    pub(crate) fn new(limiter: Arc<Limiter>) -> Self {
        Self { limiter }
    }

    /// Requests and tokens that could go at once, the limits in force, the
    /// pause left and the calls waiting.
    pub fn snapshot(&self) -> Snapshot {
        self.limiter.snapshot()
    }

    /// Sets the `llm_resilience_ratelimit_remaining` gauges (labels
    /// `limiter`, `dimension`, and `key` = `key_label`) to what could go at
    /// once now.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn record_metrics(&self, key_label: &str) {
        let s = self.snapshot();
        let name = self.limiter.settings.name.clone();
        for (dim, v) in [("requests", s.requests), ("tokens", s.tokens)] {
            if let Some(v) = v {
                metrics::gauge!(
                    "llm_resilience_ratelimit_remaining",
                    "limiter" => name.clone(),
                    "dimension" => dim,
                    "key" => key_label.to_owned()
                )
                .set(v as f64);
            }
        }
    }
}

pub(crate) trait KeyedAccess<K>: Send + Sync {
    fn get(&self, key: &K) -> Option<Arc<Limiter>>;
    fn get_or_insert(&self, key: K) -> Arc<Limiter>;
    fn keys(&self) -> Vec<K>;
}

/// A handle to a keyed limiter's map: each key's [`RateLimitHandle`].
pub struct KeyedRateLimitHandle<K> {
    pub(crate) shared: Arc<dyn KeyedAccess<K>>,
}

impl<K> Clone for KeyedRateLimitHandle<K> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K> fmt::Debug for KeyedRateLimitHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitHandle")
            .finish_non_exhaustive()
    }
}

impl<K> KeyedRateLimitHandle<K> {
    /// The limiter of `key`, if it exists.
    pub fn get(&self, key: &K) -> Option<RateLimitHandle> {
        self.shared.get(key).map(RateLimitHandle::new)
    }

    /// The limiter of `key`, created if it does not exist yet.
    pub fn limiter(&self, key: K) -> RateLimitHandle {
        RateLimitHandle::new(self.shared.get_or_insert(key))
    }

    /// The snapshot of `key`'s limiter, if it exists.
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        self.get(key).map(|h| h.snapshot())
    }

    /// The keys that have a limiter now.
    pub fn keys(&self) -> Vec<K> {
        self.shared.keys()
    }

    /// Sets the remaining-budget gauges of every key, labelled with
    /// `label(key)` (never the key itself: it may be a credential).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn record_metrics(&self, label: impl Fn(&K) -> String) {
        for key in self.keys() {
            if let Some(h) = self.get(&key) {
                h.record_metrics(&label(&key));
            }
        }
    }
}

/// A limiter's state at one instant; see
/// [`RateLimitHandle::snapshot`](super::RateLimitHandle::snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Requests that could go at once (`None`: no request limit).
    pub requests: Option<u64>,
    /// Tokens that could go at once (`None`: no token limit).
    pub tokens: Option<u64>,
    /// The request limit in force per window (the configured one, or lower
    /// when the server's headers said so).
    pub request_limit: Option<u64>,
    /// The token limit in force per window.
    pub token_limit: Option<u64>,
    /// How long calls on this key are paused by a server's 429.
    pub paused_for: Duration,
    /// Calls waiting in line.
    pub waiting: usize,
}
