//! Streamed messages: the Messages API's server-sent events, assembled into
//! the same [`MessagesResponse`] a non-streamed call returns.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::{Instant, Sleep};

use super::error::AnthropicError;
use super::response::{Usage, WireMessage, WireUsage};
use super::types::ContentBlock;
use super::MessagesResponse;
use crate::client::sse::{SseDecoder, SseError};
use crate::client::RateLimitHeaders;
use crate::guard::{GuardedResponse, StreamGuard, StreamGuards};

/// One event of a streamed message, as the caller sees it (`ping` and
/// `message_stop` are handled by the stream itself).
///
/// `Debug` shows lengths, never the text.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// `message_start`: the message's id, model and input usage.
    MessageStart {
        /// The message id.
        id: String,
        /// The model.
        model: String,
        /// Usage so far (input tokens).
        usage: Usage,
    },
    /// `content_block_start`: a block opens at `index` (for a tool call: its
    /// id and name).
    BlockStart {
        /// The block's index in the message's content.
        index: usize,
        /// The block as it starts (empty text, or a tool call with empty
        /// input).
        block: ContentBlock,
    },
    /// `text_delta`: text appended to a text block.
    TextDelta {
        /// The block's index.
        index: usize,
        /// The text.
        text: String,
    },
    /// `input_json_delta`: a fragment of a tool call's JSON input.
    InputJsonDelta {
        /// The block's index.
        index: usize,
        /// The fragment (not valid JSON on its own).
        partial_json: String,
    },
    /// `thinking_delta`: extended thinking appended to a thinking block.
    ThinkingDelta {
        /// The block's index.
        index: usize,
        /// The thinking text.
        thinking: String,
    },
    /// `content_block_stop`: the block at `index` is complete (a tool
    /// call's input is parsed now).
    BlockStop {
        /// The block's index.
        index: usize,
    },
    /// `message_delta`: the stop reason and the cumulative usage.
    MessageDelta {
        /// Why generation stopped.
        stop_reason: Option<String>,
        /// The stop sequence matched, if any.
        stop_sequence: Option<String>,
        /// Usage so far.
        usage: Usage,
    },
}

impl StreamEvent {
    /// Whether the event carries output (text, tool input, thinking, the
    /// stop reason): once one reached the caller, a retry would duplicate
    /// output.
    fn is_output(&self) -> bool {
        !matches!(
            self,
            StreamEvent::MessageStart { .. } | StreamEvent::BlockStart { .. }
        )
    }
}

impl fmt::Debug for StreamEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEvent::MessageStart { id, model, usage } => f
                .debug_struct("MessageStart")
                .field("id", id)
                .field("model", model)
                .field("usage", usage)
                .finish(),
            StreamEvent::BlockStart { index, block } => f
                .debug_struct("BlockStart")
                .field("index", index)
                .field("block", block)
                .finish(),
            StreamEvent::TextDelta { index, text } => f
                .debug_struct("TextDelta")
                .field("index", index)
                .field("text_len", &text.len())
                .finish(),
            StreamEvent::InputJsonDelta {
                index,
                partial_json,
            } => f
                .debug_struct("InputJsonDelta")
                .field("index", index)
                .field("partial_json_len", &partial_json.len())
                .finish(),
            StreamEvent::ThinkingDelta { index, thinking } => f
                .debug_struct("ThinkingDelta")
                .field("index", index)
                .field("thinking_len", &thinking.len())
                .finish(),
            StreamEvent::BlockStop { index } => {
                f.debug_struct("BlockStop").field("index", index).finish()
            }
            StreamEvent::MessageDelta {
                stop_reason, usage, ..
            } => f
                .debug_struct("MessageDelta")
                .field("stop_reason", stop_reason)
                .field("usage", usage)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: WireDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        #[serde(default)]
        delta: WireMessageDelta,
        #[serde(default)]
        usage: WireUsage,
    },
    MessageStop,
    Ping,
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    stop_sequence: Option<String>,
}

/// What one server event means.
enum Step {
    Event(StreamEvent),
    Skip,
    Stop,
}

/// Builds the message from the events.
struct Assembly {
    message: MessagesResponse,
    /// The JSON text of each tool call's input, while its block is open.
    json: Vec<Option<String>>,
}

impl Assembly {
    fn apply(&mut self, wire: WireEvent) -> Result<Step, AnthropicError> {
        let m = &mut self.message;
        Ok(Step::Event(match wire {
            WireEvent::MessageStart { message } => {
                m.id = message.id;
                m.model = message.model;
                if let Some(u) = message.usage {
                    m.usage = u;
                }
                StreamEvent::MessageStart {
                    id: m.id.clone(),
                    model: m.model.clone(),
                    usage: m.usage,
                }
            }
            WireEvent::ContentBlockStart {
                index,
                content_block,
            } => {
                if index != m.content.len() {
                    return Err(protocol());
                }
                // Tool calls, and blocks this crate does not model (a
                // server tool's call), may receive their input as JSON
                // fragments.
                let takes_json = matches!(
                    content_block,
                    ContentBlock::ToolUse { .. } | ContentBlock::Other(_)
                );
                m.content.push(content_block.clone());
                self.json.push(takes_json.then(String::new));
                StreamEvent::BlockStart {
                    index,
                    block: content_block,
                }
            }
            WireEvent::ContentBlockDelta { index, delta } => {
                let block = m.content.get_mut(index).ok_or_else(protocol)?;
                match (delta, block) {
                    (WireDelta::TextDelta { text }, ContentBlock::Text { text: t, .. }) => {
                        t.push_str(&text);
                        StreamEvent::TextDelta { index, text }
                    }
                    (
                        WireDelta::InputJsonDelta { partial_json },
                        ContentBlock::ToolUse { .. } | ContentBlock::Other(_),
                    ) => {
                        let buf = self.json[index].as_mut().ok_or_else(protocol)?;
                        buf.push_str(&partial_json);
                        StreamEvent::InputJsonDelta {
                            index,
                            partial_json,
                        }
                    }
                    (
                        WireDelta::ThinkingDelta { thinking },
                        ContentBlock::Thinking { thinking: t, .. },
                    ) => {
                        t.push_str(&thinking);
                        StreamEvent::ThinkingDelta { index, thinking }
                    }
                    (
                        WireDelta::SignatureDelta { signature },
                        ContentBlock::Thinking { signature: s, .. },
                    ) => {
                        s.push_str(&signature);
                        return Ok(Step::Skip);
                    }
                    // A delta type added to the API later, or a delta of a
                    // block this crate does not model.
                    (WireDelta::Other, _) | (_, ContentBlock::Other(_)) => return Ok(Step::Skip),
                    _ => return Err(protocol()),
                }
            }
            WireEvent::ContentBlockStop { index } => {
                let block = m.content.get_mut(index).ok_or_else(protocol)?;
                if let Some(text) = self.json.get_mut(index).and_then(Option::take) {
                    let parsed = || -> Result<Value, AnthropicError> {
                        if text.trim().is_empty() {
                            return Ok(Value::Object(Default::default()));
                        }
                        serde_json::from_str(&text)
                            .map_err(|_| AnthropicError::decode(text.as_bytes()))
                    };
                    match block {
                        ContentBlock::ToolUse { input, .. } => *input = parsed()?,
                        ContentBlock::Other(Value::Object(o)) if !text.is_empty() => {
                            o.insert("input".to_owned(), parsed()?);
                        }
                        _ => {}
                    }
                }
                StreamEvent::BlockStop { index }
            }
            WireEvent::MessageDelta { delta, usage } => {
                m.stop_reason = delta.stop_reason;
                m.stop_sequence = delta.stop_sequence;
                m.usage.merge(&usage);
                StreamEvent::MessageDelta {
                    stop_reason: m.stop_reason.clone(),
                    stop_sequence: m.stop_sequence.clone(),
                    usage: m.usage,
                }
            }
            WireEvent::MessageStop => return Ok(Step::Stop),
            WireEvent::Ping | WireEvent::Unknown => return Ok(Step::Skip),
        }))
    }

    /// The message so far; a tool call still open keeps the JSON text that
    /// arrived, as a string.
    fn take(&mut self) -> MessagesResponse {
        let mut message = std::mem::replace(&mut self.message, MessagesResponse::empty());
        for (block, json) in message.content.iter_mut().zip(self.json.drain(..)) {
            match (block, json) {
                (ContentBlock::ToolUse { input, .. }, Some(text)) => *input = Value::String(text),
                (ContentBlock::Other(Value::Object(o)), Some(text)) if !text.is_empty() => {
                    o.insert("input".to_owned(), Value::String(text));
                }
                _ => {}
            }
        }
        message
    }
}

fn protocol() -> AnthropicError {
    AnthropicError::interrupted(None)
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The limits a stream reads within.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_bytes: usize,
    pub(crate) max_event_bytes: usize,
}

/// A streamed message: a [`Stream`] of [`StreamEvent`]s, assembled as it
/// goes into the [`MessagesResponse`] a non-streamed call would return
/// ([`collect_message`](Self::collect_message)).
///
/// The client hands this out only once the first event carrying output
/// (text, tool input, thinking or the stop reason) has arrived, so a
/// failure before any output (an error status, an `error` event right
/// after `message_start`, a drop, a timeout) is an ordinary error of the
/// call and a retry or fallback layer above the client may try again.
/// After that, output has reached the caller and nothing is retried: a
/// stream that carries an `error` event, breaks off, stays silent longer
/// than the idle timeout, exceeds the size limits, or ends without
/// `message_stop` ends with one [`AnthropicError`] that keeps the message
/// assembled so far ([`AnthropicError::partial`]). After the error or the
/// end, the stream yields `None`.
///
/// The idle timeout counts from the last complete event (`ping` included)
/// or keep-alive comment, not the last byte: a server dripping one byte at
/// a time does not keep a stream alive.
///
/// A [`GuardedResponse`]: its guards complete at `message_stop`, fail at
/// an error, and are dropped with it ([`crate::guard`]).
pub struct MessageStream {
    body: Body,
    sse: SseDecoder,
    queued: VecDeque<StreamEvent>,
    assembly: Assembly,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    received: usize,
    max_bytes: usize,
    finished: bool,
    delivered: bool,
    guards: StreamGuards,
}

impl fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageStream")
            .field("message", &self.assembly.message)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    // A timeout too large for the clock is no timeout: a year is as good.
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

impl MessageStream {
    pub(crate) fn new(
        body: Body,
        limits: Limits,
        rate_limit: RateLimitHeaders,
        request_id: Option<String>,
    ) -> Self {
        let mut message = MessagesResponse::empty();
        message.rate_limit = rate_limit;
        message.request_id = request_id;
        Self {
            body,
            sse: SseDecoder::new(limits.max_event_bytes),
            queued: VecDeque::new(),
            assembly: Assembly {
                message,
                json: Vec::new(),
            },
            idle: limits
                .idle_timeout
                .map(|d| (d, Box::pin(tokio::time::sleep_until(deadline(d))))),
            received: 0,
            max_bytes: limits.max_bytes,
            finished: false,
            delivered: false,
            guards: StreamGuards::new(),
        }
    }

    /// The message assembled so far (complete once the stream ended
    /// without error). A tool call's input is filled in when its block
    /// stops.
    pub fn message(&self) -> &MessagesResponse {
        &self.assembly.message
    }

    /// Reads the rest of the stream and returns the whole message, the same
    /// shape as a non-streamed call's (tool call inputs assembled from
    /// their fragments), or the typed error with the partial message.
    pub async fn collect_message(mut self) -> Result<MessagesResponse, AnthropicError> {
        while let Some(item) = futures::StreamExt::next(&mut self).await {
            item?;
        }
        Ok(self.assembly.take())
    }

    /// The text of the rest of the stream, concatenated with what was
    /// already read.
    pub async fn collect_text(self) -> Result<String, AnthropicError> {
        Ok(self.collect_message().await?.text())
    }

    fn fail(&mut self, err: AnthropicError) -> AnthropicError {
        self.finished = true;
        let request_id = self.assembly.message.request_id.clone();
        let err = err.with_partial(self.assembly.take(), self.delivered);
        let err = err.with_request_id(request_id.as_deref());
        self.guards.fail(&err);
        err
    }

    fn step(&mut self, data: &[u8], event: &[u8]) -> Result<Step, AnthropicError> {
        if event == b"error" {
            return Err(AnthropicError::stream_event(data));
        }
        let wire: WireEvent = match serde_json::from_slice(data) {
            Ok(w) => w,
            Err(_) => {
                // `{"type":"error",…}` under another event name is still an
                // error; anything else that is not an event is a broken
                // stream.
                let v: Option<Value> = serde_json::from_slice(data).ok();
                return Err(match v.as_ref().and_then(|v| v.get("type")) {
                    Some(t) if t == "error" => AnthropicError::stream_event(data),
                    _ => AnthropicError::decode(data),
                });
            }
        };
        self.assembly.apply(wire)
    }

    /// Restarts the idle timer if the decoder completed an event or a
    /// keep-alive comment since the last look.
    fn note_progress(&mut self) {
        if self.sse.take_progress() {
            if let Some((d, sleep)) = &mut self.idle {
                sleep.as_mut().reset(deadline(*d));
            }
        }
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<StreamEvent, AnthropicError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            let next = self.sse.next_event();
            self.note_progress();
            match next {
                Ok(Some(ev)) => match self.step(ev.data.as_bytes(), ev.event.as_bytes()) {
                    Ok(Step::Event(e)) => return Poll::Ready(Some(Ok(e))),
                    Ok(Step::Skip) => continue,
                    Ok(Step::Stop) => {
                        self.finished = true;
                        self.guards.complete();
                        return Poll::Ready(None);
                    }
                    Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
                },
                Ok(None) => {}
                Err(SseError::EventTooLarge { limit }) => {
                    let err = AnthropicError::too_large(limit);
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
            }
            match self.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.received = self.received.saturating_add(bytes.len());
                    if self.received > self.max_bytes {
                        let err = AnthropicError::too_large(self.max_bytes);
                        return Poll::Ready(Some(Err(self.fail(err))));
                    }
                    self.sse.push(bytes);
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = AnthropicError::interrupted(Some(e));
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                Poll::Ready(None) => {
                    // The body ended without `message_stop`.
                    let err = AnthropicError::interrupted(None);
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                Poll::Pending => {
                    if let Some((_, sleep)) = &mut self.idle {
                        if sleep.as_mut().poll(cx).is_ready() {
                            let err = AnthropicError::interrupted(None);
                            return Poll::Ready(Some(Err(self.fail(err))));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads events until the first one carrying output (or the end),
    /// keeping them for the caller. An error here is a failure before any
    /// output.
    pub(crate) async fn prime(mut self) -> Result<Self, AnthropicError> {
        loop {
            match futures::future::poll_fn(|cx| self.poll_event(cx)).await {
                Some(Ok(e)) => {
                    let output = e.is_output();
                    self.queued.push_back(e);
                    if output {
                        return Ok(self);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(self),
            }
        }
    }
}

impl GuardedResponse for MessageStream {
    fn attach(&mut self, guard: StreamGuard) {
        self.guards.push(guard);
    }
}

impl Stream for MessageStream {
    type Item = Result<StreamEvent, AnthropicError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = match this.queued.pop_front() {
            Some(e) => Poll::Ready(Some(Ok(e))),
            None => this.poll_event(cx),
        };
        if let Poll::Ready(Some(Ok(e))) = &item {
            this.delivered |= e.is_output();
        }
        item
    }
}

#[cfg(test)]
mod tests;
