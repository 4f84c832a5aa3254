//! What a storm run measured: one row per configuration, the series behind
//! the picture, and the patterns' claims checked against the numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::drive::{Arrival, Counts, Outcomes};
use super::timeline::Phases;
use super::StormConfig;

/// Per-second series of one configuration.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Series {
    /// Requests that arrived.
    pub offered: Vec<u64>,
    /// Upstream calls (both providers).
    pub upstream: Vec<u64>,
    /// Upstream calls that failed.
    pub upstream_errors: Vec<u64>,
    /// The primary's breaker: 0 closed, 1 half-open, 2 open (pipeline only).
    pub breaker: Vec<u8>,
    /// The largest queue depth seen (pipeline only).
    pub queue_depth: Vec<u64>,
}

/// One configuration's row.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConfigResult {
    /// `none`, `naive`, `backoff` or `pipeline`.
    pub name: &'static str,
    /// Requests offered.
    pub requests: u64,
    /// Answered successfully.
    pub ok: u64,
    /// Answered with an error, by [`Error::kind`](crate::Error::kind).
    pub errors: BTreeMap<&'static str, u64>,
    /// Never answered (must be zero).
    pub lost: u64,
    /// Upstream calls, both providers.
    pub upstream_calls: u64,
    /// Calls to the primary.
    pub primary_calls: u64,
    /// Tokens the providers served (prompt and completion).
    pub tokens: u64,
    /// Calls sent to the primary during its outage.
    pub outage_calls: u64,
    /// 429s the primary answered because its own rate limits were
    /// exceeded (not the scripted 429 storm).
    pub limit_429s: u64,
    /// Calls that waited in the pipeline's rate limiter (pipeline only).
    pub limiter_waits: u64,
    /// Calls the pipeline's rate limiter refused because the wait would
    /// outlast the deadline: the secondary got them (pipeline only).
    pub limiter_skips: u64,
    /// Calls sent after their request's deadline.
    pub late_calls: u64,
    /// Median latency of the answers.
    pub p50: Duration,
    /// 99th percentile latency of the answers.
    pub p99: Duration,
    /// The largest queue depth.
    pub max_queue_depth: u64,
    /// Breaker transitions.
    pub breaker_transitions: u64,
    /// Transient failures seen by callers in the steady seconds (outside
    /// every incident), and requests that arrived then.
    pub steady: (u64, u64),
    /// Per-second series.
    pub series: Series,
}

fn load(v: &[std::sync::atomic::AtomicU64]) -> Vec<u64> {
    v.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl ConfigResult {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &'static str,
        arrivals: &[Arrival],
        out: Outcomes,
        primary: &Counts,
        secondary: &Counts,
        (tokens, limit_429s): (u64, u64),
        (depth, state): (Vec<u64>, Vec<u8>),
        transitions: u64,
        config: &StormConfig,
    ) -> Self {
        let mut errors = BTreeMap::new();
        for (kind, _) in &out.errors {
            *errors.entry(*kind).or_insert(0) += 1;
        }
        let mut lat: Vec<Duration> = out
            .ok
            .iter()
            .copied()
            .chain(out.errors.iter().map(|e| e.1))
            .collect();
        lat.sort();
        let secs = config.duration.as_secs() as usize + 1;
        let mut offered = vec![0u64; secs];
        for a in arrivals {
            offered[(a.at.as_secs() as usize).min(secs - 1)] += 1;
        }
        let p_calls = load(&primary.calls);
        let s_calls = load(&secondary.calls);
        let p_err = load(&primary.errors);
        let s_err = load(&secondary.errors);
        let upstream: Vec<u64> = p_calls
            .iter()
            .zip(&s_calls)
            .map(|(a, b)| a + b)
            .take(secs)
            .collect();
        let upstream_errors: Vec<u64> = p_err
            .iter()
            .zip(&s_err)
            .map(|(a, b)| a + b)
            .take(secs)
            .collect();
        let phases = Phases::of(config.scenario);
        let in_incident = |at: Duration| {
            [
                phases.burst,
                phases.storm,
                phases.outage,
                phases.slow,
                phases.quota,
            ]
            .iter()
            .any(|p| Phases::contains(*p, at, config.duration))
        };
        let steady_requests = arrivals.iter().filter(|a| !in_incident(a.at)).count() as u64;
        ConfigResult {
            name,
            requests: arrivals.len() as u64,
            ok: out.ok.len() as u64,
            errors,
            lost: out.lost,
            upstream_calls: primary.total() + secondary.total(),
            primary_calls: primary.total(),
            tokens,
            outage_calls: primary.in_outage.load(Ordering::Relaxed),
            limit_429s,
            limiter_waits: 0,
            limiter_skips: 0,
            late_calls: primary.late.load(Ordering::Relaxed)
                + secondary.late.load(Ordering::Relaxed),
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            max_queue_depth: depth.iter().copied().max().unwrap_or(0),
            breaker_transitions: transitions,
            steady: (out.steady_failures, steady_requests),
            series: Series {
                offered,
                upstream,
                upstream_errors,
                breaker: state.into_iter().take(secs).collect(),
                queue_depth: depth.into_iter().take(secs).collect(),
            },
        }
    }

    /// Answered with an error, all kinds.
    pub fn errored(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Share answered successfully.
    pub fn success_rate(&self) -> f64 {
        self.ok as f64 / self.requests.max(1) as f64
    }
}

/// A claim of the patterns, checked against the run.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Claim {
    /// What is claimed.
    pub claim: &'static str,
    /// What was measured.
    pub measured: String,
    /// Whether the measurement bears it out.
    pub holds: bool,
}

/// Everything a run measured.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StormReport {
    /// The seed.
    pub seed: u64,
    /// The scenario.
    pub scenario: &'static str,
    /// The run's length.
    pub duration: Duration,
    /// Requests offered per second (outside the burst).
    pub rps: f64,
    /// The phases played.
    pub phases: Phases,
    /// Requests offered.
    pub requests: usize,
    /// One row per configuration, in order.
    pub results: Vec<ConfigResult>,
}

impl StormReport {
    pub(crate) fn new(
        config: &StormConfig,
        phases: Phases,
        requests: usize,
        results: Vec<ConfigResult>,
    ) -> Self {
        StormReport {
            seed: config.seed,
            scenario: config.scenario.name(),
            duration: config.duration,
            rps: config.rps,
            phases,
            requests,
            results,
        }
    }

    /// The row of configuration `name`.
    pub fn get(&self, name: &str) -> Option<&ConfigResult> {
        self.results.iter().find(|r| r.name == name)
    }

    /// The patterns' claims, checked against this run's numbers.
    pub fn claims(&self) -> Vec<Claim> {
        let mut out = Vec::new();
        let (Some(none), Some(naive), Some(backoff), Some(pipe)) = (
            self.get("none"),
            self.get("naive"),
            self.get("backoff"),
            self.get("pipeline"),
        ) else {
            return out;
        };
        let rate = |r: &ConfigResult| r.steady.0 as f64 / r.steady.1.max(1) as f64;
        if none.steady.0 > 0 {
            let cut = 1.0 - rate(backoff) / rate(none);
            out.push(Claim {
                claim: "retries with backoff cut transient failures by 50-80 % (or more)",
                measured: format!(
                    "steady-state failures {:.1} % without, {:.1} % with: cut by {:.0} %",
                    rate(none) * 100.0,
                    rate(backoff) * 100.0,
                    cut * 100.0
                ),
                holds: cut >= 0.5,
            });
        }
        if self.phases.outage.is_some() {
            out.push(Claim {
                claim: "breakers stop the spend on a dead provider",
                measured: format!(
                    "calls into the primary's outage: {} with naive retries, {} with retries and budget, {} with the pipeline",
                    naive.outage_calls, backoff.outage_calls, pipe.outage_calls
                ),
                holds: pipe.outage_calls * 5 < naive.outage_calls.max(1),
            });
        }
        out.push(Claim {
            claim: "budgets stop retry storms",
            measured: format!(
                "upstream calls per request: {:.2} naive, {:.2} with the budget",
                naive.upstream_calls as f64 / naive.requests.max(1) as f64,
                backoff.upstream_calls as f64 / backoff.requests.max(1) as f64
            ),
            holds: backoff.upstream_calls < naive.upstream_calls,
        });
        if self.phases.burst.is_some() {
            out.push(Claim {
                claim: "a rate limit at the provider's RPM/TPM avoids its 429s (callers wait or move on)",
                measured: format!(
                    "429s for going over the primary's limits: {} bare, {} naive, {} with backoff, {} with the pipeline ({} calls waited at its limiter, {} moved on)",
                    none.limit_429s,
                    naive.limit_429s,
                    backoff.limit_429s,
                    pipe.limit_429s,
                    pipe.limiter_waits,
                    pipe.limiter_skips
                ),
                // The burst reached the limits (the bare client met them),
                // and the pipeline met at most a tenth as many.
                holds: none.limit_429s > 0 && pipe.limit_429s * 10 <= none.limit_429s,
            });
            out.push(Claim {
                claim: "the queue turns bursts into waiting instead of errors",
                measured: format!(
                    "largest queue depth {}, success {:.1} % with the pipeline vs {:.1} % bare",
                    pipe.max_queue_depth,
                    pipe.success_rate() * 100.0,
                    none.success_rate() * 100.0
                ),
                holds: pipe.success_rate() > none.success_rate(),
            });
        }
        out.push(Claim {
            claim: "no request is lost, and nothing is sent after its deadline by the pipeline",
            measured: format!(
                "lost: {}; late calls by the pipeline: {}",
                self.results.iter().map(|r| r.lost).sum::<u64>(),
                pipe.late_calls
            ),
            holds: self.results.iter().all(|r| r.lost == 0) && pipe.late_calls == 0,
        });
        out
    }

    /// The table, as text.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<9} {:>7} {:>7} {:>5} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>6} {:>6}",
            "config",
            "success",
            "errors",
            "lost",
            "upstream",
            "tokens",
            "limit 429",
            "in outage",
            "p50",
            "p99",
            "queue",
            "flips"
        );
        for r in &self.results {
            let _ = writeln!(
                s,
                "{:<9} {:>6.1}% {:>6.1}% {:>5} {:>9} {:>8} {:>9} {:>9} {:>6}ms {:>6}ms {:>6} {:>6}",
                r.name,
                r.success_rate() * 100.0,
                r.errored() as f64 / r.requests.max(1) as f64 * 100.0,
                r.lost,
                r.upstream_calls,
                r.tokens,
                r.limit_429s,
                r.outage_calls,
                r.p50.as_millis(),
                r.p99.as_millis(),
                r.max_queue_depth,
                r.breaker_transitions,
            );
        }
        s
    }

    /// The report as JSON (the table, the claims and the series).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let rows: Vec<_> = self
            .results
            .iter()
            .map(|r| {
                json!({
                    "config": r.name, "requests": r.requests, "ok": r.ok, "errors": r.errors,
                    "lost": r.lost, "upstream_calls": r.upstream_calls, "primary_calls": r.primary_calls,
                    "tokens": r.tokens, "limit_429s": r.limit_429s, "limiter_waits": r.limiter_waits,
                    "limiter_skips": r.limiter_skips, "outage_calls": r.outage_calls, "late_calls": r.late_calls,
                    "p50_ms": r.p50.as_secs_f64() * 1e3, "p99_ms": r.p99.as_secs_f64() * 1e3,
                    "max_queue_depth": r.max_queue_depth, "breaker_transitions": r.breaker_transitions,
                    "series": {
                        "offered": r.series.offered, "upstream": r.series.upstream,
                        "upstream_errors": r.series.upstream_errors, "breaker": r.series.breaker,
                        "queue_depth": r.series.queue_depth,
                    },
                })
            })
            .collect();
        let claims: Vec<_> = self
            .claims()
            .into_iter()
            .map(|c| json!({"claim": c.claim, "measured": c.measured, "holds": c.holds}))
            .collect();
        json!({
            "seed": self.seed, "scenario": self.scenario, "duration_s": self.duration.as_secs_f64(),
            "rps": self.rps, "requests": self.requests, "results": rows, "claims": claims,
        })
    }
}
