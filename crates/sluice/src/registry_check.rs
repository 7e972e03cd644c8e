//! Asks the schema registry whether a migration's resulting schemas would be accepted.
//!
//! For each replicated table a migration changes, the table's new Avro value schema (the
//! Debezium envelope around the row) is derived as the Kafka sink derives it and sent
//! to the registry's compatibility endpoint for subject `<pipeline>.<schema>.<table>-value`, so the subject's own mode
//! (BACKWARD, FULL, ...) and the registry's own checker decide.

use sluice_ddl::{FileReport, Finding, Model, Verdict};

pub const RULE_ID: &str = "registry-compatibility";

pub fn subject(pipeline: &str, schema: &str, table: &str) -> String {
    format!("{pipeline}.{schema}.{table}-value")
}

/// Adds a blocking finding where the registry refuses a table's new schema, and
/// settles type changes the registry accepts as allowed.
pub fn apply(url: &str, pipeline: &str, model: &Model, report: &mut FileReport) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    for (key, statements) in report.touched.clone() {
        let Some(table) = model.table_schema(&key).filter(|_| model.tables.get(&key).is_some_and(|t| t.replicated)) else {
            continue;
        };
        let schema = sluice_kafka::envelope_schema(pipeline, &table);
        let subject = subject(pipeline, &key.0, &key.1);
        let endpoint = format!("{}/compatibility/subjects/{subject}/versions/latest?verbose=true", url.trim_end_matches('/'));
        let mut resp = agent
            .post(&endpoint)
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .send_json(serde_json::json!({ "schema": schema.to_string() }))
            .map_err(|e| anyhow::anyhow!("cannot reach the schema registry at {url}: {e}: check --registry"))?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        if status == 404 {
            continue; // nothing registered for this table yet
        }
        if status != 200 {
            anyhow::bail!("schema registry at {url} answered {status} for subject {subject}: {body}");
        }
        let compatible = body["is_compatible"].as_bool().unwrap_or(false);
        let last = *statements.last().expect("touched tables have statements");
        if compatible {
            for &i in &statements {
                for f in report.statements[i].findings.iter_mut().filter(|f| f.rule == "alter-column-type") {
                    f.verdict = Verdict::Allowed;
                    f.message += &format!("; registry subject {subject} accepts it under its compatibility mode");
                }
            }
        } else {
            let reasons: Vec<String> =
                body["messages"].as_array().map(|m| m.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
            let acknowledged = report.statements[last].acknowledgement(RULE_ID);
            report.statements[last].findings.push(Finding {
                rule: RULE_ID,
                verdict: Verdict::Blocked,
                message: format!("registry subject {subject} would reject the new schema of {}.{}: {}", key.0, key.1, reasons.join("; ")),
                rationale: "consumers read with the schemas registered for the topic; the registry refuses a schema its \
                            subject's compatibility mode does not allow, and the Kafka sink would stop",
                safe_alternative: "make the change compatible under the subject's mode (add optional fields, widen types), \
                                   or coordinate a new subject with its consumers",
                acknowledged,
            });
        }
    }
    report.recompute();
    Ok(())
}
