//! A document definition: a root table plus related tables, turned into the SQL that
//! builds documents in the source, the index mapping, and the reverse dependencies that
//! say which documents a change of any involved table affects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_core::{PgType, ReplicaIdentity, TableName, TableSchema, quote_ident};

use crate::error::SearchError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DocumentSpec {
    /// The root table (`schema.table`): one document per row, id = its primary key.
    pub table: String,
    /// Root columns in the document (default: all).
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Columns indexed as analyzed `text` (with a `.keyword` sub-field) instead of `keyword`.
    #[serde(default)]
    pub text_fields: Vec<String>,
    #[serde(default)]
    pub relations: Vec<RelationSpec>,
    /// Computed counts of a `many` or `many_to_many` relation's rows.
    #[serde(default)]
    pub counts: Vec<CountSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RelationKind {
    /// The root's `column` references `table`'s key (many-to-one / one-to-one).
    One,
    /// `table`'s `column` references the root's key (one-to-many).
    Many,
    /// `through`'s `column` references the root's key, its `through_column` references
    /// `table`'s key.
    ManyToMany,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelationSpec {
    /// The document field holding the related rows.
    pub name: String,
    pub kind: RelationKind,
    pub table: String,
    pub column: String,
    #[serde(default)]
    pub through: Option<String>,
    #[serde(default)]
    pub through_column: Option<String>,
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    #[serde(default)]
    pub text_fields: Vec<String>,
    /// `one`: the related fields become `<name>_<field>` on the root. `many`/`many_to_many`
    /// with a single field: an array of its values instead of objects.
    #[serde(default)]
    pub flatten: bool,
    /// `many`/`many_to_many`: map the array as `nested` (each object matched on its own).
    #[serde(default = "yes")]
    pub nested: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CountSpec {
    pub name: String,
    pub relation: String,
}

/// A column used to find documents, with its SQL type for `= ANY($1::text[]::type[])`.
#[derive(Debug, Clone)]
struct KeyCol {
    index: usize,
    name: String,
    type_name: String,
}

#[derive(Debug, Clone)]
enum Lookup {
    /// The changed row's column values are root ids.
    Direct(KeyCol),
    /// The changed row's key values select root ids with this query.
    Query { key: KeyCol, sql: String },
}

/// A validated document definition.
#[derive(Debug, Clone)]
pub struct DocumentPlan {
    pub root: TableName,
    build_sql: String,
    page_sql: String,
    /// For each involved table, how a change finds the documents it affects.
    lookups: HashMap<TableName, Vec<Lookup>>,
    flatten_one: Vec<String>,
    mapping: Value,
    tables: Vec<TableName>,
}

fn perm(msg: String) -> SearchError {
    SearchError::permanent(msg)
}

fn parse_table(what: &str, s: &str) -> Result<TableName, SearchError> {
    TableName::parse(s).ok_or_else(|| perm(format!("document: {what} `{s}` is not a table name: write schema.table")))
}

fn table<'a>(tables: &'a HashMap<TableName, Arc<TableSchema>>, name: &TableName, what: &str) -> Result<&'a Arc<TableSchema>, SearchError> {
    tables.get(name).ok_or_else(|| perm(format!("document: {what} table {name} was not found in the source: check the name")))
}

fn column(t: &TableSchema, name: &str, what: &str) -> Result<KeyCol, SearchError> {
    let index = t
        .columns
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| perm(format!("document: {what}: table {} has no column `{name}`: check the spelling", t.name)))?;
    Ok(KeyCol { index, name: name.to_owned(), type_name: t.columns[index].type_name.clone() })
}

fn single_key(t: &TableSchema, what: &str) -> Result<KeyCol, SearchError> {
    let keys: Vec<usize> = t.key_indexes().collect();
    if keys.len() != 1 {
        return Err(perm(format!(
            "document: {what} table {} needs a single-column primary key (it has {}): documents and references are found by it",
            t.name,
            keys.len()
        )));
    }
    column(t, &t.columns[keys[0]].name, what)
}

/// A column read from the old row image must be there for deletes and updates.
fn needs_old_image(t: &TableSchema, col: &KeyCol, what: &str) -> Result<(), SearchError> {
    if t.replica_identity == ReplicaIdentity::Full || t.columns[col.index].is_key {
        return Ok(());
    }
    Err(perm(format!(
        "document: {what}: a delete in {} must name its document, but its replica identity sends only the key: run ALTER TABLE {} REPLICA IDENTITY FULL",
        t.name,
        t.name.quoted()
    )))
}

fn es_type(t: &PgType) -> Value {
    match t {
        PgType::Bool => json!({"type": "boolean"}),
        PgType::Int2 | PgType::Int4 => json!({"type": "integer"}),
        PgType::Int8 => json!({"type": "long"}),
        PgType::Numeric | PgType::Float4 | PgType::Float8 => json!({"type": "double"}),
        PgType::Date | PgType::Timestamp | PgType::TimestampTz => json!({"type": "date"}),
        PgType::Json | PgType::Jsonb => json!({"type": "object"}),
        PgType::Array(inner) => es_type(inner),
        _ => json!({"type": "keyword"}),
    }
}

fn selected<'a>(t: &'a TableSchema, fields: &Option<Vec<String>>, what: &str) -> Result<Vec<&'a sluice_core::ColumnSchema>, SearchError> {
    match fields {
        None => Ok(t.columns.iter().collect()),
        Some(names) => names.iter().map(|n| column(t, n, what).map(|k| &t.columns[k.index])).collect(),
    }
}

fn properties(
    cols: &[&sluice_core::ColumnSchema],
    text: &[String],
    t: &TableSchema,
    what: &str,
) -> Result<Map<String, Value>, SearchError> {
    for name in text {
        let c = column(t, name, what)?;
        if !matches!(t.columns[c.index].pg_type, PgType::Text | PgType::Enum | PgType::Array(_)) {
            return Err(perm(format!("document: {what}: text_fields column `{name}` is {}, not text", t.columns[c.index].type_name)));
        }
    }
    Ok(cols
        .iter()
        .map(|c| {
            let m = if text.contains(&c.name) {
                json!({"type": "text", "fields": {"keyword": {"type": "keyword"}}})
            } else {
                es_type(&c.pg_type)
            };
            (c.name.clone(), m)
        })
        .collect())
}

/// `jsonb_build_object('a', t."a", ...)` or `to_jsonb(t)`.
fn object_sql(alias: &str, cols: &[&sluice_core::ColumnSchema], all: bool) -> String {
    if all {
        return format!("to_jsonb({alias})");
    }
    // jsonb_build_object takes at most 100 arguments: 50 columns per call.
    let parts: Vec<String> = cols
        .chunks(50)
        .map(|chunk| {
            let args: Vec<String> =
                chunk.iter().map(|c| format!("'{}', {alias}.{}", c.name.replace('\'', "''"), quote_ident(&c.name))).collect();
            format!("jsonb_build_object({})", args.join(", "))
        })
        .collect();
    parts.join(" || ")
}

/// The root ids (`select` of `table`) of the rows whose `by` is one of `$1`.
fn reverse_sql(select: &KeyCol, table: &TableName, by: &KeyCol) -> String {
    format!(
        "SELECT t.{}::text FROM {} t WHERE t.{} = ANY($1::text[]::{}[])",
        quote_ident(&select.name),
        table.quoted(),
        quote_ident(&by.name),
        by.type_name
    )
}

fn order_by(alias: &str, t: &TableSchema) -> String {
    let keys: Vec<String> = t.key_indexes().map(|i| format!("{alias}.{}", quote_ident(&t.columns[i].name))).collect();
    if keys.is_empty() { String::new() } else { format!(" ORDER BY {}", keys.join(", ")) }
}

impl DocumentPlan {
    /// Checks the definition against the source's tables.
    pub fn new(spec: &DocumentSpec, tables: &HashMap<TableName, Arc<TableSchema>>) -> Result<DocumentPlan, SearchError> {
        let root_name = parse_table("root", &spec.table)?;
        let root = table(tables, &root_name, "root")?;
        let root_key = single_key(root, "root")?;
        let root_cols = selected(root, &spec.fields, "root fields")?;
        let mut props = properties(&root_cols, &spec.text_fields, root, "root text_fields")?;
        let mut parts = vec![object_sql("r", &root_cols, spec.fields.is_none())];
        let mut lookups: HashMap<TableName, Vec<Lookup>> = HashMap::new();
        lookups.entry(root_name.clone()).or_default().push(Lookup::Direct(root_key.clone()));
        let mut involved = vec![root_name.clone()];
        let mut flatten_one = Vec::new();
        // Relation name → the FROM clause counting its rows (None: a `one` relation).
        let mut count_from: BTreeMap<String, Option<String>> = BTreeMap::new();
        let rk = format!("r.{}", quote_ident(&root_key.name));
        for rel in &spec.relations {
            let what = format!("relation `{}`", rel.name);
            if rel.name.is_empty() || props.contains_key(&rel.name) || count_from.contains_key(&rel.name) {
                return Err(perm(format!("document: {what}: the name is empty or already a field of the document: choose another")));
            }
            let tname = parse_table(&what, &rel.table)?;
            let t = table(tables, &tname, &what)?;
            let cols = selected(t, &rel.fields, &what)?;
            let obj = object_sql("t", &cols, rel.fields.is_none());
            let inner = properties(&cols, &rel.text_fields, t, &what)?;
            if rel.kind != RelationKind::ManyToMany && (rel.through.is_some() || rel.through_column.is_some()) {
                return Err(perm(format!("document: {what}: `through` and `through_column` belong to kind many_to_many only")));
            }
            let flat_values = rel.flatten && rel.kind != RelationKind::One;
            if flat_values && cols.len() != 1 {
                return Err(perm(format!(
                    "document: {what}: flatten on a {:?} relation needs exactly one field (an array of its values)",
                    rel.kind
                )));
            }
            let agg_item = if flat_values { format!("t.{}", quote_ident(&cols[0].name)) } else { obj.clone() };
            let array_mapping = |props: Map<String, Value>| -> Value {
                if flat_values {
                    props.into_iter().next().map(|(_, m)| m).unwrap_or(json!({"type": "keyword"}))
                } else {
                    json!({"type": if rel.nested { "nested" } else { "object" }, "properties": props})
                }
            };
            let key = rel.name.replace('\'', "''");
            let from = match rel.kind {
                RelationKind::One => {
                    let fk = column(root, &rel.column, &what)?;
                    let tkey = single_key(t, &what)?;
                    parts.push(format!(
                        "jsonb_build_object('{key}', (SELECT {obj} FROM {} t WHERE t.{} = r.{}))",
                        tname.quoted(),
                        quote_ident(&tkey.name),
                        quote_ident(&fk.name)
                    ));
                    lookups
                        .entry(tname.clone())
                        .or_default()
                        .push(Lookup::Query { key: tkey.clone(), sql: reverse_sql(&root_key, &root_name, &fk) });
                    if rel.flatten {
                        flatten_one.push(rel.name.clone());
                        for (k, v) in inner {
                            props.insert(format!("{}_{k}", rel.name), v);
                        }
                    } else {
                        props.insert(rel.name.clone(), json!({"properties": inner}));
                    }
                    None
                }
                RelationKind::Many => {
                    let fk = column(t, &rel.column, &what)?;
                    needs_old_image(t, &fk, &what)?;
                    parts.push(format!(
                        "jsonb_build_object('{key}', COALESCE((SELECT jsonb_agg({agg_item}{}) FROM {} t WHERE t.{} = {rk}), '[]'::jsonb))",
                        order_by("t", t),
                        tname.quoted(),
                        quote_ident(&fk.name)
                    ));
                    props.insert(rel.name.clone(), array_mapping(inner));
                    let from = format!("FROM {} t WHERE t.{} = {rk}", tname.quoted(), quote_ident(&fk.name));
                    lookups.entry(tname.clone()).or_default().push(Lookup::Direct(fk));
                    Some(from)
                }
                RelationKind::ManyToMany => {
                    let through = parse_table(
                        &what,
                        rel.through
                            .as_deref()
                            .ok_or_else(|| perm(format!("document: {what}: kind many_to_many needs `through` (the join table)")))?,
                    )?;
                    let tc = rel.through_column.as_deref().ok_or_else(|| {
                        perm(format!(
                            "document: {what}: kind many_to_many needs `through_column` (the join table's column referencing {tname})"
                        ))
                    })?;
                    let j = table(tables, &through, &what)?;
                    let jroot = column(j, &rel.column, &what)?;
                    let jt = column(j, tc, &what)?;
                    needs_old_image(j, &jroot, &what)?;
                    let tkey = single_key(t, &what)?;
                    parts.push(format!(
                        "jsonb_build_object('{key}', COALESCE((SELECT jsonb_agg({agg_item}{}) FROM {} j JOIN {} t ON t.{} = j.{} WHERE j.{} = {rk}), '[]'::jsonb))",
                        order_by("t", t),
                        through.quoted(),
                        tname.quoted(),
                        quote_ident(&tkey.name),
                        quote_ident(&jt.name),
                        quote_ident(&jroot.name)
                    ));
                    lookups.entry(through.clone()).or_default().push(Lookup::Direct(jroot.clone()));
                    lookups.entry(tname.clone()).or_default().push(Lookup::Query { key: tkey, sql: reverse_sql(&jroot, &through, &jt) });
                    if !involved.contains(&through) {
                        involved.push(through.clone());
                    }
                    props.insert(rel.name.clone(), array_mapping(inner));
                    Some(format!("FROM {} j WHERE j.{} = {rk}", through.quoted(), quote_ident(&jroot.name)))
                }
            };
            count_from.insert(rel.name.clone(), from);
            if !involved.contains(&tname) {
                involved.push(tname);
            }
        }
        for c in &spec.counts {
            let from = count_from
                .get(&c.relation)
                .ok_or_else(|| perm(format!("document: count `{}`: no relation named `{}`", c.name, c.relation)))?;
            let Some(from) = from.as_ref().filter(|_| !props.contains_key(&c.name)) else {
                return Err(perm(format!(
                    "document: count `{}`: counts need a many or many_to_many relation and a name not already used",
                    c.name
                )));
            };
            parts.push(format!("jsonb_build_object('{}', (SELECT count(*) {from}))", c.name.replace('\'', "''")));
            props.insert(c.name.clone(), json!({"type": "long"}));
        }
        let doc = parts.join(" || ");
        let build_sql = format!(
            "SELECT r.{k}::text, ({doc})::text FROM {root} r WHERE r.{k} = ANY($1::text[]::{ty}[])",
            k = quote_ident(&root_key.name),
            root = root_name.quoted(),
            ty = root_key.type_name
        );
        let page_sql = format!(
            "SELECT r.{k}::text, ({doc})::text FROM {root} r WHERE $1::text IS NULL OR r.{k} > $1::text::{ty} ORDER BY r.{k} LIMIT $2",
            k = quote_ident(&root_key.name),
            root = root_name.quoted(),
            ty = root_key.type_name
        );
        Ok(DocumentPlan {
            root: root_name,
            build_sql,
            page_sql,
            lookups,
            flatten_one,
            mapping: json!({"dynamic": false, "properties": props}),
            tables: involved,
        })
    }

    /// The tables a pipeline must replicate for this document.
    pub fn tables(&self) -> &[TableName] {
        &self.tables
    }

    pub fn mapping(&self) -> &Value {
        &self.mapping
    }

    pub(crate) fn build_sql(&self) -> &str {
        &self.build_sql
    }

    pub(crate) fn page_sql(&self) -> &str {
        &self.page_sql
    }

    /// Applies `flatten` of one-to-one relations to a document built by the SQL.
    pub(crate) fn finish(&self, mut doc: Value) -> Value {
        if let Value::Object(o) = &mut doc {
            for name in &self.flatten_one {
                if let Some(Value::Object(inner)) = o.remove(name) {
                    for (k, v) in inner {
                        o.insert(format!("{name}_{k}"), v);
                    }
                }
            }
        }
        doc
    }

    /// Collects, for one change, the root ids it affects directly and the keys to look
    /// up for the others (`queries`: SQL → key values).
    pub(crate) fn affected(&self, e: &sluice_core::ChangeEvent, direct: &mut Vec<String>, queries: &mut BTreeMap<String, Vec<String>>) {
        let Some(lookups) = self.lookups.get(&e.table.name) else { return };
        let images = [e.before.as_ref(), e.after.as_ref()];
        for l in lookups {
            let (col, target) = match l {
                Lookup::Direct(c) => (c, None),
                Lookup::Query { key, sql } => (key, Some(sql)),
            };
            // Columns are found by name: the event's shape may be newer than the plan's.
            let Some(idx) = e.table.columns.iter().position(|c| c.name == col.name) else { continue };
            for row in images.iter().flatten() {
                if let Some(v) = row.get(idx).and_then(|d| d.as_text()) {
                    let v = String::from_utf8_lossy(v).into_owned();
                    match target {
                        None => direct.push(v),
                        Some(sql) => queries.entry(sql.clone()).or_default().push(v),
                    }
                }
            }
        }
    }

    pub(crate) fn is_root(&self, t: &TableName) -> bool {
        *t == self.root
    }

    /// Whether `t` is one of the tables documents are built from.
    pub(crate) fn involves(&self, t: &TableName) -> bool {
        self.tables.contains(t)
    }
}
