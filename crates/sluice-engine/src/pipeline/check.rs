//! Phase 1, check: every check that can fail on bad input, before anything is
//! written anywhere (the source, its tables and slot, enrichers, transforms, the sink).

use super::*;

/// The part of a pipeline's config a failed check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckPart {
    /// The source database, its settings, the slot.
    Source,
    Tables,
    Enrich,
    Transforms,
    /// The sink, its state database, the broker.
    Sink,
}

/// What the checks found; nothing has been written when this is returned.
pub struct Checked {
    pub tables: Vec<Arc<TableSchema>>,
    /// Each table's transforms (its output shape), when the pipeline has any.
    pub transforms: Vec<Option<Arc<TableTransform>>>,
    pub slot_exists: bool,
    /// The slot exists but the source invalidated it (`wal_status = lost`).
    pub slot_lost: bool,
    pub publication_missing: Vec<TableName>,
    pub publication_exists: bool,
    /// The enrichers, checked against the tables and their reference databases.
    pub(crate) enrichment: Option<Arc<Enrichment>>,
    /// Reference tables streamed only to keep lookups fresh (never delivered).
    pub reference: Vec<Arc<TableSchema>>,
}

impl Checked {
    /// Each table's shape after enrichment (before the transforms).
    pub(super) fn enriched(&self) -> Result<Vec<Arc<TableSchema>>> {
        self.tables
            .iter()
            .map(|t| {
                Ok(match &self.enrichment {
                    Some(e) => e.plan(t)?.output().clone(),
                    None => t.clone(),
                })
            })
            .collect()
    }

    /// Each table's shape in the sink.
    pub(super) fn outputs(&self) -> Result<Vec<Arc<TableSchema>>> {
        Ok(self.enriched()?.into_iter().zip(&self.transforms).map(|(t, x)| x.as_ref().map_or(t, |x| x.output.clone())).collect())
    }
}

impl Pipeline {
    /// Every check that can fail on bad input, before anything is written anywhere.
    pub async fn check(&self) -> Result<Checked> {
        self.check_parts().await.map_err(|(_, e)| e)
    }

    /// [`check`](Self::check), also saying which part of the config a failure is
    /// about (the API names it as the refused field).
    pub async fn check_parts(&self) -> Result<Checked, (CheckPart, anyhow::Error)> {
        use CheckPart::*;
        fn at<E: Into<anyhow::Error>>(part: CheckPart) -> impl FnOnce(E) -> (CheckPart, anyhow::Error) {
            move |e| (part, e.into())
        }
        let src = sluice_postgres::connect(&self.source, "source").await.map_err(at(Source))?;
        let level = sluice_postgres::wal_level(&src).await.map_err(at(Source))?;
        if level != "logical" && self.require_logical_wal {
            return Err(at(Source)(PgError::permanent(format!(
                "source {} has wal_level={level}, but logical replication needs wal_level=logical: run \
                 ALTER SYSTEM SET wal_level = logical; then restart Postgres",
                self.source.describe()
            ))));
        }
        let publication = self.cfg.publication_name();
        let published = sluice_postgres::publication_tables(&src, &publication).await.map_err(at(Source))?;
        let names = if self.cfg.tables().is_empty() {
            match &published {
                Some(t) if !t.is_empty() => t.clone(),
                Some(_) => {
                    return Err(at(Tables)(PgError::permanent(format!(
                        "publication {publication} publishes no tables: add tables to it, or list them in source.tables"
                    ))));
                }
                None => {
                    return Err(at(Tables)(PgError::permanent(format!(
                        "publication {publication} does not exist in source {}: create it, or list the tables in source.tables",
                        self.source.describe()
                    ))));
                }
            }
        } else {
            let mut names = self.cfg.tables();
            // Sluice's own publication is the table list: a table someone added to it
            // (DDL capture snapshotted it through a resync) stays replicated.
            if self.cfg.source.publication.is_none() {
                let reference = crate::enrich::reference_tables(&self.cfg.enrich);
                for t in published.iter().flatten() {
                    if !names.contains(t) && !reference.contains(t) {
                        names.push(t.clone());
                    }
                }
            }
            names
        };
        let mut tables = Vec::new();
        let filters = self.cfg.table_filters();
        for name in &names {
            let mut table = sluice_postgres::load_table(&src, name, &self.source.describe()).await.map_err(at(Tables))?;
            if let Some(f) = filters.get(name) {
                // The stream sends the listed columns only: the sink's shape is theirs.
                if let Some(cols) = &f.columns {
                    if let Some(c) = cols.iter().find(|c| !table.columns.iter().any(|t| &t.name == *c)) {
                        return Err(at(Tables)(PgError::permanent(format!(
                            "source.tables: {name}: column {c:?} in `columns` does not exist: check the spelling"
                        ))));
                    }
                    if let Some(k) = table.columns.iter().find(|k| k.is_key && !cols.contains(&k.name)) {
                        return Err(at(Tables)(PgError::permanent(format!(
                            "source.tables: {name}: `columns` must include the key column {:?} (the sink upserts by it)",
                            k.name
                        ))));
                    }
                    table.columns.retain(|c| cols.contains(&c.name));
                }
                sluice_postgres::replication::check_filter(&src, name, f)
                    .await
                    .map_err(|m| at(Tables)(PgError::permanent(format!("source.tables: {m}"))))?;
            }
            tables.push(Arc::new(table));
        }
        let enrichment = Enrichment::new(&self.cfg.pipeline, &self.cfg.enrich, &self.source, &self.state, &names, self.metrics.clone())
            .await
            .map_err(at(Enrich))?;
        let mut reference = Vec::new();
        for name in enrichment.as_ref().map_or(&[][..], |e| e.reference_tables()) {
            if !names.contains(name) {
                reference.push(Arc::new(sluice_postgres::load_table(&src, name, &self.source.describe()).await.map_err(at(Enrich))?));
            }
        }
        let publication_missing = names
            .iter()
            .chain(reference.iter().map(|t| &t.name))
            .filter(|n| published.as_ref().is_none_or(|p| !p.contains(n)))
            .cloned()
            .collect();
        if published.is_some() {
            let relids: Vec<i64> = tables.iter().map(|t| i64::from(t.relid)).collect();
            let row = src
                .query_one(
                    "SELECT p.pubviaroot, EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::int8 = ANY($2) AND c.relkind = 'p')
                     FROM pg_publication p WHERE p.pubname = $1",
                    &[&publication, &relids],
                )
                .await
                .map_err(|e| at(Source)(PgError::from_pg("reading pg_publication", e)))?;
            let (via_root, partitioned): (bool, bool) = (row.get(0), row.get(1));
            if partitioned && !via_root {
                return Err(at(Tables)(PgError::permanent(format!(
                    "publication {publication} publishes partitioned tables under their partitions' names: run ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(&publication)
                ))));
            }
        }
        let slot = self.cfg.slot_name();
        // After a crash or a dropped connection, the server keeps the old walsender (and
        // the slot) until it notices its client is gone: give it a moment before calling
        // the slot taken.
        let deadline = Instant::now() + SLOT_RELEASE_WAIT;
        let mut waited = false;
        let slot_info = loop {
            let info = sluice_postgres::slot_info(&src, &slot).await.map_err(at(Source))?;
            match info.as_ref().and_then(|i| i.active_pid) {
                Some(_) if self.slot_may_be_in_use => break info,
                Some(pid) if Instant::now() < deadline && !self.stopping() => {
                    if !waited {
                        tracing::info!(slot = %slot, pid, wait = ?SLOT_RELEASE_WAIT, "replication slot is held by another connection; waiting for it to be released");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => break info,
            }
        };
        if let Some(info) = &slot_info {
            let mut info = info.clone();
            if self.slot_may_be_in_use {
                info.active_pid = None;
            }
            sluice_postgres::verify_slot(&slot, &info, &self.source.database).map_err(at(Source))?;
        }
        // The sink (and state database) must be reachable before anything is created.
        let what = if self.cfg.sink.get().state_is_sink() { "sink" } else { "state database" };
        drop(sluice_postgres::connect(&self.state, what).await.map_err(at(Sink))?);
        self.cfg.sink.get().check(&self.sink_context(&tables)).await.map_err(at(Sink))?;
        let mut transforms = Vec::with_capacity(tables.len());
        for t in &tables {
            let shaped = match &enrichment {
                Some(e) => e.plan(t).map_err(at(Enrich))?.output().clone(),
                None => t.clone(),
            };
            let compiled = if self.chain.is_empty() { None } else { Some(Arc::new(self.chain.compile(&shaped).map_err(at(Transforms))?)) };
            transforms.push(compiled);
        }
        Ok(Checked {
            tables,
            transforms,
            slot_exists: slot_info.is_some(),
            slot_lost: slot_info.as_ref().is_some_and(sluice_postgres::SlotInfo::lost),
            publication_missing,
            publication_exists: published.is_some(),
            enrichment,
            reference,
        })
    }
}
