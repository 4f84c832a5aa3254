//! Many worker threads on one limiter, in real time (once two calls race
//! for a lease, it is split between the threads' words): the calls
//! admitted never exceed the limit of the window, in either dimension and
//! per key, and every call short of the limit is admitted. The window is
//! an hour, so the count does not depend on how long the run takes: the
//! sliding log caps it at the limit, and a burst of the whole limit admits
//! that many at once. The limits are large, so that the lease is opened,
//! split and folded back many times (over a thousand split leases a run on
//! two cores); a close that missed a split word fails these.

use std::convert::Infallible;
use std::time::Duration;

use llm_resilience::ratelimit::RateLimitLayer;
use llm_resilience::Error;
use tower::{service_fn, Layer, Service, ServiceExt};

const TASKS: u64 = 32;
const CALLS: u64 = 20_000;

/// Every task calls through its own clone; what the admitted calls weigh
/// (`weight`: 1 to count them) per key (`x % keys`), and how many were
/// refused.
fn hammer<S>(svc: S, keys: u64, weight: fn(u64) -> u64) -> (Vec<u64>, u64)
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
                            Ok(x) => admitted[(x % keys) as usize] += weight(x),
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
        .requests(300_000)
        .no_token_limit()
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .build()
        .unwrap();
    let (admitted, refused) = hammer(layer.layer(echo()), 1, |_| 1);
    assert_eq!(admitted, [300_000]);
    assert_eq!(refused, TASKS * CALLS - 300_000);
}

#[test]
fn threads_get_exactly_the_token_limit() {
    let layer = hourly()
        .requests(1_000_000)
        .tokens(30_000_000)
        .estimate_tokens(|_: &u64| 100)
        .ignore_usage()
        .build()
        .unwrap();
    let (admitted, _) = hammer(layer.layer(echo()), 1, |_| 1);
    assert_eq!(admitted, [300_000]);
}

#[test]
fn threads_get_exactly_the_limit_of_each_key() {
    let layer = hourly()
        .requests(100_000)
        .no_token_limit()
        .estimate_tokens(|_: &u64| 0)
        .ignore_usage()
        .key_by(|x: &u64| x % 3)
        .build()
        .unwrap();
    let (admitted, _) = hammer(layer.layer(echo()), 3, |_| 1);
    assert_eq!(admitted, [100_000, 100_000, 100_000]);
}

#[test]
fn threads_never_get_more_tokens_than_the_limit_at_varying_costs() {
    const LIMIT: u64 = 20_000_000;
    let layer = hourly()
        .requests(10_000_000)
        .tokens(LIMIT)
        .estimate_tokens(|x: &u64| 50 + (*x % 100) as u32)
        .ignore_usage()
        .build()
        .unwrap();
    let (tokens, _) = hammer(layer.layer(echo()), 1, |x| 50 + x % 100);
    // Never above the limit; and the calls that came after it was nearly
    // spent (costs 50 to 149, in turn) took what a call could still take.
    assert!(tokens[0] <= LIMIT, "{} tokens admitted", tokens[0]);
    assert!(tokens[0] > LIMIT - 50, "{} tokens admitted", tokens[0]);
}
