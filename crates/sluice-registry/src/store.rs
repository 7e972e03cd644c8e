//! Durable registry state in Postgres. Registrations in one context are serialized by
//! an advisory transaction lock, so concurrent registrations of the same schema get the
//! same id and versions never collide.

use apache_avro::Schema;
use tokio::sync::Mutex;
use tokio_postgres::{Client, GenericClient};

use crate::compat::{self, Compatibility};
use crate::error::ApiError;

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS sluice_registry;
CREATE TABLE IF NOT EXISTS sluice_registry.schemas (
    ctx text NOT NULL, id int4 NOT NULL, schema_type text NOT NULL, schema text NOT NULL,
    PRIMARY KEY (ctx, id));
-- Unique by a hash of the text: a btree entry holds at most ~2.7 KB, and schemas of
-- wide tables are larger. (Registries from before kept the text itself unique.)
CREATE UNIQUE INDEX IF NOT EXISTS schemas_unique_text ON sluice_registry.schemas (ctx, schema_type, md5(schema));
ALTER TABLE sluice_registry.schemas DROP CONSTRAINT IF EXISTS schemas_ctx_schema_type_schema_key;
CREATE TABLE IF NOT EXISTS sluice_registry.versions (
    ctx text NOT NULL, subject text NOT NULL, version int4 NOT NULL, schema_id int4 NOT NULL,
    deleted bool NOT NULL DEFAULT false, PRIMARY KEY (ctx, subject, version));
CREATE TABLE IF NOT EXISTS sluice_registry.config (
    ctx text NOT NULL, subject text NOT NULL, compatibility text NOT NULL, PRIMARY KEY (ctx, subject));
CREATE TABLE IF NOT EXISTS sluice_registry.mode (
    ctx text NOT NULL, subject text NOT NULL, mode text NOT NULL, PRIMARY KEY (ctx, subject));";

/// A subject inside a context: `:.tenant:orders-value` is subject `orders-value` in
/// context `tenant`; a plain name is in the default context (stored as "").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qualified {
    pub ctx: String,
    pub subject: String,
}

impl Qualified {
    pub fn parse(raw: &str) -> Qualified {
        if let Some(rest) = raw.strip_prefix(":.")
            && let Some((ctx, subject)) = rest.split_once(':')
        {
            return Qualified { ctx: ctx.to_string(), subject: subject.to_string() };
        }
        Qualified { ctx: String::new(), subject: raw.to_string() }
    }

    /// The name as clients see it.
    pub fn display(&self) -> String {
        if self.ctx.is_empty() { self.subject.clone() } else { format!(":.{}:{}", self.ctx, self.subject) }
    }
}

pub struct Store {
    config: sluice_postgres::PgConnConfig,
    /// Replaced when the database drops it (a restart, a failover): the next request
    /// reconnects, so the registry outlives its database's restarts.
    client: Mutex<Client>,
}

#[derive(Debug, Clone)]
pub struct Version {
    pub subject: String,
    pub version: i32,
    pub id: i32,
    pub schema: String,
}

fn db(e: tokio_postgres::Error) -> ApiError {
    tracing::error!(error = %e, "registry store");
    ApiError::store(e.to_string())
}

/// Parses an Avro schema and returns it with its compact JSON text (the stored form).
pub fn parse_avro(text: &str) -> Result<(Schema, String), ApiError> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| ApiError::invalid_schema(format!("not JSON: {e}")))?;
    let schema = Schema::parse(&json).map_err(|e| ApiError::invalid_schema(e.to_string()))?;
    Ok((schema, json.to_string()))
}

impl Store {
    /// Connects to the registry database and creates the registry's tables when missing.
    pub async fn open(config: sluice_postgres::PgConnConfig) -> Result<Store, String> {
        let client = Self::connect(&config).await?;
        client.batch_execute(DDL).await.map_err(|e| format!("cannot create the registry tables: {e}"))?;
        Ok(Store { config, client: Mutex::new(client) })
    }

    async fn connect(config: &sluice_postgres::PgConnConfig) -> Result<Client, String> {
        sluice_postgres::connect_as(config, "the registry database", "", "sluice-registry").await.map_err(|e| e.to_string())
    }

    /// The connection, re-opened first when it was lost.
    async fn conn(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, ApiError> {
        let mut c = self.client.lock().await;
        if c.is_closed() {
            tracing::warn!("the registry database connection was lost; reconnecting");
            *c = Self::connect(&self.config).await.map_err(ApiError::store)?;
        }
        Ok(c)
    }

    async fn versions_of<C: GenericClient>(c: &C, q: &Qualified, deleted: bool) -> Result<Vec<Version>, ApiError> {
        let rows = c
            .query(
                "SELECT v.version, v.schema_id, s.schema FROM sluice_registry.versions v
                 JOIN sluice_registry.schemas s ON s.ctx = v.ctx AND s.id = v.schema_id
                 WHERE v.ctx = $1 AND v.subject = $2 AND (NOT v.deleted OR $3) ORDER BY v.version",
                &[&q.ctx, &q.subject, &deleted],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| Version { subject: q.display(), version: r.get(0), id: r.get(1), schema: r.get(2) }).collect())
    }

    /// A subject's own value of a setting (`subject_level`), or its context's.
    async fn setting<C: GenericClient>(
        c: &C,
        table: &str,
        column: &str,
        q: &Qualified,
        subject_level: bool,
    ) -> Result<Option<String>, ApiError> {
        let subject = if subject_level { q.subject.as_str() } else { "" };
        let row = c
            .query_opt(&format!("SELECT {column} FROM sluice_registry.{table} WHERE ctx = $1 AND subject = $2"), &[&q.ctx, &subject])
            .await
            .map_err(db)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The compatibility in force for a subject: its own, else its context's, else BACKWARD.
    pub async fn compatibility(&self, q: &Qualified) -> Result<Compatibility, ApiError> {
        let c = self.conn().await?;
        Self::effective_compat(&*c, q).await
    }

    async fn effective_compat<C: GenericClient>(c: &C, q: &Qualified) -> Result<Compatibility, ApiError> {
        let row = c
            .query_opt(
                "SELECT compatibility FROM sluice_registry.config WHERE ctx = $1 AND subject IN ($2, '') ORDER BY subject = '' LIMIT 1",
                &[&q.ctx, &q.subject],
            )
            .await
            .map_err(db)?;
        Ok(row.and_then(|r| Compatibility::parse(&r.get::<_, String>(0))).unwrap_or(Compatibility::Backward))
    }

    pub async fn register(&self, q: &Qualified, schema_type: &str, text: &str) -> Result<i32, ApiError> {
        if schema_type != "AVRO" {
            return Err(ApiError::invalid_schema(format!("schema type {schema_type} is not supported; only AVRO is")));
        }
        let (schema, stored) = parse_avro(text)?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('sluice_registry:' || $1))", &[&q.ctx]).await.map_err(db)?;
        if Self::mode_of(&tx, q).await? == "READONLY" {
            return Err(ApiError::new(422, 42205, format!("Subject {} is in read-only mode", q.display())));
        }
        let existing = Self::versions_of(&tx, q, false).await?;
        if let Some(v) = existing.iter().find(|v| v.schema == stored) {
            return Ok(v.id);
        }
        let mode = Self::effective_compat(&tx, q).await?;
        let olds: Vec<Schema> = existing.iter().filter_map(|v| parse_avro(&v.schema).ok().map(|(s, _)| s)).collect();
        let reasons = compat::check(mode, &schema, &olds);
        if !reasons.is_empty() {
            return Err(ApiError::new(
                409,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{}\", details: {}",
                    q.display(),
                    reasons.join("; ")
                ),
            ));
        }
        let id: i32 = match tx
            .query_opt(
                "SELECT id FROM sluice_registry.schemas WHERE ctx = $1 AND schema_type = $2 AND md5(schema) = md5($3) AND schema = $3",
                &[&q.ctx, &schema_type, &stored],
            )
            .await
            .map_err(db)?
        {
            Some(r) => r.get(0),
            None => {
                let r = tx
                    .query_one(
                        "INSERT INTO sluice_registry.schemas (ctx, id, schema_type, schema)
                         SELECT $1, COALESCE(max(id), 0) + 1, $2, $3 FROM sluice_registry.schemas WHERE ctx = $1 RETURNING id",
                        &[&q.ctx, &schema_type, &stored],
                    )
                    .await
                    .map_err(db)?;
                r.get(0)
            }
        };
        tx.execute(
            "INSERT INTO sluice_registry.versions (ctx, subject, version, schema_id)
             SELECT $1, $2, COALESCE(max(version), 0) + 1, $3 FROM sluice_registry.versions WHERE ctx = $1 AND subject = $2",
            &[&q.ctx, &q.subject, &id],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(id)
    }

    async fn mode_of<C: GenericClient>(c: &C, q: &Qualified) -> Result<String, ApiError> {
        let own = Self::setting(c, "mode", "mode", q, true).await?;
        Ok(match own {
            Some(m) => m,
            None => Self::setting(c, "mode", "mode", q, false).await?.unwrap_or_else(|| "READWRITE".into()),
        })
    }

    pub async fn subjects(&self, ctx_filter: Option<&str>, deleted: bool) -> Result<Vec<String>, ApiError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT DISTINCT ctx, subject FROM sluice_registry.versions WHERE (NOT deleted OR $1)
                 AND ($2::text IS NULL OR ctx = $2) ORDER BY 1, 2",
                &[&deleted, &ctx_filter],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| Qualified { ctx: r.get(0), subject: r.get(1) }.display()).collect())
    }

    pub async fn versions(&self, q: &Qualified, deleted: bool) -> Result<Vec<Version>, ApiError> {
        let c = self.conn().await?;
        let v = Self::versions_of(&*c, q, deleted).await?;
        if v.is_empty() {
            return Err(ApiError::subject_not_found(&q.display()));
        }
        Ok(v)
    }

    /// `version` is a number or `latest` (-1).
    pub async fn version(&self, q: &Qualified, version: &str, deleted: bool) -> Result<Version, ApiError> {
        let all = self.versions(q, deleted).await?;
        let found = match version {
            "latest" | "-1" => all.last().cloned(),
            v => {
                let n: i32 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::new(422, 42202, format!("The specified version '{v}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""))
                })?;
                all.into_iter().find(|x| x.version == n)
            }
        };
        found.ok_or_else(|| ApiError::new(404, 40402, format!("Version {version} not found.")))
    }

    pub async fn lookup(&self, q: &Qualified, text: &str) -> Result<Version, ApiError> {
        let (_, stored) = parse_avro(text)?;
        let all = self.versions(q, false).await?;
        all.into_iter().find(|v| v.schema == stored).ok_or_else(|| ApiError::new(404, 40403, "Schema not found".to_string()))
    }

    pub async fn schema_by_id(&self, ctx: &str, id: i32) -> Result<String, ApiError> {
        let c = self.conn().await?;
        let row = c.query_opt("SELECT schema FROM sluice_registry.schemas WHERE ctx = $1 AND id = $2", &[&ctx, &id]).await.map_err(db)?;
        row.map(|r| r.get(0)).ok_or_else(|| ApiError::new(404, 40403, "Schema not found".to_string()))
    }

    pub async fn id_usage(&self, ctx: &str, id: i32) -> Result<Vec<(String, i32)>, ApiError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT subject, version FROM sluice_registry.versions WHERE ctx = $1 AND schema_id = $2 AND NOT deleted ORDER BY 1, 2",
                &[&ctx, &id],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| (Qualified { ctx: ctx.to_string(), subject: r.get(0) }.display(), r.get(1))).collect())
    }

    /// Soft delete (or permanent, which needs a soft delete first). Returns the versions deleted.
    pub async fn delete(&self, q: &Qualified, version: Option<&str>, permanent: bool) -> Result<Vec<i32>, ApiError> {
        let targets: Vec<Version> = match version {
            Some(v) => vec![self.version(q, v, permanent).await?],
            None => self.versions(q, permanent).await?,
        };
        let c = self.conn().await?;
        let mut out = Vec::new();
        for v in targets {
            if permanent {
                let soft: bool = c
                    .query_one(
                        "SELECT deleted FROM sluice_registry.versions WHERE ctx = $1 AND subject = $2 AND version = $3",
                        &[&q.ctx, &q.subject, &v.version],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                if !soft {
                    return Err(ApiError::new(
                        404,
                        40405,
                        format!("Subject '{}' Version {} was not deleted first before being permanently deleted", q.display(), v.version),
                    ));
                }
                c.execute(
                    "DELETE FROM sluice_registry.versions WHERE ctx = $1 AND subject = $2 AND version = $3",
                    &[&q.ctx, &q.subject, &v.version],
                )
                .await
                .map_err(db)?;
            } else {
                c.execute(
                    "UPDATE sluice_registry.versions SET deleted = true WHERE ctx = $1 AND subject = $2 AND version = $3",
                    &[&q.ctx, &q.subject, &v.version],
                )
                .await
                .map_err(db)?;
            }
            out.push(v.version);
        }
        Ok(out)
    }

    /// Compatibility of `text` with a version (or all, for transitive modes) of the subject.
    pub async fn test_compat(&self, q: &Qualified, version: &str, text: &str) -> Result<Vec<String>, ApiError> {
        let (schema, _) = parse_avro(text)?;
        let mode = self.compatibility(q).await?;
        let all = match self.versions(q, false).await {
            Ok(v) => v,
            Err(e) if e.code == 40401 => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let olds: Vec<Schema> = if version == "latest" || mode.transitive() {
            all.iter().filter_map(|v| parse_avro(&v.schema).ok().map(|(s, _)| s)).collect()
        } else {
            let v = self.version(q, version, false).await?;
            vec![parse_avro(&v.schema)?.0]
        };
        Ok(compat::check(mode, &schema, &olds))
    }

    pub async fn get_setting(&self, table: &str, q: &Qualified, subject_level: bool) -> Result<Option<String>, ApiError> {
        let c = self.conn().await?;
        let column = if table == "config" { "compatibility" } else { "mode" };
        Self::setting(&*c, table, column, q, subject_level).await
    }

    pub async fn put_setting(&self, table: &str, q: &Qualified, subject_level: bool, value: Option<&str>) -> Result<(), ApiError> {
        let c = self.conn().await?;
        let column = if table == "config" { "compatibility" } else { "mode" };
        let subject = if subject_level { q.subject.as_str() } else { "" };
        match value {
            Some(v) => c
                .execute(
                    &format!(
                        "INSERT INTO sluice_registry.{table} (ctx, subject, {column}) VALUES ($1, $2, $3)
                         ON CONFLICT (ctx, subject) DO UPDATE SET {column} = EXCLUDED.{column}"
                    ),
                    &[&q.ctx, &subject, &v],
                )
                .await
                .map_err(db)?,
            None => c
                .execute(&format!("DELETE FROM sluice_registry.{table} WHERE ctx = $1 AND subject = $2"), &[&q.ctx, &subject])
                .await
                .map_err(db)?,
        };
        Ok(())
    }

    pub async fn contexts(&self) -> Result<Vec<String>, ApiError> {
        let c = self.conn().await?;
        let rows = c.query("SELECT DISTINCT ctx FROM sluice_registry.versions ORDER BY 1", &[]).await.map_err(db)?;
        let mut out: Vec<String> = rows.iter().map(|r| format!(".{}", r.get::<_, String>(0))).collect();
        if !out.contains(&".".to_string()) {
            out.insert(0, ".".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_qualify_subjects() {
        assert_eq!(Qualified::parse(":.acme:orders-value"), Qualified { ctx: "acme".into(), subject: "orders-value".into() });
        assert_eq!(Qualified::parse("orders-value"), Qualified { ctx: String::new(), subject: "orders-value".into() });
        assert_eq!(Qualified::parse(":.acme:x").display(), ":.acme:x");
    }
}
