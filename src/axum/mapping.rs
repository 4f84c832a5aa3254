//! A configurable mapping, installed once as a layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::response::{ErrorResponse, DEFAULT_QUEUE_FULL_RETRY_AFTER};

type Rewrite = dyn Fn(&mut ErrorResponse) + Send + Sync + 'static;

/// How a service answers its callers for each [`Error`](crate::Error):
/// the default table of the [module docs](crate::axum) with the changes a
/// service wants, installed once with [`ErrorMapping::layer`].
///
/// Handlers keep returning `Result<_, llm_resilience::Error>`; the layer
/// re-renders every response that an [`Error`](crate::Error) produced
/// (it finds the [`ErrorResponse`] the error left in the response's
/// extensions), so no handler changes and nothing is re-implemented.
///
/// ```
/// use std::time::Duration;
/// use axum::http::StatusCode;
/// use llm_resilience::axum::ErrorMapping;
///
/// let mapping = ErrorMapping::builder()
///     // A full queue answers 429 instead of 503 ...
///     .status("queue_full", StatusCode::TOO_MANY_REQUESTS)
///     // ... and tells callers to come back in 5 s.
///     .queue_full_retry_after(Duration::from_secs(5))
///     // One body field changed for every error: `param` names the gateway.
///     .rewrite(|resp| resp.param = Some("my-gateway".into()))
///     .build();
/// let app: axum::Router = axum::Router::new().layer(mapping.layer());
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct ErrorMapping {
    statuses: Arc<[(&'static str, StatusCode)]>,
    queue_full_retry_after: Duration,
    rewrite: Option<Arc<Rewrite>>,
}

impl fmt::Debug for ErrorMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorMapping")
            .field("statuses", &self.statuses)
            .field("queue_full_retry_after", &self.queue_full_retry_after)
            .field("rewrite", &self.rewrite.is_some())
            .finish()
    }
}

impl Default for ErrorMapping {
    fn default() -> Self {
        ErrorMapping {
            statuses: Arc::from(Vec::new()),
            queue_full_retry_after: DEFAULT_QUEUE_FULL_RETRY_AFTER,
            rewrite: None,
        }
    }
}

impl ErrorMapping {
    /// A builder starting from the default table.
    pub fn builder() -> ErrorMappingBuilder {
        ErrorMappingBuilder {
            statuses: Vec::new(),
            queue_full_retry_after: DEFAULT_QUEUE_FULL_RETRY_AFTER,
            rewrite: None,
        }
    }

    /// The answer for `err` under this mapping.
    pub fn respond(&self, err: &crate::Error) -> ErrorResponse {
        let mut resp = err.to_error_response_with(self.queue_full_retry_after);
        self.apply(&mut resp);
        resp
    }

    fn apply(&self, resp: &mut ErrorResponse) {
        if resp.kind == "queue_full" {
            resp.retry_after = Some(self.queue_full_retry_after).filter(|d| !d.is_zero());
        }
        if let Some(&(_, status)) = self.statuses.iter().find(|(k, _)| *k == resp.kind) {
            resp.status = status;
        }
        if let Some(rewrite) = &self.rewrite {
            rewrite(resp);
        }
    }

    /// The layer that applies this mapping to an axum `Router` (or any
    /// service that answers `axum::response::Response`).
    pub fn layer(&self) -> ErrorMappingLayer {
        ErrorMappingLayer {
            mapping: self.clone(),
        }
    }
}

/// Builds an [`ErrorMapping`].
pub struct ErrorMappingBuilder {
    statuses: Vec<(&'static str, StatusCode)>,
    queue_full_retry_after: Duration,
    rewrite: Option<Arc<Rewrite>>,
}

impl fmt::Debug for ErrorMappingBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorMappingBuilder")
            .field("statuses", &self.statuses)
            .field("queue_full_retry_after", &self.queue_full_retry_after)
            .finish_non_exhaustive()
    }
}

impl ErrorMappingBuilder {
    /// Answer errors of this kind ([`Error::kind`](crate::Error::kind), for
    /// example `"queue_full"`) with `status`. A later call for the same kind
    /// wins.
    pub fn status(mut self, kind: &'static str, status: StatusCode) -> Self {
        self.statuses.retain(|(k, _)| *k != kind);
        self.statuses.push((kind, status));
        self
    }

    /// The `Retry-After` a full queue answers with (default 1 s);
    /// `Duration::ZERO` sends none.
    pub fn queue_full_retry_after(mut self, wait: Duration) -> Self {
        self.queue_full_retry_after = wait;
        self
    }

    /// A function that may change any field of every answer, run last.
    pub fn rewrite(mut self, f: impl Fn(&mut ErrorResponse) + Send + Sync + 'static) -> Self {
        self.rewrite = Some(Arc::new(f));
        self
    }

    /// The mapping.
    pub fn build(self) -> ErrorMapping {
        ErrorMapping {
            statuses: Arc::from(self.statuses),
            queue_full_retry_after: self.queue_full_retry_after,
            rewrite: self.rewrite,
        }
    }
}

/// Applies an [`ErrorMapping`] to every response an [`Error`](crate::Error)
/// produced.
#[derive(Clone, Debug)]
pub struct ErrorMappingLayer {
    mapping: ErrorMapping,
}

impl<S> Layer<S> for ErrorMappingLayer {
    type Service = ErrorMappingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorMappingService {
            inner,
            mapping: self.mapping.clone(),
        }
    }
}

/// The service of [`ErrorMappingLayer`].
#[derive(Clone, Debug)]
pub struct ErrorMappingService<S> {
    inner: S,
    mapping: ErrorMapping,
}

impl<S, Req> Service<Req> for ErrorMappingService<S>
where
    S: Service<Req, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MappedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        MappedResponse {
            inner: self.inner.call(req),
            mapping: Some(self.mapping.clone()),
        }
    }
}

pin_project! {
    /// The future of [`ErrorMappingService`].
    pub struct MappedResponse<F> {
        #[pin]
        inner: F,
        mapping: Option<ErrorMapping>,
    }
}

impl<F> fmt::Debug for MappedResponse<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedResponse").finish_non_exhaustive()
    }
}

impl<F, E> Future for MappedResponse<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let Some(mapping) = this.mapping.take() else {
            return Poll::Ready(Ok(resp));
        };
        Poll::Ready(Ok(match resp.extensions().get::<ErrorResponse>() {
            Some(answer) => {
                let mut answer = answer.clone();
                mapping.apply(&mut answer);
                answer.into_response()
            }
            None => resp,
        }))
    }
}
