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
