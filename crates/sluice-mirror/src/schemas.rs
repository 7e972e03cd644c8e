//! Schema ids across registries. A record in Confluent's wire format (byte 0, then a
//! 4-byte big-endian schema id, then the data) names its schema by an id of the source
//! cluster's registry, which means nothing (or another schema) in the target's. The
//! mirror copies each schema it meets to the target registry, under the subjects it
//! has on the source (a `{topic}-key`/`{topic}-value` subject follows its topic's
//! target name) with their compatibility level, and rewrites the id in the record to
//! the target's. Ids are cached: a schema costs a few HTTP calls once per run.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sluice_core::encode_path_segment;

use sluice_core::egress::Egress;

use crate::config::MirrorConfig;
use crate::error::{MirrorError, Result};

pub(crate) struct SchemaIds {
    source: String,
    target: String,
    agent: ureq::Agent,
    /// Source id -> target id; `None`: not a schema of the source registry (a value
    /// that happens to start with byte 0), copied as it is.
    ids: HashMap<u32, Option<u32>>,
}

impl SchemaIds {
    pub fn new(cfg: &MirrorConfig) -> Option<Self> {
        let (source, target) = (cfg.source().registry_url.as_ref()?, cfg.target().registry_url.as_ref()?);
        let config = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(std::time::Duration::from_secs(30)));
        let agent = match &cfg.egress {
            None => config.build().into(),
            // Through a proxy the policy would check the proxy, not the registry.
            Some(policy) => ureq::Agent::with_parts(
                config.proxy(None).build(),
                ureq::unversioned::transport::DefaultConnector::default(),
                Guarded(policy.clone()),
            ),
        };
        Some(Self { source: source.trim_end_matches('/').into(), target: target.trim_end_matches('/').into(), agent, ids: HashMap::new() })
    }

    /// `bytes` with its schema id rewritten to the target's, into `out`; `None` when the
    /// bytes are not in the wire format (or name no schema of the source), to be
    /// copied as they are.
    pub fn rewrite<'a>(&mut self, cfg: &MirrorConfig, bytes: &[u8], out: &'a mut Vec<u8>) -> Result<Option<&'a [u8]>> {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Ok(None);
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let target = match self.ids.get(&id) {
            Some(t) => *t,
            None => {
                let t = self.copy_schema(cfg, id)?;
                self.ids.insert(id, t);
                t
            }
        };
        let Some(t) = target else { return Ok(None) };
        out.clear();
        out.push(0);
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&bytes[5..]);
        Ok(Some(out.as_slice()))
    }

    fn get(&self, base: &str, path: &str) -> Result<Option<Value>> {
        let url = format!("{base}{path}");
        let mut r = self.agent.get(&url).call().map_err(|e| failed(e, format!("schema registry {base}: GET {path}")))?;
        match r.status().as_u16() {
            404 => Ok(None),
            200 => r.body_mut().read_json().map(Some).map_err(|e| MirrorError::retry(format!("schema registry {base}: GET {path}: {e}"))),
            s => Err(MirrorError::retry(format!("schema registry {base}: GET {path} answered {s}"))),
        }
    }

    fn send(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.target);
        let req = match method {
            "PUT" => self.agent.put(&url),
            _ => self.agent.post(&url),
        };
        let mut r = req
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .send_json(body)
            .map_err(|e| failed(e, format!("target schema registry: {method} {path}")))?;
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
        if status != 200 {
            // A refusal (incompatible schema, read-only registry) needs a person: say
            // which subject, and keep the mirror stopped rather than copy undecodable records.
            return Err(MirrorError::fatal(format!(
                "target schema registry refused {method} {path} ({status}: {}); fix the target registry (compatibility, mode) and start the mirror again",
                sluice_core::one_line(v.get("message").and_then(Value::as_str).unwrap_or("no message"))
            )));
        }
        Ok(v)
    }

    /// The subject's name on the target: a topic's subject follows the topic's name.
    fn target_subject(cfg: &MirrorConfig, subject: &str) -> String {
        for suffix in ["-key", "-value"] {
            if let Some(topic) = subject.strip_suffix(suffix)
                && !topic.is_empty()
                && !cfg.excluded(topic)
            {
                return format!("{}{suffix}", cfg.target_topic(topic));
            }
        }
        subject.to_string()
    }

    fn copy_schema(&self, cfg: &MirrorConfig, id: u32) -> Result<Option<u32>> {
        let Some(versions) = self.get(&self.source, &format!("/schemas/ids/{id}/versions"))? else {
            tracing::warn!(
                id,
                "a record starts like Confluent's wire format but the source registry has no such schema id; copied as it is"
            );
            return Ok(None);
        };
        let mut target_id = None;
        for sv in versions.as_array().into_iter().flatten() {
            let (Some(subject), Some(version)) = (sv["subject"].as_str(), sv["version"].as_i64()) else { continue };
            let Some(v) = self.get(&self.source, &format!("/subjects/{}/versions/{version}", encode_path_segment(subject)))? else {
                continue;
            };
            let to = Self::target_subject(cfg, subject);
            if let Some(c) = self.get(&self.source, &format!("/config/{}", encode_path_segment(subject)))?
                && let Some(level) = c.get("compatibilityLevel").or(c.get("compatibility")).and_then(Value::as_str)
            {
                self.send("PUT", &format!("/config/{}", encode_path_segment(&to)), json!({"compatibility": level}))?;
            }
            let mut body = json!({"schema": v["schema"]});
            if let Some(t) = v.get("schemaType") {
                body["schemaType"] = t.clone();
            }
            if let Some(r) = v.get("references") {
                body["references"] = r.clone();
            }
            let got = self.send("POST", &format!("/subjects/{}/versions", encode_path_segment(&to)), body)?;
            let tid = got["id"].as_u64().and_then(|i| u32::try_from(i).ok());
            tracing::info!(subject = %to, source_id = id, target_id = ?tid, "copied a schema to the target registry");
            target_id = target_id.or(tid);
        }
        if target_id.is_none() {
            return Err(MirrorError::fatal(format!("schema id {id} of the source registry has no subject to copy it under")));
        }
        Ok(target_id)
    }
}

/// A registry that cannot be reached is worth retrying; one the egress policy refuses
/// is not, and the policy's one line says why.
fn failed(e: ureq::Error, context: String) -> MirrorError {
    match e {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            MirrorError::fatal(format!("{context}: egress refused: {io}"))
        }
        e => MirrorError::retry(format!("{context}: {e}")),
    }
}

/// The registries' resolver under a server's egress policy: the addresses a name
/// resolves to are checked here, and only those are connected to, so a name that
/// moves to a refused address after the mirror's hosts were checked is refused too.
#[derive(Debug)]
struct Guarded(Arc<Egress>);

impl ureq::unversioned::resolver::Resolver for Guarded {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        for a in &addrs {
            self.0.check_ip(host, a.ip()).map_err(|m| ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, m)))?;
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A registry on 127.0.0.1 that knows no schema, counting the connections it takes.
    fn registry() -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                s.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let body = r#"{"error_code":40403,"message":"Schema not found"}"#;
                let _ = write!(
                    c,
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (port, seen)
    }

    fn config(port: u16, policy: Option<&str>) -> MirrorConfig {
        let text = format!(
            "pipeline: m\nsource:\n  kafka: {{cluster: a, brokers: 'x:1', topics: [t], registry_url: 'http://localhost:{port}'}}\nsink:\n  kafka: {{cluster: b, brokers: 'y:1', registry_url: 'http://localhost:{port}'}}\n"
        );
        let mut cfg = MirrorConfig::parse(&text).unwrap();
        cfg.egress = policy.map(|p| Arc::new(Egress::parse(p).unwrap()));
        cfg
    }

    #[test]
    fn registries_are_reached_only_where_the_egress_policy_lets_them() {
        let (port, seen) = registry();
        let record = [0u8, 0, 0, 0, 7, 1, 2, 3];
        let mut out = Vec::new();

        // `localhost` is a name: the resolver checks what it resolves to, and connects nowhere.
        let cfg = config(port, Some(""));
        let e = SchemaIds::new(&cfg).unwrap().rewrite(&cfg, &record, &mut out).unwrap_err();
        assert!(!e.is_retryable() && e.to_string().contains("egress refused") && e.to_string().contains("loopback"), "{e}");
        assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing connected");

        // Allowed by the policy, or with no policy (`sluice run`), the registry answers.
        for policy in [Some("127.0.0.1/32"), None] {
            let cfg = config(port, policy);
            let before = seen.load(Ordering::SeqCst);
            assert_eq!(SchemaIds::new(&cfg).unwrap().rewrite(&cfg, &record, &mut out).unwrap(), None);
            assert!(seen.load(Ordering::SeqCst) > before, "{policy:?}: the registry was asked");
        }
    }
}
