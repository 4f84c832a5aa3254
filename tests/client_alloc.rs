//! Heap allocations of a plain text chat call through the client, counted
//! on the calling thread only (the mock server runs on another thread), so
//! the request path's cost is measured, not the server's.
//!
//! The figure is a ceiling that fails when the client's request path gains
//! an allocation; run with `--nocapture` to see the counts.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use llm_resilience::client::{ChatRequest, OpenAiClient};
use llm_resilience::testing::mock_server::{FaultScript, MockServer};

#[path = "support/thread_alloc.rs"]
mod thread_alloc;
use thread_alloc::{allocations, median_per_call};

#[global_allocator]
static GLOBAL: thread_alloc::Counting = thread_alloc::Counting;

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
    let mut client = OpenAiClient::builder(server.base_url())
        .api_key("sk-test")
        .model("mock-model")
        .build()
        .unwrap();
    let before = allocations();
    let req = ChatRequest::user(PROMPT).max_tokens(64);
    let building = allocations() - before;
    drop(req);
    let median = median_per_call(&rt, &mut client, building, || {
        ChatRequest::user(PROMPT).max_tokens(64)
    });
    assert!(building <= 3, "building took {building} allocations");
    // Before the agent fields (tools, parts, extra, …) a call took 73 on
    // this path (reqwest 0.12, hyper 1); encoding straight into one buffer
    // and decoding straight into the public types made it 69. A request
    // must never cost more than before.
    assert!(median <= 73, "a call took {median} allocations");
    drop(server);
}
