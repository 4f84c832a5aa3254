//! The demo: queues, retries and circuit breakers against a misbehaving LLM
//! server, over real HTTP on loopback.
//!
//! ```text
//! cargo run --release --example demo --features reqwest,testing
//! ```
//!
//! Each scenario starts the crate's mock OpenAI-compatible server with a
//! seeded fault script, sends the same traffic through the bare client and
//! through a resilient stack, and prints what the callers saw and what the
//! server was asked to do (its own counters: the upstream cost). It takes
//! about half a minute and needs nothing but this crate.
//!
//! 1. Retries cut transient failures (503, 529, 429 with `retry-after`).
//! 2. A circuit breaker cuts wasted calls during an outage.
//! 3. A retry budget stops a retry storm.
//! 4. A queue absorbs a burst: bounded concurrency, fast rejection when full.

#[cfg(all(feature = "reqwest", feature = "testing"))]
mod demo {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::future::join_all;
    use llm_resilience::backoff::{Backoff, Jitter};
    use llm_resilience::breaker::CircuitBreakerLayer;
    use llm_resilience::chaos::{Latency, Window};
    use llm_resilience::client::{ChatRequest, ChatResponse, OpenAiClient};
    use llm_resilience::queue::{QueueLayer, WhenFull};
    use llm_resilience::retry::RetryLayer;
    use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
    use llm_resilience::{BoxError, Error};
    use tower::util::BoxCloneService;
    use tower::{Layer, ServiceBuilder, ServiceExt};

    type Agent = BoxCloneService<ChatRequest, ChatResponse, Error>;

    fn client(server: &MockServer) -> Result<OpenAiClient, BoxError> {
        Ok(OpenAiClient::builder(server.base_url())
            .api_key("sk-demo")
            .model("mock-model")
            .build()?)
    }

    fn bare(server: &MockServer) -> Result<Agent, BoxError> {
        Ok(BoxCloneService::new(
            client(server)?.map_err(Error::from_inner),
        ))
    }

    fn request(i: usize) -> ChatRequest {
        ChatRequest::user(format!("question {i}")).max_tokens(32)
    }

    /// What the callers saw.
    struct Seen {
        ok: usize,
        errors: BTreeMap<&'static str, usize>,
        slowest_failure: Duration,
    }

    impl Seen {
        fn new(results: Vec<(Result<ChatResponse, Error>, Duration)>) -> Self {
            let mut seen = Seen {
                ok: 0,
                errors: BTreeMap::new(),
                slowest_failure: Duration::ZERO,
            };
            for (r, took) in results {
                match r {
                    Ok(_) => seen.ok += 1,
                    Err(e) => {
                        *seen.errors.entry(e.kind()).or_default() += 1;
                        seen.slowest_failure = seen.slowest_failure.max(took);
                    }
                }
            }
            seen
        }
    }

    fn report(label: &str, n: usize, seen: &Seen, server: &MockServer) {
        let stats = server.stats();
        let failed: u64 = stats
            .nonzero()
            .iter()
            .filter(|(s, _)| *s != Served::Ok)
            .map(|(_, c)| c)
            .sum();
        println!("  {label}");
        println!(
            "    callers: {}/{} succeeded ({:.1} %)",
            seen.ok,
            n,
            100.0 * seen.ok as f64 / n as f64
        );
        if !seen.errors.is_empty() {
            let errs: Vec<String> = seen
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "    errors:  {} (slowest failure answered in {:.2?})",
                errs.join(", "),
                seen.slowest_failure
            );
        }
        println!(
            "    server:  {} requests ({} answered with an error)",
            server.total(),
            failed
        );
    }

    async fn send_all(agent: &Agent, n: usize) -> Vec<(Result<ChatResponse, Error>, Duration)> {
        join_all((0..n).map(|i| {
            let agent = agent.clone();
            async move {
                let start = Instant::now();
                let r = agent.oneshot(request(i)).await;
                (r, start.elapsed())
            }
        }))
        .await
    }

    /// One request every `gap`, `n` in all, each on its own task.
    async fn send_paced(
        agent: &Agent,
        n: usize,
        gap: Duration,
    ) -> Vec<(Result<ChatResponse, Error>, Duration)> {
        let mut tasks = Vec::with_capacity(n);
        let mut tick = tokio::time::interval(gap);
        for i in 0..n {
            tick.tick().await;
            let agent = agent.clone();
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let r = agent.oneshot(request(i)).await;
                (r, start.elapsed())
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.expect("caller task"));
        }
        out
    }

    pub(crate) async fn retries() -> Result<(), BoxError> {
        println!("1. Retries cut transient failures");
        println!("   300 concurrent requests; the server fails 25 % of calls with 503, 529 and 429 (retry-after 200 ms).");
        let script = || {
            FaultScript::new()
                .seed(1)
                .rate(MockFault::server_error(503), 0.10)
                .rate(MockFault::overloaded(), 0.10)
                .rate(
                    MockFault::rate_limited(Some(Duration::from_millis(200))),
                    0.05,
                )
        };
        let n = 300;
        let server = MockServer::start(script()).await?;
        let seen = Seen::new(send_all(&bare(&server)?, n).await);
        report("bare client:", n, &seen, &server);

        let server = MockServer::start(script()).await?;
        let agent = BoxCloneService::new(
            RetryLayer::builder()
                .seed(1)
                .build()?
                .layer(client(&server)?),
        );
        let seen = Seen::new(send_all(&agent, n).await);
        report(
            "RetryLayer::llm_defaults() (3 attempts, budget 20 % + 10/s):",
            n,
            &seen,
            &server,
        );
        Ok(())
    }

    pub(crate) async fn breaker() -> Result<(), BoxError> {
        println!("\n2. A circuit breaker cuts wasted calls during an outage");
        println!("   50 requests/s for 5 s; the server answers 503 to everything from 1 s to 3 s.");
        let script = || {
            FaultScript::new().seed(2).outage(
                Window::between(Duration::from_secs(1), Duration::from_secs(3)),
                MockFault::server_error(503),
            )
        };
        let (n, gap) = (250, Duration::from_millis(20));
        let retry = || {
            RetryLayer::builder()
                .seed(2)
                .backoff(
                    Backoff::builder()
                        .initial(Duration::from_millis(100))
                        .max_delay(Duration::from_secs(1))
                        .build()
                        .expect("valid"),
                )
                .build()
        };

        let server = MockServer::start(script()).await?;
        let agent = BoxCloneService::new(retry()?.layer(client(&server)?));
        let seen = Seen::new(send_paced(&agent, n, gap).await);
        report("retry only:", n, &seen, &server);

        let server = MockServer::start(script()).await?;
        let breaker = CircuitBreakerLayer::builder()
            .consecutive_failures(5)
            .open_duration(Duration::from_millis(250))
            .open_growth(1.0, Duration::from_millis(250))
            .half_open_probes(1)
            .seed(2)
            .build()?;
        let handle = breaker.handle();
        let agent = BoxCloneService::new(
            ServiceBuilder::new()
                .layer(retry()?)
                .layer(breaker)
                .service(client(&server)?),
        );
        let seen = Seen::new(send_paced(&agent, n, gap).await);
        report(
            "retry over a circuit breaker (5 consecutive failures, open 250 ms, 1 probe):",
            n,
            &seen,
            &server,
        );
        println!(
            "    breaker now: {:?} (failed calls answered at once instead of after retries)",
            handle.state()
        );
        Ok(())
    }

    pub(crate) async fn budget() -> Result<(), BoxError> {
        println!("\n3. A retry budget stops a retry storm");
        println!("   300 concurrent requests, 5 attempts allowed each; the server is down (503 to everything).");
        let script = || {
            FaultScript::new()
                .seed(3)
                .outage(Window::ALWAYS, MockFault::server_error(503))
        };
        let fast = Backoff::builder()
            .initial(Duration::from_millis(10))
            .max_delay(Duration::from_millis(100))
            .jitter(Jitter::Full)
            .build()?;
        let n = 300;

        let server = MockServer::start(script()).await?;
        let agent = BoxCloneService::new(
            RetryLayer::builder()
                .max_attempts(5)
                .backoff(fast)
                .no_budget()
                .seed(3)
                .build()?
                .layer(client(&server)?),
        );
        let seen = Seen::new(send_all(&agent, n).await);
        report("5 attempts, no budget:", n, &seen, &server);

        let server = MockServer::start(script()).await?;
        let agent = BoxCloneService::new(
            RetryLayer::builder()
                .max_attempts(5)
                .backoff(fast)
                .seed(3)
                .build()?
                .layer(client(&server)?),
        );
        let seen = Seen::new(send_all(&agent, n).await);
        report(
            "5 attempts, default budget (ratio 0.2 + 10/s over 10 s):",
            n,
            &seen,
            &server,
        );
        Ok(())
    }

    pub(crate) async fn queue() -> Result<(), BoxError> {
        println!("\n4. A queue absorbs a burst");
        println!("   400 requests at once; each call takes 50 ms on the server.");
        let script = || {
            FaultScript::new()
                .seed(4)
                .latency(Latency::Fixed(Duration::from_millis(50)))
        };
        let n = 400;

        for (label, capacity, when_full) in [
            (
                "queue: concurrency 16, capacity 100, reject when full:",
                100,
                WhenFull::Reject,
            ),
            (
                "queue: concurrency 16, capacity 400, wait when full:",
                400,
                WhenFull::Wait,
            ),
        ] {
            let server = MockServer::start(script()).await?;
            let in_flight = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let inner = client(&server)?;
            let counted = tower::service_fn({
                let (in_flight, peak) = (in_flight.clone(), peak.clone());
                move |req: ChatRequest| {
                    let (inner, in_flight, peak) = (inner.clone(), in_flight.clone(), peak.clone());
                    async move {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let r = inner.oneshot(req).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        r
                    }
                }
            });
            let queue = QueueLayer::builder()
                .capacity(capacity)
                .concurrency(16)
                .when_full(when_full)
                .build()?;
            let agent: Agent = BoxCloneService::new(queue.layer(counted));
            let start = Instant::now();
            let seen = Seen::new(send_all(&agent, n).await);
            report(label, n, &seen, &server);
            println!(
                "    at most {} calls in flight at the server; all answered in {:.2?}",
                peak.load(Ordering::SeqCst),
                start.elapsed()
            );
        }
        Ok(())
    }
}

#[cfg(all(feature = "reqwest", feature = "testing"))]
#[tokio::main]
async fn main() -> Result<(), llm_resilience::BoxError> {
    demo::retries().await?;
    demo::breaker().await?;
    demo::budget().await?;
    demo::queue().await?;
    Ok(())
}

#[cfg(not(all(feature = "reqwest", feature = "testing")))]
fn main() {
    eprintln!("run with: cargo run --release --example demo --features reqwest,testing");
}
