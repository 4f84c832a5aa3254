//! Every layer stacked, in the documented order and the other way round: a
//! caller matches one flat `Error`, never a nested one, and the upstream
//! error stays reachable by value.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::chaos::{ChaosLayer, Fault};
use llm_resilience::classify::{HttpError, Reason};
use llm_resilience::queue::{QueueLayer, WhenFull};
use llm_resilience::retry::RetryLayer;
use llm_resilience::Error;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

fn fast() -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(10))
        .max_delay(Duration::from_millis(10))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// An upstream that always answers 503 and counts its calls.
fn down(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<u32, Response = u32, Error = HttpError, Future: Send> + Clone {
    service_fn(move |_: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<u32, _>(HttpError::new(503)) }
    })
}

#[tokio::test(start_paused = true)]
async fn documented_order_queue_retry_breaker_chaos_upstream() {
    let calls = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .open_duration(Duration::from_secs(30))
        .build()
        .unwrap();
    let state = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(
            QueueLayer::builder()
                .capacity(10)
                .concurrency(4)
                .build()
                .unwrap(),
        )
        .layer(
            RetryLayer::builder()
                .max_attempts(5)
                .backoff(fast())
                .seed(1)
                .build()
                .unwrap(),
        )
        .layer(breaker)
        .layer(ChaosLayer::disabled())
        .service(down(calls.clone()));

    // Three attempts fail and trip the breaker; the fourth is refused by
    // it, which the retry layer takes as final and returns as it is.
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(matches!(err, Error::CircuitOpen { .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(state.state(), State::Open);

    // While open, no attempt reaches the upstream.
    let err = svc.clone().oneshot(2).await.unwrap_err();
    assert!(
        matches!(err, Error::CircuitOpen { retry_after, .. } if retry_after > Duration::ZERO),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn reversed_order_breaker_retry_queue_upstream() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            CircuitBreakerLayer::builder()
                .consecutive_failures(2)
                .build()
                .unwrap(),
        )
        .layer(
            RetryLayer::builder()
                .max_attempts(3)
                .backoff(fast())
                .seed(2)
                .build()
                .unwrap(),
        )
        .layer(
            QueueLayer::builder()
                .capacity(10)
                .concurrency(4)
                .build()
                .unwrap(),
        )
        .service(down(calls.clone()));

    // The retry's verdict passes the outer breaker unchanged, not wrapped in
    // `Upstream`, and the upstream error is still there by value.
    let err = svc.clone().oneshot(1).await.unwrap_err();
    match &err {
        Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::Unavailable,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.upstream_ref::<HttpError>().map(|e| e.to_string()),
        Some("http status 503".into())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Two exhausted requests trip the outer breaker.
    let _ = svc.clone().oneshot(2).await;
    let err = svc.clone().oneshot(3).await.unwrap_err();
    assert!(matches!(err, Error::CircuitOpen { .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn chaos_faults_flow_through_retry_and_a_full_queue_rejects_flat() {
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = {
        let calls = calls.clone();
        service_fn(move |x: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<u32, HttpError>(x) }
        })
    };
    // Chaos under the retry: an injected 529 is retried like a real one.
    let chaos = ChaosLayer::builder()
        .seed(3)
        .error_rate(Fault::overloaded(), 1.0)
        .build()
        .unwrap();
    let handle = chaos.handle();
    let svc = ServiceBuilder::new()
        .layer(
            QueueLayer::builder()
                .capacity(0)
                .concurrency(1)
                .when_full(WhenFull::Reject)
                .build()
                .unwrap(),
        )
        .layer(
            RetryLayer::builder()
                .max_attempts(2)
                .backoff(fast())
                .seed(3)
                .build()
                .unwrap(),
        )
        .layer(chaos)
        .service(ok);
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::RetriesExhausted {
                reason: Reason::Overloaded,
                attempts: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "injected faults never reach the upstream"
    );
    handle.disable();
    assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);

    // Concurrency 1 and no waiting room: a second caller while one is in
    // flight gets `QueueFull`, flat.
    let mut first = svc.clone();
    first.ready().await.unwrap();
    let mut second = svc.clone();
    second.ready().await.unwrap();
    let err = second.call(2).await.unwrap_err();
    assert!(matches!(err, Error::QueueFull { depth: 0, .. }), "{err:?}");
    assert_eq!(first.call(1).await.unwrap(), 1);
}

/// The rate limiter under a retry (the documented order) and over one: a
/// 429 pauses the limiter and is retried after its hint; the limiter's own
/// `RateLimited` and an exhausted retry both reach the caller flat.
#[tokio::test(start_paused = true)]
async fn rate_limit_under_and_over_retry_stays_flat() {
    use llm_resilience::ratelimit::RateLimitLayer;

    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let calls = calls.clone();
        service_fn(move |x: u32| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(HttpError::new(429)
                        .with_error_code("rate_limit_exceeded")
                        .with_header("retry-after-ms", "50"))
                } else {
                    Ok(x)
                }
            }
        })
    };
    let limit = || {
        RateLimitLayer::builder()
            .requests(2)
            .no_token_limit()
            .window(Duration::from_secs(10))
            .burst(1.0)
            .reject()
            .estimate_tokens(|_: &u32| 0)
            .ignore_usage()
            .build()
            .unwrap()
    };
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::builder()
                .max_attempts(2)
                .backoff(fast())
                .hint_cap(Duration::from_secs(1))
                .seed(4)
                .build()
                .unwrap(),
        )
        .layer(limit())
        .service(upstream);
    // The 429 pauses the limiter for 50 ms and gives its charge back; the
    // retry waits the same hint and goes through.
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The 429 cost nothing: one more call fits in the window, then the
    // limiter refuses with a 10 s wait, beyond the retry's hint cap, which
    // tells the caller at once, flat.
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
    let err = svc.clone().oneshot(3).await.unwrap_err();
    match &err {
        Error::RetryAfterTooLong { retry_after, .. } => {
            assert!(*retry_after > Duration::from_secs(9), "{err:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "a refused call is not sent"
    );

    // Over a retry: an exhausted retry passes the limiter unchanged.
    let svc = ServiceBuilder::new()
        .layer(limit())
        .layer(
            RetryLayer::builder()
                .max_attempts(2)
                .backoff(fast())
                .seed(5)
                .build()
                .unwrap(),
        )
        .service(down(calls.clone()));
    let err = svc.clone().oneshot(3).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::RetriesExhausted {
                attempts: 2,
                reason: Reason::Unavailable,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.upstream_ref::<HttpError>().is_some());
    svc.clone().oneshot(4).await.unwrap_err();
    // Two calls in the window: the third is the limiter's, flat.
    let err = svc.clone().oneshot(5).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
}
