//! The fallback layer on a paused clock: what moves on, what stops, the
//! larger-context target, skipped circuits, the deadline across targets, the
//! degrade step, per-target rewriting and the per-request report.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::classify::{HttpError, Reason};
use llm_resilience::fallback::{Fallback, FallbackEventKind};
use llm_resilience::report::{with_report, TargetOutcome};
use llm_resilience::Error;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

type Req = (String, Option<&'static str>);
type Target = BoxCloneSyncService<Req, String, Error>;
type Models = Arc<Mutex<Vec<Option<&'static str>>>>;

/// A target that answers with `reply` (Ok) or the error, counting calls and
/// recording the model it was asked for.
fn target(
    name: &'static str,
    reply: Result<(), fn() -> HttpError>,
    delay: Duration,
) -> (Target, Arc<AtomicU32>, Models) {
    let calls = Arc::new(AtomicU32::new(0));
    let models = Arc::new(Mutex::new(Vec::new()));
    let (c, m) = (calls.clone(), models.clone());
    let svc = service_fn(move |(q, model): Req| {
        c.fetch_add(1, Ordering::SeqCst);
        m.lock().unwrap().push(model);
        async move {
            tokio::time::sleep(delay).await;
            match reply {
                Ok(()) => Ok(format!("{name}: {q}")),
                Err(make) => Err(Error::from_inner(make())),
            }
        }
    });
    (BoxCloneSyncService::new(svc), calls, models)
}

fn unavailable() -> HttpError {
    HttpError::new(503)
}
fn invalid() -> HttpError {
    HttpError::new(400).with_error_type("invalid_request_error")
}
fn too_long() -> HttpError {
    HttpError::new(400).with_error_code("context_length_exceeded")
}
fn quota() -> HttpError {
    HttpError::new(429).with_error_code("insufficient_quota")
}

fn ask() -> Req {
    ("q".to_owned(), None)
}

#[tokio::test(start_paused = true)]
async fn a_failing_primary_moves_on_and_the_report_says_so() {
    let (a, a_calls, _) = target("a", Err(unavailable), Duration::from_millis(10));
    let (b, b_calls, _) = target("b", Ok(()), Duration::from_millis(10));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .on_event(move |e| ev.lock().unwrap().push((e.kind, e.reason)))
        .build()
        .unwrap();
    let (out, report) = with_report(fb.oneshot(ask())).await;
    assert_eq!(out.unwrap(), "b: q");
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(report.answered_by.as_deref(), Some("b"));
    assert_eq!(report.targets.len(), 2);
    assert_eq!(
        report.targets[0].outcome,
        TargetOutcome::Failed(Reason::Unavailable)
    );
    assert_eq!(report.targets[1].outcome, TargetOutcome::Answered);
    assert!(!report.degraded);
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            (FallbackEventKind::MovedOn, Reason::Unavailable),
            (FallbackEventKind::Answered, Reason::Ok)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn quota_moves_on_but_an_invalid_request_goes_nowhere_else() {
    let (a, _, _) = target("a", Err(quota), Duration::ZERO);
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .build()
        .unwrap();
    assert_eq!(fb.oneshot(ask()).await.unwrap(), "b: q");
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);

    let (a, _, _) = target("a", Err(invalid), Duration::ZERO);
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let (big, big_calls, _) = target("big", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .larger_context("big", big, None)
        .build()
        .unwrap();
    let err = fb.oneshot(ask()).await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
    assert_eq!(big_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_context_length_failure_goes_to_the_larger_context_target_only() {
    let (a, _, _) = target("a", Err(too_long), Duration::ZERO);
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let (big, big_calls, big_models) = target("big", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .larger_context(
            "big",
            big,
            Some(Arc::new(|r: &mut Req| r.1 = Some("gpt-big"))),
        )
        .build()
        .unwrap();
    let (out, report) = with_report(fb.clone().oneshot(ask())).await;
    assert_eq!(out.unwrap(), "big: q");
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
    assert_eq!(big_calls.load(Ordering::SeqCst), 1);
    assert_eq!(*big_models.lock().unwrap(), vec![Some("gpt-big")]);
    assert_eq!(
        report.targets[0].outcome,
        TargetOutcome::Failed(Reason::ContextLength)
    );

    // Without a larger target, a context-length failure stops.
    let (a, _, _) = target("a", Err(too_long), Duration::ZERO);
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .build()
        .unwrap();
    assert!(fb.oneshot(ask()).await.is_err());
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_skipped_without_an_upstream_call() {
    let (a, a_calls, _) = target("a", Err(unavailable), Duration::ZERO);
    let breaker = CircuitBreakerLayer::builder().build().unwrap();
    let handle = breaker.handle();
    handle.force_open();
    let a: Target = BoxCloneSyncService::new(breaker.layer(a));
    let (b, _, _) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .build()
        .unwrap();
    let (out, report) = with_report(fb.oneshot(ask())).await;
    assert_eq!(out.unwrap(), "b: q");
    assert_eq!(a_calls.load(Ordering::SeqCst), 0);
    assert_eq!(report.targets[0].attempts, 0);
    assert_eq!(
        report.targets[0].outcome,
        TargetOutcome::Skipped(Reason::CircuitOpen)
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_after_the_deadline() {
    // The primary outlasts the deadline: cut, and the secondary never called.
    let (a, _, _) = target("a", Ok(()), Duration::from_secs(10));
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = fb.oneshot(ask()).await.unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { attempts: 1, .. }),
        "{err:?}"
    );
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);

    // The primary fails just as the deadline passes: the next is not sent.
    let (a, _, _) = target("a", Err(unavailable), Duration::from_secs(2));
    let (b, b_calls, _) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = fb.oneshot(ask()).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_degrade_step_answers_last_and_is_marked() {
    let (a, _, _) = target("a", Err(unavailable), Duration::ZERO);
    let (b, _, _) = target("b", Err(quota), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .target("b", b)
        .degrade(|req: &Req, err: &Error| {
            assert!(!matches!(err, Error::BadRequest { .. }));
            Some(format!("cached answer to {}", req.0))
        })
        .build()
        .unwrap();
    let (out, report) = with_report(fb.oneshot(ask())).await;
    assert_eq!(out.unwrap(), "cached answer to q");
    assert!(report.degraded);
    assert_eq!(report.answered_by, None);

    // A bad request is never degraded: the caller must learn it.
    let (a, _, _) = target("a", Err(invalid), Duration::ZERO);
    let fb = Fallback::builder()
        .target("a", a)
        .degrade(|_: &Req, _: &Error| Some("cached".to_owned()))
        .build()
        .unwrap();
    assert!(fb.oneshot(ask()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn each_target_gets_its_own_rewrite() {
    let (a, _, a_models) = target("a", Err(unavailable), Duration::ZERO);
    let (b, _, b_models) = target("b", Ok(()), Duration::ZERO);
    let fb = Fallback::builder()
        .target_with("a", a, |r: &mut Req| r.1 = Some("gpt-4o"))
        .target_with("b", b, |r: &mut Req| r.1 = Some("claude"))
        .build()
        .unwrap();
    fb.oneshot(ask()).await.unwrap();
    assert_eq!(*a_models.lock().unwrap(), vec![Some("gpt-4o")]);
    assert_eq!(*b_models.lock().unwrap(), vec![Some("claude")]);
}

#[test]
fn bad_settings_are_config_errors() {
    let e = Fallback::<Target, Req, String>::builder()
        .build()
        .unwrap_err();
    assert_eq!(e.field, "targets");
    let (a, _, _) = target("a", Ok(()), Duration::ZERO);
    let e = Fallback::<Target, Req, String>::builder()
        .target("a", a)
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "deadline");
    let (a, _, _) = target("a", Ok(()), Duration::ZERO);
    assert!(Fallback::<Target, Req, String>::builder()
        .target("a", a)
        .deadline(Duration::MAX)
        .build()
        .is_ok());
}
