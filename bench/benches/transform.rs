//! Cost of a 5-step transform chain per event on a 20-column row, against cloning the
//! event (the least any step that produces a new event must do), measured in one run.
//!
//!   cargo bench -p sluice-bench --bench transform

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use sluice_core::transform::{Chain, Step};
use sluice_core::{ChangeEvent, ColumnSchema, Datum, Lsn, Op, PgType, ReplicaIdentity, SourcePosition, TableName, TableSchema};

fn table() -> TableSchema {
    let columns = (0..20)
        .map(|i| {
            let (pg_type, type_name) = match i % 4 {
                0 => (PgType::Int8, "bigint"),
                1 => (PgType::Text, "text"),
                2 => (PgType::Numeric, "numeric"),
                _ => (PgType::Bool, "boolean"),
            };
            ColumnSchema {
                name: format!("c{i}"),
                type_oid: 0,
                type_name: type_name.into(),
                pg_type,
                nullable: i != 0,
                is_key: i == 0,
                enum_labels: vec![],
                storage: Default::default(),
            }
        })
        .collect();
    TableSchema { name: TableName::new("public", "wide"), relid: 1, replica_identity: ReplicaIdentity::Default, columns }
}

fn event(t: Arc<TableSchema>) -> ChangeEvent {
    let row = (0..20)
        .map(|i| {
            Datum::Text(Bytes::from(match i % 4 {
                0 => format!("{}", 1000 + i),
                1 => format!("some text value number {i}"),
                2 => format!("{i}.125"),
                _ => "t".to_string(),
            }))
        })
        .collect();
    let position = SourcePosition { lsn: Lsn(1 << 30), commit_lsn: Lsn(1 << 30), xid: 1, commit_time_us: 1_700_000_000_000_000, seq: 0 };
    ChangeEvent { op: Op::Update, table: t, before: None, after: Some(row), position }
}

const CHAIN: &str = r#"
- rename_fields: {fields: {c1: title}}
- cast: {fields: {c2: "decimal(12,2)"}}
- mask: {fields: [c5], replacement: "***"}
- insert_field: {name: region, value: eu}
- drop_fields: {fields: [c9, c13]}
"#;

fn setup() -> (sluice_core::transform::TableTransform, ChangeEvent) {
    let t = Arc::new(table());
    let steps: Vec<Step> =
        serde_yaml::with::singleton_map_recursive::deserialize(serde_yaml::Deserializer::from_str(CHAIN)).expect("valid chain");
    let chain = Chain::new(steps).expect("valid chain");
    (chain.compile(&t).expect("compiles"), event(t))
}

fn bench(c: &mut Criterion) {
    let (compiled, e) = setup();
    let mut g = c.benchmark_group("transform");
    g.bench_function("clone_event_baseline", |b| b.iter(|| std::hint::black_box(e.clone())));
    // The pipeline hands the chain events it owns: the input clone is setup, not timed.
    g.bench_function("chain_5_steps_20_columns", |b| {
        b.iter_batched(|| e.clone(), |e| compiled.apply_owned(e).expect("applies"), criterion::BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, bench);

/// Criterion's report, then the final JSON line every Sluice benchmark prints
/// (a plain timed loop of each, in the same run).
fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let (compiled, e) = setup();
    let per = |f: &dyn Fn()| {
        let n = 2_000_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / f64::from(n)
    };
    let base = per(&|| {
        std::hint::black_box(e.clone());
    });
    // Clone + chain, minus the clone: what the chain adds to an event the pipeline owns.
    let with_clone = per(&|| {
        std::hint::black_box(compiled.apply_owned(std::hint::black_box(&e).clone()).expect("applies"));
    });
    let chain = with_clone - base;
    println!(
        "{}",
        serde_json::json!({"bench": "transform", "steps": 5, "columns": 20, "chain_ns_per_event": chain,
                           "clone_event_ns": base, "clone_plus_chain_ns": with_clone, "chain_vs_clone": chain / base, "goal_ns": 1000})
    );
}
