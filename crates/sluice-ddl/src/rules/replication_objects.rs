use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use super::{Hit, Rule, Verdict};

const SLOT_FUNCTIONS: &[&str] =
    &["pg_create_logical_replication_slot", "pg_drop_replication_slot", "pg_replication_slot_advance", "pg_copy_logical_replication_slot"];

pub static RULE: Rule = Rule {
    id: "replication-objects",
    verdict: Verdict::Blocked,
    rationale: "publications, replication slots and Sluice's own objects are managed by the platform; an \
                application migration that changes them can stop replication or lose changes",
    alternative: "change pipelines through Sluice (its API or config), which updates publications and slots safely",
    check: |_, node| {
        let mut hits = Vec::new();
        match node {
            NodeEnum::CreatePublicationStmt(p) => hits.push(Hit::new(format!("CREATE PUBLICATION {}", p.pubname))),
            NodeEnum::AlterPublicationStmt(p) => hits.push(Hit::new(format!("ALTER PUBLICATION {}", p.pubname))),
            NodeEnum::DropStmt(d) if d.remove_type == ObjectType::ObjectPublication as i32 => hits.push(Hit::new("DROP PUBLICATION")),
            _ => {}
        }
        // Slot functions and the `sluice` schema can appear anywhere in a statement.
        let text = format!("{node:?}");
        for f in SLOT_FUNCTIONS {
            if text.contains(&format!("sval: \"{f}\"")) {
                hits.push(Hit::new(format!("calls {f}()")));
            }
        }
        if text.contains("schemaname: \"sluice\"") || text.contains("sval: \"sluice\"") {
            hits.push(Hit::new("changes objects in Sluice's own schema `sluice`"));
        }
        hits
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_publications_slots_and_sluice_objects() {
        assert_eq!(hits(&RULE, "CREATE PUBLICATION p FOR ALL TABLES").len(), 1);
        assert_eq!(hits(&RULE, "ALTER PUBLICATION p ADD TABLE t").len(), 1);
        assert_eq!(hits(&RULE, "DROP PUBLICATION p").len(), 1);
        assert_eq!(hits(&RULE, "SELECT pg_drop_replication_slot('s')").len(), 1);
        assert_eq!(hits(&RULE, "DROP TABLE sluice.pipelines").len(), 1);
        assert!(hits(&RULE, "SELECT 1").is_empty());
    }
}
