//! Hostile upstreams, bodies: a 2xx body over the limit stops early with a
//! permanent typed error, an error body is read only in part and only
//! briefly, a 200 carrying the provider's error object is that error.
//!
//! Raw HTTP on loopback, real time with short timeouts; nothing asserts on
//! durations (a guard fails a test that hangs).
#![cfg(feature = "reqwest")]

mod hostile;

use std::time::Duration;

use hostile::{completion, no_hang, serve};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{ChatRequest, ClientError, ClientErrorKind, OpenAiClient};
use llm_resilience::retry::RetryLayer;
use llm_resilience::Error;
use tower::{Layer, ServiceExt};

const MIB: u64 = 1024 * 1024;

fn classify(err: ClientError) -> Outcome {
    Classify::<()>::classify(&LlmClassifier::new(), Err(&Error::from_inner(err)))
}

fn client(url: &str) -> OpenAiClient {
    OpenAiClient::builder(url)
        .api_key("sk-test")
        .total_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn call(c: &OpenAiClient) -> Result<llm_resilience::client::ChatResponse, ClientError> {
    no_hang(c.clone().oneshot(ChatRequest::user("hi"))).await
}

/// 512 MiB of a completion-looking body without a length: the client stops
/// at its default 32 MiB limit. Before, it buffered all 512 MiB.
#[tokio::test]
async fn a_512_mib_body_stops_at_the_default_limit() {
    let server = serve(|mut c| async move {
        if c.head(
            "200 OK",
            &["content-type: application/json", "connection: close"],
        )
        .await
        {
            let prefix = br#"{"choices":[{"message":{"content":""#;
            c.flood(prefix, b'x', 512 * MIB).await;
        }
    })
    .await;
    let err = call(&client(&server.url)).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::BodyTooLarge, "{err:?}");
    // Stopped early: the server wrote the limit plus what the socket
    // buffers took, nowhere near 512 MiB.
    let written = server.written();
    eprintln!("server managed to write {written} bytes before the client stopped");
    assert!(written < 128 * MIB, "server wrote {written} bytes");
    assert!(written >= 32 * MIB, "the limit is 32 MiB, wrote {written}");
    assert!(matches!(classify(err), Outcome::Permanent { .. }));
}

/// A declared `Content-Length` over the limit fails before the body is
/// read; the limit is a builder knob.
#[tokio::test]
async fn a_declared_length_over_the_limit_fails_before_reading() {
    let server = serve(|mut c| async move {
        if c.head(
            "200 OK",
            &["content-type: application/json", "content-length: 2000000"],
        )
        .await
        {
            c.flood(b"", b' ', 2_000_000).await;
        }
    })
    .await;
    let client = OpenAiClient::builder(&server.url)
        .max_body_bytes(1_000_000)
        .build()
        .unwrap();
    let err = call(&client).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::BodyTooLarge);
    // Permanent, and the retry layer does not send it again.
    let err = no_hang(
        RetryLayer::llm_defaults()
            .layer(client)
            .oneshot(ChatRequest::user("hi")),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Permanent { .. }), "{err:?}");
    assert_eq!(server.requests(), 2);
}

/// A 500 whose body is 512 MiB: the client keeps a small prefix and stops
/// reading.
#[tokio::test]
async fn a_huge_error_body_is_read_only_in_part() {
    let server = serve(|mut c| async move {
        if c.head("500 Internal Server Error", &["connection: close"])
            .await
        {
            c.flood(
                br#"{"error":{"type":"server_error","message":""#,
                b'y',
                512 * MIB,
            )
            .await;
        }
    })
    .await;
    let err = call(&client(&server.url)).await.unwrap_err();
    assert_eq!(err.status_code(), Some(500));
    let written = server.written();
    eprintln!("server managed to write {written} bytes before the client stopped");
    assert!(written < 64 * MIB, "server wrote {written} bytes");
    assert_eq!(classify(err), Outcome::transient(Reason::ServerError));
}

/// A 429 whose headers say when to retry but whose body never comes: the
/// error is reported after the short body timeout with the header's hint,
/// not after the 20 s total timeout (nor never, with no total timeout).
#[tokio::test]
async fn a_429_whose_body_never_comes_is_answered_with_the_header_hint() {
    let server = serve(|mut c| async move {
        if c.head(
            "429 Too Many Requests",
            &[
                "retry-after: 7",
                "content-length: 500",
                "content-type: application/json",
            ],
        )
        .await
        {
            c.write(b"{\"error\":").await;
            c.hold().await;
        }
    })
    .await;
    let client = OpenAiClient::builder(&server.url)
        .no_total_timeout()
        .error_body_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = call(&client).await.unwrap_err();
    assert_eq!(err.status_code(), Some(429));
    assert_eq!(
        classify(err),
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(Duration::from_secs(7)),
        }
    );
}

/// The same for a 503 with the default body timeout (5 s) and no total
/// timeout: the typed 503 arrives (before, the call never ended).
#[tokio::test]
async fn a_503_whose_body_never_comes_is_answered_by_default() {
    let server = serve(|mut c| async move {
        if c.head(
            "503 Service Unavailable",
            &["retry-after: 2", "content-length: 50"],
        )
        .await
        {
            c.hold().await;
        }
    })
    .await;
    let client = OpenAiClient::builder(&server.url)
        .no_total_timeout()
        .build()
        .unwrap();
    let err = call(&client).await.unwrap_err();
    assert_eq!(err.status_code(), Some(503));
    assert_eq!(
        classify(err),
        Outcome::Transient {
            reason: Reason::Unavailable,
            retry_after: Some(Duration::from_secs(2)),
        }
    );
}

const QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const INVALID: &str = r#"{"error":{"message":"bad field","type":"invalid_request_error","param":"messages","code":null}}"#;
const CONTEXT: &str = r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
const GEMINI: &str = r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
const ANTHROPIC: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// A 200 whose body is the provider's error object classifies exactly as
/// that error on its usual status, and is not retried when permanent.
/// Before, every one was a transient decode failure, sent three times.
#[tokio::test]
async fn a_200_carrying_an_error_object_is_that_error() {
    for (body, status) in [
        (QUOTA, "429 Too Many Requests"),
        (INVALID, "400 Bad Request"),
        (CONTEXT, "400 Bad Request"),
        (GEMINI, "429 Too Many Requests"),
        (ANTHROPIC, "529 Overloaded"),
    ] {
        let ok = serve(move |mut c| async move {
            c.respond("200 OK", body).await;
        })
        .await;
        let real = serve(move |mut c| async move {
            c.respond(status, body).await;
        })
        .await;
        let in_200 = call(&client(&ok.url)).await.unwrap_err();
        let on_status = call(&client(&real.url)).await.unwrap_err();
        assert_eq!(in_200.kind(), ClientErrorKind::Status, "{body}");
        assert_eq!(classify(in_200), classify(on_status), "{body}");
    }
    // Quota in a 200 through the retry layer: one request, permanent.
    let ok = serve(|mut c| async move {
        c.respond("200 OK", QUOTA).await;
    })
    .await;
    let err = no_hang(
        RetryLayer::llm_defaults()
            .layer(client(&ok.url))
            .oneshot(ChatRequest::user("hi")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Permanent {
                reason: Reason::Quota,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(ok.requests(), 1);
}

/// Malformed JSON in a 200 is a decode error, with the JSON error in the
/// source chain; a good body still works.
#[tokio::test]
async fn malformed_json_in_a_200_is_a_decode_error() {
    let server = serve(|mut c| async move {
        c.respond("200 OK", r#"{"choices":[{"message":{"content":"x"#)
            .await;
    })
    .await;
    let err = call(&client(&server.url)).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Decode);
    assert!(err.to_string().contains("decoded"), "{err}");
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut found = false;
    while let Some(e) = cur {
        found |= e.is::<serde_json::Error>();
        cur = e.source();
    }
    assert!(found, "no serde_json::Error in the source chain");

    let good = serve(|mut c| async move {
        c.respond("200 OK", &completion("fine")).await;
    })
    .await;
    assert_eq!(call(&client(&good.url)).await.unwrap().content(), "fine");
}
