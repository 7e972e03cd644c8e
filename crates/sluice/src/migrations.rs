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
