//! Heap allocations of a plain text Messages call through the Anthropic
//! client, counted
//! on the calling thread only (the mock server runs on another thread), so
//! the request path's cost is measured, not the server's.
//!
//! The figure is a ceiling that fails when the client's request path gains
//! an allocation; run with `--nocapture` to see the counts.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use llm_resilience::anthropic::{AnthropicClient, MessagesRequest};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};

#[path = "support/thread_alloc.rs"]
mod thread_alloc;
use thread_alloc::{allocations, median_per_call};

#[global_allocator]
static GLOBAL: thread_alloc::Counting = thread_alloc::Counting;

/// Ceilings from the measured counts (reqwest 0.12, hyper 1): building a
/// one-message request takes 4 (the shared body, the message list, the
/// message's block list, the text); a whole call's median was 79 (min 79,
/// max 80), one more than that is allowed for the pool's own variation.
const CEILING_BUILDING: u64 = 4;
const CEILING_CALL: u64 = 80;

const PROMPT: &str = "Summarise this ticket: the export button does nothing";

#[test]
fn plain_text_request_allocations() {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt
        .block_on(MockServer::start(FaultScript::new()))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = AnthropicClient::builder()
        .base_url(server.anthropic_base_url())
        .api_key("sk-ant-test")
        .model("claude-mock")
        .build()
        .unwrap();
    let before = allocations();
    let req = MessagesRequest::user(PROMPT).max_tokens(64);
    let building = allocations() - before;
    drop(req);
    let median = median_per_call(&rt, &mut client, building, || {
        MessagesRequest::user(PROMPT).max_tokens(64)
    });
    assert!(
        building <= CEILING_BUILDING,
        "building took {building} allocations"
    );
    assert!(median <= CEILING_CALL, "a call took {median} allocations");
    drop(server);
}
