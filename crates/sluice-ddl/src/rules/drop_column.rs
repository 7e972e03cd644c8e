use pg_query::protobuf::AlterTableType;

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};

pub static RULE: Rule = Rule {
    id: "drop-column",
    verdict: Verdict::Blocked,
    rationale: "under BACKWARD compatibility a consumer may lose a field only if its schema has it optional: \
                Sluice derives nullable columns as optional fields and NOT NULL columns as required ones",
    alternative: "make the column nullable first (DROP NOT NULL), let consumers stop reading it, then drop it",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtDropColumn)
            .into_iter()
            .map(|(rv, cmd)| {
                let col = format!("{}.{}", table_name(rv), cmd.name);
                match model.table(rv).and_then(|t| t.column(&cmd.name)) {
                    Some(c) if c.not_null => Hit::new(format!("DROP COLUMN {col}: the column is required (NOT NULL) in consumers' schema")),
                    Some(_) => {
                        Hit::with(Verdict::Allowed, format!("DROP COLUMN {col}: the column is optional, a BACKWARD-compatible change"))
                    }
                    None => Hit::with(
                        Verdict::NeedsCoordination,
                        format!("DROP COLUMN {col}: without catalog context it is unknown whether consumers require it"),
                    ),
                }
            })
            .collect()
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::{hits, hits_in};
    use super::RULE;
    use crate::{ColumnModel, Model, TableModel};

    #[test]
    fn depends_on_whether_the_column_is_required() {
        let mut m = Model { has_context: true, ..Default::default() };
        m.tables.insert(
            ("public".into(), "t".into()),
            TableModel {
                replicated: true,
                columns: vec![
                    ColumnModel { name: "req".into(), type_name: "text".into(), not_null: true },
                    ColumnModel { name: "opt".into(), type_name: "text".into(), not_null: false },
                ],
                ..Default::default()
            },
        );
        assert!(hits_in(&m, &RULE, "ALTER TABLE t DROP COLUMN req")[0].contains("required"));
        assert!(hits_in(&m, &RULE, "ALTER TABLE t DROP COLUMN opt")[0].contains("optional"));
        assert!(hits(&RULE, "ALTER TABLE t DROP COLUMN x")[0].contains("unknown"));
    }
}
