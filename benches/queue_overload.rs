//! Memory stays bounded under overload: 1 000 000 requests (or `OFFERED`)
//! offered as fast as possible to a queue of capacity 1 000 (concurrency
//! 10) in reject mode, in front of an upstream that takes 1 ms per call.
//! Prints the peak resident memory (`VmHWM` from `/proc/self/status`) after
//! 10 000, 100 000, 1 000 000 (and 3 000 000, 10 000 000) offers: it stops
//! growing once the allocator has warmed up, because a rejected request
//! costs nothing once answered and at most `concurrency + capacity`
//! requests are ever held.
//!
//! Run: `cargo run --release -p llm-resilience-bench --bin queue_overload` (set `OFFERED` to
//! offer another number, e.g. `OFFERED=10000000`).

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use llm_resilience::queue::{QueueLayer, WhenFull};
use llm_resilience::Error;
use tower::{service_fn, Layer, ServiceExt};

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let layer = QueueLayer::builder()
        .capacity(1_000)
        .concurrency(10)
        .when_full(WhenFull::Reject)
        .build()?;
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|i: u64| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, std::io::Error>(i)
    }));

    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    let (mut ok, mut rejected, mut max_held) = (0u64, 0u64, 0usize);
    let total: u64 = std::env::var("OFFERED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let checkpoints = [10_000u64, 100_000, 1_000_000, 3_000_000, 10_000_000];
    println!("offered    answered_ok  rejected   held_max  depth  VmHWM_KiB");
    for i in 0..total {
        pending.push(svc.clone().oneshot(i));
        // Collect whatever is answered without waiting (rejections answer
        // on their first poll).
        while let Some(Some(r)) = futures::FutureExt::now_or_never(pending.next()) {
            match r {
                Ok(_) => ok += 1,
                Err(Error::QueueFull { .. }) => rejected += 1,
                Err(e) => return Err(e.into()),
            }
        }
        max_held = max_held.max(pending.len());
        if i % 1_000 == 999 {
            // Let the upstream's timers run.
            tokio::task::yield_now().await;
        }
        if checkpoints.contains(&(i + 1)) {
            println!(
                "{:<10} {:<12} {:<10} {:<9} {:<6} {}",
                i + 1,
                ok,
                rejected,
                max_held,
                handle.depth(),
                vm_hwm_kib().map_or("n/a".to_owned(), |k| k.to_string())
            );
        }
    }
    while let Some(r) = pending.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(Error::QueueFull { .. }) => rejected += 1,
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(ok + rejected, total, "every request answered once");
    assert!(handle.is_idle());
    println!(
        "done in {:.2?}: {ok} answered, {rejected} rejected, at most {max_held} held at once; VmHWM {} KiB",
        start.elapsed(),
        vm_hwm_kib().map_or("n/a".to_owned(), |k| k.to_string())
    );
    Ok(())
}
