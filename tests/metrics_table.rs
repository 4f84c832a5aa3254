//! The metrics table (`docs/metrics.md`, the module `observability`) is the
//! contract: every layer is driven so that each name in it is emitted with
//! its type and labels, and no name outside it is. The Redis rows are
//! checked by `tests/redis_metrics.rs` against a real server.
#![cfg(feature = "metrics")]

#[path = "support/metrics_table.rs"]
mod table;

use std::time::Duration;

use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::chaos::{ChaosLayer, Fault, Latency};
use llm_resilience::classify::HttpError;
use llm_resilience::pipeline::AgentPipeline;
use llm_resilience::queue::QueueLayer;
use llm_resilience::ratelimit::RateLimitLayer;
use llm_resilience::{BoxError, Error};
use metrics_util::debugging::DebuggingRecorder;
use tokio::time::sleep;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

type Client = BoxCloneSyncService<String, String, HttpError>;

/// The queue: one call in flight and one waiting, then the snapshot gauges.
async fn queue() {
    let layer = QueueLayer::builder()
        .name("jobs")
        .concurrency(1)
        .capacity(4)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|ms: u64| async move {
        sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(ms)
    }));
    let first = tokio::spawn(svc.clone().oneshot(100));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(100));
    tokio::task::yield_now().await;
    handle.record_metrics();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
}

/// The pipeline: the primary fails (a retry, then its breaker trips), the
/// backup answers; a request both fail gets the degraded answer.
async fn pipeline() {
    let primary: Client = BoxCloneSyncService::new(service_fn(|_: String| async {
        Err::<String, _>(HttpError::new(503))
    }));
    let backup: Client = BoxCloneSyncService::new(service_fn(|q: String| async move {
        if q == "nobody can" {
            Err(HttpError::new(503))
        } else {
            Ok(format!("backup: {q}"))
        }
    }));
    let agent = AgentPipeline::builder()
        .target("primary", primary)
        .fallback("backup", backup)
        .retry(|r| r.max_attempts(2).seed(1))
        .breaker(|b| b.consecutive_failures(2).seed(1))
        .degrade(|_: &String, _: &Error| Some("canned".to_owned()))
        .build()
        .unwrap();
    let reply = agent.clone().oneshot("hello".to_owned()).await.unwrap();
    assert_eq!(reply, "backup: hello");
    assert_eq!(
        agent.breaker("primary").unwrap().state(),
        llm_resilience::breaker::State::Open
    );
    let reply = agent.oneshot("nobody can".to_owned()).await.unwrap();
    assert_eq!(reply, "canned");
}

/// A breaker alone: trips, refuses, probes, closes, is forced open.
async fn breaker() {
    let layer = CircuitBreakerLayer::builder()
        .name("solo")
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(1))
        .open_jitter(0.0)
        .half_open_probes(1)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|fail: bool| async move {
        if fail {
            Err(HttpError::new(503))
        } else {
            Ok(())
        }
    }));
    svc.clone().oneshot(true).await.unwrap_err();
    let refused = svc.clone().oneshot(false).await.unwrap_err();
    assert!(matches!(refused, Error::CircuitOpen { .. }), "{refused:?}");
    sleep(Duration::from_secs(2)).await;
    svc.clone().oneshot(false).await.unwrap();
    handle.force_open();
    svc.oneshot(false).await.unwrap_err();
}

/// A rate limiter: a wait in line, a server's pause, the budget gauges.
async fn ratelimit() {
    let layer = RateLimitLayer::builder()
        .name("openai")
        .requests(1)
        .no_token_limit()
        .window(Duration::from_secs(10))
        .burst(1.0)
        .estimate_tokens(|_: &u32| 0)
        .ignore_usage()
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|x: u32| async move {
        if x == 9 {
            Err(HttpError::new(429).with_header("retry-after", "3"))
        } else {
            Ok::<_, HttpError>(x)
        }
    }));
    svc.clone().oneshot(1).await.unwrap();
    svc.clone().oneshot(9).await.unwrap_err();
    handle.record_metrics("primary");
}

/// Chaos: an error and a delay on one call, a hung attempt on another.
async fn chaos() {
    let ok = service_fn(|x: u32| async move { Ok::<_, HttpError>(x) });
    let errors = ChaosLayer::builder()
        .name("errors")
        .latency(Latency::Fixed(Duration::from_millis(5)), 1.0)
        .error_rate(Fault::status(503), 1.0)
        .build()
        .unwrap()
        .layer(ok);
    errors.oneshot(1).await.unwrap_err();
    let hangs = ChaosLayer::builder()
        .name("hangs")
        .timeout_rate(Duration::from_millis(5), 1.0)
        .build()
        .unwrap()
        .layer(ok);
    hangs.oneshot(1).await.unwrap_err();
}

#[test]
fn every_name_in_the_table_is_emitted_and_no_other() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            queue().await;
            pipeline().await;
            breaker().await;
            ratelimit().await;
            chaos().await;
        });
    });
    let seen = table::read(&snapshotter);
    table::check(
        &seen,
        &[
            "llm_resilience_queue_",
            "llm_resilience_retry_",
            "llm_resilience_breaker_",
            "llm_resilience_ratelimit_",
            "llm_resilience_fallback_",
            "llm_resilience_chaos_",
        ],
    );
    // The instance labels: the pipeline names each target's retry and
    // breaker after the target; the queue, the breaker alone and the chaos
    // layers are named by their `name`.
    let values =
        |name: &str| -> Vec<String> { seen.series[name].iter().map(|s| s.2.clone()).collect() };
    let states = values("llm_resilience_breaker_state");
    for b in ["breaker=primary", "breaker=backup", "breaker=solo"] {
        assert!(states.contains(&b.to_owned()), "{states:?}");
    }
    let transitions = values("llm_resilience_breaker_transitions_total");
    for t in [
        "breaker=primary,from=closed,to=open",
        "breaker=solo,from=closed,to=open",
        "breaker=solo,from=open,to=half_open",
        "breaker=solo,from=half_open,to=closed",
        "breaker=solo,from=closed,to=forced_open",
    ] {
        assert!(transitions.contains(&t.to_owned()), "{t}: {transitions:?}");
    }
    let queued = values("llm_resilience_queue_events_total");
    assert!(
        queued.contains(&"queue=jobs,kind=queued".to_owned()),
        "{queued:?}"
    );
    let retries = values("llm_resilience_retry_decisions_total");
    let t = "retry=primary,decision=exhausted,reason=unavailable".to_owned();
    assert!(retries.contains(&t), "{retries:?}");
    let injected = values("llm_resilience_chaos_injected_total");
    for i in [
        "chaos=errors,kind=error",
        "chaos=errors,kind=latency",
        "chaos=hangs,kind=timeout",
    ] {
        assert!(injected.contains(&i.to_owned()), "{i}: {injected:?}");
    }
}

#[test]
fn the_table_parses_and_covers_every_layer() {
    let rows = table::rows();
    for prefix in [
        "queue",
        "retry",
        "breaker",
        "ratelimit",
        "fallback",
        "chaos",
        "redis",
        "fleet_ratelimit",
    ] {
        let p = format!("llm_resilience_{prefix}_");
        assert!(rows.keys().any(|n| n.starts_with(&p)), "no {p} row");
    }
    // Counters end in `_total`, and nothing else does.
    for (name, row) in &rows {
        assert_eq!(
            name.ends_with("_total"),
            row.kind == table::Kind::Counter,
            "{name}: {row:?}"
        );
    }
}
