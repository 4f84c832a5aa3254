//! The open circuit breaker on a paused clock: how long it stays open (growth
//! over consecutive trips, jitter, the seed), server hints, forced states and
//! reset, readiness while open, events, and keyed breakers.

mod breaker_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use breaker_support::{base, open_for, send, service, Req, Upstream};
use llm_resilience::breaker::{BreakerEvent, State};
use llm_resilience::classify::{HttpError, Outcome, Reason};
use llm_resilience::testing::contract;
use llm_resilience::Error;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

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
