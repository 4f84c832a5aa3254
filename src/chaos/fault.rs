//! What the chaos layer injects: faults, latency distributions and time
//! windows.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{HttpError, Transport};
use crate::error::{BoxError, ConfigError, Error};

/// A latency distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniform in `[min, max)`.
    Uniform {
        /// The shortest delay.
        min: Duration,
        /// The longest delay (exclusive).
        max: Duration,
    },
    /// Exponential with this mean (a long tail, like real model latency),
    /// cut at `max`.
    Exponential {
        /// The mean delay.
        mean: Duration,
        /// The cap.
        max: Duration,
    },
}

impl Latency {
    /// A sample, from `u` uniform in `[0, 1)`.
    pub fn sample(&self, u: f64) -> Duration {
        let u = if u.is_finite() {
            u.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let span = max.saturating_sub(min).as_secs_f64();
                let extra = Duration::try_from_secs_f64(span * u).unwrap_or(Duration::MAX);
                min.saturating_add(extra).min(max)
            }
            Latency::Exponential { mean, max } => {
                // Inverse CDF; 1 - u is in (0, 1], so the log is finite.
                let x = -mean.as_secs_f64() * (1.0 - u).ln();
                match Duration::try_from_secs_f64(x.max(0.0)) {
                    Ok(d) if d < max => d,
                    _ => max,
                }
            }
        }
    }

    pub(crate) fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        match *self {
            Latency::Uniform { min, max } if min > max => {
                Err(ConfigError::new(field, "needs min <= max"))
            }
            Latency::Exponential { mean, max } if mean.is_zero() || max < mean => {
                Err(ConfigError::new(field, "needs 0 < mean <= max"))
            }
            _ => Ok(()),
        }
    }
}

type MakeError = Arc<dyn Fn() -> BoxError + Send + Sync>;

/// A failure the chaos layer answers with instead of calling the inner
/// service.
///
/// LLM-shaped faults are [`HttpError`]s (status, provider type and code,
/// `retry-after` headers), answered as [`Error::Upstream`], so the
/// [`LlmClassifier`](crate::classify::LlmClassifier) and every layer above
/// see exactly what a real provider failure would look like.
#[derive(Clone)]
#[non_exhaustive]
pub enum Fault {
    /// An LLM HTTP failure, answered as [`Error::Upstream`].
    Http(HttpError),
    /// Waits this long, then answers [`Error::Timeout`] (an attempt that
    /// hung until its timeout).
    Timeout(Duration),
    /// Any error, built on each injection, answered as [`Error::Upstream`]
    /// (or taken back as it is when it is already an [`Error`]).
    Custom(MakeError),
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Http(e) => f.debug_tuple("Http").field(e).finish(),
            Fault::Timeout(d) => f.debug_tuple("Timeout").field(d).finish(),
            Fault::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl Fault {
    /// 429 `rate_limit_exceeded`, with `retry-after-ms` (and a whole-second
    /// `retry-after`) when `retry_after` is given.
    pub fn rate_limited(retry_after: Option<Duration>) -> Self {
        let mut e = HttpError::new(429)
            .with_error_type("requests")
            .with_error_code("rate_limit_exceeded");
        if let Some(d) = retry_after {
            e = e
                .with_header("retry-after-ms", d.as_millis().to_string())
                .with_header("retry-after", d.as_secs_f64().ceil().to_string());
        }
        Fault::Http(e)
    }

    /// 429 `insufficient_quota` (permanent).
    pub fn insufficient_quota() -> Self {
        Fault::Http(
            HttpError::new(429)
                .with_error_type("insufficient_quota")
                .with_error_code("insufficient_quota"),
        )
    }

    /// Anthropic's 529 `overloaded_error`.
    pub fn overloaded() -> Self {
        Fault::Http(HttpError::new(529).with_error_type("overloaded_error"))
    }

    /// 400 `context_length_exceeded` (a bad request).
    pub fn context_length() -> Self {
        Fault::Http(
            HttpError::new(400)
                .with_error_type("invalid_request_error")
                .with_error_code("context_length_exceeded"),
        )
    }

    /// A bare HTTP status (500, 502, 503, 504, 401, …).
    pub fn status(status: u16) -> Self {
        Fault::Http(HttpError::new(status))
    }

    /// A failure below HTTP (connect refused, connection reset).
    pub fn transport(kind: Transport) -> Self {
        Fault::Http(HttpError::transport(kind))
    }

    /// Any error, made fresh on each injection.
    pub fn custom<E, F>(make: F) -> Self
    where
        F: Fn() -> E + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Fault::Custom(Arc::new(move || make().into()))
    }

    /// The error answered (after any wait).
    pub(crate) fn to_error(&self) -> Error {
        match self {
            Fault::Http(e) => Error::Upstream {
                source: Box::new(e.clone()),
            },
            Fault::Timeout(after) => Error::Timeout { after: *after },
            Fault::Custom(make) => Error::from_inner(make()),
        }
    }

    /// How long to wait before answering.
    pub(crate) fn wait(&self) -> Duration {
        match self {
            Fault::Timeout(after) => *after,
            _ => Duration::ZERO,
        }
    }
}

/// A span of time, measured from when the layer was built (or from the
/// last [`ChaosHandle::restart_clock`](super::ChaosHandle::restart_clock)):
/// `[from, until)`, open-ended without `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Window {
    /// Start, inclusive.
    pub from: Duration,
    /// End, exclusive; `None` for ever.
    pub until: Option<Duration>,
}

impl Window {
    /// All the time.
    pub const ALWAYS: Window = Window {
        from: Duration::ZERO,
        until: None,
    };

    /// `[from, until)`.
    pub const fn between(from: Duration, until: Duration) -> Self {
        Window {
            from,
            until: Some(until),
        }
    }

    /// From `from` on.
    pub const fn after(from: Duration) -> Self {
        Window { from, until: None }
    }

    /// Whether `elapsed` is inside.
    pub fn contains(&self, elapsed: Duration) -> bool {
        elapsed >= self.from && self.until.is_none_or(|u| elapsed < u)
    }
}
