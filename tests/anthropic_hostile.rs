//! The Anthropic client against a raw HTTP server on loopback that
//! misbehaves in ways the mock server does not: an error body that never
//! completes, a stream that drips bytes without completing an event, a 200
//! carrying an error object, a body far over the limit. Every call gets one
//! typed answer, bounded in time and memory.
//!
//! Real time with short timeouts; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::anthropic::{AnthropicClient, AnthropicErrorKind, MessagesRequest};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Serves one connection: reads the request head and body, then writes
/// `head`, then each of `drip` every `gap`, then holds the connection open
/// until the client goes away.
async fn raw_server(head: String, drip: Vec<Vec<u8>>, gap: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        // The request head, then its body by Content-Length.
        loop {
            let n = sock.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    break;
                }
            }
        }
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for part in drip {
            tokio::time::sleep(gap).await;
            if sock.write_all(&part).await.is_err() {
                return;
            }
        }
        // Hold until the client closes.
        let _ = sock.read(&mut buf).await;
    });
    format!("http://{addr}")
}

fn client(base: String) -> AnthropicClient {
    AnthropicClient::builder()
        .base_url(base)
        .api_key("sk-ant-hostile")
        .total_timeout(Duration::from_secs(10))
        .error_body_timeout(Duration::from_millis(200))
        .stream_idle_timeout(Duration::from_millis(300))
        .max_body_bytes(64 * 1024)
        .build()
        .unwrap()
}

fn classify(err: llm_resilience::anthropic::AnthropicError) -> Outcome {
    Classify::<()>::classify(&LlmClassifier::new(), Err(&Error::from_inner(err)))
}

#[tokio::test]
async fn a_429_whose_body_never_completes_is_answered_with_its_header_hint() {
    let head = "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 7\r\nrequest-id: req_raw\r\ncontent-length: 5000\r\n\r\n{\"type\":\"error\"".to_owned();
    let base = raw_server(head, Vec::new(), Duration::ZERO).await;
    let err = client(base)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), Some(429));
    assert_eq!(err.request_id(), Some("req_raw"));
    assert_eq!(
        classify(err),
        Outcome::Transient {
            reason: Reason::RateLimited,
            retry_after: Some(Duration::from_secs(7))
        }
    );
}

#[tokio::test]
async fn a_stream_dripping_bytes_without_an_event_hits_the_idle_timeout() {
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_owned();
    // One byte of a comment line every 100 ms: bytes, but never an event.
    let drip = (0..100).map(|_| b"1\r\n:\r\n".to_vec()).collect();
    let base = raw_server(head, drip, Duration::from_millis(100)).await;
    let err = client(base)
        .streaming()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamInterrupted);
    // The idle timer ended it (no reqwest error), not the total timeout
    // (10 s, as long as the drip).
    assert!(err.reqwest_error().is_none());
    assert!(classify(err).is_target_failure());
}

#[tokio::test]
async fn a_200_carrying_an_error_object_is_classified_as_that_error() {
    let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let base = raw_server(head, Vec::new(), Duration::ZERO).await;
    let err = client(base)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), Some(529));
    assert_eq!(err.error_type(), Some("overloaded_error"));
    assert_eq!(classify(err), Outcome::transient(Reason::Overloaded));
}

#[tokio::test]
async fn a_body_far_over_the_limit_stops_at_the_limit() {
    // Declares nothing, sends 1 MiB chunks for ever (up to 64 of them).
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_owned();
    let chunk = {
        let mut c = format!("{:x}\r\n", 1 << 20).into_bytes();
        c.extend(std::iter::repeat_n(b' ', 1 << 20));
        c.extend_from_slice(b"\r\n");
        c
    };
    let base = raw_server(head, vec![chunk; 64], Duration::from_millis(1)).await;
    let err = client(base)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
    assert_eq!(classify(err), Outcome::permanent(Reason::ServerError));
}

#[tokio::test]
async fn a_200_that_is_not_a_message_is_a_decode_error() {
    for body in ["<html>gateway</html>", r#"{"status":"ok"}"#] {
        not_a_message(body).await;
    }
}

async fn not_a_message(body: &str) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let base = raw_server(head, Vec::new(), Duration::ZERO).await;
    let err = client(base)
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::Decode);
    assert!(classify(err).is_target_failure());
}

/// HTTPS as for `https://api.anthropic.com`: a loopback TLS server whose
/// test CA (tests/fixtures/tls) is trusted through the builder answers a
/// message; without the CA the certificate is refused as a connect error.
#[tokio::test]
async fn https_reaches_a_loopback_tls_server_trusted_through_the_builder() {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    const CA: &str = include_str!("fixtures/tls/ca.pem");
    const CERT: &str = include_str!("fixtures/tls/server.pem");
    const KEY: &str = include_str!("fixtures/tls/server.key");

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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("\"messages\"") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"id":"msg_tls","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"over tls"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2}}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(body.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let base = format!("https://localhost:{port}");
    let reply = AnthropicClient::builder()
        .base_url(&base)
        .api_key("sk-ant-tls")
        .add_root_certificate(CA)
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "over tls");
    let err = AnthropicClient::builder()
        .base_url(&base)
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .oneshot(MessagesRequest::user("hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::Transport);
    assert_eq!(classify(err), Outcome::transient(Reason::Connect));
}
