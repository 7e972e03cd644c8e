use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::{ColumnSchema, SourcePosition};

fn col(name: &str, pg_type: PgType, type_name: &str, key: bool) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        type_oid: 0,
        type_name: type_name.into(),
        pg_type,
        nullable: !key,
        is_key: key,
        enum_labels: vec![],
        storage: Default::default(),
    }
}

fn orders() -> TableSchema {
    TableSchema {
        name: TableName::new("public", "orders"),
        relid: 1,
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("org", PgType::Int8, "bigint", true),
            col("id", PgType::Int8, "bigint", true),
            col("status", PgType::Text, "text", false),
            col("price", PgType::Numeric, "numeric", false),
            col("email", PgType::Text, "text", false),
            col("meta", PgType::Jsonb, "jsonb", false),
        ],
    }
}

/// Steps as the pipeline config reads them (one-key maps, as serde_yaml's singleton maps).
fn steps(yaml: &str) -> Result<Vec<Step>, serde_yaml::Error> {
    serde_yaml::with::singleton_map_recursive::deserialize(serde_yaml::Deserializer::from_str(yaml))
}

fn chain(yaml: &str) -> Result<Chain, TransformError> {
    Chain::new(steps(yaml).expect("valid YAML"))
}

fn t(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn event(op: Op, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
    let position =
        SourcePosition { lsn: Lsn(0x16B3748), commit_lsn: Lsn(0x16B3800), xid: 9, commit_time_us: 1_700_000_000_000_000, seq: 0 };
    ChangeEvent { op, table: Arc::new(orders()), before, after, position }
}

fn row() -> Row {
    vec![t("7"), t("42"), t("paid"), t("10.456"), t("a@b.c"), t("{}")]
}

fn names(s: &TableSchema) -> Vec<&str> {
    s.columns.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn a_chain_reshapes_schema_and_rows_together() {
    let c = chain(
        r#"
- rename_fields: {fields: {status: state}}
- drop_fields: {fields: [meta]}
- cast: {fields: {price: "decimal(10,2)"}}
- mask: {fields: [email], hash: sha256}
- insert_field: {name: region, value: eu}
- insert_field: {name: at, source: commit_time}
- composite_key: {fields: [org, id], separator: "-", name: key}
- route: {regex: "^public\\.(.*)$", replacement: "sales.${1}_v2"}
"#,
    )
    .unwrap();
    let tt = c.compile(&orders()).unwrap();
    let out = &tt.output;
    assert_eq!(out.name, TableName::new("sales", "orders_v2"));
    assert_eq!(names(out), ["org", "id", "state", "price", "email", "region", "at", "key"]);
    assert_eq!(out.columns[3].type_name, "numeric(10,2)");
    assert_eq!(out.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect::<Vec<_>>(), ["key"]);
    let e = tt.apply(&event(Op::Insert, None, Some(row()))).unwrap().unwrap();
    let after = e.after.unwrap();
    assert_eq!(after[3], t("10.46"));
    assert_eq!(
        after[4],
        t("d648b243a3e817eaa3309e00e183483f2867baadf522099f0c2121770536b25a"),
        "sha256 hex, as Python's hashlib computes it"
    );
    assert_eq!(after[5], t("eu"));
    assert_eq!(after[6], t("2023-11-14 22:13:20+00"));
    assert_eq!(after[7], t("7-42"));
    assert!(Arc::ptr_eq(&e.table, &tt.output));
}

#[test]
fn filters_drop_matching_events_and_respect_guards() {
    let c = chain(
        r#"
- filter: {field: status, equals: draft, when: {ops: [insert, update]}}
- filter: {field: email, is_null: true}
"#,
    )
    .unwrap();
    let tt = c.compile(&orders()).unwrap();
    let mut draft = row();
    draft[2] = t("draft");
    assert!(tt.apply(&event(Op::Insert, None, Some(draft.clone()))).unwrap().is_none());
    // The guard limits the first filter to inserts and updates: a delete of a draft passes.
    assert!(tt.apply(&event(Op::Delete, Some(draft), None)).unwrap().is_some());
    let mut no_email = row();
    no_email[4] = Datum::Null;
    assert!(tt.apply(&event(Op::Update, None, Some(no_email))).unwrap().is_none());
    assert!(tt.apply(&event(Op::Insert, None, Some(row()))).unwrap().is_some());
}

#[test]
fn for_a_sink_keyed_by_row_an_update_into_the_filter_is_a_delete() {
    let c = chain("- filter: {field: status, equals: draft}\n- drop_fields: {fields: [meta]}\n").unwrap();
    let tt = c.compile(&orders()).unwrap();
    let mut draft = row();
    draft[2] = t("draft");
    // An event stream drops it; a replica deletes the row it may hold, in the output shape.
    assert!(tt.apply(&event(Op::Update, None, Some(draft.clone()))).unwrap().is_none());
    let e = tt.apply_keyed(event(Op::Update, None, Some(draft.clone()))).unwrap().unwrap();
    assert_eq!((e.op, e.after.is_none(), e.before.as_ref().map(Vec::len)), (Op::Delete, true, Some(5)));
    assert_eq!(e.before.unwrap()[..2], [t("7"), t("42")]);
    // The key changed too: the old key's row goes.
    let mut old = row();
    old[1] = t("41");
    let e = tt.apply_keyed(event(Op::Update, Some(old), Some(draft.clone()))).unwrap().unwrap();
    assert_eq!(e.before.unwrap()[1], t("41"));
    // An insert into the filter is still dropped (nothing to remove); a delete of a
    // draft passes; an update out of the filter is an update (upserted).
    assert!(tt.apply_keyed(event(Op::Insert, None, Some(draft.clone()))).unwrap().is_none());
    assert_eq!(tt.apply_keyed(event(Op::Delete, Some(draft.clone()), None)).unwrap().unwrap().op, Op::Delete);
    assert!(tt.apply(&event(Op::Delete, Some(draft.clone()), None)).unwrap().is_none(), "an event stream drops it");
    assert_eq!(tt.apply_keyed(event(Op::Update, Some(draft), Some(row()))).unwrap().unwrap().op, Op::Update);
}

#[test]
fn table_guards_and_keep_fields() {
    let c = chain(
        r#"
- keep_fields: {fields: [status], when: {tables: ["public.ord*"]}}
- insert_field: {name: src, source: table, when: {tables: ["other.*"]}}
- insert_field: {name: lsn, source: lsn}
"#,
    )
    .unwrap();
    let tt = c.compile(&orders()).unwrap();
    assert_eq!(names(&tt.output), ["org", "id", "status", "lsn"]);
    let e = tt.apply(&event(Op::Delete, Some(row()), None)).unwrap().unwrap();
    assert_eq!(e.before.unwrap(), vec![t("7"), t("42"), t("paid"), t("0/16B3748")]);
}

#[test]
fn validation_names_the_step_and_the_fix() {
    let cases = [
        ("- cast: {fields: {price: integr}}", "transforms[0] (cast): field \"price\": unknown type"),
        (
            "- rename_fields: {fields: {status: state}}\n- cast: {fields: {prce: int}}",
            "transforms[1] (cast): column \"prce\" is not in public.orders",
        ),
        ("- cast: {fields: {meta: int}}", "cannot cast jsonb"),
        ("- drop_fields: {fields: [id]}", "part of the key"),
        ("- insert_field: {name: x}", "exactly one of value or source"),
        ("- insert_field: {name: status, value: x}", "already exists"),
        ("- rename_fields: {fields: {status: email}}", "already exists"),
        ("- filter: {field: status}", "exactly one condition"),
        ("- filter: {field: status, equals: a, in: [b]}", "exactly one condition"),
        ("- mask: {fields: [email]}", "exactly one of replacement or hash"),
        ("- mask: {fields: [id], replacement: x}", "part of the key"),
        ("- route: {regex: \"(\", replacement: x}", "regex"),
        ("- route: {regex: \".*\", replacement: \"\"}", "not schema.table"),
        ("- composite_key: {fields: [id, status], name: k}", "REPLICA IDENTITY FULL"),
        ("- composite_key: {fields: [], name: k}", "at least one column"),
        ("- drop_fields: {fields: [status], when: {ops: [insert]}}", "only filter and mask"),
        ("- unwrap: {}\n- drop_fields: {fields: [status]}", "transforms[0] (unwrap): must be the last step"),
        ("- timestamp_converter: {fields: {status: unix_ms}}", "not a timestamp or a date"),
    ];
    for (yaml, want) in cases {
        let err = chain(yaml).and_then(|c| c.compile(&orders()).map(|_| ())).unwrap_err();
        assert!(err.to_string().contains(want), "{yaml}: {err}");
    }
    assert!(steps("- rename_fields: {fields: {a: b}, colour: red}").is_err(), "unknown keys are errors");
    assert!(steps("- unwrapp: {}").is_err(), "unknown step kinds are errors");
}

#[test]
fn value_to_key_flatten_and_headers() {
    let mut t = orders();
    t.columns[5].name = "attrs".into();
    let c = chain(
        r#"
- flatten: {field: attrs, keys: {color: string, size: int, ok: bool}, drop: true}
- value_to_key: {fields: [id]}
- insert_header: {name: team, value: sales}
"#,
    )
    .unwrap();
    assert_eq!(c.headers(), [("team".to_string(), "sales".to_string())]);
    let tt = c.compile(&t).unwrap();
    assert_eq!(names(&tt.output), ["org", "id", "status", "price", "email", "attrs_color", "attrs_ok", "attrs_size"]);
    assert_eq!(tt.output.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect::<Vec<_>>(), ["id"]);
    let mut r = row();
    r[5] = t_(r#"{"color": "red", "size": 3.0, "ok": true, "other": 1}"#);
    let after = tt.apply(&event(Op::Insert, None, Some(r))).unwrap().unwrap().after.unwrap();
    assert_eq!(after[5..], [t_("red"), t_("t"), t_("3")]);
    let mut r = row();
    r[5] = t_("{}");
    let after = tt.apply(&event(Op::Insert, None, Some(r))).unwrap().unwrap().after.unwrap();
    assert_eq!(after[5..], [Datum::Null, Datum::Null, Datum::Null], "missing keys are NULL");
    assert!(chain("- flatten: {field: status, keys: {a: string}}").unwrap().compile(&t).is_err(), "only json columns");
    assert!(chain("- value_to_key: {fields: [status]}").unwrap().compile(&t).err().unwrap().message.contains("REPLICA IDENTITY FULL"));
}

fn t_(s: &str) -> Datum {
    t(s)
}

#[test]
fn compute_columns_from_expressions() {
    let mut t = orders();
    t.columns.push(col("at", PgType::TimestampTz, "timestamp with time zone", false));
    let c = chain(
        r#"
- compute: {name: total, expr: "price * 2 + org", type: "decimal(10,2)"}
- compute: {name: label, expr: "if(status == \"paid\", str::to_uppercase(status), \"other\") + \"-\" + str::from(id)", type: string}
- compute: {name: digest, expr: "sha256(email)", type: string}
- compute: {name: yr, expr: "year(at) * 100 + month(at)", type: int}
- compute: {name: none, expr: "email", type: string}
"#,
    )
    .unwrap();
    let tt = c.compile(&t).unwrap();
    let mut r = row();
    r.push(t_("2024-02-29 23:00:00+00"));
    let after = tt.apply(&event(Op::Insert, None, Some(r))).unwrap().unwrap().after.unwrap();
    assert_eq!(after[7], t_("27.91"));
    assert_eq!(after[8], t_("PAID-42"));
    assert_eq!(after[9].as_text().unwrap().len(), 64);
    assert_eq!(after[10], t_("202402"));
    let mut r = row();
    r[4] = Datum::Null;
    r.push(Datum::Null);
    let after = tt.apply(&event(Op::Insert, None, Some(r))).unwrap().unwrap().after.unwrap();
    assert_eq!(after[11], Datum::Null, "NULL in, NULL out");
    for (yaml, want) in [
        ("- compute: {name: x, expr: \"nope + 1\", type: int}", "column \"nope\" is not in"),
        ("- compute: {name: x, expr: \"frobnicate(id)\", type: int}", "unknown function frobnicate"),
        ("- compute: {name: x, expr: \"(1 + 2\", type: int}", "expr"),
        ("- compute: {name: x, expr: \"1\", type: integer}", "type: unknown type"),
    ] {
        let err = chain(yaml).and_then(|c| c.compile(&t).map(|_| ())).err();
        assert!(err.as_ref().is_some_and(|e| e.to_string().contains(want)), "{yaml}: {err:?}");
    }
}

#[test]
fn runtime_cast_failures_name_the_column() {
    let c = chain("- cast: {fields: {status: int}}").unwrap();
    let err = c.compile(&orders()).unwrap().apply(&event(Op::Insert, None, Some(row()))).unwrap_err();
    assert_eq!(err.column, "status");
}

#[test]
fn globs() {
    assert!(glob_match("public.*", "public.orders"));
    assert!(glob_match("*.ord?rs", "x.orders"));
    assert!(!glob_match("public.o", "public.orders"));
    assert!(glob_match("*", ""));
}
