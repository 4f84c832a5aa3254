//! The four configurations, the counting wrapper around each client, and
//! the workload that drives them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower_service::Service;

use super::timeline::Phases;
use crate::client::{ChatRequest, ChatResponse, ClientError, OpenAiClient};

/// One request of the workload.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Its number.
    pub id: u64,
    /// When it arrives, from the start of the run.
    pub at: Duration,
    /// Its class: 0 high, 1 normal, 2 low.
    pub class: u8,
    /// How long after its arrival its answer stops being useful.
    pub deadline: Duration,
}

/// The seeded workload: bursty arrivals at `rps` (three times that during
/// the burst), three classes, each with a deadline.
pub fn workload(
    seed: u64,
    duration: Duration,
    rps: f64,
    phases: &Phases,
    deadline: Duration,
) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut t = 0.0_f64;
    let total = duration.as_secs_f64();
    loop {
        let at = Duration::from_secs_f64(t);
        let rate = if Phases::contains(phases.burst, at, duration) {
            rps * 3.0
        } else {
            rps
        };
        // Exponential gaps: a Poisson arrival process.
        let u: f64 = rng.random::<f64>().max(1e-12);
        t += -u.ln() / rate.max(1e-3);
        if t >= total {
            return out;
        }
        let class = match rng.random_range(0..10) {
            0..=1 => 0,
            2..=6 => 1,
            _ => 2,
        };
        out.push(Arrival {
            id: out.len() as u64,
            at: Duration::from_secs_f64(t),
            class,
            deadline,
        });
    }
}

/// A request as the storm's stacks see it: its arrival and the chat request.
pub type StormRequest = (Arc<Arrival>, ChatRequest);

/// Per-second counts of what one target was sent.
#[derive(Debug)]
pub struct Counts {
    start: Instant,
    duration: Duration,
    phases: Phases,
    /// Calls per second.
    pub calls: Vec<AtomicU64>,
    /// Failed calls per second.
    pub errors: Vec<AtomicU64>,
    /// Calls sent after their request's deadline.
    pub late: AtomicU64,
    /// Calls sent while the target was in its outage.
    pub in_outage: AtomicU64,
    /// Whether this target is the one with the incidents.
    primary: bool,
}

impl Counts {
    pub(crate) fn new(
        start: Instant,
        duration: Duration,
        phases: Phases,
        primary: bool,
    ) -> Arc<Self> {
        let secs = duration.as_secs() as usize + 30;
        Arc::new(Counts {
            start,
            duration,
            phases,
            calls: (0..secs).map(|_| AtomicU64::new(0)).collect(),
            errors: (0..secs).map(|_| AtomicU64::new(0)).collect(),
            late: AtomicU64::new(0),
            in_outage: AtomicU64::new(0),
            primary,
        })
    }

    fn slot(&self, now: Instant) -> usize {
        (now.saturating_duration_since(self.start).as_secs() as usize).min(self.calls.len() - 1)
    }

    /// Every call.
    pub fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The client of one target, counting what it is sent.
#[derive(Clone, Debug)]
pub(crate) struct Counted {
    client: OpenAiClient,
    counts: Arc<Counts>,
}

impl Counted {
    pub(crate) fn new(client: OpenAiClient, counts: Arc<Counts>) -> Self {
        Counted { client, counts }
    }
}

impl Service<StormRequest> for Counted {
    type Response = ChatResponse;
    type Error = ClientError;
    type Future = Pin<Box<dyn Future<Output = Result<ChatResponse, ClientError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        self.client.poll_ready(cx)
    }

    fn call(&mut self, (arrival, req): StormRequest) -> Self::Future {
        let counts = self.counts.clone();
        let now = Instant::now();
        let slot = counts.slot(now);
        counts.calls[slot].fetch_add(1, Ordering::Relaxed);
        if now > counts.start + arrival.at + arrival.deadline {
            counts.late.fetch_add(1, Ordering::Relaxed);
        }
        let into = now.saturating_duration_since(counts.start);
        if counts.primary && Phases::contains(counts.phases.outage, into, counts.duration) {
            counts.in_outage.fetch_add(1, Ordering::Relaxed);
        }
        let fut = self.client.call(req);
        Box::pin(async move {
            let out = fut.await;
            if out.is_err() {
                let slot = counts.slot(Instant::now());
                counts.errors[slot].fetch_add(1, Ordering::Relaxed);
            }
            out
        })
    }
}

/// What each request's caller saw.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Answered successfully, with the latency.
    pub ok: Vec<Duration>,
    /// Answered with an error: its kind and the latency.
    pub errors: Vec<(&'static str, Duration)>,
    /// Never answered within its deadline plus a grace period.
    pub lost: u64,
    /// Failed with a transient error while no incident played.
    pub steady_failures: u64,
}

/// Drives `arrivals` through `agent` in real time, one task per request.
pub(crate) async fn drive<A>(
    agent: A,
    arrivals: &[Arrival],
    start: Instant,
    grace: Duration,
    steady: impl Fn(Duration) -> bool + Send + Sync + Clone + 'static,
) -> Outcomes
where
    A: Service<StormRequest, Response = ChatResponse, Error = crate::Error>
        + Clone
        + Send
        + 'static,
    A::Future: Send,
{
    use tower::ServiceExt;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let mut tasks = Vec::with_capacity(arrivals.len());
    for a in arrivals {
        let a = Arc::new(a.clone());
        let agent = agent.clone();
        let outcomes = outcomes.clone();
        let steady = steady.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + a.at).await;
            let sent = Instant::now();
            // The deadline counts from the real call: a loaded machine can
            // wake the task late.
            let a = Arc::new(Arrival {
                at: sent.saturating_duration_since(start),
                ..(*a).clone()
            });
            let req = ChatRequest::user(format!("storm question {}", a.id)).max_tokens(12);
            let limit = a.deadline + grace;
            let out = tokio::time::timeout(limit, agent.oneshot((a.clone(), req))).await;
            let took = sent.elapsed();
            let mut o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
            match out {
                Ok(Ok(_)) => o.ok.push(took),
                Ok(Err(e)) => {
                    let transient = !matches!(
                        e,
                        crate::Error::BadRequest { .. } | crate::Error::Permanent { .. }
                    );
                    if transient && steady(a.at) {
                        o.steady_failures += 1;
                    }
                    o.errors.push((e.kind(), took))
                }
                Err(_) => o.lost += 1,
            }
        }));
    }
    for t in tasks {
        if t.await.is_err() {
            outcomes.lock().unwrap_or_else(|p| p.into_inner()).lost += 1;
        }
    }
    Arc::try_unwrap(outcomes)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default()
}
