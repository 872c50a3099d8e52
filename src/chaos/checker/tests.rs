//! The checker on hand-made histories: a clean one passes, and each kind of broken promise is
//! reported. A checker that cannot fail proves nothing.

use std::collections::BTreeMap;

use super::*;
use crate::chaos::history::{ReadResult, Recovery, StreamEvent, Subscription};

const CONV: &str = "general";

fn entry(index: u64, seq: u64, msg: &str) -> Entry {
    Entry {
        index,
        seq,
        conv_id: CONV.into(),
        msg_id: msg.into(),
        sender: "s".into(),
        payload: format!("p-{msg}"),
    }
}

/// A history under construction: three nodes, clock in plain numbers.
struct Builder {
    ops: Vec<Op>,
    subs: Vec<Subscription>,
    finals: BTreeMap<u64, Vec<Entry>>,
}

impl Builder {
    /// Writes m1..=mN acknowledged one after the other (m_i from time 10i to 10i+5), and every
    /// node holding all of them in that order.
    fn sequential(n: u64) -> Builder {
        let mut b = Builder {
            ops: vec![],
            subs: vec![],
            finals: BTreeMap::new(),
        };
        let entries: Vec<Entry> = (1..=n).map(|i| entry(i + 1, i, &format!("m{i}"))).collect();
        for e in &entries {
            let t = e.seq * 10;
            b.write(&e.msg_id, t, t + 5, Outcome::Ok, Some(e.clone()));
        }
        for node in 1..=3 {
            b.finals.insert(node, entries.clone());
        }
        b
    }

    fn write(
        &mut self,
        msg: &str,
        invoke: u64,
        complete: u64,
        outcome: Outcome,
        ack: Option<Entry>,
    ) {
        let id = self.ops.len() as u64;
        self.ops.push(Op {
            id,
            process: "writer-0".into(),
            node: 1,
            invoke_ns: invoke,
            complete_ns: complete,
            action: Action::Write {
                conv_id: CONV.into(),
                msg_id: msg.into(),
                sender: "s".into(),
                payload: format!("p-{msg}"),
            },
            outcome,
            status: None,
            detail: String::new(),
            written: ack,
            read: None,
        });
    }

    fn read(&mut self, node: u64, invoke: u64, complete: u64, last_seq: u64, entries: Vec<Entry>) {
        let id = self.ops.len() as u64;
        self.ops.push(Op {
            id,
            process: "reader-0".into(),
            node,
            invoke_ns: invoke,
            complete_ns: complete,
            action: Action::Read {
                conv_id: CONV.into(),
                from: 1,
            },
            outcome: Outcome::Ok,
            status: Some(200),
            detail: String::new(),
            written: None,
            read: Some(ReadResult { last_seq, entries }),
        });
    }

    /// A subscriber on `node` that received these seqs (each with the final record).
    fn subscriber(&mut self, node: u64, seqs: &[u64]) {
        let finals = self.finals[&node].clone();
        let events = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| StreamEvent {
                at_ns: 100 + i as u64,
                connection: i as u32 / 2,
                node,
                id: *s,
                entry: finals[*s as usize - 1].clone(),
            })
            .collect();
        self.subs.push(Subscription {
            name: format!("sub-{node}"),
            node,
            conv_id: CONV.into(),
            connections: seqs.len() as u32 / 2 + 1,
            events,
        });
    }

    fn check(self) -> Verdict {
        check(&History {
            ops: self.ops,
            subscriptions: self.subs,
            finals: self.finals,
            recovery: Recovery {
                write_after_heal_ms: Some(800),
                bound_ms: 10_000,
            },
        })
    }
}

/// Asserts that `kind` and nothing else was reported.
fn only(v: &Verdict, kind: &str) {
    assert!(v.has(kind), "expected {kind}, got {:?}", v.anomalies);
    assert!(
        v.counts.keys().all(|k| *k == kind),
        "expected only {kind}, got {:?}",
        v.counts
    );
}

#[test]
fn a_clean_history_passes() {
    let mut b = Builder::sequential(5);
    // An indeterminate write that did land, a retry answered with the original record, a
    // refused write that did not land, concurrent writes in either order.
    let stored = entry(7, 6, "m6");
    b.write("m6", 60, 90, Outcome::Indeterminate, None);
    b.write("m6", 91, 95, Outcome::Ok, Some(stored.clone()));
    b.write("never", 61, 62, Outcome::Fail, None);
    b.write("lost-in-flight", 63, 64, Outcome::Indeterminate, None);
    for node in 1..=3 {
        b.finals.get_mut(&node).unwrap().push(stored.clone());
    }
    b.read(2, 56, 70, 5, vec![entry(5, 4, "m4"), entry(6, 5, "m5")]);
    b.subscriber(1, &[1, 2, 3, 4, 5, 6]);
    b.subscriber(3, &[1, 2, 3, 4, 5, 6]);
    let v = b.check();
    assert!(v.is_clean(), "{:?}", v.anomalies);
}

#[test]
fn a_lost_write_is_reported() {
    let mut b = Builder::sequential(4);
    // m5 was acknowledged, but node 3 (and only node 3) does not have it.
    let e = entry(6, 5, "m5");
    b.write("m5", 50, 55, Outcome::Ok, Some(e.clone()));
    b.finals.get_mut(&1).unwrap().push(e.clone());
    b.finals.get_mut(&2).unwrap().push(e);
    let v = b.check();
    assert!(v.has("lost_write"), "{:?}", v.anomalies);
    assert!(v.anomalies[0].message.contains("node 3"));
    assert_eq!(v.anomalies[0].ops.len(), 1, "the write is named");
}

#[test]
fn a_lost_write_everywhere_is_reported() {
    let mut b = Builder::sequential(4);
    b.write("m5", 50, 55, Outcome::Ok, Some(entry(6, 5, "m5")));
    let v = b.check();
    only(&v, "lost_write");
    assert_eq!(v.counts["lost_write"], 3, "missing on each of three nodes");
}

#[test]
fn a_duplicate_is_reported() {
    let mut b = Builder::sequential(3);
    // A retried indeterminate write stored twice on every node.
    b.write("m4", 40, 45, Outcome::Indeterminate, None);
    b.write("m4", 46, 49, Outcome::Indeterminate, None);
    for node in 1..=3 {
        let f = b.finals.get_mut(&node).unwrap();
        f.push(entry(5, 4, "m4"));
        f.push(entry(6, 5, "m4"));
    }
    let v = b.check();
    only(&v, "duplicate");
}

#[test]
fn a_reorder_is_reported() {
    let mut b = Builder::sequential(2);
    // m3 acknowledged at 35; m4 sent at 40, after that; yet m4 sits before m3.
    b.write("m3", 30, 35, Outcome::Ok, Some(entry(5, 4, "m3")));
    b.write("m4", 40, 45, Outcome::Ok, Some(entry(4, 3, "m4")));
    for node in 1..=3 {
        let f = b.finals.get_mut(&node).unwrap();
        f.push(entry(4, 3, "m4"));
        f.push(entry(5, 4, "m3"));
    }
    let v = b.check();
    only(&v, "reorder");
    assert_eq!(v.anomalies[0].ops.len(), 2, "both writes are named");
}

#[test]
fn concurrent_writes_may_land_in_either_order() {
    let mut b = Builder::sequential(2);
    // m4 was sent (at 32) before m3 was acknowledged (at 35): either order is fine.
    b.write("m3", 30, 35, Outcome::Ok, Some(entry(5, 4, "m3")));
    b.write("m4", 32, 45, Outcome::Ok, Some(entry(4, 3, "m4")));
    for node in 1..=3 {
        let f = b.finals.get_mut(&node).unwrap();
        f.push(entry(4, 3, "m4"));
        f.push(entry(5, 4, "m3"));
    }
    let v = b.check();
    assert!(v.is_clean(), "{:?}", v.anomalies);
}

#[test]
fn a_divergent_replica_is_reported() {
    let mut b = Builder::sequential(4);
    // Node 2 holds m3 and m4 swapped (seq and index reassigned).
    let f = b.finals.get_mut(&2).unwrap();
    f[2] = entry(4, 3, "m4");
    f[3] = entry(5, 4, "m3");
    let v = b.check();
    assert!(v.has("divergence"), "{:?}", v.anomalies);
    let d = v.anomalies.iter().find(|a| a.kind == "divergence").unwrap();
    assert!(d.message.contains("node 2"), "{}", d.message);
}

#[test]
fn a_lagging_replica_is_reported() {
    let mut b = Builder::sequential(4);
    let lagging: Vec<Entry> = b.finals[&1][..3].to_vec();
    b.finals.insert(3, lagging.clone());
    // Only the last write is missing on node 3: it is lost there and the node diverges.
    let v = b.check();
    assert!(v.has("divergence") && v.has("lost_write"), "{:?}", v.counts);
}

#[test]
fn a_gap_in_a_stream_is_reported() {
    let mut b = Builder::sequential(5);
    // The second connection resumed at 4 instead of 3.
    b.subscriber(2, &[1, 2, 4, 5]);
    let v = b.check();
    only(&v, "stream_gap");
    assert!(v.anomalies[0]
        .message
        .contains("seq 4 came where 3 was due"));
}

#[test]
fn a_repeated_event_in_a_stream_is_reported() {
    let mut b = Builder::sequential(5);
    b.subscriber(2, &[1, 2, 2, 3, 4, 5]);
    only(&b.check(), "stream_duplicate");
}

#[test]
fn a_stream_that_stops_short_is_reported() {
    let mut b = Builder::sequential(5);
    b.subscriber(2, &[1, 2, 3]);
    only(&b.check(), "stream_incomplete");
}

#[test]
fn a_stream_with_other_records_is_reported() {
    let mut b = Builder::sequential(5);
    b.subscriber(2, &[1, 2, 3, 4, 5]);
    b.subs[0].events[3].entry.msg_id = "m5".into();
    let v = b.check();
    assert!(v.has("stream_mismatch"), "{:?}", v.counts);
}

#[test]
fn a_stale_read_is_reported() {
    let mut b = Builder::sequential(5);
    // m5 was acknowledged at 55; a read that began at 60 saw only up to seq 4.
    b.read(3, 60, 70, 4, vec![entry(5, 4, "m4")]);
    let v = b.check();
    only(&v, "stale_read");
    assert_eq!(
        v.anomalies[0].ops.len(),
        2,
        "the read and the write it missed"
    );
}

#[test]
fn a_read_concurrent_with_a_write_may_miss_it() {
    let mut b = Builder::sequential(5);
    // The read began at 52, before m5's acknowledgement at 55.
    b.read(3, 52, 70, 4, vec![entry(5, 4, "m4")]);
    assert!(b.check().is_clean());
}

#[test]
fn a_read_with_other_records_is_reported() {
    let mut b = Builder::sequential(5);
    b.read(3, 60, 70, 5, vec![entry(5, 4, "m5")]);
    only(&b.check(), "read_mismatch");
}

#[test]
fn a_phantom_message_is_reported() {
    let mut b = Builder::sequential(3);
    for node in 1..=3 {
        b.finals
            .get_mut(&node)
            .unwrap()
            .push(entry(5, 4, "nobody-sent-this"));
    }
    let v = b.check();
    only(&v, "phantom");
}

#[test]
fn a_refused_write_that_appears_is_reported() {
    let mut b = Builder::sequential(3);
    b.write("m4", 40, 45, Outcome::Fail, None);
    for node in 1..=3 {
        b.finals.get_mut(&node).unwrap().push(entry(5, 4, "m4"));
    }
    only(&b.check(), "failed_write_visible");
}

#[test]
fn altered_content_is_reported() {
    let mut b = Builder::sequential(3);
    for node in 1..=3 {
        b.finals.get_mut(&node).unwrap()[1].payload = "changed".into();
    }
    let v = b.check();
    // The stored record no longer matches the acknowledgement either.
    assert!(
        v.has("content_mismatch") && v.has("ack_mismatch"),
        "{:?}",
        v.counts
    );
}

#[test]
fn an_acknowledgement_naming_another_place_is_reported() {
    let mut b = Builder::sequential(3);
    // A retry answered 200 with a record at another seq than the stored one.
    b.write("m2", 100, 105, Outcome::Ok, Some(entry(9, 7, "m2")));
    only(&b.check(), "ack_mismatch");
}

#[test]
fn a_dense_sequence_is_required_on_each_node() {
    let mut b = Builder::sequential(3);
    for node in 1..=3 {
        b.finals.get_mut(&node).unwrap()[2].seq = 4;
    }
    let v = b.check();
    assert!(v.has("bad_sequence"), "{:?}", v.counts);
}

#[test]
fn no_write_after_healing_is_reported() {
    let b = Builder::sequential(2);
    let mut h = History {
        ops: b.ops,
        subscriptions: b.subs,
        finals: b.finals,
        recovery: Recovery {
            write_after_heal_ms: None,
            bound_ms: 10_000,
        },
    };
    only(&check(&h), "no_recovery");
    h.recovery.write_after_heal_ms = Some(12_000);
    only(&check(&h), "no_recovery");
}

#[test]
fn every_reported_kind_belongs_to_a_property() {
    let kinds = [
        "lost_write",
        "duplicate",
        "divergence",
        "bad_sequence",
        "phantom",
        "failed_write_visible",
        "content_mismatch",
        "ack_mismatch",
        "reorder",
        "stream_gap",
        "stream_duplicate",
        "stream_mismatch",
        "stream_incomplete",
        "stale_read",
        "read_mismatch",
        "no_recovery",
    ];
    for k in kinds {
        assert!(
            PROPERTIES.iter().any(|(_, ks)| ks.contains(&k)),
            "{k} has no property"
        );
    }
    let mut b = Builder::sequential(5);
    b.read(3, 60, 70, 4, vec![entry(5, 4, "m4")]);
    let v = b.check();
    let held: Vec<bool> = (0..PROPERTIES.len()).map(|n| v.property_held(n)).collect();
    assert_eq!(held, [true, true, true, true, true, false, true]);
}
