//! Shared by the client's loopback tests (`http_client.rs`,
//! `http_client_retry.rs`, `http_client_stream.rs`): a client with short
//! timeouts against a mock server, and the classifier's verdict on its
//! errors.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use llm_resilience::classify::{Classify, LlmClassifier, Outcome, Reason};
use llm_resilience::client::{ClientError, OpenAiClient};
use llm_resilience::testing::mock_server::MockServer;
use llm_resilience::Error;

pub const KEY: &str = "sk-test-DO-NOT-LEAK-1234567890";

pub fn client(server: &MockServer) -> OpenAiClient {
    OpenAiClient::builder(server.base_url())
        .api_key(KEY)
        .model("mock-model")
        .connect_timeout(Duration::from_secs(2))
        .first_byte_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
        .stream_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

pub fn classify(err: ClientError) -> Outcome {
    let err = Error::from_inner(err);
    Classify::<()>::classify(&LlmClassifier::new(), Err(&err))
}

pub fn tr(reason: Reason) -> Outcome {
    Outcome::transient(reason)
}

pub fn perm(reason: Reason) -> Outcome {
    Outcome::permanent(reason)
}

pub fn bad(reason: Reason) -> Outcome {
    Outcome::BadRequest { reason }
}
