//! The chaos layer: injection rates within statistical bounds, determinism
//! by seed, time windows on a paused clock, the run-time handle, LLM-shaped
//! faults through the classifier, and the tower contract.

use std::time::Duration;

use llm_resilience::chaos::{ChaosLayer, Fault, Latency, Window};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::retry::RetryLayer;
#[cfg(feature = "testing")]
use llm_resilience::testing::contract;
use llm_resilience::Error;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Ok,
    Delayed,
    RateLimited,
    Overloaded,
    Timeout,
}

type Echo = tower::util::ServiceFn<fn(u32) -> std::future::Ready<Result<u32, std::io::Error>>>;

fn echo() -> Echo {
    service_fn((|n| std::future::ready(Ok(n))) as fn(u32) -> _)
}

/// Runs `n` calls one after another and records what each saw.
async fn run(layer: &ChaosLayer, n: u32) -> Vec<Seen> {
    let mut svc = layer.layer(echo());
    let classifier = LlmClassifier::new();
    let mut seen = Vec::with_capacity(n as usize);
    for i in 0..n {
        let start = Instant::now();
        let out = svc.ready().await.unwrap().call(i).await;
        let waited = start.elapsed();
        seen.push(match out {
            Ok(v) => {
                assert_eq!(v, i);
                if waited.is_zero() {
                    Seen::Ok
                } else {
                    Seen::Delayed
                }
            }
            Err(Error::Timeout { .. }) => Seen::Timeout,
            Err(e) => match Classify::<u32>::classify(&classifier, Err(&e)) {
                Outcome::Transient {
                    reason: Reason::RateLimited,
                    ..
                } => Seen::RateLimited,
                Outcome::Transient {
                    reason: Reason::Overloaded,
                    ..
                } => Seen::Overloaded,
                other => panic!("unexpected {other:?}"),
            },
        });
    }
    seen
}

fn mixed(seed: u64) -> ChaosLayer {
    ChaosLayer::builder()
        .seed(seed)
        .error_rate(Fault::rate_limited(Some(Duration::from_secs(1))), 0.10)
        .error_rate(Fault::overloaded(), 0.05)
        .timeout_rate(Duration::from_secs(30), 0.02)
        .latency(Latency::Fixed(Duration::from_millis(250)), 0.20)
        .build()
        .unwrap()
}

/// `|observed - n·p| <= 5·sqrt(n·p·(1-p))`: a seeded run is fixed, and the
/// bound is wide enough that any honest generator passes for any seed.
fn within(observed: usize, n: usize, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (observed as f64 - mean).abs() <= 5.0 * sd,
        "{what}: {observed} of {n}, expected {mean} ± {}",
        5.0 * sd
    );
}

#[tokio::test(start_paused = true)]
async fn injection_rates_hold_over_ten_thousand_calls() {
    let n = 10_000;
    for seed in [1, 2, 3] {
        let layer = mixed(seed);
        let handle = layer.handle();
        let seen = run(&layer, n).await;
        let count = |s| seen.iter().filter(|x| **x == s).count();
        // Rules draw independently in order; the first failing rule wins.
        let p_rl = 0.10;
        let p_ov = 0.90 * 0.05;
        let p_to = 0.90 * 0.95 * 0.02;
        let p_ok = 1.0 - p_rl - p_ov - p_to;
        within(count(Seen::RateLimited), n as usize, p_rl, "rate limited");
        within(count(Seen::Overloaded), n as usize, p_ov, "overloaded");
        within(count(Seen::Timeout), n as usize, p_to, "timeouts");
        // Delays only show on calls that pass.
        within(count(Seen::Delayed), n as usize, p_ok * 0.20, "delayed");
        let failed = count(Seen::RateLimited) + count(Seen::Overloaded) + count(Seen::Timeout);
        assert_eq!(handle.injected_errors(), failed as u64);
        assert_eq!(handle.passed(), u64::from(n) - failed as u64);
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_sequence() {
    let a = run(&mixed(42), 2_000).await;
    let b = run(&mixed(42), 2_000).await;
    let c = run(&mixed(43), 2_000).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test(start_paused = true)]
async fn latency_follows_the_distribution() {
    let layer = ChaosLayer::builder()
        .seed(5)
        .latency(
            Latency::Uniform {
                min: Duration::from_millis(100),
                max: Duration::from_millis(300),
            },
            1.0,
        )
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    let mut total = Duration::ZERO;
    for i in 0..1_000 {
        let start = Instant::now();
        svc.ready().await.unwrap().call(i).await.unwrap();
        // Paused clock: the elapsed time is exactly the injected delay.
        let d = start.elapsed();
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(300),
            "{d:?}"
        );
        total += d;
    }
    let mean = total / 1_000;
    assert!(
        mean > Duration::from_millis(190) && mean < Duration::from_millis(210),
        "{mean:?}"
    );
    assert_eq!(layer.handle().injected_delays(), 1_000);
}

#[tokio::test(start_paused = true)]
async fn outage_windows_fail_every_call_inside_and_none_outside() {
    let layer = ChaosLayer::builder()
        .outage(
            Window::between(Duration::from_secs(10), Duration::from_secs(20)),
            Fault::status(503),
        )
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    let mut outcomes = Vec::new();
    for second in 0..30 {
        let ok = svc.ready().await.unwrap().call(second).await.is_ok();
        outcomes.push(ok);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let expected: Vec<bool> = (0..30).map(|s| !(10..20).contains(&s)).collect();
    assert_eq!(outcomes, expected);
    assert_eq!(layer.handle().injected_errors(), 10);
}

#[tokio::test(start_paused = true)]
async fn windows_restart_from_the_handle() {
    let layer = ChaosLayer::builder()
        .outage(Window::after(Duration::from_secs(5)), Fault::status(500))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(svc.ready().await.unwrap().call(1).await.is_err());
    handle.restart_clock();
    assert!(svc.ready().await.unwrap().call(2).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_handle_switches_injection_at_run_time() {
    let layer = ChaosLayer::builder()
        .error_rate(Fault::status(500), 1.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    assert!(svc.ready().await.unwrap().call(1).await.is_err());
    handle.disable();
    assert!(!handle.is_enabled());
    for i in 0..100 {
        assert_eq!(svc.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    // Disabled calls are not even counted.
    assert_eq!((handle.injected_errors(), handle.passed()), (1, 0));
    handle.enable();
    assert!(svc.ready().await.unwrap().call(1).await.is_err());

    // A forced outage on a layer that had no rules at all.
    let quiet = ChaosLayer::disabled();
    let h = quiet.handle();
    let mut svc = quiet.layer(echo());
    assert!(svc.ready().await.unwrap().call(1).await.is_ok());
    h.start_outage(Fault::insufficient_quota());
    let err = svc.ready().await.unwrap().call(2).await.unwrap_err();
    assert_eq!(
        Classify::<u32>::classify(&LlmClassifier::new(), Err(&err)),
        Outcome::permanent(Reason::Quota)
    );
    h.end_outage();
    assert!(svc.ready().await.unwrap().call(3).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn llm_shaped_faults_classify_like_real_ones() {
    let cases = [
        (
            Fault::rate_limited(Some(Duration::from_millis(1500))),
            Outcome::Transient {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_millis(1500)),
            },
        ),
        (Fault::overloaded(), Outcome::transient(Reason::Overloaded)),
        (
            Fault::context_length(),
            Outcome::BadRequest {
                reason: Reason::ContextLength,
            },
        ),
        (Fault::status(503), Outcome::transient(Reason::Unavailable)),
        (
            Fault::transport(llm_resilience::classify::Transport::Connect),
            Outcome::transient(Reason::Connect),
        ),
        (
            Fault::custom(|| Error::circuit_open(Duration::from_secs(1))),
            Outcome::Permanent {
                reason: Reason::CircuitOpen,
                retry_after: Some(Duration::from_secs(1)),
            },
        ),
    ];
    for (fault, expected) in cases {
        let layer = ChaosLayer::builder()
            .error_rate(fault.clone(), 1.0)
            .build()
            .unwrap();
        let err = layer.layer(echo()).oneshot(1).await.unwrap_err();
        assert_eq!(
            Classify::<u32>::classify(&LlmClassifier::new(), Err(&err)),
            expected,
            "{fault:?}"
        );
    }
}

/// Chaos under a retry layer: the retry recovers from injected 429 storms
/// honouring the injected Retry-After, and counts every attempt.
#[tokio::test(start_paused = true)]
async fn retry_over_chaos_recovers_and_honours_the_hint() {
    let chaos = ChaosLayer::builder()
        .seed(9)
        .error_rate(Fault::rate_limited(Some(Duration::from_secs(2))), 0.3)
        .build()
        .unwrap();
    let handle = chaos.handle();
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::builder()
                .max_attempts(5)
                .no_budget()
                .seed(1)
                .build()
                .unwrap(),
        )
        .layer(chaos)
        .service(echo());
    let mut ok = 0u64;
    let start = Instant::now();
    for i in 0..200 {
        if svc.clone().oneshot(i).await.is_ok() {
            ok += 1;
        }
    }
    let elapsed = start.elapsed();
    // P(5 failures in a row) = 0.3^5 ≈ 0.0024: nearly every call recovers.
    assert!(ok >= 195, "{ok}");
    // Each success passed through once; every other attempt was injected.
    assert_eq!(handle.passed(), ok);
    // Every injected 429 that was followed by a retry made the retry wait at
    // least its 2 s hint (paused clock: this is the sum of the sleeps).
    let retried = handle.injected_errors() - (200 - ok);
    assert!(
        elapsed >= Duration::from_secs(2) * retried as u32,
        "{elapsed:?} for {retried}"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_configuration_names_the_field() {
    let e = ChaosLayer::builder()
        .error_rate(Fault::status(500), 1.5)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "probability");
    let e = ChaosLayer::builder()
        .latency(
            Latency::Uniform {
                min: Duration::from_secs(2),
                max: Duration::from_secs(1),
            },
            0.5,
        )
        .build()
        .unwrap_err();
    assert_eq!(e.field, "latency");
    let e = ChaosLayer::builder()
        .outage(
            Window::between(Duration::from_secs(2), Duration::from_secs(1)),
            Fault::status(500),
        )
        .build()
        .unwrap_err();
    assert_eq!(e.field, "window");
}

#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn chaos_layer_keeps_the_tower_contract() {
    // Disabled, enabled without hits, delaying every call, failing every call.
    contract::check_layer(ChaosLayer::disabled).await;
    contract::check_layer(|| {
        ChaosLayer::builder()
            .error_rate(Fault::status(500), 0.0)
            .build()
            .unwrap()
    })
    .await;
    contract::check_layer(|| {
        ChaosLayer::builder()
            .latency(Latency::Fixed(Duration::from_millis(5)), 1.0)
            .build()
            .unwrap()
    })
    .await;
}

#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn an_always_failing_chaos_layer_never_calls_the_inner_service() {
    let probe = contract::Probe::new();
    let layer = ChaosLayer::builder()
        .error_rate(Fault::status(500), 1.0)
        .build()
        .unwrap();
    let mut svc = layer.layer(probe.clone());
    for i in 0..10u32 {
        let out = ServiceExt::<u32>::ready(&mut svc)
            .await
            .unwrap()
            .call(i)
            .await;
        assert!(out.is_err());
    }
    assert_eq!(probe.calls(), 0);
}
