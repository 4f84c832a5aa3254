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
