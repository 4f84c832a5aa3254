//! Shared by the Anthropic client's loopback tests: a key the mock server
//! requires (and that must never leak), the client builder with short
//! timeouts, and the LLM classifier's verdict on a client error.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use llm_resilience::anthropic::{AnthropicClient, AnthropicClientBuilder, AnthropicError};
use llm_resilience::classify::{Classify, LlmClassifier, Outcome};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};
use llm_resilience::Error;

pub const KEY: &str = "sk-ant-test-DO-NOT-LEAK-0987654321";

pub fn builder(server: &MockServer) -> AnthropicClientBuilder {
    AnthropicClient::builder()
        .base_url(server.anthropic_base_url())
        .api_key(KEY)
        .model("claude-mock")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
}

pub fn client(server: &MockServer) -> AnthropicClient {
    builder(server).build().unwrap()
}

/// A mock server that answers only requests carrying [`KEY`].
pub async fn keyed_server(script: FaultScript) -> MockServer {
    MockServer::start(script.require_api_key(KEY))
        .await
        .unwrap()
}

pub fn classify(err: AnthropicError) -> Outcome {
    let err = Error::from_inner(err);
    Classify::<()>::classify(&LlmClassifier::new(), Err(&err))
}
