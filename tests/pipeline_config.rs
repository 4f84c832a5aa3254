//! The pipeline from a TOML or JSON file: errors name the bad key's path,
//! the shipped example parses, and a pipeline from a file behaves like the
//! same pipeline from the builder (loopback, mock LLM servers).
#![cfg(all(feature = "config", feature = "testing"))]

use std::time::Duration;

use llm_resilience::client::{ChatRequest, ChatResponse, OpenAiClient};
use llm_resilience::pipeline::{AgentPipeline, PipelineConfig};
use llm_resilience::report::with_report;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer};
use tower::ServiceExt;

fn path_of(toml: &str) -> String {
    let config = match PipelineConfig::from_toml(toml) {
        Ok(c) => c,
        Err(e) => return format!("parse: {e}"),
    };
    config.build().unwrap_err().path().to_owned()
}

const TARGET: &str = r#"
[[targets]]
name = "a"
base_url = "http://127.0.0.1:9/v1"
model = "m"
"#;

#[test]
fn errors_name_the_bad_keys_path() {
    let two = format!("{TARGET}{TARGET}[targets.breaker]\nfailure_rate = 1.5\n");
    assert_eq!(path_of(&two), "targets[1].breaker.failure_rate");
    let global = format!("[breaker]\nfailure_rate = -1\n{TARGET}");
    assert_eq!(path_of(&global), "breaker.failure_rate");
    let retry = format!("{TARGET}[targets.retry]\nmax_attempts = 0\n");
    assert_eq!(path_of(&retry), "targets[0].retry.max_attempts");
    let queue = format!("[queue]\nconcurrency = 0\n{TARGET}");
    assert_eq!(path_of(&queue), "queue.concurrency");
    let key = format!("{TARGET}api_key_env = \"LLM_RESILIENCE_TEST_UNSET_VAR\"\n");
    assert_eq!(path_of(&key), "targets[0].api_key_env");
    let url = TARGET.replace("http://127.0.0.1:9/v1", "not a url");
    assert_eq!(path_of(&url), "targets[0].base_url");
    assert_eq!(path_of(""), "targets", "{}", path_of(""));
    // Unknown keys and bad durations are parse errors that name the key.
    let unknown = format!("{TARGET}[targets.breaker]\nfailure_ratio = 0.5\n");
    assert!(
        path_of(&unknown).contains("failure_ratio"),
        "{}",
        path_of(&unknown)
    );
    let dur = format!("deadline = \"soon\"\n{TARGET}");
    assert!(path_of(&dur).contains("deadline"), "{}", path_of(&dur));
}

#[test]
fn the_shipped_example_and_json_parse() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/pipeline.toml"
    ))
    .unwrap();
    let config = PipelineConfig::from_toml(&text).unwrap();
    assert_eq!(config.targets.len(), 3);
    assert_eq!(config.deadline, Some(Duration::from_secs(120)));
    assert_eq!(config.targets[0].rate_limit.requests, Some(500));
    assert_eq!(config.targets[0].rate_limit.tokens, Some(30_000));
    assert_eq!(config.rate_limit.max_wait, Some(Duration::from_secs(20)));
    let json = r#"{"deadline": 60, "targets": [{"name": "a", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}"#;
    let config = PipelineConfig::from_json(json).unwrap();
    assert_eq!(config.deadline, Some(Duration::from_secs(60)));
    config.build().unwrap();
}

/// The outage scenario, built both ways: the same calls reach the same
/// servers.
#[tokio::test]
async fn a_file_and_the_builder_give_the_same_result() {
    async fn run(agent: AgentPipeline<OpenAiClient, ChatRequest, ChatResponse>) -> Vec<String> {
        let mut answered = Vec::new();
        for i in 0..12 {
            let (out, report) = with_report(
                agent
                    .clone()
                    .oneshot(ChatRequest::user(format!("q{i}")).max_tokens(4)),
            )
            .await;
            out.unwrap();
            answered.push(report.answered_by.unwrap().to_string());
        }
        answered
    }
    let mut results = Vec::new();
    for from_file in [true, false] {
        let primary = MockServer::start(FaultScript::new().rate(MockFault::server_error(500), 1.0))
            .await
            .unwrap();
        let secondary = MockServer::start(FaultScript::new()).await.unwrap();
        let agent = if from_file {
            PipelineConfig::from_toml(&format!(
                r#"
                deadline = "10s"
                [retry]
                max_attempts = 1
                [breaker]
                consecutive_failures = 3
                open_duration = "60s"
                [[targets]]
                name = "primary"
                base_url = "{}"
                model = "m"
                [[targets]]
                name = "secondary"
                base_url = "{}"
                model = "m"
                "#,
                primary.base_url(),
                secondary.base_url()
            ))
            .unwrap()
            .build()
            .unwrap()
        } else {
            let client = |s: &MockServer| {
                OpenAiClient::builder(s.base_url())
                    .model("m")
                    .build()
                    .unwrap()
            };
            AgentPipeline::builder()
                .target("primary", client(&primary))
                .fallback("secondary", client(&secondary))
                .deadline(Duration::from_secs(10))
                .retry(|r| r.max_attempts(1))
                .breaker(|b| {
                    b.consecutive_failures(3)
                        .open_duration(Duration::from_secs(60))
                })
                .build()
                .unwrap()
        };
        let answered = run(agent).await;
        results.push((answered, primary.total(), secondary.total()));
    }
    assert_eq!(results[0], results[1]);
    // Three failures tripped the primary's breaker; everything else went on.
    assert_eq!(results[0].1, 3);
    assert_eq!(results[0].2, 12);
}
