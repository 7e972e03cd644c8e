//! Per-pipeline transforms, the single message transforms Kafka Connect users know:
//! pure and synchronous, checked against each table's schema before anything runs.
//!
//! A [`Chain`] is the validated list of steps. [`Chain::compile`] resolves it against
//! one table shape into a [`TableTransform`]: the output schema (which the sink creates
//! its table, mapping or Avro schema from) and row operations on column indexes, so
//! applying it to an event does no name lookups.

mod cast;
mod expr;
pub mod spec;

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::{ChangeEvent, ColumnSchema, Datum, Lsn, Op, PgType, ReplicaIdentity, Row, TableName, TableSchema, Value};
use cast::CastTo;
pub use spec::Step;
use spec::{Meta, OpName, TsFormat};

/// A step that cannot apply: which step (its index in `transforms` and its kind) and
/// what to change.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("transforms[{index}] ({kind}): {message}")]
pub struct TransformError {
    pub index: usize,
    pub kind: &'static str,
    pub message: String,
}

struct Prepared {
    index: usize,
    step: Step,
    regex: Option<regex::Regex>,
    casts: Vec<(String, CastTo)>,
    expr: Option<Arc<expr::Expr>>,
}

/// A validated transform chain.
pub struct Chain {
    steps: Vec<Prepared>,
    unwrap: bool,
    headers: Vec<(String, String)>,
}

/// Whether `text` matches `pattern`, where `*` is any run of characters and `?` one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Chain {
    /// Checks what can be checked without a table: exclusive options, regexes, cast
    /// types, guards.
    pub fn new(steps: Vec<Step>) -> Result<Self, TransformError> {
        let n = steps.len();
        let unwrap = steps.iter().any(|s| matches!(s, Step::Unwrap(_)));
        let headers = steps
            .iter()
            .filter_map(|s| match s {
                Step::InsertHeader(h) => Some((h.name.clone(), h.value.clone())),
                _ => None,
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for (index, step) in steps.into_iter().enumerate() {
            let err = |message: String| TransformError { index, kind: step.kind(), message };
            let (mut regex, mut casts, mut parsed) = (None, Vec::new(), None);
            if let Some(w) = step.when()
                && !w.ops.is_empty()
                && !matches!(step, Step::Filter(_) | Step::Mask(_))
            {
                return Err(err("when.ops: only filter and mask can depend on the operation (the others change the table's shape, which must be the same for every event)".into()));
            }
            match &step {
                Step::Unwrap(_) if index + 1 != n => {
                    return Err(err("must be the last step (it changes what the sink writes, not the row)".into()));
                }
                Step::Flatten(s) => {
                    for (key, ty) in &s.keys {
                        casts.push((key.clone(), CastTo::parse(ty).map_err(|m| err(format!("key {key:?}: {m}")))?));
                    }
                }
                Step::Compute(c) => {
                    casts.push((c.name.clone(), CastTo::parse(&c.ty).map_err(|m| err(format!("type: {m}")))?));
                    let e = expr::Expr::parse(&c.expr).map_err(err)?;
                    let unknown: Vec<String> = e
                        .node
                        .iter_function_identifiers()
                        .filter(|f| !expr::is_sluice_function(f) && evalexpr_builtin(f).is_none())
                        .map(str::to_string)
                        .collect();
                    if !unknown.is_empty() {
                        return Err(err(format!("expr {:?}: unknown function {}", c.expr, unknown.join(", "))));
                    }
                    parsed = Some(Arc::new(e));
                }
                Step::InsertHeader(h) if h.name.is_empty() => return Err(err("name: must not be empty".into())),
                Step::TimestampConverter(s) => {
                    for (col, f) in &s.fields {
                        let to = match f {
                            TsFormat::UnixMs => CastTo::UnixMs,
                            TsFormat::Iso8601 => CastTo::Iso8601,
                            TsFormat::Date => CastTo::DateOnly,
                        };
                        casts.push((col.clone(), to));
                    }
                }
                Step::InsertField(s) if s.value.is_some() == s.source.is_some() => {
                    return Err(err(format!("field {:?}: give exactly one of value or source", s.name)));
                }
                Step::Cast(s) => {
                    for (col, ty) in &s.fields {
                        casts.push((col.clone(), CastTo::parse(ty).map_err(|m| err(format!("field {col:?}: {m}")))?));
                    }
                }
                Step::Filter(s) => {
                    let n = [s.equals.is_some(), s.not_equals.is_some(), s.one_of.is_some(), s.is_null.is_some()]
                        .iter()
                        .filter(|b| **b)
                        .count();
                    if n != 1 {
                        return Err(err("give exactly one condition: equals, not_equals, in or is_null".into()));
                    }
                }
                Step::Mask(s) if s.replacement.is_some() == s.hash.is_some() => {
                    return Err(err("give exactly one of replacement or hash".into()));
                }
                Step::Route(s) => {
                    regex = Some(regex::Regex::new(&s.regex).map_err(|e| err(format!("regex {:?}: {e}", s.regex)))?);
                }
                Step::CompositeKey(s) if s.fields.is_empty() => return Err(err("fields: list at least one column".into())),
                _ => {}
            }
            out.push(Prepared { index, step, regex, casts, expr: parsed });
        }
        Ok(Self { steps: out, unwrap, headers })
    }

    /// No step changes rows (`unwrap` and `insert_header` change only what the sink
    /// writes around them).
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|p| matches!(p.step, Step::Unwrap(_) | Step::InsertHeader(_)))
    }

    /// Headers every Kafka record carries.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether the sink should write row states instead of change envelopes.
    pub fn unwraps(&self) -> bool {
        self.unwrap
    }

    /// Resolves the chain against one shape of a source table.
    pub fn compile(&self, source: &TableSchema) -> Result<TableTransform, TransformError> {
        let full = source.replica_identity == ReplicaIdentity::Full;
        let source_name = source.name.to_string();
        let mut schema = source.clone();
        let mut ops = Vec::new();
        for p in &self.steps {
            let err = |message: String| TransformError { index: p.index, kind: p.step.kind(), message };
            let when = p.step.when();
            if let Some(w) = when
                && !w.tables.is_empty()
                && !w.tables.iter().any(|pat| glob_match(pat, &source_name))
            {
                continue;
            }
            let guard_ops: Vec<OpName> = when.map(|w| w.ops.clone()).unwrap_or_default();
            let find = |schema: &TableSchema, col: &str| {
                schema.columns.iter().position(|c| c.name == col).ok_or_else(|| {
                    let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
                    err(format!("column {col:?} is not in {} (its columns here: {})", source.name, names.join(", ")))
                })
            };
            let taken = |schema: &TableSchema, col: &str| {
                if schema.columns.iter().any(|c| c.name == col) {
                    Err(err(format!("column {col:?} already exists in {}", source.name)))
                } else {
                    Ok(())
                }
            };
            match &p.step {
                Step::RenameFields(s) => {
                    for (from, to) in &s.fields {
                        let i = find(&schema, from)?;
                        taken(&schema, to)?;
                        schema.columns[i].name = to.clone();
                    }
                }
                Step::DropFields(s) => {
                    let mut drop = Vec::new();
                    for f in &s.fields {
                        let i = find(&schema, f)?;
                        if schema.columns[i].is_key {
                            return Err(err(format!("column {f:?} is part of the key of {} and cannot be dropped", source.name)));
                        }
                        drop.push(i);
                    }
                    let keep: Vec<usize> = (0..schema.columns.len()).filter(|i| !drop.contains(i)).collect();
                    schema.columns = keep.iter().map(|&i| schema.columns[i].clone()).collect();
                    ops.push(RowOp::Select(keep));
                }
                Step::KeepFields(s) => {
                    for f in &s.fields {
                        find(&schema, f)?;
                    }
                    let keep: Vec<usize> = (0..schema.columns.len())
                        .filter(|&i| schema.columns[i].is_key || s.fields.contains(&schema.columns[i].name))
                        .collect();
                    schema.columns = keep.iter().map(|&i| schema.columns[i].clone()).collect();
                    ops.push(RowOp::Select(keep));
                }
                Step::InsertField(s) => {
                    taken(&schema, &s.name)?;
                    let (type_name, pg_type, oid) = match s.source {
                        Some(Meta::CommitTime) => ("timestamp with time zone", PgType::TimestampTz, 1184),
                        _ => ("text", PgType::Text, 25),
                    };
                    schema.columns.push(ColumnSchema::added(&s.name, type_name, pg_type, oid));
                    ops.push(RowOp::Insert(match (&s.value, s.source) {
                        (Some(v), _) => Insert::Static(Bytes::copy_from_slice(v.as_bytes())),
                        (None, Some(m)) => Insert::Meta(m, Bytes::copy_from_slice(source_name.as_bytes())),
                        (None, None) => unreachable!("checked by Chain::new"),
                    }));
                }
                Step::Unwrap(_) | Step::InsertHeader(_) => {}
                Step::Compute(c) => {
                    taken(&schema, &c.name)?;
                    let e = p.expr.clone().expect("parsed by Chain::new");
                    let mut vars = Vec::new();
                    for v in e.variables() {
                        let i = find(&schema, &v)?;
                        vars.push((v, i, schema.columns[i].pg_type.clone()));
                    }
                    let to = p.casts[0].1.clone();
                    let (type_name, pg_type, oid) = to.target();
                    schema.columns.push(ColumnSchema::added(&c.name, &type_name, pg_type, oid));
                    ops.push(RowOp::Compute { expr: e, vars, to, column: c.name.clone() });
                }
                Step::ValueToKey(s) => {
                    let mut idx = Vec::new();
                    for f in &s.fields {
                        let i = find(&schema, f)?;
                        if !schema.columns[i].is_key && !full {
                            return Err(err(format!(
                                "column {f:?} is not in the primary key of {}: a delete carries only the key; use key columns, \
                                 or set REPLICA IDENTITY FULL on the table",
                                source.name
                            )));
                        }
                        idx.push(i);
                    }
                    for (i, c) in schema.columns.iter_mut().enumerate() {
                        c.is_key = idx.contains(&i);
                        c.nullable &= !c.is_key;
                    }
                }
                Step::Flatten(s) => {
                    let i = find(&schema, &s.field)?;
                    if !matches!(schema.columns[i].pg_type, PgType::Json | PgType::Jsonb) {
                        return Err(err(format!("column {:?} is {}, not json or jsonb", s.field, schema.columns[i].type_name)));
                    }
                    let mut keys = Vec::new();
                    for (key, to) in &p.casts {
                        let name = format!("{}{}{key}", s.field, s.separator);
                        taken(&schema, &name)?;
                        let (type_name, pg_type, oid) = to.target();
                        schema.columns.push(ColumnSchema::added(&name, &type_name, pg_type.clone(), oid));
                        keys.push((key.clone(), pg_type, to.clone()));
                    }
                    ops.push(RowOp::Flatten { index: i, keys, column: s.field.clone() });
                    if s.drop {
                        let keep: Vec<usize> = (0..schema.columns.len()).filter(|&k| k != i).collect();
                        schema.columns.remove(i);
                        ops.push(RowOp::Select(keep));
                    }
                }
                Step::Cast(_) | Step::TimestampConverter(_) => {
                    for (col, to) in &p.casts {
                        let i = find(&schema, col)?;
                        let c = &mut schema.columns[i];
                        to.check(&c.pg_type).map_err(|m| err(format!("column {col:?} ({}): {m}", c.type_name)))?;
                        ops.push(RowOp::Cast { index: i, from: c.pg_type.clone(), to: to.clone(), column: col.clone() });
                        let (type_name, pg_type, oid) = to.target();
                        c.type_name = type_name;
                        c.pg_type = pg_type;
                        c.type_oid = oid;
                        c.enum_labels.clear();
                    }
                }
                Step::Filter(s) => {
                    let i = find(&schema, &s.field)?;
                    let cond = match (&s.equals, &s.not_equals, &s.one_of, s.is_null) {
                        (Some(v), ..) => Cond::Equals(v.clone()),
                        (_, Some(v), ..) => Cond::NotEquals(v.clone()),
                        (_, _, Some(vs), _) => Cond::In(vs.clone()),
                        (.., Some(b)) => Cond::IsNull(b),
                        _ => unreachable!("checked by Chain::new"),
                    };
                    ops.push(RowOp::Filter { index: i, cond, ops: guard_ops });
                }
                Step::Mask(s) => {
                    let mut idx = Vec::new();
                    for f in &s.fields {
                        let i = find(&schema, f)?;
                        if schema.columns[i].is_key {
                            return Err(err(format!("column {f:?} is part of the key of {}; masking it would merge rows", source.name)));
                        }
                        // Masked values are text whatever the column was.
                        let c = &mut schema.columns[i];
                        (c.type_name, c.pg_type, c.type_oid) = ("text".into(), PgType::Text, 25);
                        c.enum_labels.clear();
                        idx.push(i);
                    }
                    let with = match (&s.replacement, s.hash) {
                        (Some(r), _) => MaskWith::Fixed(Bytes::copy_from_slice(r.as_bytes())),
                        _ => MaskWith::Sha256,
                    };
                    ops.push(RowOp::Mask { indexes: idx, with, ops: guard_ops });
                }
                Step::Route(s) => {
                    let re = p.regex.as_ref().expect("compiled by Chain::new");
                    let current = schema.name.to_string();
                    let routed = re.replace(&current, s.replacement.as_str()).into_owned();
                    schema.name = TableName::parse(&routed)
                        .filter(|t| !t.schema.is_empty() && !t.name.is_empty())
                        .ok_or_else(|| err(format!("{current} routes to {routed:?}, which is not schema.table")))?;
                }
                Step::CompositeKey(s) => {
                    taken(&schema, &s.name)?;
                    let mut idx = Vec::new();
                    for f in &s.fields {
                        let i = find(&schema, f)?;
                        if !schema.columns[i].is_key && !full {
                            return Err(err(format!(
                                "column {f:?} is not in the primary key of {}: a delete carries only the key, so the composite key \
                                 could not be built for it; use key columns, or set REPLICA IDENTITY FULL on the table",
                                source.name
                            )));
                        }
                        idx.push(i);
                    }
                    for c in &mut schema.columns {
                        c.is_key = false;
                    }
                    let mut key = ColumnSchema::added(&s.name, "text", PgType::Text, 25);
                    (key.is_key, key.nullable) = (true, false);
                    schema.columns.push(key);
                    ops.push(RowOp::Composite { indexes: idx, separator: Bytes::copy_from_slice(s.separator.as_bytes()) });
                }
            }
        }
        Ok(TableTransform { output: Arc::new(schema), ops })
    }
}

enum Insert {
    Static(Bytes),
    /// The fact, and the source table's name for `Meta::Table`.
    Meta(Meta, Bytes),
}

enum Cond {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    IsNull(bool),
}

enum MaskWith {
    Fixed(Bytes),
    Sha256,
}

enum RowOp {
    /// The new row is these columns of the old one, in this order.
    Select(Vec<usize>),
    Insert(Insert),
    Cast {
        index: usize,
        from: PgType,
        to: CastTo,
        column: String,
    },
    Filter {
        index: usize,
        cond: Cond,
        ops: Vec<OpName>,
    },
    Mask {
        indexes: Vec<usize>,
        with: MaskWith,
        ops: Vec<OpName>,
    },
    Composite {
        indexes: Vec<usize>,
        separator: Bytes,
    },
    /// Appends the expression's value, converted to the declared type.
    Compute {
        expr: Arc<expr::Expr>,
        vars: expr::Vars,
        to: CastTo,
        column: String,
    },
    /// Appends one column per key of the json column, in the key's type.
    Flatten {
        index: usize,
        keys: Vec<(String, PgType, CastTo)>,
        column: String,
    },
}

/// Whether evalexpr knows `name` as a built-in function (tried on an empty argument:
/// an unknown function is the only error that says so).
fn evalexpr_builtin(name: &str) -> Option<()> {
    let probe = format!("{name}(1)");
    match evalexpr::eval(&probe) {
        Err(e) if e.to_string().contains(name) && e.to_string().contains("not found") => None,
        Err(evalexpr::EvalexprError::FunctionIdentifierNotFound(_)) => None,
        _ => Some(()),
    }
}

fn op_name(op: Op) -> Option<OpName> {
    match op {
        Op::Read => Some(OpName::Read),
        Op::Insert => Some(OpName::Insert),
        Op::Update => Some(OpName::Update),
        Op::Delete => Some(OpName::Delete),
        Op::Truncate => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A chain resolved against one table shape.
pub struct TableTransform {
    pub output: Arc<TableSchema>,
    ops: Vec<RowOp>,
}

/// Runtime failures (a value the cast cannot convert) carry no step index: the
/// column names it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("transform of column {column}: {message}")]
pub struct ApplyError {
    pub column: String,
    pub message: String,
}

impl TableTransform {
    /// The event in the output shape, or `None` when a filter drops it.
    pub fn apply(&self, e: &ChangeEvent) -> Result<Option<ChangeEvent>, ApplyError> {
        self.apply_owned(e.clone())
    }

    /// As [`apply`](Self::apply), reusing the event's rows.
    pub fn apply_owned(&self, mut e: ChangeEvent) -> Result<Option<ChangeEvent>, ApplyError> {
        if e.op == Op::Truncate || (e.after.is_none() && e.before.is_none()) {
            e.table = self.output.clone();
            return Ok(Some(e));
        }
        // Filters decide on the row the change leaves (or, for a delete, removes).
        let (after, before) = (e.after.take(), e.before.take());
        match after {
            Some(a) => {
                let Some(a) = self.run(a, &e, true)? else { return Ok(None) };
                e.before = match before {
                    Some(b) => self.run(b, &e, false)?,
                    None => None,
                };
                e.after = Some(a);
            }
            None => {
                let b = before.expect("checked above");
                let Some(b) = self.run(b, &e, true)? else { return Ok(None) };
                e.before = Some(b);
            }
        }
        e.table = self.output.clone();
        Ok(Some(e))
    }

    /// As [`apply_owned`](Self::apply_owned), for a sink that keeps one row per key
    /// (`Sink::keeps_rows_by_key`): an update the filters drop becomes a delete of the
    /// row (its old key when the key changed), since the sink may hold it from before;
    /// a delete is never dropped (removing a row the sink does not hold is a no-op). An
    /// update out of the filter arrives as an update, which such sinks upsert.
    pub fn apply_keyed(&self, e: ChangeEvent) -> Result<Option<ChangeEvent>, ApplyError> {
        if !self.ops.iter().any(|o| matches!(o, RowOp::Filter { .. })) {
            return self.apply_owned(e);
        }
        match e.op {
            Op::Update => {
                let image = e.before.clone().or_else(|| e.after.clone());
                let (table, position) = (self.output.clone(), e.position);
                if let Some(out) = self.apply_owned(e)? {
                    return Ok(Some(out));
                }
                let Some(image) = image else { return Ok(None) };
                let probe = ChangeEvent { op: Op::Update, table: table.clone(), before: None, after: None, position };
                let before = self.run(image, &probe, false)?;
                Ok(Some(ChangeEvent { op: Op::Delete, table, before, after: None, position }))
            }
            Op::Delete => {
                let mut e = e;
                if let Some(b) = e.before.take() {
                    e.before = self.run(b, &e, false)?;
                }
                e.table = self.output.clone();
                Ok(Some(e))
            }
            _ => self.apply_owned(e),
        }
    }

    /// A row read by the snapshot (op `r`, at `position`) in the output shape, or
    /// `None` when a filter drops it.
    pub fn apply_read(&self, row: Row, position: crate::SourcePosition) -> Result<Option<Row>, ApplyError> {
        let e = ChangeEvent { op: Op::Read, table: self.output.clone(), before: None, after: None, position };
        self.run(row, &e, true)
    }

    fn run(&self, mut row: Row, e: &ChangeEvent, filters: bool) -> Result<Option<Row>, ApplyError> {
        let op = op_name(e.op);
        let applies = |ops: &[OpName]| ops.is_empty() || op.is_some_and(|o| ops.contains(&o));
        for step in &self.ops {
            match step {
                RowOp::Select(keep) => {
                    let mut old = std::mem::take(&mut row);
                    row = keep.iter().map(|&i| old.get_mut(i).map_or(Datum::Null, std::mem::take)).collect();
                }
                RowOp::Insert(Insert::Static(v)) => row.push(Datum::Text(v.clone())),
                RowOp::Insert(Insert::Meta(m, table)) => row.push(match m {
                    Meta::Lsn => Datum::Text(Bytes::from(lsn_of(e).to_string())),
                    Meta::CommitTime => {
                        Datum::Text(Bytes::from(Value::TimestampTz(e.position.commit_time_us).to_pg_text().unwrap_or_default()))
                    }
                    Meta::Table => Datum::Text(table.clone()),
                    Meta::Op => Datum::Text(Bytes::from(e.op.code().to_string())),
                }),
                RowOp::Cast { index, from, to, column } => {
                    if let Some(Datum::Text(t)) = row.get(*index) {
                        let v = to.apply(from, t).map_err(|message| ApplyError { column: column.clone(), message })?;
                        row[*index] = Datum::Text(v);
                    }
                }
                RowOp::Filter { index, cond, ops } => {
                    if filters && applies(ops) {
                        let text = row.get(*index).and_then(Datum::as_text);
                        let is = |v: &str| text == Some(v.as_bytes());
                        let matched = match cond {
                            Cond::Equals(v) => is(v),
                            Cond::NotEquals(v) => !is(v),
                            Cond::In(vs) => vs.iter().any(|v| is(v)),
                            Cond::IsNull(b) => matches!(row.get(*index), Some(Datum::Null) | None) == *b,
                        };
                        if matched {
                            return Ok(None);
                        }
                    }
                }
                RowOp::Mask { indexes, with, ops } => {
                    if applies(ops) {
                        for &i in indexes {
                            if let Some(Datum::Text(t)) = row.get(i) {
                                row[i] = Datum::Text(match with {
                                    MaskWith::Fixed(r) => r.clone(),
                                    MaskWith::Sha256 => Bytes::from(hex(&Sha256::digest(t))),
                                });
                            }
                        }
                    }
                }
                RowOp::Compute { expr, vars, to, column } => {
                    let fail = |message: String| ApplyError { column: column.clone(), message };
                    let v = match expr.eval(vars, &row).map_err(fail)? {
                        None => Datum::Null,
                        Some(s) => Datum::Text(to.apply(&PgType::Text, s.as_bytes()).map_err(fail)?),
                    };
                    row.push(v);
                }
                RowOp::Flatten { index, keys, column } => {
                    let doc: Option<serde_json::Value> = match row.get(*index) {
                        Some(Datum::Text(t)) => Some(
                            serde_json::from_slice(t)
                                .map_err(|e| ApplyError { column: column.clone(), message: format!("not json: {e}") })?,
                        ),
                        _ => None,
                    };
                    for (key, ty, to) in keys {
                        let v = doc.as_ref().and_then(|d| d.get(key)).filter(|v| !v.is_null());
                        row.push(match v {
                            None => Datum::Null,
                            Some(v) => {
                                let text = match v {
                                    serde_json::Value::String(s) => s.clone(),
                                    serde_json::Value::Bool(b) => if *b { "t" } else { "f" }.to_string(),
                                    other => other.to_string(),
                                };
                                let from = if matches!(v, serde_json::Value::Bool(_)) { PgType::Bool } else { PgType::Text };
                                let out = if *ty == PgType::Text && !matches!(v, serde_json::Value::String(_)) {
                                    Bytes::from(text)
                                } else {
                                    to.apply(&from, text.as_bytes())
                                        .map_err(|message| ApplyError { column: format!("{column}.{key}"), message })?
                                };
                                Datum::Text(out)
                            }
                        });
                    }
                }
                RowOp::Composite { indexes, separator } => {
                    let mut key = Vec::new();
                    for (n, &i) in indexes.iter().enumerate() {
                        if n > 0 {
                            key.extend_from_slice(separator);
                        }
                        key.extend_from_slice(row.get(i).and_then(Datum::as_text).unwrap_or_default());
                    }
                    row.push(Datum::Text(Bytes::from(key)));
                }
            }
        }
        Ok(Some(row))
    }
}

fn lsn_of(e: &ChangeEvent) -> Lsn {
    if e.position.lsn > Lsn::ZERO { e.position.lsn } else { e.position.commit_lsn }
}

#[cfg(test)]
mod tests;
