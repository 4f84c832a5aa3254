//! The rate limiter against a reference model, on a paused clock: over a
//! simulated 10 minutes with 3 keys, random arrivals, costs and settle
//! corrections, no window of the configured length ever holds more than
//! either limit, and nobody waits longer than the limit requires.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::ratelimit::{RateLimitLayer, ReportsUsage, ServerLimits};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

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
