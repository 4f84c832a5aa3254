//! The mock server's fault script.

use std::time::Duration;

use crate::chaos::{Latency, Window};

/// How the mock server answers one request.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum MockFault {
    /// A normal completion.
    Ok,
    /// A completion cut short: `finish_reason: "length"` (not an error).
    Length,
    /// An error response with this status, body and headers.
    Error(ErrorReply),
    /// Never answers (until the server is dropped): for first-byte timeouts.
    Hang,
    /// Closes the connection without a complete response.
    Reset,
    /// Streams `after_chunks` chunks, then drops the connection (a
    /// non-streamed request gets a [`Reset`](Self::Reset)).
    MidStreamDrop {
        /// Chunks sent before the drop.
        after_chunks: usize,
    },
    /// Streams `after_chunks` chunks, then an in-band error event
    /// (`overloaded_error`), then ends (a non-streamed request gets a 529).
    StreamErrorEvent {
        /// Chunks sent before the error event.
        after_chunks: usize,
    },
}

/// The body shape of an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorStyle {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}` (and a `request-id`).
    Anthropic,
    /// `{"error":{"code","message","status"}}`.
    Gemini,
}

/// An error response.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorReply {
    /// The HTTP status.
    pub status: u16,
    /// The body shape.
    pub style: ErrorStyle,
    /// The provider's error type (Gemini: `status`).
    pub error_type: Option<String>,
    /// The provider's error code (OpenAI only).
    pub code: Option<String>,
    /// The message.
    pub message: String,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
}

impl ErrorReply {
    /// An OpenAI-style error.
    pub fn openai(status: u16, error_type: &str, code: Option<&str>, message: &str) -> Self {
        Self {
            status,
            style: ErrorStyle::OpenAi,
            error_type: Some(error_type.to_owned()),
            code: code.map(str::to_owned),
            message: message.to_owned(),
            headers: Vec::new(),
        }
    }

    /// An Anthropic-style error.
    pub fn anthropic(status: u16, error_type: &str, message: &str) -> Self {
        Self {
            status,
            style: ErrorStyle::Anthropic,
            error_type: Some(error_type.to_owned()),
            code: None,
            message: message.to_owned(),
            headers: Vec::new(),
        }
    }

    /// A Gemini-style error.
    pub fn gemini(status: u16, grpc_status: &str, message: &str) -> Self {
        Self {
            status,
            style: ErrorStyle::Gemini,
            error_type: Some(grpc_status.to_owned()),
            code: None,
            message: message.to_owned(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub(crate) fn body(&self) -> serde_json::Value {
        use serde_json::json;
        match self.style {
            ErrorStyle::OpenAi => json!({"error": {
                "message": self.message, "type": self.error_type,
                "param": null, "code": self.code,
            }}),
            ErrorStyle::Anthropic => json!({"type": "error", "error": {
                "type": self.error_type, "message": self.message,
            }}),
            ErrorStyle::Gemini => json!({"error": {
                "code": self.status, "message": self.message, "status": self.error_type,
            }}),
        }
    }
}

impl MockFault {
    /// 429 `rate_limit_exceeded` with `retry-after-ms` and `retry-after`
    /// (whole seconds, rounded up) when a wait is given.
    pub fn rate_limited(retry_after: Option<Duration>) -> Self {
        let mut e = ErrorReply::openai(
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests",
        );
        if let Some(d) = retry_after {
            e = e
                .header("retry-after-ms", d.as_millis().to_string())
                .header("retry-after", format!("{}", d.as_secs_f64().ceil() as u64));
        }
        MockFault::Error(e)
    }

    /// 429 `insufficient_quota`.
    pub fn insufficient_quota() -> Self {
        MockFault::Error(ErrorReply::openai(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details.",
        ))
    }

    /// A 5xx with an OpenAI-style `server_error` body (500, 502, 503, 504).
    pub fn server_error(status: u16) -> Self {
        MockFault::Error(ErrorReply::openai(
            status,
            "server_error",
            None,
            "The server had an error while processing your request.",
        ))
    }

    /// Anthropic's 529 `overloaded_error`.
    pub fn overloaded() -> Self {
        MockFault::Error(
            ErrorReply::anthropic(529, "overloaded_error", "Overloaded")
                .header("request-id", "req_mock_overloaded"),
        )
    }

    /// 400 `context_length_exceeded`.
    pub fn context_length() -> Self {
        MockFault::Error(ErrorReply::openai(
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
            "This model's maximum context length is 128000 tokens.",
        ))
    }
}

/// What the server did with a request, for its counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Served {
    /// A normal completion (streamed or not), `length` included.
    Ok,
    /// 429 rate limited by the script.
    RateLimited,
    /// 429 because the server's own requests/tokens-per-minute limit was
    /// exceeded.
    LimitExceeded,
    /// 429 quota exhausted.
    Quota,
    /// 500, 502 or 504.
    ServerError,
    /// 503.
    Unavailable,
    /// 529.
    Overloaded,
    /// 400 context length.
    ContextLength,
    /// Any other error status.
    OtherError,
    /// Held without an answer.
    Hang,
    /// Connection closed without a response.
    Reset,
    /// A stream dropped after some chunks.
    MidStreamDrop,
    /// A stream carried an error event.
    StreamErrorEvent,
}

impl Served {
    /// Every kind, in counter order.
    pub const ALL: [Served; 13] = [
        Served::Ok,
        Served::RateLimited,
        Served::LimitExceeded,
        Served::Quota,
        Served::ServerError,
        Served::Unavailable,
        Served::Overloaded,
        Served::ContextLength,
        Served::OtherError,
        Served::Hang,
        Served::Reset,
        Served::MidStreamDrop,
        Served::StreamErrorEvent,
    ];

    pub(crate) fn index(self) -> usize {
        Served::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    pub(crate) fn of(fault: &MockFault) -> Served {
        match fault {
            MockFault::Ok | MockFault::Length => Served::Ok,
            MockFault::Hang => Served::Hang,
            MockFault::Reset => Served::Reset,
            MockFault::MidStreamDrop { .. } => Served::MidStreamDrop,
            MockFault::StreamErrorEvent { .. } => Served::StreamErrorEvent,
            MockFault::Error(e) => {
                let word =
                    |w: &str| e.code.as_deref() == Some(w) || e.error_type.as_deref() == Some(w);
                let quota = [e.code.as_deref(), e.error_type.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|w| {
                        w == "insufficient_quota"
                            || w.ends_with("_spend_limit_exceeded")
                            || w == "credit_balance_exhausted"
                            || w == "enforced_spend_limit_reached"
                    });
                match e.status {
                    429 if quota => Served::Quota,
                    429 => Served::RateLimited,
                    400 if word("context_length_exceeded") => Served::ContextLength,
                    500 | 502 | 504 => Served::ServerError,
                    503 => Served::Unavailable,
                    529 => Served::Overloaded,
                    _ => Served::OtherError,
                }
            }
        }
    }
}

/// Fault rules for a span of time.
#[derive(Clone, Debug)]
pub struct FaultWindow {
    pub(crate) window: Window,
    pub(crate) faults: Vec<(MockFault, f64)>,
    pub(crate) latency: Option<Latency>,
}

impl FaultWindow {
    /// Rules for `window` (measured from the server's start).
    pub fn new(window: Window) -> Self {
        Self {
            window,
            faults: Vec::new(),
            latency: None,
        }
    }

    /// Answers `fault` to a fraction `probability` of the requests.
    pub fn rate(mut self, fault: MockFault, probability: f64) -> Self {
        self.faults.push((fault, probability.clamp(0.0, 1.0)));
        self
    }

    /// Every request fails with `fault` (an outage window).
    pub fn outage(self, fault: MockFault) -> Self {
        self.rate(fault, 1.0)
    }

    /// Latency of every answer inside the window.
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = Some(latency);
        self
    }
}

/// How the mock server behaves: a fixed sequence of answers first, then
/// per-window fault rates, latency, and its own rate limits. Seeded.
#[derive(Clone, Debug)]
pub struct FaultScript {
    pub(crate) seed: u64,
    pub(crate) sequence: Vec<MockFault>,
    pub(crate) windows: Vec<FaultWindow>,
    pub(crate) latency: Option<Latency>,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) reply_words: usize,
    pub(crate) chunks: usize,
    pub(crate) chunk_gap: Duration,
    pub(crate) api_key: Option<String>,
    pub(crate) api_key_header: Option<String>,
    pub(crate) required_query: Vec<(String, String)>,
    pub(crate) null_fields: bool,
}

impl Default for FaultScript {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultScript {
    /// A well-behaved server: every request succeeds at once.
    pub fn new() -> Self {
        Self {
            seed: 0,
            sequence: Vec::new(),
            windows: Vec::new(),
            latency: None,
            rpm: None,
            tpm: None,
            reply_words: 12,
            chunks: 4,
            chunk_gap: Duration::ZERO,
            api_key: None,
            api_key_header: None,
            required_query: Vec::new(),
            null_fields: false,
        }
    }

    /// The seed of every random decision.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The next request (after those already queued) is answered with
    /// `fault`, before any rate or window applies.
    pub fn then(mut self, fault: MockFault) -> Self {
        self.sequence.push(fault);
        self
    }

    /// `n` requests answered with `fault`, in sequence.
    pub fn then_n(mut self, n: usize, fault: MockFault) -> Self {
        self.sequence.extend(std::iter::repeat_n(fault, n));
        self
    }

    /// Answers `fault` to a fraction `probability` of requests, all the time.
    pub fn rate(self, fault: MockFault, probability: f64) -> Self {
        self.window(FaultWindow::new(Window::ALWAYS).rate(fault, probability))
    }

    /// Adds rules for a time window; windows are checked in the order added.
    pub fn window(mut self, window: FaultWindow) -> Self {
        self.windows.push(window);
        self
    }

    /// Every request inside `window` fails with `fault`.
    pub fn outage(self, window: Window, fault: MockFault) -> Self {
        self.window(FaultWindow::new(window).outage(fault))
    }

    /// Latency of every answer, unless a window sets its own.
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = Some(latency);
        self
    }

    /// The server's own requests-per-minute limit (429 when exceeded).
    pub fn requests_per_minute(mut self, rpm: u64) -> Self {
        self.rpm = Some(rpm);
        self
    }

    /// The server's own tokens-per-minute limit (429 when exceeded).
    pub fn tokens_per_minute(mut self, tpm: u64) -> Self {
        self.tpm = Some(tpm);
        self
    }

    /// Words in each completion (default 12).
    pub fn reply_words(mut self, n: usize) -> Self {
        self.reply_words = n.max(1);
        self
    }

    /// Chunks a streamed completion is split into (default 4).
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n.max(1);
        self
    }

    /// Pause between streamed chunks (default none).
    pub fn chunk_gap(mut self, gap: Duration) -> Self {
        self.chunk_gap = gap;
        self
    }

    /// Requires `Authorization: Bearer <key>`; other requests get 401.
    pub fn require_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Requires the key alone in header `name` (Azure OpenAI's `api-key`)
    /// instead of `Authorization: Bearer`; other requests get 401.
    pub fn require_api_key_header(mut self, name: &str, key: impl Into<String>) -> Self {
        self.api_key_header = Some(name.to_ascii_lowercase());
        self.api_key = Some(key.into());
        self
    }

    /// Requires the query parameter `name=value` (Azure OpenAI's
    /// `api-version`); other requests get 400.
    pub fn require_query(mut self, name: &str, value: &str) -> Self {
        self.required_query
            .push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends the fields a provider may leave `null` as `null`: the id, the
    /// system fingerprint, the prompt and total token counts, the usage
    /// details, and in every chunk `usage`, `error`, `refusal` and
    /// `tool_calls`.
    pub fn null_fields(mut self) -> Self {
        self.null_fields = true;
        self
    }
}

/// A snapshot of what the server did with the requests it received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockStats {
    /// Every request received (valid or not).
    pub total: u64,
    /// Prompt plus completion tokens of the completions served.
    pub tokens: u64,
    pub(crate) counts: [u64; Served::ALL.len()],
}

impl MockStats {
    /// Requests answered as `served`.
    pub fn get(&self, served: Served) -> u64 {
        self.counts[served.index()]
    }

    /// Every non-zero count, in [`Served::ALL`] order.
    pub fn nonzero(&self) -> Vec<(Served, u64)> {
        Served::ALL
            .iter()
            .map(|s| (*s, self.get(*s)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
