//! async-openai's client behind llm-resilience's retry and circuit breaker,
//! through `tower::service_fn`, with its errors made classifiable.
//!
//! ```text
//! cargo run -p llm-resilience-async-openai-example
//! ```
//!
//! It starts the crate's mock LLM server in process, scripted to throttle,
//! fail with a 503, and refuse a wrong key, and prints what happened. Point
//! `OpenAIConfig::with_api_base` at a real endpoint to use it for real.
//!
//! The only glue is [`classifiable`]: async-openai's error becomes the
//! crate's `HttpError` (status, the provider's error type and code), which
//! `LlmClassifier` (the default of every layer) understands.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{CreateChatCompletionRequest, CreateChatCompletionRequestArgs};
use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::classify::{HttpError, LlmClassifier, Transport};
use llm_resilience::retry::{RetryEvent, RetryLayer};
use llm_resilience::testing::mock_server::{FaultScript, MockFault, MockServer, Served};
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// async-openai's error as the crate's `HttpError`: an API error keeps its
/// status, type, code and message (the message is kept for the caller,
/// never logged by the crate); a transport failure says which one.
/// (async-openai does not hand out the response headers, so a
/// `retry-after` hint cannot be read through it; the retry layer's backoff
/// applies instead.)
fn classifiable(e: OpenAIError) -> HttpError {
    match e {
        OpenAIError::ApiError(r) => {
            let mut http = HttpError::new(r.status_code.as_u16()).with_message(r.api_error.message);
            if let Some(t) = r.api_error.r#type {
                http = http.with_error_type(t);
            }
            if let Some(c) = r.api_error.code {
                http = http.with_error_code(c);
            }
            http
        }
        OpenAIError::Reqwest(r) => match r.status() {
            Some(s) => HttpError::new(s.as_u16()),
            None if r.is_timeout() => HttpError::transport(Transport::Timeout),
            None if r.is_connect() => HttpError::transport(Transport::Connect),
            None => HttpError::transport(Transport::Reset),
        },
        // A body that is not a completion, a broken stream.
        OpenAIError::JSONDeserialize(..) | OpenAIError::StreamError(_) => {
            HttpError::transport(Transport::Reset)
        }
        // Invalid arguments and the like: the request is wrong.
        other => HttpError::new(400).with_message(other.to_string()),
    }
}

fn question(text: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("mock-model")
        .max_completion_tokens(64u32)
        .messages([async_openai::types::chat::ChatCompletionRequestUserMessage::from(text).into()])
        .build()
        .expect("a valid request")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = MockServer::start(
        FaultScript::new()
            .then(MockFault::rate_limited(Some(Duration::from_millis(200))))
            .then(MockFault::server_error(503))
            .require_api_key("sk-mock"),
    )
    .await?;
    println!("mock LLM server on {}", server.base_url());

    // async-openai retries 429s and 5xx itself (three retries by default);
    // under the crate's retry layer that would multiply the attempts (4 x 4).
    // Its plain transport leaves every retry decision to the layers.
    let openai = |key: &str| {
        async_openai::Client::with_config(
            OpenAIConfig::new()
                .with_api_base(server.base_url())
                .with_api_key(key),
        )
        .with_http_service(async_openai::middleware::ReqwestService::default())
    };

    // The whole adapter: a service_fn over the user's own client.
    let client = openai("sk-mock");
    let upstream = service_fn(move |req: CreateChatCompletionRequest| {
        let client = client.clone();
        async move { client.chat().create(req).await.map_err(classifiable) }
    });
    let retry = RetryLayer::builder()
        .max_attempts(4)
        .on_event(|e: &RetryEvent| {
            println!(
                "  retry: {:?} after attempt {} ({})",
                e.kind, e.attempt, e.reason
            )
        })
        .build()?;
    let agent = ServiceBuilder::new()
        .layer(retry)
        .layer(CircuitBreakerLayer::llm_defaults())
        .service(upstream);

    // A 429 and a 503 first: retried, then answered.
    let reply = agent
        .clone()
        .oneshot(question("What is a retry budget?"))
        .await?;
    let text = reply.choices[0].message.content.as_deref().unwrap_or("");
    println!(
        "answer of {} bytes after {} requests",
        text.len(),
        server.total()
    );
    assert_eq!(server.total(), 3, "429, 503, then the answer");
    assert_eq!(server.stats().get(Served::Ok), 1);

    // A wrong key: permanent, sent once, never retried.
    let wrong = openai("sk-wrong");
    let before = server.total();
    let upstream = service_fn(move |req: CreateChatCompletionRequest| {
        let client = wrong.clone();
        async move { client.chat().create(req).await.map_err(classifiable) }
    });
    let err = ServiceBuilder::new()
        .layer(RetryLayer::llm_defaults())
        .service(upstream)
        .oneshot(question("hi"))
        .await
        .unwrap_err();
    let outcome = LlmClassifier::new().classify_error(&err);
    println!(
        "wrong key: {err} -> {outcome:?}, sent {} time(s)",
        server.total() - before
    );
    assert_eq!(server.total() - before, 1);
    Ok(())
}
