//! Shared by the gateway tests: two mock targets and a gateway over them,
//! its pipeline read from TOML, serving on loopback.
#![allow(dead_code, unreachable_pub)]

use std::sync::OnceLock;

use llm_resilience::axum::gateway::Gateway;
use llm_resilience::pipeline::PipelineConfig;
use llm_resilience::testing::mock_server::{FaultScript, MockServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// A gateway in front of two mock targets.
pub struct Running {
    pub primary: MockServer,
    pub secondary: MockServer,
    pub gateway: Gateway,
    /// `http://127.0.0.1:PORT`.
    pub root: String,
    /// `http://127.0.0.1:PORT/v1`, for OpenAI clients.
    pub base_url: String,
}

/// The process's Prometheus recorder (one per process).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
        .clone()
}

/// The config: one attempt per target (the fallback moves on at once), a
/// breaker that trips after 3 failures in a row and stays open 30 s, a 10 s
/// deadline.
pub fn config(primary: &MockServer, secondary: &MockServer) -> PipelineConfig {
    PipelineConfig::from_toml(&format!(
        r#"
        deadline = "10s"
        [queue]
        capacity = 100
        concurrency = 8
        when_full = "reject"
        [retry]
        max_attempts = 1
        attempt_timeout = "5s"
        [breaker]
        consecutive_failures = 3
        min_calls = 1000
        open_duration = "30s"
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
    .unwrap()
}

async fn serve(gateway: Gateway, primary: MockServer, secondary: MockServer) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let root = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
    Running {
        primary,
        secondary,
        gateway,
        base_url: format!("{root}/v1"),
        root,
    }
}

/// Two mock targets with these scripts and a gateway over them.
pub async fn start(primary: FaultScript, secondary: FaultScript) -> Running {
    start_edited(primary, secondary, |_| {}).await
}

/// The same, the config changed by `edit` first.
pub async fn start_edited(
    primary: FaultScript,
    secondary: FaultScript,
    edit: impl FnOnce(&mut PipelineConfig),
) -> Running {
    let primary = MockServer::start(primary).await.unwrap();
    let secondary = MockServer::start(secondary).await.unwrap();
    let handle = prometheus();
    let mut config = config(&primary, &secondary);
    edit(&mut config);
    let gateway = Gateway::from_config(&config)
        .unwrap()
        .metrics(move || handle.render());
    serve(gateway, primary, secondary).await
}

/// The same, callers needing `key` as their bearer key.
pub async fn start_with_key(primary: FaultScript, key: &str) -> Running {
    let primary = MockServer::start(primary).await.unwrap();
    let secondary = MockServer::start(FaultScript::new()).await.unwrap();
    let gateway = Gateway::from_config(&config(&primary, &secondary))
        .unwrap()
        .require_api_key(key);
    serve(gateway, primary, secondary).await
}
