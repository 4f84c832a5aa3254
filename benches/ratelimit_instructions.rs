//! Instructions per round trip of an admitted call through the rate
//! limiter, for callgrind, against `governor`'s direct limiter wrapped as a
//! tower layer the obvious way.
//!
//! ```text
//! cargo build --release -p llm-resilience-bench --bin ratelimit_instructions
//! for v in ours ours_tokens governor bare; do for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/ratelimit_instructions $v $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! The difference between two runs divided by the difference in `N` is the
//! cost of one round trip, harness included. Instructions are not time: a
//! compare-and-swap or a clock read counts a few instructions.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use llm_resilience::ratelimit::RateLimitLayer;
use tower::{Layer, Service};

#[path = "support/instructions.rs"]
mod instructions;
#[path = "support/peers.rs"]
mod peers;
use instructions::run;
use peers::Always;

/// `governor` as a layer: `check()` in `call`, refuse when over.
struct Governor {
    limiter: Arc<DefaultDirectRateLimiter>,
    inner: Always,
}

impl Service<u64> for Governor {
    type Response = u64;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<u64, std::io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, x: u64) -> Self::Future {
        match self.limiter.check() {
            Ok(()) => self.inner.call(x),
            Err(_) => std::future::ready(Err(std::io::Error::other("rate limited"))),
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let ours = |tokens: bool| {
        let b = RateLimitLayer::builder()
            .requests(1_000_000_000_000)
            .window(Duration::from_secs(60))
            .estimate_tokens(|_: &u64| 100)
            .ignore_usage();
        if tokens {
            b.tokens(1_000_000_000_000)
        } else {
            b.no_token_limit()
        }
        .build()
        .unwrap()
        .layer(Always)
    };
    let acc = match variant.as_str() {
        "ours" => run(&mut ours(false), n),
        "ours_tokens" => run(&mut ours(true), n),
        "governor" => run(
            &mut Governor {
                limiter: Arc::new(governor::RateLimiter::direct(Quota::per_second(
                    NonZeroU32::MAX,
                ))),
                inner: Always,
            },
            n,
        ),
        _ => run(&mut Always, n),
    };
    println!("{variant} {n}: {acc}");
}
