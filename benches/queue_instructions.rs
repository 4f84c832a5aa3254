//! Instructions per round trip on the queue's uncontended path, for
//! callgrind.
//!
//! Times on a shared 2-core machine are noisy; instruction counts are not.
//! This runs `N` round trips (`poll_ready`, `call`, poll the future to its
//! answer, no runtime needed) through one variant, so that the difference
//! between two runs divided by the difference in `N` is the cost of one
//! round trip, harness included:
//!
//! ```text
//! cargo build --release -p llm-resilience-bench --bin queue_instructions
//! for v in ours limit bare; do for n in 10000 20000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/queue_instructions $v $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! `limit` is tower's `ConcurrencyLimit` (tokio's semaphore), the cheapest
//! other way to bound calls in flight; `bare` the inner service alone.
//! Instructions are not time: a compare-and-swap counts one instruction.
//!
//! The queued path, the same way: `queued-ours` and `queued-limit` run `N`
//! requests from `W` tasks (third argument, default 50) on a
//! current-thread tokio runtime, each task a loop of `ready().await` and
//! `call().await` on its own clone, through 16 permits and an inner service
//! that yields once per call, so that all but 16 callers wait:
//!
//! ```text
//! for v in queued-ours queued-limit; do for n in 20000 40000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/queue_instructions $v $n 50 2>&1 | grep Collected
//! done; done
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use llm_resilience::queue::QueueLayer;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};

#[path = "../benches/support/instructions.rs"]
mod instructions;
#[path = "../benches/support/peers.rs"]
mod peers;
use instructions::run;
use peers::Always;

/// Answers after yielding once, so that a permit is held across a task
/// switch.
#[derive(Clone, Copy)]
struct YieldOnce;

struct YieldFuture(u64, bool);

impl Future for YieldFuture {
    type Output = Result<u64, std::io::Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.0))
    }
}

impl Service<u64> for YieldOnce {
    type Response = u64;
    type Error = std::io::Error;
    type Future = YieldFuture;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, n: u64) -> YieldFuture {
        YieldFuture(n, false)
    }
}

/// `n` requests from `tasks` tasks, each on its own clone of `svc`.
fn queued<S>(svc: S, n: u64, tasks: u64) -> u64
where
    S: Service<u64, Response = u64> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let per = n / tasks;
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let mut s = svc.clone();
                        tokio::task::spawn_local(async move {
                            let mut acc = 0u64;
                            for k in 0..per {
                                s.ready().await.expect("ready");
                                acc = acc.wrapping_add(s.call(t * per + k).await.expect("answer"));
                            }
                            acc
                        })
                    })
                    .collect();
                let mut acc = 0u64;
                for h in handles {
                    acc = acc.wrapping_add(h.await.expect("task"));
                }
                acc
            })
            .await
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let tasks: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let acc = match variant.as_str() {
        "queued-ours" => {
            let layer = QueueLayer::builder()
                .concurrency(16)
                .capacity(1_000)
                .build()
                .expect("valid");
            queued(layer.layer(YieldOnce), n, tasks)
        }
        "queued-limit" => queued(ConcurrencyLimit::new(YieldOnce, 16), n, tasks),
        "ours" => {
            let layer = QueueLayer::builder()
                .concurrency(32)
                .capacity(1_000)
                .build()
                .expect("valid");
            run(&mut layer.layer(Always), n)
        }
        "limit" => run(&mut ConcurrencyLimit::new(Always, 32), n),
        "bare" => run(&mut Always, n),
        other => panic!("unknown variant {other}: ours, limit, bare, queued-ours or queued-limit"),
    };
    println!("{variant}: {n} calls, checksum {acc}");
}
