//! An OpenAI-compatible gateway: an axum router that sends every chat
//! completion through an [`AgentPipeline`], so that any OpenAI SDK pointed
//! at it gets the pipeline's queueing, retries, circuit breakers and
//! fallback between providers (features `axum` and `config`).
//!
//! ```no_run
//! use llm_resilience::axum::gateway::Gateway;
//! use llm_resilience::pipeline::PipelineConfig;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PipelineConfig::from_file("examples/gateway.toml")?;
//! let gateway = Gateway::from_config(&config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! gateway.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! # Routes
//!
//! - `POST /v1/chat/completions`: OpenAI's request body, read losslessly
//!   into a [`ChatRequest`] (every field it does not model is sent on as it
//!   came). The `model` the caller names is replaced by each target's
//!   configured model: the config decides what is served, as in LiteLLM's
//!   model groups. Without `"stream": true` the answer is the target's
//!   body as it came; with it, server-sent events in OpenAI's shape.
//! - `GET /healthz`: JSON with the queue's depth and each target's breaker
//!   state; 200 while some target takes calls, 503 when every breaker is
//!   open.
//! - `GET /metrics`: the Prometheus text the installed renderer gives
//!   ([`Gateway::metrics`]), which holds what the layers emit with the
//!   crate's `metrics` feature; 404 without a renderer.
//!
//! # Errors
//!
//! A failed call answers as the crate's axum integration maps it
//! ([`ErrorMapping`], changeable with [`Gateway::error_mapping`]): 429 with
//! `Retry-After` for throttling that outlasted the retries, 503 with
//! `Retry-After` for open circuits and a full queue, 504 for deadlines, 400
//! for a request the provider rejected, in OpenAI's error shape, so the
//! SDKs raise their typed exceptions and honour the wait. A body that is
//! not a JSON object is a 400 `invalid_request_error`; with
//! [`Gateway::require_api_key`], a missing or wrong key a 401.
//!
//! # Streaming
//!
//! A streamed call is retried or failed over only until its first chunk
//! arrived (the client answers only then); after that the chunks are
//! forwarded as they come, and a failure ends the caller's stream with one
//! OpenAI-style error event, `data: {"error": {…}}`, in place of
//! `data: [DONE]`: never a silent truncation. The chunks are re-encoded
//! from the client's typed view: text, refusals, roles, tool-call pieces,
//! finish reasons and usage are forwarded, `logprobs` are not. A failure
//! after the first chunk is not seen by the target's breaker.

mod client;
mod sse;

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use tower_service::Service;

pub use self::client::{GatewayClient, Reply, ReplyFuture};
use super::{ErrorMapping, ErrorResponse};
use crate::breaker::State as BreakerState;
use crate::classify::Reason;
use crate::client::{ChatRequest, DEFAULT_MAX_BODY_BYTES};
use crate::guard::AtStreamEnd;
use crate::pipeline::{AgentPipeline, ConfigFileError, PipelineConfig};

/// The pipeline a gateway sends requests through: a streamed answer keeps
/// its queue slot until its stream ends, and a break mid-stream counts
/// against the target's breaker
/// ([`hold_until_stream_end`](crate::pipeline::AgentPipelineBuilder::hold_until_stream_end)).
pub type GatewayPipeline = AgentPipeline<GatewayClient, ChatRequest, Reply, AtStreamEnd>;

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The gateway; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    pipeline: GatewayPipeline,
    mapping: ErrorMapping,
    metrics: Option<Render>,
    api_key: Option<Arc<str>>,
    max_request_bytes: usize,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("pipeline", &self.pipeline)
            .field("metrics", &self.metrics.is_some())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_request_bytes", &self.max_request_bytes)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `pipeline`.
    pub fn new(pipeline: GatewayPipeline) -> Self {
        Gateway {
            pipeline,
            mapping: ErrorMapping::default(),
            metrics: None,
            api_key: None,
            max_request_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// A gateway over the pipeline `config` describes.
    pub fn from_config(config: &PipelineConfig) -> Result<Self, ConfigFileError> {
        Ok(Self::new(config.build_streaming_with(GatewayClient::new)?))
    }

    /// The pipeline (its queue and breakers).
    pub fn pipeline(&self) -> &GatewayPipeline {
        &self.pipeline
    }

    /// How errors answer (default: [`ErrorMapping::default`]).
    pub fn error_mapping(mut self, mapping: ErrorMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// What `GET /metrics` answers: the Prometheus text `render` gives
    /// (for example `metrics_exporter_prometheus`'s
    /// `PrometheusHandle::render`).
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Requires `Authorization: Bearer <key>` on chat requests (none by
    /// default). The key is compared in constant time and never logged.
    pub fn require_api_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The largest request body accepted (default
    /// [`DEFAULT_MAX_BODY_BYTES`], 32 MiB: images as data URLs are large);
    /// a larger one is answered 413.
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    /// The router: `POST /v1/chat/completions`, `GET /healthz`,
    /// `GET /metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(self.max_request_bytes))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then stops taking
    /// connections, lets the requests in progress finish, and closes the
    /// queue.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let queue = self.pipeline.queue().clone();
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        queue.close();
        served
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        constant_time_eq(given, key.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An answer the gateway itself gives, in OpenAI's error shape.
fn own_error(
    status: StatusCode,
    code: &'static str,
    reason: Reason,
    message: &'static str,
) -> Response {
    ErrorResponse {
        status,
        retry_after: None,
        error_type: "invalid_request_error".into(),
        code: code.into(),
        reason: reason.as_str().into(),
        message: message.into(),
        param: None,
        kind: code,
    }
    .into_response()
}

/// Reads the caller's body: a JSON object, the `model` left to the targets.
fn read_request(body: &[u8]) -> Option<ChatRequest> {
    let mut map: Map<String, Value> = serde_json::from_slice(body).ok()?;
    map.remove("model");
    serde_json::from_value(Value::Object(map)).ok()
}

async fn chat_completions(State(gw): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    if !gw.authorized(&headers) {
        return own_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            Reason::Auth,
            "the API key is missing or wrong",
        );
    }
    let Some(req) = read_request(&body) else {
        return own_error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            Reason::InvalidRequest,
            "the body is not a chat completion request (a JSON object)",
        );
    };
    let mut pipeline = gw.pipeline.clone();
    let answer = match futures::future::poll_fn(|cx| pipeline.poll_ready(cx)).await {
        Ok(()) => pipeline.call(req).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Reply::Stream(stream)) => sse::stream_response(*stream),
        Ok(Reply::Complete(resp)) => {
            let body = if resp.raw_body().is_empty() {
                // Collected or built (a degraded answer): its typed view.
                serde_json::to_vec(&resp).unwrap_or_default()
            } else {
                resp.raw_body().to_vec()
            };
            let mut out = Response::new(Body::from(body));
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            out
        }
        Err(err) => gw.mapping.respond(&err).into_response(),
    }
}

fn takes_calls(state: BreakerState) -> bool {
    !matches!(state, BreakerState::Open | BreakerState::ForcedOpen)
}

async fn healthz(State(gw): State<Gateway>) -> Response {
    let queue = gw.pipeline.queue();
    let targets: Vec<Value> = gw
        .pipeline
        .breakers()
        .map(|(name, breaker)| {
            let state = breaker.state();
            json!({"name": name, "breaker": state.as_str(), "takes_calls": takes_calls(state)})
        })
        .collect();
    let up = gw.pipeline.breakers().any(|(_, b)| takes_calls(b.state())) && !queue.is_closed();
    let body = json!({
        "status": if up { "ok" } else { "unavailable" },
        "queue": {
            "depth": queue.depth(),
            "in_flight": queue.in_flight(),
            "capacity": queue.capacity(),
            "concurrency": queue.concurrency(),
        },
        "targets": targets,
    });
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    match &gw.metrics {
        Some(render) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"sk-1", b"sk-1"));
        assert!(!constant_time_eq(b"sk-1", b"sk-2"));
        assert!(!constant_time_eq(b"sk-", b"sk-1"));
    }

    #[test]
    fn the_callers_model_is_left_to_the_targets() {
        let req = read_request(br#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
        assert_eq!(req.model_name(), None);
        assert!(client::wants_stream(&req));
        assert!(read_request(b"[1]").is_none());
        assert!(read_request(b"{").is_none());
    }
}
