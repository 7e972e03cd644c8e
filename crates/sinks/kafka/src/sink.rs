//! The Kafka sink: one topic per table, key = primary key, value = Debezium envelope.
//!
//! Delivery is at least once. The producer is idempotent with `acks=all`, so retries
//! inside librdkafka neither duplicate nor reorder a partition's records; `apply`
//! returns only after the broker acknowledged every record of the batch, and only
//! then does the pipeline confirm the batch's LSN to the source. After a crash, the
//! source resends from the last confirmed LSN, so records past it may appear twice
//! (`source.commit_lsn` + `source.event_seq` identify a change for deduplication).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use sluice_core::egress::Egress;
use sluice_core::sink::{Sink, SinkResult, SnapshotChunk, SnapshotMethod};
use sluice_core::{ChangeEvent, ErrorKind, Lsn, Op, Row, SourcePosition, TableName, TableSchema, Transaction};
use tokio::sync::Mutex;

use crate::envelope::{EventEncoder, EventMeta, value_schema};
use crate::error::{KafkaSinkError, Result};
use crate::probe::Guarded;
use crate::registry::RegistryClient;

/// How records are encoded.
#[derive(Debug, Clone)]
pub enum Encoding {
    /// Avro in Confluent's wire format, schemas registered at this registry URL under
    /// `<context><topic>-key` / `-value` (TopicNameStrategy).
    Avro { registry_url: String, ca_file: Option<std::path::PathBuf>, ca_pem: Option<String>, context: Option<String> },
    /// Schemaless JSON.
    Json,
}

#[derive(Debug, Clone)]
pub struct KafkaSinkOptions {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic name template over `{prefix}`, `{schema}` and `{table}`.
    pub topic: String,
    /// The logical server name: `{prefix}` in topics, `source.name` in events and the
    /// Avro namespace root (Debezium's `topic.prefix`).
    pub prefix: String,
    /// The source database, for `source.db`.
    pub database: String,
    pub encoding: Encoding,
    /// Partitions and replication factor of topics Sluice creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Follow each delete with a tombstone (same key, null value) so log compaction
    /// can drop the key.
    pub tombstones: bool,
    /// An update a `filter` drops is sent as a delete of its row.
    pub filtered_updates_as_deletes: bool,
    /// librdkafka properties that override the defaults (security, tuning).
    pub properties: Vec<(String, String)>,
    /// Write row states instead of change envelopes (the `unwrap` transform): a
    /// delete becomes a tombstone, a truncate is not written.
    pub unwrap: bool,
    /// Headers on every record (the `insert_header` transform).
    pub headers: Vec<(String, String)>,
}

pub const TOPIC_PLACEHOLDERS: [&str; 3] = ["{prefix}", "{schema}", "{table}"];

/// Kafka topic names allow `[A-Za-z0-9._-]`, at most 249 characters.
fn topic_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

impl KafkaSinkOptions {
    pub fn topic_for(&self, table: &TableName) -> String {
        let t = self
            .topic
            .replace("{prefix}", &topic_safe(&self.prefix))
            .replace("{schema}", &topic_safe(&table.schema))
            .replace("{table}", &topic_safe(&table.name));
        t.chars().take(249).collect()
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // Java clients hash keys with murmur2: the same key lands in the same
            // partition whichever client wrote it.
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.timeout.ms", "120000")
            .set("client.id", format!("sluice-{}", self.prefix));
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

struct TableOut {
    topic: String,
    enc: EventEncoder,
}

struct Inner {
    opts: KafkaSinkOptions,
    producer: FutureProducer<Guarded>,
    /// Where the admin clients made later may connect.
    egress: Option<Arc<Egress>>,
    registry: Option<RegistryClient>,
    headers: Option<OwnedHeaders>,
    /// The encoder of each table's current shape; held across registration so one
    /// shape is registered once.
    tables: Mutex<HashMap<TableName, Arc<TableOut>>>,
}

/// Cheap to clone: snapshot workers and the streaming loop share one producer.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn encode_err(table: &TableName, e: crate::avro::EncodeError) -> KafkaSinkError {
    KafkaSinkError::with_source(ErrorKind::Permanent, format!("encoding a change of {table}: {e}"), e)
}

impl KafkaSink {
    /// Creates the producer and checks the brokers answer (within 10 s). `egress`:
    /// where the schema registry's client and every Kafka client may connect (each
    /// broker connection is checked on the address librdkafka resolved: [`Guarded`]).
    pub async fn connect(opts: KafkaSinkOptions, egress: Option<&Arc<Egress>>) -> Result<Self> {
        // Built first (no I/O): a refused registry setting fails before any broker is
        // asked.
        let registry = match &opts.encoding {
            Encoding::Avro { registry_url, ca_file, ca_pem, .. } => {
                Some(RegistryClient::new(registry_url, ca_file.as_deref(), ca_pem.as_deref(), egress)?)
            }
            Encoding::Json => None,
        };
        crate::probe::brokers_answer(opts.client_config(), &opts.brokers, "sink.kafka", egress).await?;
        let producer: FutureProducer<Guarded> = opts
            .client_config()
            .create_with_context(Guarded::new(egress))
            .map_err(|e| KafkaSinkError::from_kafka(&format!("creating a Kafka producer for {}", opts.brokers), e))?;
        let headers = (!opts.headers.is_empty()).then(|| {
            opts.headers.iter().fold(OwnedHeaders::new_with_capacity(opts.headers.len()), |h, (k, v)| {
                h.insert(Header { key: k, value: Some(v.as_bytes()) })
            })
        });
        let egress = egress.cloned();
        Ok(Self { inner: Arc::new(Inner { opts, producer, egress, registry, headers, tables: Mutex::new(HashMap::new()) }) })
    }

    pub fn options(&self) -> &KafkaSinkOptions {
        &self.inner.opts
    }

    fn admin(&self) -> Result<AdminClient<Guarded>> {
        let guard = Guarded::new(self.inner.egress.as_ref());
        self.inner
            .opts
            .client_config()
            .create_with_context(guard)
            .map_err(|e| KafkaSinkError::from_kafka("creating a Kafka admin client", e))
    }

    /// Creates the table's topic when missing and registers its schemas.
    pub async fn prepare_table(&self, schema: &Arc<TableSchema>) -> Result<()> {
        let opts = &self.inner.opts;
        let topic = opts.topic_for(&schema.name);
        let admin = self.admin()?;
        let new = NewTopic::new(&topic, opts.partitions, TopicReplication::Fixed(opts.replication_factor));
        let results = admin
            .create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
            .await
            .map_err(|e| KafkaSinkError::from_kafka(&format!("creating topic {topic}"), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = %topic, partitions = opts.partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(KafkaSinkError::from_kafka(&format!("creating topic {t}"), KafkaError::AdminOp(code)));
                }
            }
        }
        self.table_out(schema).await?;
        Ok(())
    }

    /// Deletes the table's topic and, with Avro, its key and value subjects (a
    /// pipeline's teardown with purge). Missing ones are fine.
    pub async fn remove_table(&self, table: &TableName) -> Result<()> {
        let opts = &self.inner.opts;
        let topic = opts.topic_for(table);
        let admin = self.admin()?;
        let results = admin
            .delete_topics(&[&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
            .await
            .map_err(|e| KafkaSinkError::from_kafka(&format!("deleting topic {topic}"), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = %topic, "deleted topic"),
                Err((_, RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) => {}
                Err((t, code)) => return Err(KafkaSinkError::from_kafka(&format!("deleting topic {t}"), KafkaError::AdminOp(code))),
            }
        }
        if let (Encoding::Avro { context, .. }, Some(registry)) = (&opts.encoding, &self.inner.registry) {
            let ctx = context.as_deref().map(|c| format!(":.{c}:")).unwrap_or_default();
            for part in ["key", "value"] {
                registry.delete_subject(&format!("{ctx}{topic}-{part}")).await?;
            }
        }
        Ok(())
    }

    /// The encoder for this shape of the table, registering its schemas first when the
    /// shape is new: nothing is produced in a shape the registry has not accepted.
    async fn table_out(&self, schema: &Arc<TableSchema>) -> Result<Arc<TableOut>> {
        let mut tables = self.inner.tables.lock().await;
        if let Some(t) = tables.get(&schema.name)
            && (Arc::ptr_eq(&t.enc.table, schema) || t.enc.table.columns == schema.columns)
        {
            return Ok(t.clone());
        }
        let opts = &self.inner.opts;
        let topic = opts.topic_for(&schema.name);
        let enc = match (&opts.encoding, &self.inner.registry) {
            (Encoding::Avro { context, .. }, Some(registry)) => {
                let ctx = context.as_deref().map(|c| format!(":.{c}:")).unwrap_or_default();
                let key_id = registry.register(&format!("{ctx}{topic}-key"), &sluice_core::avro::key_schema(&opts.prefix, schema)).await?;
                let value_id = registry.register(&format!("{ctx}{topic}-value"), &value_schema(&opts.prefix, schema, opts.unwrap)).await?;
                tracing::info!(table = %schema.name, topic = %topic, key_id, value_id, "schemas registered");
                EventEncoder::avro(schema.clone(), &opts.prefix, key_id, value_id, opts.unwrap).map_err(|e| encode_err(&schema.name, e))?
            }
            _ => EventEncoder::json(schema.clone(), opts.unwrap),
        };
        let out = Arc::new(TableOut { topic, enc });
        tables.insert(schema.name.clone(), out.clone());
        Ok(out)
    }

    /// Produces rows read by the initial snapshot (op `r`) and waits for the acks.
    pub async fn send_snapshot_rows(&self, table: &Arc<TableSchema>, rows: Vec<Row>, snapshot_lsn: Lsn) -> Result<()> {
        let out = self.table_out(table).await?;
        let position = SourcePosition { lsn: snapshot_lsn, commit_lsn: snapshot_lsn, xid: 0, commit_time_us: now_ms() * 1000, seq: 0 };
        let events: Vec<ChangeEvent> =
            rows.into_iter().map(|r| ChangeEvent { op: Op::Read, table: table.clone(), before: None, after: Some(r), position }).collect();
        self.produce(events.iter().map(|e| (&out, e))).await
    }

    async fn produce<'a>(&self, items: impl Iterator<Item = (&'a Arc<TableOut>, &'a ChangeEvent)>) -> Result<()> {
        let opts = &self.inner.opts;
        let meta = EventMeta { prefix: &opts.prefix, database: &opts.database, now_ms: now_ms() };
        let mut pending = VecDeque::new();
        let (mut key, mut old_key, mut value) = (Vec::new(), Vec::new(), Vec::new());
        for (out, e) in items {
            let name = &e.table.name;
            key.clear();
            value.clear();
            match (e.op, &e.before, &e.after) {
                (Op::Truncate, ..) if opts.unwrap => {}
                (Op::Delete, Some(old), _) if opts.unwrap => {
                    out.enc.key(old, &mut key).map_err(|x| encode_err(name, x))?;
                    self.send(&out.topic, Some(&key), None, &mut pending).await?;
                }
                (Op::Truncate, ..) => {
                    out.enc.value(e, &meta, &mut value).map_err(|x| encode_err(name, x))?;
                    self.send(&out.topic, None, Some(&value), &mut pending).await?;
                }
                (Op::Delete, Some(old), _) => {
                    out.enc.key(old, &mut key).map_err(|x| encode_err(name, x))?;
                    out.enc.value(e, &meta, &mut value).map_err(|x| encode_err(name, x))?;
                    self.send(&out.topic, Some(&key), Some(&value), &mut pending).await?;
                    if opts.tombstones {
                        self.send(&out.topic, Some(&key), None, &mut pending).await?;
                    }
                }
                (_, before, Some(new)) => {
                    out.enc.key(new, &mut key).map_err(|x| encode_err(name, x))?;
                    if let (Op::Update, Some(old)) = (e.op, before) {
                        old_key.clear();
                        out.enc.key(old, &mut old_key).map_err(|x| encode_err(name, x))?;
                        if old_key != key && opts.unwrap {
                            self.send(&out.topic, Some(&old_key), None, &mut pending).await?;
                        } else if old_key != key {
                            // A key change is a delete under the old key and a create
                            // under the new one, as Debezium emits it: each key's
                            // history stays in its own partition.
                            let del = ChangeEvent { op: Op::Delete, after: None, ..e.clone() };
                            out.enc.value(&del, &meta, &mut value).map_err(|x| encode_err(name, x))?;
                            self.send(&out.topic, Some(&old_key), Some(&value), &mut pending).await?;
                            if opts.tombstones {
                                self.send(&out.topic, Some(&old_key), None, &mut pending).await?;
                            }
                            value.clear();
                            let ins = ChangeEvent { op: Op::Insert, before: None, ..e.clone() };
                            out.enc.value(&ins, &meta, &mut value).map_err(|x| encode_err(name, x))?;
                            self.send(&out.topic, Some(&key), Some(&value), &mut pending).await?;
                            continue;
                        }
                    }
                    out.enc.value(e, &meta, &mut value).map_err(|x| encode_err(name, x))?;
                    self.send(&out.topic, Some(&key), Some(&value), &mut pending).await?;
                }
                _ => tracing::warn!(table = %name, op = ?e.op, "change without a row image skipped"),
            }
        }
        while let Some(f) = pending.pop_front() {
            wait(f).await?;
        }
        Ok(())
    }

    /// Hands one record to librdkafka (which copies it), waiting for room when its
    /// queue is full.
    async fn send(&self, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>, pending: &mut VecDeque<DeliveryFuture>) -> Result<()> {
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(h) = &self.inner.headers {
                rec = rec.headers(h.clone());
            }
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(v) = value {
                rec = rec.payload(v);
            }
            match self.inner.producer.send_result(rec) {
                Ok(f) => {
                    pending.push_back(f);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => match pending.pop_front() {
                    Some(f) => wait(f).await?,
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                },
                Err((e, _)) => return Err(KafkaSinkError::from_kafka(&format!("producing to {topic}"), e)),
            }
        }
    }
}

async fn wait(f: DeliveryFuture) -> Result<()> {
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, m))) => {
            use rdkafka::Message as _;
            Err(KafkaSinkError::from_kafka(&format!("delivering to {}", m.topic()), e))
        }
        Err(_) => Err(KafkaSinkError::new(ErrorKind::Transient, "the Kafka producer dropped a delivery")),
    }
}

impl KafkaSink {
    /// Produces the batch's records; returns once the broker acknowledged all of them.
    pub async fn apply(&self, txns: &[Transaction]) -> Result<()> {
        // Every shape in the batch is registered before anything is produced, so a
        // rejected schema stops the batch whole.
        let mut outs: Vec<(&Arc<TableSchema>, Arc<TableOut>)> = Vec::new();
        let mut index = Vec::with_capacity(txns.iter().map(|t| t.events.len()).sum());
        // A captured schema change registers the new version when it commits, even
        // before a row in that shape: a refused one halts at its statement.
        for c in txns.iter().flat_map(|t| &t.ddl) {
            if let sluice_core::ddl::SchemaChangeKind::Columns { after, .. } = &c.kind {
                self.table_out(after).await?;
            }
        }
        for e in txns.iter().flat_map(|t| &t.events) {
            let i = match outs.iter().position(|(t, _)| Arc::ptr_eq(t, &e.table)) {
                Some(i) => i,
                None => {
                    outs.push((&e.table, self.table_out(&e.table).await?));
                    outs.len() - 1
                }
            };
            index.push(i);
        }
        self.produce(txns.iter().flat_map(|t| &t.events).zip(&index).map(|(e, &i)| (&outs[i].1, e))).await
    }
}

/// At least once: the slot's confirmed position is the checkpoint, snapshot rows are
/// sent as `op: r` records, topics and schema subjects are the sink's objects.
impl Sink for KafkaSink {
    /// Only when asked (`filtered_updates: delete`): a topic is an event stream.
    fn keeps_rows_by_key(&self) -> bool {
        self.inner.opts.filtered_updates_as_deletes
    }

    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::Rows
    }

    async fn prepare(&mut self, tables: &[Arc<TableSchema>]) -> SinkResult<()> {
        for t in tables {
            self.prepare_table(t).await.map_err(to_sink)?;
        }
        Ok(())
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        // What was delivered is known from the snapshot progress in the state database.
        Ok(false)
    }

    async fn snapshot_rows(&self, table: &Arc<TableSchema>, _: &SnapshotChunk, rows: Vec<Row>, snapshot_lsn: Lsn) -> SinkResult<()> {
        self.send_snapshot_rows(table, rows, snapshot_lsn)
            .await
            .map_err(|e| sluice_core::sink::SinkError::new(e.kind(), format!("snapshot of {}: {e}", table.name)))
    }

    async fn apply(&mut self, txns: &[Transaction]) -> SinkResult<()> {
        KafkaSink::apply(self, txns).await.map_err(to_sink)
    }

    async fn teardown(&self, tables: &[TableName], purge: bool) -> SinkResult<()> {
        if purge {
            for t in tables {
                self.remove_table(t).await.map_err(to_sink)?;
            }
        }
        Ok(())
    }
}

fn to_sink(e: KafkaSinkError) -> sluice_core::sink::SinkError {
    sluice_core::sink::SinkError::wrap(e.kind(), e)
}
