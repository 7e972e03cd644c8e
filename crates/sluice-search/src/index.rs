//! One index: a tantivy index, a translog that makes an acknowledged write durable before
//! tantivy commits it, and a map of writes not yet visible to searches (so reads by id,
//! versions and partial updates see them at once, as in Elasticsearch).
//!
//! Write path: decide every item of a bulk against the current versions, append the
//! decisions to the translog and fsync, then hand them to tantivy's writer, then answer.
//! Refresh (every `refresh_interval`, or on request): commit tantivy with the last applied
//! translog sequence number as the commit payload, reload the reader, empty the translog.
//! Recovery replays translog entries above the committed sequence number.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tantivy::indexer::UserOperation;
use tantivy::query::TermQuery;
use tantivy::schema::{
    FAST, INDEXED, IndexRecordOption, JsonObjectOptions, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value as _,
};
use tantivy::{DocAddress, DocSet as _, Index, IndexReader, IndexWriter, ReloadPolicy, TERMINATED, TantivyDocument, Term};

use crate::error::{EsError, EsResult};
use crate::mapping::{Indexed, Mapping};

pub(crate) const KIND_ROOT: u64 = 0;
pub(crate) const KIND_CHILD: u64 = 1;
pub(crate) const KIND_TOMBSTONE: u64 = 2;

const META_FILE: &str = "sluice-index.json";
const TRANSLOG_FILE: &str = "translog.jsonl";

/// Writes held uncommitted at most (documents, translog bytes): see [`SearchIndex::write`].
pub(crate) const MAX_UNCOMMITTED_DOCS: usize = 50_000;
const MAX_TRANSLOG_BYTES: u64 = 512 << 20;
const WRITER_MEMORY: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
pub(crate) struct Fields {
    pub uid: tantivy::schema::Field,
    pub kind: tantivy::schema::Field,
    pub nested: tantivy::schema::Field,
    pub version: tantivy::schema::Field,
    pub seq: tantivy::schema::Field,
    pub source: tantivy::schema::Field,
    pub names: tantivy::schema::Field,
    pub kw: tantivy::schema::Field,
    pub text: tantivy::schema::Field,
}

fn schema() -> Schema {
    let mut b = Schema::builder();
    b.add_text_field("_uid", STRING | STORED | FAST);
    b.add_u64_field("_kind", INDEXED | FAST);
    b.add_text_field("_nested", STRING);
    b.add_u64_field("_version", STORED);
    b.add_u64_field("_seq", STORED);
    b.add_bytes_field("_source", STORED);
    b.add_text_field("_fields", STRING);
    let kw = JsonObjectOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer("raw").set_index_option(IndexRecordOption::Basic))
        .set_fast("raw")
        .set_expand_dots_enabled();
    b.add_json_field("_kw", kw);
    let text = JsonObjectOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default().set_tokenizer("default").set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_expand_dots_enabled();
    b.add_json_field("_text", text);
    let _ = TextOptions::default();
    b.build()
}

pub(crate) fn fields(schema: &Schema) -> Fields {
    let f = |n: &str| schema.get_field(n).expect("fixed schema");
    Fields {
        uid: f("_uid"),
        kind: f("_kind"),
        nested: f("_nested"),
        version: f("_version"),
        seq: f("_seq"),
        source: f("_source"),
        names: f("_fields"),
        kw: f("_kw"),
        text: f("_text"),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub mappings: Value,
    #[serde(default)]
    pub settings: Value,
    pub refresh_interval_ms: u64,
    pub created_ms: u64,
}

/// The last state of a document written since the last refresh.
#[derive(Clone)]
pub(crate) enum Live {
    Doc { version: u64, seq: u64, source: Arc<Value> },
    Deleted { version: u64 },
}

/// The state of a document as reads by id see it.
#[derive(Clone)]
pub enum Current {
    Missing,
    Doc { version: u64, seq: u64, source: Arc<Value> },
    Deleted { version: u64 },
}

impl Current {
    fn version(&self) -> Option<u64> {
        match self {
            Current::Missing => None,
            Current::Doc { version, .. } | Current::Deleted { version } => Some(*version),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionType {
    Internal,
    External,
    ExternalGte,
}

impl VersionType {
    pub fn parse(s: &str) -> EsResult<VersionType> {
        match s {
            "internal" => Ok(VersionType::Internal),
            "external" => Ok(VersionType::External),
            "external_gte" => Ok(VersionType::ExternalGte),
            other => Err(EsError::illegal(format!("No version type match [{other}]"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpType {
    Index,
    Create,
    Update,
    Delete,
}

impl OpType {
    pub fn name(self) -> &'static str {
        match self {
            OpType::Index => "index",
            OpType::Create => "create",
            OpType::Update => "update",
            OpType::Delete => "delete",
        }
    }
}

#[derive(Debug)]
pub struct WriteOp {
    pub op: OpType,
    pub id: Option<String>,
    /// The document (index/create) or the update body (`doc`, `doc_as_upsert`, `upsert`).
    pub body: Option<Value>,
    pub version: Option<u64>,
    pub version_type: VersionType,
}

#[derive(Debug)]
pub struct ItemResult {
    pub op: OpType,
    pub id: String,
    pub outcome: Result<Outcome, EsError>,
}

#[derive(Debug)]
pub struct Outcome {
    pub result: &'static str,
    pub status: u16,
    pub version: u64,
    pub seq: u64,
}

/// A translog entry: a decided write (one JSON line: `s`, `id`, `v` and `src` when not a
/// delete). Written by `Logged::log_line`, read back at replay.
#[derive(Deserialize)]
struct Entry {
    s: u64,
    id: String,
    v: u64,
    #[serde(default)]
    src: Option<Value>,
}

/// A decided write on its way to the translog and the writer. The source is shared with
/// the batch's overlay and the real-time map, and serialized once, for the translog line
/// and the stored `_source` alike.
struct Logged {
    s: u64,
    id: String,
    v: u64,
    /// The source and its JSON; `None` for a delete.
    src: Option<(Arc<Value>, Vec<u8>)>,
}

impl Logged {
    fn new(s: u64, id: String, v: u64, src: Option<Arc<Value>>) -> EsResult<Logged> {
        let src = match src {
            Some(value) => {
                let json = serde_json::to_vec(&*value).map_err(EsError::internal)?;
                Some((value, json))
            }
            None => None,
        };
        Ok(Logged { s, id, v, src })
    }

    fn log_line(&self, buf: &mut Vec<u8>) -> EsResult<()> {
        use std::io::Write as _;
        write!(buf, "{{\"s\":{},\"v\":{},\"id\":", self.s, self.v).map_err(EsError::internal)?;
        serde_json::to_writer(&mut *buf, &self.id).map_err(EsError::internal)?;
        if let Some((_, json)) = &self.src {
            buf.extend_from_slice(b",\"src\":");
            buf.extend_from_slice(json);
        }
        buf.extend_from_slice(b"}\n");
        Ok(())
    }
}

struct WriteState {
    writer: IndexWriter,
    translog: File,
    seq: u64,
    live: HashMap<String, Live>,
    dirty: bool,
}

pub struct SearchIndex {
    pub name: String,
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    pub(crate) fields: Fields,
    state: Mutex<WriteState>,
    pub(crate) mapping: RwLock<Mapping>,
    meta: RwLock<Meta>,
    refreshed: tokio::sync::watch::Sender<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl SearchIndex {
    /// Creates the index directory: the mapping and settings are written before the
    /// directory gets its final name, so a crash leaves either no index or a whole one.
    pub(crate) fn create(root: &Path, name: &str, mapping: Mapping, settings: Value, refresh: Duration) -> EsResult<SearchIndex> {
        let dir = root.join(name);
        let tmp = root.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Index::create_in_dir(&tmp, schema())?;
        let meta = Meta { mappings: mapping.to_json(), settings, refresh_interval_ms: refresh.as_millis() as u64, created_ms: now_ms() };
        write_atomic(&tmp.join(META_FILE), &serde_json::to_vec(&meta).map_err(EsError::internal)?)?;
        File::create(tmp.join(TRANSLOG_FILE))?.sync_all()?;
        std::fs::rename(&tmp, &dir)?;
        File::open(root)?.sync_all()?;
        Self::open(root, name)
    }

    pub(crate) fn open(root: &Path, name: &str) -> EsResult<SearchIndex> {
        let dir = root.join(name);
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join(META_FILE))?).map_err(EsError::internal)?;
        let mapping = Mapping::parse(&meta.mappings)?;
        let mut index = Index::open_in_dir(&dir)?;
        // Segments are searched in parallel: lower latency for one page view.
        index.set_multithread_executor(std::thread::available_parallelism().map_or(1, |n| n.get()).min(4))?;
        let fields = fields(&index.schema());
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        let writer = index.writer_with_num_threads(1, WRITER_MEMORY)?;
        let committed: u64 = index.load_metas()?.payload.as_deref().and_then(|p| p.parse().ok()).unwrap_or(0);
        let translog = OpenOptions::new().read(true).append(true).create(true).open(dir.join(TRANSLOG_FILE))?;
        let (refreshed, _) = tokio::sync::watch::channel(0);
        let ix = SearchIndex {
            name: name.to_owned(),
            dir,
            index,
            reader,
            fields,
            state: Mutex::new(WriteState { writer, translog, seq: committed, live: HashMap::new(), dirty: false }),
            mapping: RwLock::new(mapping),
            meta: RwLock::new(meta),
            refreshed,
        };
        ix.replay(committed)?;
        Ok(ix)
    }

    /// Applies translog entries above the committed sequence number; cuts a torn last line
    /// (a write that was never acknowledged).
    fn replay(&self, committed: u64) -> EsResult<()> {
        let mut st = self.state.lock().expect("poisoned");
        let mut file = File::open(self.dir.join(TRANSLOG_FILE))?;
        let mut good = 0u64;
        let mut replayed = 0usize;
        // Logged documents were accepted under the mapping persisted before them.
        let mut mapping = self.mapping.read().expect("poisoned").clone();
        {
            let mut r = BufReader::new(&mut file);
            let mut line = String::new();
            loop {
                line.clear();
                let n = r.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                let Ok(entry) = serde_json::from_str::<Entry>(&line) else { break };
                good += n as u64;
                if entry.s > committed {
                    let indexed = match &entry.src {
                        Some(src) => Some(mapping.index_doc(&entry.id, src)?.0),
                        None => None,
                    };
                    self.apply(&mut st, Logged::new(entry.s, entry.id, entry.v, entry.src.map(Arc::new))?, indexed)?;
                    replayed += 1;
                }
            }
        }
        if good < file.seek(SeekFrom::End(0))? {
            st.translog.set_len(good)?;
            st.translog.sync_all()?;
        }
        if replayed > 0 {
            tracing::info!(index = %self.name, replayed, "replayed translog");
            st.dirty = true;
        }
        Ok(())
    }

    pub(crate) fn meta(&self) -> Meta {
        self.meta.read().expect("poisoned").clone()
    }

    pub(crate) fn refresh_interval(&self) -> Duration {
        Duration::from_millis(self.meta.read().expect("poisoned").refresh_interval_ms)
    }

    pub(crate) fn searcher(&self) -> tantivy::Searcher {
        self.reader.searcher()
    }

    pub(crate) fn tokenizers(&self) -> tantivy::tokenizer::TokenizerManager {
        self.index.tokenizers().clone()
    }

    pub fn mapping_json(&self) -> Value {
        self.mapping.read().expect("poisoned").to_json()
    }

    fn persist_mapping(&self, mapping: &Mapping) -> EsResult<()> {
        let mut meta = self.meta.write().expect("poisoned");
        meta.mappings = mapping.to_json();
        write_atomic(&self.dir.join(META_FILE), &serde_json::to_vec(&*meta).map_err(EsError::internal)?)?;
        *self.mapping.write().expect("poisoned") = mapping.clone();
        Ok(())
    }

    /// Adds fields to the mapping (`PUT {index}/_mapping`).
    pub fn put_mapping(&self, update: &Mapping) -> EsResult<()> {
        let _st = self.state.lock().expect("poisoned");
        let mut mapping = self.mapping.read().expect("poisoned").clone();
        mapping.merge(update)?;
        self.persist_mapping(&mapping)
    }

    /// The committed state of a document (refreshed searcher).
    fn committed(&self, id: &str) -> EsResult<Current> {
        // The id's postings read directly, segment by segment: a search with a collector
        // would allocate its top-k heap for every write of a bulk request.
        let searcher = self.reader.searcher();
        let term = Term::from_field_text(self.fields.uid, id);
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let Some(mut postings) = segment.inverted_index(self.fields.uid)?.read_postings(&term, IndexRecordOption::Basic)? else {
                continue;
            };
            let alive = segment.alive_bitset();
            let mut d = postings.doc();
            while d != TERMINATED {
                if alive.is_none_or(|a| a.is_alive(d)) {
                    let doc: TantivyDocument = searcher.doc(DocAddress::new(ord as u32, d))?;
                    // Nested objects carry the id but no version; the root or tombstone does.
                    if let Some(version) = doc.get_first(self.fields.version).and_then(|v| v.as_u64()) {
                        let seq = doc.get_first(self.fields.seq).and_then(|v| v.as_u64()).unwrap_or(0);
                        return Ok(match doc.get_first(self.fields.source).and_then(|v| v.as_bytes()) {
                            Some(bytes) => {
                                Current::Doc { version, seq, source: Arc::new(serde_json::from_slice(bytes).map_err(EsError::internal)?) }
                            }
                            None => Current::Deleted { version },
                        });
                    }
                }
                d = postings.advance();
            }
        }
        Ok(Current::Missing)
    }

    fn current(&self, st: &WriteState, id: &str) -> EsResult<Current> {
        match st.live.get(id) {
            Some(Live::Doc { version, seq, source }) => Ok(Current::Doc { version: *version, seq: *seq, source: source.clone() }),
            Some(Live::Deleted { version }) => Ok(Current::Deleted { version: *version }),
            None => self.committed(id),
        }
    }

    /// A real-time read by id (`GET {index}/_doc/{id}`).
    pub fn get(&self, id: &str) -> EsResult<Current> {
        let st = self.state.lock().expect("poisoned");
        self.current(&st, id)
    }

    /// Decides, logs durably and applies a batch of writes; per-item results.
    pub fn write(&self, ops: Vec<WriteOp>) -> EsResult<Vec<ItemResult>> {
        let mut st = self.state.lock().expect("poisoned");
        let mut mapping = self.mapping.read().expect("poisoned").clone();
        let mut mapping_changed = false;
        // Decisions see the earlier items of the same batch.
        let mut overlay: HashMap<String, Current> = HashMap::new();
        let mut entries: Vec<(Logged, Option<Indexed>)> = Vec::with_capacity(ops.len());
        let mut results = Vec::with_capacity(ops.len());
        let mut seq = st.seq;
        for mut op in ops {
            let id = op.id.take().unwrap_or_else(new_id);
            let current = match overlay.get(&id) {
                Some(c) => c.clone(),
                None => self.current(&st, &id)?,
            };
            let decided = decide(&mut op, &id, &current, &self.name);
            match decided {
                Ok((Some((version, src)), result, status)) => {
                    // Validated on a copy: a refused document leaves the mapping as it was.
                    let indexed = match &src {
                        Some(src) => match mapping.index_doc(&id, src) {
                            Ok((ix, changed)) => {
                                mapping_changed |= changed;
                                Some(ix)
                            }
                            Err(e) => {
                                results.push(ItemResult { op: op.op, id, outcome: Err(e.with_index(&self.name)) });
                                continue;
                            }
                        },
                        None => None,
                    };
                    seq += 1;
                    overlay.insert(
                        id.clone(),
                        match &src {
                            Some(s) => Current::Doc { version, seq, source: s.clone() },
                            None => Current::Deleted { version },
                        },
                    );
                    entries.push((Logged::new(seq, id.clone(), version, src)?, indexed));
                    results.push(ItemResult { op: op.op, id, outcome: Ok(Outcome { result, status, version, seq }) });
                }
                Ok((None, result, status)) => {
                    let (version, s) = match &current {
                        Current::Doc { version, seq, .. } => (*version, *seq),
                        Current::Deleted { version } => (*version, 0),
                        Current::Missing => (0, 0),
                    };
                    results.push(ItemResult { op: op.op, id, outcome: Ok(Outcome { result, status, version, seq: s }) });
                }
                Err(e) => results.push(ItemResult { op: op.op, id, outcome: Err(e.with_index(&self.name)) }),
            }
        }
        if mapping_changed {
            self.persist_mapping(&mapping)?;
        }
        if entries.is_empty() {
            return Ok(results);
        }
        let mut buf = Vec::with_capacity(entries.iter().map(|(e, _)| e.src.as_ref().map_or(0, |(_, j)| j.len()) + 64).sum());
        for (e, _) in &entries {
            e.log_line(&mut buf)?;
        }
        append_durably(&mut st.translog, &buf)?;
        for (e, indexed) in entries {
            self.apply(&mut st, e, indexed)?;
        }
        st.seq = seq;
        st.dirty = true;
        // Unrefreshed writes are held in memory (for real-time gets) and in the translog:
        // past a bound they are committed now, whatever the refresh interval (as
        // Elasticsearch flushes at `index.translog.flush_threshold_size`), so an index
        // that is never refreshed cannot take the server's memory or disk.
        if st.live.len() >= MAX_UNCOMMITTED_DOCS || st.translog.len()? >= MAX_TRANSLOG_BYTES {
            self.commit(st)?;
        }
        Ok(results)
    }

    fn apply(&self, st: &mut WriteState, e: Logged, indexed: Option<Indexed>) -> EsResult<()> {
        let f = self.fields;
        // One group: the delete, the root and its nested objects land in one segment,
        // which `nested` queries rely on (see `query::ParentsQuery`).
        let mut ops = vec![UserOperation::Delete(Term::from_field_text(f.uid, &e.id))];
        let mut root = TantivyDocument::new();
        root.add_text(f.uid, &e.id);
        root.add_u64(f.version, e.v);
        root.add_u64(f.seq, e.s);
        match (&e.src, indexed) {
            (Some((src, json)), Some(indexed)) => {
                let Indexed { kw, text, fields, children } = indexed;
                root.add_u64(f.kind, KIND_ROOT);
                root.add_bytes(f.source, json);
                add_json(&mut root, f, kw, text, &fields);
                ops.push(UserOperation::Add(root));
                for child in children {
                    let mut d = TantivyDocument::new();
                    d.add_text(f.uid, &e.id);
                    d.add_u64(f.kind, KIND_CHILD);
                    d.add_text(f.nested, &child.path);
                    add_json(&mut d, f, child.kw, child.text, &child.fields);
                    ops.push(UserOperation::Add(d));
                }
                st.writer.run(ops)?;
                st.live.insert(e.id, Live::Doc { version: e.v, seq: e.s, source: src.clone() });
            }
            _ => {
                root.add_u64(f.kind, KIND_TOMBSTONE);
                ops.push(UserOperation::Add(root));
                st.writer.run(ops)?;
                st.live.insert(e.id, Live::Deleted { version: e.v });
            }
        }
        st.seq = st.seq.max(e.s);
        Ok(())
    }

    /// Makes every applied write searchable and truncates the translog.
    pub fn refresh(&self) -> EsResult<()> {
        let st = self.state.lock().expect("poisoned");
        if !st.dirty {
            return Ok(());
        }
        self.commit(st)
    }

    fn commit(&self, mut st: std::sync::MutexGuard<'_, WriteState>) -> EsResult<()> {
        let seq = st.seq;
        let mut prepared = st.writer.prepare_commit()?;
        prepared.set_payload(&seq.to_string());
        prepared.commit()?;
        self.reader.reload()?;
        st.live.clear();
        st.translog.set_len(0)?;
        st.translog.sync_all()?;
        st.dirty = false;
        drop(st);
        self.refreshed.send_modify(|g| *g += 1);
        Ok(())
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.state.lock().expect("poisoned").dirty
    }

    pub(crate) fn subscribe_refresh(&self) -> tokio::sync::watch::Receiver<u64> {
        self.refreshed.subscribe()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of live (root) documents as of the last refresh.
    pub fn doc_count(&self) -> EsResult<u64> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(Term::from_field_u64(self.fields.kind, KIND_ROOT), IndexRecordOption::Basic);
        Ok(searcher.search(&q, &tantivy::collector::Count)? as u64)
    }

    /// Flushes and stops the writer (index deletion).
    pub(crate) fn close(&self) {
        let mut st = self.state.lock().expect("poisoned");
        let _ = st.writer.rollback();
    }
}

fn add_json(doc: &mut TantivyDocument, f: Fields, kw: Map<String, Value>, text: Map<String, Value>, names: &[String]) {
    if !kw.is_empty() {
        doc.add_object(f.kw, json_to_owned(kw));
    }
    if !text.is_empty() {
        doc.add_object(f.text, json_to_owned(text));
    }
    for n in names {
        doc.add_text(f.names, n);
    }
}

fn json_to_owned(m: Map<String, Value>) -> std::collections::BTreeMap<String, tantivy::schema::OwnedValue> {
    m.into_iter().map(|(k, v)| (k, tantivy::schema::OwnedValue::from(v))).collect()
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{:06x}", t, n & 0xff_ffff)
}

type Decision = (Option<(u64, Option<Arc<Value>>)>, &'static str, u16);

/// What a write does given the document's current state: the version and source to write
/// (`None` source = delete), or nothing (noop / not found), or an error for this item.
fn decide(op: &mut WriteOp, id: &str, current: &Current, index: &str) -> EsResult<Decision> {
    let exists = matches!(current, Current::Doc { .. });
    let next_version = |provided: Option<u64>| -> EsResult<u64> {
        match op.version_type {
            VersionType::Internal => {
                if provided.is_some() {
                    return Err(EsError::illegal(
                        "internal versioning can not be used for optimistic concurrency control. Please use `if_seq_no` and `if_primary_term` instead",
                    ));
                }
                Ok(current.version().map_or(1, |v| v + 1))
            }
            VersionType::External | VersionType::ExternalGte => {
                let v = provided.ok_or_else(|| EsError::illegal("version type [external] requires a version"))?;
                if let Some(cur) = current.version() {
                    let conflict = if op.version_type == VersionType::External { v <= cur } else { v < cur };
                    if conflict {
                        let how = if op.version_type == VersionType::External { "higher or equal to" } else { "higher than" };
                        return Err(EsError::conflict(
                            index,
                            id,
                            format!("version conflict, current version [{cur}] is {how} the one provided [{v}]"),
                        ));
                    }
                }
                Ok(v)
            }
        }
    };
    match op.op {
        OpType::Index | OpType::Create => {
            if op.body.is_none() {
                return Err(EsError::parsing(format!("[{id}]: the document source is missing")));
            }
            if op.op == OpType::Create && exists {
                return Err(EsError::conflict(index, id, "version conflict, document already exists".into()));
            }
            let v = next_version(op.version)?;
            let src = op.body.take().map(Arc::new);
            Ok((Some((v, src)), if exists { "updated" } else { "created" }, if exists { 200 } else { 201 }))
        }
        OpType::Delete => {
            let v = next_version(op.version)?;
            if exists || op.version_type != VersionType::Internal {
                Ok((Some((v, None)), if exists { "deleted" } else { "not_found" }, if exists { 200 } else { 404 }))
            } else {
                Ok((None, "not_found", 404))
            }
        }
        OpType::Update => {
            let body = op.body.as_ref().ok_or_else(|| EsError::parsing("[update] request body is missing"))?;
            let Value::Object(body) = body else { return Err(EsError::parsing("[update] body must be an object")) };
            for k in body.keys() {
                if !["doc", "doc_as_upsert", "upsert", "detect_noop", "_source"].contains(&k.as_str()) {
                    return Err(EsError::parsing(format!("[UpdateRequest] unknown field [{k}]")));
                }
            }
            let doc = body.get("doc");
            let merged = match (current, doc) {
                (Current::Doc { source, .. }, Some(doc)) => {
                    let mut merged = (**source).clone();
                    merge_doc(&mut merged, doc);
                    if merged == **source && body.get("detect_noop") != Some(&Value::Bool(false)) {
                        return Ok((None, "noop", 200));
                    }
                    merged
                }
                (Current::Doc { .. }, None) => return Err(EsError::illegal("[update] only `doc` updates are supported (no scripts)")),
                (_, doc) => {
                    if body.get("doc_as_upsert") == Some(&Value::Bool(true)) && doc.is_some() {
                        doc.cloned().expect("checked")
                    } else if let Some(up) = body.get("upsert") {
                        up.clone()
                    } else {
                        let mut e = EsError::new(
                            axum::http::StatusCode::NOT_FOUND,
                            "document_missing_exception",
                            format!("[{id}]: document missing"),
                        );
                        e.index = Some(index.to_owned());
                        return Err(e);
                    }
                }
            };
            let v = next_version(op.version)?;
            Ok((Some((v, Some(Arc::new(merged)))), if exists { "updated" } else { "created" }, if exists { 200 } else { 201 }))
        }
    }
}

/// A partial update: objects merge key by key, anything else replaces.
pub(crate) fn merge_doc(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing @ Value::Object(_)) if v.is_object() => merge_doc(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<SearchIndex>();
    let _ = json!(null);
}

/// What the translog is appended through: a file, or in tests one that fails.
trait Log: Write {
    fn len(&self) -> std::io::Result<u64>;
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

impl Log for File {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.sync_all()
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Appends `buf` (whole lines) and makes it durable. A failed append (a full disk) is
/// cut off again: recovery stops at the first torn line, so a torn line left in front
/// of later, acknowledged appends would lose them.
fn append_durably(log: &mut impl Log, buf: &[u8]) -> std::io::Result<()> {
    let before = log.len()?;
    match log.write_all(buf).and_then(|()| log.sync()) {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Err(cut) = log.truncate(before) {
                tracing::error!(error = %cut, "could not cut a failed translog append; the index recovers up to it");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod translog_tests {
    use super::*;

    /// A translog line written from the serialized source reads back as the entry.
    #[test]
    fn log_lines_read_back() {
        let src = json!({"name": "a \"quoted\" név\n", "n": [1, 2.5, null], "o": {"k": true}});
        for (id, src) in [("plain", Some(src)), ("with \"quotes\" and \\ ünï", None)] {
            let logged = Logged::new(7, id.into(), 42, src.clone().map(Arc::new)).unwrap();
            let mut buf = Vec::new();
            logged.log_line(&mut buf).unwrap();
            assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1, "one line");
            let e: Entry = serde_json::from_slice(&buf).unwrap();
            assert_eq!((e.s, e.id.as_str(), e.v, e.src), (7, id, 42, src));
        }
    }

    /// An index that is never refreshed commits by itself past the bound: memory and
    /// the translog stay bounded, and nothing is lost.
    #[test]
    fn unrefreshed_writes_are_bounded() {
        let root = tempfile::tempdir().unwrap();
        let ix = SearchIndex::create(root.path(), "big", Mapping::default(), json!({}), Duration::from_secs(3600)).unwrap();
        let doc = |i: usize| WriteOp {
            op: OpType::Index,
            id: Some(i.to_string()),
            body: Some(json!({"n": i})),
            version: None,
            version_type: VersionType::Internal,
        };
        for chunk in (0..MAX_UNCOMMITTED_DOCS + 10).collect::<Vec<_>>().chunks(5000) {
            let results = ix.write(chunk.iter().map(|i| doc(*i)).collect()).unwrap();
            assert!(results.iter().all(|r| r.outcome.is_ok()));
        }
        let st = ix.state.lock().unwrap();
        assert!(st.live.len() < MAX_UNCOMMITTED_DOCS, "{} writes held", st.live.len());
        assert!(st.translog.len().unwrap() < 1 << 20);
        drop(st);
        assert!(ix.doc_count().unwrap() >= MAX_UNCOMMITTED_DOCS as u64, "committed past the bound");
        ix.refresh().unwrap();
        assert_eq!(ix.doc_count().unwrap(), (MAX_UNCOMMITTED_DOCS + 10) as u64);
    }

    /// A log that takes `room` more bytes, then fails like a full disk.
    struct Full {
        data: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
            }
            let n = buf.len().min(self.room);
            self.data.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log for Full {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.data.len() as u64)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.data.truncate(len as usize);
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_append_leaves_no_torn_line() {
        let mut log = Full { data: Vec::new(), room: 30 };
        append_durably(&mut log, b"{\"s\":1}\n").unwrap();
        let err = append_durably(&mut log, b"{\"s\":2,\"src\":\"a long document\"}\n").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(log.data, b"{\"s\":1}\n", "the partial line is cut off");
        log.room = 100;
        append_durably(&mut log, b"{\"s\":2}\n").unwrap();
        assert_eq!(log.data, b"{\"s\":1}\n{\"s\":2}\n", "the next append follows a whole line");
    }
}
