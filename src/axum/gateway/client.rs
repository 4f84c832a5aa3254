//! The gateway's per-target client: one service that answers a request
//! whole or streamed, as the caller asked, so that both kinds share one
//! pipeline (one queue, one breaker per target).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde_json::Value;
use tower_service::Service;

use crate::client::{
    ChatRequest, ChatResponse, ChatStream, ClientError, OpenAiClient, ResponseFuture, StreamFuture,
    StreamingClient,
};
use crate::guard::{GuardedResponse, StreamEnd, StreamGuard};
use crate::ratelimit::{ReportsUsage, ServerDimension, ServerLimits};

/// What a target answered: a whole completion, or a stream whose first
/// chunk has arrived.
///
/// The stream is boxed (one allocation per stream, which lives long); the
/// whole answer is not, so a whole call costs no allocation more than the
/// client's own.
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// A whole completion (`"stream"` absent or `false`).
    Complete(ChatResponse),
    /// A stream (`"stream": true`), handed out once its first chunk
    /// arrived: a failure before it is an error of the call (retried or
    /// failed over), one after it an item of the stream.
    Stream(Box<ChatStream>),
}

impl ReportsUsage for Reply {
    fn tokens_used(&self) -> Option<u64> {
        match self {
            Reply::Complete(r) => r.tokens_used(),
            // Known only at the stream's end.
            Reply::Stream(_) => None,
        }
    }

    fn server_limits(&self) -> ServerLimits {
        match self {
            Reply::Complete(r) => r.server_limits(),
            Reply::Stream(s) => {
                let h = s.rate_limit();
                ServerLimits {
                    requests: ServerDimension {
                        limit: h.limit_requests,
                        remaining: h.remaining_requests,
                    },
                    tokens: ServerDimension {
                        limit: h.limit_tokens,
                        remaining: h.remaining_tokens,
                    },
                }
            }
        }
    }
}

/// A stream carries the guards of a pipeline built with
/// [`hold_until_stream_end`](crate::pipeline::AgentPipelineBuilder::hold_until_stream_end);
/// a whole completion is not a stream, and its layers settle at once.
impl GuardedResponse for Reply {
    fn is_streaming(&self) -> bool {
        matches!(self, Reply::Stream(_))
    }

    fn attach(&mut self, guard: StreamGuard) {
        match self {
            Reply::Stream(s) => s.attach(guard),
            Reply::Complete(_) => guard.end(StreamEnd::Completed),
        }
    }
}

/// The crate's OpenAI-compatible client, answering a request whose JSON
/// said `"stream": true` with [`Reply::Stream`] and any other with
/// [`Reply::Complete`].
#[derive(Clone, Debug)]
pub struct GatewayClient {
    whole: OpenAiClient,
    streaming: StreamingClient,
}

impl GatewayClient {
    /// Wraps `client`.
    pub fn new(client: OpenAiClient) -> Self {
        GatewayClient {
            streaming: client.streaming(),
            whole: client,
        }
    }
}

/// Whether the caller asked for a stream.
pub(super) fn wants_stream(req: &ChatRequest) -> bool {
    req.extra_field("stream") == Some(&Value::Bool(true))
}

/// The future of [`GatewayClient`].
#[derive(Debug)]
pub enum ReplyFuture {
    /// A whole completion.
    Complete(ResponseFuture),
    /// A stream.
    Stream(StreamFuture),
}

impl Future for ReplyFuture {
    type Output = Result<Reply, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both futures are `Unpin` (boxed inside).
        match self.get_mut() {
            ReplyFuture::Complete(f) => Pin::new(f).poll(cx).map_ok(Reply::Complete),
            ReplyFuture::Stream(f) => Pin::new(f).poll(cx).map_ok(|s| Reply::Stream(Box::new(s))),
        }
    }
}

impl Service<ChatRequest> for GatewayClient {
    type Response = Reply;
    type Error = ClientError;
    type Future = ReplyFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> ReplyFuture {
        if wants_stream(&req) {
            ReplyFuture::Stream(self.streaming.call(req))
        } else {
            ReplyFuture::Complete(self.whole.call(req))
        }
    }
}
