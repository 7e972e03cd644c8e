//! A client of the Confluent Schema Registry REST API (Sluice's built-in registry or
//! any compatible one): registers the schemas a table's topic is written with.

use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use sluice_core::{ErrorKind, encode_path_segment};

use crate::error::{KafkaSinkError, Result};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Clone)]
pub struct RegistryClient {
    /// With any credentials (`https://user:password@host`: sent as basic auth, as
    /// Confluent's clients do with `basic.auth.credentials.source=URL`).
    base: String,
    /// The url for messages: no password.
    shown: String,
    http: reqwest::Client,
}

impl RegistryClient {
    /// `ca_file` or `ca_pem`: the authority of an https registry's certificate, when
    /// private.
    /// `egress`: where the client may connect (none: anywhere).
    pub fn new(
        base_url: &str,
        ca_file: Option<&std::path::Path>,
        ca_pem: Option<&str>,
        egress: Option<&std::sync::Arc<sluice_core::egress::Egress>>,
    ) -> Result<Self> {
        let shown = sluice_core::https::shown(base_url.trim_end_matches('/'));
        let http = sluice_core::https::client(ca_file, ca_pem, "sink.kafka.registry_ca_file")
            .and_then(|b| sluice_core::egress::guard_http(b, base_url, egress))
            .map_err(|m| KafkaSinkError::new(ErrorKind::Permanent, m))?
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| KafkaSinkError::with_source(ErrorKind::Permanent, format!("schema registry client for {shown}"), e))?;
        Ok(Self { base: base_url.trim_end_matches('/').to_string(), shown, http })
    }

    /// A failed request: a refused certificate said in one line (the fix is in the
    /// configuration), anything else transient.
    fn unreachable(&self, e: reqwest::Error) -> KafkaSinkError {
        match sluice_core::https::certificate_refused(&self.shown, &e, "sink.kafka.registry_ca_file") {
            Some(line) => KafkaSinkError::new(ErrorKind::Permanent, format!("schema registry: {line}")),
            None => {
                KafkaSinkError::with_source(ErrorKind::Transient, format!("schema registry {} unreachable", self.shown), e.without_url())
            }
        }
    }

    /// Registers `schema` under `subject` and returns its id (the existing id when the
    /// subject already has this schema). A schema the subject's compatibility mode
    /// rejects halts the pipeline with the registry's reasons.
    pub async fn register(&self, subject: &str, schema: &Json) -> Result<u32> {
        let url = format!("{}/subjects/{}/versions", self.base, encode_path_segment(subject));
        let body = json!({"schema": schema.to_string()});
        let resp = self.post(&url, &body).await?;
        let status = resp.status();
        let reply: Json = resp.json().await.unwrap_or(Json::Null);
        match status {
            s if s.is_success() => reply["id"].as_u64().map(|id| id as u32).ok_or_else(|| {
                KafkaSinkError::new(
                    ErrorKind::Transient,
                    format!("schema registry {}: no id in the reply to registering {subject}", self.shown),
                )
            }),
            StatusCode::CONFLICT => {
                let reasons = self.reasons(subject, schema).await.unwrap_or_default();
                let detail =
                    if reasons.is_empty() { reply["message"].as_str().unwrap_or("incompatible").to_string() } else { reasons.join("; ") };
                let mode = self.get(&format!("/config/{}?defaultToGlobal=true", encode_path_segment(subject))).await;
                let mode = mode["compatibilityLevel"].as_str().unwrap_or("its compatibility mode").to_string();
                let latest = self.get(&format!("/subjects/{}/versions/latest", encode_path_segment(subject))).await;
                let columns = latest["schema"]
                    .as_str()
                    .and_then(|s| serde_json::from_str::<Json>(s).ok())
                    .map(|old| column_changes(&old, schema))
                    .filter(|c| !c.is_empty())
                    .map_or_else(String::new, |c| format!("{}; ", c.join("; ")));
                Err(KafkaSinkError::new(
                    ErrorKind::Halted,
                    format!(
                        "schema registry rejected the new schema of subject {subject} under {mode}: {columns}registry says: \
                         {detail}. Revert the source change, or change the subject's compatibility (PUT /config/{subject}); \
                         the pipeline resumes by itself"
                    ),
                ))
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(KafkaSinkError::new(ErrorKind::Transient, format!("schema registry {} answered {s} registering {subject}", self.shown)))
            }
            s => Err(KafkaSinkError::new(
                ErrorKind::Permanent,
                format!(
                    "schema registry {} answered {s} registering {subject}: {}",
                    self.shown,
                    sluice_core::one_line(reply["message"].as_str().unwrap_or(""))
                ),
            )),
        }
    }

    /// Deletes `subject` and every version of it for good (soft delete, then hard, as
    /// Confluent's registry requires). A subject that is not there is fine.
    pub async fn delete_subject(&self, subject: &str) -> Result<()> {
        for query in ["", "?permanent=true"] {
            let url = format!("{}/subjects/{}{query}", self.base, encode_path_segment(subject));
            let resp = self.http.delete(&url).send().await.map_err(|e| self.unreachable(e))?;
            let status = resp.status();
            if !(status.is_success() || status == StatusCode::NOT_FOUND) {
                let kind = if status.is_server_error() { ErrorKind::Transient } else { ErrorKind::Permanent };
                return Err(KafkaSinkError::new(
                    kind,
                    format!("schema registry {} answered {status} deleting subject {subject}", self.shown),
                ));
            }
        }
        Ok(())
    }

    /// The registry's explanation of why `schema` is incompatible with the subject.
    async fn reasons(&self, subject: &str, schema: &Json) -> Result<Vec<String>> {
        let url = format!("{}/compatibility/subjects/{}/versions/latest?verbose=true", self.base, encode_path_segment(subject));
        let reply: Json = self.post(&url, &json!({"schema": schema.to_string()})).await?.json().await.unwrap_or(Json::Null);
        Ok(reply["messages"].as_array().map(|m| m.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default())
    }

    /// A GET whose failure only loses detail for a message: `Null` then.
    async fn get(&self, path: &str) -> Json {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Json::Null),
            _ => Json::Null,
        }
    }

    async fn post(&self, url: &str, body: &Json) -> Result<reqwest::Response> {
        self.http.post(url).header("content-type", CONTENT_TYPE).body(body.to_string()).send().await.map_err(|e| self.unreachable(e))
    }
}

/// The row record's fields (name → type) in a value schema: the envelope's `before`
/// record, or the schema itself when it is the row record (unwrapped).
fn row_fields(schema: &Json) -> Vec<(String, Json)> {
    let record = schema["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "before"))
        .and_then(|b| b["type"].as_array())
        .and_then(|u| u.iter().find(|t| t.is_object()))
        .unwrap_or(schema);
    record["fields"]
        .as_array()
        .map(|fs| fs.iter().filter_map(|f| Some((f["name"].as_str()?.to_string(), f["type"].clone()))).collect())
        .unwrap_or_default()
}

fn type_name(t: &Json) -> String {
    match t {
        Json::Array(u) => u.iter().filter(|x| *x != "null").map(type_name).collect::<Vec<_>>().join("|"),
        Json::Object(o) => o.get("logicalType").or_else(|| o.get("type")).map_or_else(|| t.to_string(), type_name),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The columns whose Avro form differs between the registered and the new schema.
fn column_changes(old: &Json, new: &Json) -> Vec<String> {
    let (old, new) = (row_fields(old), row_fields(new));
    let mut out = Vec::new();
    for (name, t) in &new {
        match old.iter().find(|(n, _)| n == name) {
            Some((_, o)) if o != t => out.push(format!("column {name} changed from {} to {}", type_name(o), type_name(t))),
            None => out.push(format!("column {name} was added")),
            _ => {}
        }
    }
    for (name, _) in old.iter().filter(|(n, _)| !new.iter().any(|(m, _)| m == n)) {
        out.push(format!("column {name} was removed"));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn names_the_changed_columns() {
        let table = |n: &str| {
            let row = json!({"type": "record", "name": "Value", "fields": [
                {"name": "id", "type": "long"}, {"name": "n", "type": ["null", n], "default": null}]});
            json!({"type": "record", "name": "Envelope", "fields": [{"name": "before", "type": ["null", row]}]})
        };
        assert_eq!(super::column_changes(&table("long"), &table("int")), ["column n changed from long to int"]);
        assert!(super::column_changes(&table("long"), &table("long")).is_empty());
    }

    #[test]
    fn a_private_authority_is_a_file_or_pem_text_not_both_nor_junk() {
        let err = |file: Option<&std::path::Path>, pem: Option<&str>| {
            super::RegistryClient::new("https://registry.example:8081", file, pem, None).err().map(|e| e.to_string()).unwrap_or_default()
        };
        let junk = err(None, Some("not a certificate"));
        assert!(junk.contains("sink.kafka.registry_ca_pem: not a PEM certificate"), "{junk}");
        let both = err(Some(std::path::Path::new("/etc/ssl/ca.pem")), Some("x"));
        assert!(both.contains("registry_ca_file and sink.kafka.registry_ca_pem both name"), "{both}");
    }
}
