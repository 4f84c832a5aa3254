//! The client's builder: endpoint, auth, default headers and query
//! parameters, timeouts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};

use super::{Config, OpenAiClient};
use crate::error::ConfigError;

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
pub struct OpenAiClientBuilder {
    base_url: String,
    api_key: Option<String>,
    auth: Auth,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    model: Arc<str>,
    include_usage: bool,
    connect_timeout: Duration,
    first_byte_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    http: Option<reqwest::Client>,
}

impl fmt::Debug for OpenAiClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClientBuilder")
            .field("base_url", &self.base_url)
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

fn nonzero(d: Duration, field: &'static str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(field, "must be greater than zero"))
    } else {
        Ok(d)
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
            model: "gpt-4o-mini".into(),
            include_usage: true,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: None,
            total_timeout: Some(Duration::from_secs(600)),
            idle_timeout: Some(Duration::from_secs(60)),
            http: None,
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
        b.check_env()?;
        Ok(b)
    }

    fn check_env(&self) -> Result<(), ConfigError> {
        if let Some(k) = &self.api_key {
            sensitive(k, "OPENAI_API_KEY")?;
        }
        if reqwest::Url::parse(&self.base_url).is_err() {
            return Err(ConfigError::new(
                "OPENAI_BASE_URL",
                "must be an http:// or https:// URL",
            ));
        }
        for (name, value) in &self.headers {
            let var = match name.as_str() {
                "openai-organization" => "OPENAI_ORG_ID",
                _ => "OPENAI_PROJECT_ID",
            };
            sensitive(value, var)?;
        }
        Ok(())
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

    /// The model used when a request names none.
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = model.into();
        self
    }

    /// Whether a streamed request asks for usage on its last chunk
    /// (`stream_options.include_usage`); default on. Turn it off for a
    /// compatible server that rejects the field.
    pub fn stream_include_usage(mut self, on: bool) -> Self {
        self.include_usage = on;
        self
    }

    /// Time to establish a connection; default 5 s.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Time from sending to the response headers; default off.
    pub fn first_byte_timeout(mut self, t: Duration) -> Self {
        self.first_byte_timeout = Some(t);
        self
    }

    /// Time for the whole request, body included; default 10 minutes.
    pub fn total_timeout(mut self, t: Duration) -> Self {
        self.total_timeout = Some(t);
        self
    }

    /// No total timeout (streams that may run for long).
    pub fn no_total_timeout(mut self) -> Self {
        self.total_timeout = None;
        self
    }

    /// The longest silence between two chunks of a stream; default 60 s.
    pub fn stream_idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = Some(t);
        self
    }

    /// Use this reqwest client (its own TLS, proxy and pool settings) instead
    /// of building one; the connect and total timeouts are then the client's.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    fn url(&self) -> Result<(String, String), ConfigError> {
        const BAD: ConfigError = ConfigError::new("base_url", "must be an http:// or https:// URL");
        let mut url = reqwest::Url::parse(self.base_url.trim()).map_err(|_| BAD)?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(BAD);
        }
        let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
        url.set_path(&path);
        if !self.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in &self.query {
                pairs.append_pair(k, v);
            }
        }
        url.set_fragment(None);
        let base = self.base_url.trim().trim_end_matches('/').to_owned();
        Ok((url.into(), base))
    }

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
        let (url, base_url) = self.url()?;
        if self.model.is_empty() {
            return Err(ConfigError::new("model", "must not be empty"));
        }
        let connect_timeout = nonzero(self.connect_timeout, "connect_timeout")?;
        if let Some(t) = self.first_byte_timeout {
            nonzero(t, "first_byte_timeout")?;
        }
        if let Some(t) = self.total_timeout {
            nonzero(t, "total_timeout")?;
        }
        if let Some(t) = self.idle_timeout {
            nonzero(t, "stream_idle_timeout")?;
        }
        let headers = self.header_map()?;
        let http = match self.http {
            Some(c) => c,
            None => {
                let mut b = reqwest::Client::builder().connect_timeout(connect_timeout);
                if let Some(t) = self.total_timeout {
                    b = b.timeout(t);
                }
                b.build()
                    .map_err(|_| ConfigError::new("http_client", "could not be built"))?
            }
        };
        Ok(OpenAiClient {
            config: Arc::new(Config {
                http,
                url,
                base_url,
                model: self.model,
                headers,
                has_key: self.api_key.is_some(),
                include_usage: self.include_usage,
                first_byte_timeout: self.first_byte_timeout,
                idle_timeout: self.idle_timeout,
                connect_timeout,
                total_timeout: self.total_timeout,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_names_the_field() {
        assert_eq!(
            OpenAiClient::new("ftp://x", "k").unwrap_err().field,
            "base_url"
        );
        assert_eq!(
            OpenAiClient::new("http://localhost", "bad\nkey")
                .unwrap_err()
                .field,
            "api_key"
        );
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .connect_timeout(Duration::ZERO)
                .build()
                .unwrap_err()
                .field,
            "connect_timeout"
        );
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .model("")
                .build()
                .unwrap_err()
                .field,
            "model"
        );
        assert_eq!(
            OpenAiClient::builder("http://localhost")
                .header("bad name", "x")
                .build()
                .unwrap_err()
                .field,
            "header"
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
