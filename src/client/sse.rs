//! A bounded, linear server-sent events decoder (the WHATWG `text/event-stream`
//! framing), shared by the crate's streaming clients.
//!
//! Feed it the body's chunks with [`SseDecoder::push`] and take events with
//! [`SseDecoder::next_event`]. It handles every legal line ending (`\r\n`,
//! `\n`, `\r`, mixed, so `\r\r` and `\n\r\n` end an event), joins `data:`
//! lines with `\n`, reads `event:`, `id:` and `retry:`, skips comments and a
//! leading byte order mark.
//!
//! # Bounds
//!
//! - Linear time: every byte is looked at once. Chunks are consumed by
//!   moving a cursor (a [`Bytes`] slice), never by draining a buffer from
//!   its front, and a line boundary is searched for only in bytes not yet
//!   looked at.
//! - Bounded memory: one event (its pending line, `data`, `event` and `id`)
//!   may hold at most `max_event_bytes`; past that the decoder fails with
//!   [`SseError::EventTooLarge`] before copying the excess. Besides that it
//!   holds only the chunks pushed and not yet consumed (the caller pushes
//!   the next chunk once `next_event` returns `Ok(None)`).
//!
//! # Why not `eventsource-stream`
//!
//! The maintained SSE framing crate, `eventsource-stream` (0.2.3, read for
//! this), keeps the undecoded input in one `String` with no cap, appends
//! every chunk to it and re-parses the pending line from its start after
//! each chunk (one long line costs quadratic time), and after every parsed
//! line moves the rest of the buffer to a new `String` (`split_off`: a copy
//! of everything behind it per line). It also ends the stream on invalid
//! UTF-8. It meets neither bound above, so the framing is written here.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::{Buf, Bytes};

/// One dispatched event.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field; empty when the event named none (a "message").
    pub(crate) event: String,
    /// The `data:` lines joined by `\n` (invalid UTF-8 replaced).
    pub(crate) data: String,
    /// The last event id seen so far in the stream, if any.
    pub(crate) id: Option<String>,
}

impl fmt::Debug for SseEvent {
    // The data may quote the completion: show its length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEvent")
            .field("event", &self.event)
            .field("data_len", &self.data.len())
            .field("id", &self.id)
            .finish()
    }
}

/// Why the decoder stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SseError {
    /// One event (or one line) is larger than the cap.
    EventTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::EventTooLarge { limit } => {
                write!(f, "server-sent event larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {}

/// The decoder; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct SseDecoder {
    max_event_bytes: usize,
    /// Pushed chunks not consumed yet; the front one is partly consumed.
    input: VecDeque<Bytes>,
    /// The current line, when it spans chunks.
    line: Vec<u8>,
    /// The previous line ended with `\r`: a `\n` right after belongs to it.
    after_cr: bool,
    /// No line completed yet (a byte order mark may lead the first line).
    first_line: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    /// At least one `data` field in the current event.
    has_data: bool,
    id: Option<String>,
    retry: Option<Duration>,
    /// Events dispatched and comments seen since the last `take_progress`.
    progress: bool,
    failed: Option<SseError>,
}

impl SseDecoder {
    /// A decoder that fails on an event over `max_event_bytes`.
    pub(crate) fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            input: VecDeque::new(),
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            id: None,
            retry: None,
            progress: false,
            failed: None,
        }
    }

    /// Queues a chunk of the body. Cheap: nothing is parsed until
    /// [`next_event`](Self::next_event).
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.input.push_back(chunk);
        }
    }

    /// The bytes of the event being assembled (what the cap limits).
    pub(crate) fn held(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    /// The last `retry:` the server sent (a reconnecting client waits that
    /// long; the chat clients do not reconnect, so only tests read it yet).
    #[allow(dead_code)]
    pub(crate) fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// Whether an event was dispatched or a comment (a keep-alive) read
    /// since the last call: what a stream's idle timer counts as progress.
    pub(crate) fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progress)
    }

    /// The next complete event, `Ok(None)` when the pushed bytes hold no
    /// more (push the next chunk), or the error that stopped the decoder
    /// (returned again on every later call).
    pub(crate) fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        while let Some(front) = self.input.front_mut() {
            if self.after_cr {
                self.after_cr = false;
                if front[0] == b'\n' {
                    front.advance(1);
                    if front.is_empty() {
                        self.input.pop_front();
                    }
                    continue;
                }
            }
            let end = front.iter().position(|b| *b == b'\n' || *b == b'\r');
            let Some(end) = end else {
                // No line end in this chunk: keep its bytes, within the cap.
                let chunk = self.input.pop_front().unwrap_or_default();
                self.check(chunk.len())?;
                self.line.extend_from_slice(&chunk);
                continue;
            };
            self.after_cr = front[end] == b'\r';
            let rest = front.split_off(end + 1);
            let mut line = std::mem::replace(front, rest);
            line.truncate(end);
            if front.is_empty() {
                self.input.pop_front();
            }
            self.check(line.len())?;
            let event = if self.line.is_empty() {
                self.take_line(&line)
            } else {
                let mut whole = std::mem::take(&mut self.line);
                whole.extend_from_slice(&line);
                let event = self.take_line(&whole);
                whole.clear();
                // Keep the allocation for the next long line.
                self.line = whole;
                event
            };
            if event.is_some() {
                return Ok(event);
            }
        }
        Ok(None)
    }

    /// Fails if `more` bytes would take the current event past the cap.
    fn check(&mut self, more: usize) -> Result<(), SseError> {
        if more > self.max_event_bytes.saturating_sub(self.held()) {
            let e = SseError::EventTooLarge {
                limit: self.max_event_bytes,
            };
            self.failed = Some(e);
            self.input.clear();
            self.line = Vec::new();
            self.data = Vec::new();
            return Err(e);
        }
        Ok(())
    }

    /// Interprets one complete line; an event when it was a blank line
    /// ending one.
    fn take_line(&mut self, mut line: &[u8]) -> Option<SseEvent> {
        if std::mem::take(&mut self.first_line) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            self.progress = true;
            return None;
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.has_data = true;
                self.data.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.id = Some(String::from_utf8_lossy(value).into_owned());
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // Over u64 milliseconds: not a usable value, ignored.
                if let Some(ms) = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        let data = std::mem::take(&mut self.data);
        self.progress = true;
        Some(SseEvent {
            event: String::from_utf8(event).unwrap_or_else(|e| lossy(e.as_bytes())),
            data: String::from_utf8(data).unwrap_or_else(|e| lossy(e.as_bytes())),
            id: self.id.clone(),
        })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests;
