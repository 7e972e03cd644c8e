use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use super::{Hit, Rule, Verdict};
use crate::model::names;

pub static RULE: Rule = Rule {
    id: "drop-table",
    verdict: Verdict::NeedsCoordination,
    rationale: "a replicated table feeds pipelines and consumers; dropping it ends their stream and leaves \
                slots, topics and sink objects behind",
    alternative: "remove the table from its pipelines first (teardown), tell its consumers, then drop it",
    check: |model, node| match node {
        NodeEnum::DropStmt(d) if d.remove_type == ObjectType::ObjectTable as i32 => d
            .objects
            .iter()
            .filter_map(|o| match &o.node {
                Some(NodeEnum::List(l)) => Some(names(&l.items)),
                _ => None,
            })
            .filter_map(|parts| {
                let rv = pg_query::protobuf::RangeVar {
                    schemaname: if parts.len() > 1 { parts[0].clone() } else { String::new() },
                    relname: parts.last()?.clone(),
                    ..Default::default()
                };
                model.replicated(&rv).then(|| Hit::new(format!("DROP TABLE {} (replicated)", parts.join("."))))
            })
            .collect(),
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_each_dropped_table() {
        assert_eq!(hits(&RULE, "DROP TABLE a, s.b").len(), 2);
        assert!(hits(&RULE, "DROP VIEW v").is_empty());
    }
}
