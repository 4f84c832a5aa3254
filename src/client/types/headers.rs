//! The rate-limit headers of a response.

use std::time::Duration;

use crate::classify::hint;

/// The rate-limit state a response reported: OpenAI's
/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, or, when those
/// are absent, Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,
/// remaining,reset}` (its RFC 3339 reset instants read against the system
/// clock). Absent or malformed headers are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitHeaders {
    /// Requests allowed per window.
    pub limit_requests: Option<u64>,
    /// Requests left in the window.
    pub remaining_requests: Option<u64>,
    /// Time until the request window resets.
    pub reset_requests: Option<Duration>,
    /// Tokens allowed per window.
    pub limit_tokens: Option<u64>,
    /// Tokens left in the window.
    pub remaining_tokens: Option<u64>,
    /// Time until the token window resets.
    pub reset_tokens: Option<Duration>,
}

impl RateLimitHeaders {
    /// Reads the headers from a response's header map.
    pub(crate) fn from_headers(h: &reqwest::header::HeaderMap) -> Self {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let num = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let openai = Self {
            limit_requests: num("x-ratelimit-limit-requests"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            reset_requests: text("x-ratelimit-reset-requests").and_then(hint::go_duration),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_tokens: text("x-ratelimit-reset-tokens").and_then(hint::go_duration),
        };
        if !openai.is_empty() {
            return openai;
        }
        let now = std::time::SystemTime::now();
        let reset = |name: &str| text(name).and_then(|v| hint::rfc3339(v, now));
        Self {
            limit_requests: num("anthropic-ratelimit-requests-limit"),
            remaining_requests: num("anthropic-ratelimit-requests-remaining"),
            reset_requests: reset("anthropic-ratelimit-requests-reset"),
            limit_tokens: num("anthropic-ratelimit-tokens-limit"),
            remaining_tokens: num("anthropic-ratelimit-tokens-remaining"),
            reset_tokens: reset("anthropic-ratelimit-tokens-reset"),
        }
    }

    /// Whether any rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_of_both_providers() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("500"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("12"),
        );
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("soon"),
        );
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.limit_requests, Some(500));
        assert_eq!(r.remaining_tokens, Some(12));
        assert_eq!(r.reset_tokens, Some(Duration::from_secs(360)));
        assert_eq!(r.reset_requests, None);
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_static("2000-01-01T00:00:00Z"),
        );
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.limit_requests, Some(50));
        assert_eq!(r.remaining_tokens, Some(0));
        // A reset in the past means now.
        assert_eq!(r.reset_tokens, Some(Duration::ZERO));
        assert!(RateLimitHeaders::from_headers(&HeaderMap::new()).is_empty());
    }
}
