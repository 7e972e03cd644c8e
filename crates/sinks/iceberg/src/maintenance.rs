//! Table maintenance, run by the sink on a schedule and on demand (`sluice iceberg
//! compact|expire`):
//! - compaction rewrites the rows live at a snapshot (equality deletes applied) into new
//!   data files, so readers that cannot apply deletes read the table whole, and scans
//!   open a few files instead of two per commit;
//! - expiry drops snapshots past their age and the files only they reference;
//! - orphan removal deletes files no snapshot references (left by commits that died
//!   before their pointer moved, metadata files past the log).
//!
//! The slow part (reading and writing the rows) runs beside streaming; each result is
//! committed under the catalog row lock the sink's commits take, on top of whatever the
//! sink committed meanwhile, so streaming waits for one pointer swap at most.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use iceberg::io::FileIO;
use iceberg::spec::{DataFile, ManifestContentType, ManifestFile, ManifestList, Operation, TableMetadata, TableMetadataBuilder};
use iceberg::{NamespaceIdent, TableIdent};
use serde::Serialize;
use sluice_core::TableName;
use sluice_postgres::PgError;
use tokio_postgres::Client;

use crate::catalog::Catalog;
use crate::config::{IcebergSinkConfig, Mode};
use crate::error::IcebergError;
use crate::rest::Commit;
use crate::storage::{Warehouse, normalized};
use crate::table::{IcebergResult, Table};

/// The summary property that marks a snapshot as maintenance (no source change in it).
pub(crate) const MAINTENANCE: &str = "sluice.maintenance";

/// What to do to each table.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub compact: bool,
    /// Expire snapshots older than this (the current one, and the newest `keep`, stay).
    pub expire_older_than: Option<Duration>,
    pub keep: usize,
    /// Delete unreferenced files older than this (younger ones may belong to a commit
    /// in flight).
    pub orphans_older_than: Option<Duration>,
}

/// What maintenance did to one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MaintenanceReport {
    pub table: String,
    /// Live rows rewritten by compaction (0: nothing to compact).
    pub rows: u64,
    pub data_files_before: usize,
    pub delete_files_before: usize,
    pub data_files_after: usize,
    pub snapshots_expired: usize,
    pub files_removed: usize,
    /// A truncate committed while compacting made the rewrite moot; it was dropped.
    pub compaction_dropped: bool,
    pub ms: u64,
}

/// The rows live at a snapshot, written as new data files, waiting to be committed.
pub(crate) struct Rewrite {
    base_seq: i64,
    base_snapshot: i64,
    base_manifests: HashSet<String>,
    files: Vec<DataFile>,
    rows: u64,
    data_files: usize,
    delete_files: usize,
}

async fn count_files(io: &FileIO, manifests: &[ManifestFile]) -> IcebergResult<(usize, usize)> {
    let (mut data, mut deletes) = (0, 0);
    for m in manifests {
        let n = m.load_manifest(io).await?.entries().len();
        match m.content {
            ManifestContentType::Data => data += n,
            ManifestContentType::Deletes => deletes += n,
        }
    }
    Ok((data, deletes))
}

impl Table {
    /// Reads the rows live at the current snapshot (deletes applied by the crate's
    /// reader) and writes them as new data files. `None`: nothing to gain (no delete
    /// file, one data file at most).
    pub(crate) async fn rewrite(&self, io: &FileIO) -> IcebergResult<Option<Rewrite>> {
        let Some(base) = self.metadata.current_snapshot() else { return Ok(None) };
        let manifests = self.manifests(io).await?;
        let (data_files, delete_files) = count_files(io, &manifests).await?;
        if delete_files == 0 && data_files <= 1 {
            return Ok(None);
        }
        let reader = iceberg::table::Table::builder()
            .file_io(io.clone())
            .metadata(self.metadata.clone())
            .metadata_location(self.metadata_location.clone())
            .identifier(TableIdent::new(NamespaceIdent::new(self.namespace.clone()), self.name.clone()))
            .readonly(true)
            .runtime(iceberg::Runtime::try_current()?)
            .build()?;
        let mut batches = reader.scan().snapshot_id(base.snapshot_id()).build()?.to_arrow().await?;
        let commit = uuid::Uuid::new_v4().to_string();
        let files = self.files(io)?;
        let mut w = files.data(format!("{commit}-compacted"));
        let mut rows = 0;
        while let Some(batch) = batches.try_next().await? {
            rows += batch.num_rows() as u64;
            // The reader's batches have the table's columns; the writer wants its exact
            // schema (field ids included).
            let batch = arrow_array::RecordBatch::try_new(self.arrow.clone(), batch.columns().to_vec())
                .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()))?;
            w.write(batch).await?;
        }
        let files = w.close().await?;
        Ok(Some(Rewrite {
            base_seq: base.sequence_number(),
            base_snapshot: base.snapshot_id(),
            base_manifests: manifests.into_iter().map(|m| m.manifest_path).collect(),
            files,
            rows,
            data_files,
            delete_files,
        }))
    }

    /// The next metadata with `rw` committed on top of the current snapshot: the
    /// manifests it read are replaced by one manifest of its files, whose rows keep the
    /// sequence number they were read at, so the deletes committed since still apply to
    /// them. `None`: a truncate since left the rewritten files out already.
    pub(crate) async fn stage_rewrite(&self, io: &FileIO, rw: &Rewrite, pipeline: &str) -> IcebergResult<Option<(TableMetadata, String)>> {
        let current = self.manifests(io).await?;
        if !rw.base_manifests.iter().all(|p| current.iter().any(|m| &m.manifest_path == p)) {
            return Ok(None);
        }
        let commit = uuid::Uuid::new_v4().to_string();
        let snapshot_id = self.new_snapshot_id();
        let mut manifests = Vec::new();
        if !rw.files.is_empty() {
            manifests.push(self.write_manifest(io, &commit, 0, snapshot_id, rw.files.clone(), rw.base_seq, false).await?);
        }
        manifests.extend(current.into_iter().filter(|m| !rw.base_manifests.contains(&m.manifest_path)));
        let props = HashMap::from([
            ("sluice.pipeline".to_string(), pipeline.to_string()),
            (MAINTENANCE.to_string(), "compaction".to_string()),
            ("sluice.rewritten-snapshot".to_string(), rw.base_snapshot.to_string()),
        ]);
        self.publish(io, &commit, snapshot_id, manifests, Operation::Replace, props).await.map(Some)
    }

    /// The metadata without the snapshots older than `cutoff_ms` (never the current
    /// one, nor the newest `keep`), and the snapshots removed.
    pub(crate) fn expire(&self, cutoff_ms: i64, keep: usize) -> IcebergResult<Option<(TableMetadata, Vec<String>)>> {
        let current = self.metadata.current_snapshot().map(|s| s.snapshot_id());
        let mut snaps: Vec<_> = self.metadata.snapshots().collect();
        snaps.sort_by_key(|s| std::cmp::Reverse(s.sequence_number()));
        let gone: Vec<_> =
            snaps.iter().skip(keep.max(1)).filter(|s| s.timestamp_ms() < cutoff_ms && Some(s.snapshot_id()) != current).collect();
        if gone.is_empty() {
            return Ok(None);
        }
        let ids: Vec<i64> = gone.iter().map(|s| s.snapshot_id()).collect();
        let lists = gone.iter().map(|s| s.manifest_list().to_string()).collect();
        let next = TableMetadataBuilder::new_from_metadata(self.metadata.clone(), Some(self.metadata_location.clone()))
            .remove_snapshots(&ids)
            .build()?
            .metadata;
        Ok(Some((next, lists)))
    }

    /// Every file the metadata references: its snapshots' manifest lists, manifests and
    /// data and delete files, and the metadata files in its log.
    async fn referenced(&self, io: &FileIO) -> IcebergResult<HashSet<String>> {
        let mut out: HashSet<String> = self.metadata.metadata_log().iter().map(|m| m.metadata_file.clone()).collect();
        out.insert(self.metadata_location.clone());
        let mut seen = HashSet::new();
        for s in self.metadata.snapshots() {
            out.insert(s.manifest_list().to_string());
            let bytes = io.new_input(s.manifest_list())?.read().await?;
            let list: Vec<ManifestFile> =
                ManifestList::parse_with_version(&bytes, iceberg::spec::FormatVersion::V2)?.consume_entries().into_iter().collect();
            for m in list {
                if seen.insert(m.manifest_path.clone()) {
                    for e in m.load_manifest(io).await?.entries() {
                        out.insert(e.file_path().to_string());
                    }
                    out.insert(m.manifest_path);
                }
            }
        }
        Ok(out)
    }
}

/// Runs `what` on the Iceberg tables of `tables` (source names), one after another.
pub async fn maintain(
    cfg: &IcebergSinkConfig,
    pipeline: &str,
    tables: &[TableName],
    what: &Maintenance,
) -> Result<Vec<MaintenanceReport>, IcebergError> {
    let client = sluice_postgres::connect(&cfg.state_connection(), "Iceberg sink's state database").await?;
    let catalog = cfg.catalog().await?;
    let warehouse = cfg.warehouse().map_err(|e| IcebergError::permanent(e.to_string()))?;
    let mut out = Vec::new();
    for t in tables {
        let (ns, name) = cfg.target(t);
        out.push(maintain_table(&client, &catalog, &warehouse, &ns, &name, cfg.mode, pipeline, what).await?);
    }
    Ok(out)
}

/// Runs `what` on one table, committing under the catalog row lock.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn maintain_table(
    client: &Client,
    catalog: &Catalog,
    warehouse: &Warehouse,
    namespace: &str,
    name: &str,
    mode: Mode,
    pipeline: &str,
    what: &Maintenance,
) -> Result<MaintenanceReport, IcebergError> {
    let started = Instant::now();
    let io = &warehouse.io;
    let files = |what: &str| {
        let what = format!("{what} Iceberg table {namespace}.{name}");
        move |e| IcebergError::files(&what, e)
    };
    let mut report = MaintenanceReport { table: format!("{namespace}.{name}"), ..Default::default() };
    let mut table = load(client, catalog, io, namespace, name, mode).await?;
    if what.compact
        && let Some(rw) = table.rewrite(io).await.map_err(files("compacting"))?
    {
        report.rows = rw.rows;
        report.data_files_before = rw.data_files;
        report.delete_files_before = rw.delete_files;
        report.data_files_after = rw.files.len();
        let committed = in_lock(client, catalog, io, &mut table, mode, async |t: &Table| {
            t.stage_rewrite(io, &rw, pipeline).await.map_err(files("committing the compaction of"))
        })
        .await?;
        report.compaction_dropped = !committed;
    }
    if let Some(age) = what.expire_older_than {
        let cutoff = SystemTime::now().checked_sub(age).and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        let cutoff_ms = cutoff.map_or(0, |d| d.as_millis() as i64);
        let mut lists = Vec::new();
        let before = table.referenced(io).await.map_err(files("reading"))?;
        in_lock(client, catalog, io, &mut table, mode, async |t: &Table| {
            let Some((next, gone)) = t.expire(cutoff_ms, what.keep).map_err(files("expiring snapshots of"))? else { return Ok(None) };
            lists = gone;
            let location = t.next_location(next.last_sequence_number(), &uuid::Uuid::new_v4().to_string());
            if t.writes_metadata {
                crate::table::write_metadata(io, &next, &location).await.map_err(files("writing the metadata of"))?;
            }
            Ok(Some((next, location)))
        })
        .await?;
        report.snapshots_expired = lists.len();
        if !lists.is_empty() {
            // The referencing is recomputed after the commit: what the sink committed
            // meanwhile stays.
            let after = table.referenced(io).await.map_err(files("reading"))?;
            for path in before.difference(&after).filter(|p| !p.ends_with(".metadata.json")) {
                io.delete(path).await.map_err(files("removing an expired file of"))?;
                report.files_removed += 1;
            }
        }
    }
    if let Some(age) = what.orphans_older_than {
        let referenced: HashSet<String> =
            table.referenced(io).await.map_err(files("reading"))?.iter().map(|p| normalized(p).into_owned()).collect();
        let listed = warehouse
            .files(table.metadata.location())
            .await
            .map_err(|e| IcebergError::storage(&format!("listing the files of Iceberg table {namespace}.{name}"), e))?;
        for (path, file_age) in listed {
            if file_age >= age && !referenced.contains(&path) {
                io.delete(&path).await.map_err(files("removing an orphan file of"))?;
                report.files_removed += 1;
            }
        }
    }
    report.ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

async fn load(client: &Client, catalog: &Catalog, io: &FileIO, namespace: &str, name: &str, mode: Mode) -> Result<Table, IcebergError> {
    let missing = |catalog: &str| IcebergError::permanent(format!("Iceberg table {namespace}.{name} is not in catalog {catalog}"));
    match catalog {
        Catalog::Sql(sql) => {
            let location = sql.load(client, namespace, name).await?.ok_or_else(|| missing(&sql.name))?;
            open_at(io, namespace, name, location, mode).await
        }
        Catalog::Rest(rest) => {
            let (location, metadata) = rest.load(namespace, name).await?.ok_or_else(|| missing("(REST)"))?;
            open_rest(namespace, name, metadata, location, mode)
        }
    }
}

fn open_rest(namespace: &str, name: &str, metadata: TableMetadata, location: String, mode: Mode) -> Result<Table, IcebergError> {
    let mut t = Table::open(namespace, name, metadata, location, mode)
        .map_err(|e| IcebergError::files(&format!("opening Iceberg table {namespace}.{name}"), e))?;
    t.writes_metadata = false;
    Ok(t)
}

async fn open_at(io: &FileIO, namespace: &str, name: &str, location: String, mode: Mode) -> Result<Table, IcebergError> {
    let metadata = TableMetadata::read_from(io, &location)
        .await
        .map_err(|e| IcebergError::files(&format!("reading the metadata of Iceberg table {namespace}.{name}"), e))?;
    Table::open(namespace, name, metadata, location, mode)
        .map_err(|e| IcebergError::files(&format!("opening Iceberg table {namespace}.{name}"), e))
}

/// Builds the next metadata with `stage` on the table's current state and commits it:
/// under the SQL catalog's row lock, or through a REST catalog with the requirement that
/// the table did not move since it was loaded. False when `stage` had nothing to do, or
/// (REST) the table moved.
async fn in_lock(
    client: &Client,
    catalog: &Catalog,
    io: &FileIO,
    table: &mut Table,
    mode: Mode,
    stage: impl AsyncFnOnce(&Table) -> Result<Option<(TableMetadata, String)>, IcebergError>,
) -> Result<bool, IcebergError> {
    let catalog = match catalog {
        Catalog::Sql(sql) => sql,
        Catalog::Rest(rest) => {
            // The table's current state (the sink may have committed since it was
            // loaded), so only a commit between here and the POST races this one.
            let (ns, name) = (table.namespace.clone(), table.name.clone());
            let (location, metadata) =
                rest.load(&ns, &name).await?.ok_or_else(|| IcebergError::permanent(format!("Iceberg table {ns}.{name} is gone")))?;
            if location != table.metadata_location {
                *table = open_rest(&ns, &name, metadata, location, mode)?;
            }
            let Some((next, _)) = stage(table).await? else { return Ok(false) };
            return match rest.commit(&table.namespace, &table.name, &table.metadata, &next).await? {
                Commit::Done(location, metadata) => {
                    table.metadata = *metadata;
                    table.metadata_location = location;
                    Ok(true)
                }
                // The sink committed meanwhile: this run's work is dropped, and the
                // next run starts from the new state (the files written become orphans).
                Commit::Conflict => {
                    tracing::info!(table = %format!("{}.{}", table.namespace, table.name), "Iceberg maintenance raced a commit; dropped");
                    Ok(false)
                }
            };
        }
    };
    let pg = |what: &'static str| move |e| IcebergError::from(PgError::from_pg(what, e));
    client.batch_execute("BEGIN").await.map_err(pg("starting an Iceberg maintenance commit"))?;
    let r = async {
        let location = catalog.lock(client, &table.namespace, &table.name).await?;
        if location != table.metadata_location {
            *table = open_at(io, &table.namespace, &table.name, location, mode).await?;
        }
        let Some((next, location)) = stage(table).await? else { return Ok(false) };
        catalog.swap(client, &table.namespace, &table.name, &table.metadata_location, &location).await?;
        client.batch_execute("COMMIT").await.map_err(pg("committing an Iceberg maintenance commit"))?;
        table.metadata = next;
        table.metadata_location = location;
        Ok(true)
    }
    .await;
    if !matches!(r, Ok(true)) {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    r
}
