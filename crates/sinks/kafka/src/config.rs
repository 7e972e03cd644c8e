//! The Kafka sink's settings (`sink: kafka:`), checked on their own, and how they
//! become the producer's options.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_core::PgConnConfig;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkError, SinkResult};
use sluice_core::transform::Step;

use crate::sink::{Encoding, KafkaSink, KafkaSinkOptions, TOPIC_PLACEHOLDERS};

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
    /// Confluent-compatible schema registry (required for Avro), e.g. Sluice's own;
    /// `https://user:password@host` sends basic auth (Confluent's URL credentials).
    pub registry_url: Option<String>,
    /// PEM file of the authority that signed an https registry's certificate.
    #[serde(default)]
    pub registry_ca_file: Option<std::path::PathBuf>,
    /// The same authority as PEM text, for those who may not name a file on the
    /// server (a tenant); not with `registry_ca_file`.
    #[serde(default)]
    pub registry_ca_pem: Option<String>,
    /// Registry context the subjects live in (a tenant's), as `:.<context>:<subject>`.
    pub registry_context: Option<String>,
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Write a tombstone (null value) after each delete, for log compaction.
    #[serde(default = "yes")]
    pub tombstones: bool,
    /// What an update that a `filter` transform drops becomes: `drop` (Kafka
    /// Connect's meaning, the default), or `delete`: a delete event (and tombstone) of
    /// the row's key, so a compacted topic or a replica built from the topic loses the
    /// row, as Postgres's own publication row filters do; deletes then always pass.
    #[serde(default)]
    pub filtered_updates: FilteredUpdates,
    /// librdkafka properties (e.g. `security.protocol`, `sasl.mechanism`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// The Postgres database that keeps the pipeline's snapshot progress (schema `sluice`).
    pub state: PgConnConfig,
}

/// See [`KafkaSinkConfig::filtered_updates`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FilteredUpdates {
    #[default]
    Drop,
    Delete,
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
fn yes() -> bool {
    true
}

impl KafkaSinkConfig {
    /// The producer's options for a pipeline named `pipeline` reading `database`,
    /// with `transforms` (which may ask for row values or headers).
    pub fn options(&self, pipeline: &str, database: &str, transforms: &[Step]) -> KafkaSinkOptions {
        let encoding = match self.encoding {
            KafkaEncoding::Avro => Encoding::Avro {
                registry_url: self.registry_url.clone().unwrap_or_default(),
                ca_file: self.registry_ca_file.clone(),
                ca_pem: self.registry_ca_pem.clone(),
                context: self.registry_context.clone(),
            },
            KafkaEncoding::Json => Encoding::Json,
        };
        KafkaSinkOptions {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            prefix: self.topic_prefix.clone().unwrap_or_else(|| pipeline.to_string()),
            database: database.to_string(),
            encoding,
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            tombstones: self.tombstones,
            filtered_updates_as_deletes: self.filtered_updates == FilteredUpdates::Delete,
            properties: self.properties.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            unwrap: transforms.iter().any(|s| matches!(s, Step::Unwrap(_))),
            headers: transforms
                .iter()
                .filter_map(|s| match s {
                    Step::InsertHeader(h) => Some((h.name.clone(), h.value.clone())),
                    _ => None,
                })
                .collect(),
        }
    }
}

impl SinkConfigure for KafkaSinkConfig {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn validate(&self, _: &PipelineShape<'_>) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("sink.kafka.brokers: give at least one host:port".into());
        }
        let mut rest = self.topic.clone();
        for p in TOPIC_PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if let Some(bad) = rest.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(format!(
                "sink.kafka.topic: {:?} has {:?}, which is neither a placeholder ({}) nor allowed in a topic name ([A-Za-z0-9._-])",
                self.topic,
                &rest[bad..].chars().next().unwrap_or(' '),
                TOPIC_PLACEHOLDERS.join(", ")
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
            return Err(format!("sink.kafka.registry_url: {:?} must start with http:// or https://", sluice_core::https::shown(u)));
        }
        let https = self.registry_url.as_deref().is_some_and(|u| u.starts_with("https://"));
        sluice_core::https::check_private_ca(
            https,
            self.registry_ca_file.as_deref(),
            self.registry_ca_pem.as_deref(),
            "sink.kafka.registry_ca_file",
        )?;
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

    fn state(&self) -> PgConnConfig {
        self.state.clone()
    }

    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move {
            let opts = self.options(&ctx.pipeline, &ctx.source.database, &ctx.transforms);
            let sink = KafkaSink::connect(opts, ctx.egress.as_ref()).await.map_err(|e| SinkError::wrap(e.kind(), e))?;
            Ok(Box::new(sink) as Box<dyn DynSink>)
        })
    }
}
