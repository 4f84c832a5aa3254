//! `storm`: what each resilience pattern buys an LLM agent, measured.
//!
//! Starts mock LLM servers on loopback (a primary and a secondary
//! provider) with a seeded timeline of what production brings — a steady
//! share of transient errors, a burst of arrivals above the provider's rate
//! limit, a 429 storm with `Retry-After`, a full outage of the primary and
//! its recovery, a latency spike, a key whose quota runs out, a few
//! context-length errors — and drives the same seeded workload of agent
//! requests (bursty arrivals, three classes, each with a deadline) through
//! four configurations side by side:
//!
//! 1. `none`: the bare client;
//! 2. `naive`: immediate retries (5 attempts, no backoff, no budget, server
//!    hints ignored);
//! 3. `backoff`: the retry layer's LLM defaults (backoff with jitter,
//!    server hints, retry budget);
//! 4. `pipeline`: the whole [`AgentPipeline`](crate::pipeline)
//!    (queue of 8 in flight, retry with budget, a breaker per provider,
//!    fallback to the secondary, one deadline).
//!
//! Every configuration gets its own pair of servers with the same scripts,
//! so each one's cost is counted exactly. [`run`] returns the measurements;
//! `examples/storm.rs` prints them as a table, checks the patterns' claims
//! against them and draws the picture; `tests/storm.rs` runs a compressed
//! form and asserts the invariants.

mod drive;
mod report;
mod timeline;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

pub use self::drive::{workload, Arrival, Counts, Outcomes, StormRequest};
pub use self::report::{Claim, ConfigResult, Series, StormReport};
pub use self::timeline::{Phases, Scenario, CONTEXT_LENGTH_SHARE, TRANSIENT_SHARE};

use self::drive::{drive, Counted};
use crate::backoff::{Backoff, Jitter};
use crate::breaker::{BreakerEvent, State};
use crate::classify::{Classify, LlmClassifier, Outcome};
use crate::client::{ChatResponse, OpenAiClient};
use crate::error::{BoxError, Error};
use crate::pipeline::AgentPipeline;
use crate::retry::RetryLayer;
use crate::testing::mock_server::MockServer;

type Agent = BoxCloneSyncService<StormRequest, ChatResponse, Error>;

/// How a storm run goes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StormConfig {
    /// The seed of the workload and of the servers' faults.
    pub seed: u64,
    /// How long requests arrive.
    pub duration: Duration,
    /// Requests per second offered (three times that during the burst).
    pub rps: f64,
    /// Which incidents play.
    pub scenario: Scenario,
    /// How long a request's answer stays useful.
    pub deadline: Duration,
    /// The primary's own limit, requests per minute.
    pub primary_rpm: u64,
}

impl StormConfig {
    /// The demo's defaults: 30 s at 40 requests per second, every incident,
    /// 8 s deadlines; the primary takes 3 600 requests per minute (60 per
    /// second, so the burst at 120 per second goes over it).
    pub fn new(seed: u64) -> Self {
        StormConfig {
            seed,
            duration: Duration::from_secs(30),
            rps: 40.0,
            scenario: Scenario::All,
            deadline: Duration::from_secs(8),
            primary_rpm: 3_600,
        }
    }

    /// The same timeline compressed for tests.
    pub fn compressed(seed: u64, scenario: Scenario) -> Self {
        StormConfig {
            seed,
            duration: Duration::from_secs(6),
            rps: 30.0,
            scenario,
            deadline: Duration::from_secs(4),
            primary_rpm: 2_400,
        }
    }
}

fn client(server: &MockServer) -> Result<OpenAiClient, BoxError> {
    Ok(OpenAiClient::builder(server.base_url())
        .api_key("sk-storm")
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(10))
        .build()?)
}

/// Runs every configuration side by side; `progress` is told the fraction
/// of the run done, a few times a second.
pub async fn run(
    config: &StormConfig,
    progress: impl Fn(f64) + Send + Sync + 'static,
) -> Result<StormReport, BoxError> {
    let phases = Phases::of(config.scenario);
    let arrivals = workload(
        config.seed,
        config.duration,
        config.rps,
        &phases,
        config.deadline,
    );
    let names = ["none", "naive", "backoff", "pipeline"];
    let mut servers = Vec::new();
    for _ in names {
        let primary = MockServer::start(timeline::primary_script(
            config.seed,
            config.duration,
            &phases,
            config.primary_rpm,
        ))
        .await?;
        let secondary = MockServer::start(timeline::secondary_script(config.seed)).await?;
        servers.push((primary, secondary));
    }
    let start = Instant::now() + Duration::from_millis(100);
    let mut runs = Vec::new();
    let breaker_flips = Arc::new(AtomicU64::new(0));
    let mut pipeline_handles = None;
    for (name, (primary, secondary)) in names.iter().zip(&servers) {
        let p_counts = Counts::new(start, config.duration, phases, true);
        let s_counts = Counts::new(start, config.duration, phases, false);
        let p = Counted::new(client(primary)?, p_counts.clone());
        let s = Counted::new(client(secondary)?, s_counts.clone());
        let agent: Agent = match *name {
            "none" => BoxCloneSyncService::new(p.map_err(Error::from_inner)),
            "naive" => BoxCloneSyncService::new(naive_retry()?.layer(p)),
            "backoff" => {
                BoxCloneSyncService::new(RetryLayer::builder().seed(config.seed).build()?.layer(p))
            }
            _ => {
                let flips = breaker_flips.clone();
                let open = (config.duration / 15).max(Duration::from_millis(300));
                let pipeline = AgentPipeline::builder()
                    .target("primary", p)
                    .fallback("secondary", s)
                    .queue(2_000, 8)
                    .deadline(config.deadline)
                    .retry(move |r| r.seed(7))
                    .breaker(move |b| {
                        let flips = flips.clone();
                        b.open_duration(open)
                            .open_growth(2.0, open * 4)
                            .time_window(config_window(open))
                            .min_calls(10)
                            .on_event(move |e: &BreakerEvent| {
                                if matches!(e, BreakerEvent::StateChanged { .. }) {
                                    flips.fetch_add(1, Ordering::Relaxed);
                                }
                            })
                    })
                    .build()?;
                pipeline_handles = Some(pipeline.clone());
                BoxCloneSyncService::new(pipeline)
            }
        };
        runs.push((name, agent, p_counts, s_counts));
    }
    // Sample queue depth and breaker state while the run goes.
    let secs = config.duration.as_secs() as usize + 30;
    let sampler = {
        let handles = pipeline_handles.clone();
        let total = config.duration + config.deadline;
        tokio::spawn(async move {
            let mut depth = vec![0u64; secs];
            let mut state = vec![0u8; secs];
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let into = Instant::now().saturating_duration_since(start);
                if into > total {
                    return (depth, state);
                }
                let slot = (into.as_secs() as usize).min(secs - 1);
                progress((into.as_secs_f64() / config_secs(total)).min(1.0));
                if let Some(h) = &handles {
                    depth[slot] = depth[slot].max(h.queue().depth() as u64);
                    let s = match h.breaker("primary").map(|b| b.state()) {
                        Some(State::Open) | Some(State::ForcedOpen) => 2,
                        Some(State::HalfOpen) => 1,
                        _ => 0,
                    };
                    state[slot] = state[slot].max(s);
                }
            }
        })
    };
    let grace = Duration::from_secs(5);
    let duration = config.duration;
    let steady = move |at: Duration| {
        ![
            phases.burst,
            phases.storm,
            phases.outage,
            phases.slow,
            phases.quota,
        ]
        .iter()
        .any(|p| Phases::contains(*p, at, duration))
    };
    let drives = runs
        .iter()
        .map(|(_, agent, _, _)| drive(agent.clone(), &arrivals, start, grace, steady));
    let outcomes = futures::future::join_all(drives).await;
    let (depth, state) = sampler.await?;
    let mut results = Vec::new();
    for ((name, _, p, s), out) in runs.into_iter().zip(outcomes) {
        let idx = names.iter().position(|n| n == name).unwrap_or(0);
        let (primary, secondary) = &servers[idx];
        let is_pipeline = *name == "pipeline";
        results.push(ConfigResult::new(
            name,
            &arrivals,
            out,
            &p,
            &s,
            primary.stats().tokens + secondary.stats().tokens,
            if is_pipeline {
                (depth.clone(), state.clone())
            } else {
                (Vec::new(), Vec::new())
            },
            if is_pipeline {
                breaker_flips.load(Ordering::Relaxed)
            } else {
                0
            },
            config,
        ));
    }
    Ok(StormReport::new(config, phases, arrivals.len(), results))
}

fn config_secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-3)
}

fn config_window(open: Duration) -> Duration {
    (open * 4).max(Duration::from_secs(1))
}

/// Retries as a naive loop does them: at once, five times, no budget, the
/// server's hints ignored.
fn naive_retry() -> Result<RetryLayer<impl Classify<ChatResponse> + Clone>, BoxError> {
    let immediate = Backoff::builder()
        .initial(Duration::from_millis(1))
        .multiplier(1.0)
        .max_delay(Duration::from_millis(1))
        .jitter(Jitter::None)
        .build()?;
    let blind = |r: Result<&ChatResponse, &Error>| match LlmClassifier::new().classify(r) {
        Outcome::Transient { reason, .. } => Outcome::transient(reason),
        other => other,
    };
    Ok(RetryLayer::builder()
        .max_attempts(5)
        .backoff(immediate)
        .throttle_backoff(immediate)
        .no_budget()
        .classifier(blind)
        .build()?)
}
