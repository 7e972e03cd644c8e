//! A client of the Confluent Schema Registry REST API (Sluice's built-in registry or
//! any compatible one): registers the schemas a table's topic is written with.

use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use sluice_core::ErrorKind;

use crate::error::{Result, SinkError};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

fn encode_subject(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RegistryClient {
    pub fn new(base_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| SinkError::with_source(ErrorKind::Permanent, format!("schema registry client for {base_url}"), e))?;
        Ok(Self { base: base_url.trim_end_matches('/').to_string(), http })
    }

    /// Registers `schema` under `subject` and returns its id (the existing id when the
    /// subject already has this schema). A schema the subject's compatibility mode
    /// rejects halts the pipeline with the registry's reasons.
    pub async fn register(&self, subject: &str, schema: &Json) -> Result<u32> {
        let url = format!("{}/subjects/{}/versions", self.base, encode_subject(subject));
        let body = json!({"schema": schema.to_string()});
        let resp = self.post(&url, &body).await?;
        let status = resp.status();
        let reply: Json = resp.json().await.unwrap_or(Json::Null);
        match status {
            s if s.is_success() => reply["id"]
                .as_u64()
                .map(|id| id as u32)
                .ok_or_else(|| SinkError::new(ErrorKind::Transient, format!("schema registry {}: no id in the reply to registering {subject}", self.base))),
            StatusCode::CONFLICT => {
                let reasons = self.reasons(subject, schema).await.unwrap_or_default();
                let detail = if reasons.is_empty() { reply["message"].as_str().unwrap_or("incompatible").to_string() } else { reasons.join("; ") };
                Err(SinkError::new(
                    ErrorKind::Halted,
                    format!(
                        "schema registry rejected the new schema of subject {subject} as incompatible: {detail}. \
                         Revert the source change, or change the subject's compatibility (PUT /config/{subject}); \
                         the pipeline resumes by itself"
                    ),
                ))
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Err(SinkError::new(
                ErrorKind::Transient,
                format!("schema registry {} answered {s} registering {subject}", self.base),
            )),
            s => Err(SinkError::new(
                ErrorKind::Permanent,
                format!("schema registry {} answered {s} registering {subject}: {}", self.base, reply["message"].as_str().unwrap_or("")),
            )),
        }
    }

    /// The registry's explanation of why `schema` is incompatible with the subject.
    async fn reasons(&self, subject: &str, schema: &Json) -> Result<Vec<String>> {
        let url = format!("{}/compatibility/subjects/{}/versions/latest?verbose=true", self.base, encode_subject(subject));
        let reply: Json = self.post(&url, &json!({"schema": schema.to_string()})).await?.json().await.unwrap_or(Json::Null);
        Ok(reply["messages"].as_array().map(|m| m.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default())
    }

    async fn post(&self, url: &str, body: &Json) -> Result<reqwest::Response> {
        self.http
            .post(url)
            .header("content-type", CONTENT_TYPE)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| SinkError::with_source(ErrorKind::Transient, format!("schema registry {} unreachable", self.base), e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_with_contexts_are_escaped() {
        assert_eq!(super::encode_subject(":.team-a:shop.public.items-value"), "%3A.team-a%3Ashop.public.items-value");
    }
}
