//! Which Kafka offsets may be committed: per partition, only the contiguous prefix of
//! completed work.
//!
//! Micro-batches are dispatched in consumption order but may become durable out of order (a
//! later batch can finish first). Committing a later batch's offset would tell the group that
//! the earlier, not yet durable records are done, and a crash would lose them. So each
//! partition keeps its dispatched batches in order, and its commit point advances only past a
//! prefix of batches that are all durable.
//!
//! Revocation drops a partition's state and bumps its generation: records of that partition
//! that were read but not dispatched are discarded (the new owner reads them again), and late
//! completions of batches dispatched before the revocation no longer move any commit point.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// A topic-partition.
pub type TopicPartition = (String, i32);

/// A batch's identity: unique for the life of a consumer.
pub type BatchSeq = u64;

/// What a batch holds of one partition: the partition, its generation when read, and the
/// last offset (inclusive).
pub type PartitionRange = (TopicPartition, u64, i64);

#[derive(Debug)]
struct Dispatched {
    seq: BatchSeq,
    /// The offset to commit once this batch and all before it are durable (its last offset + 1).
    next_offset: i64,
    done: bool,
}

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    queue: VecDeque<Dispatched>,
    /// Next offset that is safe to commit (everything below it is durable).
    durable: Option<i64>,
    /// Last offset committed to the group.
    committed: Option<i64>,
}

/// Commit bookkeeping of one consumer.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: BTreeMap<TopicPartition, PartitionState>,
    batches: HashMap<BatchSeq, Vec<TopicPartition>>,
    generations: HashMap<TopicPartition, u64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current generation of a partition (changes on every revocation).
    pub fn generation(&self, tp: &TopicPartition) -> u64 {
        self.generations.get(tp).copied().unwrap_or(0)
    }

    /// Records that batch `seq` was dispatched holding, per partition, offsets up to `last`
    /// (inclusive). Parts whose generation is not current are ignored.
    pub fn dispatch(&mut self, seq: BatchSeq, parts: &[PartitionRange]) {
        let mut touched = Vec::new();
        for (tp, generation, last) in parts {
            if *generation != self.generation(tp) {
                continue;
            }
            let st = self.parts.entry(tp.clone()).or_default();
            st.generation = *generation;
            st.queue.push_back(Dispatched {
                seq,
                next_offset: last + 1,
                done: false,
            });
            touched.push(tp.clone());
        }
        self.batches.insert(seq, touched);
    }

    /// Marks batch `seq` durable (in every sink); advances commit points over durable prefixes.
    /// Unknown or revoked batches are ignored.
    pub fn complete(&mut self, seq: BatchSeq) {
        let Some(parts) = self.batches.remove(&seq) else {
            return;
        };
        for tp in parts {
            let Some(st) = self.parts.get_mut(&tp) else {
                continue;
            };
            if let Some(d) = st.queue.iter_mut().find(|d| d.seq == seq) {
                d.done = true;
            }
            while st.queue.front().is_some_and(|d| d.done) {
                let d = st.queue.pop_front().expect("front exists");
                st.durable = Some(d.next_offset);
            }
        }
    }

    /// Offsets that are durable but not yet committed: `(partition, next offset)`.
    pub fn pending_commits(&self) -> Vec<(TopicPartition, i64)> {
        self.parts
            .iter()
            .filter_map(|(tp, st)| match (st.durable, st.committed) {
                (Some(d), Some(c)) if d <= c => None,
                (Some(d), _) => Some((tp.clone(), d)),
                _ => None,
            })
            .collect()
    }

    /// Notes that these offsets were committed.
    pub fn committed(&mut self, commits: &[(TopicPartition, i64)]) {
        for (tp, off) in commits {
            if let Some(st) = self.parts.get_mut(tp) {
                st.committed = Some(st.committed.map_or(*off, |c| c.max(*off)));
            }
        }
    }

    /// Batches dispatched for `tp` and not yet durable.
    pub fn in_flight(&self, tp: &TopicPartition) -> usize {
        self.parts
            .get(tp)
            .map_or(0, |st| st.queue.iter().filter(|d| !d.done).count())
    }

    /// Batches dispatched and not yet durable (or revoked).
    pub fn in_flight_batches(&self) -> usize {
        self.batches.len()
    }

    /// Forgets a partition (revoked or lost): its durable-but-uncommitted offset is returned
    /// so the caller can commit it first; its generation moves on.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        *self.generations.entry(tp.clone()).or_default() += 1;
        let st = self.parts.remove(tp)?;
        match (st.durable, st.committed) {
            (Some(d), Some(c)) if d <= c => None,
            (d, _) => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("t".into(), p)
    }

    #[test]
    fn commits_only_the_contiguous_durable_prefix() {
        let mut t = OffsetTracker::new();
        t.dispatch(1, &[(tp(0), 0, 9), (tp(1), 0, 4)]);
        t.dispatch(2, &[(tp(0), 0, 19)]);
        t.dispatch(3, &[(tp(0), 0, 29), (tp(1), 0, 7)]);
        // Batch 2 finishes first: nothing of partition 0 may be committed yet.
        t.complete(2);
        assert!(t.pending_commits().is_empty());
        assert_eq!(t.in_flight(&tp(0)), 2);
        // Batch 3: partition 1 still waits for batch 1.
        t.complete(3);
        assert!(t.pending_commits().is_empty());
        // Batch 1 releases everything: offsets past the last record of batch 3.
        t.complete(1);
        assert_eq!(t.pending_commits(), vec![(tp(0), 30), (tp(1), 8)]);
        t.committed(&t.pending_commits());
        assert!(t.pending_commits().is_empty());
        assert_eq!(t.in_flight_batches(), 0);
    }

    #[test]
    fn a_gap_holds_the_commit_point_until_filled() {
        let mut t = OffsetTracker::new();
        for seq in 1..=5 {
            t.dispatch(seq, &[(tp(0), 0, seq as i64 * 10 - 1)]);
        }
        t.complete(1);
        t.complete(3);
        t.complete(4);
        assert_eq!(t.pending_commits(), vec![(tp(0), 10)]);
        t.committed(&[(tp(0), 10)]);
        t.complete(2);
        assert_eq!(t.pending_commits(), vec![(tp(0), 40)]);
    }

    #[test]
    fn revocation_forgets_a_partition_and_ignores_late_completions() {
        let mut t = OffsetTracker::new();
        t.dispatch(1, &[(tp(0), 0, 9), (tp(1), 0, 9)]);
        t.dispatch(2, &[(tp(0), 0, 19)]);
        t.complete(1);
        // Durable but not committed: revoke hands it back for a final commit.
        assert_eq!(t.revoke(&tp(0)), Some(10));
        assert_eq!(t.generation(&tp(0)), 1);
        // Batch 2 completes after the revocation: no commit for partition 0.
        t.complete(2);
        assert_eq!(t.pending_commits(), vec![(tp(1), 10)]);
        // Records read before the revocation (generation 0) are not tracked any more.
        t.dispatch(3, &[(tp(0), 0, 29), (tp(0), 1, 39)]);
        t.complete(3);
        assert_eq!(t.pending_commits(), vec![(tp(0), 40), (tp(1), 10)]);
        // Nothing durable: nothing to hand back.
        t.dispatch(4, &[(tp(1), 0, 19)]);
        t.committed(&[(tp(1), 10)]);
        assert_eq!(t.revoke(&tp(1)), None);
    }
}
