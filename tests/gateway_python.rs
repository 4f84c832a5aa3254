//! The official OpenAI Python SDK (`openai`, installed from PyPI in its own
//! virtual environment by `.ci/run`) pointed at the gateway, which fronts
//! two mock LLM servers: the SDK reads every error the gateway answers into
//! its typed exceptions (`RateLimitError` 429, `InternalServerError` 503 and
//! 504, `BadRequestError` 400, `AuthenticationError` 401, `APIError` for a
//! stream cut off upstream), streams text and tool calls, and honours
//! `Retry-After`: the test counts the calls the SDK makes at the gateway
//! (its `max_retries` plus one where the error is retryable, one where it
//! is not) and the waits between them.
//!
//! `LLM_RESILIENCE_PYTHON` names the virtual environment's python. Without
//! it the test prints a note and passes, except under `CI=true`, where it
//! fails: the SDK test must run in CI.
#![cfg(all(feature = "axum", feature = "config", feature = "testing"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::{self, Next};
use llm_resilience::axum::gateway::Gateway;
use llm_resilience::pipeline::PipelineConfig;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use tokio::time::Instant;

const PYTHON_VAR: &str = "LLM_RESILIENCE_PYTHON";
const KEY: &str = "sk-gateway-test";

fn python() -> Option<String> {
    match std::env::var(PYTHON_VAR) {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but {PYTHON_VAR} is not set: the OpenAI SDK test must run in CI")
        }
        _ => {
            eprintln!(
                "skipping: set {PYTHON_VAR} to a python with `openai` installed (see .ci/run) to run the OpenAI SDK test"
            );
            None
        }
    }
}

/// Calls at the gateway: when each arrived and the SDK's
/// `x-stainless-retry-count`.
type Calls = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

struct Setup {
    primary: MockServer,
    secondary: MockServer,
    gateway: Gateway,
    calls: Calls,
    base_url: String,
    python: String,
}

impl Setup {
    /// Sets both targets' scripts, resets the breakers and the count.
    fn prepare(&self, primary: FaultScript, secondary: FaultScript) {
        self.primary.set_script(primary);
        self.secondary.set_script(secondary);
        for (_, b) in self.gateway.pipeline().breakers() {
            b.reset();
        }
        self.calls.lock().unwrap().clear();
    }

    /// Runs the SDK script's `scenario` (it must succeed) and returns the
    /// calls it made at the gateway.
    async fn sdk(&self, scenario: &str) -> Vec<(Instant, Option<String>)> {
        let out = tokio::process::Command::new(&self.python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/openai_sdk.py"
            ))
            .arg(scenario)
            .env("GATEWAY_BASE_URL", &self.base_url)
            .env("GATEWAY_API_KEY", KEY)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), out)
            .await
            .unwrap_or_else(|_| panic!("{scenario}: the SDK script did not finish"))
            .unwrap();
        assert!(
            out.status.success(),
            "{scenario}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    async fn run(
        &self,
        scenario: &str,
        primary: FaultScript,
        secondary: FaultScript,
    ) -> Vec<(Instant, Option<String>)> {
        self.prepare(primary, secondary);
        self.sdk(scenario).await
    }
}

/// The retry counts the SDK stamped on its calls, in order.
fn retry_counts(calls: &[(Instant, Option<String>)]) -> Vec<String> {
    calls
        .iter()
        .map(|(_, n)| n.clone().unwrap_or_default())
        .collect()
}

async fn setup(python: String) -> Setup {
    let primary = MockServer::start(FaultScript::new()).await.unwrap();
    let secondary = MockServer::start(FaultScript::new()).await.unwrap();
    // One attempt per target, breakers that trip only when forced (their
    // open duration, 1 s, is the Retry-After of an open circuit), a 2 s
    // deadline (1 s per attempt) for the 504.
    let config = PipelineConfig::from_toml(&format!(
        r#"
        deadline = "2s"
        [retry]
        max_attempts = 1
        attempt_timeout = "1s"
        [breaker]
        consecutive_failures = 1000
        min_calls = 1000
        open_duration = "1s"
        [[targets]]
        name = "primary"
        base_url = "{}"
        model = "primary-model"
        [[targets]]
        name = "secondary"
        base_url = "{}"
        model = "secondary-model"
        "#,
        primary.base_url(),
        secondary.base_url()
    ))
    .unwrap();
    let gateway = Gateway::from_config(&config).unwrap().require_api_key(KEY);
    let calls: Calls = Arc::default();
    let seen = Arc::clone(&calls);
    let app = gateway
        .router()
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let seen = Arc::clone(&seen);
            async move {
                let n = req
                    .headers()
                    .get("x-stainless-retry-count")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock().unwrap().push((Instant::now(), n));
                next.run(req).await
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Setup {
        primary,
        secondary,
        gateway,
        calls,
        base_url,
        python,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_reads_every_answer_of_the_gateway() {
    let Some(python) = python() else { return };
    let s = setup(python.clone()).await;
    let ok = FaultScript::new;
    let always = |fault: MockFault| FaultScript::new().rate(fault, 1.0);
    let throttled = || always(MockFault::rate_limited(Some(Duration::from_secs(2))));

    // Answers, whole and streamed.
    assert_eq!(s.run("complete", ok(), ok()).await.len(), 1);
    assert_eq!(s.run("stream", ok().chunks(4), ok()).await.len(), 1);
    assert_eq!(s.primary.stats().get(Served::Ok), 2);
    assert_eq!(s.run("tools", ok(), ok()).await.len(), 2);

    // A stream cut off after two chunks: the SDK raises the error event.
    let broken = ok()
        .chunks(6)
        .rate(MockFault::MidStreamDrop { after_chunks: 2 }, 1.0);
    assert_eq!(s.run("stream_broken", broken, ok()).await.len(), 1);
    assert_eq!(s.secondary.total(), 0);

    // Every target throttles: 429 with Retry-After 2; the SDK (max_retries
    // 2) calls three times. (No assertion on the time between its calls:
    // tests never assert on durations; the next case proves by a count
    // that the SDK reads the gateway's Retry-After.)
    let calls = s.run("rate_limited", throttled(), throttled()).await;
    assert_eq!(retry_counts(&calls), ["0", "1", "2"]);
    // A provider's 429 pauses its target's rate limiter for the hinted
    // time (up to the limiter's 2-minute cap), which would answer the next
    // scenario: each of the next ones gets gateways of its own.
    // Told to wait 300 s, past its 2-minute cap, the SDK does not retry:
    // it read the gateway's Retry-After (a count, no clock involved).
    let long = || always(MockFault::rate_limited(Some(Duration::from_secs(300))));
    let calls = setup(python.clone())
        .await
        .run("rate_limited_long", long(), long())
        .await;
    assert_eq!(retry_counts(&calls), ["0"]);
    assert_eq!(
        setup(python.clone())
            .await
            .run("rate_limited_stream", throttled(), throttled())
            .await
            .len(),
        1
    );
    let s = setup(python).await;

    // Every breaker open: 503 with the time to the next probe (1 s); the
    // SDK (max_retries 1) calls twice and no target is called.
    s.prepare(ok(), ok());
    for (_, b) in s.gateway.pipeline().breakers() {
        b.force_open();
    }
    let (p, q) = (s.primary.total(), s.secondary.total());
    let calls = s.sdk("unavailable").await;
    assert_eq!(retry_counts(&calls), ["0", "1"]);
    assert_eq!((s.primary.total(), s.secondary.total()), (p, q));

    // Both targets hang: the deadline answers 504 (max_retries 0: one call).
    let calls = s
        .run("timeout", always(MockFault::Hang), always(MockFault::Hang))
        .await;
    assert_eq!(calls.len(), 1);

    // A request too long for the context: 400, never retried, never sent
    // to the other target.
    let before = s.secondary.total();
    let calls = s
        .run("bad_request", always(MockFault::context_length()), ok())
        .await;
    assert_eq!(calls.len(), 1);
    assert_eq!(s.secondary.total(), before);

    // A wrong key: 401, never retried, nothing sent upstream.
    let (p, q) = (s.primary.total(), s.secondary.total());
    let calls = s.run("unauthorized", ok(), ok()).await;
    assert_eq!(calls.len(), 1);
    assert_eq!((s.primary.total(), s.secondary.total()), (p, q));
}
