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

mod attempts {
    //! What the services below see through `Attempt::current`.

    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tower::{service_fn, Layer, Service, ServiceExt};

    use crate::classify::HttpError;
    use crate::retry::{Attempt, RetryLayer};

    type Seen = Arc<Mutex<Vec<Option<Attempt>>>>;

    /// Records the attempt it runs in and fails its first `fail` calls
    /// with a 503.
    fn flaky(
        seen: &Seen,
        fail: usize,
    ) -> impl Service<u32, Response = u32, Error = HttpError, Future: Send> + Clone + Send {
        let seen = Arc::clone(seen);
        service_fn(move |n: u32| {
            let seen = Arc::clone(&seen);
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(Attempt::current());
                if seen.len() <= fail {
                    Err(HttpError::new(503))
                } else {
                    Ok(n)
                }
            }
        })
    }

    /// Calls its inner service only when its own future is first polled,
    /// as the queue, the rate limiter and the fallback can.
    #[derive(Clone)]
    struct Lazy<S>(S);

    impl<S> Service<u32> for Lazy<S>
    where
        S: Service<u32> + Clone + Send + 'static,
        S::Future: Send,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, n: u32) -> Self::Future {
            let svc = self.0.clone();
            Box::pin(async move { svc.oneshot(n).await })
        }
    }

    fn layer() -> RetryLayer {
        Attempt::listen();
        RetryLayer::builder()
            .max_attempts(3)
            .seed(1)
            .build()
            .unwrap()
    }

    fn check(seen: &Seen) {
        let seen: Vec<Attempt> = seen.lock().unwrap().iter().map(|a| a.unwrap()).collect();
        assert_eq!(seen.len(), 4);
        assert_eq!(
            seen.iter().map(Attempt::retries).collect::<Vec<_>>(),
            [0, 1, 2, 0]
        );
        let key = seen[0].idempotency_key();
        assert!(seen[..3].iter().all(|a| a.idempotency_key() == key));
        assert_ne!(seen[3].idempotency_key(), key);
        assert_eq!(Attempt::current(), None, "nothing left set on the thread");
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_sees_its_retries_and_the_logical_requests_key() {
        let seen = Seen::default();
        let svc = layer().layer(flaky(&seen, 2));
        assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
        assert_eq!(svc.oneshot(8).await.unwrap(), 8);
        check(&seen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_layer_that_calls_from_its_future_passes_it_through() {
        let seen = Seen::default();
        let svc = layer().layer(Lazy(flaky(&seen, 2)));
        assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
        assert_eq!(svc.oneshot(8).await.unwrap(), 8);
        check(&seen);
    }

    #[tokio::test(start_paused = true)]
    async fn outside_the_retry_layer_there_is_none() {
        let seen = Seen::default();
        flaky(&seen, 0).oneshot(1).await.unwrap();
        assert_eq!(seen.lock().unwrap()[0], None);
    }
}
