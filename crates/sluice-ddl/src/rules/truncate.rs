use pg_query::NodeEnum;

use super::{Hit, Rule, Verdict, table_name};

pub static RULE: Rule = Rule {
    id: "truncate",
    verdict: Verdict::NeedsCoordination,
    rationale: "TRUNCATE is replicated as one event that empties every sink copy of the table; consumers that \
                keep their own state must expect it",
    alternative: "tell the table's consumers first; to remove some rows, DELETE them in batches instead",
    check: |model, node| match node {
        NodeEnum::TruncateStmt(t) => t
            .relations
            .iter()
            .filter_map(|r| match &r.node {
                Some(NodeEnum::RangeVar(rv)) if model.replicated(rv) => Some(Hit::new(format!("TRUNCATE {} (replicated)", table_name(rv)))),
                _ => None,
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
    fn flags_truncate() {
        assert_eq!(hits(&RULE, "TRUNCATE a, b").len(), 2);
    }
}
