//! Model-based test: random sequences of requests (of the three classes),
//! upstream answers, cancellations (of queued, waiting and running calls)
//! and clock advances, run against the real queue on a paused clock and
//! against a small reference model of its rules (concurrency, capacity,
//! wait or reject, priority with aging, FIFO within a class, a freed permit
//! to the queue's head first, a freed place to the first caller waiting for
//! one). After every step the upstream must have seen exactly the requests
//! the model dispatched, in the same order, and the queue must report the
//! model's depth, calls in flight and callers waiting for a place.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_resilience::queue::{Priority, QueueHandle, QueueLayer, WhenFull};
use llm_resilience::BoxError;
use proptest::prelude::*;
use tokio::sync::oneshot;
use tokio_test::task::{spawn, Spawn};
use tower::{Layer, Service, ServiceExt};

const AGE_MS: u64 = 10;

#[derive(Clone, Copy, Debug)]
struct Req {
    id: u64,
    prio: Priority,
}

type Gates = Arc<Mutex<BTreeMap<u64, oneshot::Sender<()>>>>;
type Calls = Arc<Mutex<Vec<u64>>>;

/// The upstream: records each call and answers when its gate opens.
#[derive(Clone)]
struct Upstream {
    calls: Calls,
    gates: Gates,
}

impl Service<Req> for Upstream {
    type Response = u64;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.calls.lock().unwrap().push(req.id);
        let (tx, rx) = oneshot::channel();
        self.gates.lock().unwrap().insert(req.id, tx);
        Box::pin(async move {
            rx.await.map_err(|_| "gate dropped")?;
            Ok(req.id)
        })
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A new request of this class.
    Submit(Priority),
    /// The upstream answers the i-th running call (modulo their number).
    Answer(usize),
    /// The caller of the i-th live request (modulo) drops its future.
    Cancel(usize),
    /// The clock moves on.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let class = prop_oneof![
        Just(Priority::High),
        Just(Priority::Normal),
        Just(Priority::Low)
    ];
    prop_oneof![
        4 => class.prop_map(Op::Submit),
        3 => any::<usize>().prop_map(Op::Answer),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (0..=25u64).prop_map(Op::Advance),
    ]
}

fn class_index(p: Priority) -> usize {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
        other => panic!("the model knows three classes, not {other:?}"),
    }
}

/// The reference: the queue's documented rules, with nothing concurrent.
#[derive(Debug)]
struct Model {
    capacity: usize,
    reject: bool,
    now_ms: u64,
    free: usize,
    /// One FIFO list per class: (virtual time, id).
    lists: [VecDeque<(u64, u64)>; 3],
    /// Callers waiting for a place: (id, class, when they began to wait).
    waiting: VecDeque<(u64, Priority, u64)>,
    running: Vec<u64>,
    dispatched: Vec<u64>,
    rejected: Vec<u64>,
    cancelled: Vec<u64>,
}

impl Model {
    fn depth(&self) -> usize {
        self.lists.iter().map(VecDeque::len).sum()
    }

    fn enqueue(&mut self, id: u64, prio: Priority, since_ms: u64) {
        let vt = since_ms + class_index(prio) as u64 * AGE_MS;
        self.lists[class_index(prio)].push_back((vt, id));
    }

    fn dispatch(&mut self, id: u64) {
        self.running.push(id);
        self.dispatched.push(id);
    }

    fn submit(&mut self, id: u64, prio: Priority) {
        if self.free > 0 && self.depth() == 0 && self.waiting.is_empty() {
            self.free -= 1;
            self.dispatch(id);
        } else if self.depth() < self.capacity && self.waiting.is_empty() {
            self.enqueue(id, prio, self.now_ms);
        } else if self.reject {
            self.rejected.push(id);
        } else {
            self.waiting.push_back((id, prio, self.now_ms));
        }
    }

    /// The head with the earliest virtual time; ties go to the higher class.
    fn pick(&self) -> Option<usize> {
        (0..3)
            .filter_map(|c| self.lists[c].front().map(|&(vt, _)| (vt, c)))
            .min()
            .map(|(_, c)| c)
    }

    fn place_freed(&mut self) {
        if let Some((id, prio, since)) = self.waiting.pop_front() {
            self.enqueue(id, prio, since);
        }
    }

    fn permit_freed(&mut self) {
        if let Some(c) = self.pick() {
            let (_, id) = self.lists[c].pop_front().unwrap();
            self.dispatch(id);
            self.place_freed();
        } else if let Some((id, _, _)) = self.waiting.pop_front() {
            self.dispatch(id);
        } else {
            self.free += 1;
        }
    }

    fn finish_running(&mut self, id: u64) {
        self.running.retain(|&r| r != id);
        self.permit_freed();
    }

    /// The caller of `id` leaves.
    fn cancel(&mut self, id: u64) {
        self.cancelled.push(id);
        if self.running.contains(&id) {
            self.finish_running(id);
        } else if let Some(i) = self.waiting.iter().position(|w| w.0 == id) {
            self.waiting.remove(i);
        } else {
            for c in 0..3 {
                if let Some(i) = self.lists[c].iter().position(|q| q.1 == id) {
                    self.lists[c].remove(i);
                    self.place_freed();
                    return;
                }
            }
        }
    }
}

type Fut =
    Spawn<tower::util::Oneshot<llm_resilience::queue::Queue<Upstream, fn(&Req) -> Priority>, Req>>;

fn prio_of(r: &Req) -> Priority {
    r.prio
}

/// Polls every live future until nothing changes; records the answers.
fn settle(live: &mut BTreeMap<u64, Fut>, answers: &mut BTreeMap<u64, Result<u64, String>>) {
    for _ in 0..8 {
        let mut done = Vec::new();
        for (id, fut) in live.iter_mut() {
            if let std::task::Poll::Ready(r) = fut.poll() {
                done.push((*id, r.map_err(|e| format!("{e:?}"))));
            }
        }
        if done.is_empty() {
            return;
        }
        for (id, r) in done {
            live.remove(&id);
            answers.insert(id, r);
        }
    }
}

fn check(
    model: &Model,
    handle: &QueueHandle,
    calls: &Calls,
    answers: &BTreeMap<u64, Result<u64, String>>,
) {
    assert_eq!(
        *calls.lock().unwrap(),
        model.dispatched,
        "upstream calls; model {model:?}"
    );
    assert_eq!(handle.depth(), model.depth(), "depth; model {model:?}");
    assert_eq!(
        handle.in_flight(),
        model.running.len(),
        "in flight; model {model:?}"
    );
    assert_eq!(
        handle.waiting_for_place(),
        model.waiting.len(),
        "waiting; model {model:?}"
    );
    for id in &model.rejected {
        let expected = format!("QueueFull {{ depth: {} }}", model.capacity);
        assert_eq!(
            answers.get(id),
            Some(&Err(expected)),
            "request {id} should be rejected"
        );
    }
}

fn run(concurrency: usize, capacity: usize, reject: bool, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let calls = Calls::default();
        let gates = Gates::default();
        let layer = QueueLayer::builder()
            .concurrency(concurrency)
            .capacity(capacity)
            .when_full(if reject {
                WhenFull::Reject
            } else {
                WhenFull::Wait
            })
            .age_after(Duration::from_millis(AGE_MS))
            .priority_by(prio_of as fn(&Req) -> Priority)
            .build()
            .unwrap();
        let handle = layer.handle();
        let svc = layer.layer(Upstream {
            calls: Arc::clone(&calls),
            gates: Arc::clone(&gates),
        });
        let mut model = Model {
            capacity,
            reject,
            now_ms: 0,
            free: concurrency,
            lists: Default::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            dispatched: Vec::new(),
            rejected: Vec::new(),
            cancelled: Vec::new(),
        };
        let mut live: BTreeMap<u64, Fut> = BTreeMap::new();
        let mut answers = BTreeMap::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Submit(prio) => {
                    let id = next;
                    next += 1;
                    model.submit(id, prio);
                    live.insert(id, spawn(svc.clone().oneshot(Req { id, prio })));
                }
                Op::Answer(i) => {
                    if model.running.is_empty() {
                        continue;
                    }
                    let id = model.running[i % model.running.len()];
                    model.finish_running(id);
                    let gate = gates
                        .lock()
                        .unwrap()
                        .remove(&id)
                        .expect("a running call's gate");
                    gate.send(()).unwrap();
                }
                Op::Cancel(i) => {
                    if live.is_empty() {
                        continue;
                    }
                    let id = *live.keys().nth(i % live.len()).unwrap();
                    model.cancel(id);
                    drop(live.remove(&id));
                    gates.lock().unwrap().remove(&id);
                }
                Op::Advance(ms) => {
                    model.now_ms += ms;
                    tokio::time::advance(Duration::from_millis(ms)).await;
                }
            }
            settle(&mut live, &mut answers);
            check(&model, &handle, &calls, &answers);
        }
        // Answer everything still running, until the queue drains.
        while let Some(&id) = model.running.first() {
            model.finish_running(id);
            if let Some(gate) = gates.lock().unwrap().remove(&id) {
                gate.send(()).unwrap();
            }
            settle(&mut live, &mut answers);
            check(&model, &handle, &calls, &answers);
        }
        assert!(
            live.is_empty(),
            "requests never answered: {:?}",
            live.keys()
        );
        assert!(handle.is_idle());
        for id in model
            .dispatched
            .iter()
            .filter(|id| !model.cancelled.contains(id))
        {
            assert_eq!(answers.get(id), Some(&Ok(*id)), "request {id}");
        }
        assert_eq!(model.free, concurrency);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_agrees_with_the_reference_model_in_wait_mode(
        concurrency in 1..4usize,
        capacity in 1..5usize,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(concurrency, capacity, false, ops);
    }

    #[test]
    fn the_queue_agrees_with_the_reference_model_in_reject_mode(
        concurrency in 1..4usize,
        capacity in 0..4usize,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(concurrency, capacity, true, ops);
    }
}
