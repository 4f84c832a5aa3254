//! An OpenAI-compatible gateway: point any OpenAI SDK at
//! `http://127.0.0.1:8080/v1` and every chat completion goes through an
//! agent pipeline (queue, retries, circuit breakers, fallback between
//! targets) built from a config file.
//!
//! ```text
//! cargo run --example gateway --features axum,config,metrics,testing -- [CONFIG] [--mock]
//! ```
//!
//! CONFIG defaults to `$LLM_GATEWAY_CONFIG`, else `examples/gateway.toml`;
//! the address to `$LLM_GATEWAY_ADDR`, else `127.0.0.1:8080`. With
//! `--mock`, every target's base URL is replaced by a mock LLM server
//! started here (the first one fails 20% of its calls with a 503), so it
//! runs without keys. With `$LLM_GATEWAY_API_KEY` set, callers must send
//! it as their bearer key. `GET /healthz` shows each target's breaker,
//! `GET /metrics` the pipeline's metrics in Prometheus format.

use llm_resilience::axum::gateway::Gateway;
use llm_resilience::pipeline::PipelineConfig;
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer};
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mock = args.iter().any(|a| a == "--mock");
    let path = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .or_else(|| std::env::var("LLM_GATEWAY_CONFIG").ok())
        .unwrap_or_else(|| "examples/gateway.toml".to_owned());
    let addr = std::env::var("LLM_GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());

    let mut config = PipelineConfig::from_file(&path)?;
    let mut mocks = Vec::new();
    if mock {
        for (i, target) in config.targets.iter_mut().enumerate() {
            let script = if i == 0 {
                FaultScript::new().rate(MockFault::server_error(503), 0.2)
            } else {
                FaultScript::new()
            };
            let server = MockServer::start(script).await?;
            target.base_url = server.base_url();
            target.api_key_env = None;
            eprintln!("mock target {} at {}", target.name, target.base_url);
            mocks.push(server);
        }
    }

    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let mut gateway = Gateway::from_config(&config)?.metrics(move || prometheus.render());
    if let Ok(key) = std::env::var("LLM_GATEWAY_API_KEY") {
        gateway = gateway.require_api_key(key);
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "gateway on http://{}/v1 ({} targets from {path})",
        listener.local_addr()?,
        config.targets.len()
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    gateway.serve(listener, shutdown).await?;
    drop(mocks);
    Ok(())
}
