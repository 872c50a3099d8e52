//! The history checker. Given what the clients did and saw, and what every node holds once the
//! cluster has healed and converged, it reports every way the log broke its promises:
//!
//! 1. an acknowledged write missing on a node (`lost_write`), or stored twice (`duplicate`);
//! 2. nodes that do not hold one identical sequence (`divergence`), or a node whose own
//!    sequence is not dense and ordered (`bad_sequence`);
//! 3. a message no client sent (`phantom`), with other content than sent (`content_mismatch`),
//!    a definitely refused write that appears (`failed_write_visible`), an acknowledgement that
//!    names another place than where the message ended up (`ack_mismatch`); an indeterminate
//!    write stored twice is a `duplicate`;
//! 4. a write that was sent after another was acknowledged but sits before it (`reorder`);
//! 5. a subscriber whose events, across all its reconnects, are not exactly seq 1, 2, 3, ...
//!    (`stream_gap`, `stream_duplicate`), differ from the final sequence (`stream_mismatch`),
//!    or stop short of it (`stream_incomplete`);
//! 6. a linearizable read that missed a write acknowledged before it began (`stale_read`), or
//!    returned records that differ from the final sequence (`read_mismatch`);
//! 7. no acknowledged write within the bound after healing (`no_recovery`).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::history::{Action, Entry, History, Op, Outcome};

/// The seven properties a run must keep, each with the anomaly kinds that break it. Kinds the
/// harness adds itself (a node that crashed, nodes that never converged) belong here too.
pub const PROPERTIES: [(&str, &[&str]); 7] = [
    (
        "every acknowledged message is on every node exactly once",
        &["lost_write", "duplicate"],
    ),
    (
        "all nodes hold one identical sequence",
        &[
            "divergence",
            "bad_sequence",
            "no_convergence",
            "final_state_unreadable",
        ],
    ),
    (
        "only sent, unrefused messages appear, as sent and as acknowledged",
        &[
            "phantom",
            "failed_write_visible",
            "content_mismatch",
            "ack_mismatch",
        ],
    ),
    ("real-time order of acknowledged writes", &["reorder"]),
    (
        "every stream is gap-free and duplicate-free across reconnects",
        &[
            "stream_gap",
            "stream_duplicate",
            "stream_mismatch",
            "stream_incomplete",
        ],
    ),
    (
        "linearizable reads see every earlier acknowledged write",
        &["stale_read", "read_mismatch"],
    ),
    (
        "writes succeed again within the bound after healing",
        &["no_recovery", "node_crashed"],
    ),
];

/// Anomalies of one kind beyond this many are counted, not listed.
const MAX_PER_KIND: usize = 50;

/// One broken promise, with the operations that show it.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub kind: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
}

/// The checker's verdict.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Verdict {
    /// Listed anomalies (at most `MAX_PER_KIND` of each kind).
    pub anomalies: Vec<Anomaly>,
    /// How many of each kind were found, listed or not.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.counts.is_empty()
    }

    /// Whether property `n` (0-based, in [`PROPERTIES`] order) held.
    pub fn property_held(&self, n: usize) -> bool {
        PROPERTIES[n].1.iter().all(|k| !self.has(k))
    }

    pub fn has(&self, kind: &str) -> bool {
        self.counts.contains_key(kind)
    }

    fn report(&mut self, kind: &'static str, message: String, ops: Vec<Op>) {
        let n = self.counts.entry(kind).or_insert(0);
        *n += 1;
        if *n <= MAX_PER_KIND {
            self.anomalies.push(Anomaly { kind, message, ops });
        }
    }
}

/// All attempts at one `msg_id`.
struct Write<'a> {
    conv_id: &'a str,
    sender: &'a str,
    payload: &'a str,
    attempts: Vec<&'a Op>,
    /// The earliest invocation of any attempt: the write exists for clients from then on.
    first_invoke: u64,
    /// The earliest acknowledgement, if any.
    first_ok: Option<&'a Op>,
    /// Every attempt got a definite refusal.
    all_failed: bool,
}

pub fn check(h: &History) -> Verdict {
    let mut v = Verdict::default();
    let writes = collect_writes(&h.ops);
    let reference = h.finals.iter().next();

    check_nodes(h, &writes, &mut v);
    if let Some((ref_node, ref_entries)) = reference {
        check_divergence(h, *ref_node, ref_entries, &mut v);
        let by_msg: HashMap<&str, &Entry> =
            ref_entries.iter().map(|e| (e.msg_id.as_str(), e)).collect();
        let by_conv_seq: HashMap<(&str, u64), &Entry> = ref_entries
            .iter()
            .map(|e| ((e.conv_id.as_str(), e.seq), e))
            .collect();
        check_acks(&writes, &by_msg, &mut v);
        check_real_time_order(&writes, &by_msg, &mut v);
        check_streams(h, &by_conv_seq, ref_entries, &mut v);
        check_reads(h, &writes, &by_msg, &by_conv_seq, &mut v);
    }
    match h.recovery.write_after_heal_ms {
        Some(ms) if ms <= h.recovery.bound_ms => {}
        other => v.report(
            "no_recovery",
            format!(
                "no write was acknowledged within {} ms of healing (first after: {other:?} ms)",
                h.recovery.bound_ms
            ),
            vec![],
        ),
    }
    v
}

fn collect_writes(ops: &[Op]) -> BTreeMap<&str, Write<'_>> {
    let mut writes: BTreeMap<&str, Write> = BTreeMap::new();
    for op in ops {
        let Action::Write {
            conv_id,
            msg_id,
            sender,
            payload,
        } = &op.action
        else {
            continue;
        };
        let w = writes.entry(msg_id).or_insert_with(|| Write {
            conv_id,
            sender,
            payload,
            attempts: Vec::new(),
            first_invoke: u64::MAX,
            first_ok: None,
            all_failed: true,
        });
        w.attempts.push(op);
        w.first_invoke = w.first_invoke.min(op.invoke_ns);
        if op.outcome != Outcome::Fail {
            w.all_failed = false;
        }
        if op.outcome == Outcome::Ok && w.first_ok.map_or(true, |f| op.complete_ns < f.complete_ns)
        {
            w.first_ok = Some(op);
        }
    }
    writes
}

fn attempts(w: &Write) -> Vec<Op> {
    w.attempts.iter().map(|o| (*o).clone()).collect()
}

/// Properties 1 and 3 on every node: acknowledged writes present exactly once, nothing stored
/// that was not sent, refused or altered; and each node's own order dense and increasing.
fn check_nodes(h: &History, writes: &BTreeMap<&str, Write>, v: &mut Verdict) {
    for (node, entries) in &h.finals {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for e in entries {
            *count.entry(e.msg_id.as_str()).or_insert(0) += 1;
        }
        for (msg_id, w) in writes {
            let n = count.get(msg_id).copied().unwrap_or(0);
            if n == 0 && w.first_ok.is_some() {
                v.report(
                    "lost_write",
                    format!("acknowledged write {msg_id} is missing on node {node}"),
                    attempts(w),
                );
            }
        }
        for (msg_id, n) in &count {
            if *n > 1 {
                let ops = writes.get(msg_id).map(attempts).unwrap_or_default();
                v.report(
                    "duplicate",
                    format!("message {msg_id} is stored {n} times on node {node}"),
                    ops,
                );
            }
        }
        for e in entries {
            match writes.get(e.msg_id.as_str()) {
                None => v.report(
                    "phantom",
                    format!(
                        "node {node} holds message {} (index {}) that no client sent",
                        e.msg_id, e.index
                    ),
                    vec![],
                ),
                Some(w) if w.all_failed => v.report(
                    "failed_write_visible",
                    format!(
                        "message {} was refused on every attempt but node {node} holds it at index {}",
                        e.msg_id, e.index
                    ),
                    attempts(w),
                ),
                Some(w)
                    if w.conv_id != e.conv_id
                        || w.sender != e.sender
                        || w.payload != e.payload =>
                {
                    v.report(
                        "content_mismatch",
                        format!(
                            "node {node} holds message {} with other content than was sent",
                            e.msg_id
                        ),
                        attempts(w),
                    )
                }
                Some(_) => {}
            }
        }
        let mut last_index = 0;
        let mut next_seq: HashMap<&str, u64> = HashMap::new();
        for e in entries {
            if e.index <= last_index {
                v.report(
                    "bad_sequence",
                    format!("node {node}: index {} follows index {last_index}", e.index),
                    vec![],
                );
            }
            last_index = e.index;
            let want = next_seq.entry(e.conv_id.as_str()).or_insert(1);
            if e.seq != *want {
                v.report(
                    "bad_sequence",
                    format!(
                        "node {node}: conversation {} has seq {} where {} was due",
                        e.conv_id, e.seq, want
                    ),
                    vec![],
                );
            }
            *want = e.seq + 1;
        }
    }
}

/// Property 2: every node holds the reference node's sequence, record for record.
fn check_divergence(h: &History, ref_node: u64, reference: &[Entry], v: &mut Verdict) {
    for (node, entries) in &h.finals {
        if *node == ref_node {
            continue;
        }
        let first_diff = reference
            .iter()
            .zip(entries.iter())
            .position(|(a, b)| !a.same_as(b));
        let message = match first_diff {
            Some(i) => format!(
                "node {node} differs from node {ref_node} at position {i}: {:?} vs {:?}",
                entries[i], reference[i]
            ),
            None if entries.len() != reference.len() => format!(
                "node {node} holds {} messages, node {ref_node} holds {}",
                entries.len(),
                reference.len()
            ),
            None => continue,
        };
        v.report("divergence", message, vec![]);
    }
}

/// Property 3, acknowledgements: every acknowledged attempt named the place where the message
/// finally is (a retry answered 200 must name the original).
fn check_acks(writes: &BTreeMap<&str, Write>, by_msg: &HashMap<&str, &Entry>, v: &mut Verdict) {
    for (msg_id, w) in writes {
        let Some(stored) = by_msg.get(msg_id) else {
            continue;
        };
        for op in &w.attempts {
            if op.outcome != Outcome::Ok {
                continue;
            }
            match &op.written {
                Some(acked) if acked.same_as(stored) => {}
                acked => v.report(
                    "ack_mismatch",
                    format!(
                        "write {msg_id} was acknowledged as {acked:?} but is stored as {stored:?}"
                    ),
                    vec![(*op).clone()],
                ),
            }
        }
    }
}

/// Property 4: if A was acknowledged before B was first sent, A has the lower index.
fn check_real_time_order(
    writes: &BTreeMap<&str, Write>,
    by_msg: &HashMap<&str, &Entry>,
    v: &mut Verdict,
) {
    // Acknowledged writes by acknowledgement time, with the running maximum of their index.
    let mut acked: Vec<(u64, u64, &str)> = writes
        .iter()
        .filter_map(|(id, w)| {
            let ok = w.first_ok?;
            let e = by_msg.get(id)?;
            Some((ok.complete_ns, e.index, *id))
        })
        .collect();
    acked.sort();
    let mut prefix_max: Vec<(u64, &str)> = Vec::with_capacity(acked.len());
    for (_, index, id) in &acked {
        match prefix_max.last() {
            Some(&(max, _)) if max >= *index => prefix_max.push(prefix_max[prefix_max.len() - 1]),
            _ => prefix_max.push((*index, id)),
        }
    }
    for (msg_id, w) in writes {
        let Some(b) = by_msg.get(msg_id) else {
            continue;
        };
        // Writes acknowledged strictly before B was first sent.
        let n = acked.partition_point(|(t, _, _)| *t < w.first_invoke);
        if n == 0 {
            continue;
        }
        let (max_index, a_id) = prefix_max[n - 1];
        if max_index > b.index {
            let a = &writes[a_id];
            let mut ops = attempts(a);
            ops.extend(attempts(w));
            v.report(
                "reorder",
                format!(
                    "write {a_id} was acknowledged before write {msg_id} was sent, yet sits after it (index {max_index} > {})",
                    b.index
                ),
                ops,
            );
        }
    }
}

/// Property 5: each subscriber saw seq 1, 2, 3, ... exactly once each, matching the final
/// sequence, up to its end.
fn check_streams(
    h: &History,
    by_conv_seq: &HashMap<(&str, u64), &Entry>,
    reference: &[Entry],
    v: &mut Verdict,
) {
    for sub in &h.subscriptions {
        let mut next = 1u64;
        for ev in &sub.events {
            if ev.id != ev.entry.seq {
                v.report(
                    "stream_mismatch",
                    format!(
                        "{}: event id {} carries the record of seq {}",
                        sub.name, ev.id, ev.entry.seq
                    ),
                    vec![],
                );
            }
            if ev.id > next {
                v.report(
                    "stream_gap",
                    format!(
                        "{} (node {}, connection {}): seq {} came where {next} was due",
                        sub.name, ev.node, ev.connection, ev.id
                    ),
                    vec![],
                );
            } else if ev.id < next {
                v.report(
                    "stream_duplicate",
                    format!(
                        "{} (node {}, connection {}): seq {} came again after seq {}",
                        sub.name,
                        ev.node,
                        ev.connection,
                        ev.id,
                        next - 1
                    ),
                    vec![],
                );
            }
            next = next.max(ev.id + 1);
            match by_conv_seq.get(&(sub.conv_id.as_str(), ev.id)) {
                Some(want) if want.same_as(&ev.entry) => {}
                want => v.report(
                    "stream_mismatch",
                    format!(
                        "{} (node {}): seq {} was {:?}, the final sequence has {want:?}",
                        sub.name, ev.node, ev.id, ev.entry
                    ),
                    vec![],
                ),
            }
        }
        let last = reference
            .iter()
            .filter(|e| e.conv_id == sub.conv_id)
            .map(|e| e.seq)
            .max()
            .unwrap_or(0);
        if next - 1 < last {
            v.report(
                "stream_incomplete",
                format!(
                    "{} (node {}) ended at seq {} of {last}",
                    sub.name,
                    sub.node,
                    next - 1
                ),
                vec![],
            );
        }
    }
}

/// Property 6: a linearizable read reflects every write acknowledged before it began, and what
/// it returned is the final sequence.
fn check_reads(
    h: &History,
    writes: &BTreeMap<&str, Write>,
    by_msg: &HashMap<&str, &Entry>,
    by_conv_seq: &HashMap<(&str, u64), &Entry>,
    v: &mut Verdict,
) {
    // Per conversation: acknowledged writes by acknowledgement time, with their final seq.
    let mut acked: HashMap<&str, Vec<(u64, u64, &str)>> = HashMap::new();
    for (id, w) in writes {
        if let (Some(ok), Some(e)) = (w.first_ok, by_msg.get(id)) {
            acked
                .entry(w.conv_id)
                .or_default()
                .push((ok.complete_ns, e.seq, *id));
        }
    }
    for list in acked.values_mut() {
        list.sort();
    }
    for op in &h.ops {
        let (Action::Read { conv_id, .. }, Outcome::Ok, Some(read)) =
            (&op.action, op.outcome, &op.read)
        else {
            continue;
        };
        if let Some(list) = acked.get(conv_id.as_str()) {
            let n = list.partition_point(|(t, _, _)| *t < op.invoke_ns);
            if let Some(&(_, seq, id)) = list[..n].iter().max_by_key(|(_, seq, _)| *seq) {
                if seq > read.last_seq {
                    let mut ops = vec![op.clone()];
                    ops.extend(attempts(&writes[id]));
                    v.report(
                        "stale_read",
                        format!(
                            "read on node {} saw conversation {conv_id} up to seq {}, but write {id} (seq {seq}) was acknowledged before it began",
                            op.node, read.last_seq
                        ),
                        ops,
                    );
                }
            }
        }
        for e in &read.entries {
            match by_conv_seq.get(&(conv_id.as_str(), e.seq)) {
                Some(want) if want.same_as(e) => {}
                want => v.report(
                    "read_mismatch",
                    format!(
                        "read on node {} returned {e:?} where the final sequence has {want:?}",
                        op.node
                    ),
                    vec![op.clone()],
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests;
