//! Many worker threads on one limiter, in real time (a lease is split
//! between the threads' words): the calls admitted never exceed the limit
//! of the window, in either dimension and per key, and every call short of
//! the limit is admitted. The window is an hour, so the count does not
//! depend on how long the run takes: the sliding log caps it at the limit,
//! and a burst of the whole limit admits that many at once.

use std::convert::Infallible;
use std::time::Duration;

use llm_resilience::ratelimit::RateLimitLayer;
use llm_resilience::Error;
use tower::{service_fn, Layer, Service, ServiceExt};

const TASKS: u64 = 16;
const CALLS: u64 = 1_000;

/// Every task calls through its own clone; the admitted calls per key
/// (`x % keys`) and the refused ones.
fn hammer<S>(svc: S, keys: u64) -> (Vec<u64>, u64)
where
    S: Service<u64, Response = u64, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    let mut admitted = vec![0u64; keys as usize];
                    let mut refused = 0;
                    for i in 0..CALLS {
                        let x = t * CALLS + i;
                        match svc.ready().await.unwrap().call(x).await {
                            Ok(x) => admitted[(x % keys) as usize] += 1,
                            Err(Error::RateLimited { .. }) => refused += 1,
                            Err(e) => panic!("unexpected {e}"),
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    (admitted, refused)
                })
            })
            .collect();
        let mut admitted = vec![0u64; keys as usize];
        let mut refused = 0;
        for t in tasks {
            let (a, r) = t.await.unwrap();
            admitted.iter_mut().zip(a).for_each(|(x, a)| *x += a);
            refused += r;
        }
        (admitted, refused)
    })
}

fn echo() -> impl Service<u64, Response = u64, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(|x: u64| async move { Ok::<_, Infallible>(x) })
}

/// An hour-long window, its whole limit at once, refusal when over.
fn hourly() -> llm_resilience::ratelimit::RateLimitLayerBuilder {
    RateLimitLayer::builder()
        .window(Duration::from_secs(3600))
        .burst(1.0)
        .reject()
}

#[test]
fn threads_get_exactly_the_request_limit() {
    let layer = hourly()
        .requests(2_000)
        .no_token_limit()
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .build()
        .unwrap();
    let (admitted, refused) = hammer(layer.layer(echo()), 1);
    assert_eq!(admitted, [2_000]);
    assert_eq!(refused, TASKS * CALLS - 2_000);
}

#[test]
fn threads_get_exactly_the_token_limit() {
    let layer = hourly()
        .requests(1_000_000)
        .tokens(150_000)
        .estimate_tokens(|_: &u64| 100)
        .ignore_usage()
        .build()
        .unwrap();
    let (admitted, _) = hammer(layer.layer(echo()), 1);
    assert_eq!(admitted, [1_500]);
}

#[test]
fn threads_get_exactly_the_limit_of_each_key() {
    let layer = hourly()
        .requests(1_000)
        .no_token_limit()
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .key_by(|x: &u64| x % 3)
        .build()
        .unwrap();
    let (admitted, _) = hammer(layer.layer(echo()), 3);
    assert_eq!(admitted, [1_000, 1_000, 1_000]);
}
