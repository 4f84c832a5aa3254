//! The mock LLM server's own behaviour, over real HTTP: outage windows,
//! run-time script changes, its tokens-per-minute limit, latency, hangs
//! released on shutdown, and request counting.
//!
//! Windows are minutes wide so that no assertion depends on how fast the
//! machine is; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::chaos::{Latency, Window};
use llm_resilience::client::{ChatRequest, OpenAiClient};
use llm_resilience::testing::mock_server::{
    FaultScript, FaultWindow, MockFault, MockServer, Served,
};
use tower::ServiceExt;

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn statuses(c: &OpenAiClient, n: usize) -> Vec<Option<u16>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = c.clone().oneshot(ChatRequest::user("hi")).await;
        out.push(r.err().map(|e| e.status_code().unwrap_or(0)));
    }
    out
}

#[tokio::test]
async fn outage_windows_apply_only_inside_the_window() {
    // An outage for the first ten minutes: every request fails.
    let server = MockServer::start(FaultScript::new().outage(
        Window::between(Duration::ZERO, Duration::from_secs(600)),
        MockFault::server_error(503),
    ))
    .await
    .unwrap();
    let c = client(&server);
    assert_eq!(statuses(&c, 5).await, vec![Some(503); 5]);
    // An outage that starts in ten minutes: nothing fails yet.
    server.set_script(FaultScript::new().outage(
        Window::after(Duration::from_secs(600)),
        MockFault::server_error(503),
    ));
    assert_eq!(statuses(&c, 5).await, vec![None; 5]);
    let stats = server.stats();
    assert_eq!(stats.total, 10);
    assert_eq!(stats.nonzero(), [(Served::Ok, 5), (Served::Unavailable, 5)]);
}

#[tokio::test]
async fn windows_carry_their_own_rates() {
    let server = MockServer::start(
        FaultScript::new().seed(3).window(
            FaultWindow::new(Window::ALWAYS)
                .rate(MockFault::overloaded(), 0.5)
                .latency(Latency::Fixed(Duration::from_millis(1))),
        ),
    )
    .await
    .unwrap();
    let out = statuses(&client(&server), 60).await;
    let overloaded = out.iter().filter(|s| **s == Some(529)).count() as u64;
    assert_eq!(overloaded, server.stats().get(Served::Overloaded));
    // 60 draws at p = 0.5: far from both ends.
    assert!((10..=50).contains(&overloaded), "{overloaded}");
    assert_eq!(server.stats().get(Served::Ok), 60 - overloaded);
}

#[tokio::test]
async fn the_tokens_per_minute_limit_answers_429() {
    // Each completion costs its prompt (2 bytes + 16 per message → 5 tokens,
    // as the server estimates) plus 12 completion tokens: 17. A request is
    // admitted while the tokens used plus its prompt fit in the limit: with
    // 30 a minute the second is admitted (17 + 5 ≤ 30), the third is not
    // (34 + 5 > 30).
    let server = MockServer::start(FaultScript::new().tokens_per_minute(30))
        .await
        .unwrap();
    let c = client(&server);
    let out = statuses(&c, 4).await;
    assert_eq!(out, [None, None, Some(429), Some(429)]);
    let stats = server.stats();
    assert_eq!(stats.get(Served::LimitExceeded), 2);
    assert_eq!(stats.tokens, 34);
}

#[tokio::test]
async fn hangs_are_released_when_the_server_shuts_down() {
    let server = MockServer::start(FaultScript::new().then(MockFault::Hang))
        .await
        .unwrap();
    let c = client(&server);
    let call = tokio::spawn(c.clone().oneshot(ChatRequest::user("hi")));
    // Wait until the request has reached the server.
    while server.total() == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!call.is_finished());
    server.shutdown();
    let answer = call.await.unwrap();
    assert!(answer.is_err());
    assert_eq!(server.stats().get(Served::Hang), 1);
}

#[tokio::test]
async fn a_wrong_body_is_a_400_and_is_counted() {
    let server = MockServer::start(FaultScript::new()).await.unwrap();
    let url = format!("{}/chat/completions", server.base_url());
    let resp = reqwest::Client::new()
        .post(url)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(server.stats().get(Served::OtherError), 1);
    assert_eq!(server.total(), 1);
}
