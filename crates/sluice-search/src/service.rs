//! The set of indices under one data directory, and the periodic refresh.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{EsError, EsResult};
use crate::index::SearchIndex;
use crate::mapping::Mapping;

/// Indices one service holds open at most (Elasticsearch's default
/// `cluster.max_shards_per_node`, one shard per index here).
pub const MAX_INDICES: usize = 1000;

pub struct SearchService {
    root: PathBuf,
    indices: RwLock<HashMap<String, Arc<SearchIndex>>>,
    /// Indices open at most ([`MAX_INDICES`]; tests lower it).
    max_indices: usize,
    /// Indices open at most per tenant, when tenants share the service (`sluice
    /// server` with the control plane, which names a tenant's indices
    /// `<tenant>.<name>`): the names before the first `.` are counted.
    max_per_tenant: Option<usize>,
    default_refresh: Duration,
    /// Serializes index creation and deletion.
    admin: Mutex<()>,
}

fn validate_name(name: &str) -> EsResult<()> {
    let bad = |why: &str| {
        let mut e = EsError::bad_request("invalid_index_name_exception", format!("Invalid index name [{name}], {why}"));
        e.index = Some(name.to_owned());
        e
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("must not be empty, '.' or '..'"));
    }
    if name.len() > 255 {
        return Err(bad("index name is too long"));
    }
    if name.chars().any(|c| c.is_uppercase()) {
        return Err(bad("must be lowercase"));
    }
    if name.starts_with(['_', '-', '+']) {
        return Err(bad("must not start with '_', '-', or '+'"));
    }
    // Hidden and system indices: the data directory's own entries start with '.',
    // and an index named so would be taken for one (and removed at the next start).
    if name.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    if let Some(c) = name.chars().find(|c| "\\/*?\"<>| ,#:%".contains(*c)) {
        return Err(bad(&format!("must not contain the following characters [{c}]")));
    }
    Ok(())
}

/// `100ms`, `1s`, `2m`, or `-1` (never: refresh only on request).
pub fn parse_interval(v: &Value) -> EsResult<Duration> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(EsError::illegal(format!("failed to parse setting [index.refresh_interval] with value [{v}]"))),
    };
    if s == "-1" {
        return Ok(Duration::MAX);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| EsError::illegal(format!("failed to parse setting [index.refresh_interval] with value [{s}] as a time value")))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => {
            return Err(EsError::illegal(format!(
                "failed to parse setting [index.refresh_interval] with value [{s}] as a time value: unit is missing or unrecognized"
            )));
        }
    })
}

/// Flattens `{"index": {"refresh_interval": ..}}` and `{"index.refresh_interval": ..}`.
fn flat_settings(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    if let Value::Object(o) = v {
        for (k, v) in o {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if v.is_object() {
                flat_settings(v, &key, out);
            } else {
                out.push((key, v.clone()));
            }
        }
    }
}

impl SearchService {
    /// Opens every index under `root` (created when missing).
    pub fn open(root: &Path, default_refresh: Duration) -> EsResult<Arc<SearchService>> {
        std::fs::create_dir_all(root)?;
        let mut indices = HashMap::new();
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A creation or deletion interrupted by a crash.
                std::fs::remove_dir_all(entry.path())?;
                continue;
            }
            if entry.file_type()?.is_dir() {
                indices.insert(name.clone(), Arc::new(SearchIndex::open(root, &name)?));
            }
        }
        Ok(Arc::new(SearchService {
            root: root.to_owned(),
            indices: RwLock::new(indices),
            default_refresh,
            admin: Mutex::new(()),
            max_indices: MAX_INDICES,
            max_per_tenant: None,
        }))
    }

    /// Caps each tenant's indices at `n` (see `max_per_tenant`).
    pub fn with_max_per_tenant(mut self: Arc<Self>, n: usize) -> Arc<Self> {
        Arc::get_mut(&mut self).expect("set before the service is shared").max_per_tenant = Some(n);
        self
    }

    pub fn get(&self, name: &str) -> EsResult<Arc<SearchIndex>> {
        self.indices.read().expect("poisoned").get(name).cloned().ok_or_else(|| EsError::index_not_found(name))
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.indices.read().expect("poisoned").keys().cloned().collect();
        v.sort();
        v
    }

    /// `PUT {index}` with `{settings, mappings}`.
    pub fn create(&self, name: &str, body: &Value) -> EsResult<Arc<SearchIndex>> {
        validate_name(name)?;
        let _g = self.admin.lock().expect("poisoned");
        let open = self.indices.read().expect("poisoned").len();
        if self.indices.read().expect("poisoned").contains_key(name) {
            let mut e = EsError::bad_request("resource_already_exists_exception", format!("index [{name}] already exists"));
            e.index = Some(name.to_owned());
            return Err(e);
        }
        // Each index holds a writer with its own memory budget and threads: a cap keeps
        // one caller (or a runaway auto-create) from taking the server down, as
        // Elasticsearch's cluster.max_shards_per_node does.
        if open >= self.max_indices {
            return Err(EsError::bad_request(
                "validation_exception",
                format!(
                    "Validation Failed: 1: this action would add [1] shards, but this cluster currently has [{open}]/[{}] maximum normal shards open; delete indices you no longer need",
                    self.max_indices
                ),
            ));
        }
        if let (Some(cap), Some((tenant, _))) = (self.max_per_tenant, name.split_once('.')) {
            let prefix = format!("{tenant}.");
            let theirs = self.indices.read().expect("poisoned").keys().filter(|n| n.starts_with(&prefix)).count();
            if theirs >= cap {
                return Err(EsError::bad_request(
                    "validation_exception",
                    format!(
                        "Validation Failed: 1: this action would add [1] shards, but tenant [{tenant}] has [{theirs}]/[{cap}] indices open; delete indices it no longer needs, or ask the operator to raise --search-max-indices-per-tenant"
                    ),
                ));
            }
        }
        let mut mapping = Mapping::default();
        let mut refresh = self.default_refresh;
        let mut settings = json!({"index": {"number_of_shards": "1", "number_of_replicas": "0"}});
        if let Value::Object(o) = body {
            for (k, v) in o {
                match k.as_str() {
                    "mappings" => mapping = Mapping::parse(v)?,
                    "settings" => {
                        let mut flat = Vec::new();
                        flat_settings(v, "", &mut flat);
                        for (key, value) in flat {
                            let key = key.strip_prefix("index.").unwrap_or(&key).to_owned();
                            match key.as_str() {
                                "refresh_interval" => {
                                    refresh = parse_interval(&value)?;
                                    settings["index"]["refresh_interval"] = value;
                                }
                                "number_of_shards" | "number_of_replicas" => {
                                    settings["index"][key] = json!(value.to_string().trim_matches('"'))
                                }
                                "max_result_window" | "auto_expand_replicas" | "codec" => {}
                                other => {
                                    return Err(EsError::illegal(format!(
                                        "unknown setting [index.{other}] please check that any required plugins are installed, or check the breaking changes documentation for removed settings"
                                    )));
                                }
                            }
                        }
                    }
                    "aliases" => {}
                    other => return Err(EsError::parsing(format!("unknown key [{other}] for create index"))),
                }
            }
        } else if !body.is_null() {
            return Err(EsError::parsing("request body must be an object"));
        }
        let ix = Arc::new(SearchIndex::create(&self.root, name, mapping, settings, refresh)?);
        self.indices.write().expect("poisoned").insert(name.to_owned(), ix.clone());
        tracing::info!(index = name, "index created");
        Ok(ix)
    }

    /// The index, created with dynamic mapping when missing (as `action.auto_create_index`).
    pub fn get_or_create(&self, name: &str) -> EsResult<Arc<SearchIndex>> {
        if let Ok(ix) = self.get(name) {
            return Ok(ix);
        }
        match self.create(name, &Value::Null) {
            Ok(ix) => Ok(ix),
            Err(e) if e.kind == "resource_already_exists_exception" => self.get(name),
            Err(e) => Err(e),
        }
    }

    pub fn delete(&self, name: &str) -> EsResult<()> {
        let _g = self.admin.lock().expect("poisoned");
        let ix = self.indices.write().expect("poisoned").remove(name).ok_or_else(|| EsError::index_not_found(name))?;
        ix.close();
        let trash = self.root.join(format!(".deleting-{name}"));
        std::fs::rename(ix.dir(), &trash)?;
        std::fs::remove_dir_all(&trash)?;
        tracing::info!(index = name, "index deleted");
        Ok(())
    }

    /// Refreshes each index whose interval has passed and that has unrefreshed writes.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut last: HashMap<String, Instant> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let indices: Vec<Arc<SearchIndex>> = svc.indices.read().expect("poisoned").values().cloned().collect();
                for ix in indices {
                    let due = last.get(&ix.name).is_none_or(|t| t.elapsed() >= ix.refresh_interval());
                    if due && ix.is_dirty() {
                        last.insert(ix.name.clone(), Instant::now());
                        let name = ix.name.clone();
                        match tokio::task::spawn_blocking(move || ix.refresh()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(index = %name, error = %e, "refresh failed"),
                            Err(e) => tracing::warn!(index = %name, error = %e, "refresh task failed"),
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_intervals() {
        assert!(validate_name("metrics-v1").is_ok());
        assert_eq!(validate_name("Metrics").unwrap_err().kind, "invalid_index_name_exception");
        assert_eq!(validate_name(".hidden").unwrap_err().kind, "invalid_index_name_exception");
        assert_eq!(validate_name("a%2fb").unwrap_err().kind, "invalid_index_name_exception");
        assert!(validate_name("_x").is_err());
        assert!(validate_name("a b").is_err());
        assert_eq!(parse_interval(&json!("150ms")).unwrap(), Duration::from_millis(150));
        assert_eq!(parse_interval(&json!("2s")).unwrap(), Duration::from_secs(2));
        assert!(parse_interval(&json!("2 parsecs")).is_err());
    }

    #[test]
    fn indices_are_capped() {
        let root = tempfile::tempdir().unwrap();
        let mut svc = SearchService::open(root.path(), Duration::from_secs(1)).unwrap();
        Arc::get_mut(&mut svc).unwrap().max_indices = 2;
        svc.create("a", &Value::Null).unwrap();
        svc.get_or_create("b").unwrap();
        let e = svc.get_or_create("c").err().unwrap();
        assert_eq!((e.status.as_u16(), e.kind), (400, "validation_exception"), "{}", e.reason);
        assert!(e.reason.contains("[2]/[2]"), "{}", e.reason);
        assert_eq!(svc.names(), ["a", "b"], "nothing half-made");
        svc.delete("a").unwrap();
        svc.create("c", &Value::Null).unwrap();
    }

    #[test]
    fn each_tenants_indices_are_capped() {
        let root = tempfile::tempdir().unwrap();
        let svc = SearchService::open(root.path(), Duration::from_secs(1)).unwrap().with_max_per_tenant(2);
        svc.create("acme.a", &Value::Null).unwrap();
        svc.get_or_create("acme.b").unwrap();
        let e = svc.get_or_create("acme.c").err().unwrap();
        assert_eq!((e.status.as_u16(), e.kind), (400, "validation_exception"), "{}", e.reason);
        assert!(e.reason.contains("tenant [acme] has [2]/[2]") && e.reason.contains("--search-max-indices-per-tenant"), "{}", e.reason);
        svc.create("globex.a", &Value::Null).unwrap();
        svc.create("plain", &Value::Null).unwrap();
        assert_eq!(svc.names(), ["acme.a", "acme.b", "globex.a", "plain"], "nothing half-made");
        svc.delete("acme.a").unwrap();
        svc.create("acme.c", &Value::Null).unwrap();
    }
}
