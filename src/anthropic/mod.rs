//! Anthropic's Messages API as a `tower::Service`, over reqwest (feature
//! `reqwest`).
//!
//! ```no_run
//! use llm_resilience::anthropic::{AnthropicClient, MessagesRequest};
//! use llm_resilience::breaker::CircuitBreakerLayer;
//! use llm_resilience::retry::RetryLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = AnthropicClient::builder_from_env()? // ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL
//!     .model("claude-sonnet-4-5")
//!     .max_tokens(1024)
//!     .build()?;
//! let agent = ServiceBuilder::new()
//!     .layer(RetryLayer::llm_defaults())
//!     .layer(CircuitBreakerLayer::llm_defaults())
//!     .service(client);
//! let reply = agent
//!     .oneshot(MessagesRequest::user("Say hello").with_system("Be brief."))
//!     .await?;
//! println!("{} ({:?}, {:?})", reply.text(), reply.stop_reason, reply.usage);
//! # Ok(()) }
//! ```
//!
//! # What it speaks
//!
//! `POST {base}/v1/messages` with `x-api-key`, `anthropic-version`
//! (default `2023-06-01`) and optional `anthropic-beta` headers. A
//! [`MessagesRequest`] carries the system prompt (text or cacheable
//! blocks), the messages as [`ContentBlock`]s (text, images by base64 or
//! URL, `tool_use` and `tool_result`), [`Tool`]s and a [`ToolChoice`],
//! `stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata.user_id`,
//! and any other field as an [`extra`](MessagesRequest::extra). The API
//! requires `max_tokens`: the client sends its default
//! ([`DEFAULT_MAX_TOKENS`], settable) unless the request sets one. A
//! [`MessagesResponse`] holds the content blocks (blocks the crate does not
//! model are kept as JSON), `stop_reason`, usage with the prompt-cache
//! counts, the `anthropic-ratelimit-*` state and the `request-id`.
//!
//! # Errors and classification
//!
//! Every failure is an [`AnthropicError`] whose `source()` is an
//! [`HttpError`](crate::classify::HttpError) with the status, the
//! provider's `error.type` and the headers that matter (`retry-after`,
//! `anthropic-ratelimit-*`, `request-id`, `x-should-retry`), so
//! [`LlmClassifier`](crate::classify::LlmClassifier), and with it every
//! layer of the crate, understands it without setup: 529
//! `overloaded_error` and 500 `api_error` are transient, 429
//! `rate_limit_error` transient with the server's wait hint, 400
//! `invalid_request_error` and 413 `request_too_large` bad requests (the
//! breaker does not count them; "prompt is too long" is a context-length
//! error), 401 `authentication_error` and 403 `permission_error`
//! permanent. An `error` event inside a stream is classified like the same
//! error type on a non-2xx response.
//!
//! # Streaming
//!
//! [`AnthropicClient::streaming`] gives a service whose response is a
//! [`MessageStream`] of [`StreamEvent`]s (`message_start`,
//! `content_block_start`, `text_delta`, `input_json_delta`,
//! `thinking_delta`, `content_block_stop`, `message_delta`; `ping` and
//! `message_stop` are handled inside). It answers only once the first event
//! carrying output arrived, so a retry or fallback layer above it acts on
//! every failure before output reaches the caller and on none after. A
//! stream that ends without `message_stop` is an error, never a short
//! success. [`MessageStream::collect_message`] gives the same
//! [`MessagesResponse`] a non-streamed call returns, tool call inputs
//! assembled from their JSON fragments.
//!
//! # Bounds
//!
//! Every wait and every byte an upstream sends is bounded, with the same
//! knobs and defaults as the OpenAI-compatible client: connect (5 s), first
//! byte (10 minutes: a non-streamed message's headers come only once it is
//! generated), total (10 minutes, the SDKs' request timeout), the gap
//! between a stream's complete events and the wait for a body once its
//! headers arrived (60 s), an error body (5 s and 64 KiB; the status and
//! headers are classified even if the body never comes), a 2xx body or
//! whole stream (32 MiB), one server-sent event (4 MiB). A timeout is a
//! transport failure, transient; an oversized answer is
//! [`AnthropicErrorKind::TooLarge`], permanent. Zero is a configuration
//! error; a duration of about 100 years or more means no limit.
//!
//! # Idempotency keys and retry counts
//!
//! As the OpenAI-compatible client, every request carries an
//! `Idempotency-Key`, one per logical request and the same on every attempt
//! the crate's retry layer makes of it, and `x-stainless-retry-count` (the
//! retries taken, `0` first), as the official Anthropic SDKs send it; both
//! on by default, switched off with
//! [`send_idempotency_key`](AnthropicClientBuilder::send_idempotency_key)
//! and [`send_retry_count`](AnthropicClientBuilder::send_retry_count). A
//! caller's own key goes on the request
//! ([`MessagesRequest::idempotency_key`]). The
//! [client module](crate::client#idempotency-keys-and-retry-counts) says
//! what a logical request is and why both are on.
//!
//! # Cloning, cost and secrets
//!
//! The client is an `Arc` inside (clones share the connection pool and
//! configuration) and always ready. A [`MessagesRequest`] is cheap to clone
//! and its JSON body is serialized once and shared by every retry. The API
//! key is a sensitive header, never in `Debug` output; spans carry no
//! prompt, completion or key, and `Debug` of requests, responses, events
//! and errors shows kinds and lengths, never content.
//!
//! # TLS
//!
//! `https://api.anthropic.com` works as is: the `reqwest` feature brings
//! rustls with Mozilla's root certificates (feature `native-tls` for the
//! platform's TLS and root store instead). A private gateway's CA is added
//! with [`add_root_certificate`](AnthropicClientBuilder::add_root_certificate).

mod builder;
mod error;
mod request;
mod response;
mod stream;
mod types;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use tower_service::Service;
use tracing::Instrument;

pub use self::builder::{
    AnthropicClientBuilder, DEFAULT_BASE_URL, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_TOKENS, DEFAULT_MODEL, DEFAULT_VERSION,
};
pub use self::error::{AnthropicError, AnthropicErrorKind, BODY_EXCERPT_LIMIT};
pub use self::request::MessagesRequest;
use self::response::WireMessage;
pub use self::response::{MessagesResponse, Usage};
use self::stream::Limits;
pub use self::stream::{MessageStream, StreamEvent};
pub use self::types::{CacheControl, ContentBlock, ImageSource, Message, Role, Tool, ToolChoice};
use crate::classify::Transport;
use crate::client::body::{read_error_prefix, read_limited, BodyError};
use crate::client::builder::redact_url;
use crate::client::idempotency::AttemptHeaders;
use crate::client::RateLimitHeaders;
use crate::error::ConfigError;

struct Config {
    http: reqwest::Client,
    url: String,
    base_url: String,
    model: Arc<str>,
    max_tokens: u32,
    headers: Vec<(HeaderName, HeaderValue)>,
    has_key: bool,
    first_byte_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    limits: Limits,
    error_body_timeout: Option<Duration>,
    attempt_headers: AttemptHeaders,
}

/// Anthropic's Messages API client; see the [module docs](crate::anthropic).
///
/// `Service<MessagesRequest>` answering [`MessagesResponse`] or
/// [`AnthropicError`]. Always ready (reqwest pools connections without a
/// bound); clones share one connection pool and configuration.
#[derive(Clone)]
pub struct AnthropicClient {
    config: Arc<Config>,
}

impl fmt::Debug for AnthropicClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("AnthropicClient")
            .field("url", &redact_url(&c.url))
            .field("model", &c.model)
            .field("max_tokens", &c.max_tokens)
            .field("api_key", &c.has_key.then_some("<redacted>"))
            .field("connect_timeout", &c.connect_timeout)
            .field("first_byte_timeout", &c.first_byte_timeout)
            .field("total_timeout", &c.total_timeout)
            .field("idle_timeout", &c.limits.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl AnthropicClient {
    /// A client of `https://api.anthropic.com` with this key and the
    /// defaults.
    pub fn new(api_key: impl Into<String>) -> Result<Self, ConfigError> {
        Self::builder().api_key(api_key).build()
    }

    /// A builder with the defaults (`https://api.anthropic.com`, no key).
    pub fn builder() -> AnthropicClientBuilder {
        AnthropicClientBuilder::default()
    }

    /// A builder with the key from `ANTHROPIC_API_KEY` (required; the
    /// error names it) and the base URL from `ANTHROPIC_BASE_URL` when set.
    pub fn builder_from_env() -> Result<AnthropicClientBuilder, ConfigError> {
        AnthropicClientBuilder::from_lookup(|name| std::env::var(name).ok())
    }

    /// A client from `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL`, with the
    /// other defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::builder_from_env()?.build()
    }

    /// The same client, answering with a [`MessageStream`].
    pub fn streaming(&self) -> AnthropicStreamingClient {
        AnthropicStreamingClient {
            config: Arc::clone(&self.config),
        }
    }

    /// The default model.
    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// The base URL requests go to (any `user:password@` redacted).
    pub fn base_url(&self) -> &str {
        &self.config.base_url
    }
}

fn request_id(h: &HeaderMap) -> Option<String> {
    h.get("request-id")
        .or_else(|| h.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends the request and returns a 2xx response, or the typed error (with a
/// bounded read of the error body).
async fn send(
    config: &Config,
    req: &MessagesRequest,
    body: Bytes,
    stream: bool,
) -> Result<reqwest::Response, AnthropicError> {
    let mut rb = config
        .http
        .post(&config.url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(body);
    if stream {
        rb = rb.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
    }
    for (name, value) in &config.headers {
        rb = rb.header(name.clone(), value.clone());
    }
    rb = config.attempt_headers.add(rb, req.idempotency_key_value());
    let sent = rb.send();
    let resp = match config.first_byte_timeout {
        Some(t) => tokio::time::timeout(t, sent)
            .await
            .map_err(|_| AnthropicError::transport(Transport::Timeout, None))?,
        None => sent.await,
    }
    .map_err(AnthropicError::from_reqwest)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = resp.headers().clone();
    // Up to 64 KiB within the error-body timeout: the status and headers
    // classify the error even if the body never completes.
    let body = read_error_prefix(resp, config.error_body_timeout).await;
    tracing::debug!(status = status.as_u16(), "anthropic call failed");
    Err(AnthropicError::status(status.as_u16(), &headers, &body))
}

/// The whole 2xx body, within the size cap (checked as it arrives) and
/// the idle timeout.
async fn read_body(
    mut resp: reqwest::Response,
    config: &Config,
) -> Result<Vec<u8>, AnthropicError> {
    let read = async {
        read_limited(&mut resp, config.limits.max_bytes)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => AnthropicError::too_large(limit),
                BodyError::Read(e) => AnthropicError::from_reqwest(e),
            })
    };
    match config.limits.idle_timeout {
        Some(t) => tokio::time::timeout(t, read)
            .await
            .map_err(|_| AnthropicError::transport(Transport::Timeout, None))?,
        None => read.await,
    }
}

async fn complete(
    config: Arc<Config>,
    req: MessagesRequest,
) -> Result<MessagesResponse, AnthropicError> {
    let body = req.body(&config.model, config.max_tokens, false);
    let resp = send(&config, &req, body, false).await?;
    let rate_limit = RateLimitHeaders::from_headers(resp.headers());
    let request_id = request_id(resp.headers());
    let body = read_body(resp, &config).await?;
    let wire: WireMessage = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(_) => return Err(error_in_200(&body).with_request_id(request_id.as_deref())),
    };
    if !wire.is_message() {
        return Err(error_in_200(&body).with_request_id(request_id.as_deref()));
    }
    Ok(wire.into_response(rate_limit, request_id))
}

/// A 2xx body that is an error object is classified like the same error
/// on a non-2xx response; anything else that is not a message is a decode
/// error.
fn error_in_200(body: &[u8]) -> AnthropicError {
    let is_error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("type").is_some_and(|t| t == "error"));
    if is_error {
        AnthropicError::error_object(body, AnthropicErrorKind::Status)
    } else {
        AnthropicError::decode(body)
    }
}

async fn open_stream(
    config: Arc<Config>,
    req: MessagesRequest,
) -> Result<MessageStream, AnthropicError> {
    let body = req.body(&config.model, config.max_tokens, true);
    let resp = send(&config, &req, body, true).await?;
    let rate_limit = RateLimitHeaders::from_headers(resp.headers());
    let request_id = request_id(resp.headers());
    let stream = MessageStream::new(
        Box::pin(resp.bytes_stream()),
        config.limits,
        rate_limit,
        request_id,
    );
    stream.prime().await
}

/// The response future of [`AnthropicClient`].
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<MessagesResponse, AnthropicError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<MessagesResponse, AnthropicError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<MessagesRequest> for AnthropicClient {
    type Response = MessagesResponse;
    type Error = AnthropicError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AnthropicError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: MessagesRequest) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(
                complete(Arc::clone(&self.config), req)
                    .instrument(tracing::debug_span!("llm_resilience.anthropic")),
            ),
        }
    }
}

/// The streaming face of an [`AnthropicClient`] (from
/// [`AnthropicClient::streaming`]): `Service<MessagesRequest>` answering a
/// [`MessageStream`] once its first output arrived.
#[derive(Clone)]
pub struct AnthropicStreamingClient {
    config: Arc<Config>,
}

impl fmt::Debug for AnthropicStreamingClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnthropicStreamingClient")
            .field(&AnthropicClient {
                config: Arc::clone(&self.config),
            })
            .finish()
    }
}

/// The response future of [`AnthropicStreamingClient`].
pub struct StreamFuture {
    inner: Pin<Box<dyn Future<Output = Result<MessageStream, AnthropicError>> + Send>>,
}

impl fmt::Debug for StreamFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamFuture").finish_non_exhaustive()
    }
}

impl Future for StreamFuture {
    type Output = Result<MessageStream, AnthropicError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<MessagesRequest> for AnthropicStreamingClient {
    type Response = MessageStream;
    type Error = AnthropicError;
    type Future = StreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AnthropicError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: MessagesRequest) -> StreamFuture {
        StreamFuture {
            inner: Box::pin(open_stream(Arc::clone(&self.config), req).instrument(
                tracing::debug_span!("llm_resilience.anthropic", stream = true),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<AnthropicClient, ConfigError>) -> &'static str {
        r.unwrap_err().field
    }

    #[test]
    fn bad_config_names_the_field() {
        let b = AnthropicClient::builder;
        assert_eq!(field(b().base_url("ftp://x").build()), "base_url");
        assert_eq!(field(b().base_url("http://").build()), "base_url");
        assert_eq!(field(b().base_url("http://h/?a=1").build()), "base_url");
        assert_eq!(field(b().api_key("bad\nkey").build()), "api_key");
        assert_eq!(field(b().model("").build()), "model");
        assert_eq!(field(b().max_tokens(0).build()), "max_tokens");
        assert_eq!(field(b().version("a\rb").build()), "version");
        assert_eq!(field(b().header("bad name", "v").build()), "header");
        assert_eq!(
            field(b().connect_timeout(Duration::ZERO).build()),
            "connect_timeout"
        );
        assert_eq!(
            field(b().stream_idle_timeout(Duration::ZERO).build()),
            "stream_idle_timeout"
        );
        assert_eq!(field(b().max_body_bytes(0).build()), "max_body_bytes");
        assert_eq!(field(b().max_event_bytes(0).build()), "max_event_bytes");
        assert_eq!(
            field(b().error_body_timeout(Duration::ZERO).build()),
            "error_body_timeout"
        );
        // Huge timeouts mean no limit.
        let c = b()
            .total_timeout(Duration::MAX)
            .first_byte_timeout(Duration::MAX)
            .stream_idle_timeout(Duration::MAX)
            .connect_timeout(Duration::MAX)
            .error_body_timeout(Duration::MAX)
            .build()
            .unwrap();
        assert_eq!(c.config.first_byte_timeout, None);
        assert_eq!(c.config.limits.idle_timeout, None);
        assert_eq!(c.config.error_body_timeout, None);
    }

    #[test]
    fn futures_streams_and_errors_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync + 'static>() {}
        send::<ResponseFuture>();
        send::<StreamFuture>();
        send::<MessageStream>();
        send_sync::<AnthropicClient>();
        send_sync::<AnthropicStreamingClient>();
        send_sync::<MessagesRequest>();
        send_sync::<MessagesResponse>();
        send_sync::<AnthropicError>();
    }

    #[test]
    fn the_endpoint_is_under_v1_once() {
        let c = AnthropicClient::builder().build().unwrap();
        assert_eq!(c.config.url, "https://api.anthropic.com/v1/messages");
        let c = AnthropicClient::builder()
            .base_url("http://127.0.0.1:9/v1/")
            .build()
            .unwrap();
        assert_eq!(c.config.url, "http://127.0.0.1:9/v1/messages");
    }

    #[test]
    fn from_env_names_the_missing_variable_and_reads_the_base_url() {
        let err = AnthropicClientBuilder::from_lookup(|_| None).unwrap_err();
        assert_eq!(err.field, "ANTHROPIC_API_KEY");
        let c = AnthropicClientBuilder::from_lookup(|name| match name {
            "ANTHROPIC_API_KEY" => Some("sk-ant-secret".into()),
            "ANTHROPIC_BASE_URL" => Some("http://127.0.0.1:7".into()),
            _ => None,
        })
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(c.config.url, "http://127.0.0.1:7/v1/messages");
        assert!(c.config.headers[0].1.is_sensitive());
    }

    #[test]
    fn credentials_in_the_base_url_never_show_and_bad_roots_are_refused() {
        let c = AnthropicClient::builder()
            .base_url("http://user:hunter2@127.0.0.1:9")
            .build()
            .unwrap();
        let text = format!("{c:?} {}", c.base_url());
        assert!(!text.contains("hunter2"), "{text}");
        let b = AnthropicClient::builder().base_url("http://user:hunter2@127.0.0.1:9");
        assert!(!format!("{b:?}").contains("hunter2"));
        assert_eq!(
            field(
                AnthropicClient::builder()
                    .add_root_certificate("not a pem")
                    .build()
            ),
            "root_certificate"
        );
        assert_eq!(
            field(
                AnthropicClient::builder()
                    .add_root_certificate("x")
                    .http_client(reqwest::Client::new())
                    .build()
            ),
            "root_certificate"
        );
    }

    #[test]
    fn debug_redacts_the_key() {
        let b = AnthropicClient::builder().api_key("sk-ant-very-secret");
        let builder_text = format!("{b:?}");
        let c = b.build().unwrap();
        let text = format!("{builder_text} {c:?} {:?}", c.streaming());
        assert!(!text.contains("sk-ant-very-secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
