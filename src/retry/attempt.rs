//! Which attempt of which logical request a call is: what the retry layer
//! tells the services below it, so that an HTTP client can send one
//! idempotency key per logical request and the number of retries taken.
//!
//! The retry layer clones the request for each attempt, so the service it
//! calls cannot tell a retry from a new call by looking at the request.
//! Instead, while the retry layer polls an attempt's future, it makes the
//! attempt current on that thread: [`Attempt::current`] then answers with
//! the number of retries taken before this attempt and the logical
//! request's [`IdempotencyKey`]. The key is drawn the first time a service
//! asks for it and kept by the retry layer's future, so every later attempt
//! of the same logical request gets the same key, and a logical request
//! whose services never ask draws none.
//!
//! What counts as one logical request is one call of the retry layer's
//! service (`call`, or `oneshot`): its attempts share the key. Calling the
//! retry layer again with the same (or a cloned) request is a new logical
//! request with a new key, as calling an OpenAI SDK's `create` again is. A
//! caller that retries by hand and wants the server to see one request sets
//! the key on the request itself (the crate's clients take one:
//! [`ChatRequest::idempotency_key`](crate::client::ChatRequest::idempotency_key),
//! [`MessagesRequest::idempotency_key`](crate::anthropic::MessagesRequest::idempotency_key)).
//!
//! Nothing is set until something in the process listens: the crate's
//! clients call [`Attempt::listen`] when they are built (with either header
//! on). A service of your own that reads the attempt calls it once at
//! start-up; reading listens too, but an attempt that was already being
//! polled when the process started listening is not current, so without
//! the call the first logical request would go uncovered.
//!
//! A service reads it when its future is polled (an `async` block's body
//! does), not in `Service::call`: the retry layer calls the first attempt
//! from its own `call`, before any poll. Layers between the retry layer and
//! the client (breaker, rate limiter, chaos, fallback, the queue) call and
//! poll in the caller's task, so they pass it through. Work moved to
//! another task (a `tower::buffer::Buffer` below the retry layer, a
//! `tokio::spawn` inside a service) does not see it; put the retry layer
//! below such a layer. With nested retry layers, the innermost one's
//! logical request is the one a client sees. Under the
//! [agent pipeline](crate::pipeline), each target has its own retry layer,
//! so a fallback target's attempts form a logical request of their own: a
//! new key, counted from 0.
//!
//! ```
//! use llm_resilience::classify::HttpError;
//! use llm_resilience::retry::{Attempt, RetryLayer};
//! use std::sync::{Arc, Mutex};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! Attempt::listen(); // once, before the first request
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&seen);
//! let flaky = service_fn(move |_: &'static str| {
//!     let log = Arc::clone(&log);
//!     async move {
//!         let attempt = Attempt::current().expect("under a retry layer");
//!         let mut log = log.lock().unwrap();
//!         log.push((attempt.retries(), attempt.idempotency_key()));
//!         // Fails twice with a 503, then answers.
//!         if log.len() < 3 { Err(HttpError::new(503)) } else { Ok("ok") }
//!     }
//! });
//! let retry = RetryLayer::llm_defaults();
//! assert_eq!(retry.layer(flaky).oneshot("hi").await.unwrap(), "ok");
//! let seen = seen.lock().unwrap();
//! assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);
//! assert!(seen.iter().all(|s| s.1 == seen[0].1), "one key for the three attempts");
//! # }
//! ```
//!
//! # Cost
//!
//! No allocation, lock or atomic write. The retry layer's future holds 16
//! bytes more for the key; until something listens, a poll of an attempt
//! pays one relaxed atomic load; once something does, a few word copies
//! into and out of a thread-local. The key costs one draw of the thread's
//! random generator, only when a service asks for it.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// A logical request's key as the retry layer keeps it: the key's bits,
/// all zero until a service draws it (a drawn key never is: it has its
/// version bits set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeySlot([u64; 2]);

/// What the thread-local holds while an attempt's future is polled. Plain
/// words, so that setting and restoring it are a few moves.
#[derive(Clone, Copy)]
struct Current {
    key: KeySlot,
    /// The retries taken; [`NO_ATTEMPT`] outside a retry layer.
    retries: u32,
}

const NO_ATTEMPT: u32 = u32::MAX;

/// Whether anything in the process reads the attempt: set for good by
/// [`Attempt::listen`] (the crate's clients call it when built).
static LISTENING: AtomicBool = AtomicBool::new(false);

/// Whether a retry layer should make its attempts current: one relaxed
/// load, read at each poll of an attempt.
#[inline]
pub(crate) fn listening() -> bool {
    LISTENING.load(Ordering::Relaxed)
}

thread_local! {
    static CURRENT: Cell<Current> = const {
        Cell::new(Current {
            key: KeySlot([0, 0]),
            retries: NO_ATTEMPT,
        })
    };
}

/// Runs `f` with the attempt after `retries` retries of the logical request
/// whose key is `key` as the current attempt, and keeps in `key` the key a
/// service drew during `f`. The attempt that was current before is
/// restored afterwards, even if `f` panics (nested retry layers, or an
/// attempt polled inside another's).
#[inline]
pub(crate) fn scope<R>(key: &mut KeySlot, retries: u32, f: impl FnOnce() -> R) -> R {
    struct Restore<'a> {
        key: &'a mut KeySlot,
        prev: Current,
    }
    impl Drop for Restore<'_> {
        #[inline]
        fn drop(&mut self) {
            *self.key = CURRENT.with(|c| c.replace(self.prev)).key;
        }
    }
    let mine = Current {
        key: *key,
        retries: retries.min(NO_ATTEMPT - 1),
    };
    let prev = CURRENT.with(|c| c.replace(mine));
    let _restore = Restore { key, prev };
    f()
}

/// One logical request's idempotency key: 128 bits from the thread's
/// cryptographically secure random generator (`rand`'s `ThreadRng`, a
/// ChaCha generator seeded from the operating system), written as a UUID
/// version 4 (`8e03978e-40d5-43e8-bc93-6894a57f9324`: 122 random bits).
///
/// Unguessable by another client and, at 122 bits, unique across every
/// request a fleet will ever send.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdempotencyKey([u8; 16]);

impl IdempotencyKey {
    /// A new random key.
    pub fn random() -> Self {
        let mut b: [u8; 16] = rand::random();
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // the RFC 9562 variant
        Self(b)
    }

    /// The key's 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    fn to_slot(self) -> KeySlot {
        let (a, b) = self.0.split_at(8);
        let word = |h: &[u8]| u64::from_ne_bytes(h.try_into().unwrap_or_default());
        KeySlot([word(a), word(b)])
    }

    fn from_slot(slot: KeySlot) -> Option<Self> {
        if slot.0 == [0, 0] {
            return None;
        }
        let mut b = [0; 16];
        b[..8].copy_from_slice(&slot.0[0].to_ne_bytes());
        b[8..].copy_from_slice(&slot.0[1].to_ne_bytes());
        Some(Self(b))
    }

    /// The key as the 36 ASCII bytes of its UUID text (lowercase), without
    /// allocating.
    pub fn to_ascii(&self) -> [u8; 36] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 36];
        let mut at = 0;
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            out[at] = HEX[usize::from(byte >> 4)];
            out[at + 1] = HEX[usize::from(byte & 0x0f)];
            at += 2;
        }
        out
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ascii = self.to_ascii();
        // Hex digits and hyphens only.
        f.write_str(std::str::from_utf8(&ascii).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({self})")
    }
}

/// The attempt of a logical request that the current call is, as the retry
/// layer above tells it; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    retries: u32,
    key: IdempotencyKey,
}

impl Attempt {
    /// Asks every retry layer of the process to make its attempts current
    /// from now on. The crate's HTTP clients call it when they are built
    /// with either header on; a service of your own that reads
    /// [`current`](Self::current) calls it once before its first request.
    /// Until something listens, a retry layer skips the work (one relaxed
    /// atomic load per poll of an attempt). Listening cannot be undone.
    pub fn listen() {
        if !listening() {
            LISTENING.store(true, Ordering::Relaxed);
        }
    }

    /// The attempt whose future the retry layer is polling on this thread,
    /// or `None` outside a retry layer. Draws the logical request's key
    /// the first time it is asked for. Listens, if nothing did yet.
    pub fn current() -> Option<Self> {
        Self::listen();
        CURRENT.with(|c| {
            let mut now = c.get();
            if now.retries == NO_ATTEMPT {
                return None;
            }
            let key = IdempotencyKey::from_slot(now.key).unwrap_or_else(|| {
                let key = IdempotencyKey::random();
                now.key = key.to_slot();
                c.set(now);
                key
            });
            Some(Self {
                retries: now.retries,
                key,
            })
        })
    }

    /// The retries taken before the current attempt (0 on the first
    /// attempt), or `None` outside a retry layer; draws no key. Listens,
    /// if nothing did yet.
    pub fn current_retries() -> Option<u32> {
        Self::listen();
        let retries = CURRENT.with(|c| c.get().retries);
        (retries != NO_ATTEMPT).then_some(retries)
    }

    /// The retries taken before this attempt: 0 on the first attempt, 1 on
    /// the first retry. (The attempt's number, counted from 1, is one
    /// more.)
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The logical request's key: the same on every attempt of it.
    pub fn idempotency_key(&self) -> IdempotencyKey {
        self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_retry_layer_there_is_no_attempt() {
        assert_eq!(Attempt::current(), None);
        assert_eq!(Attempt::current_retries(), None);
    }

    #[test]
    fn the_key_is_drawn_once_and_kept_for_later_attempts() {
        let mut key = KeySlot::default();
        let first = scope(&mut key, 0, || Attempt::current().unwrap());
        assert_eq!(first.retries(), 0);
        let second = scope(&mut key, 1, || {
            // Reading twice in one attempt gives the same key.
            assert_eq!(Attempt::current().unwrap(), Attempt::current().unwrap());
            Attempt::current().unwrap()
        });
        assert_eq!(second.retries(), 1);
        assert_eq!(first.idempotency_key(), second.idempotency_key());
        assert_eq!(
            IdempotencyKey::from_slot(key),
            Some(first.idempotency_key())
        );
        assert_eq!(Attempt::current(), None, "restored after the scope");
    }

    #[test]
    fn an_attempt_that_never_asks_draws_no_key() {
        let mut key = KeySlot::default();
        scope(&mut key, 0, || {
            assert_eq!(Attempt::current_retries(), Some(0))
        });
        assert_eq!(key, KeySlot::default());
    }

    #[test]
    fn nested_scopes_see_the_innermost_and_restore_the_outer() {
        let mut outer = KeySlot::default();
        let mut inner = KeySlot::default();
        scope(&mut outer, 0, || {
            let o = Attempt::current().unwrap();
            let i = scope(&mut inner, 4, || Attempt::current().unwrap());
            assert_eq!(i.retries(), 4);
            assert_ne!(i.idempotency_key(), o.idempotency_key());
            assert_eq!(Attempt::current().unwrap(), o);
        });
        assert!(outer != KeySlot::default() && inner != KeySlot::default());
        assert_ne!(outer, inner);
    }

    #[test]
    fn a_panic_inside_restores_the_outer_attempt() {
        let mut key = KeySlot::default();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            scope(&mut key, 0, || -> () { panic!("inner service bug") })
        }));
        assert!(caught.is_err());
        assert_eq!(Attempt::current(), None);
    }

    #[test]
    fn a_key_survives_the_slot() {
        for _ in 0..100 {
            let k = IdempotencyKey::random();
            assert_eq!(IdempotencyKey::from_slot(k.to_slot()), Some(k));
        }
        assert_eq!(IdempotencyKey::from_slot(KeySlot::default()), None);
    }

    #[test]
    fn keys_are_uuid_v4_text_and_distinct() {
        let keys: Vec<IdempotencyKey> = (0..1000).map(|_| IdempotencyKey::random()).collect();
        let mut seen = std::collections::HashSet::new();
        for k in &keys {
            assert!(seen.insert(*k), "a key repeated");
            let text = k.to_string();
            assert_eq!(text.len(), 36);
            let groups: Vec<&str> = text.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(text
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert_eq!(&text[14..15], "4", "version 4");
            assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "variant");
        }
    }

    #[test]
    fn text_matches_the_bytes() {
        let k = IdempotencyKey([
            0x8e, 0x03, 0x97, 0x8e, 0x40, 0xd5, 0x43, 0xe8, 0xbc, 0x93, 0x68, 0x94, 0xa5, 0x7f,
            0x93, 0x24,
        ]);
        assert_eq!(k.to_string(), "8e03978e-40d5-43e8-bc93-6894a57f9324");
        assert_eq!(
            format!("{k:?}"),
            "IdempotencyKey(8e03978e-40d5-43e8-bc93-6894a57f9324)"
        );
    }
}
