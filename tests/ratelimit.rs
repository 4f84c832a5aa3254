//! The rate limiter on a paused clock: a 429 pauses its key only, a
//! dropped waiter's place is reused, waiters go in order at the pace,
//! rejection and sharing, the burst. (The model test against a reference is in
//! `ratelimit_model.rs`.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::classify::HttpError;
use llm_resilience::ratelimit::{
    RateLimitEvent, RateLimitEventKind, RateLimitLayer, ReportsUsage, ServerLimits,
};
use llm_resilience::Error;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

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

type Log = Arc<Mutex<Vec<(&'static str, Instant)>>>;

type BoxInner = tower::util::BoxCloneSyncService<&'static str, Resp, HttpError>;

fn ok(used: Option<u64>) -> Resp {
    Resp {
        used,
        server: ServerLimits::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_its_key_once_and_leaves_others_alone() {
    a_429_pauses_its_key_once(false).await;
}

/// The same when the layer reads nothing from responses: an admitted
/// call's future then holds no reference to its limiter, and the 429 finds
/// the limiter by its number.
#[tokio::test(start_paused = true)]
async fn a_429_pauses_its_key_once_when_responses_are_read_for_nothing() {
    a_429_pauses_its_key_once(true).await;
}

async fn a_429_pauses_its_key_once(ignore_usage: bool) {
    let events: Arc<Mutex<Vec<RateLimitEvent>>> = Arc::default();
    let builder = {
        let events = Arc::clone(&events);
        RateLimitLayer::builder()
            .requests(100)
            .no_token_limit()
            .estimate_tokens(|_: &&'static str| 0)
            .on_event(move |e| events.lock().unwrap().push(*e))
    };
    let key = |k: &&'static str| *k;
    if ignore_usage {
        let layer = builder.ignore_usage().key_by(key).build().unwrap();
        pauses_once(layer, events).await;
    } else {
        pauses_once(builder.key_by(key).build().unwrap(), events).await;
    }
}

async fn pauses_once<L>(layer: L, events: Arc<Mutex<Vec<RateLimitEvent>>>)
where
    L: Layer<BoxInner>,
    L::Service: Service<&'static str, Response = Resp, Error = Error> + Clone + Send + 'static,
    <L::Service as Service<&'static str>>::Future: Send,
{
    let calls: Log = Arc::default();
    let throttled = Arc::new(Mutex::new(3));
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
    let svc = layer.layer(tower::util::BoxCloneSyncService::new(inner));
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

#[tokio::test(start_paused = true)]
async fn the_burst_is_the_share_of_each_limit_that_goes_at_once() {
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    // 100 requests a minute, a tenth at once: 10 go, the 11th is refused
    // with the pace's spacing (60 s / 100) at most, and goes after it.
    let svc = RateLimitLayer::builder()
        .requests(100)
        .no_token_limit()
        .burst(0.1)
        .reject()
        .estimate_tokens(|_: &u32| 0)
        .ignore_usage()
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    for i in 0..10 {
        svc.clone().oneshot(i).await.unwrap();
    }
    match svc.clone().oneshot(10).await {
        Err(Error::RateLimited { retry_after, .. }) => assert!(
            retry_after > Duration::ZERO && retry_after <= Duration::from_millis(600),
            "{retry_after:?}"
        ),
        other => panic!("the 11th went at once: {other:?}"),
    }
    tokio::time::advance(Duration::from_millis(600)).await;
    svc.clone().oneshot(11).await.unwrap();
    assert_eq!(calls.lock().unwrap().len(), 11);

    // 1,000 tokens a minute, a tenth at once: a call of 60 goes, a second
    // one (120 in all) does not.
    let svc = RateLimitLayer::builder()
        .no_request_limit()
        .tokens(1_000)
        .burst(0.1)
        .reject()
        .estimate_tokens(|_: &u32| 60)
        .ignore_usage()
        .build()
        .unwrap()
        .layer(recorder(Arc::clone(&calls)));
    svc.clone().oneshot(1).await.unwrap();
    assert!(
        matches!(svc.clone().oneshot(2).await, Err(Error::RateLimited { .. })),
        "120 tokens went at once with a burst of 100"
    );
}

#[tokio::test(start_paused = true)]
async fn the_keyed_map_keeps_at_most_max_keys_and_evicts_a_quiet_key_first() {
    let layer = RateLimitLayer::builder()
        .requests(10)
        .burst(1.0)
        .no_token_limit()
        .window(Duration::from_secs(60))
        .reject()
        .estimate_tokens(|_: &u32| 0)
        .ignore_usage()
        .key_by(|x: &u32| *x)
        .max_keys(2)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, Error>(x) }));
    let sorted = |mut keys: Vec<u32>| {
        keys.sort_unstable();
        keys
    };
    svc.ready().await.unwrap().call(1).await.unwrap();
    // Key 1 is held (a handle to its limiter), so it is not quiet.
    let held = handle.get(&1).expect("key 1 is known");
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call(2).await.unwrap();
    // Both calls leave the window: key 2 is quiet, key 1 is held (and the
    // least recently used).
    tokio::time::advance(Duration::from_secs(61)).await;
    svc.ready().await.unwrap().call(3).await.unwrap();
    assert_eq!(sorted(handle.keys()), [1, 3], "the quiet key went first");
    // No quiet key (3 is recent, 1 held): the least recently used goes.
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call(4).await.unwrap();
    assert_eq!(
        sorted(handle.keys()),
        [3, 4],
        "then the least recently used"
    );
    drop(held);
    // Every thread's copy of the map holds the same keys.
    let seen = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8).map(|_| s.spawn(|| sorted(handle.keys()))).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(seen.iter().all(|k| k == &[3, 4]), "{seen:?}");
}

/// A key whose clone panics when armed, after a given number of clones.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Touchy(u32);

static CLONES_LEFT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);

impl Clone for Touchy {
    fn clone(&self) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let left = CLONES_LEFT.load(SeqCst);
        if left == 0 {
            CLONES_LEFT.store(-1, SeqCst);
            panic!("a key's clone panics");
        }
        if left > 0 {
            CLONES_LEFT.store(left - 1, SeqCst);
        }
        Touchy(self.0)
    }
}

#[tokio::test]
async fn a_key_that_panics_while_the_map_changes_leaves_no_copy_apart() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let layer = RateLimitLayer::builder()
        .requests(10)
        .no_token_limit()
        .reject()
        .estimate_tokens(|_: &u32| 0)
        .ignore_usage()
        .key_by(|x: &u32| Touchy(*x))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, Error>(x) }));
    svc.ready().await.unwrap().call(1).await.unwrap();
    // The second clone of key 2 (its insertion into the second copy of
    // the map, on a machine with two or more cores) panics.
    svc.ready().await.unwrap();
    CLONES_LEFT.store(1, std::sync::atomic::Ordering::SeqCst);
    let panicked = catch_unwind(AssertUnwindSafe(|| drop(svc.call(2))));
    CLONES_LEFT.store(-1, std::sync::atomic::Ordering::SeqCst);
    // The next new key mends the copies.
    svc.ready().await.unwrap().call(3).await.unwrap();
    let keys = || {
        let mut k: Vec<u32> = handle.keys().into_iter().map(|t| t.0).collect();
        k.sort_unstable();
        k
    };
    let seen = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8).map(|_| s.spawn(keys)).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    let first = seen[0].clone();
    assert!(seen.iter().all(|k| k == &first), "copies apart: {seen:?}");
    assert!(first.contains(&1) && first.contains(&3), "{first:?}");
    // With one copy (one core) the clone that panics is never made.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(panicked.is_err(), cores > 1);
}
