//! What both clients' builders validate and build the same way: the base
//! URL, the timeouts, the body caps, the reqwest client (with extra root
//! certificates) and the attempt headers. The builders keep their own
//! setters, whose defaults and docs are the provider's.

use std::time::Duration;

use super::idempotency::{AttemptHeaders, IDEMPOTENCY_KEY_HEADER, RETRY_COUNT_HEADER};
use crate::error::ConfigError;

/// A duration at or above this (about 100 years) means "no limit": adding it
/// to the clock could overflow, and no call waits that long anyway.
const NO_LIMIT_FROM: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `Ok(None)` for "no limit" (from [`NO_LIMIT_FROM`] up), an error for zero.
pub(crate) fn limit(d: Duration, field: &'static str) -> Result<Option<Duration>, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(field, "must be greater than zero"))
    } else if d >= NO_LIMIT_FROM {
        Ok(None)
    } else {
        Ok(Some(d))
    }
}

/// [`limit`] of a setting that may be off (`None`).
pub(crate) fn opt_limit(
    d: Option<Duration>,
    field: &'static str,
) -> Result<Option<Duration>, ConfigError> {
    d.map_or(Ok(None), |d| limit(d, field))
}

/// A size cap: zero is an error.
pub(crate) fn positive(n: usize, field: &'static str) -> Result<usize, ConfigError> {
    if n == 0 {
        Err(ConfigError::new(field, "must be greater than zero"))
    } else {
        Ok(n)
    }
}

/// The base URL, parsed: `http` or `https`, a host, no query or fragment
/// (the endpoint's path is appended to it).
pub(crate) fn base_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let parsed = reqwest::Url::parse(raw.trim_end_matches('/'))
        .map_err(|_| ConfigError::new("base_url", "must be an absolute http(s) URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            "base_url",
            "scheme must be http or https (the only ones this client serves)",
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new("base_url", "must name a host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::new(
            "base_url",
            "must not have a query or fragment (the path is appended to it)",
        ));
    }
    Ok(parsed)
}

/// The reqwest client: the caller's own (then its timeouts and roots are
/// its own, and extra roots are an error), or one built with the connect
/// and total timeouts and the extra root certificates.
pub(crate) fn http_client(
    given: Option<reqwest::Client>,
    root_certificates: &[Vec<u8>],
    connect_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
) -> Result<reqwest::Client, ConfigError> {
    match given {
        Some(_) if !root_certificates.is_empty() => Err(ConfigError::new(
            "root_certificate",
            "add it to the reqwest client given to http_client instead",
        )),
        Some(c) => Ok(c),
        None => {
            let mut b = reqwest::Client::builder();
            if let Some(t) = connect_timeout {
                b = b.connect_timeout(t);
            }
            if let Some(t) = total_timeout {
                b = b.timeout(t);
            }
            for pem in root_certificates {
                let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|_| {
                    ConfigError::new("root_certificate", "must be PEM certificates")
                })?;
                if certs.is_empty() {
                    return Err(ConfigError::new(
                        "root_certificate",
                        "holds no PEM certificate",
                    ));
                }
                for c in certs {
                    b = b.add_root_certificate(c);
                }
            }
            b.build()
                .map_err(|_| ConfigError::new("http_client", "could not be built"))
        }
    }
}

/// The attempt headers a client sends: the ones asked for, except where a
/// default header of the same name is the caller's choice (`has_header`).
/// Tells the retry layer that someone reads the attempt.
pub(crate) fn attempt_headers(
    wanted: AttemptHeaders,
    has_header: impl Fn(&str) -> bool,
) -> AttemptHeaders {
    let headers = AttemptHeaders {
        key: wanted.key && !has_header(IDEMPOTENCY_KEY_HEADER),
        retry_count: wanted.retry_count && !has_header(RETRY_COUNT_HEADER),
    };
    if headers.key || headers.retry_count {
        crate::retry::Attempt::listen();
    }
    headers
}

/// The transport knobs both clients' builders share, at their defaults:
/// connect 5 s; first byte and total 10 minutes (the OpenAI and Anthropic
/// SDKs' request timeout); 60 s between stream events; 5 s for an error
/// body; 32 MiB bodies and 4 MiB events; both attempt headers on.
pub(crate) struct Knobs {
    pub(crate) connect_timeout: Duration,
    pub(crate) first_byte_timeout: Option<Duration>,
    pub(crate) total_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) error_body_timeout: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_event_bytes: usize,
    pub(crate) root_certificates: Vec<Vec<u8>>,
    pub(crate) http: Option<reqwest::Client>,
    pub(crate) attempt_headers: AttemptHeaders,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Some(Duration::from_secs(600)),
            total_timeout: Some(Duration::from_secs(600)),
            idle_timeout: Some(Duration::from_secs(60)),
            error_body_timeout: Duration::from_secs(5),
            max_body_bytes: super::DEFAULT_MAX_BODY_BYTES,
            max_event_bytes: super::DEFAULT_MAX_EVENT_BYTES,
            root_certificates: Vec::new(),
            http: None,
            attempt_headers: AttemptHeaders::default(),
        }
    }
}

/// The checked [`Knobs`]: each limit `None` when too long to matter.
pub(crate) struct Checked {
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) first_byte_timeout: Option<Duration>,
    pub(crate) total_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) error_body_timeout: Option<Duration>,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_event_bytes: usize,
    pub(crate) http: reqwest::Client,
    pub(crate) attempt_headers: AttemptHeaders,
}

impl Knobs {
    /// Checks the knobs and builds (or takes) the HTTP client.
    pub(crate) fn check(self) -> Result<Checked, ConfigError> {
        let max_body_bytes = positive(self.max_body_bytes, "max_body_bytes")?;
        let max_event_bytes = positive(self.max_event_bytes, "max_event_bytes")?;
        let connect_timeout = limit(self.connect_timeout, "connect_timeout")?;
        let first_byte_timeout = opt_limit(self.first_byte_timeout, "first_byte_timeout")?;
        let total_timeout = opt_limit(self.total_timeout, "total_timeout")?;
        let idle_timeout = opt_limit(self.idle_timeout, "stream_idle_timeout")?;
        let error_body_timeout = limit(self.error_body_timeout, "error_body_timeout")?;
        let http = http_client(
            self.http,
            &self.root_certificates,
            connect_timeout,
            total_timeout,
        )?;
        Ok(Checked {
            connect_timeout,
            first_byte_timeout,
            total_timeout,
            idle_timeout,
            error_body_timeout,
            max_body_bytes,
            max_event_bytes,
            http,
            attempt_headers: self.attempt_headers,
        })
    }
}

/// The setters of the [`Knobs`] both clients' builders share, on a builder
/// with a `transport` field; the docs that differ are arguments.
macro_rules! transport_setters {
    (idle: $idle:literal, body: $body:literal, too_large: $too_large:literal, own_key: $own_key:literal $(,)?) => {
        /// Time to establish a connection; default 5 s (the official
        /// SDKs').
        pub fn connect_timeout(mut self, t: ::std::time::Duration) -> Self {
            self.transport.connect_timeout = t;
            self
        }

        /// Time from sending the request to the response headers, streamed
        /// or not; default 10 minutes. A non-streamed answer's headers come
        /// only once the whole answer is generated, so the default is the
        /// official SDKs' request timeout; a stream's headers come at once,
        /// so a streaming-only client may set it lower. It holds even with
        /// [`no_total_timeout`](Self::no_total_timeout).
        pub fn first_byte_timeout(mut self, t: ::std::time::Duration) -> Self {
            self.transport.first_byte_timeout = Some(t);
            self
        }

        /// Time for the whole request, body and stream included; default 10
        /// minutes (the OpenAI and Anthropic SDKs' request timeout).
        pub fn total_timeout(mut self, t: ::std::time::Duration) -> Self {
            self.transport.total_timeout = Some(t);
            self
        }

        /// No total timeout (streams that may run for long). The first-byte
        /// and stream idle timeouts still hold.
        pub fn no_total_timeout(mut self) -> Self {
            self.transport.total_timeout = None;
            self
        }

        #[doc = $idle]
        pub fn stream_idle_timeout(mut self, t: ::std::time::Duration) -> Self {
            self.transport.idle_timeout = Some(t);
            self
        }

        /// How long the body of an error response (4xx, 5xx) may take once
        /// its headers arrived; default 5 s. Past it the error is reported
        /// with what the headers say (status, `retry-after`), so a 429 whose
        /// body never comes does not hold the caller. At most 64 KiB of it
        /// is read.
        pub fn error_body_timeout(mut self, t: ::std::time::Duration) -> Self {
            self.transport.error_body_timeout = t;
            self
        }

        #[doc = $body]
        /// Default [`DEFAULT_MAX_BODY_BYTES`] (32 MiB). Past it the call
        /// fails with
        #[doc = $too_large]
        /// (permanent: the same request would get the same answer), found
        /// while the body arrives, never after buffering it.
        pub fn max_body_bytes(mut self, n: usize) -> Self {
            self.transport.max_body_bytes = n;
            self
        }

        /// The largest single server-sent event of a stream, in bytes;
        /// default [`DEFAULT_MAX_EVENT_BYTES`] (4 MiB). A larger one ends
        /// the stream with
        #[doc = $too_large]
        pub fn max_event_bytes(mut self, n: usize) -> Self {
            self.transport.max_event_bytes = n;
            self
        }

        /// Also trust this PEM-encoded root certificate (one or more
        /// certificates) for `https://`, e.g. a private gateway's CA.
        /// Checked at [`build`](Self::build).
        pub fn add_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
            self.transport.root_certificates.push(pem.into());
            self
        }

        /// Whether every request carries an `Idempotency-Key`
        /// ([`IDEMPOTENCY_KEY_HEADER`](crate::client::IDEMPOTENCY_KEY_HEADER));
        /// default on. The key is one per logical request: the same on every
        /// attempt the crate's retry layer makes of it, a new one for the
        /// next call (see [`retry::attempt`](crate::retry::attempt)), or the
        /// request's own
        #[doc = $own_key]
        /// A server that deduplicates (a gateway, a proxy with a response
        /// cache) then runs a retried request once; one that does not
        /// ignores the header. A [`header`](Self::header) of the same name
        /// replaces it.
        pub fn send_idempotency_key(mut self, on: bool) -> Self {
            self.transport.attempt_headers.key = on;
            self
        }

        /// Whether every request carries the retries taken before it, `0`
        /// on the first attempt
        /// ([`RETRY_COUNT_HEADER`](crate::client::RETRY_COUNT_HEADER),
        /// `x-stainless-retry-count`, as the official SDKs send it); default
        /// on, as in the SDKs. A [`header`](Self::header) of the same name
        /// replaces it.
        pub fn send_retry_count(mut self, on: bool) -> Self {
            self.transport.attempt_headers.retry_count = on;
            self
        }

        /// Use this reqwest client (its own TLS, proxy and pool settings)
        /// instead of building one; the connect and total timeouts and root
        /// certificates are then the client's.
        pub fn http_client(mut self, client: reqwest::Client) -> Self {
            self.transport.http = Some(client);
            self
        }
    };
}
pub(crate) use transport_setters;
