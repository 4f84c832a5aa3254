//! The client's builder: every knob validated once, at `build()`.

use std::fmt;
use std::sync::Arc;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};

use super::transport::{self, transport_setters, Knobs};
use super::{Config, OpenAiClient};
use crate::error::ConfigError;

/// Default cap on a 2xx completion body: 32 MiB. The largest legitimate
/// completion (a few hundred thousand output tokens as JSON) stays well
/// below it; anything larger is a broken or hostile upstream.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Default cap on one server-sent event of a stream: 4 MiB. A chunk of a
/// chat stream is usually well under a kilobyte; a tool call's arguments
/// arrive in many small deltas.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// How the API key is sent.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Auth {
    /// `Authorization: Bearer <key>` (OpenAI and most compatible servers).
    #[default]
    Bearer,
    /// The key alone in this header: Azure OpenAI's `api-key`, or a
    /// gateway's own header.
    Header(String),
}

/// Builds a validated [`OpenAiClient`].
///
/// Every duration knob takes any [`Duration`](std::time::Duration): zero is a [`ConfigError`],
/// and anything from about 100 years up (including [`Duration::MAX`](std::time::Duration::MAX))
/// means "no limit".
pub struct OpenAiClientBuilder {
    base_url: String,
    api_key: Option<String>,
    auth: Auth,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    include_usage: bool,
    model: Arc<str>,
    transport: Knobs,
}

impl fmt::Debug for OpenAiClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClientBuilder")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("auth", &self.auth)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field(
                "query",
                &self.query.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The URL with any `user:password@` replaced, for `Debug` and logs.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            // Both setters fail only for URLs that cannot have credentials,
            // which these are not.
            let _ = u.set_username("redacted");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => url.to_owned(),
        // Unparseable: show no part that could be a credential.
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => url.to_owned(),
        },
    }
}

fn sensitive(value: &str, field: &'static str) -> Result<HeaderValue, ConfigError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| ConfigError::new(field, "must be visible ASCII without line breaks"))?;
    v.set_sensitive(true);
    Ok(v)
}

impl OpenAiClientBuilder {
    pub(super) fn new(base_url: String) -> Self {
        Self {
            base_url,
            api_key: None,
            auth: Auth::Bearer,
            headers: Vec::new(),
            query: Vec::new(),
            include_usage: true,
            model: "gpt-4o-mini".into(),
            transport: Knobs::default(),
        }
    }

    /// A builder from `OPENAI_API_KEY` (required), `OPENAI_BASE_URL`
    /// (default `https://api.openai.com/v1`), `OPENAI_ORG_ID` and
    /// `OPENAI_PROJECT_ID`; a missing or unusable variable is a
    /// [`ConfigError`] whose field is the variable's name. Settings can be
    /// changed before [`build`](Self::build).
    pub fn from_env() -> Result<Self, ConfigError> {
        fn var(name: &'static str) -> Result<Option<String>, ConfigError> {
            match std::env::var(name) {
                Ok(v) if v.trim().is_empty() => Ok(None),
                Ok(v) => Ok(Some(v.trim().to_owned())),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(ConfigError::new(name, "must be valid UTF-8"))
                }
            }
        }
        let key = var("OPENAI_API_KEY")?.ok_or(ConfigError::new("OPENAI_API_KEY", "is not set"))?;
        let base = var("OPENAI_BASE_URL")?.unwrap_or_else(|| "https://api.openai.com/v1".into());
        let mut b = Self::new(base).api_key(key);
        if let Some(org) = var("OPENAI_ORG_ID")? {
            b = b.organization(org);
        }
        if let Some(project) = var("OPENAI_PROJECT_ID")? {
            b = b.project(project);
        }
        // Name the variable, not the builder method, if a value is unusable.
        if let Some(k) = &b.api_key {
            sensitive(k, "OPENAI_API_KEY")?;
        }
        if reqwest::Url::parse(&b.base_url).is_err() {
            return Err(ConfigError::new(
                "OPENAI_BASE_URL",
                "must be an http:// or https:// URL",
            ));
        }
        for (name, value) in &b.headers {
            let var = match name.as_str() {
                "openai-organization" => "OPENAI_ORG_ID",
                _ => "OPENAI_PROJECT_ID",
            };
            sensitive(value, var)?;
        }
        Ok(b)
    }

    /// The API key, sent as [`Auth::Bearer`] unless [`auth`](Self::auth)
    /// says otherwise; always as a sensitive header (never logged). Without
    /// a key no auth header is sent (local servers).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// How the key is sent: [`Auth::Bearer`] (default) or in a named header
    /// (Azure OpenAI: `Auth::Header("api-key".into())`).
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// A header sent with every request (`OpenAI-Beta`, a gateway's routing
    /// header, …). Set twice, the last value wins.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A query parameter added to the URL of every request (Azure OpenAI's
    /// `api-version`).
    pub fn query(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    /// The `OpenAI-Organization` header.
    pub fn organization(self, org: impl Into<String>) -> Self {
        self.header("openai-organization", org)
    }

    /// The `OpenAI-Project` header.
    pub fn project(self, project: impl Into<String>) -> Self {
        self.header("openai-project", project)
    }

    /// Whether a streamed request asks for usage on its last chunk
    /// (`stream_options.include_usage`); default on. Turn it off for a
    /// compatible server that rejects the field.
    pub fn stream_include_usage(mut self, on: bool) -> Self {
        self.include_usage = on;
        self
    }

    /// The model used when a request names none.
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = model.into();
        self
    }

    transport_setters!(
        idle: "The longest a stream may go without a complete event (a chunk, or a keep-alive comment); default 60 s. Bytes that do not complete an event do not count, so a server dripping one byte at a time cannot hold the stream open.",
        body: "The largest non-streamed 2xx body accepted, in bytes (a stream is bounded per event, [`max_event_bytes`](Self::max_event_bytes), and in time).",
        too_large: "[`ClientErrorKind::BodyTooLarge`](crate::client::ClientErrorKind::BodyTooLarge)",
        own_key: "([`ChatRequest::idempotency_key`](crate::client::ChatRequest::idempotency_key)).",
    );

    /// `{base}/chat/completions` with the query parameters.
    fn url(&self, base: &str) -> Result<String, ConfigError> {
        let mut url = reqwest::Url::parse(&format!("{base}/chat/completions"))
            .map_err(|_| ConfigError::new("base_url", "must be an absolute http(s) URL"))?;
        if !self.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in &self.query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url.into())
    }

    /// The auth header (sensitive) and the default headers.
    fn header_map(&self) -> Result<HeaderMap, ConfigError> {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| ConfigError::new("header", "name must be a valid HTTP header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| ConfigError::new("header", "value must be visible ASCII"))?;
            map.insert(name, value);
        }
        if let Some(key) = &self.api_key {
            match &self.auth {
                Auth::Bearer => {
                    map.insert(
                        AUTHORIZATION,
                        sensitive(&format!("Bearer {key}"), "api_key")?,
                    );
                }
                Auth::Header(name) => {
                    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                        ConfigError::new("auth", "header name must be a valid HTTP header name")
                    })?;
                    map.insert(name, sensitive(key, "api_key")?);
                }
            }
        }
        Ok(map)
    }

    /// Validates and builds the client.
    pub fn build(self) -> Result<OpenAiClient, ConfigError> {
        let parsed = transport::base_url(&self.base_url)?;
        // The URL as parsed (normalised), so the request goes where the
        // checks above looked.
        let base = parsed.as_str().trim_end_matches('/');
        if self.model.is_empty() {
            return Err(ConfigError::new("model", "must not be empty"));
        }
        let headers = self.header_map()?;
        let url = self.url(base)?;
        let t = self.transport.check()?;
        // A default header of the same name is the caller's choice.
        let attempt_headers =
            transport::attempt_headers(t.attempt_headers, |n| headers.contains_key(n));
        Ok(OpenAiClient {
            config: Arc::new(Config {
                http: t.http,
                url,
                base_url: redact_url(base),
                model: self.model,
                has_key: self.api_key.is_some(),
                headers,
                include_usage: self.include_usage,
                first_byte_timeout: t.first_byte_timeout,
                idle_timeout: t.idle_timeout,
                connect_timeout: t.connect_timeout,
                total_timeout: t.total_timeout,
                error_body_timeout: t.error_body_timeout,
                max_body_bytes: t.max_body_bytes,
                max_event_bytes: t.max_event_bytes,
                attempt_headers,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn credentials_are_redacted() {
        let r = redact_url("https://alice:s3cret@gw.example/v1");
        assert!(!r.contains("s3cret") && !r.contains("alice"), "{r}");
        assert_eq!(redact_url("http://h:1/v1"), "http://h:1/v1");
        assert!(!redact_url("ht!tp://a:s3cret@x").contains("s3cret"));
    }

    #[test]
    fn durations_zero_is_an_error_and_huge_is_no_limit() {
        assert!(transport::limit(Duration::ZERO, "x").is_err());
        assert_eq!(transport::limit(Duration::MAX, "x").unwrap(), None);
        assert_eq!(
            transport::limit(Duration::from_secs(1), "x").unwrap(),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn bad_headers_name_the_field() {
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .header("bad name", "x")
                .build()
                .unwrap_err()
                .field,
            "header"
        );
        assert_eq!(
            OpenAiClient::new("http://localhost", "bad\nkey")
                .unwrap_err()
                .field,
            "api_key"
        );
    }

    #[test]
    fn query_and_path_of_an_azure_deployment() {
        let c = OpenAiClient::builder("https://r.openai.azure.com/openai/deployments/gpt4o/")
            .query("api-version", "2024-10-21")
            .auth(Auth::Header("api-key".into()))
            .api_key("k")
            .build()
            .unwrap();
        assert_eq!(
            c.config.url,
            "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert!(c.config.headers.get(AUTHORIZATION).is_none());
        assert!(c.config.headers.get("api-key").unwrap().is_sensitive());
    }

    #[test]
    fn debug_redacts_the_key() {
        let b = OpenAiClient::builder("http://localhost:1/v1")
            .api_key("sk-very-secret")
            .organization("org-1");
        assert!(!format!("{b:?}").contains("sk-very-secret"));
        let c = b.build().unwrap();
        let text = format!("{c:?} {:?}", c.streaming());
        assert!(!text.contains("sk-very-secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
