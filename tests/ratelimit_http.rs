//! The rate limiter in front of the OpenAI-compatible client, over real
//! HTTP on loopback, against the mock LLM server enforcing its own requests
//! and tokens per window (continuously refilled buckets, 429 with OpenAI's
//! headers and a retry-after when exceeded, `x-ratelimit-*` on successes).
//!
//! Real time with one-second windows; nothing asserts on durations. The
//! figures are printed (`--nocapture`) for BENCHMARKS.md.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::client::{ChatRequest, ClientError, OpenAiClient};
use llm_resilience::ratelimit::RateLimitLayer;
use llm_resilience::testing::mock_server::{FaultScript, MockLimits, MockServer, Served};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const WINDOW: Duration = Duration::from_secs(1);
/// The server's limits per window.
const RPW: u64 = 20;
const TPW: u64 = 500;
/// Windows of offered load.
const WINDOWS: u32 = 4;

async fn server() -> MockServer {
    let server = MockServer::start(FaultScript::new().reply_words(12))
        .await
        .unwrap();
    server.set_limits(MockLimits::new(WINDOW).requests(RPW).tokens(TPW));
    server
}

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key("sk-test")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Offers twice the server's request limit for `WINDOWS` windows through a
/// limiter set to `scale` times the server's limits; returns (ok, 429s
/// received by callers, other errors).
async fn run(server: &MockServer, scale: f64, steer: bool) -> (u64, u64, u64) {
    let builder = RateLimitLayer::builder()
        .requests((RPW as f64 * scale) as u64)
        .tokens((TPW as f64 * scale) as u64)
        .window(WINDOW)
        .server_window(WINDOW)
        .max_wait(Duration::from_secs(30));
    let layer = if steer {
        builder
    } else {
        builder.ignore_server_headers()
    }
    .build()
    .unwrap();
    let svc = layer.layer(client(server));
    let offered = 2 * RPW * u64::from(WINDOWS);
    let gap = WINDOW / (2 * RPW as u32);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..offered {
        tokio::time::sleep_until(start + gap * i as u32).await;
        // 28 tokens estimated (prompt 12 plus max_tokens 16), 24 used.
        let req = ChatRequest::user(format!("question {i:04} about rate limits")).max_tokens(16);
        tasks.push(tokio::spawn(svc.clone().oneshot(req)));
    }
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e)
                if e.upstream_ref::<ClientError>()
                    .and_then(|c| c.status_code())
                    == Some(429) =>
            {
                limited += 1
            }
            Err(e) => {
                eprintln!("other error: {e:?}");
                other += 1
            }
        }
    }
    (ok, limited, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_servers_limits_twice_the_load_gets_no_429() {
    let server = server().await;
    let (ok, limited, other) = run(&server, 1.0, true).await;
    let stats = server.stats();
    println!(
        "same limits: {ok} ok, {limited} 429 to callers, server 429s {} over {} requests",
        stats.get(Served::LimitExceeded),
        stats.total
    );
    assert_eq!(stats.get(Served::LimitExceeded), 0, "{stats:?}");
    assert_eq!((limited, other), (0, 0));
    assert_eq!(ok, 2 * RPW * u64::from(WINDOWS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_percent_above_the_server_header_steering_keeps_429s_few() {
    let server = server().await;
    let (ok, limited, other) = run(&server, 1.5, true).await;
    let stats = server.stats();
    let server_429 = stats.get(Served::LimitExceeded);
    println!(
        "limits 1.5x the server's: {ok} ok, {limited} 429 to callers, server 429s {server_429} \
         over {} requests in {WINDOWS} windows of offered load",
        stats.total
    );
    assert_eq!(other, 0);
    assert_eq!(limited, server_429);
    // "A handful per window".
    assert!(
        server_429 <= 3 * u64::from(WINDOWS),
        "{server_429} 429s in {WINDOWS} windows"
    );
}

/// The same without header steering (429 pauses only): the steering is
/// what keeps the 429s few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_header_steering_the_same_overshoot_gets_many_429s() {
    let server = server().await;
    let (ok, limited, _) = run(&server, 1.5, false).await;
    let server_429 = server.stats().get(Served::LimitExceeded);
    println!(
        "limits 1.5x, headers ignored: {ok} ok, {limited} 429 to callers, server 429s {server_429}"
    );
    assert!(server_429 > 3 * u64::from(WINDOWS), "{server_429}");
}
