//! The circuit breaker on a paused clock: the rules that trip it (consecutive
//! failures, failure rate over count and time windows, slow calls), half-open
//! probes, what counts as neutral, a custom classifier, the LLM defaults,
//! configuration errors and the tower contract. The open period, server
//! hints, operator states, events and keyed breakers are in
//! `breaker_open.rs`.

mod breaker_support;

use std::time::Duration;

use breaker_support::{base, open_for, send, service, Req};
use llm_resilience::breaker::{CircuitBreakerLayer, CircuitBreakerLayerBuilder, State};
use llm_resilience::classify::{Outcome, Reason};
use llm_resilience::testing::contract;
use llm_resilience::{BoxError, Error};
use tokio::sync::oneshot;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

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
