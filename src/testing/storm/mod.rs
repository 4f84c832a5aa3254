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
//!    (queue of 16 in flight, retry with budget, a breaker per provider, a
//!    token-aware rate limit at the primary's own limits, fallback to the
//!    secondary, one deadline).
//!
//! The primary enforces requests- and tokens-per-minute limits the way
//! providers describe theirs, with continuously refilled buckets
//! ([`MockLimits`]) that hold [`StormConfig::limit_window`]'s share of a
//! minute's limit, so the burst (three times the offered rate) goes above
//! them within the run. The pipeline's limiter is set to the same limits
//! over the same window, and the others meet the provider's 429s.
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
use crate::queue::Priority;
use crate::ratelimit::{
    ChatEstimate, EstimateTokens, RateLimitEvent, RateLimitEventKind, Reported,
};
use crate::retry::RetryLayer;
use crate::testing::mock_server::{MockLimits, MockServer, Served};

type Agent = BoxCloneSyncService<StormRequest, ChatResponse, Error>;

/// Requests the pipeline's queue lets through at once.
pub const PIPELINE_CONCURRENCY: usize = 16;

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
    /// The primary's own limit, tokens (prompt and completion) per minute.
    pub primary_tpm: u64,
    /// The window the primary enforces its limits over: its buckets hold
    /// this window's share of a minute's limits and refill continuously.
    pub limit_window: Duration,
}

impl StormConfig {
    /// The demo's defaults: 30 s at 40 requests per second, every incident,
    /// 8 s deadlines; the primary takes 3 600 requests and 90 000 tokens per
    /// minute, enforced per second (60 requests and 1 500 tokens, about 75
    /// requests' worth, a second), so the burst at 120 per second goes over
    /// both.
    pub fn new(seed: u64) -> Self {
        StormConfig {
            seed,
            duration: Duration::from_secs(30),
            rps: 40.0,
            scenario: Scenario::All,
            deadline: Duration::from_secs(8),
            primary_rpm: 3_600,
            primary_tpm: 90_000,
            limit_window: Duration::from_secs(1),
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
            primary_tpm: 72_000,
            limit_window: Duration::from_millis(500),
        }
    }
}

impl StormConfig {
    /// How long the pipeline's breakers stay open after a first trip (a
    /// fifteenth of the run, at least 300 ms; doubling on each consecutive
    /// trip up to four times that).
    pub fn open_duration(&self) -> Duration {
        (self.duration / 15).max(Duration::from_millis(300))
    }

    /// The primary's limits per [`limit_window`](Self::limit_window):
    /// requests and tokens (at least one of each).
    pub fn window_limits(&self) -> (u64, u64) {
        let share = |per_minute: u64| {
            ((per_minute as f64 * self.limit_window.as_secs_f64() / 60.0).round() as u64).max(1)
        };
        (share(self.primary_rpm), share(self.primary_tpm))
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
        ))
        .await?;
        let (requests, tokens) = config.window_limits();
        primary.set_limits(
            MockLimits::new(config.limit_window)
                .requests(requests)
                .tokens(tokens),
        );
        let secondary = MockServer::start(timeline::secondary_script(config.seed)).await?;
        servers.push((primary, secondary));
    }
    let start = Instant::now() + Duration::from_millis(100);
    let mut runs = Vec::new();
    let breaker_flips = Arc::new(AtomicU64::new(0));
    let limiter_waits = Arc::new(AtomicU64::new(0));
    let limiter_skips = Arc::new(AtomicU64::new(0));
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
                let (waits, skips) = (limiter_waits.clone(), limiter_skips.clone());
                let open = config.open_duration();
                let (requests, tokens) = config.window_limits();
                let window = config.limit_window;
                let pipeline = AgentPipeline::builder()
                    .target("primary", p)
                    .fallback("secondary", s)
                    .queue(2_000, PIPELINE_CONCURRENCY)
                    .priority_by(|r: &StormRequest| match r.0.class {
                        0 => Priority::High,
                        1 => Priority::Normal,
                        _ => Priority::Low,
                    })
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
                    // The primary's own limits, over the window it enforces
                    // them in; its headers count over the same window.
                    .estimate_tokens(|r: &StormRequest| ChatEstimate.estimate(&r.1))
                    .read_usage(Reported)
                    .target_rate_limit("primary", move |r| {
                        let (waits, skips) = (waits.clone(), skips.clone());
                        r.requests(requests)
                            .tokens(tokens)
                            .window(window)
                            .server_window(window)
                            .burst(0.5)
                            .on_event(move |e: &RateLimitEvent| match e.kind {
                                RateLimitEventKind::Queued => {
                                    waits.fetch_add(1, Ordering::Relaxed);
                                }
                                RateLimitEventKind::Rejected => {
                                    skips.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => {}
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
            (
                primary.stats().tokens + secondary.stats().tokens,
                primary.stats().get(Served::LimitExceeded),
            ),
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
    if let Some(pipe) = results.iter_mut().find(|r| r.name == "pipeline") {
        pipe.limiter_waits = limiter_waits.load(Ordering::Relaxed);
        pipe.limiter_skips = limiter_skips.load(Ordering::Relaxed);
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
