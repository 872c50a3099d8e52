//! What a chaos run records: every client operation with its invocation and completion times,
//! every event each stream subscriber received, and the final state of every node after the
//! cluster has healed. The checker reads only this, so a history can be written by hand.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A stored message as the checker sees it: where it sits in the order, and what it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Raft log index: the global order.
    pub index: u64,
    /// Position in its conversation, from 1.
    pub seq: u64,
    pub conv_id: String,
    pub msg_id: String,
    pub sender: String,
    pub payload: String,
}

impl Entry {
    /// Reads the fields the checker needs from a record as the API returns it.
    pub fn from_record(v: &serde_json::Value) -> Option<Entry> {
        Some(Entry {
            index: v.get("index")?.as_u64()?,
            seq: v.get("seq")?.as_u64()?,
            conv_id: v.get("conv_id")?.as_str()?.to_string(),
            msg_id: v.get("msg_id")?.as_str()?.to_string(),
            sender: v.get("sender")?.as_str()?.to_string(),
            payload: v.get("payload")?.as_str()?.to_string(),
        })
    }

    /// Same place in the order and same content.
    pub fn same_as(&self, other: &Entry) -> bool {
        self == other
    }
}

/// What a client asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// `POST /api/v1/message`. A retry is another operation with the same `msg_id`.
    Write {
        conv_id: String,
        msg_id: String,
        sender: String,
        payload: String,
    },
    /// `GET /api/v1/messages?consistency=linearizable`.
    Read { conv_id: String, from: u64 },
}

/// How an operation ended, as a client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx answer: the write is stored (the answer's record says where), or the read's result.
    Ok,
    /// A definite refusal (4xx): the write must never appear.
    Fail,
    /// No answer, a timeout or a 5xx: the write may or may not have happened.
    Indeterminate,
}

/// The result of a successful linearizable read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadResult {
    /// The conversation's last seq on the answering node when it read.
    pub last_seq: u64,
    pub entries: Vec<Entry>,
}

/// One client operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the history.
    pub id: u64,
    /// Which client ran it ("writer-2", "reader-0", "probe").
    pub process: String,
    /// The node it was sent to.
    pub node: u64,
    /// Nanoseconds since the run started, on a monotonic clock: when the request was sent ...
    pub invoke_ns: u64,
    /// ... and when its answer (or the give-up) came.
    pub complete_ns: u64,
    pub action: Action,
    pub outcome: Outcome,
    /// HTTP status, when there was an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The error code, or why the operation is indeterminate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// For an acknowledged write: the record the server answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<Entry>,
    /// For a successful read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<ReadResult>,
}

impl Op {
    pub fn msg_id(&self) -> Option<&str> {
        match &self.action {
            Action::Write { msg_id, .. } => Some(msg_id),
            Action::Read { .. } => None,
        }
    }

    pub fn conv_id(&self) -> &str {
        match &self.action {
            Action::Write { conv_id, .. } | Action::Read { conv_id, .. } => conv_id,
        }
    }
}

/// One event a subscriber received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEvent {
    /// Nanoseconds since the run started.
    pub at_ns: u64,
    /// Which connection of the subscriber it came on (0 is the first) ...
    pub connection: u32,
    /// ... and from which node.
    pub node: u64,
    /// The SSE `id:` field.
    pub id: u64,
    pub entry: Entry,
}

/// One stream subscriber: it starts at seq 1 and, on every reconnect (to any node), resumes
/// with `Last-Event-ID` set to the last id it received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscription {
    pub name: String,
    /// The node it starts on.
    pub node: u64,
    pub conv_id: String,
    pub connections: u32,
    pub events: Vec<StreamEvent>,
}

/// How quickly the healed cluster took writes again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recovery {
    /// Milliseconds from the end of the last fault to the first acknowledged write; `None` if
    /// no write was acknowledged within `bound_ms`.
    pub write_after_heal_ms: Option<u64>,
    pub bound_ms: u64,
}

/// Everything the checker looks at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub subscriptions: Vec<Subscription>,
    /// Each node's messages after convergence, all conversations, in index order.
    pub finals: BTreeMap<u64, Vec<Entry>>,
    pub recovery: Recovery,
}
