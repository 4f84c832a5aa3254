//! The validated builder of [`AnthropicClient`].

use std::fmt;
use std::sync::Arc;

use reqwest::header::{HeaderName, HeaderValue};

use super::{AnthropicClient, Config, Limits};
use crate::client::builder::redact_url;
use crate::client::transport::{self, transport_setters, Knobs};
use crate::error::ConfigError;

/// Anthropic's API endpoint, the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` sent by default (the Messages API's version).
pub const DEFAULT_VERSION: &str = "2023-06-01";
/// The model used when neither the client nor the request names one.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// `max_tokens` when the request sets none (the API requires it); LiteLLM
/// uses the same default for Anthropic models.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// The default cap on a 2xx body, and on a whole stream: 32 MiB. The
/// largest legitimate message (a few hundred thousand output tokens as
/// JSON) stays well below it; anything larger is a broken or hostile
/// upstream.
pub const DEFAULT_MAX_BODY_BYTES: usize = crate::client::DEFAULT_MAX_BODY_BYTES;
/// The default cap on one server-sent event: 4 MiB (an Anthropic event is a
/// delta, usually well under a kilobyte).
pub const DEFAULT_MAX_EVENT_BYTES: usize = crate::client::DEFAULT_MAX_EVENT_BYTES;

/// Builds a validated [`AnthropicClient`]; from
/// [`AnthropicClient::builder`] or [`AnthropicClient::builder_from_env`].
///
/// `Debug` never shows the key.
pub struct AnthropicClientBuilder {
    base_url: String,
    api_key: Option<String>,
    model: Arc<str>,
    max_tokens: u32,
    version: String,
    betas: Vec<String>,
    headers: Vec<(String, String)>,
    transport: Knobs,
}

impl fmt::Debug for AnthropicClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicClientBuilder")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("max_tokens", &self.max_tokens)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Default for AnthropicClientBuilder {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key: None,
            model: Arc::from(DEFAULT_MODEL),
            max_tokens: DEFAULT_MAX_TOKENS,
            version: DEFAULT_VERSION.to_owned(),
            betas: Vec::new(),
            headers: Vec::new(),
            transport: Knobs::default(),
        }
    }
}

fn header_value(v: &str, field: &'static str) -> Result<HeaderValue, ConfigError> {
    HeaderValue::from_str(v)
        .map_err(|_| ConfigError::new(field, "must be visible ASCII without line breaks"))
}

impl AnthropicClientBuilder {
    /// Reads `ANTHROPIC_API_KEY` (required) and `ANTHROPIC_BASE_URL`
    /// (optional), as Anthropic's SDKs do.
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let key = get("ANTHROPIC_API_KEY")
            .filter(|k| !k.is_empty())
            .ok_or(ConfigError::new(
                "ANTHROPIC_API_KEY",
                "environment variable must be set",
            ))?;
        let mut b = Self::default().api_key(key);
        if let Some(url) = get("ANTHROPIC_BASE_URL").filter(|u| !u.is_empty()) {
            b = b.base_url(url);
        }
        Ok(b)
    }

    /// The API's base URL; default `https://api.anthropic.com`. Requests go
    /// to `{base_url}/v1/messages` (a base ending in `/v1` is taken as is).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// The API key, sent as `x-api-key` (a sensitive header, never shown by
    /// `Debug` or logs).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The model used when a request names none; default
    /// [`DEFAULT_MODEL`].
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = model.into();
        self
    }

    /// `max_tokens` when a request sets none; default
    /// [`DEFAULT_MAX_TOKENS`].
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = n;
        self
    }

    /// The `anthropic-version` header; default [`DEFAULT_VERSION`].
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds an `anthropic-beta` feature (sent comma-separated).
    pub fn beta(mut self, feature: impl Into<String>) -> Self {
        self.betas.push(feature.into());
        self
    }

    /// A header sent with every request (a gateway's own auth, say).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    transport_setters!(
        idle: "The longest a stream may go without a complete event (`ping` included), and a non-streamed body may take once its headers arrived; default 60 s. Bytes that do not complete an event do not count, so a server dripping one byte at a time cannot hold a stream open.",
        body: "The largest 2xx body, or whole stream, accepted, in bytes.",
        too_large: "[`AnthropicErrorKind::TooLarge`](super::AnthropicErrorKind::TooLarge)",
        own_key: "([`MessagesRequest::idempotency_key`](super::MessagesRequest::idempotency_key)).",
    );

    /// Validates and builds the client.
    pub fn build(self) -> Result<AnthropicClient, ConfigError> {
        let parsed = transport::base_url(&self.base_url)?;
        // The URL as parsed (normalised), so the request goes where the
        // checks above looked.
        let base = parsed.as_str().trim_end_matches('/');
        if self.model.is_empty() {
            return Err(ConfigError::new("model", "must not be empty"));
        }
        if self.max_tokens == 0 {
            return Err(ConfigError::new("max_tokens", "must be greater than zero"));
        }
        let t = self.transport.check()?;
        let limits = Limits {
            idle_timeout: t.idle_timeout,
            max_bytes: t.max_body_bytes,
            max_event_bytes: t.max_event_bytes,
        };

        let mut headers = Vec::new();
        if let Some(key) = &self.api_key {
            let mut v = header_value(key, "api_key")?;
            v.set_sensitive(true);
            headers.push((HeaderName::from_static("x-api-key"), v));
        }
        headers.push((
            HeaderName::from_static("anthropic-version"),
            header_value(&self.version, "version")?,
        ));
        if !self.betas.is_empty() {
            headers.push((
                HeaderName::from_static("anthropic-beta"),
                header_value(&self.betas.join(","), "beta")?,
            ));
        }
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::new("header", "name must be a valid header name"))?;
            headers.push((name, header_value(value, "header")?));
        }
        // A default header of the same name is the caller's choice.
        let attempt_headers =
            transport::attempt_headers(t.attempt_headers, |n| headers.iter().any(|(h, _)| h == n));
        let endpoint = if base.ends_with("/v1") {
            format!("{base}/messages")
        } else {
            format!("{base}/v1/messages")
        };
        Ok(AnthropicClient {
            config: Arc::new(Config {
                http: t.http,
                url: endpoint,
                base_url: redact_url(base),
                model: self.model,
                max_tokens: self.max_tokens,
                headers,
                has_key: self.api_key.is_some(),
                first_byte_timeout: t.first_byte_timeout,
                total_timeout: t.total_timeout,
                connect_timeout: t.connect_timeout,
                limits,
                error_body_timeout: t.error_body_timeout,
                attempt_headers,
            }),
        })
    }
}
