//! The fleet rate limiter (`llm_resilience::redis::ratelimit`) against a
//! real `redis-server` (`LLM_RESILIENCE_REDIS_URL`, see
//! `tests/redis_support`): two pipelines in separate runtimes share one
//! limit, checked in every sliding window of the mock LLM server's arrival
//! times; settlement and 429 pauses are shared; an unreachable Redis falls
//! back to the local share and comes back; bad settings are typed errors.
//!
//! Real time, short windows; nothing asserts on durations.

#[path = "redis_support/own_server.rs"]
mod own_server;
mod redis_support;
#[cfg(feature = "metrics")]
#[path = "support/metrics_table.rs"]
mod table;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::client::{ChatRequest, OpenAiClient};
use llm_resilience::ratelimit::{ReportsUsage, ServerDimension, ServerLimits};
use llm_resilience::redis::ratelimit::{
    FleetRateLimitEvent, FleetRateLimitEventKind as Kind, FleetRateLimitLayer,
};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};
use llm_resilience::Error;
use own_server::OwnServer;
use redis_support::{unique, url};
use tower::{service_fn, Layer, ServiceExt};

type Events = Arc<Mutex<Vec<FleetRateLimitEvent>>>;
type Hook = Box<dyn Fn(&FleetRateLimitEvent) + Send + Sync>;

fn recorder() -> (
    Events,
    impl Fn(&FleetRateLimitEvent) + Send + Sync + 'static,
) {
    let events: Events = Arc::default();
    let e = events.clone();
    (events, move |ev: &FleetRateLimitEvent| {
        e.lock().unwrap().push(*ev)
    })
}

fn kinds(events: &Events) -> Vec<Kind> {
    events.lock().unwrap().iter().map(|e| e.kind).collect()
}

type Builder = llm_resilience::redis::ratelimit::FleetRateLimitLayerBuilder;

/// Two pipelines (each in its own thread with its own tokio runtime, as two
/// processes would be: own connections to Redis, own HTTP clients) sharing
/// the limit `configure` sets on one key, each offering `per_pipeline`
/// calls at once to the mock LLM server. Returns how many calls were
/// admitted, how many refused with `Error::RateLimited`, and the server's
/// arrival times, sorted.
fn two_pipelines(
    configure: fn(Builder) -> Builder,
    per_pipeline: usize,
) -> Option<(usize, usize, Vec<std::time::Instant>)> {
    let url = url()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt
        .block_on(MockServer::start(FaultScript::new().reply_words(8)))
        .unwrap();
    let base = server.base_url();
    let key = unique("fleet");
    let pipelines: Vec<_> = (0..2)
        .map(|_| {
            let (url, key, base) = (url.clone(), key.clone(), base.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let limit = configure(FleetRateLimitLayer::builder(url, key))
                        .redis_timeout(Duration::from_secs(2))
                        .fleet_size(2)
                        .build()
                        .unwrap();
                    let client = OpenAiClient::builder(base)
                        .api_key("sk-test")
                        .model("mock-model")
                        .connect_timeout(Duration::from_secs(2))
                        .total_timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let svc = limit.layer(client);
                    let calls: Vec<_> = (0..per_pipeline)
                        .map(|i| {
                            let req = ChatRequest::user(format!("question {i}")).max_tokens(8);
                            tokio::spawn(svc.clone().oneshot(req))
                        })
                        .collect();
                    let (mut ok, mut limited) = (0, 0);
                    for c in calls {
                        match c.await.unwrap() {
                            Ok(_) => ok += 1,
                            Err(Error::RateLimited { .. }) => limited += 1,
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                    assert!(!limit.is_local(), "Redis was reachable throughout");
                    (ok, limited)
                })
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for p in pipelines {
        let (o, l) = p.join().unwrap();
        ok += o;
        limited += l;
    }
    let mut arrivals: Vec<_> = server.requests().iter().map(|r| r.received).collect();
    arrivals.sort();
    Some((ok, limited, arrivals))
}

/// The most arrivals in any window `[t_i, t_i + window)` starting at an
/// arrival (the fullest windows start at one).
fn most_in_a_window(arrivals: &[std::time::Instant], window: Duration) -> usize {
    (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|t| t.duration_since(arrivals[i]) < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// N requests per second, 30 calls offered at once: they wait their turn.
#[test]
fn two_runtimes_sharing_a_limit_never_exceed_it_in_any_window() {
    const N: u64 = 10;
    const WINDOW: Duration = Duration::from_secs(1);
    let configure = |b: Builder| {
        b.requests(N)
            .no_token_limit()
            .window(WINDOW)
            .burst(0.3)
            // The default margin is 1/64 of the window (16 ms here); a
            // loaded CI machine can delay one request more than another by
            // more than that.
            .send_margin(Duration::from_millis(60))
            .max_wait(Duration::from_secs(60))
    };
    let Some((ok, limited, arrivals)) = two_pipelines(configure, 15) else {
        return;
    };
    assert_eq!((ok, limited), (30, 0), "every call waited its turn");
    assert_eq!(arrivals.len(), 30);
    let most = most_in_a_window(&arrivals, WINDOW);
    println!("most arrivals in any {WINDOW:?} window: {most} (limit {N})");
    assert!(most as u64 <= N, "{most} arrivals in one window, limit {N}");
    // 30 calls offered at once: the limit was reached, not merely unneeded.
    assert_eq!(most as u64, N);
}

/// N requests per minute, refused beyond: of 16 calls offered at once, N
/// go and the others are refused; the server sees N.
#[test]
fn two_runtimes_sharing_a_per_minute_limit_admit_n_in_the_minute() {
    const N: u64 = 6;
    let configure = |b: Builder| {
        b.requests(N)
            .no_token_limit()
            .window(Duration::from_secs(60))
            .burst(1.0)
            .reject()
    };
    let Some((ok, limited, arrivals)) = two_pipelines(configure, 8) else {
        return;
    };
    assert_eq!((ok as u64, limited), (N, 16 - N as usize));
    assert_eq!(arrivals.len() as u64, N);
    assert!(most_in_a_window(&arrivals, Duration::from_secs(60)) as u64 <= N);
}

/// A response reporting what the limiter settles.
#[derive(Clone, Debug, Default)]
struct Reply {
    used: Option<u64>,
    server: ServerLimits,
}

impl ReportsUsage for Reply {
    fn tokens_used(&self) -> Option<u64> {
        self.used
    }
    fn server_limits(&self) -> ServerLimits {
        self.server
    }
}

fn tokens_layer(url: &str, key: &str, events: &Events) -> FleetRateLimitLayer<fn(&Reply) -> u32> {
    let e = events.clone();
    FleetRateLimitLayer::builder(url, key)
        .no_request_limit()
        .tokens(100)
        .burst(1.0)
        .window(Duration::from_secs(60))
        .reject()
        .redis_timeout(Duration::from_secs(2))
        .on_event(move |ev| e.lock().unwrap().push(*ev))
        .estimate_tokens((|r: &Reply| r.used.map_or(60, |_| 60)) as fn(&Reply) -> u32)
        .build()
        .unwrap()
}

#[tokio::test]
async fn settlement_and_steering_are_shared_by_two_limiters() {
    let Some(url) = url() else { return };
    let key = unique("settle");
    let (ea, eb): (Events, Events) = (Arc::default(), Arc::default());
    // Each request says what the "provider" reports for it.
    let echo = service_fn(|r: Reply| async move { Ok::<_, HttpError>(r) });
    let a = tokens_layer(&url, &key, &ea).layer(echo);
    let b = tokens_layer(&url, &key, &eb).layer(echo);

    // A's call is charged its estimate (60 of 100) and settled at 10 used.
    let used10 = Reply {
        used: Some(10),
        ..Reply::default()
    };
    a.clone().oneshot(used10.clone()).await.unwrap();
    // B sees the refund: 10 + 60 fits in 100 (60 + 60 would not).
    let used60 = Reply {
        used: Some(60),
        ..Reply::default()
    };
    b.clone().oneshot(used60.clone()).await.unwrap();
    // 70 used: A's next 60 does not fit, for either limiter.
    let err = a.clone().oneshot(used60.clone()).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    assert!(kinds(&ea).contains(&Kind::Rejected));

    // Steering on a fresh key: the server says no tokens are left.
    let key = unique("steer");
    let a = tokens_layer(&url, &key, &ea).layer(echo);
    let b = tokens_layer(&url, &key, &eb).layer(echo);
    let spent = Reply {
        used: Some(1),
        server: ServerLimits {
            tokens: ServerDimension {
                limit: None,
                remaining: Some(0),
            },
            ..ServerLimits::default()
        },
    };
    a.clone().oneshot(spent).await.unwrap();
    assert!(kinds(&ea).contains(&Kind::Steered), "{:?}", kinds(&ea));
    let err = b.clone().oneshot(used10.clone()).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
}

#[tokio::test]
async fn a_429_pauses_the_key_for_every_limiter() {
    let Some(url) = url() else { return };
    let key = unique("pause");
    let (events, hook) = recorder();
    let layer = |hook: Option<Hook>| {
        let mut b = FleetRateLimitLayer::builder(url.clone(), key.clone())
            .requests(1000)
            .no_token_limit()
            .reject()
            .hint_cap(Duration::from_secs(60))
            .redis_timeout(Duration::from_secs(2));
        if let Some(h) = hook {
            b = b.on_event(h);
        }
        b.estimate_tokens(|_: &u32| 1)
            .ignore_usage()
            .build()
            .unwrap()
    };
    let throttled = service_fn(|_: u32| async {
        Err::<u32, _>(HttpError::new(429).with_header("retry-after", "30"))
    });
    let fine = service_fn(|n: u32| async move { Ok::<_, HttpError>(n) });
    let a = layer(Some(Box::new(hook))).layer(throttled);
    let b = layer(None).layer(fine);

    assert_eq!(b.clone().oneshot(1).await.unwrap(), 1);
    let err = a.oneshot(2).await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    let paused = events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.kind == Kind::Paused)
        .copied();
    let paused = paused.expect("the 429 paused the key").retry_after.unwrap();
    assert!(paused > Duration::from_secs(20) && paused <= Duration::from_secs(30));
    // The other limiter, with its own connection, is paused too.
    match b.oneshot(3).await.unwrap_err() {
        Error::RateLimited { retry_after, .. } => {
            assert!(retry_after > Duration::from_secs(20), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_falls_back_to_the_local_share_and_recovers() {
    let Some(bin) = OwnServer::binary() else {
        return;
    };
    let mut server = OwnServer::new(bin);
    let (events, hook) = recorder();
    let key = unique("fallback");
    let layer = FleetRateLimitLayer::builder(server.url(), key.clone())
        .requests(4)
        .no_token_limit()
        .burst(1.0)
        .window(Duration::from_secs(60))
        .fleet_size(2)
        .reject()
        .redis_timeout(Duration::from_millis(200))
        .probe_interval(Duration::from_millis(100))
        .on_event(hook)
        .estimate_tokens(|_: &u32| 1)
        .ignore_usage()
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, HttpError>(n) }));

    // Nothing listens: the first call falls back and is answered; the
    // local share is 4 / 2 = 2 per window.
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert!(layer.is_local());
    assert_eq!(kinds(&events), [Kind::FellBack]);
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
    let err = svc.clone().oneshot(3).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");

    // Redis comes up: a probe (at most one per 100 ms) finds it.
    server.start().await;
    let mut recovered = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = svc.clone().oneshot(4).await;
        if !layer.is_local() {
            recovered = true;
            break;
        }
    }
    assert!(
        recovered,
        "no probe reached the restarted Redis: {:?}",
        kinds(&events)
    );
    assert_eq!(kinds(&events)[..2], [Kind::FellBack, Kind::Recovered]);
    // The shared limit (4) is in force again, and held in Redis: the probe
    // took one; three more go, the fifth does not.
    for n in 0..3 {
        svc.clone().oneshot(n).await.unwrap();
    }
    let err = svc.clone().oneshot(9).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    let mut conn = redis_support::raw(&server.url()).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("llmrl:{{{key}}}:state"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1);

    // Redis goes away again: calls keep being answered, by the fallback.
    server.stop();
    let r = svc.clone().oneshot(10).await;
    assert!(
        r.is_ok() || matches!(r, Err(Error::RateLimited { .. })),
        "{r:?}"
    );
    assert!(layer.is_local());
    assert_eq!(
        kinds(&events)
            .iter()
            .filter(|k| **k == Kind::FellBack)
            .count(),
        2
    );
}

#[tokio::test]
async fn bad_settings_are_config_errors_and_extreme_ones_still_answer() {
    let b = || FleetRateLimitLayer::builder("redis://127.0.0.1:1/", "k");
    let field = |r: Result<FleetRateLimitLayer, llm_resilience::ConfigError>| r.unwrap_err().field;
    assert_eq!(field(b().fleet_size(0).build()), "fleet_size");
    assert_eq!(field(b().fleet_size(u64::MAX).build()), "fleet_size");
    assert_eq!(
        field(FleetRateLimitLayer::builder("http://example.com/", "k").build()),
        "url"
    );
    assert_eq!(
        field(FleetRateLimitLayer::builder("not a url", "k").build()),
        "url"
    );
    assert_eq!(
        field(FleetRateLimitLayer::llm_defaults("redis://h/", "")),
        "key"
    );
    assert_eq!(
        field(FleetRateLimitLayer::llm_defaults("redis://h/", "a{b}")),
        "key"
    );
    assert_eq!(field(b().window(Duration::MAX).build()), "window");
    assert_eq!(field(b().window(Duration::ZERO).build()), "window");
    assert_eq!(field(b().requests(0).build()), "requests");
    assert_eq!(field(b().tokens(u64::MAX).build()), "tokens");
    assert_eq!(field(b().burst(1.5).build()), "burst");
    assert_eq!(field(b().burst(f64::NAN).build()), "burst");
    assert_eq!(field(b().hint_cap(Duration::MAX).build()), "hint_cap");
    assert_eq!(field(b().hint_cap(Duration::ZERO).build()), "hint_cap");
    assert_eq!(
        field(b().redis_timeout(Duration::MAX).build()),
        "redis_timeout"
    );
    assert_eq!(
        field(b().redis_timeout(Duration::ZERO).build()),
        "redis_timeout"
    );
    assert_eq!(
        field(b().probe_interval(Duration::MAX).build()),
        "probe_interval"
    );
    assert_eq!(
        field(b().server_window(Duration::MAX).build()),
        "server_window"
    );
    assert_eq!(
        field(b().no_request_limit().no_token_limit().build()),
        "requests"
    );

    // The widest settings build, and a call against a closed port is
    // answered (by the fallback), never left hanging.
    let layer = b()
        .max_wait(Duration::MAX)
        .fleet_size(10_000)
        .window(Duration::from_secs(24 * 3600))
        .redis_timeout(Duration::from_millis(100))
        .estimate_tokens(|_: &u32| u32::MAX)
        .ignore_usage()
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, HttpError>(n) }));
    let r = svc.oneshot(7).await;
    // u32::MAX tokens exceed even the whole token limit: refused at once.
    assert!(matches!(r, Err(Error::RateLimited { .. })), "{r:?}");
    assert!(layer.is_local());
}

/// The documented metrics (docs/metrics.md): the fallback gauge and the
/// event counter, with their labels, through a fall back and a recovery.
#[cfg(feature = "metrics")]
#[test]
fn fallback_and_recovery_are_counted_under_the_documented_names() {
    let Some(bin) = OwnServer::binary() else {
        return;
    };
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut server = OwnServer::new(bin);
            let layer = FleetRateLimitLayer::builder(server.url(), unique("metrics"))
                .name("fleet")
                .requests(1)
                .no_token_limit()
                .window(Duration::from_secs(60))
                .reject()
                .redis_timeout(Duration::from_millis(200))
                .probe_interval(Duration::from_millis(50))
                .estimate_tokens(|_: &u32| 1)
                .ignore_usage()
                .build()
                .unwrap();
            let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, HttpError>(n) }));
            svc.clone().oneshot(1).await.unwrap();
            assert!(layer.is_local());
            server.start().await;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                let _ = svc.clone().oneshot(2).await;
                if !layer.is_local() {
                    break;
                }
            }
            assert!(!layer.is_local());
            // The shared limit (1) is spent: refused.
            let err = svc.oneshot(3).await.unwrap_err();
            assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let seen = table::read_snapshot(&snapshot);
    table::check(&seen, &["llm_resilience_fleet_ratelimit_"]);
    let events: Vec<_> = seen.series["llm_resilience_fleet_ratelimit_events_total"]
        .iter()
        .map(|s| s.2.clone())
        .collect();
    for e in ["fell_back", "recovered", "rejected"] {
        assert!(
            events.contains(&format!("kind={e},limiter=fleet"))
                || events.contains(&format!("limiter=fleet,kind={e}")),
            "{e}: {events:?}"
        );
    }
}

/// A "Redis" that accepts connections and never answers: every Redis call
/// is bounded by the timeout, and each call is answered by the fallback.
#[tokio::test]
async fn a_silent_redis_is_bounded_by_the_timeout_and_falls_back() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accept and hold the connections, answering nothing.
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let (events, hook) = recorder();
    let layer = FleetRateLimitLayer::builder(format!("redis://127.0.0.1:{port}/"), "silent")
        .requests(20)
        .no_token_limit()
        .burst(1.0)
        .fleet_size(2)
        .redis_timeout(Duration::from_millis(100))
        .probe_interval(Duration::from_millis(50))
        .on_event(hook)
        .estimate_tokens(|_: &u32| 1)
        .ignore_usage()
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, HttpError>(n) }));
    let calls: Vec<_> = (0..5)
        .map(|n| tokio::spawn(svc.clone().oneshot(n)))
        .collect();
    for (n, c) in calls.into_iter().enumerate() {
        assert_eq!(c.await.unwrap().unwrap(), n as u32);
    }
    // A probe later: still silent, still answered, no second fall back.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(svc.oneshot(9).await.unwrap(), 9);
    assert!(layer.is_local());
    assert_eq!(kinds(&events), [Kind::FellBack]);
    held.abort();
}
