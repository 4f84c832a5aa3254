//! The agent pipeline's per-target rate limit over real HTTP on loopback,
//! against mock LLM servers: a 429 storm with `Retry-After` on the primary
//! makes callers wait or move on as configured, and the primary receives
//! nothing during the hinted pause (counted at the mock server); a target
//! whose limit would make a caller wait past the deadline is skipped without
//! an upstream call; each scenario gives the same result from a TOML config
//! and from the builder.
//!
//! Real time with short waits; nothing asserts on durations. The pause is
//! 3 s and the checks that the primary received nothing come well inside
//! it.
#![cfg(all(feature = "config", feature = "testing"))]

use std::time::Duration;

use llm_resilience::classify::Reason;
use llm_resilience::client::{ChatRequest, ChatResponse, OpenAiClient};
use llm_resilience::pipeline::{AgentPipeline, PipelineConfig};
use llm_resilience::ratelimit::{ChatEstimate, Reported};
use llm_resilience::report::{with_report, Report, TargetOutcome};
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer};
use tower::ServiceExt;

type Agent = AgentPipeline<OpenAiClient, ChatRequest, ChatResponse>;

const PAUSE: Duration = Duration::from_secs(3);

fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .model("m")
        .build()
        .unwrap()
}

/// The primary answers its first call with a 429 and `Retry-After: 3`,
/// then normally.
async fn servers() -> (MockServer, MockServer) {
    let primary = MockServer::start(FaultScript::new().then(MockFault::rate_limited(Some(PAUSE))))
        .await
        .unwrap();
    let secondary = MockServer::start(FaultScript::new()).await.unwrap();
    (primary, secondary)
}

/// The same pipeline from the builder or from TOML: two targets, 2
/// attempts, `deadline`, and `limit` (TOML keys of the primary's
/// `[targets.rate_limit]`) applied to the primary.
fn agent(
    from_file: bool,
    primary: &MockServer,
    secondary: &MockServer,
    deadline: &str,
    limit: &str,
) -> Agent {
    if from_file {
        let toml = format!(
            r#"
            deadline = "{deadline}"
            [retry]
            max_attempts = 2
            [[targets]]
            name = "primary"
            base_url = "{}"
            model = "m"
            [targets.rate_limit]
            {limit}
            [[targets]]
            name = "secondary"
            base_url = "{}"
            model = "m"
            "#,
            primary.base_url(),
            secondary.base_url()
        );
        return PipelineConfig::from_toml(&toml).unwrap().build().unwrap();
    }
    // The same settings, through the builder's own methods.
    let parsed: toml::Table = toml::from_str(limit).unwrap();
    let deadline = match deadline {
        "1s" => Duration::from_secs(1),
        "2s" => Duration::from_secs(2),
        _ => Duration::from_secs(10),
    };
    AgentPipeline::builder()
        .target("primary", client(primary))
        .fallback("secondary", client(secondary))
        .deadline(deadline)
        .retry(|r| r.max_attempts(2))
        .estimate_tokens(ChatEstimate)
        .read_usage(Reported)
        .target_rate_limit("primary", move |mut r| {
            if let Some(n) = parsed.get("requests").and_then(|v| v.as_integer()) {
                r = r.requests(n as u64);
            }
            if let Some(w) = parsed.get("window").and_then(|v| v.as_str()) {
                assert_eq!(w, "10s");
                r = r.window(Duration::from_secs(10));
            }
            if parsed.get("when_limited").and_then(|v| v.as_str()) == Some("reject") {
                r = r.reject();
            }
            r
        })
        .build()
        .unwrap()
}

fn ask(i: usize) -> ChatRequest {
    ChatRequest::user(format!("question {i}")).max_tokens(8)
}

/// Who answered, and what happened to the primary, per call.
fn summary(report: &Report) -> String {
    let primary = report
        .targets
        .iter()
        .find(|t| &*t.name == "primary")
        .map(|t| format!("{:?}", t.outcome))
        .unwrap_or_default();
    format!(
        "{} (primary: {primary})",
        report.answered_by.as_deref().unwrap_or("-")
    )
}

/// Starts the call that meets the 429, waits until the primary's limiter
/// holds the pause, then sends `n` more calls during it. Returns every
/// call's summary, and the primary's call count seen well inside the
/// pause.
async fn storm(agent: &Agent, primary: &MockServer, n: usize) -> (Vec<String>, u64) {
    let first = tokio::spawn(with_report(agent.clone().oneshot(ask(0))));
    let limiter = agent.rate_limit("primary").unwrap().clone();
    while limiter.snapshot().paused_for.is_zero() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(primary.total(), 1, "the 429 itself");
    let calls: Vec<_> = (1..=n)
        .map(|i| tokio::spawn(with_report(agent.clone().oneshot(ask(i)))))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Well inside the 3 s pause.
    assert!(!limiter.snapshot().paused_for.is_zero());
    let during = primary.total();
    let mut out = Vec::new();
    for task in std::iter::once(first).chain(calls) {
        let (res, report) = task.await.unwrap();
        res.unwrap();
        out.push(summary(&report));
    }
    (out, during)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_callers_wait_out_the_pause_and_the_primary_gets_nothing_during_it() {
    let mut results = Vec::new();
    for from_file in [true, false] {
        let (primary, secondary) = servers().await;
        // A 10 s deadline: the 3 s pause fits, so everyone waits for it.
        let agent = agent(from_file, &primary, &secondary, "10s", "");
        let (answers, during) = storm(&agent, &primary, 5).await;
        // Nothing reached the primary during the pause: the waiting calls
        // were in its limiter's line, not at the server.
        assert_eq!(during, 1);
        assert_eq!(secondary.total(), 0, "nobody moved on");
        // Then the retry of the first call and the five waiting calls.
        assert_eq!(primary.total(), 7);
        assert!(
            answers.iter().all(|a| a.starts_with("primary")),
            "{answers:?}"
        );
        results.push((answers, primary.total(), secondary.total()));
    }
    assert_eq!(results[0], results[1], "TOML and builder differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_past_the_deadline_moves_callers_on_without_calling_the_primary() {
    let mut results = Vec::new();
    for from_file in [true, false] {
        let (primary, secondary) = servers().await;
        // A 2 s deadline: the 3 s pause does not fit, so the calls skip the
        // primary at once (its limiter refuses them) and the first call's
        // retry does not sleep past the deadline either.
        let agent = agent(from_file, &primary, &secondary, "2s", "");
        let (answers, during) = storm(&agent, &primary, 5).await;
        assert_eq!(during, 1);
        // Everything was answered, still inside the pause: the primary got
        // only the 429.
        assert_eq!(primary.total(), 1);
        assert_eq!(secondary.total(), 6);
        let skipped = format!("{:?}", TargetOutcome::Skipped(Reason::RateLimited));
        for a in &answers[1..] {
            assert_eq!(*a, format!("secondary (primary: {skipped})"));
        }
        assert!(answers[0].starts_with("secondary"), "{}", answers[0]);
        results.push((answers, primary.total(), secondary.total()));
    }
    assert_eq!(results[0], results[1], "TOML and builder differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_to_reject_callers_move_on_during_the_pause() {
    let mut results = Vec::new();
    for from_file in [true, false] {
        let (primary, secondary) = servers().await;
        // A deadline the pause fits in, but the limiter rejects instead of
        // waiting.
        let agent = agent(
            from_file,
            &primary,
            &secondary,
            "10s",
            r#"when_limited = "reject""#,
        );
        let (answers, during) = storm(&agent, &primary, 5).await;
        assert_eq!(during, 1);
        let skipped = format!("{:?}", TargetOutcome::Skipped(Reason::RateLimited));
        for a in &answers[1..] {
            assert_eq!(*a, format!("secondary (primary: {skipped})"));
        }
        // The first call's retry waited the pause out and got its answer
        // from the primary.
        assert!(answers[0].starts_with("primary"), "{}", answers[0]);
        assert_eq!(primary.total(), 2);
        results.push((answers, primary.total(), secondary.total()));
    }
    assert_eq!(results[0], results[1], "TOML and builder differ");
}

/// A target whose request limit is spent for the window is skipped without
/// an upstream call when the wait would outlast the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_that_would_wait_past_the_deadline_skips_the_target() {
    let mut results = Vec::new();
    for from_file in [true, false] {
        let primary = MockServer::start(FaultScript::new()).await.unwrap();
        let secondary = MockServer::start(FaultScript::new()).await.unwrap();
        // One request per 10 s on the primary; a 2 s deadline.
        let agent = agent(
            from_file,
            &primary,
            &secondary,
            "2s",
            "requests = 1\nwindow = \"10s\"",
        );
        let mut answers = Vec::new();
        for i in 0..4 {
            let (res, report) = with_report(agent.clone().oneshot(ask(i))).await;
            res.unwrap();
            answers.push(summary(&report));
        }
        assert_eq!(answers[0], "primary (primary: Answered)");
        let skipped = format!("{:?}", TargetOutcome::Skipped(Reason::RateLimited));
        for a in &answers[1..] {
            assert_eq!(*a, format!("secondary (primary: {skipped})"));
        }
        assert_eq!((primary.total(), secondary.total()), (1, 3));
        // The refusals did not count against the primary's health.
        let breaker = agent.breaker("primary").unwrap();
        assert_eq!(breaker.state(), llm_resilience::breaker::State::Closed);
        results.push((answers, primary.total(), secondary.total()));
    }
    assert_eq!(results[0], results[1], "TOML and builder differ");
}

#[test]
fn rate_limit_errors_name_the_key_path() {
    let target = r#"
[[targets]]
name = "a"
base_url = "http://127.0.0.1:9/v1"
model = "m"
"#;
    let path = |toml: &str| {
        PipelineConfig::from_toml(toml)
            .unwrap()
            .build()
            .unwrap_err()
            .path()
            .to_owned()
    };
    assert_eq!(
        path(&format!(
            "{target}{target}[targets.rate_limit]\nrequests = 0\n"
        )),
        "targets[1].rate_limit.requests"
    );
    assert_eq!(
        path(&format!("[rate_limit]\nburst = 1.5\n{target}")),
        "rate_limit.burst"
    );
    assert_eq!(
        path(&format!("{target}[targets.rate_limit]\nwindow = \"0s\"\n")),
        "targets[0].rate_limit.window"
    );
    let unknown = PipelineConfig::from_toml(&format!(
        "{target}[targets.rate_limit]\nrequests_per_minute = 5\n"
    ))
    .unwrap_err();
    assert!(
        unknown.to_string().contains("requests_per_minute"),
        "{unknown}"
    );
}

#[test]
fn a_token_limit_without_an_estimate_and_an_unknown_target_are_errors() {
    let c = || {
        OpenAiClient::builder("http://127.0.0.1:9/v1")
            .model("m")
            .build()
            .unwrap()
    };
    let err = AgentPipeline::<_, ChatRequest, ChatResponse>::builder()
        .target("a", c())
        .rate_limit(|r| r.tokens(30_000))
        .build()
        .unwrap_err();
    assert_eq!(err.field, "estimate_tokens");
    let err = AgentPipeline::<_, ChatRequest, ChatResponse>::builder()
        .target("a", c())
        .target_rate_limit("b", |r| r.requests(5))
        .build()
        .unwrap_err();
    assert_eq!(err.field, "target_rate_limit");
    AgentPipeline::<_, ChatRequest, ChatResponse>::builder()
        .target("a", c())
        .estimate_tokens(ChatEstimate)
        .target_rate_limit("a", |r| r.requests(500).tokens(30_000))
        .build()
        .unwrap();
}

/// On a paused clock: the wait for the limiter's turn is not taken from the
/// attempt (the attempt timeout sits under the rate limiter), while a slow
/// attempt is still cut.
#[tokio::test(start_paused = true)]
async fn the_wait_for_the_limiters_turn_is_not_part_of_the_attempt() {
    use llm_resilience::classify::HttpError;
    use tokio::time::Instant;
    let svc = tower::service_fn(|slow: bool| async move {
        if slow {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok::<_, HttpError>("answer")
    });
    let agent = AgentPipeline::builder()
        .target("only", svc)
        .deadline(Duration::from_secs(60))
        .retry(|r| r.max_attempts(1).attempt_timeout(Duration::from_secs(1)))
        .rate_limit(|r| r.requests(1).window(Duration::from_secs(10)))
        .build()
        .unwrap();
    let start = Instant::now();
    assert_eq!(agent.clone().oneshot(false).await.unwrap(), "answer");
    // The second call waits about 10 s in line, ten attempt timeouts long,
    // and is answered.
    assert_eq!(agent.clone().oneshot(false).await.unwrap(), "answer");
    assert!(start.elapsed() >= Duration::from_secs(9));
    // A slow attempt is cut after its second.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = Instant::now();
    let err = agent.clone().oneshot(true).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::from_secs(1), "{err}");
}
