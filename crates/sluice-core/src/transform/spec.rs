//! The transform chain as users write it in a pipeline's YAML: an ordered list of
//! steps, each a one-key map naming the step, with an optional `when` guard.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Step {
    /// Rename columns: `{fields: {old: new}}`.
    RenameFields(RenameFields),
    /// Drop columns (never key columns).
    DropFields(FieldList),
    /// Keep only these columns (and the key).
    KeepFields(FieldList),
    /// Add a column with a fixed value or a fact about the change.
    InsertField(InsertField),
    /// Change column types: `{fields: {price: "decimal(10,2)", qty: int}}`.
    Cast(Cast),
    /// Drop the events whose row matches the condition.
    Filter(Filter),
    /// Replace column values with a fixed string or their SHA-256.
    Mask(Mask),
    /// Rename the table (and so the target table or topic): a regex over
    /// `schema.table` with `$1`-style captures in the replacement.
    Route(Route),
    /// Make the key one column: the key fields joined by a separator.
    CompositeKey(CompositeKey),
    /// A column computed from the row by an expression.
    Compute(Compute),
    /// Make these columns the key (Kafka Connect's ValueToKey).
    ValueToKey(FieldList),
    /// Lift keys of a json/jsonb column into columns `<field><separator><key>`.
    Flatten(Flatten),
    /// A fixed header on every Kafka record.
    InsertHeader(InsertHeader),
    /// Timestamps and dates as epoch milliseconds, ISO 8601 text or a date.
    TimestampConverter(TimestampConverter),
    /// Records carry the new row state instead of the change envelope (Debezium's
    /// ExtractNewRecordState); a delete is a tombstone. Sinks with an envelope only.
    Unwrap(Unwrap),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    pub name: String,
    pub expr: String,
    /// `string`, `int`, `float`, `bool` or `decimal(p,s)`.
    #[serde(rename = "type")]
    pub ty: String,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flatten {
    pub field: String,
    /// The keys to lift and their types (`string`, `int`, `float`, `bool`): a table's
    /// columns are fixed, a json value's keys are not.
    pub keys: BTreeMap<String, String>,
    #[serde(default = "default_flatten_separator")]
    pub separator: String,
    /// Drop the json column once flattened.
    #[serde(default)]
    pub drop: bool,
    pub when: Option<When>,
}

fn default_flatten_separator() -> String {
    "_".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsertHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TsFormat {
    UnixMs,
    Iso8601,
    Date,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampConverter {
    pub fields: BTreeMap<String, TsFormat>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unwrap {}

/// Which events a step applies to. Table patterns match the source `schema.table`
/// with `*` and `?`; `ops` only for steps that keep the table's shape (filter, mask).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub ops: Vec<OpName>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpName {
    Read,
    Insert,
    Update,
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameFields {
    pub fields: BTreeMap<String, String>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldList {
    pub fields: Vec<String>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Meta {
    /// The change's LSN, as Postgres prints it (`0/16B3748`).
    Lsn,
    /// The source transaction's commit time (timestamptz).
    CommitTime,
    /// The source table, `schema.table`.
    Table,
    /// Debezium's op letter: r, c, u, d.
    Op,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsertField {
    pub name: String,
    /// A fixed text value.
    pub value: Option<String>,
    /// A fact about the change instead of a fixed value.
    pub source: Option<Meta>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cast {
    /// Column → `string`, `int`, `float`, `bool` or `decimal(precision,scale)`.
    pub fields: BTreeMap<String, String>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub field: String,
    /// Exactly one condition, compared with the column's text.
    pub equals: Option<String>,
    pub not_equals: Option<String>,
    #[serde(rename = "in")]
    pub one_of: Option<Vec<String>>,
    pub is_null: Option<bool>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashAlg {
    Sha256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mask {
    pub fields: Vec<String>,
    /// Exactly one of: a fixed replacement, or a hash of the value.
    pub replacement: Option<String>,
    pub hash: Option<HashAlg>,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub regex: String,
    pub replacement: String,
    pub when: Option<When>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeKey {
    pub fields: Vec<String>,
    #[serde(default = "default_separator")]
    pub separator: String,
    pub name: String,
    pub when: Option<When>,
}

fn default_separator() -> String {
    ":".into()
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::RenameFields(_) => "rename_fields",
            Step::DropFields(_) => "drop_fields",
            Step::KeepFields(_) => "keep_fields",
            Step::InsertField(_) => "insert_field",
            Step::Cast(_) => "cast",
            Step::Filter(_) => "filter",
            Step::Mask(_) => "mask",
            Step::Route(_) => "route",
            Step::CompositeKey(_) => "composite_key",
            Step::TimestampConverter(_) => "timestamp_converter",
            Step::ValueToKey(_) => "value_to_key",
            Step::Compute(_) => "compute",
            Step::Flatten(_) => "flatten",
            Step::InsertHeader(_) => "insert_header",
            Step::Unwrap(_) => "unwrap",
        }
    }

    pub fn when(&self) -> Option<&When> {
        match self {
            Step::RenameFields(s) => s.when.as_ref(),
            Step::DropFields(s) | Step::KeepFields(s) | Step::ValueToKey(s) => s.when.as_ref(),
            Step::Flatten(s) => s.when.as_ref(),
            Step::Compute(s) => s.when.as_ref(),
            Step::InsertHeader(_) => None,
            Step::InsertField(s) => s.when.as_ref(),
            Step::Cast(s) => s.when.as_ref(),
            Step::Filter(s) => s.when.as_ref(),
            Step::Mask(s) => s.when.as_ref(),
            Step::Route(s) => s.when.as_ref(),
            Step::CompositeKey(s) => s.when.as_ref(),
            Step::TimestampConverter(s) => s.when.as_ref(),
            Step::Unwrap(_) => None,
        }
    }
}
