//! One Iceberg table: its metadata, created from the source table's shape, and the
//! files of one commit (data files, equality deletes, manifests, the manifest list and
//! the next metadata file). Nothing here touches the catalog: the sink swaps the
//! pointers of every table of a commit, with the checkpoint, in one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_ord::sort::{SortColumn, SortOptions, lexsort_to_indices};
use arrow_schema::SchemaRef as ArrowSchemaRef;
use arrow_select::concat::concat_batches;
use arrow_select::take::take_record_batch;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, DataFileFormat, FormatVersion, MAIN_BRANCH, ManifestFile, ManifestList, ManifestListWriter, ManifestWriterBuilder,
    NestedField, NullOrder, Operation, PartitionSpec, Schema, Snapshot, SortDirection, SortOrder, Summary, TableMetadata,
    TableMetadataBuilder, UnboundPartitionSpec,
};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::base_writer::equality_delete_writer::{EqualityDeleteFileWriterBuilder, EqualityDeleteWriterConfig};
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::file::properties::WriterProperties;
use sluice_core::{Datum, Lsn, Row, TableSchema};

use crate::config::Mode;
use crate::encoding::Kind;

/// The columns a changelog table adds after the source's, with their kinds.
pub(crate) const CHANGELOG_COLUMNS: [(&str, Kind); 4] =
    [("_op", Kind::String), ("_lsn", Kind::Long), ("_commit_ts", Kind::TimestampTz), ("_seq", Kind::Long)];

/// The table property holding the commit LSN from which the current schema holds:
/// changes older than it (sent again after a restart) may carry an older shape.
const SCHEMA_LSN: &str = "sluice.schema-lsn";

pub(crate) type IcebergResult<T> = Result<T, iceberg::Error>;

/// What fills one field of the Iceberg table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A source column (matched by name).
    Column,
    /// One of a changelog's own columns, by its place in [`CHANGELOG_COLUMNS`].
    Changelog(usize),
}

/// The source shape rows are currently mapped from: for each field of the table, the
/// source column that fills it (`None`: the column was dropped at the source, or the
/// field is a changelog's own).
struct Shape {
    source: Arc<TableSchema>,
    from: Vec<Option<usize>>,
}

pub(crate) struct Table {
    pub namespace: String,
    pub name: String,
    pub metadata: TableMetadata,
    pub metadata_location: String,
    pub arrow: ArrowSchemaRef,
    /// Each field's kind and role, in the table's order. Staged rows are in this order
    /// (rows staged before a column was added are shorter: the rest reads as null).
    pub kinds: Vec<Kind>,
    pub slots: Vec<Slot>,
    /// The fields that form the key (upsert mode: the identifier fields), by position.
    pub keys: Vec<usize>,
    shape: Option<Shape>,
    /// Whether a commit writes the next metadata file itself (a SQL catalog), or the
    /// catalog does (REST).
    pub writes_metadata: bool,
    /// Source transactions up to this commit LSN are in the table already (a REST
    /// catalog's commits are not atomic with the checkpoint).
    pub skip_until: Lsn,
}

/// The table's schema for a source table: keys required and the table's identifier
/// (upsert), every other column optional.
pub(crate) fn schema_for(source: &TableSchema, mode: Mode) -> IcebergResult<Schema> {
    let mut fields = Vec::new();
    let mut ids = Vec::new();
    for (i, c) in source.columns.iter().enumerate() {
        let id = i as i32 + 1;
        let ty = Kind::of(c).iceberg();
        if c.is_key && mode == Mode::Upsert {
            ids.push(id);
            fields.push(Arc::new(NestedField::required(id, &c.name, ty)));
        } else {
            fields.push(Arc::new(NestedField::optional(id, &c.name, ty)));
        }
    }
    if mode == Mode::Changelog {
        for (j, (name, kind)) in CHANGELOG_COLUMNS.iter().enumerate() {
            fields.push(Arc::new(NestedField::optional((source.columns.len() + j) as i32 + 1, *name, kind.iceberg())));
        }
    }
    Schema::builder().with_fields(fields).with_identifier_field_ids(ids).build()
}

/// Why a source shape cannot be written to the table: the pipeline halts with it.
#[derive(Debug)]
pub(crate) struct Refusal(pub String);

fn invalid(message: String) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, message)
}

impl Table {
    /// Metadata for a new, empty table at `location`, partitioned and sorted as
    /// configured. The unpartitioned spec (id 0) stays beside a configured one: the
    /// equality deletes are written with it, which makes them apply across partitions
    /// (a row whose partition column changed is deleted where it was).
    pub fn new_metadata(
        schema: Schema,
        location: &str,
        spec: Option<UnboundPartitionSpec>,
        order: Option<SortOrder>,
    ) -> IcebergResult<TableMetadata> {
        let mut b = TableMetadataBuilder::new(
            schema,
            PartitionSpec::unpartition_spec(),
            SortOrder::unsorted_order(),
            location.to_string(),
            FormatVersion::V2,
            Self::properties(),
        )?;
        if let Some(spec) = spec {
            b = b.add_partition_spec(spec)?.set_default_partition_spec(-1)?;
        }
        if let Some(order) = order {
            b = b.add_sort_order(order)?.set_default_sort_order(-1)?;
        }
        Ok(b.build()?.metadata)
    }

    /// The properties of a table Sluice creates.
    pub fn properties() -> HashMap<String, String> {
        HashMap::from([("write.format.default".to_string(), "parquet".to_string())])
    }

    /// The table as its metadata describes it; which source shape fills it is learnt
    /// from the first rows ([`Table::map`]).
    pub fn open(namespace: &str, name: &str, metadata: TableMetadata, metadata_location: String, mode: Mode) -> IcebergResult<Self> {
        let mut t = Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            metadata,
            metadata_location,
            arrow: Arc::new(arrow_schema::Schema::empty()),
            kinds: Vec::new(),
            slots: Vec::new(),
            keys: Vec::new(),
            shape: None,
            writes_metadata: true,
            skip_until: Lsn::ZERO,
        };
        t.load_schema(mode)?;
        let made_for = |other: &str| {
            invalid(format!("Iceberg table {namespace}.{name} was made for {other}: drop it (teardown --purge) or name another namespace"))
        };
        match mode {
            Mode::Upsert if t.keys.is_empty() => {
                return Err(made_for("another writer or the changelog mode (it has no identifier fields)"));
            }
            Mode::Changelog if t.slots.iter().filter(|s| matches!(s, Slot::Changelog(_))).count() != CHANGELOG_COLUMNS.len() => {
                return Err(made_for("the upsert mode (it lacks _op, _lsn, _commit_ts, _seq)"));
            }
            _ => {}
        }
        Ok(t)
    }

    /// Kinds, slots, keys and the Arrow schema from the current Iceberg schema.
    fn load_schema(&mut self, mode: Mode) -> IcebergResult<()> {
        let schema = self.metadata.current_schema().clone();
        self.arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema)?);
        let ids: Vec<i32> = schema.identifier_field_ids().collect();
        self.kinds.clear();
        self.slots.clear();
        self.keys.clear();
        for (i, f) in schema.as_struct().fields().iter().enumerate() {
            let kind = Kind::from_iceberg(&f.field_type).ok_or_else(|| {
                invalid(format!(
                    "field {} of Iceberg table {}.{} has type {}, which Sluice does not write",
                    f.name, self.namespace, self.name, f.field_type
                ))
            })?;
            let changelog = CHANGELOG_COLUMNS.iter().position(|(n, _)| *n == f.name).filter(|_| mode == Mode::Changelog);
            self.kinds.push(kind);
            self.slots.push(changelog.map_or(Slot::Column, Slot::Changelog));
            if ids.contains(&f.id) {
                self.keys.push(i);
            }
        }
        Ok(())
    }

    fn schema_lsn(&self) -> Lsn {
        self.metadata.properties().get(SCHEMA_LSN).and_then(|v| v.parse().ok()).unwrap_or(Lsn::ZERO)
    }

    /// Maps rows of `source` onto the table, evolving its schema (in memory: the next
    /// commit publishes it) when the source added a column or widened a type. A change
    /// Iceberg cannot follow is refused. `lsn` is the commit LSN of the change bringing
    /// the shape: an older one is a change sent again after a restart, which may carry
    /// the shape from before an evolution the table already has. A narrowed column is
    /// written into the wider field only with `accept_narrowing`.
    pub fn map(&mut self, source: &Arc<TableSchema>, lsn: Lsn, mode: Mode, accept_narrowing: bool) -> Result<(), Refusal> {
        if self.shape.as_ref().is_some_and(|s| Arc::ptr_eq(&s.source, source)) {
            return Ok(());
        }
        let schema = self.metadata.current_schema().clone();
        let fields = schema.as_struct().fields();
        let replay = lsn < self.schema_lsn();
        let mut next: Vec<NestedField> = fields.iter().map(|f| f.as_ref().clone()).collect();
        let mut added = 0;
        let mut changed = false;
        for c in &source.columns {
            let want = Kind::of(c);
            let at = fields.iter().zip(&self.slots).position(|(f, s)| *s == Slot::Column && f.name == c.name);
            let Some(i) = at else {
                added += 1;
                next.push(NestedField::optional(self.metadata.last_column_id() + added, &c.name, want.iceberg()));
                changed = true;
                continue;
            };
            let have = self.kinds[i];
            if have == want || (replay && want.widens_to(have)) {
                continue;
            }
            if have.widens_to(want) {
                *next[i].field_type = want.iceberg();
                changed = true;
                continue;
            }
            let narrowed = want.widens_to(have);
            if narrowed && accept_narrowing {
                continue;
            }
            let was = self
                .shape
                .as_ref()
                .and_then(|s| s.source.columns.iter().find(|o| o.name == c.name))
                .filter(|o| Kind::of(o) != want)
                .map_or(have.pg_name(), |o| o.type_name.as_str());
            let fix = if narrowed {
                "set sink.iceberg.accept_narrowing: true to write the values into the wider field (each of them fits), or drop \
                 the table (sluice teardown --purge) and start the pipeline again to resnapshot it"
            } else {
                "drop the table (sluice teardown --purge) and start the pipeline again to resnapshot it, or leave the table \
                 out of the pipeline"
            };
            return Err(Refusal(format!(
                "column {} of {} was {} from {was} to {} ({have} to {want} in Iceberg table {}.{}), and an Iceberg field only \
                 widens (int to long, float to double, decimal precision up): {fix}",
                c.name,
                source.name,
                if narrowed { "narrowed" } else { "changed" },
                c.type_name,
                self.namespace,
                self.name
            )));
        }
        for &k in &self.keys {
            if !source.columns.iter().any(|c| c.name == fields[k].name) {
                return Err(Refusal(format!(
                    "key column {} of {} is gone at the source, and Iceberg table {}.{} keeps one row per key: restore the column,                      or drop the table (sluice teardown --purge) and start the pipeline again",
                    fields[k].name, source.name, self.namespace, self.name
                )));
            }
        }
        if changed {
            let ids: Vec<i32> = schema.identifier_field_ids().collect();
            let evolved = Schema::builder()
                .with_fields(next.into_iter().map(Arc::new))
                .with_identifier_field_ids(ids)
                .build()
                .and_then(|s| {
                    TableMetadataBuilder::new_from_metadata(self.metadata.clone(), Some(self.metadata_location.clone()))
                        .add_current_schema(s)?
                        .set_properties(HashMap::from([(SCHEMA_LSN.to_string(), lsn.to_string())]))?
                        .build()
                })
                .map_err(|e| Refusal(format!("evolving the schema of Iceberg table {}.{}: {e}", self.namespace, self.name)))?;
            // The evolved metadata is the base of the next commit, so it carries the
            // new schema; staged rows keep their positions (new fields come last).
            self.metadata = evolved.metadata;
            self.load_schema(mode).map_err(|e| Refusal(e.to_string()))?;
            tracing::info!(table = %format!("{}.{}", self.namespace, self.name), added, "Iceberg table schema evolved");
        }
        let names: Vec<&str> = self.arrow.fields().iter().map(|f| f.name().as_str()).collect();
        let from = names
            .iter()
            .zip(&self.slots)
            .map(|(n, s)| if *s == Slot::Column { source.columns.iter().position(|c| c.name == *n) } else { None })
            .collect();
        self.shape = Some(Shape { source: source.clone(), from });
        Ok(())
    }

    /// Moves the base of the next commit to `location`, which maintenance committed on
    /// top of this table's last commit (compaction, expiry); the schema this process
    /// evolved and has not committed yet is carried over. Anything else moved the
    /// pointer: another writer, which the sink refuses to race.
    pub async fn rebase(&mut self, io: &FileIO, location: String, maintenance: &str) -> IcebergResult<()> {
        let theirs = TableMetadata::read_from(io, &location).await?;
        self.rebase_to(theirs, location, maintenance)
    }

    /// [`Table::rebase`] onto metadata already read.
    pub fn rebase_to(&mut self, theirs: TableMetadata, location: String, maintenance: &str) -> IcebergResult<()> {
        let ours = self.metadata.current_snapshot().map(|s| s.snapshot_id());
        let mut at = theirs.current_snapshot();
        let foreign = || {
            invalid(format!(
                "Iceberg table {}.{} was changed by another writer since Sluice last committed it: only this pipeline \
                 (and its maintenance) may write the tables it mirrors; stop the other writer and restart the pipeline",
                self.namespace, self.name
            ))
        };
        loop {
            match at {
                None if ours.is_none() => break,
                Some(s) if Some(s.snapshot_id()) == ours => break,
                Some(s) if s.summary().additional_properties.contains_key(maintenance) => {
                    if s.parent_snapshot_id() == ours {
                        break; // expiry may have removed ours already
                    }
                    at = s.parent_snapshot_id().and_then(|p| theirs.snapshot_by_id(p));
                }
                _ => return Err(foreign()),
            }
        }
        let mut next = theirs;
        if next.current_schema().as_struct() != self.metadata.current_schema().as_struct() {
            let lsn = self.metadata.properties().get(SCHEMA_LSN).cloned().unwrap_or_default();
            next = TableMetadataBuilder::new_from_metadata(next, Some(location.clone()))
                .add_current_schema(self.metadata.current_schema().as_ref().clone())?
                .set_properties(HashMap::from([(SCHEMA_LSN.to_string(), lsn)]))?
                .build()?
                .metadata;
        }
        self.metadata = next;
        self.metadata_location = location;
        Ok(())
    }

    /// The last source commit LSN a streamed commit put in the table: the highest its
    /// snapshots record (they only grow; maintenance snapshots record none).
    pub fn committed_lsn(&self) -> Lsn {
        self.metadata
            .snapshots()
            .filter_map(|s| s.summary().additional_properties.get("sluice.commit-lsn")?.parse::<Lsn>().ok())
            .max()
            .unwrap_or(Lsn::ZERO)
    }

    /// The snapshot LSN at which a commit of this table holds snapshot chunk `chunk`
    /// already (a REST commit whose done mark was lost in a crash; the restart read the
    /// chunk again at a later LSN). Chunks of an earlier snapshot (before a resync) are
    /// older than the streamed commits since, and do not count.
    pub fn holds_chunk(&self, chunk: &str) -> Option<Lsn> {
        let streamed = self.committed_lsn();
        self.metadata
            .snapshots()
            .filter_map(|s| {
                let p = &s.summary().additional_properties;
                (p.get("sluice.snapshot-chunk")? == chunk).then_some(())?;
                p.get("sluice.snapshot-lsn")?.parse::<Lsn>().ok()
            })
            .filter(|l| *l >= streamed)
            .max()
    }

    /// The source table rows come from (for messages).
    pub fn source_name(&self) -> &sluice_core::TableName {
        &self.shape.as_ref().expect("rows are mapped before they are staged").source.name
    }

    /// A source row (of the shape last [mapped](Table::map)) in the table's field order.
    pub fn fields_of(&self, row: &Row) -> Row {
        let shape = self.shape.as_ref().expect("rows are mapped before they are staged");
        shape.from.iter().map(|f| f.and_then(|j| row.get(j).cloned()).unwrap_or(Datum::Null)).collect()
    }

    /// What writing the table's files needs, apart from the table (cheap to clone, so
    /// snapshot chunks write their files in parallel).
    pub(crate) fn files(&self, io: &FileIO) -> IcebergResult<Files> {
        let mut key_ids: Vec<i32> = self.metadata.current_schema().identifier_field_ids().collect();
        key_ids.sort_unstable();
        let schema = self.metadata.current_schema().clone();
        let spec = self.metadata.default_partition_spec();
        let splitter = if spec.is_unpartitioned() {
            None
        } else {
            Some(Arc::new(RecordBatchPartitionSplitter::try_new_with_computed_values(schema.clone(), spec.clone())?))
        };
        // The sort fields as Arrow columns (the table's fields are in the schema's order).
        let fields = schema.as_struct().fields();
        let sort = self
            .metadata
            .default_sort_order()
            .fields
            .iter()
            .filter_map(|f| {
                let i = fields.iter().position(|x| x.id == f.source_id)?;
                Some((
                    i,
                    SortOptions { descending: f.direction == SortDirection::Descending, nulls_first: f.null_order == NullOrder::First },
                ))
            })
            .collect();
        Ok(Files {
            io: io.clone(),
            schema,
            location: DefaultLocationGenerator::new(&self.metadata)?,
            key_ids,
            splitter,
            sort: Arc::new(sort),
        })
    }

    /// Commits files already written: writes the manifests and the next metadata file;
    /// returns the new metadata and its location (the catalog pointer is not moved
    /// here). Equality deletes carry this commit's sequence number, so they remove the
    /// rows of earlier commits only, never the rows written with them. `truncate`:
    /// earlier files are left out.
    pub async fn stage_files(
        &self,
        io: &FileIO,
        commit: &str,
        data_files: Vec<DataFile>,
        delete_files: Vec<DataFile>,
        truncate: bool,
        properties: HashMap<String, String>,
    ) -> IcebergResult<(TableMetadata, String)> {
        let commit = commit.to_string();
        let snapshot_id = self.new_snapshot_id();
        let seq = self.metadata.next_sequence_number();
        let mut manifests = Vec::new();
        if !data_files.is_empty() {
            manifests.push(self.write_manifest(io, &commit, 0, snapshot_id, data_files, seq, false).await?);
        }
        if !delete_files.is_empty() {
            manifests.push(self.write_manifest(io, &commit, 1, snapshot_id, delete_files, seq, true).await?);
        }
        if !truncate {
            manifests.extend(self.manifests(io).await?);
        }
        let operation =
            if truncate || properties.get("sluice.deletes").is_some_and(|d| d != "0") { Operation::Overwrite } else { Operation::Append };
        self.publish(io, &commit, snapshot_id, manifests, operation, properties).await
    }

    /// The current snapshot's manifests.
    pub async fn manifests(&self, io: &FileIO) -> IcebergResult<Vec<ManifestFile>> {
        let Some(current) = self.metadata.current_snapshot() else { return Ok(Vec::new()) };
        let bytes = io.new_input(current.manifest_list())?.read().await?;
        Ok(ManifestList::parse_with_version(&bytes, FormatVersion::V2)?.consume_entries().into_iter().collect())
    }

    pub fn new_snapshot_id(&self) -> i64 {
        loop {
            let id = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
            if id > 0 && self.metadata.snapshots().all(|s| s.snapshot_id() != id) {
                return id;
            }
        }
    }

    /// A manifest listing `files` as added by `snapshot_id`, with data sequence number
    /// `data_seq` (a rewrite keeps the sequence number of the rows it read).
    #[allow(clippy::too_many_arguments)]
    pub async fn write_manifest(
        &self,
        io: &FileIO,
        commit: &str,
        n: usize,
        snapshot_id: i64,
        files: Vec<DataFile>,
        data_seq: i64,
        deletes: bool,
    ) -> IcebergResult<ManifestFile> {
        let meta = &self.metadata;
        let path = format!("{}/metadata/{commit}-m{n}.avro", meta.location());
        // Deletes are written unpartitioned (spec 0, which every table has): they
        // apply to the data files of every partition.
        let spec =
            if deletes { meta.partition_spec_by_id(0).unwrap_or(meta.default_partition_spec()) } else { meta.default_partition_spec() };
        let builder =
            ManifestWriterBuilder::new(io.new_output(path)?, Some(snapshot_id), meta.current_schema().clone(), spec.as_ref().clone());
        let mut w = if deletes { builder.build_v2_deletes() } else { builder.build_v2_data() };
        for f in files {
            w.add_file(f, data_seq)?;
        }
        w.write_manifest_file().await
    }

    /// Writes the manifest list and the next metadata file with a new snapshot made of
    /// `manifests`; returns the metadata and its location.
    pub async fn publish(
        &self,
        io: &FileIO,
        commit: &str,
        snapshot_id: i64,
        manifests: Vec<ManifestFile>,
        operation: Operation,
        properties: HashMap<String, String>,
    ) -> IcebergResult<(TableMetadata, String)> {
        let meta = &self.metadata;
        let seq = meta.next_sequence_number();
        let parent = meta.current_snapshot();
        let list_path = format!("{}/metadata/snap-{snapshot_id}-0-{commit}.avro", meta.location());
        let mut list =
            ManifestListWriter::v2(io.new_output(&list_path)?.writer().await?, snapshot_id, parent.map(|p| p.snapshot_id()), seq);
        list.add_manifests(manifests.into_iter())?;
        list.close().await?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let snapshot = Snapshot::builder()
            .with_manifest_list(list_path)
            .with_snapshot_id(snapshot_id)
            .with_parent_snapshot_id(parent.map(|p| p.snapshot_id()))
            .with_sequence_number(seq)
            .with_summary(Summary { operation, additional_properties: properties })
            .with_schema_id(meta.current_schema_id())
            .with_timestamp_ms(now_ms)
            .build();
        let next = TableMetadataBuilder::new_from_metadata(meta.clone(), Some(self.metadata_location.clone()))
            .set_branch_snapshot(snapshot, MAIN_BRANCH)?
            .build()?
            .metadata;
        let location = self.next_location(seq, commit);
        if self.writes_metadata {
            write_metadata(io, &next, &location).await?;
        }
        Ok((next, location))
    }

    pub fn next_location(&self, seq: i64, commit: &str) -> String {
        format!("{}/metadata/{seq:05}-{commit}.metadata.json", self.metadata.location())
    }
}

/// Writes a table's Parquet files under its `data/`.
#[derive(Clone)]
pub(crate) struct Files {
    io: FileIO,
    schema: Arc<Schema>,
    location: DefaultLocationGenerator,
    /// The equality-delete columns: the table's identifier fields.
    key_ids: Vec<i32>,
    /// Splits rows by partition (a partitioned table).
    splitter: Option<Arc<RecordBatchPartitionSplitter>>,
    /// The sort order as Arrow columns: rows are sorted within each data file.
    sort: Arc<Vec<(usize, SortOptions)>>,
}

type DataWriter = iceberg::writer::base_writer::data_file_writer::DataFileWriter<
    ParquetWriterBuilder,
    DefaultLocationGenerator,
    DefaultFileNameGenerator,
>;

/// Rows a sorted table's writer sorts at a time: each run becomes files of its own, so
/// every file is sorted, with memory bounded by one run.
const SORT_RUN_ROWS: usize = 1 << 20;

/// Data files being written: one writer per partition (one in all for an unpartitioned
/// table); for a sorted table, rows are buffered and sorted by runs.
pub(crate) struct DataFiles {
    files: Files,
    prefix: String,
    writers: HashMap<iceberg::spec::Struct, DataWriter>,
    unpartitioned: Option<DataWriter>,
    run: Vec<RecordBatch>,
    run_rows: usize,
    /// Runs written: each run's files get names of their own.
    runs: usize,
    done: Vec<DataFile>,
}

impl DataFiles {
    pub async fn write(&mut self, batch: RecordBatch) -> IcebergResult<()> {
        if self.files.sort.is_empty() {
            return self.write_now(batch).await;
        }
        self.run_rows += batch.num_rows();
        self.run.push(batch);
        if self.run_rows >= SORT_RUN_ROWS {
            self.end_run().await?;
        }
        Ok(())
    }

    /// Sorts the buffered run and writes it into files of its own.
    async fn end_run(&mut self) -> IcebergResult<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let run = std::mem::take(&mut self.run);
        self.run_rows = 0;
        let arrow = |e: arrow_schema::ArrowError| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string());
        let batch = concat_batches(&run[0].schema(), &run).map_err(arrow)?;
        let batch = self.files.sorted(batch)?;
        self.write_now(batch).await?;
        self.close_writers().await?;
        self.runs += 1;
        Ok(())
    }

    async fn write_now(&mut self, batch: RecordBatch) -> IcebergResult<()> {
        let Some(splitter) = self.files.splitter.clone() else {
            if self.unpartitioned.is_none() {
                self.unpartitioned = Some(self.builder().build(None).await?);
            }
            return self.unpartitioned.as_mut().expect("built").write(batch).await;
        };
        for (key, part) in splitter.split(&batch)? {
            if !self.writers.contains_key(key.data()) {
                let w = self.builder().build(Some(key.clone())).await?;
                self.writers.insert(key.data().clone(), w);
            }
            self.writers.get_mut(key.data()).expect("inserted").write(part).await?;
        }
        Ok(())
    }

    fn builder(&self) -> DataFileWriterBuilder<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator> {
        // Each writer numbers its files from 0: a run's files need a prefix of their own.
        let prefix = if self.runs == 0 { self.prefix.clone() } else { format!("{}-{}", self.prefix, self.runs) };
        DataFileWriterBuilder::new(self.files.rolling(prefix, self.files.schema.clone()))
    }

    async fn close_writers(&mut self) -> IcebergResult<()> {
        for mut w in self.unpartitioned.take().into_iter().chain(std::mem::take(&mut self.writers).into_values()) {
            self.done.extend(w.close().await?);
        }
        Ok(())
    }

    pub async fn close(mut self) -> IcebergResult<Vec<DataFile>> {
        self.end_run().await?;
        self.close_writers().await?;
        Ok(self.done)
    }
}

impl Files {
    /// Files of `schema`, named `<prefix>-<n>`, rolled over at the crate's target size.
    pub fn rolling(
        &self,
        prefix: String,
        schema: Arc<Schema>,
    ) -> RollingFileWriterBuilder<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator> {
        RollingFileWriterBuilder::new_with_default_file_size(
            ParquetWriterBuilder::new(WriterProperties::default(), schema),
            self.io.clone(),
            self.location.clone(),
            DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet),
        )
    }

    /// Data files named `<prefix>-<n>` (under their partition's directory).
    pub fn data(&self, prefix: String) -> DataFiles {
        DataFiles {
            files: self.clone(),
            prefix,
            writers: HashMap::new(),
            unpartitioned: None,
            run: Vec::new(),
            run_rows: 0,
            runs: 0,
            done: Vec::new(),
        }
    }

    /// The batch in the table's sort order (as is for an unsorted table).
    fn sorted(&self, batch: RecordBatch) -> IcebergResult<RecordBatch> {
        if self.sort.is_empty() || batch.num_rows() < 2 {
            return Ok(batch);
        }
        let columns: Vec<SortColumn> =
            self.sort.iter().map(|(i, options)| SortColumn { values: batch.column(*i).clone(), options: Some(*options) }).collect();
        let arrow = |e: arrow_schema::ArrowError| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string());
        let indices = lexsort_to_indices(&columns, None).map_err(arrow)?;
        take_record_batch(&batch, &indices).map_err(arrow)
    }

    /// Writes `data` and `deletes` (rows of the table's shape holding only the keys).
    pub async fn write(
        &self,
        commit: &str,
        data: Vec<RecordBatch>,
        deletes: Option<RecordBatch>,
    ) -> IcebergResult<(Vec<DataFile>, Vec<DataFile>)> {
        let mut data_files = Vec::new();
        if !data.is_empty() {
            let mut w = self.data(format!("{commit}-data"));
            for batch in data {
                w.write(batch).await?;
            }
            data_files = w.close().await?;
        }
        let mut delete_files = Vec::new();
        if let Some(batch) = deletes {
            let config = EqualityDeleteWriterConfig::new(self.key_ids.clone(), self.schema.clone())?;
            // The delete files hold the key columns only.
            let delete_schema = Arc::new(iceberg::arrow::arrow_schema_to_schema(config.projected_arrow_schema_ref())?);
            let mut w =
                EqualityDeleteFileWriterBuilder::new(self.rolling(format!("{commit}-deletes"), delete_schema), config).build(None).await?;
            w.write(batch).await?;
            delete_files = w.close().await?;
        }
        Ok((data_files, delete_files))
    }
}

/// Writes a metadata file (plain JSON, as every engine reads it).
pub(crate) async fn write_metadata(io: &FileIO, metadata: &TableMetadata, location: &str) -> IcebergResult<()> {
    let json = serde_json::to_vec(metadata).map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string()))?;
    io.new_output(location)?.write(json.into()).await
}

#[cfg(test)]
mod tests {
    use sluice_core::{ColumnSchema, PgType, ReplicaIdentity, TableName};

    use super::*;

    fn shape(cols: &[(&str, PgType, &str, bool)]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            name: TableName::new("public", "t"),
            relid: 1,
            columns: cols
                .iter()
                .map(|(n, t, tn, key)| ColumnSchema {
                    name: n.to_string(),
                    type_oid: 0,
                    type_name: tn.to_string(),
                    pg_type: t.clone(),
                    nullable: !key,
                    is_key: *key,
                    enum_labels: vec![],
                    storage: Default::default(),
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
        })
    }

    fn table(source: &TableSchema, mode: Mode) -> Table {
        let metadata = Table::new_metadata(schema_for(source, mode).unwrap(), "file:///w/t", None, None).unwrap();
        Table::open("public", "t", metadata, "file:///w/t/metadata/0.json".into(), mode).unwrap()
    }

    fn field_types(t: &Table) -> Vec<String> {
        t.metadata.current_schema().as_struct().fields().iter().map(|f| format!("{}:{}:{}", f.id, f.name, f.field_type)).collect()
    }

    #[test]
    fn added_columns_get_new_ids_and_types_only_widen() {
        let v1 =
            shape(&[("id", PgType::Int8, "bigint", true), ("n", PgType::Int4, "integer", false), ("gone", PgType::Text, "text", false)]);
        let mut t = table(&v1, Mode::Upsert);
        t.map(&v1, Lsn(10), Mode::Upsert, false).unwrap();
        // n widened, gone dropped, extra added: the dropped field stays (null from now
        // on), the new one gets the next id, rows are laid out in the table's order.
        let v2 =
            shape(&[("id", PgType::Int8, "bigint", true), ("extra", PgType::Text, "text", false), ("n", PgType::Int8, "bigint", false)]);
        t.map(&v2, Lsn(20), Mode::Upsert, false).unwrap();
        assert_eq!(field_types(&t), ["1:id:long", "2:n:long", "3:gone:string", "4:extra:string"]);
        let row = vec![Datum::Text("1".into()), Datum::Text("x".into()), Datum::Text("5000000000".into())];
        assert_eq!(t.fields_of(&row), [Datum::Text("1".into()), Datum::Text("5000000000".into()), Datum::Null, Datum::Text("x".into())]);
        // A change from before the widening, sent again after a restart, still fits.
        t.map(&v1, Lsn(15), Mode::Upsert, false).unwrap();
        // A narrowing after it (a new Relation message, so a new shape) halts, unless
        // accepted; a change of kind always halts.
        let narrowed = shape(&[("id", PgType::Int8, "bigint", true), ("n", PgType::Int4, "integer", false)]);
        let e = t.map(&narrowed, Lsn(25), Mode::Upsert, false).unwrap_err();
        assert!(e.0.starts_with("column n of public.t was narrowed from bigint to integer"), "{}", e.0);
        t.map(&narrowed, Lsn(25), Mode::Upsert, true).unwrap();
        let v3 = shape(&[("id", PgType::Int8, "bigint", true), ("n", PgType::Text, "text", false)]);
        let e = t.map(&v3, Lsn(30), Mode::Upsert, true).unwrap_err();
        assert!(e.0.contains("was changed from integer to text"), "{}", e.0);
        let v4 = shape(&[("n", PgType::Int8, "bigint", false)]);
        let e = t.map(&v4, Lsn(30), Mode::Upsert, true).unwrap_err();
        assert!(e.0.starts_with("key column id of public.t is gone"), "{}", e.0);
    }

    #[test]
    fn a_changelog_keeps_its_own_columns_where_they_are() {
        let v1 = shape(&[("id", PgType::Int8, "bigint", true)]);
        let mut t = table(&v1, Mode::Changelog);
        let v2 = shape(&[("id", PgType::Int8, "bigint", true), ("note", PgType::Text, "text", false)]);
        t.map(&v2, Lsn(1), Mode::Changelog, false).unwrap();
        assert_eq!(
            field_types(&t),
            ["1:id:long", "2:_op:string", "3:_lsn:long", "4:_commit_ts:timestamptz", "5:_seq:long", "6:note:string"]
        );
        assert_eq!(t.slots, [Slot::Column, Slot::Changelog(0), Slot::Changelog(1), Slot::Changelog(2), Slot::Changelog(3), Slot::Column]);
        let upsert = Table::open("public", "t", t.metadata.clone(), "x".into(), Mode::Upsert);
        assert!(upsert.is_err(), "a changelog table is not reopened as an upsert table");
    }
}
