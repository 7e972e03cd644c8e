//! A table's layout in the config (`tables: {public.orders: {partition_by, sort_by}}`):
//! Iceberg's partition transforms and sort order, written as Spark SQL and pyiceberg
//! users write them (`day(created_at)`, `bucket(16, id)`, `created_at desc`), checked
//! first for their syntax (no I/O), then against the source table's columns before
//! anything is created.

use std::collections::BTreeMap;

use iceberg::spec::{NullOrder, PartitionSpec, Schema, SortDirection, SortField, SortOrder, Transform, UnboundPartitionSpec};
use serde::Deserialize;
use sluice_core::TableName;

/// How one table's files are laid out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableLayout {
    /// Partition fields, in order: `column` (identity), `year(c)`, `month(c)`, `day(c)`,
    /// `hour(c)`, `bucket(N, c)`, `truncate(W, c)`. Readers skip the files of
    /// partitions a filter rules out.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The order of rows within each data file: `column [asc|desc] [nulls first|last]`.
    #[serde(default)]
    pub sort_by: Vec<String>,
}

/// One partition field as written: the transform and the column it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Term {
    transform: Transform,
    column: String,
}

fn parse_term(text: &str) -> Result<Term, String> {
    let t = text.trim();
    let Some((func, rest)) = t.split_once('(') else {
        return if is_name(t) {
            Ok(Term { transform: Transform::Identity, column: t.to_string() })
        } else {
            Err(format!("{text:?} is not a column or a transform; write column, day(column) or bucket(16, column)"))
        };
    };
    let args = rest.strip_suffix(')').ok_or_else(|| format!("{text:?}: missing ')'"))?;
    let args: Vec<&str> = args.split(',').map(str::trim).collect();
    let n = |what: &str| -> Result<u32, String> {
        args[0].parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{text:?}: the {what} must be a positive integer"))
    };
    let (transform, column) = match (func.trim().to_ascii_lowercase().as_str(), args.len()) {
        ("identity", 1) => (Transform::Identity, args[0]),
        ("year" | "years", 1) => (Transform::Year, args[0]),
        ("month" | "months", 1) => (Transform::Month, args[0]),
        ("day" | "days", 1) => (Transform::Day, args[0]),
        ("hour" | "hours", 1) => (Transform::Hour, args[0]),
        ("bucket", 2) => (Transform::Bucket(n("bucket count")?), args[1]),
        ("truncate", 2) => (Transform::Truncate(n("width")?), args[1]),
        (f, _) => {
            return Err(format!(
                "{text:?}: unknown transform {f}({}); use year, month, day, hour (one column), bucket(N, column) or \
                 truncate(W, column)",
                args.len()
            ));
        }
    };
    if !is_name(column) {
        return Err(format!("{text:?}: {column:?} is not a column name"));
    }
    Ok(Term { transform, column: column.to_string() })
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(char::is_whitespace) && !s.contains(['(', ')', ','])
}

/// One sort field as written.
fn parse_sort(text: &str) -> Result<(String, SortDirection, NullOrder), String> {
    let words: Vec<String> = text.split_whitespace().map(str::to_ascii_lowercase).collect();
    let column = text.split_whitespace().next().filter(|c| is_name(c)).ok_or_else(|| format!("{text:?}: name a column"))?;
    let rest: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let (direction, nulls) = match rest.as_slice() {
        [] | ["asc"] => (SortDirection::Ascending, None),
        ["desc"] => (SortDirection::Descending, None),
        ["nulls", n] | ["asc", "nulls", n] => (SortDirection::Ascending, Some(*n)),
        ["desc", "nulls", n] => (SortDirection::Descending, Some(*n)),
        _ => return Err(format!("{text:?}: write column [asc|desc] [nulls first|last]")),
    };
    // Iceberg's (and SQL's) default: nulls first ascending, last descending.
    let null_order = match (nulls, direction) {
        (Some("first"), _) | (None, SortDirection::Ascending) => NullOrder::First,
        (Some("last"), _) | (None, SortDirection::Descending) => NullOrder::Last,
        (Some(n), _) => return Err(format!("{text:?}: nulls {n}? write nulls first or nulls last")),
    };
    Ok((column.to_string(), direction, null_order))
}

/// Checks the syntax of every layout (no I/O): one line naming the key.
pub(crate) fn validate(tables: &BTreeMap<String, TableLayout>) -> Result<(), String> {
    for (name, layout) in tables {
        let key = format!("sink.iceberg.tables.{name}");
        TableName::parse(name).ok_or_else(|| format!("{key}: name a table as schema.table"))?;
        for p in &layout.partition_by {
            parse_term(p).map_err(|e| format!("{key}.partition_by: {e}"))?;
        }
        for s in &layout.sort_by {
            parse_sort(s).map_err(|e| format!("{key}.sort_by: {e}"))?;
        }
    }
    Ok(())
}

/// The layout configured for `table`, if any.
pub(crate) fn for_table<'a>(tables: &'a BTreeMap<String, TableLayout>, table: &TableName) -> Option<(&'a str, &'a TableLayout)> {
    tables.iter().find(|(k, _)| TableName::parse(k).as_ref() == Some(table)).map(|(k, v)| (k.as_str(), v))
}

/// Names configured that are none of the pipeline's tables (a typo would otherwise
/// leave a table unpartitioned without a word).
pub(crate) fn unknown_tables(tables: &BTreeMap<String, TableLayout>, known: &[TableName]) -> Option<String> {
    let unknown: Vec<&str> =
        tables.keys().filter(|k| !TableName::parse(k).is_some_and(|t| known.contains(&t))).map(String::as_str).collect();
    (!unknown.is_empty()).then(|| {
        let known: Vec<String> = known.iter().map(ToString::to_string).collect();
        format!(
            "sink.iceberg.tables: {} {} not among the pipeline's tables ({}); name a captured table",
            unknown.join(", "),
            if unknown.len() == 1 { "is" } else { "are" },
            known.join(", ")
        )
    })
}

impl TableLayout {
    /// The partition spec and sort order on `schema` (the table's schema built from the
    /// source); one line naming the key and the column when a term does not fit.
    pub(crate) fn bind(&self, key: &str, schema: &Schema) -> Result<(Option<UnboundPartitionSpec>, Option<SortOrder>), String> {
        let key = format!("sink.iceberg.tables.{key}");
        let columns = || schema.as_struct().fields().iter().map(|f| f.name.clone()).collect::<Vec<_>>().join(", ");
        let field = |what: &str, text: &str, column: &str| {
            schema.field_by_name(column).map(|f| f.id).ok_or_else(|| {
                format!("{key}.{what}: {text:?} names column {column:?}, which the table does not have (its columns: {})", columns())
            })
        };
        let spec = if self.partition_by.is_empty() {
            None
        } else {
            let mut b = PartitionSpec::builder(schema.clone());
            for text in &self.partition_by {
                let term = parse_term(text).map_err(|e| format!("{key}.partition_by: {e}"))?;
                field("partition_by", text, &term.column)?;
                let name = match term.transform {
                    Transform::Identity => term.column.clone(),
                    Transform::Bucket(_) => format!("{}_bucket", term.column),
                    Transform::Truncate(_) => format!("{}_trunc", term.column),
                    t => format!("{}_{t}", term.column),
                };
                b = b
                    .add_partition_field(&term.column, name, term.transform)
                    .map_err(|e| format!("{key}.partition_by: {text:?} does not fit column {}: {}", term.column, e.message()))?;
            }
            let spec = b.build().map_err(|e| format!("{key}.partition_by: {}", e.message()))?;
            Some(spec.into_unbound())
        };
        let order = if self.sort_by.is_empty() {
            None
        } else {
            let mut b = SortOrder::builder();
            for text in &self.sort_by {
                let (column, direction, null_order) = parse_sort(text).map_err(|e| format!("{key}.sort_by: {e}"))?;
                let source_id = field("sort_by", text, &column)?;
                b.with_sort_field(SortField { source_id, transform: Transform::Identity, direction, null_order });
            }
            Some(b.with_order_id(1).build(schema).map_err(|e| format!("{key}.sort_by: {}", e.message()))?)
        };
        Ok((spec, order))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use iceberg::spec::{NestedField, PrimitiveType, Type};

    use super::*;

    fn schema() -> Schema {
        Schema::builder()
            .with_fields(vec![
                Arc::new(NestedField::required(1, "id", Type::Primitive(PrimitiveType::Long))),
                Arc::new(NestedField::optional(2, "created_at", Type::Primitive(PrimitiveType::Timestamptz))),
                Arc::new(NestedField::optional(3, "region", Type::Primitive(PrimitiveType::String))),
            ])
            .build()
            .unwrap()
    }

    fn layout(p: &[&str], s: &[&str]) -> TableLayout {
        TableLayout { partition_by: p.iter().map(|x| x.to_string()).collect(), sort_by: s.iter().map(|x| x.to_string()).collect() }
    }

    #[test]
    fn terms_as_users_write_them() {
        assert_eq!(parse_term("day(created_at)").unwrap(), Term { transform: Transform::Day, column: "created_at".into() });
        assert_eq!(parse_term("bucket(16, id)").unwrap(), Term { transform: Transform::Bucket(16), column: "id".into() });
        assert_eq!(parse_term("region").unwrap(), Term { transform: Transform::Identity, column: "region".into() });
        assert!(parse_term("bucket(0, id)").unwrap_err().contains("positive integer"));
        assert!(parse_term("week(created_at)").unwrap_err().contains("unknown transform week(1)"));
        assert!(parse_term("day(created_at").unwrap_err().contains("missing ')'"));
        assert_eq!(parse_sort("created_at desc").unwrap(), ("created_at".into(), SortDirection::Descending, NullOrder::Last));
        assert_eq!(parse_sort("id nulls last").unwrap(), ("id".into(), SortDirection::Ascending, NullOrder::Last));
        assert!(parse_sort("id sideways").is_err());
    }

    #[test]
    fn binding_names_the_missing_column_and_the_unfit_transform() {
        let (spec, order) = layout(&["day(created_at)", "bucket(4, id)"], &["created_at desc", "id"]).bind("public.t", &schema()).unwrap();
        let spec = spec.unwrap();
        let names: Vec<String> = spec.fields().iter().map(|f| format!("{}:{}", f.name, f.transform)).collect();
        assert_eq!(names, ["created_at_day:day", "id_bucket:bucket[4]"]);
        assert_eq!(order.unwrap().fields.len(), 2);
        let e = layout(&["day(created)"], &[]).bind("public.t", &schema()).unwrap_err();
        assert_eq!(
            e,
            "sink.iceberg.tables.public.t.partition_by: \"day(created)\" names column \"created\", which the table does not have \
             (its columns: id, created_at, region)"
        );
        let e = layout(&["day(region)"], &[]).bind("public.t", &schema()).unwrap_err();
        assert!(e.starts_with("sink.iceberg.tables.public.t.partition_by: \"day(region)\" does not fit column region"), "{e}");
        let e = layout(&[], &["nope"]).bind("public.t", &schema()).unwrap_err();
        assert!(e.starts_with("sink.iceberg.tables.public.t.sort_by: \"nope\" names column \"nope\""), "{e}");
    }

    #[test]
    fn unknown_tables_are_named() {
        let tables = BTreeMap::from([("public.ordrs".to_string(), TableLayout::default())]);
        let e = unknown_tables(&tables, &[TableName::new("public", "orders")]).unwrap();
        assert_eq!(e, "sink.iceberg.tables: public.ordrs is not among the pipeline's tables (public.orders); name a captured table");
        assert!(validate(&BTreeMap::from([("a.b.c".to_string(), TableLayout::default())])).is_err());
    }
}
