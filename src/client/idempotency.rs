//! The idempotency key and retry count headers both HTTP clients send.

use std::cell::RefCell;

use bytes::BytesMut;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::RequestBuilder;

use super::ChatRequest;
use crate::retry::{Attempt, IdempotencyKey};

/// The header that carries a logical request's idempotency key:
/// `Idempotency-Key`, the name Stripe made common, the IETF draft
/// (`draft-ietf-httpapi-idempotency-key-header`) names, and the OpenAI and
/// Anthropic SDKs' request options use.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The header that carries the retries taken before an attempt (`0` on the
/// first): `x-stainless-retry-count`, the one the official OpenAI and
/// Anthropic SDKs (Python, Node, Go) send on every request, so that
/// provider-side logs and gateways that already read it understand the
/// crate's clients the same way.
pub const RETRY_COUNT_HEADER: &str = "x-stainless-retry-count";

impl ChatRequest {
    /// Sends this `Idempotency-Key` on every attempt of every call with this
    /// request (or a clone of it), in place of the key the client draws per
    /// logical request: for a caller that retries by hand, or a gateway
    /// that forwards its own caller's key. Set it last: any later change to
    /// the request drops it, so that one key never names two different
    /// bodies. Ignored when the client does not send keys
    /// ([`send_idempotency_key`](super::OpenAiClientBuilder::send_idempotency_key)).
    pub fn idempotency_key(mut self, key: HeaderValue) -> Self {
        *self.pinned_key() = Some(key);
        self
    }
}

/// Which of the two headers a client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttemptHeaders {
    pub(crate) key: bool,
    pub(crate) retry_count: bool,
}

impl Default for AttemptHeaders {
    fn default() -> Self {
        Self {
            key: true,
            retry_count: true,
        }
    }
}

/// `0` to `9` without allocating: the counts every retry policy reaches.
const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

fn count_value(retries: u32) -> HeaderValue {
    match SMALL.get(retries as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(retries),
    }
}

/// Room for this many key texts in one buffer.
const KEYS_PER_BUFFER: usize = 112;

thread_local! {
    // Key texts are cut from one shared buffer per thread, so a key costs
    // no allocation of its own: its header value (and reqwest's copy of the
    // headers) shares the buffer, which is freed once every key cut from it
    // is dropped (by then their requests were sent).
    static KEY_TEXT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

fn key_value(key: IdempotencyKey) -> Option<HeaderValue> {
    let text = KEY_TEXT.with(|buf| {
        let mut buf = buf.borrow_mut();
        let ascii = key.to_ascii();
        if buf.capacity() - buf.len() < ascii.len() {
            *buf = BytesMut::with_capacity(ascii.len() * KEYS_PER_BUFFER);
        }
        buf.extend_from_slice(&ascii);
        buf.split().freeze()
    });
    // Hex digits and hyphens: always a valid header value.
    HeaderValue::from_maybe_shared(text).ok()
}

/// The header names, made once (not parsed per request).
const KEY_NAME: HeaderName = HeaderName::from_static(IDEMPOTENCY_KEY_HEADER);
const COUNT_NAME: HeaderName = HeaderName::from_static(RETRY_COUNT_HEADER);

impl AttemptHeaders {
    /// The headers' values for the attempt being sent: the caller's own key
    /// (`pinned`) or the logical request's (drawn here, per call, when no
    /// retry layer is above), and the retries the retry layer took.
    pub(crate) fn values(
        self,
        pinned: Option<&HeaderValue>,
    ) -> (Option<HeaderValue>, Option<HeaderValue>) {
        // One read of the attempt: the key (drawn on first use) and the
        // retries together, or the retries alone when no key is drawn.
        let (drawn, retries) = if self.key && pinned.is_none() {
            match Attempt::current() {
                Some(a) => (Some(a.idempotency_key()), Some(a.retries())),
                None => (Some(IdempotencyKey::random()), None),
            }
        } else if self.retry_count {
            (None, Attempt::current_retries())
        } else {
            (None, None)
        };
        let key = match pinned {
            Some(p) if self.key => Some(p.clone()),
            _ => drawn.and_then(key_value),
        };
        let count = self.retry_count.then(|| count_value(retries.unwrap_or(0)));
        (key, count)
    }

    /// Adds the headers to a request about to be sent.
    pub(crate) fn add(self, rb: RequestBuilder, pinned: Option<&HeaderValue>) -> RequestBuilder {
        if !self.key && !self.retry_count {
            return rb;
        }
        let (key, count) = self.values(pinned);
        let mut rb = rb;
        if let Some(key) = key {
            rb = rb.header(KEY_NAME, key);
        }
        if let Some(count) = count {
            rb = rb.header(COUNT_NAME, count);
        }
        rb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: AttemptHeaders = AttemptHeaders {
        key: true,
        retry_count: true,
    };

    #[test]
    fn outside_a_retry_layer_each_call_draws_its_own_key_and_counts_zero() {
        let (a, ca) = BOTH.values(None);
        let (b, cb) = BOTH.values(None);
        assert_ne!(a.unwrap(), b.unwrap());
        assert_eq!(ca.unwrap(), "0");
        assert_eq!(cb.unwrap(), "0");
    }

    #[test]
    fn a_pinned_key_wins_and_each_header_can_be_off() {
        let pinned = HeaderValue::from_static("caller-key-1");
        let (k, c) = BOTH.values(Some(&pinned));
        assert_eq!(k.unwrap(), "caller-key-1");
        assert_eq!(c.unwrap(), "0");
        let no_key = AttemptHeaders {
            key: false,
            retry_count: true,
        };
        assert_eq!(
            no_key.values(Some(&pinned)),
            (None, Some("0".parse().unwrap()))
        );
        let no_count = AttemptHeaders {
            key: true,
            retry_count: false,
        };
        let (k, c) = no_count.values(None);
        assert!(k.is_some() && c.is_none());
        let neither = AttemptHeaders {
            key: false,
            retry_count: false,
        };
        assert_eq!(neither.values(None), (None, None));
    }

    #[test]
    fn key_texts_are_whole_and_distinct_across_buffers() {
        let keys: Vec<IdempotencyKey> = (0..KEYS_PER_BUFFER * 3 + 5)
            .map(|_| IdempotencyKey::random())
            .collect();
        let values: Vec<HeaderValue> = keys.iter().map(|k| key_value(*k).unwrap()).collect();
        for (k, v) in keys.iter().zip(&values) {
            assert_eq!(v.to_str().unwrap(), k.to_string());
        }
    }

    #[test]
    fn counts_past_nine_are_written_in_full() {
        assert_eq!(count_value(0), "0");
        assert_eq!(count_value(9), "9");
        assert_eq!(count_value(10), "10");
        assert_eq!(count_value(u32::MAX), "4294967295");
    }
}
