//! The Retry layer, step by step on a paused clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::budget::RetryBudget;
use llm_resilience::classify::{HttpError, Outcome, Reason};
use llm_resilience::retry::{RetryEvent, RetryEventKind, RetryLayer};
use llm_resilience::{BoxError, Error};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

type Reply = Result<&'static str, HttpError>;

/// An upstream that answers from a script (the last reply repeats) and
/// records when each call arrived, on the tokio clock.
#[derive(Clone, Default)]
struct Upstream {
    script: Arc<Mutex<VecDeque<Reply>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Upstream {
    fn new(script: Vec<Reply>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into())),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    fn service(
        &self,
    ) -> impl Service<&'static str, Response = &'static str, Error = HttpError, Future: Send> + Clone
    {
        let me = self.clone();
        service_fn(move |_req: &'static str| {
            let me = me.clone();
            async move {
                me.calls.lock().unwrap().push(Instant::now());
                let mut script = me.script.lock().unwrap();
                if script.len() > 1 {
                    script.pop_front().unwrap()
                } else {
                    script.front().cloned().expect("script is not empty")
                }
            }
        })
    }
}

fn no_jitter(initial_ms: u64) -> Backoff {
    Backoff::builder()
        .initial(Duration::from_millis(initial_ms))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(60))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn layer() -> llm_resilience::retry::RetryLayerBuilder {
    RetryLayer::builder().seed(7)
}

#[tokio::test(start_paused = true)]
async fn retry_after_3s_waits_at_least_3s_then_succeeds() {
    let up = Upstream::new(vec![
        Err(HttpError::new(429)
            .with_error_code("rate_limit_exceeded")
            .with_header("retry-after", "3")),
        Ok("done"),
    ]);
    let svc = layer().build().unwrap().layer(up.service());
    assert_eq!(svc.oneshot("hi").await.unwrap(), "done");
    let calls = up.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1] - calls[0];
    assert!(
        gap >= Duration::from_secs(3),
        "waited {gap:?}, less than the hint"
    );
    assert!(
        gap <= Duration::from_millis(3300),
        "waited {gap:?}, more than hint + 10 % jitter"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_wins_over_retry_after() {
    let up = Upstream::new(vec![
        Err(HttpError::new(429)
            .with_header("retry-after", "3")
            .with_header("retry-after-ms", "200")),
        Ok("done"),
    ]);
    let svc = layer()
        .hint_jitter(0.0)
        .build()
        .unwrap()
        .layer(up.service());
    assert_eq!(svc.oneshot("hi").await.unwrap(), "done");
    let calls = up.calls();
    assert_eq!(calls[1] - calls[0], Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn insufficient_quota_makes_exactly_one_attempt() {
    let up = Upstream::new(vec![Err(HttpError::new(429)
        .with_error_code("insufficient_quota")
        .with_header("retry-after", "1"))]);
    let svc = layer().build().unwrap().layer(up.service());
    match svc.oneshot("hi").await {
        Err(Error::Permanent {
            reason: Reason::Quota,
            attempts: 1,
            source,
            ..
        }) => assert!(source.downcast_ref::<HttpError>().is_some()),
        other => panic!("expected a permanent quota error, got {other:?}"),
    }
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn context_length_exceeded_makes_exactly_one_attempt() {
    let up = Upstream::new(vec![Err(
        HttpError::new(400).with_error_code("context_length_exceeded")
    )]);
    let svc = layer().build().unwrap().layer(up.service());
    let err = svc.oneshot("hi").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadRequest {
                reason: Reason::ContextLength,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn overloaded_529_and_unavailable_503_are_retried() {
    let up = Upstream::new(vec![
        Err(HttpError::new(529).with_error_type("overloaded_error")),
        Err(HttpError::new(503)),
        Ok("done"),
    ]);
    let svc = layer().build().unwrap().layer(up.service());
    assert_eq!(svc.oneshot("hi").await.unwrap(), "done");
    assert_eq!(up.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn should_retry_false_on_a_503_stops() {
    let up = Upstream::new(vec![Err(
        HttpError::new(503).with_header("x-should-retry", "false")
    )]);
    let svc = layer().build().unwrap().layer(up.service());
    let err = svc.oneshot("hi").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Permanent {
                reason: Reason::ServerSaidNoRetry,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hint_beyond_the_cap_fails_at_once_with_the_hint() {
    let up = Upstream::new(vec![Err(
        HttpError::new(429).with_header("retry-after", "3600")
    )]);
    let svc = layer()
        .hint_cap(Duration::from_secs(120))
        .build()
        .unwrap()
        .layer(up.service());
    let start = Instant::now();
    let err = svc.oneshot("hi").await.unwrap_err();
    match err {
        Error::RetryAfterTooLong {
            retry_after,
            limit,
            attempts: 1,
            ..
        } => {
            assert_eq!(retry_after, Duration::from_secs(3600));
            assert_eq!(limit, Duration::from_secs(120));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(Instant::now(), start, "it slept before failing");
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_stops_a_sleep_that_would_pass_it() {
    // Delays 2 s then 4 s; the deadline of 5 s leaves no room for the second.
    let up = Upstream::new(vec![Err(HttpError::new(500))]);
    let svc = layer()
        .max_attempts(10)
        .backoff(no_jitter(2000))
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap()
        .layer(up.service());
    let start = Instant::now();
    let err = svc.oneshot("hi").await.unwrap_err();
    match err {
        Error::DeadlineExceeded {
            attempts: 2,
            source: Some(source),
            ..
        } => assert!(source.downcast_ref::<HttpError>().is_some()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Instant::now() - start,
        Duration::from_secs(2),
        "returned at the last failure, not after a sleep"
    );
    assert_eq!(up.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hint_beyond_the_time_left_fails_at_once() {
    let up = Upstream::new(vec![Err(
        HttpError::new(503).with_header("retry-after", "20")
    )]);
    let svc = layer()
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(up.service());
    match svc.oneshot("hi").await.unwrap_err() {
        Error::RetryAfterTooLong {
            retry_after, limit, ..
        } => {
            assert_eq!(retry_after, Duration::from_secs(20));
            assert!(limit <= Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
}

fn hanging(
) -> impl Service<&'static str, Response = &'static str, Error = BoxError, Future: Send> + Clone {
    service_fn(|_req: &'static str| futures::future::pending::<Result<&'static str, BoxError>>())
}

#[tokio::test(start_paused = true)]
async fn attempt_timeouts_are_transient_and_bounded() {
    let svc = layer()
        .attempt_timeout(Duration::from_secs(1))
        .backoff(no_jitter(100))
        .build()
        .unwrap()
        .layer(hanging());
    let start = Instant::now();
    match svc.oneshot("hi").await.unwrap_err() {
        Error::RetriesExhausted {
            attempts: 3,
            reason: Reason::Timeout,
            source,
            ..
        } => assert!(matches!(
            source.downcast_ref::<Error>(),
            Some(Error::Timeout { .. })
        )),
        other => panic!("{other:?}"),
    }
    // 3 attempts of 1 s plus sleeps of 100 ms and 200 ms, on the paused clock.
    assert_eq!(Instant::now() - start, Duration::from_millis(3300));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_an_attempt() {
    let svc = layer()
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(hanging());
    let start = Instant::now();
    let err = svc.oneshot("hi").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeadlineExceeded {
                attempts: 1,
                source: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(Instant::now() - start, Duration::from_secs(10));
}

fn always_failing(
    count: Arc<Mutex<u64>>,
) -> impl Service<u32, Response = (), Error = HttpError, Future: Send> + Clone {
    service_fn(move |_req: u32| {
        let count = count.clone();
        async move {
            *count.lock().unwrap() += 1;
            Err::<(), _>(HttpError::new(503))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_budget_bounds_a_retry_storm() {
    let attempts = Arc::new(Mutex::new(0u64));
    let layer = layer()
        .max_attempts(10)
        .backoff(no_jitter(1))
        .budget(
            RetryBudget::builder()
                .ratio(0.2)
                .min_per_sec(10)
                .ttl(Duration::from_secs(10))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let svc = layer.layer(always_failing(attempts.clone()));
    let results = join_all((0..1000).map(|i| svc.clone().oneshot(i))).await;
    let attempts = *attempts.lock().unwrap();
    // 1,000 × 1.2 + min_per_sec × ttl.
    assert!(attempts <= 1000 + 200 + 100, "{attempts} attempts");
    // Without the budget there would be 10,000; with it, the reserve and the
    // ratio are used up.
    assert!(
        attempts >= 1000 + 200 + 100 - 1,
        "{attempts} attempts: the budget was not used"
    );
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(Error::BudgetExhausted { .. })))
        .count();
    assert!(refused > 0);
    assert!(results.iter().all(Result::is_err));
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_every_clone() {
    let attempts = Arc::new(Mutex::new(0u64));
    let layer = layer()
        .max_attempts(10)
        .backoff(no_jitter(1))
        .budget(
            RetryBudget::builder()
                .ratio(0.2)
                .min_per_sec(0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let inner = always_failing(attempts.clone());
    // 8 services: clones of one, and services made separately by the layer.
    let a = layer.layer(inner.clone());
    let b = layer.layer(inner);
    let clones: Vec<_> = (0..8)
        .map(|i| if i % 2 == 0 { a.clone() } else { b.clone() })
        .collect();
    let calls = (0..800u32).map(|i| clones[(i % 8) as usize].clone().oneshot(i));
    join_all(calls).await;
    // One budget: 800 deposits × 0.2 = 160 retries in all, not 160 per clone.
    assert_eq!(*attempts.lock().unwrap(), 800 + 160);
    assert!(layer.budget().unwrap().balance().abs() < 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_inner_service_is_readied_before_every_attempt() {
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    handle.allow(1);
    let mut svc = layer().backoff(no_jitter(10)).build().unwrap().layer(mock);
    svc.ready().await.unwrap();
    let fut = tokio::spawn(svc.call(1));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error(HttpError::new(500));
    // The retry is due after 10 ms, but the mock is not ready: no call.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(7);
    assert_eq!(fut.await.unwrap().unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_cloned_is_reported() {
    let events = Arc::new(Mutex::new(Vec::<RetryEvent>::new()));
    let seen = events.clone();
    let up = Upstream::new(vec![Err(HttpError::new(503))]);
    let svc = layer()
        .clone_requests(|_: &&'static str| None)
        .on_event(move |e| seen.lock().unwrap().push(*e))
        .build()
        .unwrap()
        .layer(up.service());
    let err = svc.oneshot("hi").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotCloneable {
                reason: Reason::Unavailable,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(up.calls().len(), 1);
    let kinds: Vec<_> = events.lock().unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [RetryEventKind::NotCloneable, RetryEventKind::NotCloneable]
    );
}

#[tokio::test(start_paused = true)]
async fn events_report_every_decision() {
    let events = Arc::new(Mutex::new(Vec::<RetryEvent>::new()));
    let seen = events.clone();
    let up = Upstream::new(vec![Err(HttpError::new(502)), Ok("done")]);
    let svc = layer()
        .backoff(no_jitter(250))
        .on_event(move |e| seen.lock().unwrap().push(*e))
        .build()
        .unwrap()
        .layer(up.service());
    svc.oneshot("hi").await.unwrap();
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, RetryEventKind::Retrying);
    assert_eq!(events[0].reason, Reason::ServerError);
    assert_eq!(events[0].delay, Some(Duration::from_millis(250)));
    assert_eq!(events[1].kind, RetryEventKind::Recovered);
    assert_eq!(events[1].attempt, 2);
}

#[tokio::test(start_paused = true)]
async fn throttling_without_a_hint_backs_off_from_the_larger_base() {
    let up = Upstream::new(vec![Err(HttpError::new(429)), Ok("done")]);
    let svc = layer()
        .backoff(no_jitter(50))
        .throttle_backoff(no_jitter(1000))
        .build()
        .unwrap()
        .layer(up.service());
    svc.oneshot("hi").await.unwrap();
    let calls = up.calls();
    assert_eq!(calls[1] - calls[0], Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_closure_classifier_can_retry_responses() {
    let n = Arc::new(Mutex::new(0u32));
    let count = n.clone();
    let inner = service_fn(move |_: ()| {
        let count = count.clone();
        async move {
            let mut c = count.lock().unwrap();
            *c += 1;
            Ok::<u32, BoxError>(*c)
        }
    });
    let classify = |r: Result<&u32, &Error>| match r {
        Ok(&v) if v < 3 => Outcome::transient(Reason::ServerError),
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::permanent(Reason::Unknown),
    };
    let svc = layer()
        .classifier(classify)
        .max_attempts(5)
        .backoff(no_jitter(1))
        .build()
        .unwrap()
        .layer(inner);
    assert_eq!(svc.oneshot(()).await.unwrap(), 3);
    assert_eq!(*n.lock().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_typed_error_from_below_passes_through_flat() {
    let inner =
        service_fn(|_: ()| async { Err::<(), Error>(Error::circuit_open(Duration::from_secs(7))) });
    let svc = layer().build().unwrap().layer(inner);
    match svc.oneshot(()).await.unwrap_err() {
        Error::CircuitOpen { retry_after, .. } => assert_eq!(retry_after, Duration::from_secs(7)),
        other => panic!("nested or changed: {other:?}"),
    }
}

#[test]
fn bad_configuration_is_a_config_error_naming_the_field() {
    let field = |r: Result<RetryLayer, llm_resilience::ConfigError>| r.unwrap_err().field;
    assert_eq!(
        field(RetryLayer::builder().max_attempts(0).build()),
        "max_attempts"
    );
    assert_eq!(
        field(
            RetryLayer::builder()
                .attempt_timeout(Duration::ZERO)
                .build()
        ),
        "attempt_timeout"
    );
    assert_eq!(
        field(
            RetryLayer::builder()
                .attempt_timeout(Duration::from_secs(30))
                .deadline(Duration::from_secs(10))
                .build()
        ),
        "deadline"
    );
    assert_eq!(
        field(RetryLayer::builder().hint_jitter(1.5).build()),
        "hint_jitter"
    );
    assert_eq!(
        field(RetryLayer::builder().hint_jitter(f64::NAN).build()),
        "hint_jitter"
    );
    let e = RetryLayer::builder().max_attempts(0).build().unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid configuration: `max_attempts` must be at least 1"
    );
}

/// Compile test: the layer works when the upstream error is itself a
/// `BoxError`, and its error converts into `BoxError` with `?`.
#[tokio::test(start_paused = true)]
async fn works_with_box_error_upstreams_and_converts_into_box_error() -> Result<(), BoxError> {
    let inner = service_fn(|x: u8| async move { Ok::<u8, BoxError>(x) });
    let svc = RetryLayer::llm_defaults().layer(inner);
    let v = svc.oneshot(4).await?;
    assert_eq!(v, 4);
    let boxed: BoxError = Error::Shutdown.into();
    assert_eq!(boxed.to_string(), "shutting down");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_reused_service_tells_the_budget_in_batches_and_on_drop() {
    let layer = layer()
        .budget(
            RetryBudget::builder()
                .ratio(1.0)
                .min_per_sec(0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let budget = layer.budget().unwrap().clone();
    let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<u32, BoxError>(x) }));
    for i in 0..20 {
        svc.ready().await.unwrap();
        svc.call(i).await.unwrap();
    }
    // One batch of 16 is told at once; the other 4 when the service goes.
    assert_eq!(budget.balance(), 16.0);
    drop(svc);
    assert_eq!(budget.balance(), 20.0);
}
