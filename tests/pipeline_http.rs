//! The agent pipeline over real HTTP on loopback, against two mock LLM
//! servers (a primary and a secondary provider) with fault scripts: an
//! outage moves traffic to the secondary and back after recovery, an
//! exhausted quota holds the primary's breaker open, a context-length
//! failure goes to the larger-context target while an invalid request goes
//! nowhere else, and nothing is sent after its deadline.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use std::time::Duration;

use llm_resilience::backoff::Backoff;
use llm_resilience::breaker::State;
use llm_resilience::chaos::Latency;
use llm_resilience::client::{ChatRequest, ChatResponse, OpenAiClient};
use llm_resilience::pipeline::AgentPipeline;
use llm_resilience::report::{with_report, TargetOutcome};
use llm_resilience::testing::mock_server::{ErrorReply, FaultScript, MockFault, MockServer};
use llm_resilience::Error;
use tower::ServiceExt;

type Agent = AgentPipeline<OpenAiClient, ChatRequest, ChatResponse>;

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key("sk-test")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(5))
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn fast() -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(1))
        .max_delay(Duration::from_millis(4))
        .build()
        .unwrap()
}

/// Two targets, fast retries (2 attempts), a breaker that trips after 3
/// consecutive failures and stays open `open` (no jitter, no growth).
fn agent(primary: &MockServer, secondary: &MockServer, open: Duration) -> Agent {
    AgentPipeline::builder()
        .target("primary", client(primary))
        .fallback("secondary", client(secondary))
        .queue(100, 8)
        .deadline(Duration::from_secs(10))
        .retry(|r| {
            r.max_attempts(2)
                .backoff(fast())
                .throttle_backoff(fast())
                .seed(3)
        })
        .breaker(move |b| {
            b.consecutive_failures(3)
                .no_failure_rate()
                .open_duration(open)
                .open_growth(1.0, open)
                .open_jitter(0.0)
                .half_open_probes(1)
        })
        .build()
        .unwrap()
}

async fn ok_server() -> MockServer {
    MockServer::start(FaultScript::new()).await.unwrap()
}

fn ask(i: usize) -> ChatRequest {
    ChatRequest::user(format!("question {i}")).max_tokens(8)
}

#[tokio::test]
async fn an_outage_moves_traffic_to_the_secondary_and_back_after_recovery() {
    let primary = MockServer::start(FaultScript::new().rate(MockFault::server_error(503), 1.0))
        .await
        .unwrap();
    let secondary = ok_server().await;
    let agent = agent(&primary, &secondary, Duration::from_millis(300));

    for i in 0..20 {
        let (out, report) = with_report(agent.clone().oneshot(ask(i))).await;
        out.unwrap();
        assert_eq!(report.answered_by.as_deref(), Some("secondary"));
    }
    // The breaker tripped after 3 failures (2 calls for the first request's
    // 2 attempts, 1 more): the primary saw at most those, nothing after.
    assert!(
        primary.total() <= 4,
        "primary got {} calls",
        primary.total()
    );
    assert_eq!(agent.breaker("primary").unwrap().state(), State::Open);
    assert_eq!(secondary.total(), 20);

    // Recovery: after the open time, one probe succeeds and traffic returns.
    primary.set_script(FaultScript::new());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = primary.total();
    for i in 0..10 {
        let (out, report) = with_report(agent.clone().oneshot(ask(i))).await;
        out.unwrap();
        if i > 0 {
            assert_eq!(report.answered_by.as_deref(), Some("primary"));
        }
    }
    assert!(primary.total() - before >= 9);
    assert_eq!(agent.breaker("primary").unwrap().state(), State::Closed);
}

#[tokio::test]
async fn an_exhausted_quota_holds_the_primary_open_and_traffic_goes_to_the_other_key() {
    let quota = ErrorReply::openai(
        429,
        "insufficient_quota",
        Some("insufficient_quota"),
        "quota",
    )
    .header("retry-after", "30");
    let primary = MockServer::start(FaultScript::new().rate(MockFault::Error(quota), 1.0))
        .await
        .unwrap();
    let secondary = ok_server().await;
    let agent = agent(&primary, &secondary, Duration::from_millis(50));
    for i in 0..10 {
        let (out, report) = with_report(agent.clone().oneshot(ask(i))).await;
        out.unwrap();
        assert_eq!(report.answered_by.as_deref(), Some("secondary"));
        if i > 0 {
            assert_eq!(
                report.targets[0].outcome,
                TargetOutcome::Skipped(llm_resilience::classify::Reason::CircuitOpen)
            );
        }
    }
    // One call, never retried: the breaker opened at once, for the hint (30 s)
    // rather than its own 50 ms.
    assert_eq!(primary.total(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.clone().oneshot(ask(99)).await.unwrap();
    assert_eq!(primary.total(), 1);
}

#[tokio::test]
async fn context_length_goes_to_the_larger_target_and_an_invalid_request_nowhere() {
    let primary = MockServer::start(FaultScript::new().rate(MockFault::context_length(), 1.0))
        .await
        .unwrap();
    let secondary = ok_server().await;
    let big = ok_server().await;
    let agent: Agent = AgentPipeline::builder()
        .target("primary", client(&primary))
        .fallback("secondary", client(&secondary))
        .larger_context("big", client(&big))
        .build()
        .unwrap();
    let (out, report) = with_report(agent.clone().oneshot(ask(1))).await;
    out.unwrap();
    assert_eq!(report.answered_by.as_deref(), Some("big"));
    assert_eq!((primary.total(), secondary.total(), big.total()), (1, 0, 1));

    let invalid = ErrorReply::openai(400, "invalid_request_error", None, "bad field");
    primary.set_script(FaultScript::new().rate(MockFault::Error(invalid), 1.0));
    let err = agent.clone().oneshot(ask(2)).await.unwrap_err();
    assert!(matches!(err, Error::BadRequest { .. }), "{err:?}");
    assert_eq!((primary.total(), secondary.total(), big.total()), (2, 0, 1));
}

#[tokio::test]
async fn nothing_is_sent_after_the_deadline() {
    // In the queue: one slow call holds the only permit past the next
    // request's deadline; that request is never sent.
    let primary =
        MockServer::start(FaultScript::new().latency(Latency::Fixed(Duration::from_millis(600))))
            .await
            .unwrap();
    let secondary = ok_server().await;
    let agent: Agent = AgentPipeline::builder()
        .target("primary", client(&primary))
        .fallback("secondary", client(&secondary))
        .queue(10, 1)
        .deadline(Duration::from_millis(300))
        .max_queue_wait(Duration::from_millis(200))
        .build()
        .unwrap();
    let slow = tokio::spawn(agent.clone().oneshot(ask(1)));
    while primary.total() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let err = agent.clone().oneshot(ask(2)).await.unwrap_err();
    assert!(matches!(err, Error::QueueTimeout { .. }), "{err:?}");
    // The slow one ran out of its deadline on the primary: the secondary is
    // not tried after it.
    let err = slow.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(primary.total(), 1);
    assert_eq!(secondary.total(), 0);
}
