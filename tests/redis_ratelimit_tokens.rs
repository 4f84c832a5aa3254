//! The fleet rate limiter's token limit against a real `redis-server`
//! (`LLM_RESILIENCE_REDIS_URL`): two pipelines in separate runtimes send
//! calls of random estimated costs that use random shares of them; each
//! call is settled on the shared limit with what it used. In every sliding
//! window of the times the calls were sent, the tokens used stay within
//! the limit.
//!
//! Real time, one-second windows; nothing asserts on durations.

mod redis_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_resilience::ratelimit::ReportsUsage;
use llm_resilience::redis::ratelimit::FleetRateLimitLayer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis_support::{unique, url};
use tower::{service_fn, Layer, ServiceExt};

const LIMIT: u64 = 1_000;
const WINDOW: Duration = Duration::from_secs(1);
const CALLS: usize = 25;

/// A call: its estimate, and what it will report it used.
#[derive(Clone, Copy, Debug)]
struct Call {
    estimate: u32,
    used: u64,
}

impl ReportsUsage for Call {
    fn tokens_used(&self) -> Option<u64> {
        Some(self.used)
    }
}

type Sent = Arc<Mutex<Vec<(Instant, u64)>>>;

fn pipeline(url: String, key: String, seed: u64, sent: Sent) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let limit = FleetRateLimitLayer::builder(url, key)
            .no_request_limit()
            .tokens(LIMIT)
            .window(WINDOW)
            .burst(0.2)
            // See the request test: room for one request reaching the
            // "provider" later than another on a loaded machine.
            .send_margin(Duration::from_millis(60))
            .max_wait(Duration::from_secs(60))
            .redis_timeout(Duration::from_secs(2))
            .estimate_tokens(|c: &Call| c.estimate)
            .build()
            .unwrap();
        let mut rng = SmallRng::seed_from_u64(seed);
        let svc = limit.layer(service_fn(move |c: Call| {
            sent.lock().unwrap().push((Instant::now(), c.used));
            async move {
                // The "provider" takes a while: the estimate stays charged
                // until the call is settled.
                tokio::time::sleep(Duration::from_millis(u64::from(c.estimate) / 10)).await;
                Ok::<_, std::io::Error>(c)
            }
        }));
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let estimate = rng.random_range(50..=300u32);
                let used = rng.random_range(0..=u64::from(estimate));
                tokio::spawn(svc.clone().oneshot(Call { estimate, used }))
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert!(!limit.is_local(), "Redis was reachable throughout");
    });
}

#[test]
fn settled_tokens_of_two_runtimes_never_exceed_the_limit_in_any_window() {
    let Some(url) = url() else { return };
    let key = unique("tokens");
    let sent: Sent = Arc::default();
    let threads: Vec<_> = [7u64, 11]
        .into_iter()
        .map(|seed| {
            let (url, key, sent) = (url.clone(), key.clone(), sent.clone());
            std::thread::spawn(move || pipeline(url, key, seed, sent))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2 * CALLS, "every call admitted and answered");
    sent.sort();
    let most = (0..sent.len())
        .map(|i| {
            sent[i..]
                .iter()
                .take_while(|(t, _)| t.duration_since(sent[i].0) < WINDOW)
                .map(|(_, used)| used)
                .sum::<u64>()
        })
        .max()
        .unwrap();
    let total: u64 = sent.iter().map(|(_, u)| u).sum();
    println!("most tokens used in any {WINDOW:?} window: {most} (limit {LIMIT}; {total} in all)");
    assert!(most <= LIMIT, "{most} tokens in one window, limit {LIMIT}");
}
