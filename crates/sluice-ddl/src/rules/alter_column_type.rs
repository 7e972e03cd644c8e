use pg_query::NodeEnum;
use pg_query::protobuf::AlterTableType;

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};
use crate::model::type_text;

pub static RULE: Rule = Rule {
    id: "alter-column-type",
    verdict: Verdict::Blocked,
    rationale: "consumers decode the column with the type they registered; a narrower or different type breaks \
                them, and even a widening must be accepted by every consumer's schema first",
    alternative: "add a new column of the new type, dual-write and backfill it, move consumers, then drop the old \
                  column; a pure widening (int -> bigint, varchar(n) -> text) can go ahead once consumers accept it",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtAlterColumnType)
            .into_iter()
            .filter_map(|(rv, cmd)| {
                let Some(NodeEnum::ColumnDef(d)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else { return None };
                let new = d.type_name.as_ref().map(type_text).unwrap_or_default();
                let col = format!("{}.{}", table_name(rv), cmd.name);
                let Some(old) = model.table(rv).and_then(|t| t.column(&cmd.name)).map(|c| c.type_name.clone()) else {
                    return Some(Hit::with(
                        Verdict::NeedsCoordination,
                        format!("type of {col} changes to {new}; without catalog context it is unknown whether this narrows it"),
                    ));
                };
                Some(match change(&old, &new) {
                    Change::Same => return None,
                    Change::Widening => Hit::with(
                        Verdict::NeedsCoordination,
                        format!(
                            "{col} widens from {old} to {new}: a promotion consumers can adopt, but their schemas must accept it first"
                        ),
                    ),
                    Change::Narrowing => Hit::new(format!("{col} narrows from {old} to {new}: values consumers hold may not fit")),
                    Change::Incompatible => Hit::new(format!("{col} changes from {old} to {new}: consumers cannot read the new type")),
                })
            })
            .collect()
    },
};

#[derive(Debug, PartialEq)]
enum Change {
    Same,
    Widening,
    Narrowing,
    Incompatible,
}

/// A type reduced to a family and an ordered width (`None`: unbounded).
fn norm(t: &str) -> (&'static str, Option<(u32, u32)>) {
    let t = t.trim().to_ascii_lowercase();
    let (base, mods) = match t.split_once('(') {
        Some((b, m)) => {
            (b.trim().to_string(), m.trim_end_matches(')').split(',').filter_map(|x| x.trim().parse().ok()).collect::<Vec<u32>>())
        }
        None => (t.clone(), vec![]),
    };
    let bounded = |m: &[u32]| m.first().map(|&p| (p, m.get(1).copied().unwrap_or(0)));
    match base.as_str() {
        "smallint" | "int2" => ("int", Some((2, 0))),
        "integer" | "int" | "int4" => ("int", Some((4, 0))),
        "bigint" | "int8" => ("int", Some((8, 0))),
        "real" | "float4" => ("float", Some((4, 0))),
        "double precision" | "float8" => ("float", Some((8, 0))),
        "numeric" | "decimal" => ("numeric", bounded(&mods)),
        "character varying" | "varchar" | "character" | "char" | "bpchar" => ("text", bounded(&mods)),
        "text" => ("text", None),
        _ => ("other", None),
    }
}

fn change(old: &str, new: &str) -> Change {
    if old.eq_ignore_ascii_case(new) {
        return Change::Same;
    }
    let ((fo, wo), (fn_, wn)) = (norm(old), norm(new));
    let wider = |a: Option<(u32, u32)>, b: Option<(u32, u32)>| match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some((p1, s1)), Some((p2, s2))) => p2 >= p1 && s2 >= s1 && p2 - s2 >= p1 - s1,
    };
    match (fo, fn_) {
        ("other", _) | (_, "other") => Change::Incompatible,
        (a, b) if a == b => {
            if wo == wn {
                Change::Same
            } else if wider(wo, wn) {
                Change::Widening
            } else {
                Change::Narrowing
            }
        }
        // Integers promote to floats and decimals as Avro's int -> long -> float -> double does.
        ("int", "float") | ("int", "numeric") | ("float", "numeric") => Change::Widening,
        ("int", "text") | ("float", "text") | ("numeric", "text") => Change::Incompatible,
        _ => Change::Narrowing,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{hits, hits_in};
    use super::*;
    use crate::{ColumnModel, Model, TableModel};

    #[test]
    fn classifies_changes() {
        assert_eq!(change("integer", "int8"), Change::Widening);
        assert_eq!(change("bigint", "int4"), Change::Narrowing);
        assert_eq!(change("character varying(20)", "varchar(40)"), Change::Widening);
        assert_eq!(change("character varying(20)", "text"), Change::Widening);
        assert_eq!(change("text", "varchar(10)"), Change::Narrowing);
        assert_eq!(change("numeric(10,2)", "numeric(12,2)"), Change::Widening);
        assert_eq!(change("numeric(10,2)", "numeric(10,4)"), Change::Narrowing);
        assert_eq!(change("text", "int4"), Change::Narrowing);
        assert_eq!(change("integer", "text"), Change::Incompatible);
        assert_eq!(change("jsonb", "text"), Change::Incompatible);
    }

    #[test]
    fn uses_the_model_when_it_knows_the_column() {
        let mut m = Model { has_context: true, ..Default::default() };
        m.tables.insert(
            ("public".into(), "t".into()),
            TableModel {
                replicated: true,
                columns: vec![ColumnModel { name: "c".into(), type_name: "integer".into(), not_null: false }],
                ..Default::default()
            },
        );
        assert!(hits_in(&m, &RULE, "ALTER TABLE t ALTER COLUMN c TYPE bigint")[0].contains("widens"));
        assert!(hits_in(&m, &RULE, "ALTER TABLE t ALTER COLUMN c TYPE smallint")[0].contains("narrows"));
        assert!(hits_in(&m, &RULE, "ALTER TABLE t ALTER COLUMN c TYPE int4").is_empty());
        assert!(hits(&RULE, "ALTER TABLE t ALTER COLUMN c TYPE bigint")[0].contains("without catalog context"));
    }
}
