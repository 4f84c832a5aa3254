//! An OpenAI-compatible chat completions client as a `tower::Service`, over
//! reqwest (feature `reqwest`).
//!
//! ```no_run
//! use llm_resilience::client::{ChatRequest, OpenAiClient};
//! use llm_resilience::retry::RetryLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = OpenAiClient::builder("https://api.openai.com/v1")
//!     .api_key(std::env::var("OPENAI_API_KEY")?)
//!     .model("gpt-4o-mini")
//!     .build()?;
//! let agent = ServiceBuilder::new()
//!     .layer(RetryLayer::llm_defaults())
//!     .service(client);
//! let reply = agent.oneshot(ChatRequest::user("Say hello")).await?;
//! println!("{} ({:?})", reply.content(), reply.usage);
//! # Ok(()) }
//! ```
//!
//! # Providers
//!
//! Any server that speaks OpenAI's chat completions API works; what differs
//! is the base URL, how the key is sent, and a few headers or query
//! parameters.
//!
//! **OpenAI.** [`OpenAiClient::from_env`] reads `OPENAI_API_KEY`,
//! `OPENAI_BASE_URL` (default `https://api.openai.com/v1`), `OPENAI_ORG_ID`
//! and `OPENAI_PROJECT_ID`, the variables the OpenAI SDKs read; or set them
//! on the builder:
//!
//! ```no_run
//! # use llm_resilience::client::OpenAiClient;
//! # fn main() -> Result<(), llm_resilience::ConfigError> {
//! let client = OpenAiClient::builder("https://api.openai.com/v1")
//!     .api_key("sk-…")
//!     .organization("org-…") // OpenAI-Organization
//!     .project("proj_…") // OpenAI-Project
//!     .model("gpt-4o-mini")
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! **Azure OpenAI.** The base URL names the deployment, the key goes in an
//! `api-key` header, and every request carries `api-version`:
//!
//! ```no_run
//! # use llm_resilience::client::{Auth, OpenAiClient};
//! # fn main() -> Result<(), llm_resilience::ConfigError> {
//! let client = OpenAiClient::builder(
//!     "https://my-resource.openai.azure.com/openai/deployments/my-gpt-4o",
//! )
//! .auth(Auth::Header("api-key".into()))
//! .api_key("…")
//! .query("api-version", "2024-10-21")
//! .model("gpt-4o") // Azure routes by deployment; the field is still sent
//! .build()?;
//! # Ok(()) }
//! ```
//!
//! **A local server** (vLLM, Ollama, llama.cpp, LM Studio): no key, no auth
//! header. Some of them reject `stream_options`, which the client sends
//! with streamed requests to get usage; turn it off there.
//!
//! ```no_run
//! # use llm_resilience::client::OpenAiClient;
//! # fn main() -> Result<(), llm_resilience::ConfigError> {
//! let ollama = OpenAiClient::builder("http://localhost:11434/v1")
//!     .model("llama3.2")
//!     .stream_include_usage(false)
//!     .build()?;
//! let vllm = OpenAiClient::builder("http://localhost:8000/v1")
//!     .model("Qwen/Qwen2.5-7B-Instruct")
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! Gateways that want their own headers get them with
//! [`header`](OpenAiClientBuilder::header); a field the typed request does
//! not have goes in [`ChatRequest::extra`].
//! A gateway that receives OpenAI's request JSON reads it with serde
//! (`ChatRequest: Deserialize`) without losing anything: a field the typed
//! request does not model, or would not send back exactly, is kept beside
//! it ([`ChatRequest::extra_field`]) and sent as it came.
//!
//! # Tool calls
//!
//! An agent offers tools, runs the calls the model asks for, and sends the
//! answers back; the model's message goes back into the conversation as
//! it came:
//!
//! ```no_run
//! use llm_resilience::client::{ChatRequest, Message, OpenAiClient, Tool};
//! use serde_json::json;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = OpenAiClient::from_env()?;
//! let weather = Tool::function(
//!     "get_weather",
//!     "The current weather in a city",
//!     json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
//! );
//! let mut req = ChatRequest::user("Weather in Paris?").tool(weather);
//! loop {
//!     let reply = client.clone().oneshot(req.clone()).await?;
//!     if reply.tool_calls().is_empty() {
//!         println!("{}", reply.content());
//!         break;
//!     }
//!     req = req.push(reply.message().expect("a choice").clone());
//!     for call in reply.tool_calls() {
//!         // Run the tool with `call.function.arguments` (JSON, unchecked).
//!         req = req.push(Message::tool(call.id.clone(), r#"{"temp_c": 21}"#));
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A streamed answer gives the same [`ChatResponse`] through
//! [`ChatStream::collect`]: text appended per choice, each tool call joined
//! from its pieces (an id and name first, then fragments of the arguments),
//! usage from the last chunk.
//!
//! # TLS
//!
//! `https://` works out of the box: the `reqwest` feature builds reqwest
//! with rustls (the `ring` provider) and Mozilla's root certificates. The
//! `native-tls` feature switches to the platform's TLS and root store
//! (OpenSSL, Schannel, Security.framework). A private CA is trusted with
//! [`OpenAiClientBuilder::add_root_certificate`]. A base URL whose scheme is
//! not `http` or `https`, or that does not parse, is a
//! [`ConfigError`] at `build()`; `user:password@` in it is sent as basic
//! auth by reqwest and never shown by `Debug`.
//!
//! # Errors and classification
//!
//! Every failure is a [`ClientError`] whose `source()` is a
//! [`HttpError`](crate::classify::HttpError) (whose own `source()` is the
//! reqwest or JSON error behind it, when there is one): the status, the provider's
//! error type and code (OpenAI, Anthropic and Gemini body shapes are all
//! read), the headers that matter (`retry-after`, `retry-after-ms`,
//! `x-should-retry`, `x-ratelimit-*`, `anthropic-ratelimit-*`, request ids)
//! and a bounded excerpt of the body. So
//! [`LlmClassifier`](crate::classify::LlmClassifier) and every layer of the
//! crate understand it without setup: a 429 `insufficient_quota` is
//! permanent, a 400 `context_length_exceeded` a bad request, a 529
//! `overloaded_error` transient, and a `retry-after` is honoured. A 2xx
//! whose body is the provider's error object (some gateways answer
//! `200 {"error":{…}}`) is that error, reported with the status it implies
//! (429 for `insufficient_quota`, 400 for `invalid_request_error`, …), so it
//! classifies as it would on that status.
//!
//! # Timeouts and size limits
//!
//! Connect (5 s by default, as the OpenAI and Anthropic SDKs), first byte
//! (time from sending to the response headers, 10 minutes, for streamed and
//! non-streamed calls alike, independent of the total timeout), total (10
//! minutes, the SDKs' request timeout; it bounds reading a stream too, and
//! may be turned off for long streams), the body of an error response (5 s:
//! past it the error is reported with what its status and headers say, a
//! `retry-after` included) and, for streams, the idle gap between complete
//! events (60 s; a keep-alive comment counts, a byte that completes nothing
//! does not). A timeout is a transport failure
//! ([`crate::classify::Transport::Timeout`]), transient.
//!
//! A 2xx body may hold at most 32 MiB and one server-sent event 4 MiB (both
//! knobs); a larger one is a [`ClientErrorKind::BodyTooLarge`] error,
//! permanent, found while the bytes arrive. An error body is read only up to
//! 64 KiB. So whatever a server sends, a call holds bounded memory and ends
//! in bounded time.
//!
//! # Streaming
//!
//! [`OpenAiClient::streaming`] gives a service whose response is a
//! [`ChatStream`]. It answers only once the first chunk arrived, so a
//! retry or fallback layer above it can act on every failure that happens
//! before output reaches the caller, and on none after. A stream that
//! breaks off after that is an error that keeps what arrived, chunks
//! ([`ClientError::partial`]) and the assembled response, tool calls cut
//! short included ([`ClientError::partial_response`]).
//!
//! A [`ChatStream`] carries stream guards: behind a queue built with
//! [`hold_until_stream_end`](crate::queue::QueueLayerBuilder::hold_until_stream_end)
//! it keeps its slot until `[DONE]`, an error or its drop, and behind a
//! breaker built with
//! [`record_at_stream_end`](crate::breaker::CircuitBreakerLayerBuilder::record_at_stream_end)
//! a break mid-stream counts as a failure ([`crate::guard`]).
//!
//! # Responses
//!
//! A [`ChatResponse`] has every choice (for `n > 1`) with its message (text,
//! which may be absent, tool calls, refusal) and finish reason; usage with
//! cached-prompt and reasoning tokens when the provider reports them; `id`,
//! `model`, `system_fingerprint`; the rate-limit headers; and the raw body
//! ([`ChatResponse::raw_json`]) for what the typed view does not cover.
//! Fields that providers send as `null` are read as absent, never
//! rejected.
//!
//! # Idempotency keys and retry counts
//!
//! Every request carries an `Idempotency-Key` ([`IDEMPOTENCY_KEY_HEADER`])
//! and the retries taken before it, `0` on the first attempt
//! ([`RETRY_COUNT_HEADER`], `x-stainless-retry-count`). Under the crate's
//! [`RetryLayer`](crate::retry::RetryLayer) the key is one per logical
//! request, the same on every attempt (the retry layer tells the client
//! which attempt it sends; see [`retry::attempt`](crate::retry::attempt)),
//! so a server that deduplicates (a gateway, a proxy with a response
//! cache) answers a retry of a completion it already ran without running
//! it again. The key is a random UUID (v4) from a cryptographically secure
//! generator: unguessable, and unique per logical request.
//!
//! A logical request is one call of the retry layer's service. Without a
//! retry layer, each call of the client is one, and a caller that retries
//! by hand makes a new one each time (count `0`, a new key), as calling an
//! OpenAI SDK's `create` again does. To have the server see one request
//! across hand-made retries (or to forward a key a gateway received), set
//! it on the request: [`ChatRequest::idempotency_key`].
//!
//! Both are on by default. The retry count is what the official OpenAI and
//! Anthropic SDKs send on every request, under the same name and with the
//! same meaning. Those SDKs also keep one idempotency key per logical
//! request across their retries, but attach it only for APIs that
//! deduplicate on it, which OpenAI's and Anthropic's own do not; this
//! client sends it because it fronts gateways and self-hosted servers as
//! often as those APIs, and a server that does not deduplicate ignores it
//! (a server can only match a retry to a first attempt that carried the
//! key, so it goes on every attempt, the first included). Turn either off
//! with [`send_idempotency_key`](OpenAiClientBuilder::send_idempotency_key)
//! and [`send_retry_count`](OpenAiClientBuilder::send_retry_count); a
//! [`header`](OpenAiClientBuilder::header) of the same name replaces the
//! client's. Neither costs an allocation per call: key texts are cut from
//! a per-thread buffer shared by a hundred keys, counts up to 9 are static.
//!
//! # Cloning and cost
//!
//! The client is an `Arc` inside (clone it freely; every clone shares the
//! connection pool). [`ChatRequest`] is cheap to clone and its JSON body is
//! serialized once and shared by retries. The API key is sent as a
//! sensitive header and never appears in `Debug` output or logs.

mod assemble;
pub(crate) mod body;
pub(crate) mod builder;
mod error;
pub(crate) use error::http_view_of_inner_http;
pub(crate) mod idempotency;
pub(crate) mod sse;
mod stream;
pub(crate) mod transport;
mod types;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use tower_service::Service;
use tracing::Instrument;

pub use self::builder::{
    Auth, OpenAiClientBuilder, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_EVENT_BYTES,
};
pub(crate) use self::error::REQWEST_VIEW;
pub use self::error::{ClientError, ClientErrorKind, BODY_EXCERPT_LIMIT};
use self::idempotency::AttemptHeaders;
pub use self::idempotency::{IDEMPOTENCY_KEY_HEADER, RETRY_COUNT_HEADER};
pub use self::stream::ChatStream;
use self::types::EncodeOptions;
pub use self::types::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, Content, ContentPart, FunctionCall,
    ImageUrl, Message, RateLimitHeaders, ResponseFormat, Role, Tool, ToolCall, ToolCallDelta,
    ToolChoice, Usage,
};
use crate::classify::Transport;
use crate::error::ConfigError;

struct Config {
    http: reqwest::Client,
    url: String,
    base_url: String,
    model: Arc<str>,
    /// The auth header (sensitive) and the user's default headers.
    headers: HeaderMap,
    has_key: bool,
    include_usage: bool,
    first_byte_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    error_body_timeout: Option<Duration>,
    max_body_bytes: usize,
    max_event_bytes: usize,
    attempt_headers: AttemptHeaders,
}

/// An OpenAI-compatible chat completions client; see the
/// [module docs](crate::client).
///
/// `Service<ChatRequest>` answering [`ChatResponse`] or [`ClientError`].
/// Always ready (reqwest pools connections without a bound); clones share
/// one connection pool and configuration.
#[derive(Clone)]
pub struct OpenAiClient {
    config: Arc<Config>,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("OpenAiClient")
            .field("base_url", &c.base_url)
            .field("model", &c.model)
            .field("api_key", &c.has_key.then_some("<redacted>"))
            .field("headers", &c.headers.len())
            .field("include_usage", &c.include_usage)
            .field("connect_timeout", &c.connect_timeout)
            .field("first_byte_timeout", &c.first_byte_timeout)
            .field("total_timeout", &c.total_timeout)
            .field("idle_timeout", &c.idle_timeout)
            .field("error_body_timeout", &c.error_body_timeout)
            .field("max_body_bytes", &c.max_body_bytes)
            .field("max_event_bytes", &c.max_event_bytes)
            .field("send_idempotency_key", &c.attempt_headers.key)
            .field("send_retry_count", &c.attempt_headers.retry_count)
            .finish()
    }
}

impl OpenAiClient {
    /// A client for `base_url` (e.g. `https://api.openai.com/v1`) with an
    /// API key and the default model `gpt-4o-mini`.
    pub fn new(
        base_url: impl Into<String>,
        api_key: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        Self::builder(base_url).api_key(api_key).build()
    }

    /// A builder for a client of `base_url`.
    pub fn builder(base_url: impl Into<String>) -> OpenAiClientBuilder {
        OpenAiClientBuilder::new(base_url.into())
    }

    /// A client configured from the environment: `OPENAI_API_KEY`
    /// (required), `OPENAI_BASE_URL` (default `https://api.openai.com/v1`),
    /// `OPENAI_ORG_ID` and `OPENAI_PROJECT_ID` (optional), as the OpenAI
    /// SDKs read them. A missing or unusable variable is a [`ConfigError`]
    /// that names it.
    pub fn from_env() -> Result<Self, ConfigError> {
        OpenAiClientBuilder::from_env()?.build()
    }

    /// The same client, answering with a [`ChatStream`].
    pub fn streaming(&self) -> StreamingClient {
        StreamingClient {
            config: Arc::clone(&self.config),
        }
    }

    /// The default model.
    pub fn model(&self) -> &str {
        &self.config.model
    }
}

fn request_id(h: &HeaderMap) -> Option<String> {
    h.get("x-request-id")
        .or_else(|| h.get("request-id"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends the request and returns a 2xx response, or the typed error (with a
/// bounded read of the error body).
async fn send(
    config: &Config,
    req: &ChatRequest,
    stream: bool,
) -> Result<reqwest::Response, ClientError> {
    let body = req.body(EncodeOptions {
        default_model: &config.model,
        stream,
        include_usage: config.include_usage,
    });
    let mut rb = config
        .http
        .post(&config.url)
        .header(CONTENT_TYPE, "application/json")
        .body(body);
    if stream {
        rb = rb.header(ACCEPT, "text/event-stream");
    }
    for (name, value) in &config.headers {
        rb = rb.header(name, value.clone());
    }
    rb = config.attempt_headers.add(rb, req.idempotency_key_value());
    let sent = rb.send();
    // Armed when the request is sent; it bounds the wait for the headers
    // whatever the total timeout (which may be off for long streams).
    let resp = match config.first_byte_timeout {
        Some(t) => tokio::time::timeout(t, sent)
            .await
            .map_err(|_| ClientError::transport(Transport::Timeout, None))?,
        None => sent.await,
    }
    .map_err(ClientError::from_reqwest)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = resp.headers().clone();
    // A short wait for the error body: the status and headers (a
    // `retry-after`) already say what to do.
    let body = body::read_error_prefix(resp, config.error_body_timeout).await;
    Err(ClientError::status(status.as_u16(), &headers, &body))
}

async fn complete(config: Arc<Config>, req: ChatRequest) -> Result<ChatResponse, ClientError> {
    let mut resp = send(&config, &req, false).await?;
    let status = resp.status().as_u16();
    let body = body::read_limited(&mut resp, config.max_body_bytes)
        .await
        .map_err(|e| match e {
            body::BodyError::TooLarge { limit } => {
                ClientError::too_large(status, body::TooLarge(limit))
            }
            body::BodyError::Read(e) => ClientError::from_reqwest(e),
        })?;
    let headers = resp.headers();
    // Kept as the response's raw body without a copy.
    let body = bytes::Bytes::from(body);
    let mut response = error::decode_completion(headers, &body)?;
    response.rate_limit = RateLimitHeaders::from_headers(headers);
    response.request_id = request_id(headers);
    Ok(response)
}

async fn open_stream(config: Arc<Config>, req: ChatRequest) -> Result<ChatStream, ClientError> {
    let resp = send(&config, &req, true).await?;
    let rate_limit = RateLimitHeaders::from_headers(resp.headers());
    let request_id = request_id(resp.headers());
    let stream = ChatStream::new(
        Box::pin(resp.bytes_stream()),
        config.idle_timeout,
        config.max_event_bytes,
        rate_limit,
        request_id,
    );
    stream.prime().await
}

/// The response future of [`OpenAiClient`].
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<ChatResponse, ClientError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<ChatResponse, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<ChatRequest> for OpenAiClient {
    type Response = ChatResponse;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(
                complete(Arc::clone(&self.config), req)
                    .instrument(tracing::debug_span!("llm_resilience.client")),
            ),
        }
    }
}

/// The streaming face of an [`OpenAiClient`] (from
/// [`OpenAiClient::streaming`]): `Service<ChatRequest>` answering a
/// [`ChatStream`] once its first chunk arrived.
#[derive(Clone)]
pub struct StreamingClient {
    config: Arc<Config>,
}

impl fmt::Debug for StreamingClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StreamingClient")
            .field(&OpenAiClient {
                config: Arc::clone(&self.config),
            })
            .finish()
    }
}

/// The response future of [`StreamingClient`].
pub struct StreamFuture {
    inner: Pin<Box<dyn Future<Output = Result<ChatStream, ClientError>> + Send>>,
}

impl fmt::Debug for StreamFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamFuture").finish_non_exhaustive()
    }
}

impl Future for StreamFuture {
    type Output = Result<ChatStream, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<ChatRequest> for StreamingClient {
    type Response = ChatStream;
    type Error = ClientError;
    type Future = StreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> StreamFuture {
        StreamFuture {
            inner: Box::pin(
                open_stream(Arc::clone(&self.config), req)
                    .instrument(tracing::debug_span!("llm_resilience.client", stream = true)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_names_the_field() {
        assert_eq!(
            OpenAiClient::new("ftp://x", "k").unwrap_err().field,
            "base_url"
        );
        assert_eq!(
            OpenAiClient::new("http://localhost", "bad\nkey")
                .unwrap_err()
                .field,
            "api_key"
        );
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .connect_timeout(Duration::ZERO)
                .build()
                .unwrap_err()
                .field,
            "connect_timeout"
        );
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .model("")
                .build()
                .unwrap_err()
                .field,
            "model"
        );
    }

    #[test]
    fn debug_redacts_the_key() {
        let c = OpenAiClient::new("http://localhost:1/v1", "sk-very-secret").unwrap();
        let text = format!("{c:?} {:?}", c.streaming());
        assert!(!text.contains("sk-very-secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
