//! The rate limiter on a paused clock: the window is never exceeded, nobody
//! waits longer than the limit requires (against a reference model), a 429
//! pauses its key only, a dropped waiter's place is reused, rejection and
//! sharing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::ratelimit::{
    RateLimitEvent, RateLimitEventKind, RateLimitLayer, ReportsUsage, ServerLimits,
};
use llm_resilience::Error;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

#[derive(Clone, Copy, Debug)]
struct Req {
    id: usize,
    key: usize,
    tokens: u32,
}

#[derive(Debug)]
struct Resp {
    used: Option<u64>,
    server: ServerLimits,
}

impl ReportsUsage for Resp {
    fn tokens_used(&self) -> Option<u64> {
        self.used
    }
    fn server_limits(&self) -> ServerLimits {
        self.server
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Rec {
    key: usize,
    arrival: Option<Instant>,
    admitted: Option<Instant>,
    settled: Option<Instant>,
    estimate: u64,
    used: u64,
    latency: Duration,
    /// The order of admissions and settlements (the paused clock gives
    /// many events the same instant).
    admitted_seq: u64,
    settled_seq: u64,
}

/// Orders the events of one simulation (each runs on one thread).
static SEQ: AtomicU64 = AtomicU64::new(0);

fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

const WINDOW: Duration = Duration::from_secs(10);
const L_REQ: u64 = 30;
const L_TOK: u64 = 3_000;
const BURST: f64 = 0.1;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The reference bucket (GCRA in exact arithmetic) replayed over one key's
/// events before `t`; whether `cost` would conform at `t`.
fn bucket_allows(events: &[(f64, i8, f64)], limit: u64, t: f64, cost: f64) -> bool {
    let interval = secs(WINDOW) / limit as f64;
    let burst = ((limit as f64 * BURST).floor()).max(1.0);
    let mut tat: f64 = 0.0;
    for &(at, kind, amount) in events.iter().filter(|e| e.0 < t) {
        match kind {
            // admission or overrun
            0 => tat = tat.max(at) + amount * interval,
            // refund
            _ => tat = (tat - amount * interval).max(at),
        }
    }
    if cost > burst {
        tat <= t + 1e-9
    } else {
        tat.max(t) + cost * interval - t <= burst * interval + 1e-9
    }
}

/// Runs a simulated `minutes` with 3 keys and random arrivals, costs,
/// latencies and usage; returns every request's record.
async fn simulate(seed: u64, minutes: u64) -> Vec<Rec> {
    let layer = RateLimitLayer::builder()
        .requests(L_REQ)
        .tokens(L_TOK)
        .window(WINDOW)
        .burst(BURST)
        .max_wait(Duration::from_secs(3_600))
        .estimate_tokens(|r: &Req| r.tokens)
        .key_by(|r: &Req| r.key)
        .build()
        .unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = Instant::now();
    let horizon = Duration::from_secs(minutes * 60);
    // Offered: busy spells at about three times the request limit, in
    // clumps, between idle spells (so bursts follow quiet periods).
    let mut plan = Vec::new();
    for key in 0..3 {
        let mut t = Duration::ZERO;
        while t < horizon {
            let busy_until = t + Duration::from_secs_f64(rng.random_range(1.0..8.0));
            while t < busy_until {
                let clump = rng.random_range(1..=6);
                for _ in 0..clump {
                    plan.push((
                        t,
                        key,
                        rng.random_range(1..=250u32),
                        rng.random_range(0.3..1.3f64),
                        rng.random_range(0..3_000u64),
                    ));
                }
                let mean_gap = secs(WINDOW) / (L_REQ as f64 * 3.0) * clump as f64;
                t += Duration::from_secs_f64(rng.random_range(0.0..2.0 * mean_gap));
            }
            t += Duration::from_secs_f64(rng.random_range(0.0..20.0));
        }
    }
    let recs = Arc::new(Mutex::new(vec![Rec::default(); plan.len()]));
    let inner = {
        let recs = Arc::clone(&recs);
        service_fn(move |r: Req| {
            let recs = Arc::clone(&recs);
            async move {
                let (latency, used) = {
                    let mut g = recs.lock().unwrap();
                    let rec = &mut g[r.id];
                    rec.admitted = Some(Instant::now());
                    rec.admitted_seq = next_seq();
                    (rec.latency, rec.used)
                };
                tokio::time::sleep(latency).await;
                {
                    let mut g = recs.lock().unwrap();
                    g[r.id].settled = Some(Instant::now());
                    g[r.id].settled_seq = next_seq();
                }
                Ok::<_, HttpError>(Resp {
                    used: Some(used),
                    server: ServerLimits::default(),
                })
            }
        })
    };
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for (id, (at, key, tokens, ratio, latency_ms)) in plan.into_iter().enumerate() {
        {
            let mut g = recs.lock().unwrap();
            g[id] = Rec {
                key,
                estimate: u64::from(tokens),
                used: (f64::from(tokens) * ratio).round() as u64,
                latency: Duration::from_millis(latency_ms),
                ..Rec::default()
            };
        }
        let svc = svc.clone();
        let recs = Arc::clone(&recs);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + at).await;
            recs.lock().unwrap()[id].arrival = Some(Instant::now());
            svc.oneshot(Req { id, key, tokens }).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let out = recs.lock().unwrap().clone();
    out
}

fn check(recs: &[Rec], origin: Instant) {
    let f = |i: Instant| secs(i - origin);
    let w = secs(WINDOW);
    let tol = w / 128.0 + 0.002;
    for key in 0..3 {
        let mut mine: Vec<&Rec> = recs.iter().filter(|r| r.key == key).collect();
        mine.sort_by_key(|r| r.arrival);
        // Bucket events: admissions and overruns add, refunds give back.
        let mut events: Vec<(f64, i8, f64)> = Vec::new();
        for r in &mine {
            events.push((f(r.admitted.unwrap()), 0, r.estimate as f64));
            let s = f(r.settled.unwrap());
            if r.used < r.estimate {
                events.push((s, 1, (r.estimate - r.used) as f64));
            } else if r.used > r.estimate {
                events.push((s, 0, (r.used - r.estimate) as f64));
            }
        }
        events.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        // Window sums at `t` (admissions in (t - w, t]), costs as known at
        // t; in integer nanoseconds (admissions exactly a window apart are
        // common on a millisecond timer). Of the events at `t` itself, only
        // admissions up to `upto` and settlements before it count (an
        // overrun settled just after an admission at the same instant may
        // take the window past the limit: it was spent already).
        let ns = |i: Instant| (i - origin).as_nanos() as i128;
        let wn = WINDOW.as_nanos() as i128;
        let sums = |t: f64, strict_end: bool, upto: u64| {
            let t = (t * 1e9).round() as i128;
            let mut n = 0u64;
            let mut tok = 0u64;
            for r in &mine {
                let a = ns(r.admitted.unwrap());
                let s = ns(r.settled.unwrap());
                let (t, w) = (t, wn);
                let inside =
                    a > t - w && (a < t || (!strict_end && a == t && r.admitted_seq <= upto));
                let known = s < t || (s == t && r.settled_seq < upto);
                if inside {
                    n += 1;
                    tok += if known {
                        r.used.min(r.estimate)
                    } else {
                        r.estimate
                    };
                }
                if r.used > r.estimate && s > t - w && known {
                    tok += r.used - r.estimate;
                }
            }
            (n, tok)
        };
        let mut prev_admitted = 0.0f64;
        for r in &mine {
            let a = f(r.admitted.unwrap());
            let (n, tok) = sums(a, false, r.admitted_seq);
            assert!(
                n <= L_REQ,
                "key {key}: {n} requests in the window ending at {a}"
            );
            assert!(
                tok <= L_TOK,
                "key {key}: {tok} tokens in the window ending at {a}"
            );
            // Nobody waits longer than the limit requires.
            let earliest_allowed = f(r.arrival.unwrap()).max(prev_admitted);
            let probe = a - tol;
            // An overrun charged between `probe` and the admission can delay
            // it legitimately (the coarse log may make a call wait up to
            // 1/128 of the window, and a charge in that gap counts).
            let disturbed = mine.iter().any(|o| {
                let s = f(o.settled.unwrap());
                o.used > o.estimate && s >= probe && s < a
            });
            if probe > earliest_allowed && !disturbed {
                let (n, tok) = sums(probe, true, u64::MAX);
                let log_fits = n < L_REQ && tok + r.estimate <= L_TOK;
                let req_events: Vec<(f64, i8, f64)> = mine
                    .iter()
                    .map(|o| (f(o.admitted.unwrap()), 0i8, 1.0))
                    .collect();
                let fits = log_fits
                    && bucket_allows(&req_events, L_REQ, probe, 1.0)
                    && bucket_allows(&events, L_TOK, probe, r.estimate as f64);
                assert!(
                    !fits,
                    "key {key}: a call admitted at {a} could have gone at {probe} \
                     (arrived {:?}, predecessor admitted {prev_admitted}), n={n} tok={tok} est={}",
                    f(r.arrival.unwrap()),
                    r.estimate
                );
            }
            prev_admitted = prev_admitted.max(a);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]

    /// Over a simulated 10 minutes with 3 keys: no window of the configured
    /// length ever holds more than either limit, and no call waits longer
    /// than the limit requires.
    #[test]
    fn ten_minutes_three_keys_against_a_reference(seed in any::<u64>()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let origin = Instant::now();
            let recs = simulate(seed, 10).await;
            assert!(recs.len() > 3 * 10 * 6 * 20, "{} calls offered", recs.len());
            // The limiter's origin is a little after ours, never before.
            check(&recs, origin);
        });
    }
}

type Log = Arc<Mutex<Vec<(&'static str, Instant)>>>;

fn ok(used: Option<u64>) -> Resp {
    Resp {
        used,
        server: ServerLimits::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_its_key_once_and_leaves_others_alone() {
    let calls: Log = Arc::default();
    let throttled = Arc::new(Mutex::new(3));
    let events: Arc<Mutex<Vec<RateLimitEvent>>> = Arc::default();
    let layer = {
        let events = Arc::clone(&events);
        RateLimitLayer::builder()
            .requests(100)
            .no_token_limit()
            .estimate_tokens(|_: &&'static str| 0)
            .on_event(move |e| events.lock().unwrap().push(*e))
            .key_by(|k: &&'static str| *k)
            .build()
            .unwrap()
    };
    let inner = {
        let calls = Arc::clone(&calls);
        service_fn(move |k: &'static str| {
            calls.lock().unwrap().push((k, Instant::now()));
            let throttle = k == "a" && {
                let mut left = throttled.lock().unwrap();
                *left > 0 && {
                    *left -= 1;
                    true
                }
            };
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if throttle {
                    Err(HttpError::new(429)
                        .with_error_code("rate_limit_exceeded")
                        .with_header("retry-after", "20"))
                } else {
                    Ok(ok(None))
                }
            }
        })
    };
    let svc = layer.layer(inner);
    // Three callers on key A are in flight together; all get the 429.
    let first: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot("a")))
        .collect();
    for f in first {
        let err = f.await.unwrap().unwrap_err();
        assert!(err.upstream_ref::<HttpError>().is_some(), "{err:?}");
    }
    let paused_at = Instant::now();
    let later: Vec<_> = ["a", "b", "a", "b", "b"]
        .into_iter()
        .map(|k| tokio::spawn(svc.clone().oneshot(k)))
        .collect();
    for f in later {
        f.await.unwrap().unwrap();
    }
    let calls = calls.lock().unwrap().clone();
    let a_after: Vec<Instant> = calls
        .iter()
        .filter(|(k, _)| *k == "a")
        .map(|(_, t)| *t)
        .skip(3)
        .collect();
    assert_eq!(a_after.len(), 2);
    for t in &a_after {
        assert!(
            *t >= paused_at + Duration::from_secs(20),
            "key a sent {:?} after the 429",
            *t - paused_at
        );
    }
    let b: Vec<Instant> = calls
        .iter()
        .filter(|(k, _)| *k == "b")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(b.len(), 3);
    for t in &b {
        assert_eq!(*t, paused_at, "key b was held back");
    }
    let pauses = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == RateLimitEventKind::Paused)
        .count();
    assert_eq!(pauses, 1, "one pause for the key, not one per caller");
}

fn one_per_ten_seconds() -> llm_resilience::ratelimit::RateLimitLayerBuilder<
    impl Fn(&u32) -> u32 + Send + Sync + 'static,
    llm_resilience::ratelimit::IgnoreUsage,
> {
    RateLimitLayer::builder()
        .requests(1)
        .no_token_limit()
        .window(Duration::from_secs(10))
        .burst(1.0)
        .estimate_tokens(|_: &u32| 0)
        .ignore_usage()
}

fn recorder(
    calls: Arc<Mutex<Vec<(u32, Instant)>>>,
) -> impl Service<u32, Response = u32, Error = HttpError, Future: Send> + Clone {
    service_fn(move |x: u32| {
        calls.lock().unwrap().push((x, Instant::now()));
        async move { Ok::<_, HttpError>(x) }
    })
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_place_to_the_next() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let svc = one_per_ten_seconds()
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    let t0 = Instant::now();
    svc.clone().oneshot(1).await.unwrap();
    // 2 waits for the next window's slot; 3 waits behind it.
    let two = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    let three = tokio::spawn(svc.clone().oneshot(3));
    tokio::time::sleep(Duration::from_secs(1)).await;
    two.abort();
    assert!(two.await.unwrap_err().is_cancelled());
    assert_eq!(three.await.unwrap().unwrap(), 3);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    // 3 took 2's slot: sent at 10 s, not 20 s.
    let at = calls[1].1 - t0;
    assert_eq!(calls[1].0, 3);
    assert!(
        at >= Duration::from_secs(10) && at < Duration::from_millis(10_100),
        "{at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_go_in_arrival_order_at_the_pace() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let svc = one_per_ten_seconds()
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(svc.clone().oneshot(i)));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let calls = calls.lock().unwrap().clone();
    for (i, (x, at)) in calls.iter().enumerate() {
        assert_eq!(*x, i as u32);
        let at = *at - t0;
        let due = Duration::from_secs(10 * i as u64);
        assert!(
            at >= due && at < due + Duration::from_millis(100),
            "{i}: {at:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn reject_mode_and_max_wait_answer_rate_limited() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let svc = one_per_ten_seconds()
        .reject()
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    svc.clone().oneshot(1).await.unwrap();
    match svc.clone().oneshot(2).await {
        Err(Error::RateLimited { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(9) && retry_after <= Duration::from_secs(10))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "a rejected call is not sent"
    );

    // Waiting, at most 15 s: 2 waits 10 s; 3 would wait 10 s alone but 20 s
    // behind 2, so it fails when its 15 s are up; 4 alone would wait longer
    // than 15 s? No: 10 s, so it queues too and fails at 15 s.
    let svc = one_per_ten_seconds()
        .max_wait(Duration::from_secs(15))
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    let t0 = Instant::now();
    svc.clone().oneshot(1).await.unwrap();
    let two = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    let three = tokio::spawn(svc.clone().oneshot(3));
    assert_eq!(two.await.unwrap().unwrap(), 2);
    match three.await.unwrap() {
        Err(Error::RateLimited { retry_after, .. }) => {
            assert!(retry_after > Duration::ZERO, "{retry_after:?}");
            assert!(Instant::now() - t0 >= Duration::from_secs(15));
        }
        other => panic!("{other:?}"),
    }
    // A wait beyond the maximum on its own account fails at once.
    let svc = one_per_ten_seconds()
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    svc.clone().oneshot(1).await.unwrap();
    let t1 = Instant::now();
    assert!(matches!(
        svc.clone().oneshot(2).await,
        Err(Error::RateLimited { .. })
    ));
    assert_eq!(Instant::now(), t1);
}

#[tokio::test(start_paused = true)]
async fn every_service_of_a_layer_shares_the_limit() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let layer = one_per_ten_seconds().reject().build().unwrap();
    let a = layer.layer(recorder(Arc::clone(&calls)));
    let b = layer.layer(recorder(Arc::clone(&calls)));
    a.oneshot(1).await.unwrap();
    assert!(matches!(b.oneshot(2).await, Err(Error::RateLimited { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_call_above_the_whole_token_limit_fails_at_once() {
    let svc = RateLimitLayer::builder()
        .tokens(1_000)
        .estimate_tokens(|n: &u32| *n)
        .ignore_usage()
        .build()
        .unwrap()
        .layer(recorder(Arc::default()));
    match svc.oneshot(1_001).await {
        Err(Error::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_secs(60))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn usage_refunds_and_headers_lower_the_budget() {
    let layer = RateLimitLayer::builder()
        .requests(100)
        .tokens(10_000)
        .burst(1.0)
        .estimate_tokens(|_: &u32| 1_000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let reply = Arc::new(Mutex::new(ok(Some(200))));
    let svc = {
        let reply = Arc::clone(&reply);
        layer.layer(service_fn(move |_: u32| {
            let r = std::mem::replace(&mut *reply.lock().unwrap(), ok(None));
            async move { Ok::<_, HttpError>(r) }
        }))
    };
    svc.clone().oneshot(1).await.unwrap();
    // Charged 1,000, used 200: 800 back.
    assert_eq!(handle.snapshot().tokens, Some(9_800));
    let mut server = ServerLimits::default();
    server.requests.limit = Some(40);
    server.requests.remaining = Some(5);
    server.tokens.remaining = Some(2_000);
    *reply.lock().unwrap() = Resp { used: None, server };
    svc.clone().oneshot(2).await.unwrap();
    let s = handle.snapshot();
    assert_eq!(s.request_limit, Some(40));
    assert!(s.requests.unwrap() <= 5, "{s:?}");
    assert!(s.tokens.unwrap() <= 2_000, "{s:?}");
    // Never above the configuration.
    server.requests.limit = Some(1_000);
    *reply.lock().unwrap() = Resp { used: None, server };
    svc.oneshot(3).await.unwrap();
    assert_eq!(handle.snapshot().request_limit, Some(100));
}

#[tokio::test(start_paused = true)]
async fn an_unbounded_max_wait_waits_without_overflow() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let svc = one_per_ten_seconds()
        .max_wait(Duration::MAX)
        .hint_cap(Duration::MAX)
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    svc.clone().oneshot(1).await.unwrap();
    assert_eq!(svc.oneshot(2).await.unwrap(), 2);
}

#[test]
fn bad_settings_are_typed_errors() {
    let e = RateLimitLayer::builder().requests(0).build().unwrap_err();
    assert_eq!(e.field, "requests");
    let e = RateLimitLayer::builder()
        .window(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "window");
    let e = RateLimitLayer::builder()
        .window(Duration::MAX)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "window");
    let e = RateLimitLayer::builder()
        .burst(f64::NAN)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "burst");
    let e = RateLimitLayer::builder().burst(1.5).build().unwrap_err();
    assert_eq!(e.field, "burst");
    let e = RateLimitLayer::builder()
        .no_request_limit()
        .no_token_limit()
        .build()
        .unwrap_err();
    assert_eq!(e.field, "requests");
    let e = RateLimitLayer::builder()
        .hint_cap(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "hint_cap");
    let e = RateLimitLayer::builder()
        .key_by(|x: &u32| *x)
        .max_keys(0)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "max_keys");
}
