//! Hostile upstreams, streams and time: a first-byte timeout on by default
//! and armed for streams without a total timeout, an idle timer that a
//! one-byte drip cannot reset, an endless line stopped at the event cap,
//! every SSE line ending, and no silent skip of a chunk that does not
//! decode.
//!
//! Raw HTTP on loopback, real time with short timeouts; nothing asserts on
//! durations (a guard fails a test that hangs).
#![cfg(feature = "reqwest")]

mod hostile;

use std::time::Duration;

use futures::StreamExt;
use hostile::{chunk, no_hang, serve, SSE_HEAD};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{ChatRequest, ChatStream, ClientError, ClientErrorKind, OpenAiClient};
use llm_resilience::Error;
use tower::ServiceExt;

const MIB: u64 = 1024 * 1024;

fn classify(err: ClientError) -> Outcome {
    Classify::<()>::classify(&LlmClassifier::new(), Err(&Error::from_inner(err)))
}

/// A streaming client with no total timeout: only the first-byte, idle and
/// size bounds hold it.
fn client(url: &str) -> OpenAiClient {
    client_idle(url, Duration::from_millis(400))
}

/// A client whose idle timer is `idle`: the tests about a cap use a long
/// one, so that a slow (loaded) machine cannot end the stream by the idle
/// timer before the cap is reached.
fn client_idle(url: &str, idle: Duration) -> OpenAiClient {
    OpenAiClient::builder(url)
        .no_total_timeout()
        .stream_idle_timeout(idle)
        .build()
        .unwrap()
}

async fn open(c: &OpenAiClient) -> Result<ChatStream, ClientError> {
    no_hang(c.streaming().oneshot(ChatRequest::user("hi"))).await
}

/// Drains the stream: the text delivered and how it ended.
async fn drain(mut s: ChatStream) -> (String, Result<(), ClientError>) {
    let mut text = String::new();
    let end = no_hang(async {
        while let Some(item) = s.next().await {
            text.push_str(item?.text());
        }
        Ok(())
    })
    .await;
    (text, end)
}

#[test]
fn the_first_byte_timeout_is_on_by_default() {
    let c = OpenAiClient::builder("http://127.0.0.1:1/v1")
        .no_total_timeout()
        .build()
        .unwrap();
    let debug = format!("{c:?}");
    assert!(debug.contains("first_byte_timeout: Some(600s)"), "{debug}");
}

/// A server that accepts and never answers, a stream with no total
/// timeout: the first-byte timeout, armed at send, ends the call. Same for
/// a non-streamed call.
#[tokio::test]
async fn no_headers_ever_ends_at_the_first_byte_timeout() {
    let server = serve(|mut c| async move { c.hold().await }).await;
    let c = OpenAiClient::builder(&server.url)
        .no_total_timeout()
        .first_byte_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = open(&c).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert_eq!(classify(err), Outcome::transient(Reason::Timeout));
    let err = no_hang(c.clone().oneshot(ChatRequest::user("hi")))
        .await
        .unwrap_err();
    assert_eq!(classify(err), Outcome::transient(Reason::Timeout));
}

/// After one chunk, the server drips a line one byte every 50 ms and never
/// ends it: the idle timer (400 ms) counts events, so the stream ends with
/// the partial output. Before, every byte reset the timer and the stream
/// hung forever.
#[tokio::test]
async fn a_one_byte_drip_cannot_hold_the_stream() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await && c.write(chunk("hello").as_bytes()).await {
            c.drip(b"data: {\"choices\":[", Duration::from_millis(50))
                .await;
        }
    })
    .await;
    let s = open(&client(&server.url)).await.unwrap();
    let (text, end) = drain(s).await;
    assert_eq!(text, "hello");
    let err = end.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
    assert_eq!(err.partial_text(), "hello");
}

/// The same drip before the first chunk fails the call itself.
#[tokio::test]
async fn a_drip_before_the_first_chunk_fails_the_call() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await {
            c.drip(b"x", Duration::from_millis(50)).await;
        }
    })
    .await;
    let err = open(&client(&server.url)).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::StreamInterrupted);
}

/// Keep-alive comments are progress: a stream that sends one every 100 ms
/// between chunks for 2.5 s outlives a 1 s idle timeout.
#[tokio::test]
async fn keep_alive_comments_count_as_progress() {
    let server = serve(|mut c| async move {
        if !(c.head("200 OK", SSE_HEAD).await && c.write(chunk("a").as_bytes()).await) {
            return;
        }
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write(b": keep-alive\n").await;
        }
        c.write(format!("{}data: [DONE]\n\n", chunk("b")).as_bytes())
            .await;
    })
    .await;
    let s = open(&client_idle(&server.url, Duration::from_secs(1)))
        .await
        .unwrap();
    let (text, end) = drain(s).await;
    end.unwrap();
    assert_eq!(text, "ab");
}

/// One line of 512 MiB without an end: the client stops at its event cap
/// (default 4 MiB) with a typed error and the partial output, having read
/// a few MiB. Before, it buffered the line and rescanned it per read
/// (quadratic CPU) and the idle timer never fired.
#[tokio::test]
async fn an_endless_line_stops_at_the_event_cap() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await && c.write(chunk("a").as_bytes()).await {
            c.flood(b"data: ", b'z', 512 * MIB).await;
        }
    })
    .await;
    let s = open(&client_idle(&server.url, Duration::from_secs(20)))
        .await
        .unwrap();
    let (text, end) = drain(s).await;
    assert_eq!(text, "a");
    let err = end.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::BodyTooLarge);
    assert_eq!(err.partial_text(), "a");
    let written = server.written();
    eprintln!("server managed to write {written} bytes before the client stopped");
    assert!(written < 64 * MIB, "server wrote {written} bytes");
    assert!(matches!(classify(err), Outcome::Permanent { .. }));
}

/// An endless flood of blank lines completes no event: it holds no memory
/// and the idle timer still fires.
#[tokio::test]
async fn a_flood_of_blank_lines_is_not_progress() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await && c.write(chunk("a").as_bytes()).await {
            c.flood(b"", b'\n', 512 * MIB).await;
        }
    })
    .await;
    let (text, end) = drain(open(&client(&server.url)).await.unwrap()).await;
    assert_eq!(text, "a");
    assert_eq!(end.unwrap_err().kind(), ClientErrorKind::StreamInterrupted);
    let written = server.written();
    eprintln!("server managed to write {written} bytes before the client stopped");
    assert!(written < 512 * MIB);
}

/// The cap is a knob; an event just under it still works.
#[tokio::test]
async fn the_event_cap_is_a_knob() {
    let big = "q".repeat(3000);
    let body = format!("{}data: [DONE]\n\n", chunk(&big));
    let server = serve(move |mut c| {
        let body = body.clone();
        async move {
            if c.head("200 OK", SSE_HEAD).await {
                c.write(body.as_bytes()).await;
            }
        }
    })
    .await;
    let roomy = OpenAiClient::builder(&server.url)
        .max_event_bytes(4000)
        .build()
        .unwrap();
    let (text, end) = drain(open(&roomy).await.unwrap()).await;
    end.unwrap();
    assert_eq!(text.len(), 3000);
    let tight = OpenAiClient::builder(&server.url)
        .max_event_bytes(2000)
        .build()
        .unwrap();
    let err = open(&tight).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::BodyTooLarge);
}

/// Every legal line ending, mixed, over real HTTP: `\r\r` and `\n\r\n`
/// end events too. Before, only `\n\n` and `\r\n\r\n` did, so a `\r`-only
/// server's stream was one never-ending event.
#[tokio::test]
async fn every_sse_line_ending_works() {
    let c = |t: &str| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}]}}");
    let body = format!(
        "{}\r\r{}\n\r\n{}\r\n\n: note\r{}\n\n{}\r\n\r\ndata: [DONE]\r\r",
        c("a"),
        c("b"),
        c("c"),
        c("d"),
        c("e")
    );
    let server = serve(move |mut conn| {
        let body = body.clone();
        async move {
            if conn.head("200 OK", SSE_HEAD).await {
                // One byte per write: every cut point.
                for b in body.as_bytes() {
                    conn.write(&[*b]).await;
                }
            }
        }
    })
    .await;
    let (text, end) = drain(open(&client(&server.url)).await.unwrap()).await;
    end.unwrap();
    assert_eq!(text, "abcde");
}

/// A chunk whose fields have the wrong type is a decode error that keeps
/// the output so far. Before, it was skipped and the stream ended `Ok`
/// with text missing.
#[tokio::test]
async fn a_schema_mismatch_is_a_decode_error_with_the_partial_output() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await {
            let bad = "data: {\"choices\":[{\"delta\":{\"content\":42}}]}\n\n";
            c.write(format!("{}{bad}{}data: [DONE]\n\n", chunk("a"), chunk("b")).as_bytes())
                .await;
        }
    })
    .await;
    let (text, end) = drain(open(&client(&server.url)).await.unwrap()).await;
    assert_eq!(text, "a");
    let err = end.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Decode);
    assert_eq!(err.partial_text(), "a");
}

/// Malformed JSON mid-stream is a decode error, named as such (before:
/// "broke off").
#[tokio::test]
async fn malformed_json_mid_stream_is_a_decode_error() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await {
            c.write(format!("{}data: {{\"choices\":[\n\n", chunk("a")).as_bytes())
                .await;
            c.hold().await;
        }
    })
    .await;
    let (text, end) = drain(open(&client(&server.url)).await.unwrap()).await;
    assert_eq!(text, "a");
    let err = end.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Decode);
    assert!(err.to_string().contains("decoded"), "{err}");
}

/// `"error": null` beside a normal chunk is not an error (before, any
/// `error` key was); a real error object still is.
#[tokio::test]
async fn error_null_is_not_an_error() {
    let server = serve(|mut c| async move {
        if c.head("200 OK", SSE_HEAD).await {
            let a = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"error\":null}\n\n";
            let e = "data: {\"error\":{\"type\":\"server_error\",\"message\":\"m\"}}\n\n";
            c.write(format!("{a}{}{e}", chunk("b")).as_bytes()).await;
            c.hold().await;
        }
    })
    .await;
    let (text, end) = drain(open(&client(&server.url)).await.unwrap()).await;
    assert_eq!(text, "ab");
    assert_eq!(end.unwrap_err().kind(), ClientErrorKind::StreamError);
}
