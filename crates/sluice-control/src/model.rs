//! The resources a tenant creates (sources, sinks, pipelines): their request shapes,
//! strictly parsed (unknown keys refused), and how they combine into the pipeline
//! config the runner takes. Requests are YAML or JSON (JSON is YAML).

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use sluice_core::sink::PipelineShape;
use sluice_engine::config::{OnSlotLost, PipelineConfig, SourceConfig};
use sluice_engine::sinks::SinkConfig;

/// A request the API refuses: the field it concerns (a dotted path) and why.
#[derive(Debug)]
pub struct Invalid {
    pub field: Option<String>,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), message: format!("{field}: {}", message.into()) }
    }

    /// From a parser or validator message that starts with the key (`a.b: ...`).
    pub(crate) fn from_message(message: String) -> Self {
        let head = message.split(": ").next().unwrap_or("");
        let looks_like_path =
            !head.is_empty() && head.len() < message.len() && head.chars().all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c));
        Self { field: looks_like_path.then(|| head.to_string()), message }
    }
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, Invalid> {
    let text = std::str::from_utf8(body).map_err(|_| Invalid { field: None, message: format!("{what}: the body is not UTF-8") })?;
    if text.trim().is_empty() {
        return Err(Invalid { field: None, message: format!("{what}: the body is empty; send YAML or JSON") });
    }
    serde_yaml::from_str(text).map_err(|e| Invalid::from_message(e.to_string().replace('\n', " ")))
}

/// A tenant's alert settings (`sluice_engine::alerts::AlertConfig`), checked; with the
/// form shown back (the webhook URL hidden).
pub fn parse_alerts(body: &[u8]) -> Result<(sluice_engine::alerts::AlertConfig, Value, Value), Invalid> {
    let raw: Value = parse(body, "alerts")?;
    let cfg: sluice_engine::alerts::AlertConfig =
        serde_json::from_value(raw.clone()).map_err(|e| Invalid::from_message(format!("alerts: {e}")))?;
    cfg.validate().map_err(|m| {
        let field = m.strip_prefix("alerts.").and_then(|r| r.split(':').next()).unwrap_or("alerts").to_string();
        Invalid::new(&field, m)
    })?;
    let mut public = raw.clone();
    public["webhook_url"] = json!("(secret)");
    public["configured"] = json!(true);
    Ok((cfg, raw, public))
}

/// A resync request: the tables to read again (none named: all of the pipeline's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncSpec {
    #[serde(default)]
    pub tables: Vec<String>,
}

impl ResyncSpec {
    /// An empty body asks for every table.
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        parse(body, "resync")
    }
}

/// Resource names: they appear in URLs and in generated object names.
pub fn check_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("{name:?} must be 1-40 characters of a-z, 0-9, _ and -, starting with a letter or digit")))
    }
}

/// Takes a resource's `name` out of a request whose other keys are its settings.
fn take_name(map: &mut serde_json::Map<String, Value>, what: &str) -> Result<String, Invalid> {
    let name = match map.remove("name") {
        Some(Value::String(n)) => n,
        Some(_) => return Err(Invalid::new("name", "must be a string")),
        None => return Err(Invalid::new("name", format!("missing; name the {what}"))),
    };
    check_name("name", &name)?;
    Ok(name)
}

/// A Postgres database to capture from, with the credentials used for provisioning
/// only (the pipelines themselves run as a generated least-privilege role).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database: String,
    pub admin_user: String,
    pub admin_password: SecretString,
    /// libpq's `sslmode`; `verify-ca`/`verify-full` trust the public web authorities
    /// (certificate files are the server operator's, never named by a tenant).
    #[serde(default)]
    pub sslmode: sluice_core::SslMode,
    /// A private authority to trust instead, as PEM text (public: it is a certificate).
    #[serde(default)]
    pub sslrootcert_pem: Option<String>,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

fn default_port() -> u16 {
    5432
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}

impl SourceSpec {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let s: Self = parse(body, "source")?;
        check_name("name", &s.name)?;
        for (f, v) in [("host", &s.host), ("database", &s.database), ("admin_user", &s.admin_user)] {
            if v.trim().is_empty() {
                return Err(Invalid::new(f, "must not be empty"));
            }
        }
        if s.heartbeat_interval < Duration::from_millis(100) {
            return Err(Invalid::new("heartbeat_interval", "must be at least 100ms"));
        }
        if s.sslrootcert_pem.is_some() {
            s.admin().check_tls().map_err(|m| Invalid::new("sslrootcert_pem", m))?;
        }
        Ok(s)
    }

    /// What the API shows and stores in the clear.
    pub fn public(&self) -> Value {
        let mut v = json!({
            "name": self.name, "host": self.host, "port": self.port, "database": self.database,
            "admin_user": self.admin_user, "sslmode": self.sslmode.as_str(),
            "heartbeat_interval": humantime::format_duration(self.heartbeat_interval).to_string(),
        });
        if let Some(pem) = &self.sslrootcert_pem {
            v["sslrootcert_pem"] = json!(pem);
        }
        v
    }

    pub fn admin(&self) -> sluice_postgres::PgConnConfig {
        let tls = sluice_core::PgTls { sslmode: self.sslmode, sslrootcert_pem: self.sslrootcert_pem.clone(), ..Default::default() };
        sluice_postgres::PgConnConfig::with_tls(&self.host, self.port, &self.admin_user, self.admin_password.clone(), &self.database, tls)
    }

    /// Sealed form: the whole request, password included.
    pub fn to_sealable(&self) -> Vec<u8> {
        let mut v = self.public();
        v["admin_password"] = Value::String(self.admin_password.expose_secret().to_string());
        serde_json::to_vec(&v).expect("json")
    }

    pub fn from_sealed(bytes: &[u8]) -> anyhow::Result<Self> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A destination: `name` plus one key naming the kind (`postgres`, `kafka`, `search`)
/// holding the same settings as a pipeline file's `sink:` block.
pub struct SinkSpec {
    pub name: String,
    pub kind: String,
    /// The kind's settings, secrets included (sealed at rest).
    pub settings: Value,
}

impl SinkSpec {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let mut map: serde_json::Map<String, Value> = parse(body, "sink")?;
        let name = take_name(&mut map, "sink")?;
        let mut kinds = map.into_iter();
        let (Some((kind, settings)), None) = (kinds.next(), kinds.next()) else {
            return Err(Invalid { field: None, message: "sink: give exactly one of postgres, kafka or search (besides name)".into() });
        };
        let spec = Self { name, kind, settings };
        if let Some(refused) = refused_setting(&spec.settings, &spec.kind) {
            return Err(refused);
        }
        // The settings must make a valid sink on their own: parsed as the sink's typed
        // config (unknown keys, bad values), then checked by the sink itself, exactly as
        // a pipeline file's `sink:` block is.
        let typed: SinkConfig = serde_json::from_value(json!({ spec.kind.clone(): spec.settings }))
            .map_err(|e| Invalid::from_message(e.to_string().replace('\n', " ")))?;
        typed.get().validate(&PipelineShape { transforms: &[], enriched: false }).map_err(|m| {
            let mut inv = Invalid::from_message(m.replacen("sink.", "", 1));
            if inv.field.as_deref() == Some("sink") {
                inv.field = Some(spec.kind.clone());
            }
            inv
        })?;
        Ok(spec)
    }

    /// Keeps what the sink names in other systems under the tenant: a Kafka sink's
    /// topics start with `<tenant>.` (the default template becomes
    /// `<tenant>.{prefix}.{schema}.{table}`) and its schemas live in the tenant's
    /// registry context; a search sink's index is `<tenant>.<name>`, the names the
    /// server's search service lets the tenant's token reach.
    pub fn scope_to_tenant(&mut self, tenant: &str) -> Result<(), Invalid> {
        let prefix = format!("{tenant}.");
        let Some(settings) = self.settings.as_object_mut() else { return Ok(()) };
        match self.kind.as_str() {
            "kafka" => {
                match settings.get("topic").and_then(Value::as_str) {
                    None => {
                        settings.insert("topic".into(), json!(format!("{prefix}{{prefix}}.{{schema}}.{{table}}")));
                    }
                    Some(t) if t.starts_with(&prefix) => {}
                    Some(t) => {
                        return Err(Invalid::new(
                            "kafka.topic",
                            format!("{t:?} must start with {prefix:?}: a tenant's topics carry its name"),
                        ));
                    }
                }
                match settings.get("registry_context").and_then(Value::as_str) {
                    None => {
                        settings.insert("registry_context".into(), json!(tenant));
                    }
                    Some(c) if c == tenant => {}
                    Some(c) => {
                        return Err(Invalid::new(
                            "kafka.registry_context",
                            format!("{c:?} must be {tenant:?}: a tenant's schemas live in its own context"),
                        ));
                    }
                }
            }
            "search" => {
                let index = settings.get("index").and_then(Value::as_str).unwrap_or_default();
                if !(index.starts_with(&prefix) && index.len() > prefix.len()) {
                    return Err(Invalid::new(
                        "search.index",
                        format!("{index:?} must be named {prefix}<name>: a tenant's indices carry its name"),
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The settings with every password replaced, for the API and the clear column.
    pub fn public(&self) -> Value {
        let mut s = self.settings.clone();
        redact_secrets(&mut s);
        json!({ "name": self.name, self.kind.clone(): s })
    }

    pub fn to_sealable(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "name": self.name, "kind": self.kind, "settings": self.settings })).expect("json")
    }

    pub fn from_sealed(bytes: &[u8]) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_slice(bytes)?;
        Ok(Self {
            name: v["name"].as_str().unwrap_or_default().into(),
            kind: v["kind"].as_str().unwrap_or_default().into(),
            settings: v["settings"].clone(),
        })
    }
}

/// A Kafka-to-Kafka mirror: `name` plus a mirror file's keys (`source: kafka:`, `sink:
/// kafka:`, `batch`, `offsets`; see `sluice_mirror::MirrorConfig`). The file's
/// `pipeline` is generated instead ([`mirror_runner_name`]): it names the mirror's
/// transactional id and offsets topic on the target, which two tenants' mirrors of
/// the same name must not share.
pub struct MirrorSpec {
    pub name: String,
    /// Everything but the name, secrets included (sealed at rest).
    pub settings: serde_json::Map<String, Value>,
}

impl MirrorSpec {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let mut settings: serde_json::Map<String, Value> = parse(body, "mirror")?;
        let name = take_name(&mut settings, "mirror")?;
        if settings.contains_key("pipeline") {
            return Err(Invalid::new("pipeline", "is given by the control plane; name the mirror with `name` only"));
        }
        if let Some(refused) = refused_setting(&Value::Object(settings.clone()), "") {
            return Err(refused);
        }
        let spec = Self { name, settings };
        spec.config("sluice_check")?;
        Ok(spec)
    }

    /// The mirror's config, running as `runner`, checked exactly as a mirror file is.
    pub fn config(&self, runner: &str) -> Result<sluice_mirror::MirrorConfig, Invalid> {
        let mut m = self.settings.clone();
        m.insert("pipeline".into(), json!(runner));
        // Through YAML text because the config's `source:`/`sink:` blocks are YAML
        // singleton maps; JSON is YAML, so nothing is lost.
        let text = serde_json::to_string(&m).expect("json");
        sluice_mirror::MirrorConfig::parse(&text).map_err(Invalid::from_message)
    }

    /// The settings for the API and the clear column, secrets hidden ([`redact_secrets`]).
    pub fn public(&self) -> Value {
        let mut s = Value::Object(self.settings.clone());
        redact_secrets(&mut s);
        s["name"] = json!(self.name);
        s
    }

    pub fn to_sealable(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "name": self.name, "settings": self.settings })).expect("json")
    }

    pub fn from_sealed(bytes: &[u8]) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_slice(bytes)?;
        Ok(Self { name: v["name"].as_str().unwrap_or_default().into(), settings: v["settings"].as_object().cloned().unwrap_or_default() })
    }
}

/// The first setting of `v` (at any depth) that a tenant may not give, as the error
/// naming it: a file on the server running Sluice (a key, a CA, a plugin: the server
/// would read or load it for the tenant), or a Kafka property that gives up the
/// delivery guarantees or redirects the client (`bootstrap.servers` past the egress
/// check). Kafka takes certificates inline instead (`ssl.ca.pem`, `ssl.certificate.pem`,
/// `ssl.key.pem`).
fn refused_setting(v: &Value, at: &str) -> Option<Invalid> {
    /// The librdkafka properties a tenant may set: security with inline certificates,
    /// and the producer's and consumer's batching and timeouts. Anything else (debug
    /// logging, interceptors, isolation level, file paths) is the server's to decide.
    const KAFKA_PROPERTIES: &[&str] = &[
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.pem",
        "ssl.certificate.pem",
        "ssl.key.pem",
        "ssl.key.password",
        "ssl.endpoint.identification.algorithm",
        "client.id",
        "client.rack",
        "compression.type",
        "compression.codec",
        "compression.level",
        "linger.ms",
        "queue.buffering.max.ms",
        "batch.size",
        "batch.num.messages",
        "message.max.bytes",
        "request.timeout.ms",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "socket.timeout.ms",
        "socket.keepalive.enable",
        "retry.backoff.ms",
        "enable.idempotence",
        "acks",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "topic.metadata.refresh.interval.ms",
    ];
    const FILE: &str = "names a file on the Sluice server, which a tenant cannot: leave it out (sslmode verify-full trusts the public certificate authorities, or the one given inline as sslrootcert_pem, or a search sink's, webhook's or enricher's as ca_pem, or a schema registry's as registry_ca_pem; Kafka takes ssl.ca.pem, ssl.certificate.pem and ssl.key.pem inline)";
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            let text = v.as_str().unwrap_or_default();
            match k.as_str() {
                "properties" if v.is_object() => v
                    .as_object()
                    .and_then(|props| props.keys().find(|p| !KAFKA_PROPERTIES.contains(&p.as_str()) && !p.ends_with(".location")))
                    .map(|p| {
                        Invalid::new(
                            &format!("{path}.{p}"),
                            "is not a Kafka property a tenant may set (security with inline certificates, compression, batching and timeouts are)",
                        )
                    })
                    .or_else(|| refused_setting(v, &path)),
                "sslrootcert" | "sslcert" | "sslkey" | "plugin.library.paths" | "sasl.kerberos.keytab" | "sasl.kerberos.kinit.cmd" => {
                    Some(Invalid::new(&path, FILE))
                }
                k if k.ends_with(".location") || k.ends_with("ca_file") => Some(Invalid::new(&path, FILE)),
                "enable.idempotence" if text != "true" => {
                    Some(Invalid::new(&path, "cannot be turned off: without it a retried send can duplicate or reorder records"))
                }
                "acks" if !matches!(text, "all" | "-1") => {
                    Some(Invalid::new(&path, "must be all: with fewer, an acknowledged record can be lost when a broker fails"))
                }
                "bootstrap.servers" | "metadata.broker.list" => Some(Invalid::new(&path, "give the brokers in `brokers` instead")),
                _ => refused_setting(v, &path),
            }
        }),
        Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| refused_setting(v, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// Settings whose text the API shows. The list is an allowlist: a text setting not
/// named here is shown as `(set)`, so a setting added later (or a typo'd secret) is
/// hidden until someone decides it is not secret. Numbers and booleans are shown.
const SHOWN: &[&str] = &[
    "access_key_id",
    "apply",
    "backoff",
    "breaker_open_for",
    "brokers",
    "ca_file",
    "ca_pem",
    "cache_ttl",
    "cluster",
    "column",
    "commit_interval",
    "database",
    "encoding",
    "endpoint",
    "expire_snapshots_after",
    "expr",
    "filtered_updates",
    "format",
    "groups",
    "heartbeat_interval",
    "host",
    "index",
    "interval",
    "kind",
    "max_wait",
    "mode",
    "name",
    "namespace",
    "offsets_retention",
    "on_failure",
    "orphan_files_after",
    "prefix",
    "refresh_interval",
    "region",
    "registry_ca_file",
    "registry_ca_pem",
    "registry_context",
    "registry_url",
    "relation",
    "schema",
    "sslcert",
    "sslmode",
    "sslrootcert",
    "sslrootcert_pem",
    "start_from",
    "table",
    "tables",
    "through",
    "through_column",
    "timeout",
    "topic",
    "topic_naming",
    "topic_prefix",
    "topics",
    "topics_regex",
    "type",
    "uri",
    "url",
    "user",
    "username",
    "warehouse",
];

/// Settings that are the shape of the data (column lists, document relations, field
/// types), shown whole; a secret-named setting inside is still hidden.
const STRUCTURE: &[&str] = &["counts", "document", "fields", "key", "on", "relations", "root", "text_fields"];

/// Hidden wherever they appear, whatever their type (a YAML password may be a number).
const SECRET: &[&str] = &["password", "secret", "secret_access_key", "token", "api_key", "sslkey"];

/// The settings of a resource as the API shows them ([`SHOWN`], [`STRUCTURE`]): every
/// value of Kafka `properties` (SASL and key passwords hide there) and of HTTP
/// `headers` (credentials) hidden, and any credential inside a URL.
fn redact_secrets(v: &mut Value) {
    redact(v, false);
}

fn redact(v: &mut Value, whole: bool) {
    let hidden = || json!("(set)");
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                let k = k.as_str();
                match v {
                    _ if SECRET.contains(&k) => *v = hidden(),
                    Value::Object(all) if k == "properties" || k == "headers" => all.values_mut().for_each(|x| *x = hidden()),
                    Value::String(s) if whole || SHOWN.contains(&k) => *s = shown_text(s),
                    Value::String(_) => *v = hidden(),
                    Value::Array(items) => {
                        let whole = whole || SHOWN.contains(&k) || STRUCTURE.contains(&k);
                        items.iter_mut().for_each(|x| redact(x, whole));
                    }
                    _ => redact(v, whole || STRUCTURE.contains(&k)),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| redact(x, whole)),
        Value::String(s) if whole => *s = shown_text(s),
        Value::String(_) => *v = hidden(),
        _ => {}
    }
}

/// A text setting the API may show: credentials in a URL hidden, and a connection
/// string holding a password hidden whole.
fn shown_text(s: &str) -> String {
    if s.to_ascii_lowercase().contains("password=") {
        return "(set)".into();
    }
    if s.contains("://") { without_credentials(s) } else { s.to_string() }
}

/// A body sent back as the API showed it: each placeholder the API put in place of a
/// secret (`(set)`, or `(set)@` in a URL otherwise unchanged) gets the stored secret at
/// the same place back, so a GET-then-PUT round trip never stores a placeholder as a
/// password. Anything else the caller changed stays as sent.
pub fn restore_secrets(new: &mut Value, old: &Value) {
    match (new, old) {
        (Value::Object(n), Value::Object(o)) => {
            for (k, v) in n.iter_mut() {
                if let Some(ov) = o.get(k) {
                    restore_secrets(v, ov);
                }
            }
        }
        (Value::Array(n), Value::Array(o)) => n.iter_mut().zip(o).for_each(|(v, ov)| restore_secrets(v, ov)),
        (Value::String(n), Value::String(o)) if n == "(set)" => *n = o.clone(),
        (Value::String(n), Value::String(o)) if n.contains("://(set)@") && without_credentials(o) == *n => *n = o.clone(),
        _ => {}
    }
}

/// `https://user:pw@host/` shown as `https://(set)@host/`.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|auth| auth.rsplit_once('@')) {
            Some((_, host_etc)) => format!("{scheme}://(set)@{host_etc}{}", &rest[rest.find('/').unwrap_or(rest.len())..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Mirror `id`'s name on the clusters (its transactional id and offsets topic).
pub fn mirror_runner_name(install: &str, id: i64) -> String {
    format!("sluice_{install}_m{id}")
}

/// An enricher a tenant registers once and pipelines reference by name: the same
/// shape as one entry of a pipeline file's `enrich:` list.
pub struct EnricherSpec {
    pub name: String,
    /// The whole entry, secrets included (sealed at rest).
    pub settings: Value,
}

impl EnricherSpec {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let settings: Value = parse(body, "enricher")?;
        if let Some(refused) = refused_setting(&settings, "") {
            return Err(refused);
        }
        let cfg: sluice_engine::enrich::EnricherConfig =
            serde_json::from_value(settings.clone()).map_err(|e| Invalid::from_message(e.to_string()))?;
        sluice_engine::enrich::validate(std::slice::from_ref(&cfg)).map_err(|m| {
            // "enrich[0] (name): lookup: ..." → "lookup: ...", which names the field.
            let m = m.split_once("): ").map_or(m.as_str(), |(_, rest)| rest).to_string();
            Invalid::from_message(m)
        })?;
        Ok(Self { name: cfg.name, settings })
    }

    /// The entry with passwords and header values replaced, for the API and the
    /// clear column.
    pub fn public(&self) -> Value {
        let mut s = self.settings.clone();
        redact_secrets(&mut s);
        s
    }

    pub fn to_sealable(&self) -> Vec<u8> {
        serde_json::to_vec(&self.settings).expect("json")
    }

    pub fn from_sealed(bytes: &[u8]) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A pipeline: which source tables go to which sink, shaped by which transforms.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    /// The name of a source of the same tenant.
    pub source: String,
    /// The name of a sink of the same tenant.
    pub sink: String,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub transforms: Vec<Value>,
    /// Names of the tenant's enrichers, applied in this order.
    #[serde(default)]
    pub enrichers: Vec<String>,
    #[serde(default)]
    pub snapshot: Option<Value>,
    #[serde(default)]
    pub batch: Option<Value>,
    /// `halt` (default: `sluice pipelines recover NAME` brings it back) or `resync`.
    #[serde(default)]
    pub on_slot_lost: OnSlotLost,
}

impl PipelineSpec {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let p: Self = parse(body, "pipeline")?;
        check_name("name", &p.name)?;
        Ok(p)
    }

    pub fn public(&self) -> Value {
        json!({
            "name": self.name, "source": self.source, "sink": self.sink, "tables": self.tables,
            "transforms": self.transforms, "enrichers": self.enrichers, "snapshot": self.snapshot, "batch": self.batch,
            "on_slot_lost": self.on_slot_lost,
        })
    }

    pub fn from_json(v: &Value) -> anyhow::Result<Self> {
        Ok(serde_json::from_value(v.clone())?)
    }
}

/// The pipeline's name in the runner and in its sink's state tables.
pub fn runner_name(install: &str, id: i64) -> String {
    format!("{install}_p{id}")
}

/// The generated name of pipeline `id`'s objects in the source: replication role,
/// slot and publication all share it.
pub fn object_name(install: &str, id: i64) -> String {
    format!("sluice_{}", runner_name(install, id))
}

/// One part of a pipeline request, as the runner's typed config: a bad value is named
/// by its field (`snapshot.parallelism`, `transforms[2]`).
fn typed<T: for<'de> Deserialize<'de>>(field: &str, v: &Value) -> Result<T, Invalid> {
    serde_json::from_value(v.clone()).map_err(|e| Invalid::new(field, e.to_string().replace('\n', " ")))
}

/// The runner's config for pipeline `id`, connecting as `user`/`password`: built from
/// the typed parts (no config text is written and parsed again), then checked as a
/// pipeline file is.
#[allow(clippy::too_many_arguments)]
pub fn run_config(
    install: &str,
    id: i64,
    spec: &PipelineSpec,
    source: &SourceSpec,
    sink: &SinkSpec,
    enrichers: &[Value],
    user: &str,
    password: &str,
) -> Result<PipelineConfig, Invalid> {
    let sink_config: SinkConfig = serde_json::from_value(json!({ sink.kind.clone(): sink.settings })).map_err(|e| Invalid {
        field: Some("sink".into()),
        message: format!("sink {:?}: {}", sink.name, e.to_string().replace('\n', " ")),
    })?;
    let cfg = PipelineConfig {
        pipeline: runner_name(install, id),
        source: SourceConfig {
            host: source.host.clone(),
            port: source.port,
            user: user.to_string(),
            password: SecretString::from(password.to_string()),
            database: source.database.clone(),
            sslmode: source.sslmode,
            sslrootcert: None,
            sslrootcert_pem: source.sslrootcert_pem.clone(),
            sslcert: None,
            sslkey: None,
            tables: spec.tables.iter().cloned().map(Into::into).collect(),
            publication: Some(object_name(install, id)),
            slot: Some(object_name(install, id)),
            heartbeat_interval: source.heartbeat_interval,
            on_slot_lost: spec.on_slot_lost,
        },
        sink: sink_config,
        snapshot: spec.snapshot.as_ref().map(|v| typed("snapshot", v)).transpose()?.unwrap_or_default(),
        batch: spec.batch.as_ref().map(|v| typed("batch", v)).transpose()?.unwrap_or_default(),
        transforms: spec.transforms.iter().enumerate().map(|(i, v)| typed(&format!("transforms[{i}]"), v)).collect::<Result<_, _>>()?,
        enrich: enrichers.iter().enumerate().map(|(i, v)| typed(&format!("enrichers[{i}]"), v)).collect::<Result<_, _>>()?,
        // A tenant's alert settings apply to all its pipelines (the supervisor's).
        alerts: None,
        egress: None, // the caller's policy: Loaded::run_config
    };
    cfg.validate().map_err(|m| {
        // The runner names its own keys; say them as the pipeline request does.
        let m = m.replace("source.tables", "tables").replace("source: list the tables", "tables: list the tables");
        let mut inv = Invalid::from_message(m);
        if inv.field.as_deref().is_some_and(|f| f.starts_with("sink")) {
            inv.message = format!("sink {:?}: {}", sink.name, inv.message);
            inv.field = Some("sink".into());
        }
        inv
    })?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {

    #[test]
    fn sinks_are_kept_under_their_tenant() {
        let kafka = |extra: &str| {
            SinkSpec::parse(format!("{{name: k, kafka: {{brokers: 'b:9092', encoding: json{extra}, state: {{host: h, user: u, password: p, database: d}}}}}}").as_bytes())
                .unwrap()
        };
        let mut s = kafka("");
        s.scope_to_tenant("shop").unwrap();
        assert_eq!(s.settings["topic"], "shop.{prefix}.{schema}.{table}");
        assert_eq!(s.settings["registry_context"], "shop");
        assert!(kafka(", topic: 'shop.cdc.{table}'").scope_to_tenant("shop").is_ok());
        let e = kafka(", topic: 'other.{table}'").scope_to_tenant("shop").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kafka.topic"));
        let e = kafka(", registry_context: other").scope_to_tenant("shop").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kafka.registry_context"));
    }

    #[test]
    fn tenants_set_only_listed_kafka_properties() {
        let sink = |props: &str| {
            SinkSpec::parse(
                format!("{{name: k, kafka: {{brokers: 'b:9092', encoding: json, properties: {props}, state: {{host: h, user: u, password: p, database: d}}}}}}")
                    .as_bytes(),
            )
        };
        assert!(sink("{security.protocol: SASL_SSL, sasl.mechanism: SCRAM-SHA-512, sasl.password: x, linger.ms: '20'}").is_ok());
        for (props, field) in [
            ("{debug: all}", "kafka.properties.debug"),
            ("{isolation.level: read_uncommitted}", "kafka.properties.isolation.level"),
            ("{ssl.keystore.location: /k}", "kafka.properties.ssl.keystore.location"),
            ("{acks: '1'}", "kafka.properties.acks"),
        ] {
            let e = sink(props).err().unwrap();
            assert_eq!(e.field.as_deref(), Some(field), "{}", e.message);
        }
    }

    #[test]
    fn only_listed_settings_are_shown() {
        let mut v = json!({"host": "h", "port": 5432, "password": 1234, "new_credential": "abc", "flag": true,
            "uri": "postgresql://u:pw@h/db", "url": "host=h password=pw", "topics": ["a", "b"],
            "document": {"root": "public.orders", "relations": [{"name": "items", "on": ["id"], "token": "t"}]},
            "fields": {"score": "float"}, "list": ["x"], "nested": {"host": "h2", "other": "y"}});
        redact_secrets(&mut v);
        assert_eq!(
            v,
            json!({"host": "h", "port": 5432, "password": "(set)", "new_credential": "(set)", "flag": true,
                "uri": "postgresql://(set)@h/db", "url": "(set)", "topics": ["a", "b"],
                "document": {"root": "public.orders", "relations": [{"name": "items", "on": ["id"], "token": "(set)"}]},
                "fields": {"score": "float"}, "list": ["(set)"], "nested": {"host": "h2", "other": "(set)"}})
        );
    }

    #[test]
    fn placeholders_sent_back_get_the_stored_secrets() {
        let stored = json!({"name": "k", "kafka": {"brokers": "b:9092", "registry_url": "https://u:pw@reg/x",
            "properties": {"sasl.password": "s3cret"}, "state": {"host": "h", "password": "pg-pw"}}});
        let mut shown = stored.clone();
        redact_secrets(&mut shown);
        assert_eq!(shown["kafka"]["state"]["password"], "(set)");
        let mut back = shown.clone();
        back["kafka"]["brokers"] = json!("c:9092");
        restore_secrets(&mut back, &stored);
        assert_eq!(back["kafka"]["state"]["password"], "pg-pw");
        assert_eq!(back["kafka"]["properties"]["sasl.password"], "s3cret");
        assert_eq!(back["kafka"]["registry_url"], "https://u:pw@reg/x");
        assert_eq!(back["kafka"]["brokers"], "c:9092", "what the caller changed stays");
        // A URL whose host changed does not get the old credentials.
        let mut moved = shown.clone();
        moved["kafka"]["registry_url"] = json!("https://(set)@elsewhere/x");
        restore_secrets(&mut moved, &stored);
        assert_eq!(moved["kafka"]["registry_url"], "https://(set)@elsewhere/x");
    }

    use super::*;

    #[test]
    fn sources_are_strict_and_name_the_field() {
        let ok = b"{name: db1, host: h, database: d, admin_user: u, admin_password: p}";
        assert_eq!(SourceSpec::parse(ok).unwrap().port, 5432);
        let e = SourceSpec::parse(b"{name: db1, host: h, database: d, admin_user: u, admin_password: p, sslmod: x}").err().unwrap();
        assert!(e.message.contains("unknown field `sslmod`"), "{}", e.message);
        let e = SourceSpec::parse(b"{name: Bad Name, host: h, database: d, admin_user: u, admin_password: p}").err().unwrap();
        assert_eq!(e.field.as_deref(), Some("name"));
        let e = SourceSpec::parse(b"{name: a, host: h, database: d, admin_user: u}").err().unwrap();
        assert!(e.message.contains("admin_password"), "{}", e.message);
        assert!(SourceSpec::parse(b"").err().unwrap().message.contains("empty"));
        assert!(SourceSpec::parse(b"{not json").is_err());
        // A private authority is given inline (tenants name no files), and kept.
        let e = SourceSpec::parse(
            b"{name: a, host: h, database: d, admin_user: u, admin_password: p, sslmode: verify-full, sslrootcert_pem: junk}",
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("sslrootcert_pem"), "{}", e.message);
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let body =
            format!("{{name: a, host: h, database: d, admin_user: u, admin_password: p, sslmode: verify-full, sslrootcert_pem: {pem:?}}}");
        let s = SourceSpec::parse(body.as_bytes()).unwrap();
        assert_eq!(s.public()["sslrootcert_pem"], pem);
        assert_eq!(s.admin().sslrootcert_pem.as_deref(), Some(pem));
    }

    #[test]
    fn sinks_are_checked_as_the_runner_would_and_redacted() {
        let s = SinkSpec::parse(br#"{"name": "r", "postgres": {"host": "h", "user": "u", "password": "pw1", "database": "d"}}"#).unwrap();
        assert_eq!(s.kind, "postgres");
        assert!(!s.public().to_string().contains("pw1"));
        let e = SinkSpec::parse(br#"{"name": "r", "postgres": {"host": "h", "user": "u", "password": "p", "database": "d", "prot": 1}}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("unknown field `prot`"), "{}", e.message);
        let e = SinkSpec::parse(br#"{"name": "r", "postgres": {}, "kafka": {}}"#).err().unwrap();
        assert!(e.message.contains("exactly one"), "{}", e.message);
        let e = SinkSpec::parse(br#"{"name": "r", "elastic": {}}"#).err().unwrap();
        assert!(e.message.contains("unknown variant"), "{}", e.message);
        // An Iceberg sink on object storage: both secrets stay out of the API.
        let s = SinkSpec::parse(
            b"{name: lake, iceberg: {warehouse: 's3://b/w', s3: {access_key_id: k, secret_access_key: s3pw}, \
              catalog: {sql: {host: h, user: u, password: pw1, database: d}}}}",
        )
        .unwrap();
        let public = s.public().to_string();
        assert!(!public.contains("pw1") && !public.contains("s3pw"), "{public}");
        let e = SinkSpec::parse(
            b"{name: lake, iceberg: {warehouse: 's3://b/w', catalog: {sql: {host: h, user: u, password: p, database: d}}}}",
        )
        .err()
        .unwrap();
        assert!(e.message.contains("an s3:// warehouse needs its settings"), "{}", e.message);
    }

    #[test]
    fn pipelines_validate_transforms_with_a_field_path() {
        let src = SourceSpec::parse(b"{name: db1, host: h, database: d, admin_user: u, admin_password: p}").unwrap();
        let sink = SinkSpec::parse(b"{name: r, postgres: {host: h, user: u, password: p, database: d}}").unwrap();
        let p = PipelineSpec::parse(b"{name: orders, source: db1, sink: r, tables: [public.orders]}").unwrap();
        let cfg = run_config("ab12cd", 7, &p, &src, &sink, &[], "sluice_p7", "x").unwrap();
        assert_eq!(cfg.slot_name(), "sluice_ab12cd_p7");
        let p = PipelineSpec::parse(b"{name: orders, source: db1, sink: r, tables: [a.b.c]}").unwrap();
        let e = run_config("ab12cd", 7, &p, &src, &sink, &[], "u", "x").err().unwrap();
        assert_eq!(e.field.as_deref(), Some("tables"), "{}", e.message);
        let p = PipelineSpec::parse(b"{name: orders, source: db1, sink: r, tables: [t], transforms: [{bogus: {}}]}").unwrap();
        let e = run_config("ab12cd", 7, &p, &src, &sink, &[], "u", "x").err().unwrap();
        assert!(e.message.contains("transforms"), "{}", e.message);
        assert!(PipelineSpec::parse(b"{name: o, source: a, sink: b, tabels: []}").err().unwrap().message.contains("unknown field"));
    }

    #[test]
    fn mirrors_are_checked_as_a_mirror_file_and_redacted() {
        let body = b"{name: to-b, source: {kafka: {cluster: a, brokers: 'a:9092', topics: [t], \
              properties: {sasl.password: pw1}, registry_url: 'https://u:rpw@reg:8081/x'}}, \
              sink: {kafka: {cluster: b, brokers: 'b:9092', registry_url: 'http://reg2'}}}";
        let m = MirrorSpec::parse(body).unwrap();
        let public = m.public();
        let text = public.to_string();
        assert!(!text.contains("pw1") && !text.contains("rpw"), "{text}");
        assert_eq!(public["source"]["kafka"]["registry_url"], "https://(set)@reg:8081/x");
        assert_eq!(public["sink"]["kafka"]["registry_url"], "http://reg2");
        assert_eq!(m.config(&mirror_runner_name("ab12cd", 3)).unwrap().pipeline, "sluice_ab12cd_m3");
        let back = MirrorSpec::from_sealed(&m.to_sealable()).unwrap();
        assert_eq!(back.settings, m.settings);
        let e = MirrorSpec::parse(
            b"{name: m, pipeline: x, source: {kafka: {cluster: a, brokers: a, topics: [t]}}, sink: {kafka: {cluster: b, brokers: b}}}",
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("pipeline"));
        let e = MirrorSpec::parse(
            b"{name: m, source: {kafka: {cluster: a, brokers: a, topics: [t]}}, sink: {kafka: {cluster: a, brokers: b}}}",
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("sink.kafka.cluster"), "{}", e.message);
        let e = MirrorSpec::parse(
            b"{name: m, source: {kafka: {cluster: a, brokers: a, topics: [t], topix: 1}}, sink: {kafka: {cluster: b, brokers: b}}}",
        )
        .err()
        .unwrap();
        assert!(e.message.contains("unknown field `topix`"), "{}", e.message);
    }
}
