//! What a request is expected to cost, what a response says it cost, and
//! what the server says is left.

use std::time::SystemTime;

use crate::classify::{hint, HttpView, LlmClassifier, Reason};
use crate::error::Error;

/// Estimates a request's token cost before the call.
///
/// Implemented by every `Fn(&Req) -> u32` and, with the `reqwest` feature,
/// by [`ChatEstimate`] for the crate's
/// [`ChatRequest`](crate::client::ChatRequest).
pub trait EstimateTokens<Req>: Send + Sync + 'static {
    /// The tokens `req` is expected to use (prompt and completion).
    fn estimate(&self, req: &Req) -> u32;
}

impl<Req, F> EstimateTokens<Req> for F
where
    F: Fn(&Req) -> u32 + Send + Sync + 'static,
{
    #[inline]
    fn estimate(&self, req: &Req) -> u32 {
        self(req)
    }
}

/// The default estimator: for the crate's
/// [`ChatRequest`](crate::client::ChatRequest) (feature `reqwest`), its
/// prompt estimate (4 bytes a token) plus its `max_tokens` (or, when unset,
/// [`ChatEstimate::DEFAULT_MAX_TOKENS`]). Providers count the same way
/// before a call: OpenAI charges `max_tokens` against the tokens-per-minute
/// limit up front.
///
/// For other request types, give the builder a closure
/// ([`estimate_tokens`](super::RateLimitLayerBuilder::estimate_tokens)).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatEstimate;

impl ChatEstimate {
    /// The completion allowance when a request sets no `max_tokens`.
    pub const DEFAULT_MAX_TOKENS: u32 = 1_024;
}

#[cfg(feature = "reqwest")]
impl EstimateTokens<crate::client::ChatRequest> for ChatEstimate {
    #[inline]
    fn estimate(&self, req: &crate::client::ChatRequest) -> u32 {
        req.estimated_prompt_tokens()
            .saturating_add(req.max_tokens_value().unwrap_or(Self::DEFAULT_MAX_TOKENS))
    }
}

/// One dimension of the server's rate-limit state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerDimension {
    /// The server's limit per its window.
    pub limit: Option<u64>,
    /// What the server says is left.
    pub remaining: Option<u64>,
}

/// The rate-limit state a server reported, from OpenAI's
/// `x-ratelimit-{limit,remaining}-{requests,tokens}` or Anthropic's
/// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining}`
/// headers. For tokens, the limit is the one on all tokens, and what is left
/// is the least of Anthropic's token dimensions (an input- or output-token
/// budget bounds the total a call can use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerLimits {
    /// Requests.
    pub requests: ServerDimension,
    /// Tokens.
    pub tokens: ServerDimension,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl ServerLimits {
    /// Whether the server said nothing.
    #[inline]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Reads the headers of `view` (malformed values are ignored).
    pub fn from_view(view: &dyn HttpView) -> Self {
        let num = |name: &str| view.header(name).and_then(|v| v.trim().parse::<u64>().ok());
        let mut s = Self {
            requests: ServerDimension {
                limit: num("x-ratelimit-limit-requests"),
                remaining: num("x-ratelimit-remaining-requests"),
            },
            tokens: ServerDimension {
                limit: num("x-ratelimit-limit-tokens"),
                remaining: num("x-ratelimit-remaining-tokens"),
            },
        };
        const ANTHROPIC: [(&str, &str); 4] = [
            (
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
            ),
            (
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
            ),
            (
                "anthropic-ratelimit-output-tokens-limit",
                "anthropic-ratelimit-output-tokens-remaining",
            ),
            (
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
            ),
        ];
        for (i, (limit, remaining)) in ANTHROPIC.iter().enumerate() {
            let dim = if i == 3 {
                &mut s.requests
            } else {
                &mut s.tokens
            };
            if i == 0 || i == 3 {
                dim.limit = min_opt(dim.limit, num(limit));
            }
            dim.remaining = min_opt(dim.remaining, num(remaining));
        }
        s
    }
}

/// What a response tells the limiter after the call: the tokens it used and
/// the server's rate-limit state. Both default to "not reported", so
/// `impl ReportsUsage for MyResponse {}` is enough for a type that reports
/// neither.
pub trait ReportsUsage {
    /// The tokens the call used, as the provider counted them.
    fn tokens_used(&self) -> Option<u64> {
        None
    }

    /// The rate-limit state the server reported with this response.
    fn server_limits(&self) -> ServerLimits {
        ServerLimits::default()
    }
}

#[cfg(feature = "reqwest")]
fn from_client_headers(h: &crate::client::RateLimitHeaders) -> ServerLimits {
    ServerLimits {
        requests: ServerDimension {
            limit: h.limit_requests,
            remaining: h.remaining_requests,
        },
        tokens: ServerDimension {
            limit: h.limit_tokens,
            remaining: h.remaining_tokens,
        },
    }
}

#[cfg(feature = "reqwest")]
impl ReportsUsage for crate::client::ChatResponse {
    #[inline]
    fn tokens_used(&self) -> Option<u64> {
        self.usage.map(|u| u64::from(u.total_tokens))
    }

    #[inline]
    fn server_limits(&self) -> ServerLimits {
        from_client_headers(&self.rate_limit)
    }
}

/// A response the limiter does not look into: the estimate stands, and no
/// server state is read. For services whose responses report no usage
/// (use it with [`ignore_usage`](super::RateLimitLayerBuilder::ignore_usage)).
#[derive(Clone, Copy, Debug, Default)]
pub struct IgnoreUsage;

/// Reads a response's usage and server state for the limiter: the default
/// ([`Reported`]) asks the response's [`ReportsUsage`]; [`IgnoreUsage`]
/// reads nothing, for any response type.
pub trait ReadUsage<Res>: Send + Sync + 'static {
    /// The tokens used, if reported.
    fn tokens_used(&self, res: &Res) -> Option<u64>;
    /// The server's rate-limit state, if reported.
    fn server_limits(&self, res: &Res) -> ServerLimits;
    /// Whether every response reads as nothing (no usage, no server
    /// state), as with [`IgnoreUsage`]: a call that succeeds then has
    /// nothing to settle, and its future keeps no reference to the limiter
    /// (a failed call still settles: a 429 pauses the key). The default is
    /// `false`; override it only for a reader that never reports.
    fn reads_nothing(&self) -> bool {
        false
    }
}

/// The default [`ReadUsage`]: the response's own [`ReportsUsage`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Reported;

impl<Res: ReportsUsage> ReadUsage<Res> for Reported {
    #[inline]
    fn tokens_used(&self, res: &Res) -> Option<u64> {
        res.tokens_used()
    }
    #[inline]
    fn server_limits(&self, res: &Res) -> ServerLimits {
        res.server_limits()
    }
}

impl<Res> ReadUsage<Res> for IgnoreUsage {
    #[inline]
    fn reads_nothing(&self) -> bool {
        true
    }
    #[inline]
    fn tokens_used(&self, _: &Res) -> Option<u64> {
        None
    }
    #[inline]
    fn server_limits(&self, _: &Res) -> ServerLimits {
        ServerLimits::default()
    }
}

/// A server's limit per `server_window`, as a limit per `window` (rounded
/// down; saturated): how a limit from the provider's headers compares with
/// ours.
pub(crate) fn scale_limit(
    limit: u64,
    window: std::time::Duration,
    server_window: std::time::Duration,
) -> u64 {
    let s = u128::from(limit) * window.as_nanos() / server_window.as_nanos().max(1);
    u64::try_from(s).unwrap_or(u64::MAX)
}

/// The server's wait hint of a 429, from the same headers the classifier
/// reads.
fn hint_of(view: &dyn HttpView) -> Option<std::time::Duration> {
    hint::server_hint(view, SystemTime::now())
}

/// What an admitted call that ended with a result means for its limit: the
/// rules the in-process and the fleet limiters share.
pub(crate) enum Outcome {
    /// Answered, with usage or limit headers to settle by.
    Reported {
        used: Option<u64>,
        server: ServerLimits,
    },
    /// A 429 the classifier reads as a rate limit: the provider charged
    /// nothing; pause the key for the hint (uncapped), if any.
    Throttled {
        hint: Option<std::time::Duration>,
        server: ServerLimits,
    },
    /// Another upstream failure: charged as estimated; its headers (maybe
    /// none) still steer.
    Failed { server: ServerLimits },
    /// A layer below refused without sending anything: give it all back.
    NotSent,
    /// Nothing to settle (answered without usage or headers, or a failure
    /// that says nothing of the provider).
    Nothing,
}

impl Outcome {
    /// The outcome of a call that ended with `result`, read with `usage`
    /// and `classifier`. Cheap for an answer without usage or headers.
    #[inline]
    pub(crate) fn of<Res, U: ReadUsage<Res>>(
        usage: &U,
        classifier: &LlmClassifier,
        result: Result<&Res, &Error>,
    ) -> Self {
        match result {
            Ok(res) => {
                let used = usage.tokens_used(res);
                let server = usage.server_limits(res);
                if used.is_none() && server.is_empty() {
                    return Self::Nothing;
                }
                Self::Reported { used, server }
            }
            Err(err @ Error::Upstream { .. }) => Self::upstream(classifier, err),
            Err(
                Error::CircuitOpen { .. }
                | Error::QueueFull { .. }
                | Error::QueueTimeout { .. }
                | Error::RateLimited { .. }
                | Error::Shutdown,
            ) => Self::NotSent,
            Err(_) => Self::Nothing,
        }
    }

    #[cold]
    fn upstream(classifier: &LlmClassifier, err: &Error) -> Self {
        let view = classifier.http_view(err);
        let server = view.map(ServerLimits::from_view).unwrap_or_default();
        let throttled = view.is_some_and(|v| v.status() == Some(429))
            && classifier.classify_error(err).reason() == Reason::RateLimited;
        if throttled {
            Self::Throttled {
                hint: view.and_then(hint_of),
                server,
            }
        } else {
            Self::Failed { server }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::HttpError;

    /// How each way a call can end is settled, by both limiters.
    #[test]
    fn a_call_ends_in_the_outcome_it_settles_by() {
        struct Resp(Option<u64>);
        impl ReportsUsage for Resp {
            fn tokens_used(&self) -> Option<u64> {
                self.0
            }
            fn server_limits(&self) -> ServerLimits {
                ServerLimits::default()
            }
        }
        let c = LlmClassifier::new();
        let of = |r: Result<&Resp, &Error>| Outcome::of(&Reported, &c, r);
        assert!(matches!(of(Ok(&Resp(None))), Outcome::Nothing));
        assert!(matches!(
            of(Ok(&Resp(Some(7)))),
            Outcome::Reported { used: Some(7), .. }
        ));
        assert!(matches!(
            Outcome::of(&IgnoreUsage, &c, Ok(&Resp(Some(7)))),
            Outcome::Nothing
        ));
        let throttled = Error::from_inner(
            HttpError::new(429)
                .with_error_code("rate_limit_exceeded")
                .with_header("retry-after", "20"),
        );
        assert!(matches!(
            of(Err(&throttled)),
            Outcome::Throttled { hint: Some(d), .. } if d == std::time::Duration::from_secs(20)
        ));
        // A 429 that means "quota exhausted" is not a rate limit.
        let quota = Error::from_inner(HttpError::new(429).with_error_code("insufficient_quota"));
        assert!(matches!(of(Err(&quota)), Outcome::Failed { .. }));
        let failed = Error::from_inner(HttpError::new(500));
        assert!(matches!(of(Err(&failed)), Outcome::Failed { .. }));
        assert!(matches!(of(Err(&Error::Shutdown)), Outcome::NotSent));
    }

    #[test]
    fn reads_openai_and_anthropic_headers() {
        let e = HttpError::new(200)
            .with_header("x-ratelimit-limit-requests", "500")
            .with_header("x-ratelimit-remaining-requests", "499")
            .with_header("x-ratelimit-limit-tokens", "30000")
            .with_header("x-ratelimit-remaining-tokens", "bogus");
        let s = ServerLimits::from_view(&e);
        assert_eq!(s.requests.limit, Some(500));
        assert_eq!(s.requests.remaining, Some(499));
        assert_eq!(s.tokens.limit, Some(30_000));
        assert_eq!(s.tokens.remaining, None);

        let e = HttpError::new(200)
            .with_header("anthropic-ratelimit-requests-limit", "50")
            .with_header("anthropic-ratelimit-requests-remaining", "3")
            .with_header("anthropic-ratelimit-input-tokens-limit", "30000")
            .with_header("anthropic-ratelimit-input-tokens-remaining", "900")
            .with_header("anthropic-ratelimit-output-tokens-limit", "8000")
            .with_header("anthropic-ratelimit-output-tokens-remaining", "7000");
        let s = ServerLimits::from_view(&e);
        assert_eq!(s.requests.remaining, Some(3));
        assert_eq!(s.tokens.limit, None);
        assert_eq!(s.tokens.remaining, Some(900));
        assert!(ServerLimits::from_view(&HttpError::new(200)).is_empty());
    }
}
