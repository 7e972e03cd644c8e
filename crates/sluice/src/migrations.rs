//! Migration checks shared by `sluice migrations check` and the server's endpoint.

use sluice_ddl::{FileReport, Model, Verdict};

/// Why a check could not be made (exit code 2 on the CLI, 4xx/5xx over HTTP).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The input itself is bad: unparseable or empty SQL.
    #[error(transparent)]
    Input(#[from] sluice_ddl::DdlError),
    /// Context could not be had: the source or the registry.
    #[error("{0}")]
    Context(String),
}

/// Reads the catalog of `dsn` (read-only); with a pipeline, only its publication's
/// tables count as replicated.
pub async fn load_model(dsn: &str, pipeline: Option<&str>) -> Result<Model, CheckError> {
    let cfg = sluice_postgres::parse_dsn(dsn).map_err(|e| CheckError::Context(format!("--source: {e}")))?;
    let client = sluice_postgres::connect_as(&cfg, "--source", "", "sluice-migrations")
        .await
        .map_err(|e| CheckError::Context(format!("{e}: check the connection string and that the server is reachable")))?;
    // Catalog reads only: the session cannot write even by mistake.
    client.batch_execute("SET default_transaction_read_only = on").await.map_err(|e| CheckError::Context(format!("--source: {e}")))?;
    let publications = pipeline.map(|p| vec![format!("sluice_{p}")]);
    Model::load(&client, publications.as_deref()).await.map_err(|e| CheckError::Context(e.to_string()))
}

/// The catalog models `sluice server`'s migration checks use. A model is read at most
/// once per `ttl` for each pipeline (a burst of checks costs the source one read), at
/// most [`MAX_LOADS`] reads at a time (each is a connection to the source), and at most
/// [`MAX_MODELS`] are kept (the pipeline name is the caller's choice).
pub struct ModelCache {
    dsn: String,
    ttl: std::time::Duration,
    loads: tokio::sync::Semaphore,
    models: std::sync::Mutex<std::collections::HashMap<Option<String>, Cached>>,
    /// One read per pipeline at a time: checks arriving together wait for it.
    gates: std::sync::Mutex<std::collections::HashMap<Option<String>, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Catalog reads made, and the most under way at once: for tests of the bounds above.
    reads: std::sync::atomic::AtomicUsize,
    reading: std::sync::atomic::AtomicUsize,
    most_reading: std::sync::atomic::AtomicUsize,
}

/// A model and when it was read.
type Cached = (std::time::Instant, std::sync::Arc<Model>);

pub const MAX_LOADS: usize = 2;
pub const MAX_MODELS: usize = 64;

impl ModelCache {
    pub fn new(dsn: String, ttl: std::time::Duration) -> Self {
        Self {
            dsn,
            ttl,
            loads: tokio::sync::Semaphore::new(MAX_LOADS),
            models: Default::default(),
            gates: Default::default(),
            reads: Default::default(),
            reading: Default::default(),
            most_reading: Default::default(),
        }
    }

    fn fresh(&self, pipeline: Option<&str>) -> Option<std::sync::Arc<Model>> {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        models.get(&pipeline.map(String::from)).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, m)| m.clone())
    }

    pub async fn get(&self, pipeline: Option<&str>) -> Result<std::sync::Arc<Model>, CheckError> {
        if let Some(m) = self.fresh(pipeline) {
            return Ok(m);
        }
        let busy = || CheckError::Context("the source's catalog is busy being read for other checks: try again".into());
        let wait = std::time::Duration::from_secs(30);
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
            gates.retain(|_, g| std::sync::Arc::strong_count(g) > 1); // no one waiting
            gates.entry(pipeline.map(String::from)).or_default().clone()
        };
        let _one = tokio::time::timeout(wait, gate.lock()).await.map_err(|_| busy())?;
        // Another check may have read it while this one waited.
        if let Some(m) = self.fresh(pipeline) {
            return Ok(m);
        }
        let _permit = tokio::time::timeout(wait, self.loads.acquire()).await.map_err(|_| busy())?.expect("the semaphore is never closed");
        use std::sync::atomic::Ordering::Relaxed;
        self.reads.fetch_add(1, Relaxed);
        self.most_reading.fetch_max(self.reading.fetch_add(1, Relaxed) + 1, Relaxed);
        let loaded = load_model(&self.dsn, pipeline).await;
        self.reading.fetch_sub(1, Relaxed);
        let model = std::sync::Arc::new(loaded?);
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        models.retain(|_, (at, _)| at.elapsed() < self.ttl);
        if models.len() >= MAX_MODELS
            && let Some(oldest) = models.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
        {
            models.remove(&oldest);
        }
        models.insert(pipeline.map(String::from), (std::time::Instant::now(), model.clone()));
        Ok(model)
    }
}

/// Checks files (name, SQL) against `base`, each from the catalog as it is; with a
/// registry and pipeline, also asks the registry about each changed table.
pub async fn check_files(
    files: Vec<(String, String)>,
    base: &Model,
    registry: Option<(&str, &str)>,
) -> Result<(Verdict, Vec<FileReport>), CheckError> {
    let mut reports = Vec::with_capacity(files.len());
    for (name, sql) in files {
        let mut model = base.clone();
        let mut report = sluice_ddl::check(&name, &sql, &mut model)?;
        if let Some((url, pipeline)) = registry {
            let (url, pipeline) = (url.to_string(), pipeline.to_string());
            report =
                tokio::task::spawn_blocking(move || crate::registry_check::apply(&url, &pipeline, &model, &mut report).map(|()| report))
                    .await
                    .map_err(|e| CheckError::Context(format!("registry check failed: {e}")))?
                    .map_err(|e| CheckError::Context(e.to_string()))?;
        }
        reports.push(report);
    }
    let worst = reports.iter().map(|r| r.verdict).max().unwrap_or(Verdict::Allowed);
    Ok((worst, reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A burst of checks reads the catalog once; many pipelines at once hold at most
    /// MAX_LOADS connections to the source; the cache keeps at most MAX_MODELS models.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catalog_reads_are_cached_and_capped() {
        let pg = tokio::task::spawn_blocking(|| sluice_postgres::cluster::TempCluster::start(&[])).await.unwrap().unwrap();
        let admin = sluice_postgres::connect(&sluice_postgres::parse_dsn(&pg.dsn("postgres")).unwrap(), "test").await.unwrap();
        admin.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
        let cache = std::sync::Arc::new(ModelCache::new(pg.dsn("postgres"), std::time::Duration::from_secs(60)));
        let burst: Vec<_> = (0..20)
            .map(|_| {
                tokio::spawn({
                    let c = cache.clone();
                    async move { c.get(None).await.map(|_| ()) }
                })
            })
            .collect();
        for b in burst {
            b.await.unwrap().unwrap();
        }
        assert_eq!(cache.reads.load(Ordering::Relaxed), 1, "twenty checks, one catalog read");
        // Many pipelines at once: at most MAX_LOADS reads (connections) under way. (Counted
        // here: a dropped connection's backend lingers a moment in pg_stat_activity.)
        let many: Vec<_> = (0..MAX_MODELS + 6)
            .map(|i| {
                tokio::spawn({
                    let c = cache.clone();
                    async move { c.get(Some(&format!("p{i}"))).await.map(|_| ()) }
                })
            })
            .collect();
        for m in many {
            m.await.unwrap().unwrap();
        }
        let most = cache.most_reading.load(Ordering::Relaxed);
        assert!((1..=MAX_LOADS).contains(&most), "{most} catalog reads at once");
        assert_eq!(cache.reads.load(Ordering::Relaxed), MAX_MODELS + 7);
        assert!(cache.models.lock().unwrap().len() <= MAX_MODELS);
    }
}
