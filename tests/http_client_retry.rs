//! The client under the retry layer over real HTTP on loopback: Retry-After
//! honoured end to end, permanent and bad requests sent exactly once, a hint
//! beyond the cap, transient 5xx and connection resets retried.
//!
//! Real time with short waits; nothing asserts on durations.
#![cfg(all(feature = "reqwest", feature = "testing"))]

mod http_client_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_client_support::client;
use llm_resilience::classify::Reason;
use llm_resilience::client::{ChatRequest, ClientError};
use llm_resilience::retry::{RetryEvent, RetryEventKind, RetryLayer};
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use llm_resilience::Error;
use tower::{Layer, ServiceExt};

type Events = Arc<Mutex<Vec<RetryEvent>>>;

fn retry_layer(events: &Events) -> RetryLayer {
    let events = Arc::clone(events);
    RetryLayer::builder()
        .max_attempts(3)
        .seed(7)
        .on_event(move |e| events.lock().unwrap().push(*e))
        .build()
        .unwrap()
}

#[tokio::test]
async fn retry_after_is_honoured_end_to_end() {
    let hint = Duration::from_millis(60);
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::rate_limited(Some(hint)))
            .then(MockFault::rate_limited(Some(hint))),
    )
    .await
    .unwrap();
    let events = Events::default();
    let svc = retry_layer(&events).layer(client(&server));
    let resp = svc.oneshot(ChatRequest::user("hi")).await.unwrap();
    assert!(!resp.content().is_empty());
    let events = events.lock().unwrap().clone();
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.kind == RetryEventKind::Retrying)
        .collect();
    assert_eq!(retries.len(), 2, "{events:?}");
    for r in &retries {
        assert_eq!(r.reason, Reason::RateLimited);
        // The decision (not a measured time): never shorter than the hint.
        assert!(r.delay.unwrap() >= hint, "{r:?}");
    }
    assert_eq!(events.last().unwrap().kind, RetryEventKind::Recovered);
    assert_eq!(events.last().unwrap().attempt, 3);
    let stats = server.stats();
    assert_eq!(stats.total, 3);
    assert_eq!(stats.get(Served::RateLimited), 2);
    assert_eq!(stats.get(Served::Ok), 1);
}

#[tokio::test]
async fn permanent_and_bad_requests_are_sent_exactly_once() {
    for (fault, quota) in [
        (MockFault::insufficient_quota(), true),
        (MockFault::context_length(), false),
    ] {
        let server = MockServer::start(FaultScript::new().then(fault))
            .await
            .unwrap();
        let events = Events::default();
        let err = retry_layer(&events)
            .layer(client(&server))
            .oneshot(ChatRequest::user("hi"))
            .await
            .unwrap_err();
        match (quota, &err) {
            (
                true,
                Error::Permanent {
                    reason: Reason::Quota,
                    attempts: 1,
                    ..
                },
            ) => {}
            (
                false,
                Error::BadRequest {
                    reason: Reason::ContextLength,
                    attempts: 1,
                    ..
                },
            ) => {}
            _ => panic!("unexpected {err:?}"),
        }
        assert!(err.upstream_ref::<ClientError>().is_some());
        assert_eq!(server.stats().total, 1);
    }
}

#[tokio::test]
async fn a_hint_beyond_the_cap_ends_at_once() {
    let server = MockServer::start(
        FaultScript::new().then(MockFault::rate_limited(Some(Duration::from_secs(600)))),
    )
    .await
    .unwrap();
    let err = RetryLayer::llm_defaults()
        .layer(client(&server))
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap_err();
    match err {
        Error::RetryAfterTooLong {
            retry_after,
            attempts: 1,
            ..
        } => {
            assert_eq!(retry_after, Duration::from_secs(600));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.stats().total, 1);
}

#[tokio::test]
async fn transient_5xx_and_resets_are_retried_until_success() {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::server_error(503))
            .then(MockFault::Reset),
    )
    .await
    .unwrap();
    let events = Events::default();
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(
            llm_resilience::backoff::Backoff::builder()
                .initial(Duration::from_millis(5))
                .max_delay(Duration::from_millis(10))
                .build()
                .unwrap(),
        )
        .on_event({
            let events = Arc::clone(&events);
            move |e| events.lock().unwrap().push(*e)
        })
        .build()
        .unwrap();
    layer
        .layer(client(&server))
        .oneshot(ChatRequest::user("hi"))
        .await
        .unwrap();
    let reasons: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == RetryEventKind::Retrying)
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons, [Reason::Unavailable, Reason::Network]);
    let stats = server.stats();
    assert_eq!(
        stats.nonzero(),
        [
            (Served::Ok, 1),
            (Served::Unavailable, 1),
            (Served::Reset, 1)
        ]
    );
}
