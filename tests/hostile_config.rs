//! Hostile settings and HTTPS: an unusable base URL is a `ConfigError` at
//! `build()`, credentials in it never show, every duration the builder
//! takes works (or is refused), HTTPS reaches a loopback TLS server whose
//! certificate is trusted through the builder, and the HTTP library's error
//! is in every transport error's source chain.
#![cfg(feature = "reqwest")]

mod hostile;

use std::sync::Arc;
use std::time::Duration;

use hostile::{chunk, completion, no_hang, read_request, serve, SSE_HEAD};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{ChatRequest, ClientError, ClientErrorKind, OpenAiClient};
use llm_resilience::Error;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio_rustls::rustls;
use tower::ServiceExt;

const CA: &str = include_str!("fixtures/tls/ca.pem");
const CERT: &str = include_str!("fixtures/tls/server.pem");
const KEY: &str = include_str!("fixtures/tls/server.key");

fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        out.push(e);
        cur = e.source();
    }
    out
}

fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    chain(err)
        .iter()
        .map(|e| format!("{e} / {e:?}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn classify(err: ClientError) -> Outcome {
    Classify::<()>::classify(&LlmClassifier::new(), Err(&Error::from_inner(err)))
}

#[test]
fn an_unusable_base_url_is_a_config_error_at_build() {
    for url in [
        "http://exa mple.com/v1",
        "ftp://files.example/v1",
        "unix:/tmp/llm.sock",
        "mailto:ops@example.com",
        "https://[::1/v1",
        "http://",
        "https://api.example/v1?key=x",
        "example.com/v1",
        "",
    ] {
        let err = OpenAiClient::builder(url).build().unwrap_err();
        assert_eq!(err.field, "base_url", "{url}");
    }
    for url in [
        "http://127.0.0.1:8080/v1",
        "https://api.openai.com/v1/",
        "http://[::1]:1",
    ] {
        OpenAiClient::builder(url).build().unwrap();
    }
}

/// `user:password@` in a base URL shows in no `Debug` and no error chain.
#[tokio::test]
async fn credentials_in_the_base_url_never_show() {
    let url = "http://alice:s3cret-pw@127.0.0.1:1/v1";
    let builder = OpenAiClient::builder(url);
    assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
    let client = builder.build().unwrap();
    let text = format!("{client:?} {:?}", client.streaming());
    assert!(
        !text.contains("s3cret") && !text.contains("alice"),
        "{text}"
    );
    let err = no_hang(client.oneshot(ChatRequest::user("hi")))
        .await
        .unwrap_err();
    let text = chain_text(&err);
    assert!(!text.contains("s3cret"), "{text}");
}

/// `Duration::MAX` (and other huge values) for every duration knob means
/// "no limit": calls work, streamed and not. Before, the stream's idle
/// timer panicked at its first chunk (an `Instant` overflow).
#[tokio::test]
async fn every_duration_knob_takes_duration_max() {
    let server = serve(|mut c| async move {
        c.respond("200 OK", &completion("plain")).await;
    })
    .await;
    let streamer = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await {
            c.write(format!("{}{}data: [DONE]\n\n", chunk("s"), chunk("t")).as_bytes())
                .await;
        }
    })
    .await;
    for huge in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_secs(100 * 365 * 24 * 3600) - Duration::from_nanos(1),
    ] {
        let build = |url: &str| {
            OpenAiClient::builder(url)
                .connect_timeout(huge)
                .first_byte_timeout(huge)
                .total_timeout(huge)
                .stream_idle_timeout(huge)
                .error_body_timeout(huge)
                .build()
                .unwrap()
        };
        let reply = no_hang(build(&server.url).oneshot(ChatRequest::user("hi")))
            .await
            .unwrap();
        assert_eq!(reply.content(), "plain");
        let s = no_hang(
            build(&streamer.url)
                .streaming()
                .oneshot(ChatRequest::user("hi")),
        )
        .await
        .unwrap();
        let text = no_hang(s.collect_text()).await.unwrap();
        assert_eq!(text, "st");
    }
}

#[test]
fn zero_durations_and_limits_are_config_errors() {
    let b = || OpenAiClient::builder("http://127.0.0.1:1/v1");
    let cases = [
        (b().connect_timeout(Duration::ZERO), "connect_timeout"),
        (b().first_byte_timeout(Duration::ZERO), "first_byte_timeout"),
        (b().total_timeout(Duration::ZERO), "total_timeout"),
        (
            b().stream_idle_timeout(Duration::ZERO),
            "stream_idle_timeout",
        ),
        (b().error_body_timeout(Duration::ZERO), "error_body_timeout"),
        (b().max_body_bytes(0), "max_body_bytes"),
        (b().max_event_bytes(0), "max_event_bytes"),
        (b().add_root_certificate("not a pem"), "root_certificate"),
        (
            b().add_root_certificate(CA)
                .http_client(reqwest::Client::new()),
            "root_certificate",
        ),
    ];
    for (builder, field) in cases {
        assert_eq!(builder.build().unwrap_err().field, field);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any durations and limits: `build()` answers a client or a
    /// `ConfigError`, never a panic.
    #[test]
    fn the_builder_never_panics(
        secs in prop::array::uniform5(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..10]),
        nanos in prop::array::uniform5(prop_oneof![Just(0u32), Just(999_999_999u32), 0u32..1_000_000_000]),
        body in prop_oneof![Just(0usize), Just(usize::MAX), any::<usize>()],
        event in prop_oneof![Just(0usize), Just(usize::MAX), any::<usize>()],
    ) {
        let d = |i: usize| Duration::new(secs[i], nanos[i]);
        let built = OpenAiClient::builder("http://127.0.0.1:1/v1")
            .connect_timeout(d(0))
            .first_byte_timeout(d(1))
            .total_timeout(d(2))
            .stream_idle_timeout(d(3))
            .error_body_timeout(d(4))
            .max_body_bytes(body)
            .max_event_bytes(event)
            .build();
        let zero = (0..5).any(|i| d(i).is_zero()) || body == 0 || event == 0;
        prop_assert_eq!(built.is_err(), zero);
    }
}

/// A transport failure keeps reqwest's error in its source chain (so
/// `anyhow`/`eyre` reports show the real cause) and still classifies.
#[tokio::test]
async fn the_reqwest_error_is_in_the_source_chain() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let client = OpenAiClient::new(format!("http://127.0.0.1:{port}/v1"), "k").unwrap();
    let err = no_hang(client.oneshot(ChatRequest::user("hi")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert!(err.reqwest_error().is_some());
    assert!(
        chain(&err).iter().any(|e| e.is::<reqwest::Error>()),
        "{}",
        chain_text(&err)
    );
    assert_eq!(classify(err), Outcome::transient(Reason::Connect));
}

/// A loopback HTTPS server with the test certificate (signed by the test
/// CA in `tests/fixtures/tls`); answers every request with a completion.
async fn tls_server() -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(CERT.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if read_request(&mut tls).await.is_some() {
                    let body = completion("over tls");
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(body.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    format!("https://127.0.0.1:{}/v1", addr.port())
}

/// HTTPS works out of the box with the `reqwest` feature: a client built
/// for `https://` reaches a loopback TLS server whose self-signed CA is
/// trusted through the builder. Before, the crate had no TLS backend and
/// the call failed as a retried "connect" error.
#[tokio::test]
async fn https_reaches_a_loopback_tls_server_trusted_through_the_builder() {
    let url = tls_server().await;
    let client = OpenAiClient::builder(&url)
        .api_key("sk-test")
        .add_root_certificate(CA)
        .build()
        .unwrap();
    let reply = no_hang(client.oneshot(ChatRequest::user("hi")))
        .await
        .unwrap();
    assert_eq!(reply.content(), "over tls");
    // By `localhost` too (the certificate names both).
    let client = OpenAiClient::builder(url.replace("127.0.0.1", "localhost"))
        .add_root_certificate(CA.as_bytes())
        .build()
        .unwrap();
    let reply = no_hang(client.oneshot(ChatRequest::user("hi")))
        .await
        .unwrap();
    assert_eq!(reply.content(), "over tls");
}

/// Without the CA the certificate is refused: a connect failure with the
/// TLS error in the source chain.
#[tokio::test]
async fn an_untrusted_certificate_is_a_connect_error_with_its_cause() {
    let url = tls_server().await;
    let client = OpenAiClient::new(&url, "sk-test").unwrap();
    let err = no_hang(client.oneshot(ChatRequest::user("hi")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert!(
        chain(&err).iter().any(|e| e.is::<reqwest::Error>()),
        "{}",
        chain_text(&err)
    );
    assert_eq!(classify(err), Outcome::transient(Reason::Connect));
}
