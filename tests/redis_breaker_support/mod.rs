//! Shared by the shared-breaker Redis tests: a "process" (its own tokio
//! runtime, breaker and coordination) around an OpenAI client of the mock
//! LLM server or a failing tower service, and a `redis-server` of a test's
//! own.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::breaker::{BreakerHandle, CircuitBreakerLayer, KeyedBreakerHandle, State};
use llm_resilience::classify::HttpError;
use llm_resilience::client::{ChatRequest, OpenAiClient};
use llm_resilience::redis::breaker::{SharedBreaker, SharedBreakerConfig, SharedBreakerEvent};
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer};
use llm_resilience::Error;
use tokio::runtime::Runtime;
use tokio::time::{sleep, timeout, Instant};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

/// The probes a breaker sends per half-open period (the shared budget).
pub const PROBES: u32 = 2;
/// Generous bound on any wait (never asserted as a duration).
pub const PATIENCE: Duration = Duration::from_secs(10);

pub type Events = Arc<Mutex<Vec<SharedBreakerEvent>>>;

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

pub fn config(ns: &str, events: &Events) -> SharedBreakerConfig {
    let events = Arc::clone(events);
    SharedBreakerConfig::builder(ns)
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .on_event(move |e| events.lock().unwrap().push(e.clone()))
        .build()
        .unwrap()
}

pub fn breaker_layer() -> CircuitBreakerLayer {
    breaker_open_for(Duration::from_millis(500))
}

pub fn breaker_open_for(open: Duration) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .no_failure_rate()
        .open_duration(open)
        .open_growth(1.0, open)
        .open_jitter(0.0)
        .half_open_probes(PROBES)
        .build()
        .unwrap()
}

pub type Client = BoxCloneSyncService<ChatRequest, llm_resilience::client::ChatResponse, Error>;

/// One process: a runtime of its own, a breaker around an OpenAI client of
/// the mock server, and (maybe) its coordination.
pub struct Proc {
    pub rt: Option<Runtime>,
    pub svc: Client,
    pub breaker: BreakerHandle,
    pub shared: Option<SharedBreaker>,
    pub events: Events,
    /// Calls the breaker let through while half-open: its probes.
    pub probes: Arc<AtomicU32>,
    /// Calls it let through otherwise.
    pub closed_calls: Arc<AtomicU32>,
}

impl Proc {
    pub fn new(server: &MockServer, redis: &str, ns: &str) -> Self {
        Self::open_for(server, redis, ns, Duration::from_millis(500))
    }

    pub fn open_for(server: &MockServer, redis: &str, ns: &str, open: Duration) -> Self {
        let rt = runtime();
        let layer = breaker_open_for(open);
        let breaker = layer.handle();
        let client = OpenAiClient::builder(server.base_url())
            .api_key("sk-test")
            .model("mock-model")
            .connect_timeout(Duration::from_secs(2))
            .total_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        // Below the breaker: each call it lets through, sorted by the
        // breaker's state then (a probe while half-open; a call admitted
        // closed, e.g. just after another process's close arrived).
        let (probes, closed_calls) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (p, c, h) = (
            Arc::clone(&probes),
            Arc::clone(&closed_calls),
            breaker.clone(),
        );
        let counted = service_fn(move |req: ChatRequest| {
            match h.state() {
                State::HalfOpen => p.fetch_add(1, SeqCst),
                _ => c.fetch_add(1, SeqCst),
            };
            client.clone().oneshot(req)
        });
        let svc = BoxCloneSyncService::new(layer.layer(counted));
        let events = Events::default();
        let shared = {
            let _in = rt.enter();
            SharedBreaker::attach(redis, &config(ns, &events), "openai", &breaker).unwrap()
        };
        Self {
            rt: Some(rt),
            svc,
            breaker,
            shared: Some(shared),
            events,
            probes,
            closed_calls,
        }
    }

    /// One call, run on this process's runtime.
    pub async fn call(&self) -> Result<(), Error> {
        let svc = self.svc.clone();
        let req = ChatRequest::user("hello").max_tokens(8);
        let rt = self.rt.as_ref().unwrap();
        rt.spawn(async move { svc.oneshot(req).await.map(drop) })
            .await
            .unwrap()
    }

    pub fn count(&self, kind: &str) -> usize {
        let events = self.events.lock().unwrap();
        events.iter().filter(|e| e.kind() == kind).count()
    }

    pub async fn connected(&self) {
        let shared = self.shared.as_ref().unwrap();
        wait_for(|| shared.is_connected(), "connected").await;
    }

    /// Calls until this process's breaker is closed; returns the probes it
    /// sent meanwhile.
    pub async fn call_until_closed(&self) -> u32 {
        let before = self.probes.load(SeqCst);
        let deadline = Instant::now() + PATIENCE;
        while self.breaker.state() != State::Closed {
            assert!(
                Instant::now() < deadline,
                "never closed: {:?}",
                self.breaker.state()
            );
            if let Err(Error::CircuitOpen { .. }) = self.call().await {
                sleep(Duration::from_millis(5)).await;
            }
        }
        self.probes.load(SeqCst) - before
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.shared.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    timeout(PATIENCE, async {
        while !cond() {
            sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

pub async fn failing_server() -> MockServer {
    MockServer::start(FaultScript::new().rate(MockFault::server_error(503), 1.0))
        .await
        .unwrap()
}

pub struct KeyedProc {
    pub rt: Option<Runtime>,
    pub svc: BoxCloneSyncService<(&'static str, bool), (), Error>,
    pub breakers: KeyedBreakerHandle<&'static str>,
    pub shared: SharedBreaker,
}

impl KeyedProc {
    pub fn new(redis: &str, ns: &str) -> Self {
        let rt = runtime();
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(3)
            .no_failure_rate()
            .open_duration(Duration::from_secs(60))
            .key_by(|req: &(&'static str, bool)| req.0)
            .build()
            .unwrap();
        let breakers = layer.handle();
        let svc = BoxCloneSyncService::new(layer.layer(service_fn(
            |(_, fail): (&'static str, bool)| async move {
                if fail {
                    Err(HttpError::new(503))
                } else {
                    Ok(())
                }
            },
        )));
        let shared = {
            let _in = rt.enter();
            let events = Events::default();
            SharedBreaker::attach_keyed(redis, &config(ns, &events), &breakers, |k: &&str| {
                (*k).to_owned()
            })
            .unwrap()
        };
        Self {
            rt: Some(rt),
            svc,
            breakers,
            shared,
        }
    }

    pub async fn call(&self, key: &'static str, fail: bool) -> Result<(), Error> {
        let svc = self.svc.clone();
        let rt = self.rt.as_ref().unwrap();
        rt.spawn(svc.oneshot((key, fail))).await.unwrap()
    }

    pub fn state(&self, key: &'static str) -> Option<State> {
        self.breakers.state(&key)
    }
}

impl Drop for KeyedProc {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
