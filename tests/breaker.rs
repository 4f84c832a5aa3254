//! The circuit breaker on a paused clock: every transition, the window
//! rules, the open period, server hints, operator states, keyed breakers,
//! events, configuration errors and the tower contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::breaker::{
    BreakerEvent, CircuitBreakerLayer, CircuitBreakerLayerBuilder, State,
};
use llm_resilience::classify::{HttpError, Outcome, Reason};
use llm_resilience::testing::contract;
use llm_resilience::{BoxError, Error};
use tokio::sync::oneshot;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

/// What the scripted upstream does with a request.
#[derive(Debug)]
enum Req {
    Ok,
    /// A 503.
    Fail,
    /// A 400 `context_length_exceeded` (neutral for the breaker).
    BadRequest,
    /// A 429 `insufficient_quota`, with an optional `retry-after` in seconds.
    Quota(Option<u64>),
    /// A 503 with `retry-after` in seconds.
    FailWithHint(u64),
    /// Sleeps (on the paused clock), then succeeds or fails.
    Sleep(Duration, bool),
    /// Waits for the sender side, then succeeds (`true`) or fails.
    Wait(oneshot::Receiver<bool>),
}

#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Req> for Upstream {
    type Response = &'static str;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<&'static str, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let fail = |e: HttpError| -> Result<&'static str, BoxError> { Err(Box::new(e)) };
            match req {
                Req::Ok => Ok("ok"),
                Req::Fail => fail(HttpError::new(503)),
                Req::BadRequest => {
                    fail(HttpError::new(400).with_error_code("context_length_exceeded"))
                }
                Req::Quota(hint) => {
                    let mut e = HttpError::new(429).with_error_code("insufficient_quota");
                    if let Some(s) = hint {
                        e = e.with_header("retry-after", s.to_string());
                    }
                    fail(e)
                }
                Req::FailWithHint(s) => {
                    fail(HttpError::new(503).with_header("retry-after", s.to_string()))
                }
                Req::Sleep(d, ok) => {
                    tokio::time::sleep(d).await;
                    if ok {
                        Ok("ok")
                    } else {
                        fail(HttpError::new(503))
                    }
                }
                Req::Wait(rx) => {
                    if rx.await.unwrap_or(false) {
                        Ok("ok")
                    } else {
                        fail(HttpError::new(503))
                    }
                }
            }
        })
    }
}

/// A builder with every rule off but the ones a test turns on, no jitter.
fn base() -> CircuitBreakerLayerBuilder {
    CircuitBreakerLayer::builder()
        .count_window(10)
        .min_calls(10)
        .no_failure_rate()
        .no_consecutive_failures()
        .trip_on(&[])
        .open_duration(Duration::from_secs(10))
        .open_growth(1.0, Duration::from_secs(10))
        .open_jitter(0.0)
        .half_open_probes(1)
        .seed(7)
}

type Svc = llm_resilience::breaker::CircuitBreaker<Upstream>;

fn service(layer: &CircuitBreakerLayer) -> (Svc, Upstream) {
    let up = Upstream::default();
    (layer.layer(up.clone()), up)
}

async fn send(svc: &mut Svc, req: Req) -> Result<&'static str, Error> {
    svc.ready().await?.call(req).await
}

fn open_for(r: Result<&'static str, Error>) -> Duration {
    match r {
        Err(Error::CircuitOpen { retry_after, .. }) => retry_after,
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_and_a_success_resets_the_count() {
    let layer = base().consecutive_failures(3).build().unwrap();
    let h = layer.handle();
    let (mut svc, up) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    send(&mut svc, Req::Fail).await.unwrap_err();
    send(&mut svc, Req::Ok).await.unwrap();
    send(&mut svc, Req::Fail).await.unwrap_err();
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Closed);
    let err = send(&mut svc, Req::Fail).await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    assert_eq!(h.state(), State::Open);
    assert_eq!(up.calls(), 6);
    // Open: fail fast, the inner service is not called.
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10)
    );
    advance(Duration::from_secs(4)).await;
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(6)
    );
    assert_eq!(up.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_is_judged_only_from_min_calls() {
    let layer = base().failure_rate(0.5).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    // Nine failures: above the rate but below min_calls.
    for _ in 0..9 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.counts().calls, 9);
    // The tenth call, a success, brings the window to min_calls at 90 %.
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_below_the_threshold_does_not_trip() {
    let layer = base().failure_rate(0.5).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    for _ in 0..6 {
        send(&mut svc, Req::Ok).await.unwrap();
    }
    for _ in 0..4 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::Closed, "4 of 10 is below 50 %");
    // The count window slides: each new failure evicts an old success.
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open, "5 of the last 10 failed");
}

#[tokio::test(start_paused = true)]
async fn count_window_forgets_old_failures() {
    let layer = base().failure_rate(0.5).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    for _ in 0..4 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    for _ in 0..10 {
        send(&mut svc, Req::Ok).await.unwrap();
    }
    assert_eq!(h.counts().failures, 0, "the failures left the window");
    for _ in 0..4 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::Closed, "4 of the last 10");
}

#[tokio::test(start_paused = true)]
async fn time_window_evicts_by_age() {
    let layer = base()
        .time_window(Duration::from_secs(10))
        .min_calls(4)
        .failure_rate(0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    for _ in 0..3 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.counts().failures, 3);
    advance(Duration::from_secs(11)).await;
    assert_eq!(h.counts().calls, 0, "the failures aged out");
    send(&mut svc, Req::Ok).await.unwrap();
    send(&mut svc, Req::Ok).await.unwrap();
    send(&mut svc, Req::Ok).await.unwrap();
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Closed, "1 of 4 in the window");
    advance(Duration::from_secs(5)).await;
    send(&mut svc, Req::Fail).await.unwrap_err();
    let c = h.counts();
    assert_eq!((c.calls, c.failures, c.slow), (5, 2, 0));
    assert_eq!(h.state(), State::Closed, "2 of 5");
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open, "3 of 6 is 50 %");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_even_when_they_succeed() {
    let layer = base()
        .count_window(4)
        .min_calls(4)
        .slow_calls(Duration::from_secs(1), 0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Ok).await.unwrap();
    send(&mut svc, Req::Sleep(Duration::from_millis(900), true))
        .await
        .unwrap();
    send(&mut svc, Req::Sleep(Duration::from_secs(2), true))
        .await
        .unwrap();
    assert_eq!(h.counts().slow, 1);
    assert_eq!(h.state(), State::Closed);
    send(&mut svc, Req::Sleep(Duration::from_secs(2), true))
        .await
        .unwrap();
    assert_eq!(h.state(), State::Open, "2 slow of 4");
}

#[tokio::test(start_paused = true)]
async fn half_open_probe_success_closes_and_failure_reopens() {
    let layer = base()
        .consecutive_failures(1)
        .half_open_probes(2)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, up) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(10)).await;
    // Two probes admitted, a third refused.
    let (tx1, rx1) = oneshot::channel();
    let (tx2, rx2) = oneshot::channel();
    let p1 = tokio::spawn(svc.clone().oneshot(Req::Wait(rx1)));
    let p2 = tokio::spawn(svc.clone().oneshot(Req::Wait(rx2)));
    tokio::task::yield_now().await;
    assert_eq!(h.state(), State::HalfOpen);
    assert_eq!(h.probes_in_flight(), 2);
    let calls = up.calls();
    send(&mut svc, Req::Ok).await.unwrap_err();
    assert_eq!(
        up.calls(),
        calls,
        "a third caller must not reach the upstream"
    );
    tx1.send(true).unwrap();
    p1.await.unwrap().unwrap();
    assert_eq!(h.state(), State::HalfOpen, "one success of two");
    tx2.send(true).unwrap();
    p2.await.unwrap().unwrap();
    assert_eq!(h.state(), State::Closed);

    // Trip again; this time the probe fails.
    send(&mut svc, Req::Fail).await.unwrap_err();
    advance(Duration::from_secs(10)).await;
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_returns_its_permit() {
    let layer = base().consecutive_failures(1).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    advance(Duration::from_secs(10)).await;
    let (_tx, rx) = oneshot::channel::<bool>();
    let mut probe = tokio_test::task::spawn(svc.clone().oneshot(Req::Wait(rx)));
    tokio_test::assert_pending!(probe.poll());
    assert_eq!(h.probes_in_flight(), 1);
    assert!(
        send(&mut svc, Req::Ok).await.is_err(),
        "the only permit is taken"
    );
    drop(probe);
    assert_eq!(h.probes_in_flight(), 0);
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_does_not_leave_the_breaker_stuck() {
    let layer = base()
        .consecutive_failures(1)
        .probe_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    advance(Duration::from_secs(10)).await;
    let (tx, rx) = oneshot::channel::<bool>();
    let hung = tokio::spawn(svc.clone().oneshot(Req::Wait(rx)));
    tokio::task::yield_now().await;
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(30)
    );
    advance(Duration::from_secs(30)).await;
    // The permit expired: a fresh probe goes through and closes.
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    // The hung probe's late failure belongs to an old generation: ignored.
    tx.send(false).unwrap();
    hung.await.unwrap().unwrap_err();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn results_from_before_a_transition_are_ignored() {
    let layer = base().consecutive_failures(1).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    let (tx, rx) = oneshot::channel();
    let old = tokio::spawn(svc.clone().oneshot(Req::Wait(rx)));
    tokio::task::yield_now().await;
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    h.reset();
    assert_eq!(h.state(), State::Closed);
    // A failure of a call admitted before the trip and the reset.
    tx.send(false).unwrap();
    old.await.unwrap().unwrap_err();
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.counts().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn open_period_grows_with_consecutive_trips_up_to_the_cap() {
    let layer = base()
        .consecutive_failures(1)
        .open_growth(2.0, Duration::from_secs(25))
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10)
    );
    advance(Duration::from_secs(10)).await;
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.consecutive_trips(), 2);
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(20)
    );
    advance(Duration::from_secs(20)).await;
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(25),
        "capped"
    );
    advance(Duration::from_secs(25)).await;
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.consecutive_trips(), 0);
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10),
        "growth resets on close"
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_only_shortens_the_open_period() {
    let layer = base()
        .consecutive_failures(1)
        .open_jitter(0.5)
        .build()
        .unwrap();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    let d = open_for(send(&mut svc, Req::Ok).await);
    assert!(
        d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
        "{d:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn quota_exhaustion_trips_at_once_and_follows_the_server_hint() {
    let layer = base().trip_on(&[Reason::Quota]).build().unwrap();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    let err = send(&mut svc, Req::Quota(Some(3_600))).await.unwrap_err();
    assert!(err.upstream_ref::<HttpError>().is_some());
    assert_eq!(h.state(), State::Open);
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(3_600)
    );
    advance(Duration::from_secs(3_599)).await;
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(1)
    );
    advance(Duration::from_secs(1)).await;
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

/// The hint comes from the classifier's outcome, so a classifier that is
/// not the LLM preset (here a closure, with no `HttpError` anywhere) can hold
/// the breaker open too.
#[tokio::test(start_paused = true)]
async fn a_permanent_outcome_s_hint_holds_the_breaker_open_whatever_the_classifier() {
    let classify = |r: Result<&&'static str, &Error>| match r {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Permanent {
            reason: Reason::Quota,
            retry_after: Some(Duration::from_secs(900)),
        },
    };
    let layer = base()
        .trip_on(&[Reason::Quota])
        .classifier(classify)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Upstream::default());
    svc.ready()
        .await
        .unwrap()
        .call(Req::Fail)
        .await
        .unwrap_err();
    assert_eq!(h.state(), State::Open);
    let refused = svc.ready().await.unwrap().call(Req::Ok).await;
    assert_eq!(open_for(refused), Duration::from_secs(900));
}

#[tokio::test(start_paused = true)]
async fn server_hints_are_capped_or_ignored() {
    let layer = base()
        .consecutive_failures(1)
        .server_hints(Duration::from_secs(60))
        .build()
        .unwrap();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::FailWithHint(600)).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(60)
    );

    let layer = base()
        .consecutive_failures(1)
        .ignore_server_hints()
        .build()
        .unwrap();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::FailWithHint(600)).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10)
    );

    // A hint shorter than the open period does not shorten it.
    let layer = base().consecutive_failures(1).build().unwrap();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::FailWithHint(2)).await.unwrap_err();
    assert_eq!(
        open_for(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10)
    );
}

#[tokio::test(start_paused = true)]
async fn bad_requests_and_dropped_calls_are_neutral() {
    let layer = base()
        .consecutive_failures(1)
        .failure_rate(0.0)
        .min_calls(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, up) = service(&layer);
    for _ in 0..20 {
        let err = send(&mut svc, Req::BadRequest).await.unwrap_err();
        assert!(matches!(err, Error::Upstream { .. }));
    }
    let (_tx, rx) = oneshot::channel::<bool>();
    let mut dropped = tokio_test::task::spawn(svc.clone().oneshot(Req::Wait(rx)));
    tokio_test::assert_pending!(dropped.poll());
    drop(dropped);
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.counts().calls, 0);
    assert_eq!(up.calls(), 21);
}

#[tokio::test(start_paused = true)]
async fn forced_states_and_reset() {
    let layer = base().consecutive_failures(1).build().unwrap();
    let h = layer.handle();
    let (mut svc, up) = service(&layer);

    h.force_open();
    assert_eq!(h.state(), State::ForcedOpen);
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(Error::CircuitOpen { .. })
    ));
    advance(Duration::from_secs(3_600)).await;
    assert!(
        matches!(
            send(&mut svc, Req::Ok).await,
            Err(Error::CircuitOpen { .. })
        ),
        "forced open does not expire"
    );
    assert_eq!(up.calls(), 0);

    h.force_closed();
    for _ in 0..5 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::ForcedClosed);
    assert_eq!(h.counts().calls, 0, "forced closed records nothing");

    h.disable();
    for _ in 0..5 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::Disabled);
    assert_eq!(h.counts().failures, 5, "disabled records (metrics only)");

    h.reset();
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.counts().calls, 0);
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_never_fails_and_does_not_wait_on_the_inner_service_while_open() {
    let layer = base().consecutive_failures(1).build().unwrap();
    let h = layer.handle();
    h.force_open();
    let probe = contract::Probe::new();
    probe.set_ready(false);
    let mut svc = layer.layer(probe.clone());
    let mut ready = tokio_test::task::spawn(futures::future::poll_fn(|cx| {
        Service::<u32>::poll_ready(&mut svc, cx)
    }));
    tokio_test::assert_ready_ok!(ready.poll());
    drop(ready);
    let err = svc.call(1u32).await.unwrap_err();
    assert!(matches!(err, Error::CircuitOpen { .. }));
    assert_eq!(probe.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn events_report_transitions_and_rejections() {
    let seen: Arc<Mutex<Vec<BreakerEvent>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let layer = base()
        .consecutive_failures(1)
        .on_event(move |e| sink.lock().unwrap().push(*e))
        .build()
        .unwrap();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Fail).await.unwrap_err();
    send(&mut svc, Req::Ok).await.unwrap_err();
    advance(Duration::from_secs(10)).await;
    send(&mut svc, Req::Ok).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            BreakerEvent::StateChanged {
                from: State::Closed,
                to: State::Open,
                open_for: Some(Duration::from_secs(10))
            },
            BreakerEvent::Rejected {
                state: State::Open,
                retry_after: Duration::from_secs(10)
            },
            BreakerEvent::StateChanged {
                from: State::Open,
                to: State::HalfOpen,
                open_for: None
            },
            BreakerEvent::StateChanged {
                from: State::HalfOpen,
                to: State::Closed,
                open_for: None
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides_what_fails() {
    // Count every `Ok("bad")` as a failure.
    let layer = base()
        .consecutive_failures(2)
        .classifier(|r: Result<&&'static str, &Error>| match r {
            Ok(&"ok") => Outcome::Success,
            _ => Outcome::transient(Reason::Unknown),
        })
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|s: &'static str| async move {
        Ok::<_, BoxError>(s)
    }));
    svc.ready().await.unwrap().call("bad").await.unwrap();
    svc.ready().await.unwrap().call("bad").await.unwrap();
    assert_eq!(h.state(), State::Open);
}

#[derive(Debug)]
struct Keyed {
    provider: &'static str,
    req: Req,
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_are_independent_and_bounded() {
    let layer = base()
        .consecutive_failures(1)
        .key_by(|r: &Keyed| r.provider)
        .max_keys(2)
        .build()
        .unwrap();
    let h = layer.handle();
    let up = Upstream::default();
    let inner = tower::util::MapRequestLayer::new(|k: Keyed| k.req).layer(up.clone());
    let mut svc = layer.layer(inner);
    let mut send = |provider, req| svc.ready_oneshot_clone(Keyed { provider, req });
    send("openai", Req::Fail).await.unwrap_err();
    assert_eq!(h.state(&"openai"), Some(State::Open));
    assert!(matches!(
        send("openai", Req::Ok).await,
        Err(Error::CircuitOpen { .. })
    ));
    send("anthropic", Req::Ok).await.unwrap();
    assert_eq!(h.state(&"anthropic"), Some(State::Closed));
    // A third key evicts the closed one, never the open one.
    send("gemini", Req::Ok).await.unwrap();
    assert_eq!(h.keys().len(), 2);
    assert_eq!(h.state(&"anthropic"), None);
    assert_eq!(h.state(&"openai"), Some(State::Open));
    // Operators can act on a key before its first call.
    h.breaker("mistral").force_open();
    assert!(matches!(
        send("mistral", Req::Ok).await,
        Err(Error::CircuitOpen { .. })
    ));
}

trait ReadyOneshotClone<R> {
    fn ready_oneshot_clone(
        &mut self,
        req: R,
    ) -> futures::future::BoxFuture<'static, Result<&'static str, Error>>;
}

impl<S, R> ReadyOneshotClone<R> for S
where
    S: Service<R, Response = &'static str, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    fn ready_oneshot_clone(
        &mut self,
        req: R,
    ) -> futures::future::BoxFuture<'static, Result<&'static str, Error>> {
        Box::pin(self.clone().oneshot(req))
    }
}

#[tokio::test(start_paused = true)]
async fn bad_config_is_a_config_error_naming_the_field() {
    let field = |b: CircuitBreakerLayerBuilder| b.build().unwrap_err().field;
    assert_eq!(field(base().failure_rate(1.5)), "failure_rate");
    assert_eq!(field(base().failure_rate(-0.1)), "failure_rate");
    assert_eq!(field(base().failure_rate(f64::NAN)), "failure_rate");
    assert_eq!(
        field(base().slow_calls(Duration::from_secs(1), 2.0)),
        "slow_calls"
    );
    assert_eq!(field(base().slow_calls(Duration::ZERO, 0.5)), "slow_calls");
    assert_eq!(field(base().count_window(0)), "count_window");
    assert_eq!(field(base().time_window(Duration::ZERO)), "time_window");
    assert_eq!(field(base().min_calls(0)), "min_calls");
    assert_eq!(field(base().count_window(5).min_calls(6)), "min_calls");
    assert_eq!(field(base().half_open_probes(0)), "half_open_probes");
    assert_eq!(field(base().open_duration(Duration::ZERO)), "open_duration");
    assert_eq!(
        field(base().open_duration(Duration::from_secs(20))),
        "open_growth",
        "cap below base"
    );
    assert_eq!(
        field(base().open_growth(0.5, Duration::from_secs(60))),
        "open_growth"
    );
    assert_eq!(
        field(base().consecutive_failures(0)),
        "consecutive_failures"
    );
    assert_eq!(field(base().open_jitter(1.0)), "open_jitter");
    assert_eq!(field(base().probe_timeout(Duration::ZERO)), "probe_timeout");
    assert_eq!(field(base().server_hints(Duration::ZERO)), "server_hints");
    let keyed = base().key_by(|r: &u32| *r).max_keys(0).build().unwrap_err();
    assert_eq!(keyed.field, "max_keys");
    // Edges that are valid.
    base().failure_rate(0.0).build().unwrap();
    base().failure_rate(1.0).build().unwrap();
    base().count_window(1).min_calls(1).build().unwrap();
    CircuitBreakerLayer::llm_defaults();
}

#[tokio::test(start_paused = true)]
async fn breaker_keeps_the_tower_contract() {
    contract::check_layer(CircuitBreakerLayer::llm_defaults).await;
    contract::check_layer(|| {
        base()
            .consecutive_failures(1)
            .slow_calls(Duration::from_secs(1), 0.5)
            .build()
            .unwrap()
    })
    .await;
    contract::check_layer(|| {
        base()
            .time_window(Duration::from_secs(5))
            .min_calls(1)
            .failure_rate(0.5)
            .build()
            .unwrap()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn keyed_breaker_keeps_the_tower_contract() {
    contract::check_layer(|| {
        CircuitBreakerLayer::builder()
            .key_by(|r: &u32| *r % 3)
            .max_keys(2)
            .build()
            .unwrap()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn llm_defaults_trip_on_five_consecutive_failures_or_at_once_on_quota() {
    let layer = CircuitBreakerLayer::llm_defaults();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    for _ in 0..4 {
        send(&mut svc, Req::Fail).await.unwrap_err();
    }
    assert_eq!(h.state(), State::Closed);
    send(&mut svc, Req::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    // Open for 15 s shortened by at most 10 % jitter.
    let d = open_for(send(&mut svc, Req::Ok).await);
    assert!(
        d > Duration::from_millis(13_500) && d <= Duration::from_secs(15),
        "{d:?}"
    );

    let layer = CircuitBreakerLayer::llm_defaults();
    let h = layer.handle();
    let (mut svc, _) = service(&layer);
    send(&mut svc, Req::Quota(None)).await.unwrap_err();
    assert_eq!(h.state(), State::Open, "an exhausted quota trips at once");
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_jittered_open_periods() {
    let periods = |seed| async move {
        let layer = base()
            .consecutive_failures(1)
            .open_jitter(0.5)
            .seed(seed)
            .build()
            .unwrap();
        let (mut svc, _) = service(&layer);
        send(&mut svc, Req::Fail).await.unwrap_err();
        open_for(send(&mut svc, Req::Ok).await)
    };
    assert_eq!(periods(42).await, periods(42).await);
}
