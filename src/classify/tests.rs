//! Unit tests of the classifier: the crate's own errors, the source chain,
//! `with_view`, and the outcome accessors.

use super::*;
use crate::error::BoxError;

fn boom() -> BoxError {
    "boom".into()
}

fn of(e: Error) -> Outcome {
    Classify::<()>::classify(&LlmClassifier::new(), Err(&e))
}

#[test]
fn the_crates_own_errors_keep_their_meaning() {
    let s = Duration::from_secs(3);
    assert_eq!(
        Classify::<()>::classify(&LlmClassifier::new(), Ok(&())),
        Outcome::Success
    );
    assert_eq!(
        of(Error::Timeout { after: s }),
        Outcome::transient(Reason::Timeout)
    );
    assert_eq!(
        of(Error::CircuitOpen { retry_after: s }),
        Outcome::Permanent {
            reason: Reason::CircuitOpen,
            retry_after: Some(s)
        }
    );
    assert_eq!(
        of(Error::RateLimited { retry_after: s }),
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(s)
        }
    );
    assert_eq!(
        of(Error::QueueFull { depth: 1 }),
        Outcome::permanent(Reason::QueueFull)
    );
    assert_eq!(
        of(Error::QueueTimeout { waited: s }),
        Outcome::permanent(Reason::QueueFull)
    );
    assert_eq!(
        of(Error::DeadlineExceeded {
            attempts: 1,
            source: None
        }),
        Outcome::permanent(Reason::Timeout)
    );
    assert_eq!(of(Error::Shutdown), Outcome::permanent(Reason::Shutdown));
    for e in [
        Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::Overloaded,
            source: boom(),
        },
        Error::BudgetExhausted {
            attempts: 3,
            reason: Reason::Overloaded,
            source: boom(),
        },
        Error::NotCloneable {
            reason: Reason::Overloaded,
            source: boom(),
        },
    ] {
        assert_eq!(of(e), Outcome::transient(Reason::Overloaded));
    }
    assert_eq!(
        of(Error::RetryAfterTooLong {
            retry_after: s,
            limit: s,
            attempts: 1,
            source: boom()
        }),
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(s)
        }
    );
    assert_eq!(
        of(Error::Permanent {
            reason: Reason::Auth,
            attempts: 1,
            source: boom()
        }),
        Outcome::permanent(Reason::Auth)
    );
    assert_eq!(
        of(Error::BadRequest {
            reason: Reason::ContextLength,
            attempts: 1,
            source: boom()
        }),
        Outcome::BadRequest {
            reason: Reason::ContextLength
        }
    );
}

#[test]
fn the_source_chain_is_searched() {
    use std::io::{Error as Io, ErrorKind as K};
    let up = |e: BoxError| of(Error::Upstream { source: e });
    assert_eq!(
        up(Box::new(Io::from(K::ConnectionRefused))),
        Outcome::transient(Reason::Connect)
    );
    assert_eq!(
        up(Box::new(Io::from(K::TimedOut))),
        Outcome::transient(Reason::Timeout)
    );
    assert_eq!(
        up(Box::new(Io::from(K::ConnectionReset))),
        Outcome::transient(Reason::Network)
    );
    assert_eq!(up(boom()), Outcome::transient(Reason::Unknown));
    // An HttpError below a wrapper of ours, or below a foreign wrapper.
    let wrapped = Error::Upstream {
        source: Box::new(Error::Permanent {
            reason: Reason::Auth,
            attempts: 1,
            source: Box::new(HttpError::new(401)),
        }),
    };
    assert_eq!(of(wrapped), Outcome::permanent(Reason::Auth));
    #[derive(Debug)]
    struct Wrap(HttpError);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrap")
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    assert_eq!(
        up(Box::new(Wrap(HttpError::new(404)))),
        Outcome::permanent(Reason::NotFound)
    );
}

#[tokio::test(start_paused = true)]
async fn an_elapsed_tokio_timeout_is_a_timeout() {
    let elapsed = tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>())
        .await
        .unwrap_err();
    assert_eq!(
        of(Error::Upstream {
            source: Box::new(elapsed)
        }),
        Outcome::transient(Reason::Timeout)
    );
}

/// A client's own error type, registered with `with_view`.
#[derive(Debug)]
struct Mine;
impl fmt::Display for Mine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mine")
    }
}
impl std::error::Error for Mine {}
impl HttpView for Mine {
    fn status(&self) -> Option<u16> {
        Some(529)
    }
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
}

#[test]
fn with_view_recognises_a_clients_own_error() {
    let e = Error::Upstream {
        source: Box::new(Mine),
    };
    assert_eq!(
        LlmClassifier::new().classify_error(&e),
        Outcome::transient(Reason::Unknown)
    );
    // What a view does not override, it does not know.
    assert_eq!(
        (
            Mine.error_type(),
            Mine.error_code(),
            Mine.error_message(),
            Mine.transport()
        ),
        (None, None, None, None)
    );
    let plain = LlmClassifier::default();
    let views = |c: &LlmClassifier| format!("{c:?}");
    let before = views(&plain);
    let c = plain.with_view::<Mine>();
    assert_eq!(c.classify_error(&e), Outcome::transient(Reason::Overloaded));
    // One view more than the preset's own (which depend on the features).
    let count = |d: String| -> usize {
        d.trim_start_matches("LlmClassifier { views: ")
            .trim_end_matches(" }")
            .parse()
            .unwrap()
    };
    assert_eq!(count(views(&c)), count(before) + 1);
}

#[test]
fn statuses_without_a_provider_code() {
    let c = |e: HttpError| classify_http(&e);
    assert_eq!(c(HttpError::new(402)), Outcome::permanent(Reason::Quota));
    assert_eq!(
        c(HttpError::new(400).with_error_code("insufficient_quota")),
        Outcome::permanent(Reason::Quota)
    );
    assert_eq!(
        c(HttpError::new(403).with_error_type("billing_error")),
        Outcome::permanent(Reason::Auth)
    );
    assert_eq!(c(HttpError::new(200)), Outcome::Success);
    assert_eq!(
        c(HttpError::new(418)),
        Outcome::BadRequest {
            reason: Reason::InvalidRequest
        }
    );
    assert_eq!(
        c(HttpError::new(599)),
        Outcome::transient(Reason::ServerError)
    );
    assert_eq!(
        c(HttpError::new(500).with_error_type("overloaded_error")),
        Outcome::transient(Reason::Overloaded)
    );
}

#[test]
fn outcome_accessors() {
    let s = Some(Duration::from_secs(1));
    let t = Outcome::Transient {
        reason: Reason::RateLimited,
        retry_after: s,
    };
    let p = Outcome::Permanent {
        reason: Reason::Quota,
        retry_after: s,
    };
    let b = Outcome::BadRequest {
        reason: Reason::InvalidRequest,
    };
    assert_eq!(
        (t.retry_after(), p.retry_after(), b.retry_after()),
        (s, s, None)
    );
    assert_eq!(Outcome::Success.retry_after(), None);
    assert_eq!(
        [
            t.reason(),
            p.reason(),
            b.reason(),
            Outcome::Success.reason()
        ],
        [
            Reason::RateLimited,
            Reason::Quota,
            Reason::InvalidRequest,
            Reason::Ok
        ]
    );
    assert_eq!(
        [t, p, b, Outcome::Success].map(|o| o.is_target_failure()),
        [true, true, false, false]
    );
    assert_eq!(
        [t, p, b, Outcome::Success].map(|o| o.is_success()),
        [false, false, false, true]
    );
    assert!(Reason::RateLimited.is_throttling() && Reason::Overloaded.is_throttling());
    assert!(!Reason::ServerError.is_throttling());
    assert_eq!(
        Reason::ServerSaidNoRetry.to_string(),
        "server_said_no_retry"
    );
}

#[test]
fn only_hints_limits_and_request_ids_matter() {
    for name in [
        "retry-after",
        "retry-after-ms",
        "x-ms-retry-after-ms",
        "x-should-retry",
        "x-request-id",
        "request-id",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-remaining",
    ] {
        assert!(header_matters(name), "{name}");
    }
    for name in [
        "authorization",
        "x-api-key",
        "set-cookie",
        "content-type",
        "x-ratelimit",
        "retry",
    ] {
        assert!(!header_matters(name), "{name}");
    }
}

/// `from_response` keeps the headers that matter (names lowercased) and
/// nothing else (no credentials, cookies or content headers), and reads
/// the provider's error from the body; `with_error_body` on its own keeps
/// what the error already had, and a body that is no error object changes
/// nothing.
#[cfg(feature = "json")]
#[test]
fn from_response_keeps_what_matters_and_reads_the_body() {
    let headers = [
        ("Authorization", "Bearer sk-secret"),
        ("Set-Cookie", "a=b"),
        ("Content-Type", "application/json"),
        ("Retry-After", "3"),
        ("X-Request-Id", "req_1"),
    ];
    let body = br#"{"error":{"type":"invalid_request_error","code":"bad","message":"m"}}"#;
    let e = HttpError::from_response(400, headers, body);
    assert_eq!(
        e.headers().collect::<Vec<_>>(),
        [("retry-after", "3"), ("x-request-id", "req_1")]
    );
    assert_eq!(
        (
            e.status(),
            e.error_type(),
            e.error_code(),
            e.error_message()
        ),
        (
            Some(400),
            Some("invalid_request_error"),
            Some("bad"),
            Some("m")
        )
    );
    let anthropic = br#"{"type":"error","error":{"type":"overloaded_error","message":"m"}}"#;
    let e = HttpError::new(529)
        .with_header("Retry-After", "1")
        .with_error_body(anthropic);
    assert_eq!(e.status(), Some(529));
    assert_eq!(e.header("retry-after"), Some("1"));
    assert_eq!(e.error_type(), Some("overloaded_error"));
    assert_eq!(
        HttpError::new(500).with_error_body(b"<html>"),
        HttpError::new(500)
    );
}

/// The cause given to `with_source` is the error's `source()`, so reports
/// show it; an error without one has none; `==` ignores it.
#[test]
fn with_source_is_the_source() {
    use std::error::Error as _;
    let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
    let e = HttpError::transport(Transport::Reset).with_source(cause);
    assert_eq!(
        e.source().map(|s| s.to_string()).as_deref(),
        Some("reset by peer")
    );
    assert!(HttpError::new(500).source().is_none());
    // The cause is not compared by `==`.
    let other = HttpError::transport(Transport::Reset).with_source(std::fmt::Error);
    assert_eq!(e, other);
    assert_ne!(e, HttpError::transport(Transport::Timeout));
}

/// `http_view` finds the `HttpError` anywhere in an upstream error's chain,
/// and nothing in the crate's own errors.
#[test]
fn http_view_finds_the_http_error_in_the_chain() {
    let c = LlmClassifier::new();
    let direct = Error::Upstream {
        source: Box::new(HttpError::new(429).with_header("x-ratelimit-remaining-requests", "0")),
    };
    let view = c.http_view(&direct).expect("a view");
    assert_eq!(view.status(), Some(429));
    assert_eq!(view.header("x-ratelimit-remaining-requests"), Some("0"));
    #[derive(Debug)]
    struct Wrapper(HttpError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let wrapped = Error::Upstream {
        source: Box::new(Wrapper(HttpError::new(503))),
    };
    assert_eq!(c.http_view(&wrapped).and_then(|v| v.status()), Some(503));
    assert!(c.http_view(&Error::Upstream { source: boom() }).is_none());
    assert!(c.http_view(&Error::Shutdown).is_none());
}

/// `Debug` shows the status, type and code, and neither the message nor
/// the headers.
#[test]
fn debug_shows_the_status_type_and_code_only() {
    let e = HttpError::new(429)
        .with_error_type("rate_limit_error")
        .with_error_code("rpm")
        .with_message("the prompt was: secret")
        .with_header("x-request-id", "req_secret");
    let text = format!("{e:?}");
    assert!(
        text.starts_with("HttpError")
            && text.contains("429")
            && text.contains("rate_limit_error")
            && text.contains("rpm"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
}
