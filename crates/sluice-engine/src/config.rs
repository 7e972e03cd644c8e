//! Pipeline configuration: one YAML file, strictly checked (unknown keys are errors).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::TableName;
use sluice_core::sink::PipelineShape;

pub use crate::sinks::SinkConfig;
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
    /// Built-in alert rules delivered to a webhook (`sluice run`; the server takes them
    /// from each tenant's alert settings instead).
    #[serde(default)]
    pub alerts: Option<crate::alerts::AlertConfig>,
    /// Where the pipeline may connect (a tenant's, set by `sluice server`; never read
    /// from a config): every Postgres and HTTP client it opens checks the addresses
    /// it connects to. None: anywhere (`sluice run`).
    #[serde(skip)]
    pub egress: Option<Arc<sluice_core::egress::Egress>>,
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
    /// libpq's `sslmode` (default `prefer`), `sslrootcert`, `sslcert` and `sslkey`.
    #[serde(default)]
    pub sslmode: sluice_core::SslMode,
    #[serde(default)]
    pub sslrootcert: Option<std::path::PathBuf>,
    /// The authorities as PEM text, in place of `sslrootcert`.
    #[serde(default)]
    pub sslrootcert_pem: Option<String>,
    #[serde(default)]
    pub sslcert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub sslkey: Option<std::path::PathBuf>,
    /// Tables to replicate, as `schema.table` (or `table` for `public`), or as
    /// `{name, where, columns}`: a publication row filter and column list.
    #[serde(default)]
    pub tables: Vec<TableEntry>,
    /// Publication to use; created when missing. Default: `sluice_<pipeline>`.
    pub publication: Option<String>,
    /// Replication slot to use; created when missing. Default: `sluice_<pipeline>`.
    pub slot: Option<String>,
    /// How often to write a heartbeat into the WAL so the slot advances on idle tables.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// What to do when the source invalidates the slot (it kept more WAL than
    /// `max_slot_wal_keep_size`): `halt` (default) and wait for `sluice recover`, or
    /// `resync` by itself.
    #[serde(default)]
    pub on_slot_lost: OnSlotLost,
}

/// One entry of `source.tables`: a name, or a name with the publication's row filter
/// (`where`) and column list (`columns`), which the snapshot and resyncs apply too.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TableEntry {
    pub name: String,
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub row_filter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

impl From<String> for TableEntry {
    fn from(name: String) -> Self {
        Self { name, row_filter: None, columns: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilteredTable {
    name: String,
    #[serde(rename = "where")]
    row_filter: Option<String>,
    columns: Option<Vec<String>>,
}

// By hand rather than `untagged`: an unknown key in the map form keeps serde's own
// message naming it, instead of "did not match any variant".
impl<'de> Deserialize<'de> for TableEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TableEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table name, or {name, where, columns}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TableEntry, E> {
                Ok(TableEntry::from(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<TableEntry, A::Error> {
                let t = FilteredTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(TableEntry { name: t.name, row_filter: t.row_filter, columns: t.columns })
            }
        }
        d.deserialize_any(V)
    }
}

/// After a lost slot the source no longer has the changes since the sink's position:
/// a new slot and a resync of every table bring the sink back, without emptying it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSlotLost {
    /// Stop with one line saying what happened; a person runs `sluice recover`.
    #[default]
    Halt,
    /// Recover at once: new slot, every table read again.
    Resync,
}

fn default_port() -> u16 {
    5432
}

// The connection fields are spelled out (not flattened from `PgConnConfig`) because
// serde cannot reject unknown keys through `flatten`.
impl SourceConfig {
    pub fn connection(&self) -> PgConnConfig {
        PgConnConfig::with_tls(&self.host, self.port, &self.user, self.password.clone(), &self.database, self.tls())
    }

    pub fn tls(&self) -> sluice_core::PgTls {
        sluice_core::PgTls {
            sslmode: self.sslmode,
            sslrootcert: self.sslrootcert.clone(),
            sslrootcert_pem: self.sslrootcert_pem.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
        }
    }
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
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
    /// Apply once this many changes are waiting (transactions up to
    /// `max_transaction_memory` are never split).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// How long a batch may wait for more changes before it is applied (0: apply
    /// what is there at once). For sinks that want few, large writes (webhooks).
    #[serde(default, with = "humantime_serde")]
    pub max_wait: Duration,
    /// How much of one source transaction is held in memory (row images): a larger
    /// one reaches the sink in pieces (the Postgres sink still commits it whole).
    /// Bytes, or with a unit: `16MiB` (the default), `512KiB`, `1GiB`. At least 1 MiB.
    #[serde(default = "default_max_transaction_memory", deserialize_with = "byte_size")]
    pub max_transaction_memory: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_rows: default_max_rows(), max_wait: Duration::ZERO, max_transaction_memory: default_max_transaction_memory() }
    }
}

fn default_max_transaction_memory() -> usize {
    sluice_postgres::DEFAULT_MAX_TRANSACTION_MEMORY
}

/// A size as a number of bytes or a string with a binary unit (`64MiB`).
fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let bytes = match Size::deserialize(d)? {
        Size::Bytes(n) => Some(n),
        Size::Text(t) => parse_byte_size(&t),
    };
    match bytes {
        Some(n) if n >= 1 << 20 => usize::try_from(n).map_err(|_| serde::de::Error::custom("too large")),
        Some(_) => Err(serde::de::Error::custom("max_transaction_memory: at least 1MiB")),
        None => Err(serde::de::Error::custom("max_transaction_memory: a size in bytes, or with a unit: 16MiB, 512KiB, 1GiB")),
    }
}

fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
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

    /// The tables that `names` ask for (all of them when none is named).
    pub fn pick_tables(&self, names: &[String]) -> Result<Vec<TableName>, String> {
        let all = self.tables();
        if names.is_empty() {
            return Ok(all);
        }
        let list = || all.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let mut out = Vec::new();
        for n in names {
            let t = TableName::parse(n).ok_or_else(|| format!("table {n:?} is not a table name: write schema.table"))?;
            if !all.contains(&t) {
                return Err(format!("table {t} is not one of the pipeline's tables ({}): name one of them", list()));
            }
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Checks a config built in code (the control plane's) as [`parse`](Self::parse)
    /// checks a file; the error is one line naming the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
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
        if self.source.tables.is_empty() && self.source.publication.is_none() && self.sink.get().required_tables().is_empty() {
            return Err("source: list the tables to replicate in `tables`, or name an existing `publication`".into());
        }
        for t in &self.source.tables {
            if TableName::parse(&t.name).is_none() {
                return Err(format!("source.tables: {:?} is not a table name; write schema.table or table", t.name));
            }
            if t.row_filter.as_deref().is_some_and(|w| w.trim().is_empty() || w.contains(';')) {
                return Err(format!("source.tables: {}: `where` must be one SQL condition (no `;`), like region = 'eu'", t.name));
            }
            if t.columns.as_ref().is_some_and(Vec::is_empty) {
                return Err(format!("source.tables: {}: `columns` lists no column: name the columns to publish, or leave it out", t.name));
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
        if self.batch.max_wait > Duration::from_secs(60) {
            return Err("batch.max_wait: must be at most 60s (changes wait that long before they are applied)".into());
        }
        sluice_core::transform::Chain::new(self.transforms.clone()).map_err(|e| e.to_string())?;
        crate::enrich::validate(&self.enrich)?;
        self.sink.get().validate(&PipelineShape { transforms: &self.transforms, enriched: !self.enrich.is_empty() })?;
        if let Some(a) = &self.alerts {
            a.validate()?;
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

    /// The row filter and column list configured for each table that has one.
    pub fn table_filters(&self) -> std::collections::HashMap<TableName, sluice_postgres::replication::TableFilter> {
        self.source
            .tables
            .iter()
            .filter(|t| t.row_filter.is_some() || t.columns.is_some())
            .filter_map(|t| {
                let f = sluice_postgres::replication::TableFilter { row_filter: t.row_filter.clone(), columns: t.columns.clone() };
                Some((TableName::parse(&t.name)?, f))
            })
            .collect()
    }

    pub fn slot_name(&self) -> String {
        self.source.slot.clone().unwrap_or_else(|| format!("sluice_{}", self.pipeline))
    }

    pub fn publication_name(&self) -> String {
        self.source.publication.clone().unwrap_or_else(|| format!("sluice_{}", self.pipeline))
    }

    /// The Postgres database holding the pipeline's state: the sink itself when the
    /// sink is Postgres, the configured state database otherwise.
    pub fn state_connection(&self) -> PgConnConfig {
        self.sink.get().state().guarded(self.egress.as_ref())
    }

    /// The source database, as the pipeline connects to it.
    pub fn source_connection(&self) -> PgConnConfig {
        self.source.connection().guarded(self.egress.as_ref())
    }

    /// The listed tables, with the ones the sink needs added (a search document's
    /// related tables must be replicated for changes to reach it).
    pub fn tables(&self) -> Vec<TableName> {
        let mut t: Vec<TableName> = self.source.tables.iter().filter_map(|t| TableName::parse(&t.name)).collect();
        for n in self.sink.get().required_tables() {
            if !t.contains(&n) {
                t.push(n);
            }
        }
        t
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
        let SinkConfig::Kafka(k) = &c.sink else { panic!("a kafka sink") };
        let o = k.options(&c.pipeline, &c.source.database, &c.transforms);
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
    fn transaction_memory_takes_bytes_or_units() {
        assert_eq!(PipelineConfig::parse(GOOD).unwrap().batch.max_transaction_memory, 16 << 20);
        for (text, want) in [("16MiB", 16usize << 20), ("2097152", 2 << 20), ("1GiB", 1 << 30), ("512 KiB", 0)] {
            let c = PipelineConfig::parse(&format!("{GOOD}batch: {{max_transaction_memory: {text}}}\n"));
            match c {
                Ok(c) => assert_eq!(c.batch.max_transaction_memory, want, "{text}"),
                Err(e) => assert!(want == 0 && e.contains("at least 1MiB"), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn rejects_unknown_keys_everywhere() {
        for bad in [
            GOOD.replace("pipeline: orders", "pipeline: orders\ncolour: blue"),
            GOOD.replace("tables:", "tabels:"),
            GOOD.replace("database: replica", "database: replica, sslmod: require"),
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
            (
                KAFKA.replace("registry_url: http://127.0.0.1:8081,", "registry_url: http://127.0.0.1:8081, registry_ca_pem: x,"),
                "sink.kafka.registry_ca_pem: only an https",
            ),
            (
                KAFKA.replace("registry_url: http://127.0.0.1:8081,", "registry_url: https://127.0.0.1:8081, registry_ca_pem: x,"),
                "sink.kafka.registry_ca_pem: not a PEM certificate",
            ),
            (
                KAFKA.replace(
                    "registry_url: http://127.0.0.1:8081,",
                    "registry_url: https://127.0.0.1:8081, registry_ca_file: /ca.pem, registry_ca_pem: x,",
                ),
                "sink.kafka.registry_ca_file and sink.kafka.registry_ca_pem both name the trusted authority",
            ),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, topic: \"{prefix}.all\","), "sink.kafka.topic"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, topic: \"a/{table}\","), "sink.kafka.topic"),
            (KAFKA.replace("brokers: 127.0.0.1:9092,", "brokers: 127.0.0.1:9092, partitions: 0,"), "partitions"),
            (KAFKA.replace(", state: {host: 127.0.0.1, user: u, password: p, database: st}", ""), "missing field `state`"),
            (GOOD.replace("database: app,", "database: app, slot: My-Slot,"), "source.slot"),
            (GOOD.to_string() + "batch: {max_transaction_memory: 64 elephants}\n", "batch: max_transaction_memory: a size"),
            (GOOD.to_string() + "batch: {max_transaction_memory: 1KiB}\n", "batch: max_transaction_memory: at least 1MiB"),
        ];
        for (text, want) in cases {
            let err = PipelineConfig::parse(&text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
            assert!(!err.contains('\n'));
        }
    }
}
