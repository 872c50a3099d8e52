//! How many messages the state machine stored since its newest snapshot, for the snapshot
//! policy by message count (`raft.snapshot_threshold_messages`).
//!
//! openraft's own policy (`raft.snapshot_threshold`) counts log entries, and an entry holds
//! anything from one message to a whole group-commit batch of 256. Counted in entries alone, a
//! busy node's log could hold millions of messages behind its snapshot: a large
//! `raft-log.db`, and a joining node that replays all of it instead of receiving a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// The two global message indexes the policy compares; shared by the state machine (which
/// moves them) and the task that asks openraft for a snapshot.
#[derive(Debug, Default)]
pub struct MessageGrowth {
    /// Global index of the last stored message.
    stored: AtomicU64,
    /// Global index of the last message in the newest snapshot, built or installed.
    in_snapshot: AtomicU64,
    changed: Notify,
}

impl MessageGrowth {
    pub(crate) fn new(stored: u64, in_snapshot: u64) -> MessageGrowth {
        MessageGrowth {
            stored: AtomicU64::new(stored),
            in_snapshot: AtomicU64::new(in_snapshot),
            changed: Notify::new(),
        }
    }

    /// Messages in the newest snapshot, and messages stored after it.
    pub fn since_snapshot(&self) -> (u64, u64) {
        // `stored` first: an install raises `in_snapshot` before `stored`, so a read across
        // one can only undercount (and wait for the next change), never see the new state's
        // messages against the old snapshot and ask for a needless build.
        let stored = self.stored.load(Ordering::Acquire);
        let in_snapshot = self.in_snapshot.load(Ordering::Acquire);
        (in_snapshot, stored.saturating_sub(in_snapshot))
    }

    /// Resolves after the next change (at once if one happened since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    pub(crate) fn set_stored(&self, last_index: u64) {
        self.stored.store(last_index, Ordering::Release);
        self.changed.notify_one();
    }

    /// A snapshot holding messages up to `last_index` was built or installed. Only ever moves
    /// forward: a build that started before an install may finish after it.
    pub(crate) fn set_in_snapshot(&self, last_index: u64) {
        self.in_snapshot.fetch_max(last_index, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Whether a snapshot is due: the messages stored since the newest snapshot reach `threshold`,
/// or as many as that snapshot holds, whichever is more. Each snapshot copies every message,
/// so growing the step with the state keeps the time spent on snapshots in proportion to the
/// messages written, while the log never holds much more than the state itself.
/// A `threshold` of 0 turns the rule off.
pub fn snapshot_due(in_snapshot: u64, since: u64, threshold: u64) -> bool {
    threshold > 0 && since >= threshold.max(in_snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_the_threshold_then_after_as_many_as_the_snapshot_holds() {
        assert!(!snapshot_due(0, 99, 100));
        assert!(snapshot_due(0, 100, 100));
        // A snapshot of 100 messages: the next one after 100 more.
        assert!(!snapshot_due(100, 99, 100));
        assert!(snapshot_due(100, 100, 100));
        // A snapshot of 1,000: the next after 1,000 more, not after 100.
        assert!(!snapshot_due(1_000, 999, 100));
        assert!(snapshot_due(1_000, 1_000, 100));
    }

    #[test]
    fn a_zero_threshold_never_asks() {
        assert!(!snapshot_due(0, u64::MAX, 0));
    }

    #[tokio::test]
    async fn counts_move_and_wake_the_waiter() {
        let g = MessageGrowth::new(10, 4);
        assert_eq!(g.since_snapshot(), (4, 6));
        g.set_stored(20);
        // The change before the wait is not lost.
        g.changed().await;
        assert_eq!(g.since_snapshot(), (4, 16));
        g.set_in_snapshot(15);
        g.set_in_snapshot(12);
        assert_eq!(g.since_snapshot(), (15, 5));
    }
}
