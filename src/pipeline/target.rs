//! The parts of one target's stack that only the pipeline needs: the
//! stack as the fallback holds it, the attempt timeout under the rate
//! limiter, the classifier that keeps the limiter's own refusals out of the
//! breaker and the retry, and the token estimate and usage reader the
//! limiter is given.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::classify::{Classify, LlmClassifier, Outcome, Reason};
use crate::error::{BoxError, Error};
use crate::guard::GuardedResponse;
use crate::ratelimit::{EstimateTokens, ReadUsage, ServerLimits};
use crate::retry::{CloneRequest, Retry};

/// One target's stack (its retry over the rest) as the fallback holds it.
/// The fallback keeps one and clones it for each call it sends to the
/// target: such a clone is the stack itself, made for that one call, which
/// takes it whole (the retry's readied service moves into the call's
/// future, with no clone left in its place, where a plain retry keeps one
/// for its next call). Readied again after its call, it answers
/// [`Error::Shutdown`].
pub struct TargetService<R>(Option<R>);

impl<R> TargetService<R> {
    pub(crate) fn new(stack: R) -> Self {
        TargetService(Some(stack))
    }
}

impl<R: Clone> Clone for TargetService<R> {
    /// A stack for one call.
    fn clone(&self) -> Self {
        TargetService(self.0.clone())
    }
}

impl<R: fmt::Debug> fmt::Debug for TargetService<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TargetService").field(&self.0).finish()
    }
}

impl<S, Req, C, K> Service<Req> for TargetService<Retry<S, C, K>>
where
    Retry<S, C, K>: Service<Req, Error = Error> + Clone,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: CloneRequest<Req>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = crate::retry::ResponseFuture<S, Req, C, K>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match &mut self.0 {
            Some(retry) => Service::<Req>::poll_ready(retry, cx),
            None => Poll::Ready(Err(Error::Shutdown)),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // Without `poll_ready` first: the retry's future readies it. Called
        // twice, its `poll_ready` answered an error, so calling it breaks
        // the `Service` contract (the fallback never does).
        self.0
            .take()
            .expect("a TargetService is for one call")
            .call_once(req)
    }
}

/// The limit on one attempt, under the rate limiter: the time a call waits
/// for its turn at the limiter is not taken from its attempt. It counts from
/// the first time the attempt does not answer at once, as the retry layer's
/// own attempt timeout does.
#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
    after: Option<Duration>,
}

impl<S> AttemptTimeout<S> {
    pub(crate) fn new(inner: S, after: Option<Duration>) -> Self {
        AttemptTimeout { inner, after }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for AttemptTimeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = AttemptFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Error::from_inner)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        AttemptFuture {
            inner: self.inner.call(req),
            sleep: None,
            after: self.after,
        }
    }
}

pin_project! {
    /// The future of [`AttemptTimeout`].
    pub struct AttemptFuture<F> {
        #[pin]
        inner: F,
        // Created the first time the attempt does not answer at once (the
        // limit counts from then): an attempt that answers at once reads
        // no clock and builds no timer. Boxed, so that the future every
        // layer above moves stays small.
        sleep: Option<Pin<Box<Sleep>>>,
        after: Option<Duration>,
    }
}

impl<F> fmt::Debug for AttemptFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptFuture")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for AttemptFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out.map_err(Error::from_inner));
        }
        let Some(after) = *this.after else {
            return Poll::Pending;
        };
        if this.sleep.is_none() {
            // A limit too long for the clock is none.
            match Instant::now().checked_add(after) {
                Some(at) => *this.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                None => {
                    *this.after = None;
                    return Poll::Pending;
                }
            }
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            return Poll::Ready(Err(Error::Timeout { after }));
        }
        Poll::Pending
    }
}

/// The classifier of a target's retry and breaker: `C` (the crate's
/// [`LlmClassifier`], or for a breaker over a streaming client the preset
/// that waits for the stream's end), except that the target's own rate
/// limiter refusing a call ([`Error::RateLimited`]: nothing was sent) is
/// neutral. The breaker does not count it against the provider's health,
/// and the retry returns it at once: the limiter already waited as long as
/// the settings and the deadline allow, so the fallback moves on to the
/// next target instead.
#[derive(Clone, Debug, Default)]
pub struct TargetClassifier<C = LlmClassifier>(pub C);

impl<Res, C: Classify<Res>> Classify<Res> for TargetClassifier<C> {
    #[inline]
    fn classify(&self, result: Result<&Res, &Error>) -> Outcome {
        match result {
            Err(Error::RateLimited { .. }) => Outcome::BadRequest {
                reason: Reason::RateLimited,
            },
            other => self.0.classify(other),
        }
    }

    #[inline]
    fn stream<'a>(&self, response: &'a mut Res) -> Option<&'a mut dyn GuardedResponse> {
        self.0.stream(response)
    }

    fn classify_stream_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome {
        self.0.classify_stream_error(err)
    }
}

/// How the pipeline's rate limiters estimate a request's tokens: the
/// estimator given to
/// [`AgentPipelineBuilder::estimate_tokens`](super::AgentPipelineBuilder::estimate_tokens),
/// or none (every request costs no tokens before its usage is known).
pub struct Estimate<Req>(pub(crate) Option<Arc<dyn EstimateTokens<Req>>>);

impl<Req> Clone for Estimate<Req> {
    fn clone(&self) -> Self {
        Estimate(self.0.clone())
    }
}

impl<Req> fmt::Debug for Estimate<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Estimate").field(&self.0.is_some()).finish()
    }
}

impl<Req: 'static> EstimateTokens<Req> for Estimate<Req> {
    #[inline]
    fn estimate(&self, req: &Req) -> u32 {
        self.0.as_ref().map_or(0, |e| e.estimate(req))
    }
}

/// How the pipeline's rate limiters read a response: the reader given to
/// [`AgentPipelineBuilder::read_usage`](super::AgentPipelineBuilder::read_usage),
/// or nothing (estimates stand; 429 pauses still apply).
pub struct Usage<Res>(pub(crate) Option<Arc<dyn ReadUsage<Res>>>);

impl<Res> Clone for Usage<Res> {
    fn clone(&self) -> Self {
        Usage(self.0.clone())
    }
}

impl<Res> fmt::Debug for Usage<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Usage").field(&self.0.is_some()).finish()
    }
}

impl<Res: 'static> ReadUsage<Res> for Usage<Res> {
    #[inline]
    fn tokens_used(&self, res: &Res) -> Option<u64> {
        self.0.as_ref().and_then(|u| u.tokens_used(res))
    }

    #[inline]
    fn server_limits(&self, res: &Res) -> ServerLimits {
        self.0
            .as_ref()
            .map_or_else(ServerLimits::default, |u| u.server_limits(res))
    }

    #[inline]
    fn reads_nothing(&self) -> bool {
        self.0.as_ref().is_none_or(|u| u.reads_nothing())
    }
}

#[cfg(test)]
mod tests {
    use std::future::{ready, Ready};

    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::classify::HttpError;
    use crate::retry::RetryLayer;

    type Client = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, HttpError>>>;

    fn target() -> TargetService<Retry<Client>> {
        let client: Client = tower::service_fn(|x: u64| ready(Ok(x + 1)));
        TargetService::new(RetryLayer::builder().build().unwrap().layer(client))
    }

    #[tokio::test]
    async fn each_clone_serves_one_call() {
        let kept = target();
        for i in 0..3 {
            let mut once = kept.clone();
            assert_eq!(once.ready().await.unwrap().call(i).await.unwrap(), i + 1);
            assert!(matches!(once.ready().await, Err(Error::Shutdown)));
        }
        // Called without `poll_ready` first: readied in its future.
        assert_eq!(kept.clone().call(7).await.unwrap(), 8);
        assert_eq!(kept.clone().oneshot(2).await.unwrap(), 3);
    }
}
