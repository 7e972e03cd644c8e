//! The Metrics Summary page: the dataset (orgs, metrics, metric configurations), the
//! document the search sink builds from it, and the page's query asked two ways: as the
//! join with facet counts that Postgres answers, and as one `_search` against the
//! denormalized index. The demo and the benchmark share all of it, so the figures
//! compare the same page.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Client;

/// The page's size, as on the original page.
pub const PAGE_SIZE: u32 = 50;

/// Rows at scale 1: one org with 82,000 active metrics and 817,000 configurations.
pub const FULL_METRICS: u64 = 82_000;
pub const FULL_CONFIGURATIONS: u64 = 817_000;

const NAMESPACES: &[&str] = &[
    "system",
    "aws",
    "gcp",
    "azure",
    "kubernetes",
    "docker",
    "postgresql",
    "redis",
    "kafka",
    "nginx",
    "trace",
    "jvm",
    "runtime",
    "http",
    "grpc",
    "envoy",
    "istio",
    "mysql",
    "mongodb",
    "elasticsearch",
    "rabbitmq",
    "memcached",
    "haproxy",
    "consul",
    "vault",
    "spark",
    "airflow",
    "celery",
    "sidekiq",
    "custom",
];
const SUBSYSTEMS: &[&str] = &[
    "cpu",
    "memory",
    "disk",
    "net",
    "io",
    "load",
    "fs",
    "process",
    "thread",
    "gc",
    "heap",
    "cache",
    "queue",
    "request",
    "response",
    "connection",
    "replication",
    "lock",
    "index",
    "query",
    "table",
    "topic",
    "partition",
    "consumer",
    "producer",
    "pod",
    "node",
    "container",
    "deployment",
    "service",
    "ingress",
    "lambda",
    "ec2",
    "rds",
    "s3",
    "sqs",
    "dynamodb",
    "elb",
    "cloudwatch",
    "billing",
];
const MEASURES: &[&str] = &[
    "user",
    "system",
    "idle",
    "iowait",
    "usage",
    "total",
    "free",
    "used",
    "available",
    "pct",
    "count",
    "errors",
    "latency",
    "duration",
    "bytes",
    "packets",
    "dropped",
    "retries",
    "timeouts",
    "active",
    "waiting",
    "reads",
    "writes",
    "hits",
    "misses",
    "evictions",
    "size",
    "capacity",
    "utilization",
    "throughput",
    "rate",
    "p50",
    "p95",
    "p99",
    "max",
    "min",
    "avg",
    "sum",
    "inflight",
    "backlog",
    "lag",
    "offset",
    "restarts",
    "ready",
    "desired",
    "scheduled",
    "throttled",
    "limit",
    "requests",
    "responses",
    "status2xx",
    "status4xx",
    "status5xx",
    "opened",
    "closed",
    "failed",
    "succeeded",
    "started",
    "completed",
    "pending",
    "running",
    "stopped",
    "uptime",
    "version",
    "healthy",
    "unhealthy",
    "invocations",
    "concurrency",
    "cost",
    "spend",
];
pub const TYPES: &[&str] = &["gauge", "count", "rate", "distribution"];
const ENVS: &[&str] = &["prod", "staging", "dev"];
const REGIONS: &[&str] = &["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1", "ap-southeast-2"];

/// How many rows of each table.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub metrics: u64,
    pub configurations: u64,
}

impl Scale {
    /// `factor` × the original page's 82,000 metrics and 817,000 configurations.
    pub fn new(factor: f64) -> Result<Scale> {
        ensure!(factor > 0.0 && factor <= 20.0, "--scale must be above 0 and at most 20 (1 = 82,000 metrics, 817,000 configurations)");
        let metrics = ((FULL_METRICS as f64 * factor).round() as u64).max(10);
        let configurations = (FULL_CONFIGURATIONS as f64 * factor).round() as u64;
        Ok(Scale { metrics, configurations })
    }
}

/// Tables with the keys, indexes and replica identities the page and the sink need.
pub const SCHEMA: &str = "
CREATE TABLE orgs (id int8 PRIMARY KEY, name text NOT NULL, plan text NOT NULL);
CREATE TABLE metrics (
    id int8 PRIMARY KEY, org_id int8 NOT NULL REFERENCES orgs, name text NOT NULL, type text NOT NULL, unit text,
    tags text[] NOT NULL, last_seen timestamptz NOT NULL, active boolean NOT NULL);
CREATE INDEX metrics_org ON metrics (org_id);
CREATE TABLE metric_configurations (
    id int8 PRIMARY KEY, metric_id int8 NOT NULL REFERENCES metrics ON DELETE CASCADE, kind text NOT NULL,
    setting text NOT NULL, enabled boolean NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX metric_configurations_metric ON metric_configurations (metric_id);
-- A deleted or moved configuration must name its metric in the change.
ALTER TABLE metric_configurations REPLICA IDENTITY FULL;
";

/// The search sink's document: a metric with its org, its configurations (nested, so a
/// filter on kind and setting matches within one configuration) and their count.
pub const DOCUMENT_YAML: &str = "
      table: public.metrics
      text_fields: [name]
      relations:
        - {name: org, kind: one, table: public.orgs, column: org_id, fields: [name, plan], flatten: true}
        - {name: configurations, kind: many, table: public.metric_configurations, column: metric_id, fields: [id, kind, setting, enabled]}
      counts:
        - {name: configuration_count, relation: configurations}
";

/// Creates the tables and fills them; the main org (id 1) holds `scale.metrics` active
/// metrics and every configuration, two small orgs and some inactive metrics make the
/// page's filters select something.
pub async fn create_dataset(c: &Client, scale: Scale, seed: f64) -> Result<()> {
    c.batch_execute(SCHEMA).await.context("creating the Metrics Summary tables")?;
    let words = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    let (ns, sub, meas) = (words(NAMESPACES), words(SUBSYSTEMS), words(MEASURES));
    let (n, extra) = (scale.metrics as i64, (scale.metrics / 10) as i64);
    c.execute("SELECT setseed($1)", &[&seed]).await?;
    c.batch_execute("INSERT INTO orgs VALUES (1, 'acme', 'enterprise'), (2, 'globex', 'pro'), (3, 'initech', 'free')").await?;
    // Names: namespace.subsystem.measure, unique per metric (84,000 combinations, then
    // a numeric suffix). Words are letters and digits only, so a word matches the same
    // metrics in Postgres (\m word \M) as in the search service's tokenizer.
    c.execute(
        "WITH w AS (SELECT $1::text[] AS ns, $2::text[] AS sub, $3::text[] AS meas, $5::text[] AS regions, $6::text[] AS envs,
                           cardinality($1::text[]) AS a, cardinality($2::text[]) AS b, cardinality($3::text[]) AS c,
                           $4::int8 AS n, $7::int8 AS extra)
         INSERT INTO metrics
         SELECT g,
                CASE WHEN g <= w.n THEN 1 ELSE 2 + g % 2 END,
                w.ns[(1 + g % w.a)::int] || '.' || w.sub[(1 + (g / w.a) % w.b)::int] || '.' || w.meas[(1 + (g / (w.a * w.b)) % w.c)::int]
                  || CASE WHEN g >= w.a * w.b * w.c THEN '.v' || (g / (w.a * w.b * w.c))::text ELSE '' END,
                (ARRAY['gauge','gauge','gauge','gauge','count','count','rate','rate','distribution','gauge'])[1 + floor(random() * 10)::int],
                (ARRAY['byte','second','percent','request','operation','millisecond',NULL])[1 + floor(random() * 7)::int],
                ARRAY['env:' || w.envs[1 + floor(power(random(), 2) * 3)::int],
                      'service:svc' || floor(power(random(), 3) * 200)::int,
                      'region:' || w.regions[1 + floor(random() * cardinality(w.regions))::int],
                      'team:team' || floor(power(random(), 2) * 30)::int],
                now() - random() * interval '30 days',
                g <= w.n OR g % 3 <> 0
         FROM w, generate_series(1, w.n + w.extra) g",
        &[&ns, &sub, &meas, &n, &words(REGIONS), &words(ENVS), &extra],
    )
    .await
    .context("inserting metrics")?;
    // Inactive metrics of the main org, as the page's `active` filter expects.
    c.execute("UPDATE metrics SET org_id = 1, active = false WHERE id > $1 AND id % 3 = 0", &[&n]).await?;
    // Configurations: about ten per metric, unevenly (some metrics have none, some dozens).
    c.execute(
        "INSERT INTO metric_configurations (id, metric_id, kind, setting, enabled)
         SELECT g, 1 + floor(power(random(), 1.3) * $1::int8)::int8,
                (ARRAY['tag_index','aggregation','rollup','percentile','retention'])[1 + floor(random() * 5)::int],
                (ARRAY['avg','max','min','sum','count','p95','p99','30d','15m','host,service'])[1 + floor(random() * 10)::int],
                random() < 0.8
         FROM generate_series(1, $2::int8) g",
        &[&n, &(scale.configurations as i64)],
    )
    .await
    .context("inserting metric configurations")?;
    c.batch_execute("ANALYZE orgs, metrics, metric_configurations").await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sort {
    #[default]
    Name,
    LastSeen,
}

/// One page view: the filters a user set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Tags the metric must all carry (`env:prod`).
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, rename = "type")]
    pub metric_type: Option<String>,
    /// One word of the metric's name (`cpu`).
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub sort: Sort,
    #[serde(default)]
    pub page: u32,
}

impl PageQuery {
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.text {
            ensure!(!t.is_empty() && t.chars().all(char::is_alphanumeric), "text: search one word of letters and digits (got {t:?})");
        }
        if let Some(t) = &self.metric_type {
            ensure!(TYPES.contains(&t.as_str()), "type: one of {} (got {t:?})", TYPES.join(", "));
        }
        ensure!(self.page < 200, "page: at most 199 (got {})", self.page);
        Ok(())
    }
}

/// The page as the user sees it, whichever system answered.
#[derive(Debug, Clone, PartialEq)]
pub struct PageResult {
    pub total: u64,
    pub rows: Vec<Value>,
    /// Metric type → count over every matching metric.
    pub types: Vec<(String, u64)>,
    /// The 20 most frequent tags among the matching metrics.
    pub tags: Vec<(String, u64)>,
}

impl PageResult {
    pub fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r["id"].as_i64().unwrap_or(-1)).collect()
    }

    /// Whether two answers show the same page. Facets are compared as counts: two tags
    /// with equal counts may be listed in either order, and tantivy's terms aggregation
    /// breaks ties differently from Postgres.
    pub fn same_page(&self, other: &PageResult) -> Result<()> {
        ensure!(self.total == other.total, "total {} vs {}", self.total, other.total);
        ensure!(self.ids() == other.ids(), "page ids {:?} vs {:?}", self.ids(), other.ids());
        let counts = |v: &[(String, u64)]| {
            let mut c: Vec<u64> = v.iter().map(|x| x.1).collect();
            c.sort_unstable();
            c
        };
        let mut a = self.types.clone();
        let mut b = other.types.clone();
        a.sort();
        b.sort();
        ensure!(a == b, "type facet {a:?} vs {b:?}");
        ensure!(counts(&self.tags) == counts(&other.tags), "tag facet {:?} vs {:?}", self.tags, other.tags);
        for (i, (x, y)) in self.rows.iter().zip(&other.rows).enumerate() {
            ensure!(x["configuration_count"] == y["configuration_count"], "row {i}: configuration_count {} vs {}", x, y);
        }
        Ok(())
    }
}

/// The page on Postgres: metrics joined with their configurations (for the counts),
/// filtered, the page sorted and cut, total and facet counts over every match. This is
/// the query the original page ran on every load.
pub async fn page_postgres(c: &Client, q: &PageQuery) -> Result<PageResult> {
    q.validate()?;
    let order = match q.sort {
        Sort::Name => "name COLLATE \"C\", id",
        Sort::LastSeen => "last_seen DESC, id",
    };
    let sql = format!(
        "WITH m AS (
           SELECT m.id, m.name, m.type, m.unit, m.tags, m.last_seen, count(c.id) AS configuration_count
           FROM metrics m LEFT JOIN metric_configurations c ON c.metric_id = m.id
           WHERE m.org_id = 1 AND m.active AND m.tags @> $1::text[]
             AND ($2::text IS NULL OR m.type = $2) AND ($3::text IS NULL OR m.name ~* ('\\m' || $3 || '\\M'))
           GROUP BY m.id)
         SELECT (SELECT coalesce(json_agg(p), '[]') FROM (SELECT id, name, type, unit, tags, last_seen, configuration_count
                  FROM m ORDER BY {order} LIMIT {PAGE_SIZE} OFFSET $4) p)::text,
                (SELECT count(*) FROM m),
                (SELECT coalesce(json_agg(json_build_array(key, n)), '[]') FROM
                  (SELECT type AS key, count(*) AS n FROM m GROUP BY type ORDER BY n DESC, key LIMIT 10) t)::text,
                (SELECT coalesce(json_agg(json_build_array(key, n)), '[]') FROM
                  (SELECT tag AS key, count(*) AS n FROM m, unnest(m.tags) tag GROUP BY tag ORDER BY n DESC, key LIMIT 20) t)::text"
    );
    let offset = i64::from(q.page * PAGE_SIZE);
    let row = c.query_one(&sql, &[&q.tags, &q.metric_type, &q.text, &offset]).await.context("the Metrics Summary query on Postgres")?;
    let facet = |s: String| -> Result<Vec<(String, u64)>> { Ok(serde_json::from_str(&s)?) };
    Ok(PageResult {
        rows: serde_json::from_str(&row.get::<_, String>(0))?,
        total: row.get::<_, i64>(1) as u64,
        types: facet(row.get(2))?,
        tags: facet(row.get(3))?,
    })
}

/// The same page as one `_search` request on the denormalized index.
pub fn search_body(q: &PageQuery) -> Value {
    let mut filter = vec![json!({"term": {"org_id": 1}}), json!({"term": {"active": true}})];
    filter.extend(q.tags.iter().map(|t| json!({"term": {"tags": t}})));
    if let Some(t) = &q.metric_type {
        filter.push(json!({"term": {"type": t}}));
    }
    let must: Vec<Value> = q.text.iter().map(|t| json!({"match": {"name": t}})).collect();
    let sort = match q.sort {
        Sort::Name => json!([{"name.keyword": "asc"}, {"id": "asc"}]),
        Sort::LastSeen => json!([{"last_seen": "desc"}, {"id": "asc"}]),
    };
    json!({
        "from": q.page * PAGE_SIZE,
        "size": PAGE_SIZE,
        "track_total_hits": true,
        "_source": ["id", "name", "type", "unit", "tags", "last_seen", "configuration_count"],
        "query": {"bool": {"filter": filter, "must": must}},
        "sort": sort,
        "aggs": {
            "types": {"terms": {"field": "type", "size": 10}},
            "tags": {"terms": {"field": "tags", "size": 20}},
        },
    })
}

pub async fn page_search(http: &reqwest::Client, url: &str, index: &str, q: &PageQuery) -> Result<PageResult> {
    q.validate()?;
    let resp = http
        .post(format!("{}/{index}/_search", url.trim_end_matches('/')))
        .json(&search_body(q))
        .send()
        .await
        .with_context(|| format!("the search service at {url}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.context("the search service's answer")?;
    if !status.is_success() {
        bail!("the search service answered {status}: {v}");
    }
    let buckets = |name: &str| -> Vec<(String, u64)> {
        v["aggregations"][name]["buckets"]
            .as_array()
            .map(|b| b.iter().map(|b| (b["key"].as_str().unwrap_or_default().to_owned(), b["doc_count"].as_u64().unwrap_or(0))).collect())
            .unwrap_or_default()
    };
    Ok(PageResult {
        total: v["hits"]["total"]["value"].as_u64().context("hits.total.value")?,
        rows: v["hits"]["hits"].as_array().context("hits.hits")?.iter().map(|h| h["_source"].clone()).collect(),
        types: buckets("types"),
        tags: buckets("tags"),
    })
}

/// Page views as users make them: the whole org, a tag or two, a type, a word of the
/// name, later pages, both sort orders. The same seed gives the same list.
pub fn sample_queries(n: usize, seed: u64) -> Vec<PageQuery> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut q = PageQuery::default();
        let kind = r.random_range(0..10);
        if kind >= 2 {
            q.tags.push(match r.random_range(0..4) {
                0 => format!("env:{}", ENVS[r.random_range(0..ENVS.len())]),
                1 => format!("service:svc{}", r.random_range(0..40)),
                2 => format!("region:{}", REGIONS[r.random_range(0..REGIONS.len())]),
                _ => format!("team:team{}", r.random_range(0..30)),
            });
        }
        if kind >= 5 {
            q.metric_type = Some(TYPES[r.random_range(0..TYPES.len())].to_owned());
        }
        if kind == 1 || kind >= 7 {
            let lists = [NAMESPACES, SUBSYSTEMS, MEASURES];
            let list = lists[r.random_range(0..3)];
            q.text = Some(list[r.random_range(0..list.len())].to_owned());
        }
        if kind == 9 {
            q.tags.push("env:prod".into());
        }
        if r.random_bool(0.3) {
            q.sort = Sort::LastSeen;
        }
        if r.random_bool(0.2) {
            q.page = r.random_range(1..4);
        }
        out.push(q);
    }
    out
}

/// The nearest-rank `q` quantile of `sorted` (ascending, not empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Times `f` once, in microseconds.
pub async fn timed<T>(f: impl Future<Output = Result<T>>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f.await?;
    Ok((v, t.elapsed().as_secs_f64() * 1e6))
}

/// Waits until the index holds `want` documents (refreshing it), or `limit` passes.
pub async fn wait_for_count(http: &reqwest::Client, url: &str, index: &str, want: u64, limit: Duration) -> Result<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let n = count(http, url, index).await.unwrap_or(0);
        if n >= want {
            return Ok(n);
        }
        ensure!(Instant::now() < deadline, "the index holds {n} documents, {want} expected, after {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn count(http: &reqwest::Client, url: &str, index: &str) -> Result<u64> {
    let v: Value = http.post(format!("{url}/{index}/_count")).json(&json!({})).send().await?.json().await?;
    v["count"].as_u64().with_context(|| format!("_count answered {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_valid_and_varied() {
        let qs = sample_queries(200, 7);
        for q in &qs {
            q.validate().unwrap();
        }
        assert!(qs.iter().any(|q| q.tags.is_empty() && q.text.is_none()));
        assert!(qs.iter().any(|q| q.text.is_some()));
        assert!(qs.iter().any(|q| q.sort == Sort::LastSeen && q.page > 0));
        // Words are single tokens in both systems: no separators inside.
        for w in NAMESPACES.iter().chain(SUBSYSTEMS).chain(MEASURES) {
            assert!(w.chars().all(|c| c.is_ascii_alphanumeric()), "{w}");
        }
        assert!(NAMESPACES.len() * SUBSYSTEMS.len() * MEASURES.len() >= FULL_METRICS as usize);
    }

    #[test]
    fn bad_page_queries_are_refused() {
        let q = PageQuery { text: Some("cpu.*".into()), ..Default::default() };
        assert!(q.validate().unwrap_err().to_string().contains("one word"));
        let q = PageQuery { metric_type: Some("histogram".into()), ..Default::default() };
        assert!(q.validate().is_err());
        let body = search_body(&PageQuery { tags: vec!["env:prod".into()], page: 2, ..Default::default() });
        assert_eq!(body["from"], 100);
        assert_eq!(body["query"]["bool"]["filter"][2]["term"]["tags"], "env:prod");
    }
}
