//! Postgres columns as Iceberg fields, and rows (Postgres's text form) as Arrow record
//! batches for the Parquet writer.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef as ArrowSchemaRef;
use iceberg::spec::{PrimitiveType, Type};
use sluice_core::{ColumnSchema, Datum, PgType, Value};

/// How one column is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int,
    Long,
    Float,
    Double,
    Decimal { precision: u32, scale: u32 },
    Date,
    Timestamp,
    TimestampTz,
    String,
    Binary,
}

impl Kind {
    /// The Iceberg type for a Postgres column. Types Iceberg has no exact match for
    /// (unbounded numeric, uuid, json, arrays, intervals, ...) are kept as their exact
    /// text, so no value is ever lost or rounded.
    pub(crate) fn of(c: &ColumnSchema) -> Kind {
        match &c.pg_type {
            PgType::Bool => Kind::Bool,
            PgType::Int2 | PgType::Int4 => Kind::Int,
            PgType::Int8 => Kind::Long,
            PgType::Float4 => Kind::Float,
            PgType::Float8 => Kind::Double,
            PgType::Numeric => numeric_modifier(&c.type_name)
                .filter(|&(p, s)| p <= 38 && s <= p)
                .map_or(Kind::String, |(precision, scale)| Kind::Decimal { precision, scale }),
            PgType::Date => Kind::Date,
            PgType::Timestamp => Kind::Timestamp,
            PgType::TimestampTz => Kind::TimestampTz,
            PgType::Bytea => Kind::Binary,
            _ => Kind::String,
        }
    }

    pub(crate) fn iceberg(self) -> Type {
        Type::Primitive(match self {
            Kind::Bool => PrimitiveType::Boolean,
            Kind::Int => PrimitiveType::Int,
            Kind::Long => PrimitiveType::Long,
            Kind::Float => PrimitiveType::Float,
            Kind::Double => PrimitiveType::Double,
            Kind::Decimal { precision, scale } => PrimitiveType::Decimal { precision, scale },
            Kind::Date => PrimitiveType::Date,
            Kind::Timestamp => PrimitiveType::Timestamp,
            Kind::TimestampTz => PrimitiveType::Timestamptz,
            Kind::String => PrimitiveType::String,
            Kind::Binary => PrimitiveType::Binary,
        })
    }
}

impl Kind {
    /// The kind of an existing table's field (`None`: a type Sluice never writes).
    pub(crate) fn from_iceberg(t: &Type) -> Option<Kind> {
        let Type::Primitive(p) = t else { return None };
        Some(match p {
            PrimitiveType::Boolean => Kind::Bool,
            PrimitiveType::Int => Kind::Int,
            PrimitiveType::Long => Kind::Long,
            PrimitiveType::Float => Kind::Float,
            PrimitiveType::Double => Kind::Double,
            PrimitiveType::Decimal { precision, scale } => Kind::Decimal { precision: *precision, scale: *scale },
            PrimitiveType::Date => Kind::Date,
            PrimitiveType::Timestamp => Kind::Timestamp,
            PrimitiveType::Timestamptz => Kind::TimestampTz,
            PrimitiveType::String => Kind::String,
            PrimitiveType::Binary => Kind::Binary,
            _ => return None,
        })
    }

    /// Whether a field of this kind may be promoted to `to` (Iceberg's type promotions).
    pub(crate) fn widens_to(self, to: Kind) -> bool {
        match (self, to) {
            (Kind::Int, Kind::Long) | (Kind::Float, Kind::Double) => true,
            (Kind::Decimal { precision: p1, scale: s1 }, Kind::Decimal { precision: p2, scale: s2 }) => s1 == s2 && p2 > p1,
            _ => false,
        }
    }

    /// A Postgres type holding this kind, for messages.
    pub(crate) fn pg_name(self) -> &'static str {
        match self {
            Kind::Bool => "boolean",
            Kind::Int => "integer",
            Kind::Long => "bigint",
            Kind::Float => "real",
            Kind::Double => "double precision",
            Kind::Decimal { .. } => "numeric",
            Kind::Date => "date",
            Kind::Timestamp => "timestamp",
            Kind::TimestampTz => "timestamptz",
            Kind::String => "text",
            Kind::Binary => "bytea",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.iceberg(), f)
    }
}

/// `numeric(10,2)` → (10, 2); `numeric(5)` → (5, 0); `numeric` → None.
fn numeric_modifier(type_name: &str) -> Option<(u32, u32)> {
    let inner = type_name.split_once('(')?.1.strip_suffix(')')?;
    let mut parts = inner.split(',').map(|p| p.trim().parse::<u32>());
    let p = parts.next()?.ok()?;
    let s = parts.next().transpose().ok()?.unwrap_or(0);
    Some((p, s))
}

/// `"-12.3"` at scale 2 → -1230 (the unscaled integer of a decimal).
fn unscaled(text: &str, scale: u32) -> Option<i128> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale as usize || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(frac.bytes()).chain(std::iter::repeat_n(b'0', scale as usize - frac.len())) {
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// One value that does not fit its column's type: the column and the value's kind, never
/// the value itself (row values are not logged).
#[derive(Debug)]
pub(crate) struct BadValue {
    pub column: String,
    pub kind: Kind,
}

/// A column's values, one per row.
pub(crate) type Column<'a> = Vec<Option<&'a [u8]>>;

fn text(v: &[u8]) -> &str {
    std::str::from_utf8(v).unwrap_or_default()
}

/// Builds one Arrow column of `kind` from text values.
pub(crate) fn array(kind: Kind, name: &str, values: &Column<'_>) -> Result<ArrayRef, BadValue> {
    let bad = || BadValue { column: name.to_string(), kind };
    let typed = |pg: PgType, v: &[u8]| Value::parse(&pg, text(v)).map_err(|_| bad());
    macro_rules! build {
        ($builder:expr, |$v:ident| $conv:expr) => {{
            let mut b = $builder;
            for v in values {
                match v {
                    Some($v) => b.append_value($conv),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    Ok(match kind {
        Kind::Bool => build!(BooleanBuilder::new(), |v| *v == b"t"),
        Kind::Int => build!(Int32Builder::new(), |v| text(v).parse::<i32>().map_err(|_| bad())?),
        Kind::Long => build!(Int64Builder::new(), |v| text(v).parse::<i64>().map_err(|_| bad())?),
        Kind::Float => build!(Float32Builder::new(), |v| match typed(PgType::Float4, v)? {
            Value::Float4(f) => f,
            _ => return Err(bad()),
        }),
        Kind::Double => build!(Float64Builder::new(), |v| match typed(PgType::Float8, v)? {
            Value::Float8(f) => f,
            _ => return Err(bad()),
        }),
        Kind::Decimal { precision, scale } => {
            let mut b = Decimal128Builder::new();
            for v in values {
                match v {
                    Some(v) => b.append_value(unscaled(text(v), scale).ok_or_else(bad)?),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish().with_precision_and_scale(precision as u8, scale as i8).map_err(|_| bad())?)
        }
        Kind::Date => build!(Date32Builder::new(), |v| match typed(PgType::Date, v)? {
            Value::Date(d) => d,
            _ => return Err(bad()),
        }),
        Kind::Timestamp => build!(TimestampMicrosecondBuilder::new(), |v| match typed(PgType::Timestamp, v)? {
            Value::Timestamp(t) => t,
            _ => return Err(bad()),
        }),
        Kind::TimestampTz => {
            let a = build!(TimestampMicrosecondBuilder::new(), |v| match typed(PgType::TimestampTz, v)? {
                Value::TimestampTz(t) => t,
                _ => return Err(bad()),
            });
            let a = a.as_any().downcast_ref::<arrow_array::TimestampMicrosecondArray>().expect("built above").clone();
            Arc::new(a.with_timezone("+00:00"))
        }
        Kind::String => build!(StringBuilder::new(), |v| text(v)),
        Kind::Binary => build!(BinaryBuilder::new(), |v| match typed(PgType::Bytea, v)? {
            Value::Bytea(b) => b,
            _ => return Err(bad()),
        }),
    })
}

/// The text of a datum (an unchanged TOAST value has none: callers fill it first).
pub(crate) fn datum(d: &Datum) -> Option<&[u8]> {
    match d {
        Datum::Text(b) => Some(b),
        Datum::Null | Datum::Unchanged => None,
    }
}

/// A record batch of `columns` (already in the schema's order).
pub(crate) fn batch(schema: &ArrowSchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch, String> {
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_keep_every_digit() {
        assert_eq!(numeric_modifier("numeric(10,2)"), Some((10, 2)));
        assert_eq!(numeric_modifier("numeric(5)"), Some((5, 0)));
        assert_eq!(numeric_modifier("numeric"), None);
        assert_eq!(unscaled("-12.3", 2), Some(-1230));
        assert_eq!(unscaled("7", 0), Some(7));
        assert_eq!(unscaled("1.234", 2), None, "more digits than the scale would be rounded");
        assert_eq!(unscaled("NaN", 2), None);
    }

    #[test]
    fn values_become_typed_arrays() {
        let vals: Column<'_> = vec![Some(b"2024-02-29 12:00:00+00"), None];
        let a = array(Kind::TimestampTz, "t", &vals).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a.null_count(), 1);
        let bad: Column<'_> = vec![Some(b"x")];
        let e = array(Kind::Long, "n", &bad).unwrap_err();
        assert_eq!(e.column, "n");
    }
}
