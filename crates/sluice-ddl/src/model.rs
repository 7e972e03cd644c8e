//! What the checker knows about the schema: the source catalog when given, and the
//! effect of each statement already checked.

use std::collections::HashMap;

use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ConstrType, ObjectType, RangeVar};

use crate::DdlError;

#[derive(Debug, Clone)]
pub struct ColumnModel {
    pub name: String,
    pub type_name: String,
    pub not_null: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TableModel {
    pub replicated: bool,
    pub columns: Vec<ColumnModel>,
    pub primary_key: Vec<String>,
    pub pk_constraint: Option<String>,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub identity_index: Option<String>,
}

impl TableModel {
    pub fn column(&self, name: &str) -> Option<&ColumnModel> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The schema as far as the checker knows it. Without context (`Model::default()`),
/// every table counts as replicated and nothing else is known.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub has_context: bool,
    pub tables: HashMap<(String, String), TableModel>,
}

pub(crate) fn key(rv: &RangeVar) -> (String, String) {
    let schema = if rv.schemaname.is_empty() { "public".to_string() } else { rv.schemaname.clone() };
    (schema, rv.relname.clone())
}

/// The last part of a (possibly qualified) type name, with its modifiers: `varchar(20)`.
pub(crate) fn type_text(t: &pg_query::protobuf::TypeName) -> String {
    let name = t
        .names
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .filter(|s| s != "pg_catalog")
        .collect::<Vec<_>>()
        .join(".");
    let mods: Vec<String> = t
        .typmods
        .iter()
        .filter_map(|m| match &m.node {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Ival(i)) => Some(i.ival.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let arr = if t.array_bounds.is_empty() { "" } else { "[]" };
    if mods.is_empty() { format!("{name}{arr}") } else { format!("{name}({}){arr}", mods.join(",")) }
}

pub(crate) fn column_not_null(def: &pg_query::protobuf::ColumnDef) -> bool {
    def.is_not_null
        || def.constraints.iter().any(|c| {
            matches!(&c.node, Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrNotnull as i32 || c.contype == ConstrType::ConstrPrimary as i32)
        })
}

fn column_from_def(d: &pg_query::protobuf::ColumnDef) -> ColumnModel {
    ColumnModel {
        name: d.colname.clone(),
        type_name: d.type_name.as_ref().map(type_text).unwrap_or_default(),
        not_null: column_not_null(d),
    }
}

impl Model {
    /// The table as a Sluice table schema (for deriving its Avro schema).
    pub fn table_schema(&self, key: &(String, String)) -> Option<sluice_core::TableSchema> {
        let t = self.tables.get(key)?;
        Some(sluice_core::TableSchema {
            name: sluice_core::TableName::new(key.0.clone(), key.1.clone()),
            relid: 0,
            replica_identity: sluice_core::ReplicaIdentity::from_pg(t.replica_identity as u8),
            columns: t
                .columns
                .iter()
                .map(|c| sluice_core::ColumnSchema {
                    name: c.name.clone(),
                    type_oid: 0,
                    type_name: c.type_name.clone(),
                    pg_type: sluice_core::PgType::from_name(&c.type_name),
                    nullable: !c.not_null,
                    is_key: t.primary_key.contains(&c.name),
                    enum_labels: vec![],
                    storage: Default::default(),
                })
                .collect(),
        })
    }

    /// Whether changes to this table reach a pipeline.
    pub fn replicated(&self, rv: &RangeVar) -> bool {
        !self.has_context || self.tables.get(&key(rv)).is_some_and(|t| t.replicated)
    }

    pub fn table(&self, rv: &RangeVar) -> Option<&TableModel> {
        self.tables.get(&key(rv))
    }

    /// Reads tables, columns, keys and replica identities from a source, read-only.
    /// With `publications`, only their tables count as replicated; otherwise every
    /// table in any publication does.
    pub async fn load(client: &tokio_postgres::Client, publications: Option<&[String]>) -> Result<Model, DdlError> {
        let err = |e: tokio_postgres::Error| DdlError::Catalog(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()));
        let mut m = Model { has_context: true, tables: HashMap::new() };
        let cols = client
            .query(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text, a.attname::text,
                        format_type(a.atttypid, a.atttypmod), a.attnotnull
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg_toast%'
                 ORDER BY 1, 2, a.attnum",
                &[],
            )
            .await
            .map_err(err)?;
        for r in &cols {
            let t = m.tables.entry((r.get(0), r.get(1))).or_default();
            t.replica_identity = r.get::<_, String>(2).chars().next().unwrap_or('d');
            t.columns.push(ColumnModel { name: r.get(3), type_name: r.get(4), not_null: r.get(5) });
        }
        let pks = client
            .query(
                "SELECT n.nspname::text, c.relname::text, con.conname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.ord)
                 FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE con.contype = 'p'",
                &[],
            )
            .await
            .map_err(err)?;
        for r in &pks {
            if let Some(t) = m.tables.get_mut(&(r.get(0), r.get(1))) {
                t.pk_constraint = Some(r.get(2));
                t.primary_key = r.get(3);
            }
        }
        let idents = client
            .query(
                "SELECT n.nspname::text, c.relname::text, ic.relname::text FROM pg_index i
                 JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.indisreplident",
                &[],
            )
            .await
            .map_err(err)?;
        for r in &idents {
            if let Some(t) = m.tables.get_mut(&(r.get(0), r.get(1))) {
                t.identity_index = Some(r.get(2));
            }
        }
        let published =
            client.query("SELECT schemaname::text, tablename::text, pubname::text FROM pg_publication_tables", &[]).await.map_err(err)?;
        for r in &published {
            let pubname: String = r.get(2);
            if publications.is_none_or(|p| p.contains(&pubname))
                && let Some(t) = m.tables.get_mut(&(r.get(0), r.get(1)))
            {
                t.replicated = true;
            }
        }
        Ok(m)
    }

    /// Applies a statement's effect, so later statements are checked against it.
    pub(crate) fn apply(&mut self, node: &NodeEnum) {
        match node {
            NodeEnum::CreateStmt(c) => {
                let Some(rv) = &c.relation else { return };
                let mut t = TableModel { replica_identity: 'd', ..Default::default() };
                for e in &c.table_elts {
                    match &e.node {
                        Some(NodeEnum::ColumnDef(d)) => {
                            t.columns.push(column_from_def(d));
                            if d.constraints
                                .iter()
                                .any(|c| matches!(&c.node, Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrPrimary as i32))
                            {
                                t.primary_key = vec![d.colname.clone()];
                                t.pk_constraint = Some(format!("{}_pkey", rv.relname));
                            }
                        }
                        Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrPrimary as i32 => {
                            t.primary_key = names(&c.keys);
                            t.pk_constraint = Some(if c.conname.is_empty() { format!("{}_pkey", rv.relname) } else { c.conname.clone() });
                        }
                        _ => {}
                    }
                }
                // A new table is not replicated until a publication takes it.
                self.tables.insert(key(rv), t);
            }
            NodeEnum::AlterTableStmt(a) => {
                let Some(rv) = &a.relation else { return };
                let Some(t) = self.tables.get_mut(&key(rv)) else { return };
                for cmd in &a.cmds {
                    let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else { continue };
                    let col = cmd.name.clone();
                    match AlterTableType::try_from(cmd.subtype) {
                        Ok(AlterTableType::AtAddColumn) => {
                            if let Some(NodeEnum::ColumnDef(d)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
                                t.columns.push(column_from_def(d));
                            }
                        }
                        Ok(AlterTableType::AtDropColumn) => t.columns.retain(|c| c.name != col),
                        Ok(AlterTableType::AtSetNotNull) => t.columns.iter_mut().filter(|c| c.name == col).for_each(|c| c.not_null = true),
                        Ok(AlterTableType::AtDropNotNull) => {
                            t.columns.iter_mut().filter(|c| c.name == col).for_each(|c| c.not_null = false)
                        }
                        Ok(AlterTableType::AtAlterColumnType) => {
                            if let Some(NodeEnum::ColumnDef(d)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
                                let ty = d.type_name.as_ref().map(type_text).unwrap_or_default();
                                t.columns.iter_mut().filter(|c| c.name == col).for_each(|c| c.type_name = ty.clone());
                            }
                        }
                        Ok(AlterTableType::AtDropConstraint) if t.pk_constraint.as_deref() == Some(col.as_str()) => {
                            t.pk_constraint = None;
                            t.primary_key.clear();
                        }
                        Ok(AlterTableType::AtReplicaIdentity) => {
                            if let Some(NodeEnum::ReplicaIdentityStmt(r)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
                                t.replica_identity = r.identity_type.chars().next().unwrap_or('d');
                            }
                        }
                        _ => {}
                    }
                }
            }
            NodeEnum::RenameStmt(r) => {
                let Some(rv) = &r.relation else { return };
                match ObjectType::try_from(r.rename_type) {
                    Ok(ObjectType::ObjectColumn) => {
                        if let Some(t) = self.tables.get_mut(&key(rv)) {
                            t.columns.iter_mut().filter(|c| c.name == r.subname).for_each(|c| c.name = r.newname.clone());
                        }
                    }
                    Ok(ObjectType::ObjectTable) => {
                        if let Some(t) = self.tables.remove(&key(rv)) {
                            self.tables.insert((key(rv).0, r.newname.clone()), t);
                        }
                    }
                    _ => {}
                }
            }
            NodeEnum::DropStmt(d) if d.remove_type == ObjectType::ObjectTable as i32 => {
                for o in &d.objects {
                    if let Some(NodeEnum::List(l)) = &o.node {
                        let parts = names(&l.items);
                        let k = match parts.as_slice() {
                            [s, n] => (s.clone(), n.clone()),
                            [n] => ("public".to_string(), n.clone()),
                            _ => continue,
                        };
                        self.tables.remove(&k);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The string values of a list of `String` nodes.
pub(crate) fn names(nodes: &[pg_query::protobuf::Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}
