//! Pipeline configuration: one YAML file, strictly checked (unknown keys are errors).

use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::TableName;
use sluice_postgres::PgConnConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Lowercase letters, digits and `_`: names the slot and publication.
    pub pipeline: String,
    pub source: SourceConfig,
    /// One key naming the sink kind (`postgres:`), holding its settings.
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub sink: SinkConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    /// Transforms applied to every change, in order, before the sink.
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    pub transforms: Vec<sluice_core::transform::Step>,
    /// Enrichers applied to every change, in order, before the transforms.
    #[serde(default)]
    pub enrich: Vec<crate::enrich::EnricherConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
    /// Tables to replicate, as `schema.table` (or `table` for `public`).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Publication to use; created when missing. Default: `sluice_<pipeline>`.
    pub publication: Option<String>,
    /// Replication slot to use; created when missing. Default: `sluice_<pipeline>`.
    pub slot: Option<String>,
    /// How often to write a heartbeat into the WAL so the slot advances on idle tables.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

fn default_port() -> u16 {
    5432
}

// The connection fields are spelled out in each section (not flattened) because serde
// cannot reject unknown keys through `flatten`.
macro_rules! connection {
    ($t:ty) => {
        impl $t {
            pub fn connection(&self) -> PgConnConfig {
                PgConnConfig {
                    host: self.host.clone(),
                    port: self.port,
                    user: self.user.clone(),
                    password: self.password.clone(),
                    database: self.database.clone(),
                }
            }
        }
    };
}
connection!(SourceConfig);
connection!(PostgresSinkConfig);

fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SinkConfig {
    Postgres(PostgresSinkConfig),
    Kafka(KafkaSinkConfig),
    Search(SearchSinkConfig),
}

/// Documents built from a root table and its related tables, indexed with `_bulk` into
/// Elasticsearch, OpenSearch or `sluice search serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSinkConfig {
    /// Base URL of the search service, e.g. http://127.0.0.1:9200.
    pub url: String,
    pub index: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    pub document: sluice_search::sink::DocumentSpec,
    /// Documents per `_bulk` request (and root rows per page of the initial load).
    #[serde(default = "default_bulk_docs")]
    pub bulk_max_docs: usize,
    /// Largest `_bulk` request body, in bytes (Elasticsearch advises 5-15 MB).
    #[serde(default = "default_bulk_bytes")]
    pub bulk_max_bytes: usize,
    /// Where the initial load's progress and refused documents (dead letters) are kept.
    pub state: PgConnConfig,
}

fn default_bulk_docs() -> usize {
    1000
}

fn default_bulk_bytes() -> usize {
    8 * 1024 * 1024
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaEncoding {
    Avro,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `host:port[,host:port...]` of the brokers.
    pub brokers: String,
    /// Topic name template over `{prefix}`, `{schema}`, `{table}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `{prefix}` in topic names and `source.name` in events. Default: the pipeline name.
    pub topic_prefix: Option<String>,
    #[serde(default = "default_encoding")]
    pub encoding: KafkaEncoding,
    /// Confluent-compatible schema registry (required for Avro), e.g. Sluice's own.
    pub registry_url: Option<String>,
    /// Registry context the subjects live in (a tenant's), as `:.<context>:<subject>`.
    pub registry_context: Option<String>,
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Write a tombstone (null value) after each delete, for log compaction.
    #[serde(default = "yes")]
    pub tombstones: bool,
    /// librdkafka properties (e.g. `security.protocol`, `sasl.mechanism`).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// The Postgres database that keeps the pipeline's snapshot progress (schema `sluice`).
    pub state: PgConnConfig,
}

fn default_topic() -> String {
    "{prefix}.{schema}.{table}".into()
}
fn default_encoding() -> KafkaEncoding {
    KafkaEncoding::Avro
}
fn one() -> i32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
    /// Put every table in this schema instead of the source table's schema.
    pub schema: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self { enabled: true, parallelism: default_parallelism(), chunk_rows: default_chunk_rows() }
    }
}

fn yes() -> bool {
    true
}
fn default_parallelism() -> usize {
    2
}
fn default_chunk_rows() -> u64 {
    100_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Apply once this many changes are waiting (whole transactions are never split).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_rows: default_max_rows() }
    }
}

fn default_max_rows() -> usize {
    20_000
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path: p, message })
    }

    /// Parses and checks a config; the error is one line naming the key and the fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: PipelineConfig = serde_yaml::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde_yaml appends "at line L column C"; keep it, it points at the key.
            msg.replace('\n', " ")
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let p = &self.pipeline;
        if p.is_empty() || p.len() > 40 || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(format!(
                "pipeline: {p:?} must be 1-40 characters of lowercase letters, digits and _ (it names the replication slot)"
            ));
        }
        for (key, name) in [("source.slot", &self.source.slot), ("source.publication", &self.source.publication)] {
            if let Some(n) = name {
                let ok = !n.is_empty() && n.len() <= 48 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(format!("{key}: {n:?} must be 1-48 characters of lowercase letters, digits and _"));
                }
            }
        }
        if let SinkConfig::Search(sc) = &self.sink {
            sc.validate()?;
            if !self.transforms.is_empty() {
                return Err("transforms: the search sink builds documents from the source tables (sink.search.document); transforms are not applied to it yet: remove them".into());
            }
            if !self.enrich.is_empty() {
                return Err("enrich: the search sink builds documents from the source tables; join reference data as a `one` relation of sink.search.document (its changes re-index the documents that use it) and remove enrich".into());
            }
        }
        if self.source.tables.is_empty() && self.source.publication.is_none() && !matches!(self.sink, SinkConfig::Search(_)) {
            return Err("source: list the tables to replicate in `tables`, or name an existing `publication`".into());
        }
        for t in &self.source.tables {
            if TableName::parse(t).is_none() {
                return Err(format!("source.tables: {t:?} is not a table name; write schema.table or table"));
            }
        }
        if self.snapshot.parallelism == 0 || self.snapshot.parallelism > 32 {
            return Err("snapshot.parallelism: must be between 1 and 32".into());
        }
        if self.snapshot.chunk_rows == 0 {
            return Err("snapshot.chunk_rows: must be at least 1".into());
        }
        if self.batch.max_rows == 0 {
            return Err("batch.max_rows: must be at least 1".into());
        }
        if let SinkConfig::Kafka(k) = &self.sink {
            k.validate()?;
        }
        sluice_core::transform::Chain::new(self.transforms.clone()).map_err(|e| e.to_string())?;
        crate::enrich::validate(&self.enrich)?;
        if let (SinkConfig::Postgres(_), Some(i)) = (
            &self.sink,
            self.transforms
                .iter()
                .position(|s| matches!(s, sluice_core::transform::Step::Unwrap(_) | sluice_core::transform::Step::InsertHeader(_))),
        ) {
            return Err(format!(
                "transforms[{i}] ({}): the postgres sink writes rows, without change envelopes or record headers; remove the step",
                self.transforms[i].kind()
            ));
        }
        if self.source.heartbeat_interval < Duration::from_millis(100) {
            return Err("source.heartbeat_interval: must be at least 100ms".into());
        }
        Ok(())
    }

    /// The tables the pipeline reads in its source: its own, and the reference tables
    /// of its lookups there (streamed to keep them fresh, never delivered). The
    /// pipeline's role needs SELECT on all of them and its publication holds them.
    pub fn source_tables(&self) -> Vec<TableName> {
        let mut out = self.tables();
        for t in crate::enrich::reference_tables(&self.enrich) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The Kafka sink's options, when the sink is Kafka.
    pub fn kafka_options(&self) -> Option<sluice_kafka::KafkaSinkOptions> {
        let SinkConfig::Kafka(k) = &self.sink else { return None };
        let encoding = match k.encoding {
            KafkaEncoding::Avro => sluice_kafka::Encoding::Avro {
                registry_url: k.registry_url.clone().unwrap_or_default(),
                context: k.registry_context.clone(),
            },
            KafkaEncoding::Json => sluice_kafka::Encoding::Json,
        };
        Some(sluice_kafka::KafkaSinkOptions {
            brokers: k.brokers.clone(),
            topic: k.topic.clone(),
            prefix: k.topic_prefix.clone().unwrap_or_else(|| self.pipeline.clone()),
            database: self.source.database.clone(),
            encoding,
            partitions: k.partitions,
            replication_factor: k.replication_factor,
            tombstones: k.tombstones,
            properties: k.properties.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            unwrap: self.transforms.iter().any(|s| matches!(s, sluice_core::transform::Step::Unwrap(_))),
            headers: self
                .transforms
                .iter()
                .filter_map(|s| match s {
                    sluice_core::transform::Step::InsertHeader(h) => Some((h.name.clone(), h.value.clone())),
                    _ => None,
                })
                .collect(),
        })
    }

    pub fn slot_name(&self) -> String {
        self.source.slot.clone().unwrap_or_else(|| format!("sluice_{}", self.pipeline))
    }

    pub fn publication_name(&self) -> String {
        self.source.publication.clone().unwrap_or_else(|| format!("sluice_{}", self.pipeline))
    }

    /// The listed tables; for a search sink, with the document's tables added (a
    /// document's related tables must be replicated for changes to reach it).
    /// The Postgres database holding the pipeline's state: the sink itself when the
    /// sink is Postgres, the configured state database otherwise.
    pub fn state_connection(&self) -> PgConnConfig {
        match &self.sink {
            SinkConfig::Postgres(pg) => pg.connection(),
            SinkConfig::Kafka(k) => k.state.clone(),
            SinkConfig::Search(s) => s.state.clone(),
        }
    }

    pub fn tables(&self) -> Vec<TableName> {
        let mut t: Vec<TableName> = self.source.tables.iter().filter_map(|t| TableName::parse(t)).collect();
        if let SinkConfig::Search(sc) = &self.sink {
            let d = &sc.document;
            let named =
                std::iter::once(&d.table).chain(d.relations.iter().flat_map(|r| std::iter::once(&r.table).chain(r.through.as_ref())));
            for n in named.filter_map(|n| TableName::parse(n)) {
                if !t.contains(&n) {
                    t.push(n);
                }
            }
        }
        t
    }

    /// The search sink's options, when the sink is search.
    pub fn search_options(&self) -> Option<sluice_search::sink::SearchSinkOptions> {
        let SinkConfig::Search(s) = &self.sink else { return None };
        Some(sluice_search::sink::SearchSinkOptions {
            url: s.url.clone(),
            index: s.index.clone(),
            username: s.username.clone(),
            password: s.password.clone(),
            bulk_max_docs: s.bulk_max_docs,
            bulk_max_bytes: s.bulk_max_bytes,
            pipeline: self.pipeline.clone(),
        })
    }
}

impl SearchSinkConfig {
    fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("sink.search.url: {:?} must start with http:// (https needs a TLS build, not available yet)", self.url));
        }
        if self.url.starts_with("https://") {
            return Err("sink.search.url: https is not supported by this build yet; use http:// on a trusted network".into());
        }
        let i = &self.index;
        if i.is_empty() || i.starts_with(['_', '-', '+']) || i.chars().any(|c| c.is_uppercase() || "\\/*?\"<>| ,#:".contains(c)) {
            return Err(format!(
                "sink.search.index: {i:?} is not a valid index name (lowercase, no spaces or \\/*?\"<>|,#:, not starting with _ - +)"
            ));
        }
        if TableName::parse(&self.document.table).is_none() {
            return Err(format!("sink.search.document.table: {:?} is not a table name; write schema.table", self.document.table));
        }
        if self.bulk_max_docs == 0 || self.bulk_max_docs > 100_000 {
            return Err("sink.search.bulk_max_docs: must be between 1 and 100000".into());
        }
        if self.bulk_max_bytes < 64 * 1024 || self.bulk_max_bytes > 100 * 1024 * 1024 {
            return Err("sink.search.bulk_max_bytes: must be between 65536 and 104857600 (64 KiB to 100 MiB)".into());
        }
        if self.password.is_some() && self.username.is_none() {
            return Err("sink.search.password: set username too (basic authentication)".into());
        }
        Ok(())
    }
}

impl KafkaSinkConfig {
    fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("sink.kafka.brokers: give at least one host:port".into());
        }
        let mut rest = self.topic.clone();
        for p in sluice_kafka::TOPIC_PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if let Some(bad) = rest.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(format!(
                "sink.kafka.topic: {:?} has {:?}, which is neither a placeholder ({}) nor allowed in a topic name ([A-Za-z0-9._-])",
                self.topic,
                &rest[bad..].chars().next().unwrap_or(' '),
                sluice_kafka::TOPIC_PLACEHOLDERS.join(", ")
            ));
        }
        if !self.topic.contains("{table}") {
            return Err(format!("sink.kafka.topic: {:?} must contain {{table}} so each table gets its own topic", self.topic));
        }
        if self.encoding == KafkaEncoding::Avro && self.registry_url.is_none() {
            return Err(
                "sink.kafka.registry_url: Avro needs a schema registry; set registry_url (e.g. http://127.0.0.1:8081), or encoding: json"
                    .into(),
            );
        }
        if let Some(u) = &self.registry_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(format!("sink.kafka.registry_url: {u:?} must start with http:// or https://"));
        }
        if let Some(c) = &self.registry_context
            && (c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(format!("sink.kafka.registry_context: {c:?} must be letters, digits, _ and -"));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err("sink.kafka.partitions and replication_factor: must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
pipeline: orders
source: {host: 127.0.0.1, user: u, password: secret-pw, database: app, tables: [public.orders, items]}
sink: {postgres: {host: 127.0.0.1, port: 5433, user: u, password: p, database: replica}}
";

    const KAFKA: &str = "
pipeline: orders
source: {host: 127.0.0.1, user: u, password: secret-pw, database: app, tables: [public.orders]}
sink: {kafka: {brokers: 127.0.0.1:9092, registry_url: http://127.0.0.1:8081, state: {host: 127.0.0.1, user: u, password: p, database: st}}}
";

    #[test]
    fn parses_a_kafka_sink_with_debezium_like_defaults() {
        let c = PipelineConfig::parse(KAFKA).unwrap();
        let o = c.kafka_options().unwrap();
        assert_eq!(o.topic_for(&TableName::new("public", "orders")), "orders.public.orders");
        assert!(o.tombstones);
        assert!(matches!(o.encoding, sluice_kafka::Encoding::Avro { .. }));
    }

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let c = PipelineConfig::parse(GOOD).unwrap();
        assert_eq!(c.slot_name(), "sluice_orders");
        assert_eq!(c.source.connection().port, 5432);
        assert_eq!(c.tables()[1], TableName::new("public", "items"));
        assert!(c.snapshot.enabled);
        assert!(!format!("{c:?}").contains("secret-pw"), "passwords must not show in Debug");
    }

    #[test]
    fn rejects_unknown_keys_everywhere() {
        for bad in [
            GOOD.replace("pipeline: orders", "pipeline: orders\ncolour: blue"),
            GOOD.replace("tables:", "tabels:"),
            GOOD.replace("database: replica", "database: replica, sslmode: x"),
            GOOD.to_string() + "snapshot: {paralel: 2}\n",
        ] {
            let err = PipelineConfig::parse(&bad).unwrap_err();
            assert!(err.contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn rejects_bad_values_with_the_key_named() {
        let cases = [
            (GOOD.replace("pipeline: orders", "pipeline: Orders-1"), "pipeline:"),
            (GOOD.replace("tables: [public.orders, items]", "tables: []"), "source:"),
            (GOOD.replace("items", "a.b.c"), "source.tables"),
            (GOOD.to_string() + "snapshot: {parallelism: 0}\n", "snapshot.parallelism"),
            (GOOD.replace("postgres:", "kafak:"), "unknown variant"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, parttions: 3,"), "unknown field"),
            (KAFKA.replace("registry_url: http://127.0.0.1:8081,", ""), "sink.kafka.registry_url"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, topic: \"{prefix}.all\","), "sink.kafka.topic"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, topic: \"a/{table}\","), "sink.kafka.topic"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, partitions: 0,"), "partitions"),
            (KAFKA.replace(", state: {host: 127.0.0.1, user: u, password: p, database: st}", ""), "missing field `state`"),
            (GOOD.replace("database: app,", "database: app, slot: My-Slot,"), "source.slot"),
        ];
        for (text, want) in cases {
            let err = PipelineConfig::parse(&text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
            assert!(!err.contains('\n'));
        }
    }
}
