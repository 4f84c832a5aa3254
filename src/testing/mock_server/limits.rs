//! The mock server's own rate limits as providers describe theirs: a
//! request bucket and a token bucket, each holding a window's limit and
//! replenished continuously (OpenAI: "your rate limit is replenished
//! continuously"; Anthropic: a token bucket refilled up to the limit).

use std::time::Duration;

use tokio::time::Instant;

/// Requests and tokens per window, enforced by the mock server with
/// continuously refilled buckets; set with
/// [`MockServer::set_limits`](super::MockServer::set_limits).
///
/// Each request takes one request and its prompt plus completion tokens
/// when it arrives; a request that does not fit gets a 429
/// `rate_limit_exceeded` with `retry-after-ms`, `retry-after` (the time
/// until it would fit) and the `x-ratelimit-*` headers, and costs nothing.
/// Successes carry the same headers: the limits, what is left, and the time
/// until each bucket is full again (`reset`, a Go duration as OpenAI sends
/// it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MockLimits {
    window: Duration,
    requests: Option<u64>,
    tokens: Option<u64>,
}

impl MockLimits {
    /// No limits yet, counted over `window` (above zero; a zero window is
    /// taken as one millisecond).
    pub fn new(window: Duration) -> Self {
        Self {
            window: window.max(Duration::from_millis(1)),
            requests: None,
            tokens: None,
        }
    }

    /// Requests per window.
    pub fn requests(mut self, n: u64) -> Self {
        self.requests = Some(n);
        self
    }

    /// Tokens (prompt plus completion) per window.
    pub fn tokens(mut self, n: u64) -> Self {
        self.tokens = Some(n);
        self
    }
}

#[derive(Debug)]
struct Bucket {
    limit: f64,
    level: f64,
}

impl Bucket {
    fn new(limit: u64) -> Self {
        Self {
            limit: limit as f64,
            level: limit as f64,
        }
    }
}

/// The buckets' state.
#[derive(Debug)]
pub(crate) struct Buckets {
    window: f64,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    last: Instant,
}

/// `(limit, remaining, reset)` for the requests and tokens headers.
pub(crate) type Limits = [(u64, u64, Duration); 2];

impl Buckets {
    pub(crate) fn new(l: MockLimits, now: Instant) -> Self {
        Self {
            window: l.window.as_secs_f64(),
            requests: l.requests.map(Bucket::new),
            tokens: l.tokens.map(Bucket::new),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        for b in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            b.level = (b.level + dt * b.limit / self.window).min(b.limit);
        }
    }

    fn headers(&self, default: Limits) -> Limits {
        let of = |b: &Option<Bucket>, d: (u64, u64, Duration)| match b {
            Some(b) => (
                b.limit as u64,
                b.level.max(0.0).floor() as u64,
                Duration::from_secs_f64((b.limit - b.level).max(0.0) * self.window / b.limit),
            ),
            None => d,
        };
        [of(&self.requests, default[0]), of(&self.tokens, default[1])]
    }

    /// Takes one request of `tokens` at `now`: the headers to send, and
    /// `Err(wait)` if it does not fit (nothing is taken then).
    pub(crate) fn take(
        &mut self,
        now: Instant,
        tokens: u64,
        default: Limits,
    ) -> (Limits, Result<(), Duration>) {
        self.refill(now);
        let need = |b: &Option<Bucket>, n: f64| match b {
            Some(b) if b.level < n => (n - b.level) * self.window / b.limit,
            _ => 0.0,
        };
        let wait = need(&self.requests, 1.0).max(need(&self.tokens, tokens as f64));
        if wait > 0.0 {
            return (self.headers(default), Err(Duration::from_secs_f64(wait)));
        }
        if let Some(b) = &mut self.requests {
            b.level -= 1.0;
        }
        if let Some(b) = &mut self.tokens {
            b.level -= tokens as f64;
        }
        (self.headers(default), Ok(()))
    }
}
