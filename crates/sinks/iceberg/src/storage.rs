//! Where table files live: a local directory or S3-compatible object storage. Table
//! files go through the Iceberg crate's `FileIO` (OpenDAL underneath); listing (orphan
//! removal) and removing a table's directory (purge), which `FileIO` lacks, go through
//! OpenDAL directly with the same settings.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use iceberg::io::{
    FileIO, FileIOBuilder, FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage, StorageConfig, StorageFactory,
};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;
use opendal::Operator;
use opendal::layers::{HttpClientLayer, RetryLayer, TimeoutLayer};
use opendal::raw::HttpClient;
use secrecy::ExposeSecret;
use sluice_core::egress::Egress;

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
    /// with `s3` settings. `egress`: where the object store's client may connect.
    pub fn new(warehouse: &str, s3: Option<&S3StorageConfig>, egress: Option<&Arc<Egress>>) -> Result<Self, String> {
        if let (Some(bucket), Some(s3)) = (bucket_of(warehouse), s3) {
            let url = warehouse.trim_end_matches('/').replacen("s3a://", "s3://", 1);
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
            // The object store's client resolves names through the egress policy and
            // connects only to the addresses it checked (no endpoint: AWS, by name).
            let client = sluice_core::egress::guard_http(reqwest::Client::builder(), s3.endpoint.as_deref().unwrap_or_default(), egress)
                .map_err(|m| format!("sink.iceberg.s3.endpoint: {m}"))?
                .build()
                .map_err(|e| format!("sink.iceberg.s3: {e}"))?;
            // As the Iceberg crate's own S3 storage: each attempt bounded, retried.
            let op = Operator::new(b)
                .map_err(|e| format!("sink.iceberg.s3: {e}"))?
                .finish()
                .layer(HttpClientLayer::new(HttpClient::with(client)))
                .layer(TimeoutLayer::new())
                .layer(RetryLayer::new());
            let base = format!("s3://{bucket}/");
            let files = S3Files { base: base.clone(), op: Some(op.clone()) };
            let io = FileIOBuilder::new(Arc::new(S3FilesFactory(files))).build();
            return Ok(Self { url, io, op, base });
        }
        let io = FileIOBuilder::new(Arc::new(OpenDalResolvingStorageFactory::new()));
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
        r.map_err(|e| match sluice_core::egress::refusal_in(&e) {
            Some(refused) => format!("sink.iceberg.s3.endpoint: {refused}"),
            None => self.unwritable(&e.to_string()),
        })
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

/// Table files in an S3 bucket, through one OpenDAL operator whose HTTP client is
/// Sluice's (under the egress policy). The Iceberg crate's own S3 storage builds a
/// fresh operator, with a client of its own, for every file; no setting reaches that
/// client. Never serialized in Sluice (the trait asks for it): a deserialized copy
/// has no operator and fails every call.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct S3Files {
    /// `s3://bucket/`: what every path starts with.
    base: String,
    #[serde(skip)]
    op: Option<Operator>,
}

impl S3Files {
    /// The operator, once the storage is open in this process (a deserialized copy
    /// is not).
    fn op(&self) -> iceberg::Result<&Operator> {
        self.op.as_ref().ok_or_else(|| io_error("the warehouse's object store is not open here".into()))
    }

    /// The operator and `path`'s key in the bucket.
    fn at<'a>(&self, path: &'a str) -> iceberg::Result<(&Operator, &'a str)> {
        let op = self.op()?;
        let key = path
            .strip_prefix(self.base.as_str())
            .or_else(|| path.strip_prefix("s3a://").and_then(|p| p.strip_prefix(&self.base["s3://".len()..])))
            .ok_or_else(|| io_error(format!("{path} is not in {}", self.base)))?;
        Ok((op, key))
    }
}

fn io_error(message: String) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, message)
}

/// As the Iceberg crate's own storage reports them (the sink's retry decisions rest on it).
fn from_opendal(e: opendal::Error) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failure in doing io operation").with_source(e)
}

#[typetag::serde(name = "SluiceS3Files")]
#[async_trait::async_trait]
impl Storage for S3Files {
    async fn exists(&self, path: &str) -> iceberg::Result<bool> {
        let (op, key) = self.at(path)?;
        op.exists(key).await.map_err(from_opendal)
    }

    async fn metadata(&self, path: &str) -> iceberg::Result<FileMetadata> {
        let (op, key) = self.at(path)?;
        Ok(FileMetadata { size: op.stat(key).await.map_err(from_opendal)?.content_length() })
    }

    async fn read(&self, path: &str) -> iceberg::Result<Bytes> {
        let (op, key) = self.at(path)?;
        Ok(op.read(key).await.map_err(from_opendal)?.to_bytes())
    }

    async fn reader(&self, path: &str) -> iceberg::Result<Box<dyn FileRead>> {
        let (op, key) = self.at(path)?;
        Ok(Box::new(Reader(op.reader(key).await.map_err(from_opendal)?)))
    }

    async fn write(&self, path: &str, bs: Bytes) -> iceberg::Result<()> {
        let (op, key) = self.at(path)?;
        op.write(key, bs).await.map_err(from_opendal).map(|_| ())
    }

    async fn writer(&self, path: &str) -> iceberg::Result<Box<dyn FileWrite>> {
        let (op, key) = self.at(path)?;
        Ok(Box::new(Writer(op.writer(key).await.map_err(from_opendal)?)))
    }

    async fn delete(&self, path: &str) -> iceberg::Result<()> {
        let (op, key) = self.at(path)?;
        op.delete(key).await.map_err(from_opendal)
    }

    async fn delete_prefix(&self, path: &str) -> iceberg::Result<()> {
        let (op, key) = self.at(path)?;
        let dir = format!("{}/", key.trim_end_matches('/'));
        op.delete_with(&dir).recursive(true).await.map_err(from_opendal)
    }

    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> iceberg::Result<()> {
        let mut deleter = self.op()?.deleter().await.map_err(from_opendal)?;
        while let Some(path) = paths.next().await {
            let (_, key) = self.at(&path)?;
            deleter.delete(key.to_string()).await.map_err(from_opendal)?;
        }
        deleter.close().await.map_err(from_opendal)
    }

    fn new_input(&self, path: &str) -> iceberg::Result<InputFile> {
        Ok(InputFile::new(Arc::new(self.clone()), path.to_string()))
    }

    fn new_output(&self, path: &str) -> iceberg::Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(self.clone()), path.to_string()))
    }
}

/// Hands out the one [`S3Files`] whatever the properties (they are Sluice's own).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct S3FilesFactory(S3Files);

#[typetag::serde(name = "SluiceS3FilesFactory")]
impl StorageFactory for S3FilesFactory {
    fn build(&self, _: &StorageConfig) -> iceberg::Result<Arc<dyn Storage>> {
        Ok(Arc::new(self.0.clone()))
    }
}

struct Reader(opendal::Reader);

#[async_trait::async_trait]
impl FileRead for Reader {
    async fn read(&self, range: std::ops::Range<u64>) -> iceberg::Result<Bytes> {
        Ok(self.0.read(range).await.map_err(from_opendal)?.to_bytes())
    }
}

struct Writer(opendal::Writer);

#[async_trait::async_trait]
impl FileWrite for Writer {
    async fn write(&mut self, bs: Bytes) -> iceberg::Result<()> {
        self.0.write(bs).await.map_err(from_opendal)
    }

    async fn close(&mut self) -> iceberg::Result<()> {
        self.0.close().await.map(|_| ()).map_err(from_opendal)
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
        let w = Warehouse::new("/tmp/w/", None, None).unwrap();
        assert_eq!((w.url.as_str(), w.key("file:///tmp/w/a.db")), ("file:///tmp/w", "tmp/w/a.db".to_string()));
    }

    /// The object store's client resolves the endpoint's name through the egress
    /// policy: refused where the policy refuses the address, whatever listens there.
    #[tokio::test]
    async fn the_object_store_is_reached_only_where_the_policy_allows() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let s3: S3StorageConfig = serde_yaml::from_str(&format!(
            "{{endpoint: 'http://localhost:{port}', access_key_id: a, secret_access_key: b, path_style_access: true}}"
        ))
        .unwrap();
        let probe = |policy: &str| {
            let policy = Arc::new(Egress::parse(policy).unwrap());
            let w = Warehouse::new("s3://lake/w", Some(&s3), Some(&policy)).unwrap();
            async move { w.probe().await.unwrap_err() }
        };
        let refused = probe("").await;
        assert!(refused.contains("egress refused: localhost is a loopback address (127.0.0.1)"), "{refused}");
        // Allowed, it fails for another reason: nothing listens there.
        let allowed = probe("loopback").await;
        assert!(
            allowed.starts_with("sink.iceberg.warehouse: cannot write files under s3://lake/w") && !allowed.contains("egress"),
            "{allowed}"
        );
    }
}
