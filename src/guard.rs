//! Stream guards: a streamed response keeps its queue permit and its
//! breaker outcome until the stream ends or is dropped.
//!
//! A layer sees a call end when the response future completes. For a
//! streamed response that is the first chunk, not the end: the upstream is
//! still busy for every chunk after it, and a stream can still break off.
//! A layer cannot see the end of a stream it does not own, so the response
//! carries it: a streamed response type implements [`GuardedResponse`],
//! and a layer told to wait for the end attaches a [`StreamGuard`] to it.
//! The stream settles its guards once, when it ends:
//!
//! - **completed** (its protocol's end: `[DONE]`, `message_stop`, the end
//!   of a stream of `Ok` items): the breaker records a success;
//! - **failed** (an error after the response was delivered: an error
//!   event, a cut connection, an idle timeout): the breaker classifies the
//!   error ([`Classify::classify_stream_error`]) and records a failure;
//! - **dropped** before its end (the caller stopped reading): no outcome.
//!   The caller's choice says nothing about the upstream's health, as a
//!   caller dropping a response future is neutral too; a half-open probe
//!   gives its permit back.
//!
//! In every case the queue's permit is returned when the stream settles,
//! so a queue of concurrency 2 lets at most 2 streams read at once.
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use llm_resilience::breaker::CircuitBreakerLayer;
//! use llm_resilience::guard::Guarded;
//! use llm_resilience::queue::QueueLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_resilience::BoxError> {
//! // Any streaming service: here tokens from a channel, wrapped in `Guarded`.
//! let model = service_fn(|prompt: &'static str| async move {
//!     let words = prompt.split(' ').map(|w| Ok::<_, std::io::Error>(w.to_owned()));
//!     Ok::<_, std::io::Error>(Guarded::new(futures::stream::iter(words.collect::<Vec<_>>())))
//! });
//! let queue = QueueLayer::builder().concurrency(2).hold_until_stream_end().build()?;
//! let in_flight = queue.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(queue)
//!     .layer(CircuitBreakerLayer::builder().record_at_stream_end().build()?)
//!     .service(model);
//!
//! let mut stream = svc.oneshot("hello streaming world").await?;
//! assert_eq!(stream.next().await.transpose()?.as_deref(), Some("hello"));
//! assert_eq!(in_flight.in_flight(), 1); // the permit travels with the stream
//! while stream.next().await.is_some() {}
//! assert_eq!(in_flight.in_flight(), 0); // returned at the end
//! # Ok(()) }
//! ```
//!
//! # Making a stream type guardable
//!
//! Three ways, from the least code to the most control:
//!
//! - Return [`Guarded::new(stream)`](Guarded) from the service: any
//!   `Stream<Item = Result<T, E>>` (with `E: std::error::Error`): the first
//!   `Err` item fails the guards, the end of the stream completes them.
//! - Keep a [`StreamGuards`] in the stream type, implement
//!   [`GuardedResponse`] by pushing to it, and call
//!   [`complete`](StreamGuards::complete) or [`fail`](StreamGuards::fail)
//!   where the stream ends; dropping the stream drops them. The crate's
//!   `ChatStream` (`[DONE]` completes it) and `MessageStream`
//!   (`message_stop`) do this.
//! - Implement [`GuardedResponse::attach`] any other way; a guard only needs
//!   to be kept, and ended (or dropped) once.
//!
//! A response type that is sometimes whole and sometimes a stream (an enum
//! of both, as a gateway answers) says which with
//! [`GuardedResponse::is_streaming`]: a whole answer then settles at the
//! response, as in a layer left at the default, and allocates nothing.
//!
//! # Turning it on
//!
//! The layers give back what they hold when the response arrives unless
//! told otherwise, so that a non-streamed response costs nothing and needs
//! no trait: [`QueueLayerBuilder::hold_until_stream_end`] makes a queue
//! whose services keep the permit in the response
//! ([`AtStreamEnd`]; the default is [`AtResponse`]), and
//! [`CircuitBreakerLayerBuilder::record_at_stream_end`] a breaker whose
//! outcome waits for the stream's end ([`StreamClassifier`]). Both require
//! the response to implement [`GuardedResponse`]; a response type that does
//! not is a compile error, never a silent early release. A response the
//! breaker's classifier already calls a failure is recorded at once.
//!
//! # Cost
//!
//! Nothing for a layer left at the default: the choice is a type, and the
//! code that attaches a guard is compiled out. For a stream: one allocation
//! per attached guard (boxing what the layer holds) and one for the list,
//! once per stream.
//!
//! [`Classify::classify_stream_error`]: crate::classify::Classify::classify_stream_error
//! [`QueueLayerBuilder::hold_until_stream_end`]: crate::queue::QueueLayerBuilder::hold_until_stream_end
//! [`CircuitBreakerLayerBuilder::record_at_stream_end`]: crate::breaker::CircuitBreakerLayerBuilder::record_at_stream_end

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::Stream;
use pin_project_lite::pin_project;

use crate::classify::{Classify, LlmClassifier, Outcome};
use crate::error::Error;

/// How a stream ended, as its guards learn it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum StreamEnd<'a> {
    /// The stream reached its protocol's end.
    Completed,
    /// The stream ended with this error after its response was delivered.
    Failed(&'a (dyn std::error::Error + 'static)),
    /// The stream was dropped before its end: no outcome.
    Dropped,
}

trait Settle: Send + Sync {
    fn settle(self: Box<Self>, end: StreamEnd<'_>);
}

struct Hold<T>(T);

impl<T: Send + Sync> Settle for Hold<T> {
    fn settle(self: Box<Self>, _: StreamEnd<'_>) {}
}

struct OnEnd<F>(F);

impl<F: FnOnce(StreamEnd<'_>) + Send + Sync> Settle for OnEnd<F> {
    fn settle(self: Box<Self>, end: StreamEnd<'_>) {
        (self.0)(end)
    }
}

/// What one layer left with a streamed response: kept until the stream
/// ends, then [ended](Self::end) with how it ended; dropped unended, it
/// ends as [`StreamEnd::Dropped`].
pub struct StreamGuard {
    inner: Option<Box<dyn Settle>>,
}

impl fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuard")
            .field("ended", &self.inner.is_none())
            .finish()
    }
}

impl StreamGuard {
    /// A guard that keeps `value` (a permit, a lease) until the stream
    /// ends, whichever way.
    pub fn hold<T: Send + Sync + 'static>(value: T) -> Self {
        Self {
            inner: Some(Box::new(Hold(value))),
        }
    }

    /// A guard that calls `f` once, with how the stream ended.
    pub fn on_end<F>(f: F) -> Self
    where
        F: FnOnce(StreamEnd<'_>) + Send + Sync + 'static,
    {
        Self {
            inner: Some(Box::new(OnEnd(f))),
        }
    }

    /// Ends the guard: tells its layer how the stream ended.
    pub fn end(mut self, end: StreamEnd<'_>) {
        if let Some(inner) = self.inner.take() {
            inner.settle(end);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.settle(StreamEnd::Dropped);
        }
    }
}

/// A response that can carry [`StreamGuard`]s until it ends: a stream.
///
/// Implement it for a streamed response type so that a queue keeps its
/// permit and a breaker its outcome until the stream ends; see the
/// [module docs](self).
pub trait GuardedResponse {
    /// Whether this response is a stream still to be read, and so wants
    /// guards. A response type that is sometimes whole (an enum of a whole
    /// answer and a stream) answers `false` for a whole one: the layers
    /// then settle at the response as usual, and allocate nothing. Default
    /// `true`.
    fn is_streaming(&self) -> bool {
        true
    }

    /// Keeps `guard` until the stream ends, then ends it with how it ended
    /// (or drops it, if the stream is dropped first). Guards attached by
    /// different layers are ended in the order they were attached (the
    /// innermost layer's first).
    fn attach(&mut self, guard: StreamGuard);
}

/// How a stream ended, once it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Completed,
    Failed,
}

/// The guards of one stream, for a stream type to keep: push what
/// [`GuardedResponse::attach`] gets, call [`complete`](Self::complete) or
/// [`fail`](Self::fail) where the stream ends. Dropped, it drops its
/// guards (no outcome). Empty, it holds no allocation.
#[derive(Default)]
pub struct StreamGuards {
    guards: Vec<StreamGuard>,
    ended: Option<Ended>,
}

impl fmt::Debug for StreamGuards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuards")
            .field("guards", &self.guards.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl StreamGuards {
    /// No guards.
    pub const fn new() -> Self {
        Self {
            guards: Vec::new(),
            ended: None,
        }
    }

    /// Keeps `guard` until the stream ends. A guard pushed after the
    /// stream completed is ended at once as completed; one pushed after it
    /// failed is dropped (the error is gone by then: no outcome).
    pub fn push(&mut self, guard: StreamGuard) {
        match self.ended {
            None => self.guards.push(guard),
            Some(Ended::Completed) => guard.end(StreamEnd::Completed),
            Some(Ended::Failed) => drop(guard),
        }
    }

    /// The guards not ended yet.
    pub fn len(&self) -> usize {
        self.guards.len()
    }

    /// Whether no guard waits for the end.
    pub fn is_empty(&self) -> bool {
        self.guards.is_empty()
    }

    /// The stream reached its end: ends every guard as completed. Only the
    /// first `complete` or `fail` counts.
    pub fn complete(&mut self) {
        if self.ended.is_none() {
            self.ended = Some(Ended::Completed);
            self.end_all(StreamEnd::Completed);
        }
    }

    /// The stream ended with `err`: ends every guard as failed. Only the
    /// first `complete` or `fail` counts.
    pub fn fail(&mut self, err: &(dyn std::error::Error + 'static)) {
        if self.ended.is_none() {
            self.ended = Some(Ended::Failed);
            self.end_all(StreamEnd::Failed(err));
        }
    }

    fn end_all(&mut self, end: StreamEnd<'_>) {
        for guard in self.guards.drain(..) {
            guard.end(end);
        }
    }
}

impl GuardedResponse for StreamGuards {
    fn attach(&mut self, guard: StreamGuard) {
        self.push(guard);
    }
}

pin_project! {
    /// Makes any stream of `Result`s a [`GuardedResponse`]: the first `Err`
    /// item fails its guards, the end of the stream completes them, and
    /// dropping it early drops them (no outcome). Items pass unchanged.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use llm_resilience::guard::{Guarded, GuardedResponse, StreamEnd, StreamGuard};
    /// use std::sync::{Arc, Mutex};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let seen = Arc::new(Mutex::new(String::new()));
    /// let items = vec![Ok("a"), Err(std::io::Error::other("cut"))];
    /// let mut stream = Guarded::new(futures::stream::iter(items));
    /// let log = Arc::clone(&seen);
    /// stream.attach(StreamGuard::on_end(move |end| {
    ///     *log.lock().unwrap() = match end {
    ///         StreamEnd::Completed => "completed".into(),
    ///         StreamEnd::Failed(e) => format!("failed: {e}"),
    ///         _ => "dropped".into(),
    ///     }
    /// }));
    /// while stream.next().await.is_some() {}
    /// assert_eq!(*seen.lock().unwrap(), "failed: cut");
    /// # }
    /// ```
    pub struct Guarded<S> {
        #[pin]
        stream: S,
        guards: StreamGuards,
    }
}

impl<S> Guarded<S> {
    /// Wraps `stream`, with no guards yet.
    pub const fn new(stream: S) -> Self {
        Self {
            stream,
            guards: StreamGuards::new(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The wrapped stream, mutably (reading it directly bypasses the
    /// guards' view of its end).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The guards waiting for the end.
    pub fn guards(&self) -> &StreamGuards {
        &self.guards
    }
}

impl<S: fmt::Debug> fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("stream", &self.stream)
            .field("guards", &self.guards)
            .finish()
    }
}

impl<S> GuardedResponse for Guarded<S> {
    fn attach(&mut self, guard: StreamGuard) {
        self.guards.push(guard);
    }
}

impl<S, T, E> Stream for Guarded<S>
where
    S: Stream<Item = Result<T, E>>,
    E: std::error::Error + 'static,
{
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let item = ready!(this.stream.poll_next(cx));
        match &item {
            Some(Ok(_)) => {}
            Some(Err(e)) => this.guards.fail(e),
            None => this.guards.complete(),
        }
        Poll::Ready(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.stream.size_hint()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::AtResponse {}
    impl Sealed for super::AtStreamEnd {}
}

/// When a layer gives back what it holds for a call: [`AtResponse`] or
/// [`AtStreamEnd`]. Sealed.
pub trait Release<R>: sealed::Sealed {
    /// Whether the layer keeps what it holds in the response.
    #[doc(hidden)]
    const HOLDS: bool;
    /// Whether `response` wants a guard (only asked when `HOLDS`).
    #[doc(hidden)]
    fn wants_guard(response: &R) -> bool;
    /// Attaches `guard` to `response` (only called when `HOLDS`).
    #[doc(hidden)]
    fn attach(response: &mut R, guard: StreamGuard);
}

/// The default: a layer gives back what it holds (a queue's permit) when
/// the response arrives. For non-streamed responses, and free.
#[derive(Clone, Copy, Debug, Default)]
pub struct AtResponse;

/// A layer keeps what it holds in the response (a [`GuardedResponse`])
/// until the stream ends or is dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct AtStreamEnd;

impl<R> Release<R> for AtResponse {
    const HOLDS: bool = false;
    #[inline]
    fn wants_guard(_: &R) -> bool {
        false
    }
    #[inline]
    fn attach(_: &mut R, guard: StreamGuard) {
        drop(guard);
    }
}

impl<R: GuardedResponse> Release<R> for AtStreamEnd {
    const HOLDS: bool = true;
    #[inline]
    fn wants_guard(response: &R) -> bool {
        response.is_streaming()
    }
    #[inline]
    fn attach(response: &mut R, guard: StreamGuard) {
        response.attach(guard);
    }
}

/// [`AtResponse`] or [`AtStreamEnd`] for a whole
/// [`AgentPipeline`](crate::pipeline::AgentPipeline): when its queue gives
/// a permit back and when its breakers record. Sealed.
pub trait Mode: sealed::Sealed + Send + Sync + 'static {
    /// The breakers' classifier: the LLM preset, or the preset that waits
    /// for the stream's end ([`StreamClassifier`]).
    type Classifier: Send + Sync + 'static;
    /// Wraps the preset as this mode needs.
    #[doc(hidden)]
    fn classifier(preset: LlmClassifier) -> Self::Classifier;
}

impl Mode for AtResponse {
    type Classifier = LlmClassifier;
    fn classifier(preset: LlmClassifier) -> LlmClassifier {
        preset
    }
}

impl Mode for AtStreamEnd {
    type Classifier = StreamClassifier<LlmClassifier>;
    fn classifier(preset: LlmClassifier) -> StreamClassifier<LlmClassifier> {
        StreamClassifier(preset)
    }
}

/// A classifier whose verdict on a streamed response waits for the
/// stream's end: the breaker attaches a guard to the response (a
/// [`GuardedResponse`]) and records the outcome when the stream completes
/// (a success), fails (the error, classified by `C`'s
/// [`classify_stream_error`](Classify::classify_stream_error)) or is
/// dropped (no outcome). Everything else is `C`'s. Made by
/// [`CircuitBreakerLayerBuilder::record_at_stream_end`](crate::breaker::CircuitBreakerLayerBuilder::record_at_stream_end).
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamClassifier<C>(pub C);

impl<Res: GuardedResponse, C: Classify<Res>> Classify<Res> for StreamClassifier<C> {
    #[inline]
    fn classify(&self, result: Result<&Res, &Error>) -> Outcome {
        self.0.classify(result)
    }

    #[inline]
    fn stream<'a>(&self, response: &'a mut Res) -> Option<&'a mut dyn GuardedResponse> {
        if response.is_streaming() {
            Some(response)
        } else {
            None
        }
    }

    fn classify_stream_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome {
        self.0.classify_stream_error(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder(log: &Arc<Mutex<Vec<String>>>, name: &'static str) -> StreamGuard {
        let log = Arc::clone(log);
        StreamGuard::on_end(move |end| {
            let what = match end {
                StreamEnd::Completed => "completed".to_owned(),
                StreamEnd::Failed(e) => format!("failed {e}"),
                StreamEnd::Dropped => "dropped".to_owned(),
            };
            log.lock().unwrap().push(format!("{name} {what}"));
        })
    }

    #[test]
    fn guards_end_once_in_attach_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut g = StreamGuards::new();
        g.push(recorder(&log, "inner"));
        g.push(recorder(&log, "outer"));
        g.fail(&std::io::Error::other("cut"));
        g.complete();
        drop(g);
        assert_eq!(
            *log.lock().unwrap(),
            ["inner failed cut", "outer failed cut"]
        );
    }

    #[test]
    fn dropped_unended_guards_end_as_dropped_and_late_ones_settle_at_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut g = StreamGuards::new();
        g.push(recorder(&log, "a"));
        drop(g);
        let mut done = StreamGuards::new();
        done.complete();
        done.push(recorder(&log, "late"));
        let mut failed = StreamGuards::new();
        failed.fail(&std::io::Error::other("x"));
        failed.push(recorder(&log, "after failure"));
        assert!(done.is_empty() && failed.is_empty());
        assert_eq!(
            *log.lock().unwrap(),
            ["a dropped", "late completed", "after failure dropped"]
        );
    }
}
