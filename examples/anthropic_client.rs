//! The Anthropic client under the retry layer and a circuit breaker: a
//! tool-use round trip, then a streamed answer.
//!
//! ```text
//! cargo run --example anthropic_client --features reqwest,testing
//! ANTHROPIC_API_KEY=sk-ant-… ANTHROPIC_MODEL=claude-sonnet-4-5 \
//!     cargo run --example anthropic_client --features reqwest,testing
//! ```
//!
//! Without `ANTHROPIC_API_KEY` it starts the crate's mock LLM server in
//! process (its Messages API), scripted to be overloaded and to throttle now
//! and then, and reports what the server saw. (For `https://` endpoints,
//! enable a TLS feature of reqwest in your own build; see the `anthropic`
//! module docs.)

#[cfg(all(feature = "reqwest", feature = "testing"))]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::time::Duration;

    use futures::StreamExt;
    use llm_resilience::anthropic::{
        AnthropicClient, ContentBlock, Message, MessagesRequest, Role, StreamEvent, Tool,
    };
    use llm_resilience::breaker::CircuitBreakerLayer;
    use llm_resilience::retry::{RetryEvent, RetryLayer};
    use llm_resilience::testing::mock_server::{ErrorReply, FaultScript, MockFault, MockServer};
    use serde_json::json;
    use tower::{ServiceBuilder, ServiceExt};

    let (builder, server) = match AnthropicClient::builder_from_env() {
        Ok(b) => (
            b.model(
                std::env::var("ANTHROPIC_MODEL").unwrap_or_else(|_| "claude-sonnet-4-5".into()),
            ),
            None,
        ),
        Err(_) => {
            let server = MockServer::start(
                FaultScript::new()
                    .seed(2026)
                    .then(MockFault::overloaded())
                    .then(MockFault::Error(
                        ErrorReply::anthropic(429, "rate_limit_error", "slow down")
                            .header("retry-after", "0.3"),
                    ))
                    .rate(MockFault::overloaded(), 0.1)
                    .require_api_key("sk-ant-mock"),
            )
            .await?;
            println!("mock Messages API on {}", server.anthropic_base_url());
            let b = AnthropicClient::builder()
                .base_url(server.anthropic_base_url())
                .api_key("sk-ant-mock")
                .model("claude-mock");
            (b, Some(server))
        }
    };
    let client = builder.max_tokens(512).build()?;
    println!("{client:?}"); // the key shows as <redacted>

    let retry = || {
        RetryLayer::builder()
            .max_attempts(4)
            .deadline(Duration::from_secs(60))
            .on_event(|e: &RetryEvent| {
                println!(
                    "  retry: {:?} after attempt {} ({}), delay {:?}",
                    e.kind, e.attempt, e.reason, e.delay
                )
            })
            .build()
    };
    let agent = ServiceBuilder::new()
        .layer(retry()?)
        .layer(CircuitBreakerLayer::llm_defaults())
        .service(client.clone());

    // A tool-use round trip: the model asks for the tool, we answer it.
    let weather = Tool::new(
        "get_weather",
        "Current weather of a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    );
    let question = MessagesRequest::user("What is the weather in Paris?")
        .with_system("Answer in one sentence.")
        .tool(weather);
    let first = agent.clone().oneshot(question.clone()).await?;
    println!(
        "stop {:?}, tool calls {:?}",
        first.stop_reason,
        first
            .tool_uses()
            .map(|(_, name, _)| name)
            .collect::<Vec<_>>()
    );
    let answers: Vec<ContentBlock> = first
        .tool_uses()
        .map(|(id, _, _)| ContentBlock::tool_result(id, "18C and sunny"))
        .collect();
    if !answers.is_empty() {
        let follow_up = question
            .push(Message::new(Role::Assistant, first.content.clone()))
            .push(Message::tool_results(answers));
        let reply = agent.clone().oneshot(follow_up).await?;
        println!(
            "reply: {} chars, stop {:?}, usage {:?}",
            reply.text().len(),
            reply.stop_reason,
            reply.usage
        );
    }

    // Streaming through a retry layer: failures before the first output are
    // retried, failures after it are typed errors with the partial message.
    let streaming = ServiceBuilder::new()
        .layer(retry()?)
        .service(client.streaming());
    match streaming
        .oneshot(MessagesRequest::user("Stream a short answer"))
        .await
    {
        Ok(mut stream) => {
            let mut deltas = 0;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(StreamEvent::TextDelta { .. }) => deltas += 1,
                    Ok(_) => {}
                    Err(e) => {
                        println!("stream broke: {e} ({} chars kept)", e.partial_text().len());
                        break;
                    }
                }
            }
            println!(
                "streamed {deltas} text deltas, usage {:?}",
                stream.message().usage
            );
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
    eprintln!("run with: cargo run --example anthropic_client --features reqwest,testing");
}
