//! Model-based test: random sequences of call outcomes, clock advances,
//! held (concurrent) calls and probes, drops and operator actions, run
//! against the real breaker on a paused clock and against a small reference
//! state machine; the two must agree at every step.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use llm_resilience::breaker::{BreakerHandle, CircuitBreaker, CircuitBreakerLayer, State};
use llm_resilience::classify::HttpError;
use llm_resilience::{BoxError, Error};
use proptest::prelude::*;
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};

const WINDOW: usize = 5;
const MIN_CALLS: usize = 3;
const CONSECUTIVE: u32 = 3;
const BASE_MS: u64 = 10_000;
const CAP_MS: u64 = 40_000;
const PROBES: u32 = 2;
const PROBE_TIMEOUT_MS: u64 = 30_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Ok,
    Fail,
    Bad,
}

#[derive(Clone, Debug)]
enum Op {
    /// A call that completes at once.
    Call(Res),
    /// A call that stays in flight until finished or dropped.
    Hold,
    /// Finish the i-th held call (modulo the number held).
    Finish(usize, Res),
    /// Drop the i-th held call.
    Drop(usize),
    Advance(u64),
    Reset,
    ForceOpen,
}

fn op() -> impl Strategy<Value = Op> {
    let res = prop_oneof![4 => Just(Res::Ok), 4 => Just(Res::Fail), 1 => Just(Res::Bad)];
    prop_oneof![
        6 => res.clone().prop_map(Op::Call),
        2 => Just(Op::Hold),
        2 => (any::<usize>(), res).prop_map(|(i, r)| Op::Finish(i, r)),
        1 => any::<usize>().prop_map(Op::Drop),
        3 => prop_oneof![Just(1_000u64), Just(5_000), Just(10_000), Just(20_000), Just(31_000), 0..45_000u64]
            .prop_map(Op::Advance),
        1 => Just(Op::Reset),
        1 => Just(Op::ForceOpen),
    ]
}

// ---- the reference model ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Closed,
    Probe,
}

#[derive(Debug)]
enum MState {
    Closed,
    Open {
        until: u64,
    },
    HalfOpen {
        issued: u32,
        succ: u32,
        deadline: u64,
    },
    ForcedOpen,
}

#[derive(Debug)]
struct Model {
    state: MState,
    gen: u64,
    window: VecDeque<bool>,
    consecutive: u32,
    trips: u32,
}

impl Model {
    fn new() -> Self {
        Self {
            state: MState::Closed,
            gen: 0,
            window: VecDeque::new(),
            consecutive: 0,
            trips: 0,
        }
    }

    fn public_state(&self) -> State {
        match self.state {
            MState::Closed => State::Closed,
            MState::Open { .. } => State::Open,
            MState::HalfOpen { .. } => State::HalfOpen,
            MState::ForcedOpen => State::ForcedOpen,
        }
    }

    fn probes_in_flight(&self) -> u32 {
        match self.state {
            MState::HalfOpen { issued, succ, .. } => issued - succ,
            _ => 0,
        }
    }

    fn failures(&self) -> usize {
        self.window.iter().filter(|f| **f).count()
    }

    /// Admission: the ticket, or the retry-after in ms.
    fn acquire(&mut self, now: u64) -> Result<(u64, Kind), u64> {
        match self.state {
            MState::Closed => Ok((self.gen, Kind::Closed)),
            MState::ForcedOpen => Err(BASE_MS),
            MState::Open { until } => {
                if now < until {
                    return Err(until - now);
                }
                Ok(self.begin_half_open(now))
            }
            MState::HalfOpen {
                ref mut issued,
                deadline,
                ..
            } => {
                if *issued < PROBES {
                    *issued += 1;
                    return Ok((self.gen, Kind::Probe));
                }
                if now < deadline {
                    return Err(deadline - now);
                }
                Ok(self.begin_half_open(now))
            }
        }
    }

    fn begin_half_open(&mut self, now: u64) -> (u64, Kind) {
        self.gen += 1;
        self.state = MState::HalfOpen {
            issued: 1,
            succ: 0,
            deadline: now + PROBE_TIMEOUT_MS,
        };
        (self.gen, Kind::Probe)
    }

    fn trip(&mut self, now: u64) {
        self.gen += 1;
        self.trips += 1;
        let d = (BASE_MS << (self.trips - 1).min(20)).min(CAP_MS);
        self.state = MState::Open { until: now + d };
        self.window.clear();
        self.consecutive = 0;
    }

    fn release(&mut self, gen: u64, kind: Kind) {
        if kind != Kind::Probe || gen != self.gen {
            return;
        }
        if let MState::HalfOpen { ref mut issued, .. } = self.state {
            if *issued > 0 {
                *issued -= 1;
            }
        }
    }

    fn complete(&mut self, gen: u64, kind: Kind, res: Res, now: u64) {
        if res == Res::Bad {
            self.release(gen, kind);
            return;
        }
        if gen != self.gen {
            return;
        }
        match (kind, &mut self.state) {
            (Kind::Closed, MState::Closed) => {
                let failed = res == Res::Fail;
                self.window.push_back(failed);
                if self.window.len() > WINDOW {
                    self.window.pop_front();
                }
                if failed {
                    self.consecutive += 1;
                } else {
                    self.consecutive = 0;
                }
                let calls = self.window.len();
                let fails = self.failures();
                let by_rate = calls >= MIN_CALLS && fails > 0 && fails as f64 >= 0.5 * calls as f64;
                if (failed && self.consecutive >= CONSECUTIVE) || by_rate {
                    self.trip(now);
                }
            }
            (Kind::Probe, MState::HalfOpen { succ, .. }) => {
                if res == Res::Fail {
                    self.trip(now);
                    return;
                }
                *succ += 1;
                if *succ >= PROBES {
                    self.gen += 1;
                    self.state = MState::Closed;
                    self.trips = 0;
                    self.consecutive = 0;
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.gen += 1;
        self.state = MState::Closed;
        self.window.clear();
        self.consecutive = 0;
        self.trips = 0;
    }

    fn force_open(&mut self) {
        self.gen += 1;
        self.state = MState::ForcedOpen;
    }
}

// ---- the real breaker ----

enum Req {
    Now(Res),
    Wait(oneshot::Receiver<Res>),
}

#[derive(Clone)]
struct Upstream;

fn answer(r: Res) -> Result<(), BoxError> {
    match r {
        Res::Ok => Ok(()),
        Res::Fail => Err(Box::new(HttpError::new(503))),
        Res::Bad => Err(Box::new(
            HttpError::new(400).with_error_code("context_length_exceeded"),
        )),
    }
}

impl Service<Req> for Upstream {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Box::pin(async move {
            match req {
                Req::Now(r) => answer(r),
                Req::Wait(rx) => answer(rx.await.unwrap_or(Res::Ok)),
            }
        })
    }
}

type Fut = <CircuitBreaker<Upstream> as Service<Req>>::Future;

struct Held {
    fut: Fut,
    tx: oneshot::Sender<Res>,
    ticket: (u64, Kind),
}

fn check_agree(h: &BreakerHandle, m: &Model, step: usize) {
    assert_eq!(h.state(), m.public_state(), "state at step {step}: {m:?}");
    assert_eq!(
        h.probes_in_flight(),
        m.probes_in_flight(),
        "probes at step {step}: {m:?}"
    );
    if m.public_state() == State::Closed {
        let c = h.counts();
        assert_eq!(
            c.calls as usize,
            m.window.len(),
            "calls at step {step}: {m:?}"
        );
        assert_eq!(
            c.failures as usize,
            m.failures(),
            "failures at step {step}: {m:?}"
        );
    }
}

async fn run(ops: Vec<Op>) {
    let layer = CircuitBreakerLayer::builder()
        .count_window(WINDOW as u32)
        .min_calls(MIN_CALLS as u32)
        .failure_rate(0.5)
        .consecutive_failures(CONSECUTIVE)
        .trip_on(&[])
        .open_duration(Duration::from_millis(BASE_MS))
        .open_growth(2.0, Duration::from_millis(CAP_MS))
        .open_jitter(0.0)
        .half_open_probes(PROBES)
        .probe_timeout(Duration::from_millis(PROBE_TIMEOUT_MS))
        .ignore_server_hints()
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Upstream);
    let mut model = Model::new();
    let mut now = 0u64;
    let mut held: Vec<Held> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Call(r) => {
                let want = model.acquire(now);
                let got = svc.ready().await.unwrap().call(Req::Now(r)).await;
                match want {
                    Err(ms) => match got {
                        Err(Error::CircuitOpen { retry_after, .. }) => {
                            assert_eq!(
                                retry_after,
                                Duration::from_millis(ms),
                                "retry_after at step {step}"
                            )
                        }
                        other => panic!("step {step}: model rejects, breaker answered {other:?}"),
                    },
                    Ok((gen, kind)) => {
                        assert!(
                            !matches!(got, Err(Error::CircuitOpen { .. })),
                            "step {step}: model admits, breaker rejected"
                        );
                        model.complete(gen, kind, r, now);
                    }
                }
            }
            Op::Hold => {
                let want = model.acquire(now);
                let (tx, rx) = oneshot::channel();
                let mut fut = svc.ready().await.unwrap().call(Req::Wait(rx));
                match want {
                    Err(_) => {
                        let got = (&mut fut).await;
                        assert!(
                            matches!(got, Err(Error::CircuitOpen { .. })),
                            "step {step}: {got:?}"
                        );
                    }
                    Ok(ticket) => {
                        let mut spawned = tokio_test::task::spawn(&mut fut);
                        assert!(
                            spawned.poll().is_pending(),
                            "step {step}: a held call finished"
                        );
                        drop(spawned);
                        held.push(Held { fut, tx, ticket });
                    }
                }
            }
            Op::Finish(i, r) => {
                if held.is_empty() {
                    continue;
                }
                let Held { fut, tx, ticket } = held.remove(i % held.len());
                tx.send(r).unwrap();
                let _ = fut.await;
                model.complete(ticket.0, ticket.1, r, now);
            }
            Op::Drop(i) => {
                if held.is_empty() {
                    continue;
                }
                let Held { ticket, .. } = held.remove(i % held.len());
                model.release(ticket.0, ticket.1);
            }
            Op::Advance(ms) => {
                tokio::time::advance(Duration::from_millis(ms)).await;
                now += ms;
            }
            Op::Reset => {
                h.reset();
                model.reset();
            }
            Op::ForceOpen => {
                h.force_open();
                model.force_open();
            }
        }
        check_agree(&h, &model, step);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn breaker_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}
