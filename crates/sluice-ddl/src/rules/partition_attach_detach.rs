use pg_query::protobuf::AlterTableType;

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};

pub static RULE: Rule = Rule {
    id: "partition-attach-detach",
    verdict: Verdict::Warning,
    rationale: "attaching or detaching a partition moves whole sets of rows in or out of a replicated table \
                without replicating them as inserts or deletes",
    alternative: "copy rows with INSERT ... SELECT (or delete them) so the change replicates, or resync the \
                  table's pipeline after the attach/detach",
    check: |model, node| {
        let mut hits = Vec::new();
        for (kind, word) in [(AlterTableType::AtAttachPartition, "ATTACH"), (AlterTableType::AtDetachPartition, "DETACH")] {
            for (rv, _) in replicated_cmds(model, node, kind) {
                hits.push(Hit::new(format!("{word} PARTITION on {} (replicated)", table_name(rv))));
            }
        }
        hits
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_attach_and_detach() {
        assert_eq!(hits(&RULE, "ALTER TABLE p ATTACH PARTITION p1 FOR VALUES FROM (1) TO (10)").len(), 1);
        assert_eq!(hits(&RULE, "ALTER TABLE p DETACH PARTITION p1").len(), 1);
    }
}
