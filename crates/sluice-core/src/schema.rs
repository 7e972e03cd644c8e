use std::fmt;

use crate::PgType;

/// A schema-qualified table name, kept unquoted; quote with [`TableName::quoted`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self { schema: schema.into(), name: name.into() }
    }

    /// Parses `schema.table` or `table` (schema `public`). Names are taken literally:
    /// a dot inside a name is not supported here.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (schema, name) = s.split_once('.').unwrap_or(("public", s));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return None;
        }
        Some(Self::new(schema, name))
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier, doubling embedded quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal, doubling embedded quotes, for the few statements that
/// take no parameters (`CREATE ROLE ... PASSWORD`, `DO` blocks). Postgres runs with
/// `standard_conforming_strings` on (the default since 9.1), so backslashes are plain.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_pg(c: u8) -> Self {
        match c {
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            _ => Self::Default,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSchema {
    pub name: String,
    pub type_oid: u32,
    /// The type as Postgres prints it with its modifier (`numeric(10,2)`, `text[]`).
    pub type_name: String,
    pub pg_type: PgType,
    pub nullable: bool,
    /// Part of the key the sink upserts by (the primary key, or the replica-identity index).
    pub is_key: bool,
    /// The labels of an enum type (or of an array of enums), in order; empty otherwise.
    pub enum_labels: Vec<String>,
    /// How the source stores the column, where it chose differently from the type's default.
    pub storage: ColumnStorage,
}

impl ColumnSchema {
    /// A nullable, non-key column that Sluice adds (a transform's or an enricher's
    /// output, a column added to a source table after start): no enum labels, the
    /// type's default storage.
    pub fn added(name: impl Into<String>, type_name: impl Into<String>, pg_type: PgType, type_oid: u32) -> Self {
        ColumnSchema {
            name: name.into(),
            type_oid,
            type_name: type_name.into(),
            pg_type,
            nullable: true,
            is_key: false,
            enum_labels: vec![],
            storage: ColumnStorage::default(),
        }
    }
}

/// A column's storage and compression as set on the source (`ALTER COLUMN .. SET
/// STORAGE`, `SET COMPRESSION`), so a table Sluice creates in a Postgres target stores
/// its values the same way: a `PLAIN` column is not compressed on every write there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ColumnStorage {
    /// `PLAIN`, `EXTERNAL`, `MAIN` or `EXTENDED`; `None` for the type's default.
    pub storage: Option<&'static str>,
    /// `pglz` or `lz4`; `None` for the server's default.
    pub compression: Option<&'static str>,
}

impl ColumnStorage {
    /// From `pg_attribute.attstorage` (when it differs from the type's) and
    /// `attcompression`; letters Postgres does not define are ignored.
    pub fn from_pg(storage: Option<&str>, compression: Option<&str>) -> Self {
        let storage = match storage {
            Some("p") => Some("PLAIN"),
            Some("e") => Some("EXTERNAL"),
            Some("m") => Some("MAIN"),
            Some("x") => Some("EXTENDED"),
            _ => None,
        };
        let compression = match compression {
            Some("p") => Some("pglz"),
            Some("l") => Some("lz4"),
            _ => None,
        };
        ColumnStorage { storage, compression }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: TableName,
    pub relid: u32,
    pub columns: Vec<ColumnSchema>,
    pub replica_identity: ReplicaIdentity,
}

impl TableSchema {
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i)
    }

    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.is_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_quotes_names() {
        let t = TableName::parse("app.Order\"s").unwrap();
        assert_eq!(t.quoted(), "\"app\".\"Order\"\"s\"");
        assert_eq!(TableName::parse("users").unwrap(), TableName::new("public", "users"));
        assert!(TableName::parse("a.b.c").is_none());
        assert!(TableName::parse(".x").is_none());
    }
}
