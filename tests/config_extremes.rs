//! Every setting a builder accepts works: the retry, breaker and chaos
//! builders and the backoff and budget constructors are driven with extreme
//! values (0, 1, `u32::MAX`, `Duration::ZERO`, `Duration::MAX`, NaN,
//! infinities, negative ratios), and whatever `build()` accepts then takes
//! calls on a paused clock: each call gets one answer (or is still waiting
//! on a timer when a year of virtual time has passed) and nothing panics.
//! What `build()` refuses is a `ConfigError` naming a field.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::backoff::{Backoff, Jitter};
use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::budget::RetryBudget;
use llm_resilience::chaos::{ChaosLayer, Fault, Latency, Window};
use llm_resilience::classify::{Outcome, Reason};
use llm_resilience::retry::{RetryLayer, LLM_ATTEMPT_TIMEOUT, LLM_DEADLINE};
use llm_resilience::{ConfigError, Error};
use proptest::prelude::*;
use tower::{service_fn, Layer, Service, ServiceExt};

/// Longer than any call may take on the paused clock before the test
/// gives up waiting (the clock jumps there at once when nothing else is due).
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// After this many calls the scripted upstream answers at once.
const MOST_CALLS: u32 = 64;

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(24 * 3600)),
        Just(Duration::from_secs(24 * 3600 + 1)),
        Just(Duration::from_secs(u64::MAX / 2)),
        Just(Duration::new(u64::MAX, 0)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
        (0u64..120).prop_map(Duration::from_secs),
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(u32::MAX),
        any::<u32>(),
        0u32..10
    ]
}

fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-1.0),
        Just(-0.0),
        Just(0.0),
        Just(f64::MIN_POSITIVE),
        Just(0.5),
        Just(1.0),
        Just(1.5),
        Just(f64::MAX),
        any::<f64>(),
        0.0f64..=1.0,
    ]
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated)
    ]
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// A refusal names a field and says what is allowed.
fn named(e: &ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(!e.field.is_empty() && !e.problem.is_empty(), "{e:?}");
    prop_assert!(e.to_string().contains(e.field));
    Ok(())
}

/// How an upstream behaves in one case.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    /// Fails `n` times with a transient error carrying `hint`, then answers.
    FailThenOk { n: u32, hint: Option<Duration> },
    /// Never answers.
    Hangs,
    /// Takes this long, then answers.
    Slow(Duration),
}

fn upstream() -> impl Strategy<Value = Upstream> {
    prop_oneof![
        (0u32..4, proptest::option::of(duration()))
            .prop_map(|(n, hint)| Upstream::FailThenOk { n, hint }),
        Just(Upstream::Hangs),
        duration().prop_map(Upstream::Slow),
    ]
}

/// The error a scripted upstream fails with; the classifier below reads its
/// hint, so any duration reaches the layers as a server hint.
#[derive(Debug)]
struct Flaky(Option<Duration>);

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("flaky")
    }
}

impl std::error::Error for Flaky {}

fn classify(r: Result<&u32, &Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Success,
        Err(e) => match e.upstream_ref::<Flaky>() {
            Some(Flaky(hint)) => Outcome::Transient {
                reason: Reason::ServerError,
                retry_after: *hint,
            },
            None => Outcome::transient(Reason::Unknown),
        },
    }
}

fn classify_permanent(r: Result<&u32, &Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Success,
        Err(e) => match e.upstream_ref::<Flaky>() {
            Some(Flaky(hint)) => Outcome::Permanent {
                reason: Reason::Quota,
                retry_after: *hint,
            },
            None => Outcome::transient(Reason::Unknown),
        },
    }
}

type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, Flaky>> + Send>>;

fn service(
    behaviour: Upstream,
) -> impl Service<u32, Response = u32, Error = Flaky, Future = BoxFut> + Clone + Send {
    let calls = Arc::new(AtomicU32::new(0));
    service_fn(move |req: u32| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        if n >= MOST_CALLS {
            // Bounds the test's work when a setting asks for endless
            // retries of a call that never succeeds.
            return Box::pin(async move { Ok(req) }) as BoxFut;
        }
        let fut: BoxFut = match behaviour {
            Upstream::FailThenOk { n: fails, hint } if n < fails => {
                Box::pin(async move { Err(Flaky(hint)) })
            }
            Upstream::FailThenOk { .. } => Box::pin(async move { Ok(req) }),
            Upstream::Hangs => Box::pin(futures::future::pending()),
            Upstream::Slow(d) => Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(req)
            }),
        };
        fut
    })
}

/// Sends `calls` requests one after the other, each bounded by a year of
/// virtual time, and reports how many got an answer.
async fn drive<S>(mut svc: S, calls: u32) -> u32
where
    S: Service<u32, Response = u32, Error = Error>,
{
    let mut answered = 0;
    for i in 0..calls {
        let call = async {
            svc.ready().await?;
            svc.call(i).await
        };
        if tokio::time::timeout(YEAR, call).await.is_ok() {
            answered += 1;
        }
    }
    answered
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn backoff_and_budget_accept_or_name_the_field(
        initial in duration(), max in duration(), mult in ratio(), j in jitter(),
        ttl in duration(), min_per_sec in count(), budget_ratio in ratio(),
        seed in any::<u64>(),
    ) {
        match Backoff::builder().initial(initial).max_delay(max).multiplier(mult).jitter(j).build() {
            Ok(b) => {
                for (n, d) in b.iter(seed).take(64).enumerate() {
                    let (lo, hi) = b.bounds(n as u32);
                    prop_assert!(d >= lo && d <= hi && d <= max, "{d:?} outside [{lo:?}, {hi:?}]");
                }
                prop_assert!(b.base_delay(u32::MAX) <= max);
            }
            Err(e) => named(&e)?,
        }
        paused().block_on(async {
            match RetryBudget::builder().ttl(ttl).min_per_sec(min_per_sec).ratio(budget_ratio).build() {
                Ok(budget) => {
                    for _ in 0..100 {
                        budget.deposit();
                    }
                    let _ = budget.try_withdraw();
                    tokio::time::advance(ttl.min(YEAR)).await;
                    let balance = budget.balance();
                    prop_assert!(balance.is_finite(), "{balance}");
                }
                Err(e) => named(&e)?,
            }
            Ok(())
        })?;
    }

    #[test]
    fn retry_builder_accepts_or_names_the_field_and_never_panics(
        attempts in count(), attempt_timeout in proptest::option::of(duration()),
        deadline in proptest::option::of(duration()), hint_cap in duration(),
        hint_jitter in ratio(), seed in any::<u64>(), up in upstream(),
        initial in duration(), max in duration(), budget in any::<bool>(),
    ) {
        let mut b = RetryLayer::builder()
            .max_attempts(attempts)
            .hint_cap(hint_cap)
            .hint_jitter(hint_jitter)
            .seed(seed)
            .classifier(classify);
        b = match attempt_timeout {
            Some(t) => b.attempt_timeout(t),
            None => b.no_attempt_timeout(),
        };
        b = match deadline {
            Some(t) => b.deadline(t),
            None => b.no_deadline(),
        };
        if let Ok(backoff) = Backoff::builder().initial(initial).max_delay(max).build() {
            b = b.backoff(backoff).throttle_backoff(backoff);
        }
        if !budget {
            b = b.no_budget();
        }
        let layer = match b.build() {
            Ok(layer) => layer,
            Err(e) => return named(&e),
        };
        let answered = paused().block_on(drive(layer.layer(service(up)), 3));
        if matches!(up, Upstream::FailThenOk { hint: None, .. }) {
            // Backoff sleeps are at most a day: every call ends.
            prop_assert_eq!(answered, 3);
        }
    }

    #[test]
    fn breaker_builder_accepts_or_names_the_field_and_never_panics(
        window_calls in count(), window_span in duration(), time_window in any::<bool>(),
        min_calls in count(), rate in ratio(), slow in duration(), slow_rate in ratio(),
        consecutive in count(), open in duration(), mult in ratio(), cap in duration(),
        open_jitter in ratio(), probes in count(), probe_timeout in duration(),
        hint_cap in duration(), seed in any::<u64>(), hint in proptest::option::of(duration()),
        pause in duration(), keyed in proptest::option::of(prop_oneof![Just(0usize), Just(1), Just(usize::MAX)]),
    ) {
        let b = CircuitBreakerLayer::builder();
        let b = if time_window { b.time_window(window_span) } else { b.count_window(window_calls) };
        let b = b
            .min_calls(min_calls)
            .failure_rate(rate)
            .slow_calls(slow, slow_rate)
            .consecutive_failures(consecutive)
            .open_duration(open)
            .open_growth(mult, cap)
            .open_jitter(open_jitter)
            .half_open_probes(probes)
            .probe_timeout(probe_timeout)
            .server_hints(hint_cap)
            .seed(seed)
            .classifier(classify_permanent);
        let script = Upstream::FailThenOk { n: 6, hint };
        let rt = paused();
        let _guard = rt.enter();
        if let Some(max_keys) = keyed {
            match b.key_by(|r: &u32| *r % 2).max_keys(max_keys).build() {
                Ok(layer) => {
                    let svc = layer.layer(service(script));
                    rt.block_on(async {
                        let mut svc = svc;
                        for i in 0..12u32 {
                            let _ = tokio::time::timeout(YEAR, svc.ready_oneshot_call(i)).await;
                            tokio::time::advance(pause.min(YEAR)).await;
                        }
                    });
                }
                Err(e) => named(&e)?,
            }
            return Ok(());
        }
        match b.build() {
            Ok(layer) => {
                let handle = layer.handle();
                let svc = layer.layer(service(script));
                rt.block_on(async {
                    let mut svc = svc;
                    for i in 0..12u32 {
                        let _ = tokio::time::timeout(YEAR, svc.ready_oneshot_call(i)).await;
                        tokio::time::advance(pause.min(YEAR)).await;
                    }
                });
                let _ = (handle.state(), handle.counts());
            }
            Err(e) => named(&e)?,
        }
    }

    #[test]
    fn chaos_builder_accepts_or_names_the_field_and_never_panics(
        a in duration(), b in duration(), c in duration(), p in ratio(), q in ratio(),
        from in duration(), until in duration(), seed in any::<u64>(), kind in 0u8..3,
    ) {
        let latency = match kind {
            0 => Latency::Fixed(a),
            1 => Latency::Uniform { min: a, max: b },
            _ => Latency::Exponential { mean: a, max: b },
        };
        let built = ChaosLayer::builder()
            .seed(seed)
            .latency(latency, p)
            .latency_during(Window::between(from, until), Latency::Fixed(c), q)
            .error_rate(Fault::Timeout(c), q)
            .error_rate_during(Window::after(from), Fault::status(503), p)
            .build();
        match built {
            Ok(layer) => {
                let handle = layer.handle();
                let answered = paused().block_on(drive(layer.layer(service(Upstream::FailThenOk { n: 0, hint: None })), 4));
                prop_assert!(answered <= 4);
                handle.start_outage(Fault::Timeout(Duration::MAX));
                paused().block_on(async {
                    let _ = tokio::time::timeout(YEAR, layer.layer(service(Upstream::Hangs)).oneshot(1)).await;
                });
            }
            Err(e) => named(&e)?,
        }
    }
}

/// `ready().await` then `call().await`, keeping the service.
trait ReadyCall {
    fn ready_oneshot_call(
        &mut self,
        req: u32,
    ) -> impl std::future::Future<Output = Result<u32, Error>>;
}

impl<S> ReadyCall for S
where
    S: Service<u32, Response = u32, Error = Error>,
{
    async fn ready_oneshot_call(&mut self, req: u32) -> Result<u32, Error> {
        self.ready().await?;
        self.call(req).await
    }
}

/// `Duration::MAX` for the attempt timeout and the deadline means no limit:
/// a slow call is waited for, not cut, and nothing panics.
#[tokio::test(start_paused = true)]
async fn duration_max_is_no_limit_for_the_retry_layer() {
    let layer = RetryLayer::builder()
        .attempt_timeout(Duration::MAX)
        .deadline(Duration::MAX)
        .hint_cap(Duration::MAX)
        .classifier(classify)
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let svc = layer.layer(service(Upstream::Slow(Duration::from_secs(3 * 3600))));
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    assert_eq!(start.elapsed(), Duration::from_secs(3 * 3600));
}

/// A hint of `Duration::MAX` from a classifier, under a cap of
/// `Duration::MAX`: the jittered wait saturates instead of overflowing, and
/// the call is still waiting after a year.
#[tokio::test(start_paused = true)]
async fn a_hint_of_duration_max_saturates() {
    let layer = RetryLayer::builder()
        .no_deadline()
        .hint_cap(Duration::MAX)
        .hint_jitter(1.0)
        .classifier(classify)
        .build()
        .unwrap();
    let svc = layer.layer(service(Upstream::FailThenOk {
        n: 1,
        hint: Some(Duration::MAX),
    }));
    assert!(tokio::time::timeout(YEAR, svc.oneshot(1)).await.is_err());
}

/// The LLM defaults bound one logical call: against an upstream that never
/// answers, two attempts time out at 120 s each and the third is cut at the
/// 5-minute deadline; never 3 × 10 minutes.
#[tokio::test(start_paused = true)]
async fn llm_defaults_bound_a_hung_call_by_the_deadline() {
    assert_eq!(LLM_ATTEMPT_TIMEOUT, Duration::from_secs(120));
    assert_eq!(LLM_DEADLINE, Duration::from_secs(300));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let inner = service_fn(move |_: u32| {
        seen.fetch_add(1, Ordering::SeqCst);
        futures::future::pending::<Result<u32, Flaky>>()
    });
    let start = tokio::time::Instant::now();
    let err = RetryLayer::llm_defaults()
        .layer(inner)
        .oneshot(1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(start.elapsed(), LLM_DEADLINE);
}

/// A deadline shorter than the default attempt timeout lowers it (the
/// caller did not choose the 120 s); an explicit attempt timeout above an
/// explicit deadline is refused.
#[tokio::test(start_paused = true)]
async fn a_short_deadline_lowers_the_default_attempt_timeout() {
    let layer = RetryLayer::builder()
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap();
    let inner = service_fn(|_: u32| futures::future::pending::<Result<u32, Flaky>>());
    let start = tokio::time::Instant::now();
    let err = layer.layer(inner).oneshot(1).await.unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { attempts: 1, .. }),
        "{err:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    let e = RetryLayer::builder()
        .attempt_timeout(Duration::from_secs(60))
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap_err();
    assert_eq!(e.field, "deadline");
}

/// Named refusals for the values that cannot work.
#[test]
fn out_of_range_settings_are_config_errors_naming_the_field() {
    let field = |r: Result<CircuitBreakerLayer, ConfigError>| r.unwrap_err().field;
    let b = CircuitBreakerLayer::builder;
    assert_eq!(
        field(b().open_duration(Duration::MAX).build()),
        "open_duration"
    );
    assert_eq!(
        field(b().open_growth(2.0, Duration::MAX).build()),
        "open_growth"
    );
    assert_eq!(field(b().failure_rate(1.5).build()), "failure_rate");
    assert_eq!(field(b().failure_rate(f64::NAN).build()), "failure_rate");
    assert_eq!(field(b().open_jitter(-0.1).build()), "open_jitter");
    assert_eq!(field(b().time_window(Duration::MAX).build()), "time_window");
    assert_eq!(field(b().count_window(u32::MAX).build()), "count_window");
    assert_eq!(field(b().half_open_probes(0).build()), "half_open_probes");
    assert_eq!(
        RetryLayer::builder()
            .hint_jitter(-0.5)
            .build()
            .unwrap_err()
            .field,
        "hint_jitter"
    );
    assert_eq!(
        ChaosLayer::builder()
            .error_rate(Fault::status(500), f64::NAN)
            .build()
            .unwrap_err()
            .field,
        "probability"
    );
}
