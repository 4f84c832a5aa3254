//! Classification: what a call's result means for retry, breaker, fallback and
//! metrics.
//!
//! One [`Classify`] decides, for a `Result<&Response, &Error>`, an
//! [`Outcome`]: success; transient (retrying may help, with an optional server
//! wait hint); permanent (retrying cannot help and the target is unhealthy for
//! this caller: auth, quota, missing model); or a bad request (the target is
//! healthy, the request is not: context too long, invalid request). Each
//! failure also carries a [`Reason`], a stable code that every layer and the
//! metrics use.
//!
//! ```
//! use llm_resilience::classify::{Classify, HttpError, LlmClassifier, Outcome, Reason};
//! use llm_resilience::Error;
//!
//! let quota = HttpError::new(429).with_error_code("insufficient_quota");
//! // Any error: the crate's own, an upstream's, or one wrapped in `Error`.
//! assert_eq!(LlmClassifier::new().classify_error(&quota), Outcome::permanent(Reason::Quota));
//! let err = Error::from_inner(quota);
//! let outcome = Classify::<()>::classify(&LlmClassifier::new(), Err(&err));
//! assert_eq!(outcome, Outcome::permanent(Reason::Quota));
//! ```
//!
//! # The LLM preset
//!
//! [`LlmClassifier`] reads what the OpenAI, Anthropic and Gemini APIs and
//! their SDKs say each failure means, over an [`HttpView`]: any error that
//! exposes a status, headers and the provider's error type and code.
//!
//! | signal | outcome ([`Reason`]) |
//! |---|---|
//! | connect, DNS or TLS failure; reset before the response; transport timeout | transient (`Connect`, `Network`, `Timeout`) |
//! | 408; 409 | transient (`Timeout`; `Conflict`) |
//! | 429 `rate_limit_exceeded`, `rate_limit_error`, per-minute `RESOURCE_EXHAUSTED` | transient (`RateLimited`) |
//! | 429 or 4xx `insufficient_quota`, `*_spend_limit_exceeded`, `credit_balance_exhausted`, `enforced_spend_limit_reached`, `billing_error`, daily `RESOURCE_EXHAUSTED`; 402 | permanent (`Quota`) |
//! | 401, 403 | permanent (`Auth`) |
//! | 404 | permanent (`NotFound`) |
//! | 413; 4xx `context_length_exceeded` or "prompt is too long" | bad request (`ContextLength`) |
//! | 4xx `content_policy_violation`, `content_filter` | bad request (`ContentPolicy`) |
//! | other 400, 422 | bad request (`InvalidRequest`) |
//! | 529 or `overloaded_error` | transient (`Overloaded`) |
//! | 503; 500, 502, 504 and other 5xx | transient (`Unavailable`; `ServerError`) |
//! | `x-should-retry: true` / `false` | overrides the status: transient / permanent (`ServerSaidNoRetry`) |
//!
//! A transient or permanent outcome carries the server's wait hint, read by
//! [`hint::server_hint`] (`retry-after-ms`, `retry-after`, the rate-limit
//! reset headers on a 429). The crate's [`HttpError`] is one; a
//! client's own error type can be another ([`LlmClassifier::with_view`]).
//! Transport failures (`std::io::Error`, timeouts) are recognised in the
//! source chain, and with the `reqwest` feature so is a `reqwest::Error`:
//! by its status (an `error_for_status()` error is classified as that
//! status) or as a connect, timeout or broken-connection failure. An error nobody recognises is treated as transient
//! ([`Reason::Unknown`]): a bounded retry of an unknown failure is cheaper
//! than giving up on a blip, and the retry budget bounds the cost.
//!
//! # Bring your own client
//!
//! Any client's errors are classifiable; the layers need no other glue.
//!
//! - **reqwest, as it is**: with the `reqwest` feature a `reqwest::Error` is
//!   recognised: an `error_for_status()?` error by its status (a 401 is
//!   permanent, a 429 transient), a connect or timeout failure as such.
//!   Headers and body are gone by then; for the provider's error code and
//!   the `retry-after` hint, build the error from the response instead
//!   ([`HttpError::from_response`], feature `json`: status, headers and
//!   body, every provider's error shape read).
//! - **Any error type**: return an [`HttpError`] (or keep one in your
//!   error's source chain), or implement [`HttpView`] for your type: a
//!   status and a header lookup are enough.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::classify::{HttpView, LlmClassifier, Outcome, Reason};
//!
//! #[derive(Debug)]
//! struct MyError { status: u16, retry_after: Option<String> }
//! impl std::fmt::Display for MyError {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "status {}", self.status)
//!     }
//! }
//! impl std::error::Error for MyError {}
//!
//! impl HttpView for MyError {
//!     fn status(&self) -> Option<u16> {
//!         Some(self.status)
//!     }
//!     fn header(&self, name: &str) -> Option<&str> {
//!         if name == "retry-after" { self.retry_after.as_deref() } else { None }
//!     }
//! }
//!
//! // Give this classifier to the layers (`RetryLayer::builder().classifier(…)`).
//! let classifier = LlmClassifier::new().with_view::<MyError>();
//! let err = MyError { status: 429, retry_after: Some("2".into()) };
//! assert_eq!(
//!     classifier.classify_error(&err),
//!     Outcome::Transient { reason: Reason::RateLimited, retry_after: Some(Duration::from_secs(2)) }
//! );
//! ```
//!
//! The crate's `examples/async-openai` wraps async-openai's client this way
//! with `tower::service_fn`: one function turns its error into an
//! [`HttpError`].
//!
//! # Closures
//!
//! Any `Fn(Result<&Res, &Error>) -> Outcome + Send + Sync + 'static` is a
//! classifier, so a one-off rule needs no type of its own. Wrap the closure
//! in [`classify_fn`]: it tells the compiler that the closure takes
//! references of any lifetime, which it cannot guess when the closure is
//! handed straight to a builder (it then fails with "implementation of
//! `FnOnce` is not general enough").

pub mod hint;
mod http;

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::guard::GuardedResponse;
pub use crate::reason::Reason;

pub use self::http::{
    classify_http, classify_http_at, header_matters, HttpError, HttpView, Transport,
};

/// What a call's result means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The call worked.
    Success,
    /// Retrying may help.
    Transient {
        /// Why it failed.
        reason: Reason,
        /// How long the server asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help and the target is unhealthy for this caller.
    Permanent {
        /// Why it failed.
        reason: Reason,
        /// When the server said the target will take calls again (a 429
        /// `insufficient_quota` with `retry-after`, an open breaker's next
        /// probe). A retry does not wait for it; a breaker stays open for it.
        retry_after: Option<Duration>,
    },
    /// The request itself is wrong for this target; the target is healthy.
    BadRequest {
        /// What is wrong with it.
        reason: Reason,
    },
}

impl Outcome {
    /// A transient outcome without a server hint.
    pub const fn transient(reason: Reason) -> Self {
        Outcome::Transient {
            reason,
            retry_after: None,
        }
    }

    /// A permanent outcome without a server hint.
    pub const fn permanent(reason: Reason) -> Self {
        Outcome::Permanent {
            reason,
            retry_after: None,
        }
    }

    /// The server's wait hint, for a transient or permanent outcome.
    pub const fn retry_after(&self) -> Option<Duration> {
        match *self {
            Outcome::Transient { retry_after, .. } | Outcome::Permanent { retry_after, .. } => {
                retry_after
            }
            _ => None,
        }
    }

    /// The reason, [`Reason::Ok`] for a success.
    pub const fn reason(&self) -> Reason {
        match *self {
            Outcome::Success => Reason::Ok,
            Outcome::Transient { reason, .. }
            | Outcome::Permanent { reason, .. }
            | Outcome::BadRequest { reason } => reason,
        }
    }

    /// Whether a circuit breaker counts this outcome as a failure of the
    /// target: transient and permanent failures do, successes and bad
    /// requests do not (the target answered correctly).
    pub const fn is_target_failure(&self) -> bool {
        matches!(self, Outcome::Transient { .. } | Outcome::Permanent { .. })
    }

    /// Whether the outcome is a success.
    pub const fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }
}

/// Decides what a call's result means. Shared by every layer.
///
/// Implemented by [`LlmClassifier`] and by every
/// `Fn(Result<&Res, &Error>) -> Outcome + Send + Sync + 'static`.
pub trait Classify<Res>: Send + Sync + 'static {
    /// Classifies one result. Called once per attempt; keep it cheap on `Ok`.
    fn classify(&self, result: Result<&Res, &Error>) -> Outcome;

    /// For a streamed response whose outcome is known only at the stream's
    /// end: the response, to which a circuit breaker attaches the guard
    /// that records that outcome ([`crate::guard`]). `None` (the default):
    /// the response itself is the outcome.
    #[inline]
    fn stream<'a>(&self, response: &'a mut Res) -> Option<&'a mut dyn GuardedResponse> {
        let _ = response;
        None
    }

    /// Classifies the error a stream ended with after its response was
    /// delivered (an error event, a cut connection, an idle timeout). The
    /// default reads it as the [`LlmClassifier`] preset does.
    fn classify_stream_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome {
        LlmClassifier::new().classify_error(err)
    }
}

impl<Res, F> Classify<Res> for F
where
    F: Fn(Result<&Res, &Error>) -> Outcome + Send + Sync + 'static,
{
    fn classify(&self, result: Result<&Res, &Error>) -> Outcome {
        self(result)
    }
}

/// Pins a closure's signature as a classifier, so that it compiles written
/// the natural way.
///
/// ```
/// use std::time::Duration;
/// use llm_resilience::classify::{classify_fn, LlmClassifier, Outcome, Reason};
/// use llm_resilience::retry::RetryLayer;
/// use llm_resilience::Error;
///
/// // Retry only timeouts; everything else is final.
/// let only_timeouts = classify_fn(|result: Result<&String, &Error>| match result {
///     Ok(_) => Outcome::Success,
///     Err(Error::Timeout { .. }) => Outcome::transient(Reason::Timeout),
///     Err(_) => Outcome::permanent(Reason::Unknown),
/// });
/// let retry = RetryLayer::builder().classifier(only_timeouts).build()?;
///
/// // Or refine the preset: an empty answer is worth another try.
/// let preset = LlmClassifier::new();
/// let empty_is_transient = classify_fn(move |result: Result<&String, &Error>| match result {
///     Ok(text) if text.is_empty() => Outcome::transient(Reason::Unknown),
///     other => preset.classify(other),
/// });
/// # use llm_resilience::classify::Classify;
/// # let _ = (retry, empty_is_transient);
/// # Ok::<(), llm_resilience::ConfigError>(())
/// ```
pub fn classify_fn<Res, F>(f: F) -> F
where
    F: Fn(Result<&Res, &Error>) -> Outcome + Send + Sync + 'static,
{
    f
}

pub(crate) type ViewFn =
    for<'a> fn(&'a (dyn std::error::Error + 'static)) -> Option<&'a dyn HttpView>;

/// The LLM preset: the table in the [module docs](self) and the server
/// hints of [`hint`], over any error that exposes an [`HttpView`].
///
/// Every `Ok` is a success (adapters turn non-2xx answers into errors, as the
/// crate's client does). An error is looked at through the crate's
/// [`Error`]: its own variants keep their meaning (a breaker's
/// [`Error::CircuitOpen`] below a retry is permanent, so a retry never
/// hammers an open circuit; a rate limiter's [`Error::RateLimited`] is
/// transient with its hint), and an [`Error::Upstream`] is searched along
/// its source chain for an [`HttpError`], for any type registered with
/// [`with_view`](Self::with_view), and for transport errors.
#[derive(Clone)]
pub struct LlmClassifier {
    views: Vec<ViewFn>,
}

impl fmt::Debug for LlmClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClassifier")
            .field("views", &self.views.len())
            .finish()
    }
}

impl Default for LlmClassifier {
    fn default() -> Self {
        Self::new()
    }
}

fn view_of<'a, T: HttpView + std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a dyn HttpView> {
    e.downcast_ref::<T>().map(|t| t as &dyn HttpView)
}

impl LlmClassifier {
    /// The preset, recognising [`HttpError`] and transport errors.
    pub fn new() -> Self {
        let views: Vec<ViewFn> = vec![
            view_of::<HttpError>,
            #[cfg(feature = "reqwest")]
            crate::client::REQWEST_VIEW,
        ];
        Self { views }
    }

    /// Also recognise `T` (a client's own error type that implements
    /// [`HttpView`]) anywhere in an upstream error's source chain.
    pub fn with_view<T: HttpView + std::error::Error + 'static>(mut self) -> Self {
        self.views.push(view_of::<T>);
        self
    }

    /// Classifies any error: the crate's [`Error`] (the `Err` half of
    /// [`Classify::classify`]), or an upstream's error with its source
    /// chain, with no wrapping and no type parameter.
    pub fn classify_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome {
        match err.downcast_ref::<Error>() {
            Some(ours) => self.classify_ours(ours),
            None => self.classify_chain(err),
        }
    }

    fn classify_ours(&self, err: &Error) -> Outcome {
        match err {
            Error::Upstream { source } => self.classify_chain(&**source),
            Error::Timeout { .. } => Outcome::transient(Reason::Timeout),
            Error::CircuitOpen { retry_after } => Outcome::Permanent {
                reason: Reason::CircuitOpen,
                retry_after: Some(*retry_after),
            },
            Error::RateLimited { retry_after } => Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(*retry_after),
            },
            Error::QueueFull { .. } | Error::QueueTimeout { .. } => {
                Outcome::permanent(Reason::QueueFull)
            }
            Error::DeadlineExceeded { .. } => Outcome::permanent(Reason::Timeout),
            Error::Shutdown => Outcome::permanent(Reason::Shutdown),
            Error::RetriesExhausted { reason, .. }
            | Error::BudgetExhausted { reason, .. }
            | Error::NotCloneable { reason, .. } => Outcome::transient(*reason),
            Error::RetryAfterTooLong { retry_after, .. } => Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(*retry_after),
            },
            Error::Permanent { reason, .. } => Outcome::permanent(*reason),
            Error::BadRequest { reason, .. } => Outcome::BadRequest { reason: *reason },
        }
    }

    /// The [`HttpView`] of an upstream error (an [`HttpError`] or a type
    /// registered with [`with_view`](Self::with_view), anywhere in the
    /// source chain): its status and headers, for layers that read more
    /// than the outcome (the rate limiter reads the `x-ratelimit-*` state).
    pub fn http_view<'a>(&self, err: &'a Error) -> Option<&'a dyn HttpView> {
        let Error::Upstream { source } = err else {
            return None;
        };
        let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(&**source);
        while let Some(e) = cur {
            for view in &self.views {
                if let Some(v) = view(e) {
                    return Some(v);
                }
            }
            cur = e.source();
        }
        None
    }

    pub(crate) fn classify_chain(&self, source: &(dyn std::error::Error + 'static)) -> Outcome {
        let mut cur = Some(source);
        while let Some(e) = cur {
            for view in &self.views {
                if let Some(v) = view(e) {
                    return classify_http(v);
                }
            }
            if let Some(ours) = e.downcast_ref::<Error>() {
                return self.classify_ours(ours);
            }
            if let Some(t) = transport_of(e) {
                return t.outcome();
            }
            cur = e.source();
        }
        Outcome::transient(Reason::Unknown)
    }
}

fn transport_of(e: &(dyn std::error::Error + 'static)) -> Option<Transport> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind as K;
        return Some(match io.kind() {
            K::ConnectionRefused | K::NotFound | K::AddrNotAvailable => Transport::Connect,
            K::TimedOut | K::WouldBlock => Transport::Timeout,
            _ => Transport::Reset,
        });
    }
    if e.is::<tokio::time::error::Elapsed>() {
        return Some(Transport::Timeout);
    }
    None
}

impl<Res> Classify<Res> for LlmClassifier {
    #[inline]
    fn classify(&self, result: Result<&Res, &Error>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => self.classify_ours(e),
        }
    }

    fn classify_stream_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome {
        self.classify_error(err)
    }
}

#[cfg(test)]
mod tests;
