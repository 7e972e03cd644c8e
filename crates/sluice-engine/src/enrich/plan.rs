//! Per source table shape: which enricher appends which fields where (a `Plan`),
//! compiled once per shape; the snapshot enriches through the same plans.

use super::*;

pub(super) enum PlanStep {
    /// Appends `width` fields found by the key in columns `inputs`.
    Fetch {
        enricher: usize,
        inputs: Vec<usize>,
        width: usize,
    },
    Expr {
        enricher: usize,
        transform: TableTransform,
        width: usize,
    },
}

/// One source table shape's enrichment.
pub(crate) struct Plan {
    pub(super) source: Arc<TableSchema>,
    pub(super) output: Arc<TableSchema>,
    pub(super) steps: Vec<PlanStep>,
    pub(super) missing: bool,
    pub(super) keys: Vec<usize>,
}

impl Plan {
    pub(crate) fn output(&self) -> &Arc<TableSchema> {
        &self.output
    }
}

impl Enrichment {
    /// The enrichment of one source table shape (compiled once per shape).
    pub(crate) fn plan(&self, source: &Arc<TableSchema>) -> Result<Arc<Plan>, PgError> {
        let mut plans = self.plans.lock().expect("plans lock");
        if let Some((seen, p)) = plans.get_mut(&source.name) {
            if Arc::ptr_eq(seen, source) {
                return Ok(p.clone());
            }
            // The stream's copy of a shape the checks compiled: remember its pointer
            // so the next event is a pointer comparison, not a column-by-column one.
            if p.source.columns == source.columns {
                *seen = source.clone();
                return Ok(p.clone());
            }
        }
        let p = Arc::new(self.compile(source).map_err(PgError::permanent)?);
        plans.insert(source.name.clone(), (source.clone(), p.clone()));
        Ok(p)
    }

    pub(super) fn compile(&self, source: &Arc<TableSchema>) -> Result<Plan, String> {
        let mut schema = (**source).clone();
        let mut steps = Vec::new();
        for (k, e) in self.enrichers.iter().enumerate() {
            if !e.applies(&source.name) {
                continue;
            }
            let err = |m: String| format!("enrich[{k}] ({}): {m}", e.cfg.name);
            let find = |schema: &TableSchema, col: &str| {
                schema.columns.iter().position(|c| c.name == col).ok_or_else(|| {
                    let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
                    err(format!("column {col:?} is not in {} (its columns here: {})", source.name, names.join(", ")))
                })
            };
            let add = |schema: &mut TableSchema, cols: Vec<ColumnSchema>| {
                for c in &cols {
                    if schema.columns.iter().any(|x| x.name == c.name) {
                        return Err(err(format!("field {:?} already exists in {}: set a prefix", c.name, source.name)));
                    }
                }
                let n = cols.len();
                schema.columns.extend(cols);
                Ok(n)
            };
            if e.kind.replays() && !source.has_key() {
                return Err(err(format!(
                    "{} has no primary key: rows must be found again to be re-enriched; add a primary key or leave the table out (tables:)",
                    source.name
                )));
            }
            match &e.kind {
                Kind::Lookup(l) => {
                    let inputs = l.on.iter().map(|c| find(&schema, c)).collect::<Result<Vec<_>, _>>()?;
                    let width = add(&mut schema, l.columns())?;
                    steps.push(PlanStep::Fetch { enricher: k, inputs, width });
                }
                Kind::Http(h) => {
                    let inputs = vec![find(&schema, &h.key)?];
                    let width = add(&mut schema, h.columns())?;
                    steps.push(PlanStep::Fetch { enricher: k, inputs, width });
                }
                Kind::Expression(chain) => {
                    let t = chain.compile(&schema).map_err(|e| err(format!("expression: fields[{}]: {}", e.index, e.message)))?;
                    let width = t.output.columns.len() - schema.columns.len();
                    schema = (*t.output).clone();
                    steps.push(PlanStep::Expr { enricher: k, transform: t, width });
                }
            }
        }
        let missing = self.missing_field && !steps.is_empty();
        if missing {
            if schema.columns.iter().any(|c| c.name == MISSING_FIELD) {
                return Err(format!("{} already has a column {MISSING_FIELD}, which enrichment adds", source.name));
            }
            schema.columns.push(ColumnSchema::added(MISSING_FIELD, "text", PgType::Text, 25));
        }
        Ok(Plan { source: source.clone(), output: Arc::new(schema), steps, missing, keys: source.key_indexes().collect() })
    }

    /// The snapshot's hook for one table.
    pub(crate) fn for_snapshot(self: &Arc<Self>, source: &Arc<TableSchema>) -> Result<Option<Arc<dyn RowEnrich>>, PgError> {
        let plan = self.plan(source)?;
        if plan.steps.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(SnapshotEnrich { enrichment: self.clone(), plan })))
    }
}

pub(super) struct SnapshotEnrich {
    pub(super) enrichment: Arc<Enrichment>,
    pub(super) plan: Arc<Plan>,
}

impl RowEnrich for SnapshotEnrich {
    fn output(&self) -> &Arc<TableSchema> {
        &self.plan.output
    }

    fn enrich(&self, rows: Vec<Row>) -> BoxFuture<'_, Result<Vec<Row>, PgError>> {
        Box::pin(async move {
            let mut work: Vec<Work> =
                rows.into_iter().map(|row| Work { plan: self.plan.clone(), row, missing: Vec::new(), dead: None, now: true }).collect();
            let failed = self.enrichment.run(&mut work).await;
            self.enrichment
                .record(&failed)
                .await
                .map_err(|e| PgError::transient(format!("snapshot of {}: {e:#}", self.plan.source.name)))?;
            Ok(work.into_iter().filter(|w| w.dead.is_none()).map(|w| w.row).collect())
        })
    }
}
