use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ObjectType};

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};
use crate::model::names;

pub static RULE: Rule = Rule {
    id: "replica-identity",
    verdict: Verdict::Blocked,
    rationale: "updates and deletes are matched downstream by the replica identity (the primary key); without \
                it they cannot be replicated, and replacing it re-keys every consumer",
    alternative: "keep the primary key; to change the key, add the new unique index, migrate consumers, then \
                  switch with REPLICA IDENTITY USING INDEX in a coordinated change",
    check: |model, node| {
        let mut hits = Vec::new();
        for (rv, cmd) in replicated_cmds(model, node, AlterTableType::AtReplicaIdentity) {
            if let Some(NodeEnum::ReplicaIdentityStmt(r)) = cmd.def.as_ref().and_then(|d| d.node.as_ref())
                && r.identity_type == "n"
            {
                hits.push(Hit::new(format!("REPLICA IDENTITY NOTHING on {} (replicated)", table_name(rv))));
            }
        }
        for (rv, cmd) in replicated_cmds(model, node, AlterTableType::AtDropConstraint) {
            let is_key = match model.table(rv) {
                Some(t) => t.pk_constraint.as_deref() == Some(cmd.name.as_str()),
                None => cmd.name.ends_with("_pkey"),
            };
            if is_key {
                hits.push(Hit::new(format!("DROP CONSTRAINT {} removes the primary key of {} (replicated)", cmd.name, table_name(rv))));
            }
        }
        if let NodeEnum::DropStmt(d) = node
            && d.remove_type == ObjectType::ObjectIndex as i32
        {
            for o in &d.objects {
                let Some(NodeEnum::List(l)) = &o.node else { continue };
                let Some(index) = names(&l.items).pop() else { continue };
                let owner = model.tables.iter().find(|(_, t)| {
                    t.replicated
                        && (t.identity_index.as_deref() == Some(index.as_str()) || t.pk_constraint.as_deref() == Some(index.as_str()))
                });
                if let Some(((s, n), _)) = owner {
                    hits.push(Hit::new(format!("DROP INDEX {index} removes the replica identity of {s}.{n} (replicated)")));
                } else if !model.has_context && index.ends_with("_pkey") {
                    hits.push(Hit::new(format!("DROP INDEX {index} looks like a primary key index")));
                }
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
    fn flags_identity_removal() {
        assert_eq!(hits(&RULE, "ALTER TABLE t REPLICA IDENTITY NOTHING").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t REPLICA IDENTITY FULL").is_empty());
        assert_eq!(hits(&RULE, "ALTER TABLE t DROP CONSTRAINT t_pkey").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t DROP CONSTRAINT t_check").is_empty());
        assert_eq!(hits(&RULE, "DROP INDEX t_pkey").len(), 1);
    }
}
