//! The lease cycle pipelines and mirrors share: renew the leases held here and publish
//! each one's status, ask what is no longer wanted here (or has ended by itself) to
//! stop, and record each end in its row (released, failed with a minute's wait, or,
//! for a finished teardown, deleted). What differs (how each is claimed and started,
//! what its status says) stays with its kind.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// A kind of thing this server runs under a lease on a row of [`Leased::TABLE`]: its
/// own part of what [`Held`] keeps.
pub(super) trait Leased {
    /// The table of the rows (`pipelines`, `mirrors`): a constant, never a name a
    /// user gave.
    const TABLE: &'static str;
    /// What logs call it.
    const KIND: &'static str;
    /// Its status as published while it runs (`state` among it).
    fn status(&self, server: &str) -> Value;
    /// Whether it is still wanted here, given its row's `desired` and whether the row's
    /// generation is still the one it was started with.
    fn wanted(&self, desired: &str, same_generation: bool) -> bool;
    /// Tells it to stop; its task ends when it has.
    fn ask_stop(&self);
    /// A teardown that, once it succeeds, takes its row away.
    fn deletes_row(&self) -> bool {
        false
    }
}

/// One row run here: the kind's part, and the task and lease bookkeeping every kind has.
pub(super) struct Held<K> {
    pub(super) kind: K,
    generation: i32,
    task: JoinHandle<Result<()>>,
    started: Instant,
    /// Asked to stop already: its lease is still renewed until its task ends, and the
    /// pass never waits for it (the others' leases must not lapse meanwhile).
    stopping: bool,
}

impl<K: Leased> Held<K> {
    pub(super) fn new(kind: K, generation: i32, task: JoinHandle<Result<()>>) -> Self {
        Self { kind, generation, task, started: Instant::now(), stopping: false }
    }

    /// Stops it and waits for its task to end (a mirror's batch in flight commits or
    /// aborts first).
    pub(super) async fn stop(self) {
        self.kind.ask_stop();
        let _ = self.task.await;
    }
}

/// Renews the leases held here, publishing each status; what each row now wants
/// (`desired`, `generation`), for the rows still held by this server.
pub(super) async fn renew<R: Leased>(
    c: &Client,
    me: &str,
    lease_secs: f64,
    local: &HashMap<i64, Held<R>>,
) -> Result<HashMap<i64, (String, i32)>> {
    let ids: Vec<i64> = local.keys().copied().collect();
    let statuses: Vec<Value> = ids.iter().map(|id| local[id].kind.status(me)).collect();
    let rows = c
        .query(
            &format!(
                "UPDATE {t} r SET lease_until = now() + make_interval(secs => $2), status = u.status
                 FROM unnest($3::int8[], $4::jsonb[]) AS u(id, status)
                 WHERE r.id = u.id AND r.owner = $1
                 RETURNING r.id, r.desired, r.generation",
                t = R::TABLE
            ),
            &[&me, &lease_secs, &ids, &statuses],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// Asks to stop what is gone, no longer wanted, lost or finished by itself; the ids
/// whose task has ended (all asked to stop when this server shuts down, which waits
/// for them, having nothing else to renew).
pub(super) fn ended<R: Leased>(
    local: &mut HashMap<i64, Held<R>>,
    mut wanted: HashMap<i64, (String, i32)>,
    shutting_down: bool,
) -> Vec<i64> {
    let mut ended = Vec::new();
    for (id, r) in local.iter_mut() {
        let still = wanted.remove(id).is_some_and(|(d, g)| r.kind.wanted(&d, g == r.generation));
        let finished = r.task.is_finished();
        if !r.stopping && (!still || shutting_down || finished) {
            r.kind.ask_stop();
            r.stopping = true;
        }
        if r.stopping && (shutting_down || finished) {
            ended.push(*id);
        }
    }
    ended
}

/// Waits for `r`'s task (ended, or this server is shutting down) and records how it
/// ended in its row. A failure waits a minute before it is tried again anywhere, with
/// its error in the status.
pub(super) async fn record_end<R: Leased>(c: &Client, me: &str, id: i64, r: Held<R>) -> Result<()> {
    let failure = match r.task.await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(e) => Some(format!("{} task: {e}", R::KIND)),
    };
    let t = R::TABLE;
    match failure {
        Some(err) => {
            tracing::error!(kind = R::KIND, id, error = %err, "failed");
            let mut st = r.kind.status(me);
            st["state"] = json!("failed");
            st["error"] = json!(err);
            let sql = format!("UPDATE {t} SET owner = NULL, status = $3, retry_at = now() + interval '60 s' WHERE id = $1 AND owner = $2");
            c.execute(&sql, &[&id, &me, &st]).await?;
        }
        None if r.kind.deletes_row() => {
            c.execute(&format!("DELETE FROM {t} WHERE id = $1 AND owner = $2 AND desired = 'deleting'"), &[&id, &me]).await?;
            tracing::info!(kind = R::KIND, id, "torn down");
        }
        None => {
            let mut st = r.kind.status(me);
            st["state"] = json!("stopped");
            c.execute(&format!("UPDATE {t} SET owner = NULL, status = $3 WHERE id = $1 AND owner = $2"), &[&id, &me, &st]).await?;
            tracing::info!(kind = R::KIND, id, ran_for = ?r.started.elapsed(), "stopped on this server");
        }
    }
    Ok(())
}

/// A claimed row that could not be started (its config no longer loads, egress
/// refused): released, failed with the reason, tried again in a minute.
pub(super) async fn not_started<R: Leased>(c: &Client, id: i64, error: &str) -> Result<()> {
    tracing::error!(kind = R::KIND, id, %error, "not started");
    let sql = format!("UPDATE {} SET owner = NULL, retry_at = now() + interval '60 s', status = $2 WHERE id = $1", R::TABLE);
    c.execute(&sql, &[&id, &json!({"state": "failed", "error": error})]).await?;
    Ok(())
}

/// Gives up every lease this server holds (it is shutting down, everything stopped),
/// so another server takes them at once rather than when they run out.
pub(super) async fn release_all<R: Leased>(c: &Client, me: &str) {
    let _ = c.execute(&format!("UPDATE {} SET owner = NULL WHERE owner = $1", R::TABLE), &[&me]).await;
}
