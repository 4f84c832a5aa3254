//! The OpenAI-compatible client wrapped in the retry layer.
//!
//! ```text
//! cargo run --example openai_client --features reqwest,testing
//! OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-… OPENAI_MODEL=gpt-4o-mini \
//!     cargo run --example openai_client --features reqwest,testing
//! ```
//!
//! Without `OPENAI_BASE_URL` it starts the crate's mock LLM server in
//! process, scripted to throttle and fail now and then, and reports what the
//! server saw. `https://` endpoints work as they are (rustls); feature
//! `native-tls` uses the platform's TLS instead.

#[cfg(all(feature = "reqwest", feature = "testing"))]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::time::Duration;

    use futures::StreamExt;
    use llm_resilience::client::{ChatRequest, OpenAiClient};
    use llm_resilience::retry::{RetryEvent, RetryLayer};
    use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer};
    use tower::{Layer, ServiceExt};

    let (base_url, api_key, model, server) = match std::env::var("OPENAI_BASE_URL") {
        Ok(url) => (
            url,
            std::env::var("OPENAI_API_KEY").unwrap_or_default(),
            std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into()),
            None,
        ),
        Err(_) => {
            let server = MockServer::start(
                FaultScript::new()
                    .seed(2026)
                    .then(MockFault::rate_limited(Some(Duration::from_millis(300))))
                    .then(MockFault::server_error(503))
                    .rate(MockFault::overloaded(), 0.1)
                    .rate(
                        MockFault::rate_limited(Some(Duration::from_millis(200))),
                        0.1,
                    )
                    .require_api_key("sk-mock"),
            )
            .await?;
            println!("mock LLM server on {}", server.base_url());
            (
                server.base_url(),
                "sk-mock".to_owned(),
                "mock-model".to_owned(),
                Some(server),
            )
        }
    };

    let client = OpenAiClient::builder(&base_url)
        .api_key(api_key)
        .model(model)
        .first_byte_timeout(Duration::from_secs(30))
        .build()?;
    println!("{client:?}"); // the key shows as <redacted>

    let retry = RetryLayer::builder()
        .max_attempts(4)
        .deadline(Duration::from_secs(60))
        .on_event(|e: &RetryEvent| {
            println!(
                "  retry: {:?} after attempt {} ({}), delay {:?}",
                e.kind, e.attempt, e.reason, e.delay
            )
        })
        .build()?;
    let agent = retry.layer(client.clone());

    for question in [
        "What is a retry budget?",
        "Why jitter?",
        "What is a circuit breaker?",
    ] {
        let req = ChatRequest::user(question).max_tokens(64);
        match agent.clone().oneshot(req).await {
            Ok(reply) => println!(
                "reply: {} chars, finish {:?}, usage {:?}, remaining requests {:?}",
                reply.content().len(),
                reply.finish_reason(),
                reply.usage,
                reply.rate_limit.remaining_requests
            ),
            Err(e) => println!("failed: {e}"),
        }
    }

    // Streaming through the same retry layer: failures before the first
    // chunk are retried, failures after it are typed errors with the
    // partial output.
    let streaming = RetryLayer::llm_defaults().layer(client.streaming());
    match streaming
        .oneshot(ChatRequest::user("Stream a short answer"))
        .await
    {
        Ok(mut stream) => {
            let mut chunks = 0;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(_) => chunks += 1,
                    Err(e) => {
                        println!("stream broke after {} chunks: {e}", e.partial().len());
                        break;
                    }
                }
            }
            println!("streamed {chunks} chunks, usage {:?}", stream.usage());
        }
        Err(e) => println!("stream failed before output: {e}"),
    }

    if let Some(server) = server {
        let stats = server.stats();
        println!(
            "upstream saw {} requests: {:?}",
            stats.total,
            stats.nonzero()
        );
    }
    Ok(())
}

#[cfg(not(all(feature = "reqwest", feature = "testing")))]
fn main() {
    eprintln!("run with: cargo run --example openai_client --features reqwest,testing");
}
