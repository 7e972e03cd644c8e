//! DDL capture: an event trigger in the source writes every `ALTER TABLE` on a
//! published table (and every `ALTER PUBLICATION`) into the WAL as a transactional
//! logical message, so the stream sees each schema change in commit order, with its
//! statement and the table's shape before and after.
//!
//! Why a shape before: pgoutput's Relation message gives only the new columns, so a
//! rename looks like a drop and an add, and the sink would lose the column's data. The
//! trigger keeps each published table's last shape (`sluice_ddl.shapes`, by attribute
//! number) and sends both, so renames and type changes are told apart exactly.
//!
//! One trigger serves every pipeline of a database; `sluice_ddl.users` counts them, and
//! the last one to leave removes it. Creating an event trigger needs a superuser: the
//! control plane installs it with its admin connection while provisioning; `sluice run`
//! tries and, when it may not, warns and goes on with added columns only.

use std::collections::HashMap;

use serde::Deserialize;
use sluice_core::TableName;
use sluice_core::ddl::{ColumnChange, is_constant_default};
use tokio_postgres::Client;

use crate::error::{PgError, Result};

/// The prefix of the DDL messages.
pub const DDL_PREFIX: &str = "sluice.ddl";

/// Changes when the SQL below changes: an older installation is replaced.
const VERSION: &str = "sluice ddl capture v4";

const INSTALL_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS sluice_ddl;
REVOKE ALL ON SCHEMA sluice_ddl FROM PUBLIC;
CREATE TABLE IF NOT EXISTS sluice_ddl.shapes (relid oid PRIMARY KEY, schema_name text NOT NULL, table_name text NOT NULL, columns jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_ddl.users (pipeline text PRIMARY KEY);
CREATE OR REPLACE FUNCTION sluice_ddl.shape(rel oid) RETURNS jsonb LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
      'attnum', a.attnum, 'name', a.attname, 'type_oid', a.atttypid::int8, 'typmod', a.atttypmod,
      'type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull,
      'default', pg_get_expr(d.adbin, d.adrelid),
      'is_key', EXISTS (SELECT FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary AND a.attnum = ANY (i.indkey::int2[])))
    ORDER BY a.attnum), '[]'::jsonb)
  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
$f$;
CREATE OR REPLACE FUNCTION sluice_ddl.remember(rel oid) RETURNS void LANGUAGE sql SET search_path = pg_catalog AS $f$
  INSERT INTO sluice_ddl.shapes
  SELECT c.oid, n.nspname, c.relname, sluice_ddl.shape(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
  ON CONFLICT (relid) DO UPDATE SET schema_name = excluded.schema_name, table_name = excluded.table_name, columns = excluded.columns
$f$;
CREATE OR REPLACE FUNCTION sluice_ddl.published() RETURNS SETOF oid LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
  SELECT DISTINCT c.oid FROM pg_publication_tables pt
  JOIN pg_namespace n ON n.nspname = pt.schemaname JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
$f$;
-- Whether a table is in any publication, from the catalogs for that one table (the
-- pg_publication_tables view lists every table of every publication: 3x slower here).
CREATE OR REPLACE FUNCTION sluice_ddl.is_published(rel oid) RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
  SELECT EXISTS (SELECT FROM pg_publication_rel WHERE prrelid = rel)
      OR EXISTS (SELECT FROM pg_publication WHERE puballtables)
      OR EXISTS (SELECT FROM pg_publication_namespace pn JOIN pg_class c ON c.relnamespace = pn.pnnspid WHERE c.oid = rel)
$f$;
CREATE OR REPLACE FUNCTION sluice_ddl.capture() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  r record;
  prior record;
  had_prior boolean;
  nsp text;
  rel text;
  shape jsonb;
  publication_done boolean := false;
  statement text := left(current_query(), 8000);
BEGIN
  -- A column rename reports a 'table column', a constraint a 'table constraint': every
  -- row naming a pg_class object counts, once per table.
  FOR r IN SELECT DISTINCT c.objid, c.command_tag FROM pg_event_trigger_ddl_commands() c
           WHERE c.command_tag = 'ALTER PUBLICATION' OR c.classid = 'pg_class'::regclass LOOP
    IF r.command_tag = 'ALTER PUBLICATION' THEN
      IF NOT publication_done THEN
        publication_done := true;
        PERFORM sluice_ddl.remember(p) FROM sluice_ddl.published() p;
        -- The tables each publication has from here on, read in this transaction: a
        -- pipeline reading the catalog when the message arrives could still see the
        -- state before this commit.
        PERFORM pg_logical_emit_message(true, 'sluice.ddl', jsonb_build_object('tag', r.command_tag, 'statement', statement,
          'publications', (SELECT coalesce(jsonb_object_agg(pubname, tables), '{}'::jsonb) FROM (
             SELECT p.pubname, coalesce(jsonb_agg(jsonb_build_array(pt.schemaname, pt.tablename)) FILTER (WHERE pt.tablename IS NOT NULL), '[]'::jsonb) AS tables
             FROM pg_publication p LEFT JOIN pg_publication_tables pt ON pt.pubname = p.pubname GROUP BY p.pubname) x))::text);
      END IF;
    ELSIF sluice_ddl.is_published(r.objid) THEN
      SELECT * INTO prior FROM sluice_ddl.shapes WHERE relid = r.objid;
      had_prior := FOUND;
      SELECT n.nspname, c.relname INTO nsp, rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = r.objid;
      shape := sluice_ddl.shape(r.objid);
      PERFORM pg_logical_emit_message(true, 'sluice.ddl', jsonb_build_object(
        'tag', r.command_tag, 'statement', statement, 'relid', r.objid::int8, 'schema', nsp, 'table', rel,
        'before', CASE WHEN had_prior THEN jsonb_build_object('schema', prior.schema_name, 'table', prior.table_name, 'columns', prior.columns) END,
        'after', shape)::text);
      INSERT INTO sluice_ddl.shapes VALUES (r.objid, nsp, rel, shape)
      ON CONFLICT (relid) DO UPDATE SET schema_name = excluded.schema_name, table_name = excluded.table_name, columns = excluded.columns;
    END IF;
  END LOOP;
END
$f$;
DROP EVENT TRIGGER IF EXISTS sluice_ddl_capture;
CREATE EVENT TRIGGER sluice_ddl_capture ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'ALTER PUBLICATION')
  EXECUTE FUNCTION sluice_ddl.capture();
"#;

/// Installs (or updates) the event trigger and registers `pipeline` as one of its
/// users. Returns `Ok(false)` when the role may not create event triggers (a
/// superuser must), leaving nothing behind.
pub async fn install(c: &Client, pipeline: &str) -> Result<bool> {
    let err = |e| PgError::from_pg("installing DDL capture in the source", e);
    let superuser: bool = c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await.map_err(err)?.get(0);
    if !superuser {
        let installed: bool = c
            .query_one("SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'sluice_ddl_capture')", &[])
            .await
            .map_err(err)?
            .get(0);
        return Ok(installed);
    }
    crate::in_transaction(c, async {
        // Pipelines starting together install once each, in turn.
        c.execute("SELECT pg_advisory_xact_lock(hashtext('sluice_ddl'))", &[]).await?;
        let current: Option<String> = c.query_one("SELECT obj_description(to_regproc('sluice_ddl.capture'), 'pg_proc')", &[]).await?.get(0);
        if current.as_deref() != Some(VERSION) {
            c.batch_execute(INSTALL_SQL).await?;
            c.batch_execute(&format!("COMMENT ON FUNCTION sluice_ddl.capture() IS '{VERSION}'")).await?;
        }
        // The shapes the next statement is compared with: the tables as they are now.
        c.execute("SELECT sluice_ddl.remember(p) FROM sluice_ddl.published() p", &[]).await?;
        c.execute("INSERT INTO sluice_ddl.users VALUES ($1) ON CONFLICT DO NOTHING", &[&pipeline]).await
    })
    .await
    .map_err(err)?;
    Ok(true)
}

/// Unregisters `pipeline`; the last user removes the trigger and its schema.
pub async fn remove(c: &Client, pipeline: &str) -> Result<()> {
    let err = |e| PgError::from_pg("removing DDL capture from the source", e);
    let exists: bool = c.query_one("SELECT to_regclass('sluice_ddl.users') IS NOT NULL", &[]).await.map_err(err)?.get(0);
    if !exists {
        return Ok(());
    }
    crate::in_transaction(c, async {
        c.execute("SELECT pg_advisory_xact_lock(hashtext('sluice_ddl'))", &[]).await?;
        c.execute("DELETE FROM sluice_ddl.users WHERE pipeline = $1", &[&pipeline]).await?;
        let left: i64 = c.query_one("SELECT count(*) FROM sluice_ddl.users", &[]).await?.get(0);
        if left == 0 {
            c.batch_execute("DROP EVENT TRIGGER IF EXISTS sluice_ddl_capture; DROP SCHEMA sluice_ddl CASCADE").await?;
        }
        Ok(())
    })
    .await
    .map_err(err)
}

/// A DDL message as the trigger writes it.
#[derive(Debug, Deserialize)]
pub(crate) struct DdlMessage {
    pub tag: String,
    pub statement: String,
    pub relid: Option<u32>,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub before: Option<Shape>,
    #[serde(default)]
    pub after: Vec<DdlColumn>,
    /// `ALTER PUBLICATION`: every publication's tables after the statement.
    #[serde(default)]
    pub publications: HashMap<String, Vec<(String, String)>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Shape {
    pub schema: String,
    pub table: String,
    pub columns: Vec<DdlColumn>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DdlColumn {
    pub attnum: i16,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    #[serde(rename = "type")]
    pub type_name: String,
    pub not_null: bool,
    pub default: Option<String>,
    pub is_key: bool,
}

impl DdlMessage {
    pub(crate) fn parse(content: &[u8]) -> Result<Self> {
        serde_json::from_slice(content).map_err(|e| PgError::protocol(format!("a DDL capture message could not be read: {e}")))
    }

    pub(crate) fn table(&self) -> Option<TableName> {
        Some(TableName::new(self.schema.clone()?, self.table.clone()?))
    }
}

impl Shape {
    pub(crate) fn name(&self) -> TableName {
        TableName::new(self.schema.clone(), self.table.clone())
    }
}

/// The statement itself out of the query string the trigger saw, which holds every
/// statement sent together (`ALTER ..; INSERT .. VALUES (..)`): the others can carry row
/// values, which never reach a log. The first statement starting with `tag` that names
/// `table`, else the first starting with `tag`.
pub(crate) fn statement_of(query: &str, tag: &str, table: Option<&str>) -> String {
    let (mut parts, mut start, mut quote) = (Vec::new(), 0, None);
    for (i, c) in query.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            (';', None) => {
                parts.push(&query[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&query[start..]);
    let tag = tag.to_ascii_lowercase();
    let words = |p: &str| p.split_whitespace().collect::<Vec<_>>().join(" ");
    let candidates: Vec<String> = parts.iter().map(|p| words(p)).filter(|p| p.to_ascii_lowercase().starts_with(&tag)).collect();
    let named = table.and_then(|t| candidates.iter().find(|p| p.to_ascii_lowercase().contains(&t.to_ascii_lowercase())));
    named.or(candidates.first()).cloned().unwrap_or_else(|| format!("({tag} statement)"))
}

/// The column changes from `before` to `after`, matched by attribute number (so a
/// rename is a rename), and whether existing rows took values the log does not carry.
pub(crate) fn diff(before: &[DdlColumn], after: &[DdlColumn]) -> (Vec<ColumnChange>, bool) {
    let old: HashMap<i16, &DdlColumn> = before.iter().map(|c| (c.attnum, c)).collect();
    let mut out = Vec::new();
    let mut resync = false;
    for b in before {
        if !after.iter().any(|a| a.attnum == b.attnum) {
            out.push(ColumnChange::Dropped { name: b.name.clone() });
        }
    }
    for a in after {
        let Some(b) = old.get(&a.attnum) else {
            resync |= a.default.as_deref().is_some_and(|d| !is_constant_default(d));
            out.push(ColumnChange::Added { name: a.name.clone(), default: a.default.clone() });
            continue;
        };
        if b.name != a.name {
            out.push(ColumnChange::Renamed { from: b.name.clone(), to: a.name.clone() });
        }
        if b.type_oid != a.type_oid || b.typmod != a.typmod {
            out.push(ColumnChange::Retyped { name: a.name.clone(), from: b.type_name.clone(), to: a.type_name.clone() });
        }
        if b.not_null != a.not_null {
            out.push(ColumnChange::Nullability { name: a.name.clone(), not_null: a.not_null });
        }
        if b.default != a.default {
            out.push(ColumnChange::Default { name: a.name.clone(), default: a.default.clone() });
        }
    }
    (out, resync)
}

/// Without a recorded shape before (the trigger was installed after the table's last
/// change): the columns matched by name against the shape the stream knew.
pub(crate) fn diff_by_name(before: &[(String, u32)], after: &[DdlColumn]) -> Vec<ColumnChange> {
    let mut out: Vec<ColumnChange> = before
        .iter()
        .filter(|(n, _)| !after.iter().any(|a| &a.name == n))
        .map(|(n, _)| ColumnChange::Dropped { name: n.clone() })
        .collect();
    for a in after {
        match before.iter().find(|(n, _)| *n == a.name) {
            None => out.push(ColumnChange::Added { name: a.name.clone(), default: a.default.clone() }),
            Some((_, oid)) if *oid != a.type_oid => {
                out.push(ColumnChange::Retyped { name: a.name.clone(), from: String::new(), to: a.type_name.clone() })
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(attnum: i16, name: &str, ty: u32, default: Option<&str>) -> DdlColumn {
        DdlColumn {
            attnum,
            name: name.into(),
            type_oid: ty,
            typmod: -1,
            type_name: if ty == 23 { "integer".into() } else { "bigint".into() },
            not_null: false,
            default: default.map(Into::into),
            is_key: false,
        }
    }

    #[test]
    fn the_statement_is_cut_out_of_what_was_sent_with_it() {
        let q = "ALTER TABLE ev ALTER COLUMN n TYPE int4; INSERT INTO ev VALUES (3, 'a;b');\n ALTER TABLE other ADD c int";
        assert_eq!(statement_of(q, "ALTER TABLE", Some("ev")), "ALTER TABLE ev ALTER COLUMN n TYPE int4");
        assert_eq!(statement_of(q, "ALTER TABLE", Some("other")), "ALTER TABLE other ADD c int");
        assert_eq!(statement_of("INSERT INTO t VALUES ('secret')", "ALTER TABLE", None), "(alter table statement)");
    }

    #[test]
    fn attribute_numbers_tell_a_rename_from_a_drop_and_an_add() {
        let before = [col(1, "id", 23, None), col(2, "name", 23, None), col(3, "qty", 23, None), col(4, "gone", 23, None)];
        let after = [col(1, "id", 23, None), col(2, "title", 23, None), col(3, "qty", 20, None), col(5, "at", 20, Some("now()"))];
        let (changes, resync) = diff(&before, &after);
        assert_eq!(
            changes,
            vec![
                ColumnChange::Dropped { name: "gone".into() },
                ColumnChange::Renamed { from: "name".into(), to: "title".into() },
                ColumnChange::Retyped { name: "qty".into(), from: "integer".into(), to: "bigint".into() },
                ColumnChange::Added { name: "at".into(), default: Some("now()".into()) },
            ]
        );
        assert!(resync, "a volatile default filled existing rows the log never carried");
        let (_, resync) = diff(&before[..1], &[col(1, "id", 23, None), col(2, "c", 23, Some("'x'::text"))]);
        assert!(!resync);
    }
}
