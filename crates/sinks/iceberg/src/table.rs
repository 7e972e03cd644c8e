//! One Iceberg table: its metadata, created from the source table's shape, and the
//! files of one commit (data files, equality deletes, manifests, the manifest list and
//! the next metadata file). Nothing here touches the catalog: the sink swaps the
//! pointers of every table of a commit, with the checkpoint, in one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef as ArrowSchemaRef;
use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, DataFileFormat, FormatVersion, MAIN_BRANCH, ManifestFile, ManifestList, ManifestListWriter, ManifestWriterBuilder,
    NestedField, Operation, PartitionSpec, Schema, Snapshot, SortOrder, Summary, TableMetadata, TableMetadataBuilder,
};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::base_writer::equality_delete_writer::{EqualityDeleteFileWriterBuilder, EqualityDeleteWriterConfig};
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::file::properties::WriterProperties;
use sluice_core::TableSchema;

use crate::config::Mode;
use crate::encoding::Kind;

/// The columns a changelog table adds after the source's, with their kinds.
pub(crate) const CHANGELOG_COLUMNS: [(&str, Kind); 4] =
    [("_op", Kind::String), ("_lsn", Kind::Long), ("_commit_ts", Kind::TimestampTz), ("_seq", Kind::Long)];

pub(crate) type IcebergResult<T> = Result<T, iceberg::Error>;

pub(crate) struct Table {
    pub namespace: String,
    pub name: String,
    pub metadata: TableMetadata,
    pub metadata_location: String,
    pub arrow: ArrowSchemaRef,
    /// Each column's kind, in the table's order (the source's columns, then a
    /// changelog's own).
    pub kinds: Vec<Kind>,
    /// The source columns that form the key (upsert mode), by position.
    pub keys: Vec<usize>,
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

impl Table {
    /// Metadata for a new, empty table at `location`.
    pub fn new_metadata(schema: Schema, location: &str) -> IcebergResult<TableMetadata> {
        let properties = HashMap::from([("write.format.default".to_string(), "parquet".to_string())]);
        Ok(TableMetadataBuilder::new(
            schema,
            PartitionSpec::unpartition_spec(),
            SortOrder::unsorted_order(),
            location.to_string(),
            FormatVersion::V2,
            properties,
        )?
        .build()?
        .metadata)
    }

    pub fn open(
        namespace: &str,
        name: &str,
        metadata: TableMetadata,
        metadata_location: String,
        source: &TableSchema,
        mode: Mode,
    ) -> IcebergResult<Self> {
        let schema = metadata.current_schema().clone();
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema)?);
        let mut kinds: Vec<Kind> = source.columns.iter().map(Kind::of).collect();
        if mode == Mode::Changelog {
            kinds.extend(CHANGELOG_COLUMNS.iter().map(|(_, k)| *k));
        }
        if arrow.fields().len() != kinds.len() {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                format!(
                    "Iceberg table {namespace}.{name} has {} columns, but the source table {} has {} (with the sink's own): \
                     the table was made for another shape or mode; drop it (teardown --purge) or name another namespace",
                    arrow.fields().len(),
                    source.name,
                    kinds.len()
                ),
            ));
        }
        let keys = if mode == Mode::Upsert {
            source.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect()
        } else {
            Vec::new()
        };
        Ok(Self { namespace: namespace.to_string(), name: name.to_string(), metadata, metadata_location, arrow, kinds, keys })
    }

    /// The equality-delete columns: the table's identifier fields.
    fn key_ids(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = self.metadata.current_schema().identifier_field_ids().collect();
        ids.sort_unstable();
        ids
    }

    /// Writes `data` and `deletes` (rows of the table's shape holding only the keys)
    /// as Parquet files under the table's `data/`.
    async fn write_files(
        &self,
        io: &FileIO,
        commit: &str,
        data: Option<RecordBatch>,
        deletes: Option<RecordBatch>,
    ) -> IcebergResult<(Vec<DataFile>, Vec<DataFile>)> {
        let schema = self.metadata.current_schema().clone();
        let location = DefaultLocationGenerator::new(&self.metadata)?;
        let rolling = |prefix: String, schema: Arc<Schema>| {
            RollingFileWriterBuilder::new_with_default_file_size(
                ParquetWriterBuilder::new(WriterProperties::default(), schema),
                io.clone(),
                location.clone(),
                DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet),
            )
        };
        let mut data_files = Vec::new();
        if let Some(batch) = data {
            let mut w = DataFileWriterBuilder::new(rolling(format!("{commit}-data"), schema.clone())).build(None).await?;
            w.write(batch).await?;
            data_files = w.close().await?;
        }
        let mut delete_files = Vec::new();
        if let Some(batch) = deletes {
            let config = EqualityDeleteWriterConfig::new(self.key_ids(), schema.clone())?;
            // The delete files hold the key columns only.
            let delete_schema = Arc::new(iceberg::arrow::arrow_schema_to_schema(config.projected_arrow_schema_ref())?);
            let mut w =
                EqualityDeleteFileWriterBuilder::new(rolling(format!("{commit}-deletes"), delete_schema), config).build(None).await?;
            w.write(batch).await?;
            delete_files = w.close().await?;
        }
        Ok((data_files, delete_files))
    }

    /// Writes one commit's files and the next metadata file; returns the new metadata
    /// and its location (the catalog pointer is not moved here). Equality deletes carry
    /// this commit's sequence number, so they remove the rows of earlier commits only,
    /// never the rows written with them. `truncate`: earlier files are left out.
    pub async fn stage(
        &self,
        io: &FileIO,
        data: Option<RecordBatch>,
        deletes: Option<RecordBatch>,
        truncate: bool,
        properties: HashMap<String, String>,
    ) -> IcebergResult<(TableMetadata, String)> {
        let commit = uuid::Uuid::new_v4().to_string();
        let (data_files, delete_files) = self.write_files(io, &commit, data, deletes).await?;
        let meta = &self.metadata;
        let snapshot_id = loop {
            let id = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
            if id > 0 && meta.snapshots().all(|s| s.snapshot_id() != id) {
                break id;
            }
        };
        let seq = meta.next_sequence_number();
        let schema = meta.current_schema().clone();
        let spec = meta.default_partition_spec().as_ref().clone();
        let manifest_path = |n: usize| format!("{}/metadata/{commit}-m{n}.avro", meta.location());
        let mut manifests: Vec<ManifestFile> = Vec::new();
        if !data_files.is_empty() {
            let mut w = ManifestWriterBuilder::new(io.new_output(manifest_path(0))?, Some(snapshot_id), schema.clone(), spec.clone())
                .build_v2_data();
            for f in data_files {
                w.add_file(f, seq)?;
            }
            manifests.push(w.write_manifest_file().await?);
        }
        if !delete_files.is_empty() {
            let mut w = ManifestWriterBuilder::new(io.new_output(manifest_path(1))?, Some(snapshot_id), schema.clone(), spec.clone())
                .build_v2_deletes();
            for f in delete_files {
                w.add_file(f, seq)?;
            }
            manifests.push(w.write_manifest_file().await?);
        }
        let parent = meta.current_snapshot();
        if !truncate && let Some(parent) = parent {
            let bytes = io.new_input(parent.manifest_list())?.read().await?;
            manifests.extend(ManifestList::parse_with_version(&bytes, FormatVersion::V2)?.consume_entries());
        }
        let list_path = format!("{}/metadata/snap-{snapshot_id}-0-{commit}.avro", meta.location());
        let mut list =
            ManifestListWriter::v2(io.new_output(&list_path)?.writer().await?, snapshot_id, parent.map(|p| p.snapshot_id()), seq);
        list.add_manifests(manifests.into_iter())?;
        list.close().await?;
        let operation =
            if truncate || properties.get("sluice.deletes").is_some_and(|d| d != "0") { Operation::Overwrite } else { Operation::Append };
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
        let location = format!("{}/metadata/{seq:05}-{commit}.metadata.json", meta.location());
        write_metadata(io, &next, &location).await?;
        Ok((next, location))
    }
}

/// Writes a metadata file (plain JSON, as every engine reads it).
pub(crate) async fn write_metadata(io: &FileIO, metadata: &TableMetadata, location: &str) -> IcebergResult<()> {
    let json = serde_json::to_vec(metadata).map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string()))?;
    io.new_output(location)?.write(json.into()).await
}
