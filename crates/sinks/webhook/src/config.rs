//! The webhook sink's settings (`sink: webhook:`), checked on their own.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::PgConnConfig;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkResult};

use crate::encoding::Format;
use crate::sink::WebhookSink;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// The endpoint, e.g. https://hooks.internal/sluice.
    pub url: String,
    /// PEM file of the authority that signed an https endpoint's certificate (without
    /// it, the system's trusted authorities).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The same authority as PEM text, in place of `ca_file` (tenants give it so).
    #[serde(default)]
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub format: Format,
    /// Events per request at most.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Request body size at most, in bytes (a single larger event is sent alone).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Signs each request: `X-Sluice-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
    pub secret: Option<SecretString>,
    /// Extra request headers (an `Authorization`, say); never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// Time allowed for one request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first for a request that fails with 5xx, 408, 429 or no answer.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The first retry's wait, doubling up to 10 s.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Requests dead-lettered in a row that open the circuit breaker: the pipeline then
    /// waits (nothing dead-lettered, nothing confirmed) instead of dead-lettering all.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long the breaker stays open before one request may try again.
    #[serde(default = "default_breaker_open_for", with = "humantime_serde")]
    pub breaker_open_for: Duration,
    /// Where snapshot progress and dead letters are kept (schema `sluice`).
    pub state: PgConnConfig,
}

fn default_max_events() -> usize {
    500
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_for() -> Duration {
    Duration::from_secs(30)
}

impl SinkConfigure for WebhookSinkConfig {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn validate(&self, shape: &PipelineShape<'_>) -> Result<(), String> {
        let rest = self.url.strip_prefix("https://").or_else(|| self.url.strip_prefix("http://"));
        let rest = rest.ok_or_else(|| format!("sink.webhook.url: {:?} must start with https:// (or http://)", self.url))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("sink.webhook.url: {:?} names no host", self.url));
        }
        let https = self.url.starts_with("https://");
        sluice_core::https::check_private_ca(https, self.ca_file.as_deref(), self.ca_pem.as_deref(), "sink.webhook.ca_file")?;
        if self.max_events == 0 || self.max_events > 100_000 {
            return Err("sink.webhook.max_events: must be between 1 and 100000".into());
        }
        if self.max_bytes < 1024 || self.max_bytes > 100 * 1024 * 1024 {
            return Err("sink.webhook.max_bytes: must be between 1024 and 104857600".into());
        }
        if self.timeout < Duration::from_millis(10) {
            return Err("sink.webhook.timeout: must be at least 10ms".into());
        }
        if self.breaker_failures == 0 {
            return Err("sink.webhook.breaker_failures: must be at least 1".into());
        }
        for name in self.headers.keys() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(format!("sink.webhook.headers: {name:?} is not a header name (letters, digits, - and _)"));
            }
        }
        if let Some(i) = shape.transforms.iter().position(|s| matches!(s, sluice_core::transform::Step::InsertHeader(_))) {
            return Err(format!(
                "transforms[{i}] (insert_header): the webhook sink sends one request per batch; use sink.webhook.headers instead"
            ));
        }
        Ok(())
    }

    fn state(&self) -> PgConnConfig {
        self.state.clone()
    }

    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move { Ok(Box::new(WebhookSink::connect(self.clone(), ctx).await?) as Box<dyn DynSink>) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<WebhookSinkConfig, String> {
        let c: WebhookSinkConfig = serde_yaml_ng(yaml)?;
        c.validate(&PipelineShape { transforms: &[], enriched: false })?;
        Ok(c)
    }

    // The engine parses YAML; JSON is YAML, and serde_json is what this crate has.
    fn serde_yaml_ng(text: &str) -> Result<WebhookSinkConfig, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    const STATE: &str = r#""state": {"host": "h", "user": "u", "password": "p", "database": "d"}"#;

    #[test]
    fn defaults_and_bad_settings() {
        let c = parse(&format!(r#"{{"url": "http://127.0.0.1:9/hook", {STATE}}}"#)).unwrap();
        assert_eq!((c.format, c.max_events, c.retries), (Format::Debezium, 500, 5));
        for (bad, says) in [
            (r#""url": "ftp://x""#, "must start with https://"),
            (r#""url": "http://x", "ca_file": "/ca.pem""#, "only an https:// url"),
            (r#""url": "http:///x""#, "names no host"),
            (r#""url": "http://x", "max_events": 0"#, "max_events"),
            (r#""url": "http://x", "headers": {"bad header": "v"}"#, "not a header name"),
            (r#""url": "http://x", "colour": "blue""#, "unknown field `colour`"),
        ] {
            let e = parse(&format!("{{{bad}, {STATE}}}")).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
