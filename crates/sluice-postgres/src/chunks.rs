//! The snapshot's chunk state (`sluice.snapshot_chunks`) and what it implies for the
//! stream: which changes a chunk copied as of some LSN already holds.

use std::collections::HashMap;

use sluice_core::{ChangeEvent, Lsn, Op, Row};
use tokio_postgres::Client;

use crate::error::{PgError, Result};

/// See [`SnapshotFilter::truncate_scope`].
#[derive(Debug, PartialEq, Eq)]
pub enum TruncateScope {
    /// No chunk was copied after the truncate (or there are none): all rows go.
    Everything,
    /// Every chunk was copied after it: the sink holds no row it removed.
    Nothing,
    /// Only the rows in these integer key ranges `[lo, hi)` were copied before it.
    Ranges(Vec<(Option<i64>, Option<i64>)>),
}

/// One snapshot chunk: a key range of a table, copied as of `snapshot_lsn`.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub table: String,
    pub chunk: i32,
    pub lo: Option<i64>,
    pub hi: Option<i64>,
    pub done: bool,
    pub snapshot_lsn: Option<Lsn>,
    /// The bounds `[lo_key, hi_key)` of a table whose key is not one integer column:
    /// the key's columns as text (`None`: open).
    pub lo_key: Option<Vec<String>>,
    pub hi_key: Option<Vec<String>>,
}

impl Chunk {
    fn contains(&self, key: i64) -> bool {
        self.lo.is_none_or(|lo| key >= lo) && self.hi.is_none_or(|hi| key < hi)
    }
}

pub(crate) async fn load_chunks(client: &Client, pipeline: &str) -> Result<Vec<Chunk>> {
    let rows = client
        .query(
            "SELECT table_name, chunk, lo, hi, done, snapshot_lsn::text, lo_key, hi_key FROM sluice.snapshot_chunks
             WHERE pipeline = $1 ORDER BY table_name, chunk",
            &[&pipeline],
        )
        .await
        .map_err(|e| PgError::from_pg("reading snapshot state from the sink", e))?;
    rows.iter()
        .map(|r| {
            let lsn: Option<String> = r.get(5);
            Ok(Chunk {
                table: r.get(0),
                chunk: r.get(1),
                lo: r.get(2),
                hi: r.get(3),
                done: r.get(4),
                snapshot_lsn: lsn.map(|l| l.parse()).transpose().map_err(|e: sluice_core::CoreError| PgError::permanent(e.to_string()))?,
                lo_key: r.get(6),
                hi_key: r.get(7),
            })
        })
        .collect()
}

/// Which stream changes the snapshot already contains. A chunk copied as of LSN `s`
/// holds the effect of every transaction that committed before `s`, so those are
/// skipped for keys in that chunk; after the last chunk's LSN, nothing is.
#[derive(Debug, Default)]
pub struct SnapshotFilter {
    by_table: HashMap<String, Vec<Chunk>>,
    max_lsn: Lsn,
    /// A chunk has no position yet (not copied): it may still be copied.
    uncopied: bool,
}

impl SnapshotFilter {
    pub(crate) fn new(chunks: Vec<Chunk>) -> Self {
        let mut f = SnapshotFilter::default();
        for c in chunks {
            match c.snapshot_lsn {
                Some(l) => f.max_lsn = f.max_lsn.max(l),
                None => f.uncopied = true,
            }
            f.by_table.entry(c.table.clone()).or_default().push(c);
        }
        f
    }

    /// The snapshot LSN of the chunk holding `key` (or of the table's only chunk).
    /// Without an integer key to find the chunk by, the earliest of the table's chunks:
    /// a change is skipped only when every chunk holds it. (A change that a later chunk
    /// holds already is applied again; the stream brings every change after it too, so
    /// a sink that keeps rows by key ends where the source is.)
    fn snapshot_lsn(&self, table: &str, key: Option<i64>) -> Option<Lsn> {
        let chunks = self.by_table.get(table)?;
        // A key that reads as an integer (a numeric or text key's value) says nothing
        // about sampled ranges.
        let sampled = chunks.iter().any(|c| c.lo_key.is_some() || c.hi_key.is_some());
        let chunk = match (chunks.len(), key) {
            (1, _) => &chunks[0],
            (_, Some(k)) if !sampled => chunks.iter().find(|c| c.contains(k))?,
            _ => return chunks.iter().map(|c| c.snapshot_lsn).min().flatten(),
        };
        chunk.snapshot_lsn
    }

    /// Whether the chunk holding the row with integer key `key` was copied after
    /// `commit_lsn` (so holds that transaction's effect).
    pub fn covers(&self, table: &str, key: Option<i64>, commit_lsn: Lsn) -> bool {
        commit_lsn < self.max_lsn && self.snapshot_lsn(table, key).is_some_and(|s| commit_lsn < s)
    }

    /// What a TRUNCATE of `table` committed at `commit_lsn` still has to remove from a
    /// sink holding the snapshot: chunks copied after it hold no row it removed.
    pub fn truncate_scope(&self, table: &str, commit_lsn: Lsn) -> TruncateScope {
        let chunks = self.by_table.get(table).map(Vec::as_slice).unwrap_or(&[]);
        let before: Vec<&Chunk> = chunks.iter().filter(|c| c.snapshot_lsn.is_none_or(|s| commit_lsn >= s)).collect();
        if before.len() == chunks.len() {
            TruncateScope::Everything
        } else if before.is_empty() {
            TruncateScope::Nothing
        } else if chunks.iter().any(|c| c.lo_key.is_some() || c.hi_key.is_some()) {
            // Sampled key ranges have no integer bounds to delete by. Everything is
            // right here too: every change after the earliest chunk is applied (see
            // `snapshot_lsn`), so the rows later chunks copied come back from the stream.
            TruncateScope::Everything
        } else {
            TruncateScope::Ranges(before.iter().map(|c| (c.lo, c.hi)).collect())
        }
    }

    /// Whether a change committed at `commit_lsn` is past every chunk's position: the
    /// sink then holds exactly the source's rows as they were before it (no chunk can
    /// hold its effect, nor be copied later).
    pub fn settled(&self, commit_lsn: Lsn) -> bool {
        !self.uncopied && commit_lsn >= self.max_lsn
    }

    /// No snapshot chunk recorded (no snapshot ran, or none was started).
    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }

    /// The pipeline's snapshot chunks, as recorded in a state database.
    pub async fn load(state: &Client, pipeline: &str) -> Result<Self> {
        Ok(Self::new(load_chunks(state, pipeline).await?))
    }

    /// Whether the snapshot already holds this change's effect, for sinks that take
    /// events one by one: the row the change leaves behind (or removes) was copied
    /// after the change committed. A truncate is covered when every chunk of its
    /// table was copied after it.
    pub fn covers_event(&self, e: &ChangeEvent) -> bool {
        if e.position.commit_lsn >= self.max_lsn {
            return false;
        }
        let table = e.table.name.to_string();
        if e.op == Op::Truncate {
            return self
                .by_table
                .get(&table)
                .is_some_and(|cs| cs.iter().all(|c| c.snapshot_lsn.is_some_and(|s| e.position.commit_lsn < s)));
        }
        let Some(row) = e.after.as_ref().or(e.before.as_ref()) else { return false };
        let keys: Vec<usize> = e.table.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        let idx = match keys.as_slice() {
            [k] => Some(*k),
            _ => None,
        };
        self.covers(&table, int_key(row, idx), e.position.commit_lsn)
    }
}

/// The value of a table's single integer key column (`idx`), by which chunks are cut.
pub fn int_key(row: &Row, idx: Option<usize>) -> Option<i64> {
    std::str::from_utf8(row.get(idx?)?.as_text()?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: i32, lo: Option<i64>, hi: Option<i64>, lsn: u64) -> Chunk {
        Chunk { table: "public.t".into(), chunk: n, lo, hi, done: true, snapshot_lsn: Some(Lsn(lsn)), lo_key: None, hi_key: None }
    }

    fn keyed(n: i32, lo: Option<&str>, hi: Option<&str>, lsn: u64) -> Chunk {
        let key = |k: Option<&str>| k.map(|k| vec![k.to_string()]);
        Chunk {
            table: "public.u".into(),
            chunk: n,
            lo: None,
            hi: None,
            done: true,
            snapshot_lsn: Some(Lsn(lsn)),
            lo_key: key(lo),
            hi_key: key(hi),
        }
    }

    #[test]
    fn sampled_key_ranges_skip_only_what_every_chunk_holds() {
        let f = SnapshotFilter::new(vec![keyed(0, None, Some("8"), 10), keyed(1, Some("8"), None, 50)]);
        assert!(f.covers("public.u", None, Lsn(9)), "both chunks were copied after LSN 9");
        assert!(!f.covers("public.u", None, Lsn(20)), "chunk 0 was copied before LSN 20: its rows need the change");
        let later_first = SnapshotFilter::new(vec![keyed(0, None, Some("8"), 50), keyed(1, Some("8"), None, 10)]);
        assert!(!later_first.covers("public.u", Some(9), Lsn(20)), "a text or numeric key that reads as an integer finds no sampled chunk");
        assert_eq!(f.truncate_scope("public.u", Lsn(20)), TruncateScope::Everything);
        assert_eq!(f.truncate_scope("public.u", Lsn(5)), TruncateScope::Nothing);
    }

    #[test]
    fn filter_skips_only_what_each_chunk_already_has() {
        let f = SnapshotFilter::new(vec![chunk(0, None, Some(100), 10), chunk(1, Some(100), None, 50)]);
        assert!(!f.covers("public.t", Some(5), Lsn(20)), "chunk 0 was copied before LSN 20");
        assert!(f.covers("public.t", Some(150), Lsn(20)), "chunk 1 was copied after LSN 20");
        assert!(!f.covers("public.t", Some(150), Lsn(50)));
        assert!(f.covers("public.t", Some(5), Lsn(9)));
        assert!(!f.covers("public.other", Some(5), Lsn(1)));
    }

    #[test]
    fn settled_only_past_every_copied_chunk() {
        let f = SnapshotFilter::new(vec![chunk(0, None, Some(100), 10), chunk(1, Some(100), None, 50)]);
        assert!(!f.settled(Lsn(20)), "chunk 1 copied at 50 may hold a row inserted at 20");
        assert!(f.settled(Lsn(50)) && f.settled(Lsn(60)));
        let mut waiting = chunk(2, Some(200), None, 0);
        waiting.snapshot_lsn = None;
        let f = SnapshotFilter::new(vec![chunk(0, None, Some(100), 10), waiting]);
        assert!(!f.settled(Lsn(1000)), "a chunk not copied yet may copy any row");
        assert!(SnapshotFilter::default().settled(Lsn(1)), "no snapshot: nothing to overlap");
    }

    #[test]
    fn a_truncate_removes_only_what_chunks_copied_before_it_hold() {
        let f = SnapshotFilter::new(vec![chunk(0, None, Some(100), 10), chunk(1, Some(100), None, 50)]);
        assert_eq!(f.truncate_scope("public.t", Lsn(20)), TruncateScope::Ranges(vec![(None, Some(100))]));
        assert_eq!(f.truncate_scope("public.t", Lsn(5)), TruncateScope::Nothing);
        assert_eq!(f.truncate_scope("public.t", Lsn(60)), TruncateScope::Everything);
        assert_eq!(f.truncate_scope("public.other", Lsn(5)), TruncateScope::Everything);
    }
}
