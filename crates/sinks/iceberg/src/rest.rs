//! An Iceberg REST catalog (the protocol of Polaris, Lakekeeper, Gravitino, Unity,
//! Tabular and Iceberg Java's `RESTCatalogServer`): tables are loaded, created and
//! committed over HTTP. A commit sends the changes between the metadata Sluice read and
//! the metadata it built (new snapshots, schema, properties, expired snapshots) with the
//! requirement that the branch still points where it did, so a concurrent writer makes
//! the commit fail rather than be lost.
//!
//! The catalog cannot take part in a Postgres transaction: each snapshot summary
//! carries the commit LSN it holds (`sluice.commit-lsn`, or the snapshot chunk), and
//! what a table already holds is skipped after a restart.

use std::collections::HashMap;

use iceberg::spec::{MAIN_BRANCH, Schema, SnapshotReference, SnapshotRetention, SortOrder, TableMetadata, UnboundPartitionSpec};
use iceberg::{TableRequirement, TableUpdate};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::IcebergError;

pub(crate) struct RestCatalog {
    http: reqwest::Client,
    /// `{uri}/v1/{prefix/}`.
    base: String,
    token: Option<SecretString>,
    uri: String,
}

/// A commit the catalog refused because the table moved since it was read.
pub(crate) enum Commit {
    Done(String, Box<TableMetadata>),
    Conflict,
}

#[derive(Deserialize)]
struct LoadTable {
    #[serde(rename = "metadata-location")]
    metadata_location: Option<String>,
    metadata: TableMetadata,
}

fn path_segment(s: &str) -> String {
    // Namespace and table names are validated names; '%' and '/' are still escaped so a
    // name cannot step into another path.
    s.replace('%', "%25").replace('/', "%2F").replace(' ', "%20")
}

impl RestCatalog {
    /// Reads the catalog's configuration (`GET /v1/config`), which may name a prefix
    /// for every other route.
    /// `egress`: where the client may connect (none: anywhere).
    pub async fn connect(
        uri: &str,
        warehouse: Option<&str>,
        token: Option<SecretString>,
        egress: Option<&std::sync::Arc<sluice_core::egress::Egress>>,
    ) -> Result<Self, IcebergError> {
        let http = sluice_core::egress::guard_http(reqwest::Client::builder(), uri, egress)
            .map_err(IcebergError::permanent)?
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| IcebergError::permanent(format!("Iceberg REST catalog client: {e}")))?;
        let uri = uri.trim_end_matches('/').to_string();
        let mut cat = Self { http, base: format!("{uri}/v1/"), token, uri };
        let mut url = format!("{}/v1/config", cat.uri);
        if let Some(w) = warehouse {
            url = format!("{url}?warehouse={}", path_segment(w));
        }
        let config = cat.send(cat.http.get(&url), "reading the catalog's configuration").await?;
        let prefix = config["overrides"]["prefix"].as_str().or(config["defaults"]["prefix"].as_str()).unwrap_or_default();
        if !prefix.is_empty() {
            cat.base = format!("{}/v1/{}/", cat.uri, prefix.trim_matches('/'));
        }
        Ok(cat)
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value, IcebergError> {
        Ok(self.send_status(req, what).await?.1)
    }

    /// The status and JSON body of a request that succeeded or failed with a status the
    /// caller handles (404, 409); other failures become errors naming the catalog.
    async fn send_status(&self, mut req: reqwest::RequestBuilder, what: &str) -> Result<(u16, Value), IcebergError> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose_secret());
        }
        let resp = req.send().await.map_err(|e| {
            IcebergError::transient(format!("Iceberg REST catalog at {}: {what}: {e}; check sink.iceberg.catalog.rest.uri", self.uri))
        })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) || status == 404 || status == 409 {
            return Ok((status, body));
        }
        // The catalog's own error message (the protocol's `error.message`), one line.
        let message = sluice_core::one_line(body["error"]["message"].as_str().unwrap_or("no message"));
        let m = format!("Iceberg REST catalog at {}: {what}: HTTP {status}: {message}", self.uri);
        Err(match status {
            401 | 403 => IcebergError::permanent(format!("{m}; check sink.iceberg.catalog.rest.token")),
            400 | 405 | 406 | 422 => IcebergError::permanent(m),
            _ => IcebergError::transient(m),
        })
    }

    fn table_url(&self, namespace: &str, table: &str) -> String {
        format!("{}namespaces/{}/tables/{}", self.base, path_segment(namespace), path_segment(table))
    }

    pub async fn ensure_namespace(&self, namespace: &str) -> Result<(), IcebergError> {
        let body = json!({ "namespace": [namespace], "properties": {} });
        // 409: it exists already.
        self.send_status(self.http.post(format!("{}namespaces", self.base)).json(&body), "creating the namespace").await?;
        Ok(())
    }

    /// The table's current metadata and its location, if the table exists.
    pub async fn load(&self, namespace: &str, table: &str) -> Result<Option<(String, TableMetadata)>, IcebergError> {
        let what = format!("loading table {namespace}.{table}");
        let (status, body) = self.send_status(self.http.get(self.table_url(namespace, table)), &what).await?;
        if status == 404 {
            return Ok(None);
        }
        let t: LoadTable = serde_json::from_value(body).map_err(|e| IcebergError::permanent(format!("{what}: {e}")))?;
        Ok(Some((t.metadata_location.unwrap_or_default(), t.metadata)))
    }

    /// Creates the table at `location`; `None` when another writer created it first.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        namespace: &str,
        table: &str,
        location: &str,
        schema: &Schema,
        spec: Option<&UnboundPartitionSpec>,
        order: Option<&SortOrder>,
        properties: &HashMap<String, String>,
    ) -> Result<Option<(String, TableMetadata)>, IcebergError> {
        let mut body = json!({ "name": table, "location": location, "schema": schema, "properties": properties, "stage-create": false });
        if let Some(s) = spec {
            body["partition-spec"] = serde_json::to_value(s).expect("json");
        }
        if let Some(o) = order {
            body["write-order"] = serde_json::to_value(o).expect("json");
        }
        let what = format!("creating table {namespace}.{table}");
        let url = format!("{}namespaces/{}/tables", self.base, path_segment(namespace));
        let (status, body) = self.send_status(self.http.post(url).json(&body), &what).await?;
        if status == 409 {
            return Ok(None);
        }
        let t: LoadTable = serde_json::from_value(body).map_err(|e| IcebergError::permanent(format!("{what}: {e}")))?;
        Ok(Some((t.metadata_location.unwrap_or_default(), t.metadata)))
    }

    /// Commits the changes from `base` to `next` (as [`changes`] lists them).
    pub async fn commit(&self, namespace: &str, table: &str, base: &TableMetadata, next: &TableMetadata) -> Result<Commit, IcebergError> {
        let (requirements, updates) = changes(base, next);
        if updates.is_empty() {
            return Ok(Commit::Done(String::new(), Box::new(next.clone())));
        }
        let what = format!("committing table {namespace}.{table}");
        let body = json!({ "requirements": requirements, "updates": updates });
        let (status, body) = self.send_status(self.http.post(self.table_url(namespace, table)).json(&body), &what).await?;
        match status {
            409 => Ok(Commit::Conflict),
            404 => Err(IcebergError::permanent(format!(
                "Iceberg table {namespace}.{table} is gone from the REST catalog: it was dropped while the pipeline ran; restart the \
                 pipeline to create it again"
            ))),
            _ => {
                let t: LoadTable = serde_json::from_value(body).map_err(|e| IcebergError::permanent(format!("{what}: {e}")))?;
                Ok(Commit::Done(t.metadata_location.unwrap_or_default(), Box::new(t.metadata)))
            }
        }
    }

    pub async fn drop(&self, namespace: &str, table: &str) -> Result<(), IcebergError> {
        let url = format!("{}?purgeRequested=true", self.table_url(namespace, table));
        self.send_status(self.http.delete(url), &format!("dropping table {namespace}.{table}")).await?;
        Ok(())
    }
}

/// What turns `base` into `next`, as the REST protocol's updates, and the requirement
/// that the main branch still points where `base` says (and the schema is still
/// `base`'s): snapshots added and removed, a new current schema, changed properties.
pub(crate) fn changes(base: &TableMetadata, next: &TableMetadata) -> (Vec<TableRequirement>, Vec<TableUpdate>) {
    let mut updates = Vec::new();
    if next.current_schema_id() != base.current_schema_id() {
        updates.push(TableUpdate::AddSchema { schema: next.current_schema().as_ref().clone() });
        updates.push(TableUpdate::SetCurrentSchema { schema_id: -1 });
    }
    let changed: HashMap<String, String> =
        next.properties().iter().filter(|(k, v)| base.properties().get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if !changed.is_empty() {
        updates.push(TableUpdate::SetProperties { updates: changed });
    }
    let removed: Vec<i64> = base.snapshots().map(|s| s.snapshot_id()).filter(|id| next.snapshot_by_id(*id).is_none()).collect();
    let mut added: Vec<_> = next.snapshots().filter(|s| base.snapshot_by_id(s.snapshot_id()).is_none()).collect();
    added.sort_by_key(|s| s.sequence_number());
    for s in added {
        updates.push(TableUpdate::AddSnapshot { snapshot: s.as_ref().clone() });
    }
    let current = next.current_snapshot().map(|s| s.snapshot_id());
    if let Some(id) = current
        && base.current_snapshot().map(|s| s.snapshot_id()) != Some(id)
    {
        updates.push(TableUpdate::SetSnapshotRef {
            ref_name: MAIN_BRANCH.to_string(),
            reference: SnapshotReference::new(id, SnapshotRetention::branch(None, None, None)),
        });
    }
    if !removed.is_empty() {
        updates.push(TableUpdate::RemoveSnapshots { snapshot_ids: removed });
    }
    let requirements = vec![
        TableRequirement::RefSnapshotIdMatch {
            r#ref: MAIN_BRANCH.to_string(),
            snapshot_id: base.current_snapshot().map(|s| s.snapshot_id()),
        },
        TableRequirement::CurrentSchemaIdMatch { current_schema_id: base.current_schema_id() },
    ];
    (requirements, updates)
}
