//! Where table files live: a local directory or S3-compatible object storage. Table
//! files go through the Iceberg crate's `FileIO` (OpenDAL underneath); listing (orphan
//! removal) and removing a table's directory (purge), which `FileIO` lacks, go through
//! OpenDAL directly with the same settings.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use iceberg::io::{FileIO, FileIOBuilder};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;
use opendal::Operator;
use secrecy::ExposeSecret;

use crate::config::S3StorageConfig;

/// The warehouse: its URL (`file:///dir` or `s3://bucket/prefix`, no trailing slash),
/// the `FileIO` tables are written with, and an operator rooted at the bucket (or `/`).
#[derive(Clone)]
pub(crate) struct Warehouse {
    pub url: String,
    pub io: FileIO,
    op: Operator,
    /// What an operator path is prefixed with to make a URL (`s3://bucket/` or `file:///`).
    base: String,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse").field("url", &self.url).finish_non_exhaustive()
    }
}

/// A file URL as the warehouse lists it: Hadoop-based writers (Iceberg Java's REST
/// catalog server) spell local files `file:/path`, Sluice `file:///path`.
pub(crate) fn normalized(url: &str) -> std::borrow::Cow<'_, str> {
    match url.strip_prefix("file:") {
        Some(rest) if !rest.starts_with("//") => format!("file://{rest}").into(),
        _ => url.into(),
    }
}

/// The bucket of an `s3://bucket/prefix` URL.
pub(crate) fn bucket_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("s3://").or_else(|| url.strip_prefix("s3a://"))?;
    let bucket = rest.split('/').next()?;
    (!bucket.is_empty()).then_some(bucket)
}

impl Warehouse {
    /// `warehouse` is validated: an absolute path, a `file://` URL, or `s3://bucket/...`
    /// with `s3` settings.
    pub fn new(warehouse: &str, s3: Option<&S3StorageConfig>) -> Result<Self, String> {
        let mut io = FileIOBuilder::new(Arc::new(OpenDalResolvingStorageFactory::new()));
        if let (Some(bucket), Some(s3)) = (bucket_of(warehouse), s3) {
            let url = warehouse.trim_end_matches('/').replacen("s3a://", "s3://", 1);
            for (k, v) in s3.file_io_props() {
                io = io.with_prop(k, v);
            }
            let mut b = opendal::services::S3::default()
                .bucket(bucket)
                .region(&s3.region)
                .access_key_id(&s3.access_key_id)
                .secret_access_key(s3.secret_access_key.expose_secret())
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(e) = &s3.endpoint {
                b = b.endpoint(e);
            }
            if !s3.path_style_access {
                b = b.enable_virtual_host_style();
            }
            let op = Operator::new(b).map_err(|e| format!("sink.iceberg.s3: {e}"))?.finish();
            return Ok(Self { url, io: io.build(), op, base: format!("s3://{bucket}/") });
        }
        let path = warehouse.strip_prefix("file://").unwrap_or(warehouse).trim_end_matches('/');
        let op = Operator::new(opendal::services::Fs::default().root("/")).map_err(|e| format!("sink.iceberg.warehouse: {e}"))?.finish();
        Ok(Self { url: format!("file://{path}"), io: io.build(), op, base: "file:///".into() })
    }

    fn key(&self, url: &str) -> String {
        url.strip_prefix(&self.base).unwrap_or(url).to_string()
    }

    /// Writes and removes a probe file: a warehouse that cannot take files (a directory
    /// this process cannot create, a bucket that does not exist, wrong credentials)
    /// fails here, before any table is created.
    pub async fn probe(&self) -> Result<(), String> {
        if let Some(dir) = self.url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| self.unwritable(&e.to_string()))?;
        }
        let probe = format!("{}/.sluice-probe-{}", self.url, uuid::Uuid::new_v4());
        let r = async {
            self.io.new_output(&probe)?.write(bytes::Bytes::new()).await?;
            self.io.delete(&probe).await
        }
        .await;
        r.map_err(|e| self.unwritable(&e.to_string()))
    }

    fn unwritable(&self, e: &str) -> String {
        let fix = if self.url.starts_with("s3://") {
            "check the bucket exists and sink.iceberg.s3 (endpoint, credentials, path_style_access)"
        } else {
            "name a directory this process can create and write"
        };
        // The error of an object store can be long (a whole XML body): its first line.
        let e = e.lines().next().unwrap_or_default();
        let shown = self.url.strip_prefix("file://").unwrap_or(&self.url);
        format!("sink.iceberg.warehouse: cannot write files under {shown}: {e}; {fix}")
    }

    /// Every file under `dir` (a URL), with its age.
    pub async fn files(&self, dir: &str) -> Result<Vec<(String, Duration)>, opendal::Error> {
        let prefix = format!("{}/", self.key(dir).trim_end_matches('/'));
        let entries = match self.op.list_with(&prefix).recursive(true).await {
            Ok(e) => e,
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Ok(entries
            .into_iter()
            .filter(|e| e.metadata().is_file())
            .map(|e| {
                let modified = e.metadata().last_modified().map_or(now_ms, |t| t.into_inner().as_millisecond());
                (format!("{}{}", self.base, e.path()), Duration::from_millis(now_ms.saturating_sub(modified).max(0) as u64))
            })
            .collect())
    }

    /// Removes `dir` (a URL) and everything under it.
    pub async fn remove_dir(&self, dir: &str) -> Result<(), opendal::Error> {
        let prefix = format!("{}/", self.key(dir).trim_end_matches('/'));
        match self.op.delete_with(&prefix).recursive(true).await {
            Err(e) if e.kind() != opendal::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_local_urls() {
        assert_eq!(bucket_of("s3://lake/warehouse"), Some("lake"));
        assert_eq!(bucket_of("s3a://lake"), Some("lake"));
        assert_eq!(bucket_of("s3:///x"), None);
        assert_eq!(bucket_of("/w"), None);
        assert_eq!(normalized("file:/w/a.json"), "file:///w/a.json");
        assert_eq!(normalized("file:///w/a.json"), "file:///w/a.json");
        assert_eq!(normalized("s3://b/a"), "s3://b/a");
        let w = Warehouse::new("/tmp/w/", None).unwrap();
        assert_eq!((w.url.as_str(), w.key("file:///tmp/w/a.db")), ("file:///tmp/w", "tmp/w/a.db".to_string()));
    }
}
