//! Streamed chat completions (server-sent events).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Sleep};

use super::assemble::Assembler;
use super::error::ClientError;
use super::sse::{SseDecoder, SseError};
use super::types::{decode_chunk, ChatChunk, ChatResponse, RateLimitHeaders, Usage};
use crate::guard::{GuardedResponse, StreamGuard, StreamGuards};

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A streamed chat completion: a [`Stream`] of [`ChatChunk`]s.
///
/// The client hands this out only once the first chunk has arrived, so a
/// failure before any output (an error status, an error event, a drop, a
/// timeout) is an ordinary error of the call, and a retry or fallback layer
/// above the client may try again. After that, output has reached the
/// caller and nothing is retried: a stream that carries an error event,
/// breaks off, stays silent longer than the idle timeout, or ends without
/// its `[DONE]` terminator ends with one [`ClientError`] that keeps every
/// chunk already delivered ([`ClientError::partial`]). An event that is not
/// a chat chunk (malformed JSON, a field of the wrong type) is such an
/// error too ([`ClientErrorKind::Decode`](super::ClientErrorKind::Decode)),
/// never skipped; one event over the client's `max_event_bytes` is a
/// [`ClientErrorKind::BodyTooLarge`](super::ClientErrorKind::BodyTooLarge).
/// After the error or the end, the stream yields `None`.
///
/// The idle timeout counts complete events (and keep-alive comments), not
/// bytes: a server dripping a line one byte at a time cannot hold it open.
///
/// A [`GuardedResponse`]: its guards complete at `[DONE]`, fail at an
/// error, and are dropped with it, so a queue can keep the call's permit
/// and a breaker its outcome until the stream ends ([`crate::guard`]).
pub struct ChatStream {
    body: Body,
    sse: SseDecoder,
    first: Option<ChatChunk>,
    delivered: Vec<ChatChunk>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    finished: bool,
    assembled: Assembler,
    rate_limit: RateLimitHeaders,
    request_id: Option<String>,
    guards: StreamGuards,
}

impl fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatStream")
            .field("delivered", &self.delivered.len())
            .field("finished", &self.finished)
            .field("usage", &self.assembled.usage())
            .finish_non_exhaustive()
    }
}

enum Event {
    Chunk(ChatChunk),
    Done,
}

impl ChatStream {
    pub(crate) fn new(
        body: Body,
        idle_timeout: Option<Duration>,
        max_event_bytes: usize,
        rate_limit: RateLimitHeaders,
        request_id: Option<String>,
    ) -> Self {
        Self {
            body,
            sse: SseDecoder::new(max_event_bytes),
            first: None,
            delivered: Vec::new(),
            // `sleep` saturates a deadline past the clock's range; the
            // builder turns such durations into "no limit" anyway.
            idle: idle_timeout.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            finished: false,
            assembled: Assembler::default(),
            rate_limit,
            request_id,
            guards: StreamGuards::new(),
        }
    }

    /// The rate-limit headers of the response.
    pub fn rate_limit(&self) -> &RateLimitHeaders {
        &self.rate_limit
    }

    /// The provider's request id, if sent.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The usage the server reported (on the final chunk), once seen.
    pub fn usage(&self) -> Option<Usage> {
        self.assembled.usage()
    }

    /// The completion received so far, in the shape of a whole one: every
    /// choice's text, the tool calls (the last one possibly incomplete),
    /// ids and usage.
    pub fn snapshot(&self) -> ChatResponse {
        let mut r = self.assembled.response();
        r.rate_limit = self.rate_limit;
        r.request_id.clone_from(&self.request_id);
        r
    }

    /// Reads the stream to its end and returns the completion in the shape
    /// of a non-streamed one (every choice, tool calls joined from their
    /// pieces, usage, ids, rate-limit headers), or the typed error that
    /// keeps what arrived ([`ClientError::partial_response`]).
    pub async fn collect(mut self) -> Result<ChatResponse, ClientError> {
        while let Some(item) = futures::StreamExt::next(&mut self).await {
            item?;
        }
        Ok(self.snapshot())
    }

    /// The chunks delivered so far.
    pub fn delivered(&self) -> &[ChatChunk] {
        &self.delivered
    }

    /// Collects the whole completion text, or the typed error with the
    /// partial output.
    pub async fn collect_text(mut self) -> Result<String, ClientError> {
        let mut text = String::new();
        while let Some(item) = futures::StreamExt::next(&mut self).await {
            text.push_str(item?.text());
        }
        Ok(text)
    }

    fn fail(&mut self, err: ClientError) -> ClientError {
        self.finished = true;
        let partial = self.snapshot();
        let err = err
            .with_partial(std::mem::take(&mut self.delivered))
            .with_partial_response(partial);
        self.guards.fail(&err);
        err
    }

    /// Parses the next complete event of the buffered bytes, if there is
    /// one: `Ok(None)` inside means an event with nothing to hand out.
    fn next_event(&mut self) -> Option<Result<Option<Event>, ClientError>> {
        let ev = match self.sse.next_event() {
            Ok(Some(ev)) => ev,
            Ok(None) => return None,
            Err(e @ SseError::EventTooLarge { .. }) => {
                return Some(Err(ClientError::too_large(200, e)));
            }
        };
        let data = ev.data.as_bytes();
        if ev.event == "error" {
            return Some(Err(ClientError::stream_event(data)));
        }
        if ev.event == "message_stop" || data.trim_ascii() == b"[DONE]" {
            return Some(Ok(Some(Event::Done)));
        }
        if data.trim_ascii().is_empty() {
            return Some(Ok(None));
        }
        let (wire, chunk) = match decode_chunk(data) {
            Ok(decoded) => decoded,
            Err(e) => return Some(Err(e)),
        };
        let (id, model) = (wire.id.as_deref(), wire.model.as_deref());
        self.assembled
            .ids(id, model, wire.system_fingerprint.as_deref());
        self.assembled.push(&chunk);
        if chunk.is_empty() {
            // A role-only opening chunk or a keep-alive: nothing to hand out.
            return Some(Ok(None));
        }
        Some(Ok(Some(Event::Chunk(chunk))))
    }

    /// Restarts the idle timer if the decoder completed an event or a
    /// keep-alive comment since the last look.
    fn note_progress(&mut self) {
        if self.sse.take_progress() {
            if let Some((d, sleep)) = &mut self.idle {
                if let Some(at) = Instant::now().checked_add(*d) {
                    sleep.as_mut().reset(at);
                }
            }
        }
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ChatChunk, ClientError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            let event = self.next_event();
            self.note_progress();
            match event {
                Some(Ok(Some(Event::Chunk(c)))) => return Poll::Ready(Some(Ok(c))),
                Some(Ok(Some(Event::Done))) => {
                    self.finished = true;
                    self.guards.complete();
                    return Poll::Ready(None);
                }
                Some(Ok(None)) => continue,
                Some(Err(e)) => return Poll::Ready(Some(Err(self.fail(e)))),
                None => {}
            }
            match self.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => self.sse.push(bytes),
                Poll::Ready(Some(Err(e))) => {
                    let err = ClientError::interrupted(Some(e));
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                Poll::Ready(None) => {
                    // The body ended without `[DONE]`.
                    let err = ClientError::interrupted(None);
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                Poll::Pending => {
                    if let Some((_, sleep)) = &mut self.idle {
                        if sleep.as_mut().poll(cx).is_ready() {
                            let err = ClientError::interrupted(None);
                            return Poll::Ready(Some(Err(self.fail(err))));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Waits for the first chunk (or the end), keeping it for the caller.
    /// An error here is a failure before any output.
    pub(crate) async fn prime(mut self) -> Result<Self, ClientError> {
        match futures::future::poll_fn(|cx| self.poll_chunk(cx)).await {
            Some(Ok(c)) => {
                self.first = Some(c);
                Ok(self)
            }
            Some(Err(e)) => Err(e),
            None => Ok(self),
        }
    }
}

impl GuardedResponse for ChatStream {
    fn attach(&mut self, guard: StreamGuard) {
        self.guards.push(guard);
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatChunk, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = match this.first.take() {
            Some(c) => Poll::Ready(Some(Ok(c))),
            None => this.poll_chunk(cx),
        };
        if let Poll::Ready(Some(Ok(c))) = &item {
            this.delivered.push(c.clone());
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn stream_of(parts: Vec<String>) -> ChatStream {
        let body = futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p))));
        ChatStream::new(
            Box::pin(body),
            None,
            1 << 20,
            RateLimitHeaders::default(),
            None,
        )
    }

    fn chunk(text: &str) -> String {
        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
    }

    #[tokio::test]
    async fn parses_chunks_across_reads_until_done() {
        let a = chunk("Hel");
        let b = chunk("lo");
        let all = format!("{a}{b}data: [DONE]\n\n");
        let (x, y) = all.split_at(10);
        let s = stream_of(vec![x.to_owned(), y.to_owned()]);
        assert_eq!(s.collect_text().await.unwrap(), "Hello");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_gap_ends_the_stream_with_the_partial_output() {
        let body = futures::stream::iter(vec![Ok(Bytes::from(chunk("a")))])
            .chain(futures::stream::pending());
        let mut s = ChatStream::new(
            Box::pin(body),
            Some(Duration::from_secs(5)),
            1 << 20,
            RateLimitHeaders::default(),
            None,
        );
        assert_eq!(s.next().await.unwrap().unwrap().text(), "a");
        let started = Instant::now();
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(err.kind(), super::super::ClientErrorKind::StreamInterrupted);
        assert_eq!(err.partial_text(), "a");
    }

    #[tokio::test]
    async fn missing_terminator_is_an_error_with_the_partial_output() {
        let mut s = stream_of(vec![chunk("a")]);
        assert_eq!(s.next().await.unwrap().unwrap().text(), "a");
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), super::super::ClientErrorKind::StreamInterrupted);
        assert_eq!(err.partial_text(), "a");
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn error_event_is_typed() {
        let mut s = stream_of(vec![
            chunk("a"),
            "event: error\r\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}\r\n\r\n".to_owned(),
        ]);
        assert!(s.next().await.unwrap().is_ok());
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), super::super::ClientErrorKind::StreamError);
        assert_eq!(
            crate::classify::HttpView::error_type(&err),
            Some("overloaded_error")
        );
        assert_eq!(err.partial().len(), 1);
    }
}
