//! The source-to-target offset map. Each batch the mirror commits on the target
//! carries, in the same transaction, one record per source partition it touched:
//! where the mirror's reading of that partition stands (`next`: the next source offset
//! to read), where the target partition stands (`tnext`), and the exact offsets of
//! every record copied, as runs of consecutive offsets (`[source, target, count]`).
//! Read back, these records are both the mirror's resume position and a dense map
//! from every source offset to its target offset, so any committed group offset
//! translates exactly: the record a group would read next on the source is the
//! record it reads next on the target.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// One offsets-topic record (JSON: readable with any Kafka client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchOffsets {
    #[serde(rename = "t")]
    pub topic: String,
    #[serde(rename = "p")]
    pub partition: i32,
    /// The next source offset to read after this batch.
    pub next: i64,
    /// The target offset after this batch's last record.
    pub tnext: i64,
    /// `[source offset, target offset, count]`: runs of records copied one to one.
    pub runs: Vec<[i64; 3]>,
}

impl BatchOffsets {
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }
}

/// Builds a partition's runs as records are delivered in order.
#[derive(Debug, Default)]
pub(crate) struct RunBuilder {
    pub runs: Vec<[i64; 3]>,
}

impl RunBuilder {
    pub fn push(&mut self, source: i64, target: i64) {
        if let Some(last) = self.runs.last_mut()
            && last[0] + last[2] == source
            && last[1] + last[2] == target
        {
            last[2] += 1;
            return;
        }
        self.runs.push([source, target, 1]);
    }
}

/// What a source offset becomes on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Translation {
    /// The target offset from which a consumer reads exactly the records it had not
    /// read on the source.
    Exact { target: i64 },
    /// The mirror has not read that far yet: translating now would make the group
    /// re-read what it already consumed, once those records arrive.
    Ahead { mirrored_to: i64 },
    /// The mirror has never copied this partition.
    Unknown,
}

/// One source partition's map.
#[derive(Debug, Default, Clone)]
pub struct PartitionMap {
    /// First source offset of each run -> (first target offset, count).
    runs: BTreeMap<i64, (i64, i64)>,
    /// Next source offset to read.
    pub next: i64,
    /// Target offset after the last copied record.
    pub tnext: i64,
}

impl PartitionMap {
    fn add(&mut self, b: &BatchOffsets) {
        for [s, t, n] in &b.runs {
            self.runs.insert(*s, (*t, *n));
        }
        self.next = self.next.max(b.next);
        self.tnext = self.tnext.max(b.tnext);
    }

    /// `committed` is a group's committed source offset: the next record it would read.
    pub fn translate(&self, committed: i64) -> Translation {
        if committed > self.next {
            return Translation::Ahead { mirrored_to: self.next };
        }
        if let Some((s, (t, n))) = self.runs.range(..=committed).next_back()
            && committed < s + n
        {
            return Translation::Exact { target: t + (committed - s) };
        }
        // The offset fell between copied records (a transaction marker, an aborted or
        // compacted-away record, a record that came from the target): the group's
        // next record is the first copied one after it, or whatever comes next.
        match self.runs.range(committed..).next() {
            Some((_, (t, _))) => Translation::Exact { target: *t },
            None => Translation::Exact { target: self.tnext },
        }
    }
}

/// The map of every mirrored partition, rebuilt from the offsets topic at start and
/// extended as batches commit.
#[derive(Debug, Default, Clone)]
pub struct OffsetMap {
    pub partitions: HashMap<(String, i32), PartitionMap>,
}

impl OffsetMap {
    pub fn add(&mut self, b: &BatchOffsets) {
        self.partitions.entry((b.topic.clone(), b.partition)).or_default().add(b);
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<&PartitionMap> {
        self.partitions.get(&(topic.to_string(), partition))
    }

    pub fn translate(&self, topic: &str, partition: i32, committed: i64) -> Translation {
        self.get(topic, partition).map_or(Translation::Unknown, |m| m.translate(committed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(next: i64, tnext: i64, copied: &[(i64, i64)]) -> BatchOffsets {
        let mut r = RunBuilder::default();
        for (s, t) in copied {
            r.push(*s, *t);
        }
        BatchOffsets { topic: "t".into(), partition: 0, next, tnext, runs: r.runs }
    }

    #[test]
    fn every_offset_translates_to_the_record_a_consumer_reads_next() {
        let mut m = OffsetMap::default();
        // Source 0..=2 copied to 0..=2 (marker at target 3); source 3 is a marker on
        // the source; source 4..=5 copied to 4..=5 (marker at 6).
        m.add(&batch(3, 3, &[(0, 0), (1, 1), (2, 2)]));
        m.add(&batch(6, 6, &[(4, 4), (5, 5)]));
        assert_eq!(m.get("t", 0).unwrap().runs.len(), 2);
        let tr = |c| m.translate("t", 0, c);
        assert_eq!(tr(0), Translation::Exact { target: 0 });
        assert_eq!(tr(2), Translation::Exact { target: 2 });
        assert_eq!(tr(3), Translation::Exact { target: 4 }, "the marker's offset means: next is source 4");
        assert_eq!(tr(5), Translation::Exact { target: 5 });
        assert_eq!(tr(6), Translation::Exact { target: 6 }, "everything read: the target's end");
        assert_eq!(tr(7), Translation::Ahead { mirrored_to: 6 });
        assert_eq!(m.translate("t", 1, 0), Translation::Unknown);
    }

    #[test]
    fn runs_break_where_either_side_skips() {
        let b = batch(10, 9, &[(0, 5), (1, 6), (3, 7), (4, 9)]);
        assert_eq!(b.runs, vec![[0, 5, 2], [3, 7, 1], [4, 9, 1]]);
    }
}
