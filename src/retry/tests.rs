//! The attempt timeout and the deadline cost nothing to a call that
//! answers at once: no timer is created (no allocation, no clock read for
//! it); one is created only when an attempt waits.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tower::{service_fn, Layer, Service, ServiceExt};

use super::RetryLayer;

fn layer() -> RetryLayer {
    RetryLayer::builder()
        .max_attempts(3)
        .attempt_timeout(Duration::from_secs(1))
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_call_that_answers_at_once_creates_no_timer() {
    let mut svc = layer().layer(service_fn(
        |n: u32| async move { Ok::<_, std::io::Error>(n) },
    ));
    svc.ready().await.unwrap();
    let mut fut = pin!(svc.call(7));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(7))));
    assert!(!fut.has_timer());
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_waits_gets_a_timer_that_cuts_it() {
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    let mut svc = layer().layer(mock);
    svc.ready().await.unwrap();
    let mut fut = Box::pin(svc.call(7));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert!(fut.has_timer());
    let fut = tokio::spawn(fut);
    let (req, _reply) = handle.next_request().await.unwrap();
    assert_eq!(req, 7);
    // The first attempt times out after 1 s (the paused clock moves on by
    // itself); the retry, after its backoff, is answered.
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(req, 7);
    reply.send_response(8);
    assert_eq!(fut.await.unwrap().unwrap(), 8);
}
