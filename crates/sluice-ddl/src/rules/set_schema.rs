use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use super::{Hit, Rule, Verdict, table_name};

pub static RULE: Rule = Rule {
    id: "set-schema",
    verdict: Verdict::Blocked,
    rationale: "moving a table to another schema changes its qualified name, which pipelines are bound to",
    alternative: "create the table in the new schema and migrate data and consumers, or keep the schema",
    check: |model, node| match node {
        NodeEnum::AlterObjectSchemaStmt(s) if s.object_type == ObjectType::ObjectTable as i32 => s
            .relation
            .as_ref()
            .filter(|rv| model.replicated(rv))
            .map(|rv| vec![Hit::new(format!("SET SCHEMA {} on {} (replicated)", s.newschema, table_name(rv)))])
            .unwrap_or_default(),
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_set_schema() {
        assert_eq!(hits(&RULE, "ALTER TABLE t SET SCHEMA archive").len(), 1);
        assert!(hits(&RULE, "ALTER SEQUENCE s SET SCHEMA archive").is_empty());
    }
}
