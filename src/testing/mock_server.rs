//! A fault-injecting, OpenAI-compatible mock LLM server on loopback.
//!
//! ```
//! use std::time::Duration;
//! use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let server = MockServer::start(
//!     FaultScript::new()
//!         .seed(1)
//!         .then(MockFault::rate_limited(Some(Duration::from_millis(20))))
//!         .rate(MockFault::server_error(503), 0.1)
//!         .requests_per_minute(600),
//! )
//! .await?;
//! let url = format!("{}/chat/completions", server.base_url());
//! # let _ = url;
//! assert_eq!(server.stats().get(Served::Ok), 0);
//! # Ok(()) }
//! ```
//!
//! # Why it lives in `testing`
//!
//! It is a real HTTP server (axum 0.8 on `127.0.0.1:0`), not a test double:
//! the crate's integration tests, its examples and demo, and users' own tests
//! of their pipelines all start it the same way, in process, with
//! `MockServer::start`. Behind the `testing` feature it costs a normal build
//! nothing.
//!
//! # What it does
//!
//! `POST /v1/chat/completions` (streamed with `"stream": true`, or not),
//! answering with usage and OpenAI-style `x-ratelimit-*` headers, following
//! a [`FaultScript`]: first a fixed sequence of answers
//! ([`then`](FaultScript::then)), then per-window fault rates by kind
//! ([`MockFault`]: 429 with Retry-After, 429 `insufficient_quota`, 5xx,
//! 529, 400 context length, hangs, connection resets, mid-stream drops,
//! in-band stream errors), latency distributions, outage windows, and its
//! own requests- and tokens-per-minute limits that answer 429 with a
//! `retry-after` when exceeded. Random decisions come from a seeded
//! generator. Every request is counted by what the server did with it
//! ([`Served`]), so a test or the demo reports upstream cost exactly.
//!
//! For agents: a request that offers `tools` is answered with calls of
//! them (arguments that fit each schema; streamed as OpenAI streams them,
//! an id and name first, then argument fragments), `n` gives `n` choices,
//! `response_format` a JSON answer; [`FaultScript::null_fields`] sends the
//! optional fields as `null`; the key can be required in a named header and
//! query parameters can be required (Azure OpenAI's `api-key` and
//! `api-version`, also on `/openai/deployments/{name}/chat/completions`);
//! and the latest requests are kept ([`MockServer::requests`]).
//!
//! `POST /v1/messages` speaks Anthropic's Messages API under the same script
//! ([`MockServer::anthropic_base_url`]).

mod agent;
mod anthropic;
mod limits;
mod script;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::agent::{RecordedRequest, RECORDED_REQUESTS};
pub use self::limits::MockLimits;
pub use self::script::{
    ErrorReply, ErrorStyle, FaultScript, FaultWindow, MockFault, MockStats, Served,
};

const WORDS: [&str; 8] = [
    "resilient",
    "agents",
    "retry",
    "politely",
    "and",
    "never",
    "stampede",
    "upstream",
];
const DEFAULT_RPM: u64 = 10_000;
const DEFAULT_TPM: u64 = 2_000_000;
const MINUTE: Duration = Duration::from_secs(60);

struct Runtime {
    script: FaultScript,
    queue: VecDeque<MockFault>,
    rng: SmallRng,
    minute_start: Instant,
    minute_requests: u64,
    minute_tokens: u64,
    started: Instant,
    /// Continuously refilled request and token buckets, when set.
    buckets: Option<limits::Buckets>,
}

struct Shared {
    runtime: Mutex<Runtime>,
    counts: [AtomicU64; Served::ALL.len()],
    total: AtomicU64,
    tokens: AtomicU64,
    /// Requests being handled now, and the most ever handled at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    shutdown: watch::Receiver<bool>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
}

/// Counts a request as in flight while its handler runs.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The running mock server; stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for MockServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MockServer {
    /// Binds `127.0.0.1:0` and serves `script` on a spawned task.
    pub async fn start(script: FaultScript) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let now = Instant::now();
        let shared = Arc::new(Shared {
            runtime: Mutex::new(Runtime {
                queue: script.sequence.iter().cloned().collect(),
                rng: SmallRng::seed_from_u64(script.seed),
                script,
                minute_start: now,
                minute_requests: 0,
                minute_tokens: 0,
                started: now,
                buckets: None,
            }),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            total: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            shutdown,
            recorded: Mutex::new(VecDeque::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(chat),
            )
            .route("/v1/messages", post(anthropic::messages))
            .with_state(Arc::clone(&shared));
        let mut stopped = stop.subscribe();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|v| *v).await;
                })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-style base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// What it did so far.
    pub fn stats(&self) -> MockStats {
        MockStats {
            total: self.shared.total.load(Ordering::SeqCst),
            tokens: self.shared.tokens.load(Ordering::SeqCst),
            counts: std::array::from_fn(|i| self.shared.counts[i].load(Ordering::SeqCst)),
        }
    }

    /// The latest requests received (at most [`RECORDED_REQUESTS`]), oldest
    /// first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let log = self
            .shared
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect()
    }

    /// Requests received so far.
    pub fn total(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// The most requests it was handling at once so far: from receiving a
    /// request to sending its answer (for a stream, its first bytes), or to
    /// the client going away.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Replaces the script at run time (its sequence, windows, limits and
    /// seed); windows count from now.
    pub fn set_script(&self, script: FaultScript) {
        let mut rt = lock(&self.shared.runtime);
        rt.queue = script.sequence.iter().cloned().collect();
        rt.rng = SmallRng::seed_from_u64(script.seed);
        rt.script = script;
        rt.started = Instant::now();
    }

    /// Enforces `limits` from now on, with continuously refilled buckets
    /// (see [`MockLimits`]), instead of the script's per-minute counters.
    pub fn set_limits(&self, limits: MockLimits) {
        lock(&self.shared.runtime).buckets = Some(limits::Buckets::new(limits, Instant::now()));
    }

    /// Stops the server and releases held (hanging) requests.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

fn lock(m: &Mutex<Runtime>) -> std::sync::MutexGuard<'_, Runtime> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Decision {
    fault: MockFault,
    served: Served,
    latency: Duration,
    limits: [(u64, u64, Duration); 2],
}

fn prompt_tokens(v: &Value) -> u64 {
    let bytes: usize = v["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["content"].as_str().map_or(0, str::len) + 16)
                .sum()
        })
        .unwrap_or(0);
    bytes.div_ceil(4) as u64
}

fn decide(shared: &Shared, prompt: u64, completion: u64) -> Decision {
    let mut rt = lock(&shared.runtime);
    let now = Instant::now();
    while now.saturating_duration_since(rt.minute_start) >= MINUTE {
        rt.minute_start += MINUTE;
        rt.minute_requests = 0;
        rt.minute_tokens = 0;
    }
    let to_reset = MINUTE.saturating_sub(now.saturating_duration_since(rt.minute_start));
    let rpm = rt.script.rpm;
    let tpm = rt.script.tpm;
    let mut over = rpm.is_some_and(|l| rt.minute_requests >= l)
        || tpm.is_some_and(|l| rt.minute_tokens + prompt > l);
    let mut to_reset = to_reset;
    let bucket_limits = rt.buckets.as_mut().map(|b| {
        let default = [
            (DEFAULT_RPM, DEFAULT_RPM, to_reset),
            (DEFAULT_TPM, DEFAULT_TPM, to_reset),
        ];
        let (limits, fits) = b.take(now, prompt + completion, default);
        if let Err(wait) = fits {
            over = true;
            to_reset = wait;
        }
        limits
    });
    let (fault, served) = if let Some(f) = rt.queue.pop_front() {
        let s = Served::of(&f);
        (f, s)
    } else if over {
        (
            MockFault::rate_limited(Some(to_reset)),
            Served::LimitExceeded,
        )
    } else {
        let elapsed = now.saturating_duration_since(rt.started);
        let mut chosen = MockFault::Ok;
        let Runtime { script, rng, .. } = &mut *rt;
        'outer: for w in script.windows.iter().filter(|w| w.window.contains(elapsed)) {
            for (f, p) in &w.faults {
                if rng.random::<f64>() < *p {
                    chosen = f.clone();
                    break 'outer;
                }
            }
        }
        let s = Served::of(&chosen);
        (chosen, s)
    };
    if served != Served::LimitExceeded {
        rt.minute_requests += 1;
        if served == Served::Ok {
            rt.minute_tokens += prompt + completion;
        }
    }
    let elapsed = now.saturating_duration_since(rt.started);
    let latency_of = rt
        .script
        .windows
        .iter()
        .filter(|w| w.window.contains(elapsed))
        .find_map(|w| w.latency)
        .or(rt.script.latency);
    let latency = match latency_of {
        Some(l) => {
            let u = rt.rng.random::<f64>();
            l.sample(u)
        }
        None => Duration::ZERO,
    };
    let rpm_l = rpm.unwrap_or(DEFAULT_RPM);
    let tpm_l = tpm.unwrap_or(DEFAULT_TPM);
    Decision {
        fault,
        served,
        latency,
        limits: bucket_limits.unwrap_or([
            (rpm_l, rpm_l.saturating_sub(rt.minute_requests), to_reset),
            (tpm_l, tpm_l.saturating_sub(rt.minute_tokens), to_reset),
        ]),
    }
}

fn go(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn with_limits(mut resp: Response, d: &Decision) -> Response {
    let h = resp.headers_mut();
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    let [(lr, rr, tr), (lt, rt, tt)] = d.limits;
    put("x-ratelimit-limit-requests", lr.to_string());
    put("x-ratelimit-remaining-requests", rr.to_string());
    put("x-ratelimit-reset-requests", go(tr));
    put("x-ratelimit-limit-tokens", lt.to_string());
    put("x-ratelimit-remaining-tokens", rt.to_string());
    put("x-ratelimit-reset-tokens", go(tt));
    put("x-request-id", "req_mock".to_owned());
    resp
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ErrorReply) -> Response {
    let mut r = json_response(e.status, &e.body());
    r.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("req_mock"));
    for (k, v) in &e.headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

type Part = Result<Bytes, std::io::Error>;

fn paced(parts: Vec<Part>, gap: Duration) -> Body {
    let stream = futures::stream::unfold(
        (parts.into_iter(), true),
        move |(mut it, first)| async move {
            let next = it.next()?;
            if !first && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if next.is_err() {
                // Let what was sent reach the client before the drop (hyper
                // would otherwise abort with the chunks still buffered).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some((next, (it, false)))
        },
    );
    Body::from_stream(stream)
}

fn reset_body() -> Body {
    Body::from_stream(futures::stream::once(async {
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "mock connection reset",
        ))
    }))
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.total.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&shared);
    let count = |s: Served| {
        shared.counts[s.index()].fetch_add(1, Ordering::SeqCst);
    };
    agent::record(&shared.recorded, &uri, &headers, &body);
    let refused = agent::check_auth(&lock(&shared.runtime).script, &headers, uri.query());
    if let Some(e) = refused {
        count(Served::OtherError);
        return error_response(&e);
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        count(Served::OtherError);
        return error_response(&ErrorReply::openai(
            400,
            "invalid_request_error",
            None,
            "We could not parse the JSON body of your request.",
        ));
    };
    let stream = req["stream"].as_bool() == Some(true);
    let model = req["model"].as_str().unwrap_or("mock-model").to_owned();
    let (words, chunks, gap, nulls) = {
        let rt = lock(&shared.runtime);
        let s = &rt.script;
        (s.reply_words, s.chunks, s.chunk_gap, s.null_fields)
    };
    let max_tokens = req["max_tokens"].as_u64().map(|n| n as usize);
    let prompt = prompt_tokens(&req);
    let completion_tokens = words.min(max_tokens.unwrap_or(usize::MAX).max(1)) as u64;
    let mut decision = decide(&shared, prompt, completion_tokens);
    count(decision.served);
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    let mut fault = std::mem::replace(&mut decision.fault, MockFault::Ok);
    if !stream {
        fault = match fault {
            MockFault::MidStreamDrop { .. } => MockFault::Reset,
            MockFault::StreamErrorEvent { .. } => MockFault::overloaded(),
            f => f,
        };
    }
    let reply = Reply {
        model: &model,
        stream,
        chunks,
        gap,
    };
    let resp = match fault {
        MockFault::Hang => {
            let mut rx = shared.shutdown.clone();
            let _ = rx.wait_for(|v| *v).await;
            error_response(&ErrorReply::openai(
                503,
                "server_error",
                None,
                "shutting down",
            ))
        }
        MockFault::Reset => Response::new(reset_body()),
        // Scripted errors carry only their own headers: the rate-limit
        // state belongs to successes and to the server's own limit.
        MockFault::Error(e) if decision.served != Served::LimitExceeded => {
            return error_response(&e)
        }
        MockFault::Error(e) => error_response(&e),
        MockFault::Ok | MockFault::Length => {
            let limit = max_tokens.unwrap_or(usize::MAX).max(1);
            let length = matches!(fault, MockFault::Length);
            let n = if length { (words / 2).max(1) } else { words }.min(limit);
            let finish = if length || n < words {
                "length"
            } else {
                "stop"
            };
            shared.tokens.fetch_add(prompt + n as u64, Ordering::SeqCst);
            agent::completion(&reply, &req, nulls, prompt, n, finish)
        }
        MockFault::MidStreamDrop { after_chunks } => agent::partial_stream(
            &reply,
            after_chunks,
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock mid-stream drop",
            )),
        ),
        MockFault::StreamErrorEvent { after_chunks } => agent::partial_stream(
            &reply,
            after_chunks,
            Ok(Bytes::from(format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            ))),
        ),
    };
    with_limits(resp, &decision)
}

/// How a completion is sent.
struct Reply<'a> {
    model: &'a str,
    stream: bool,
    chunks: usize,
    gap: Duration,
}

fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}
