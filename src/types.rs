//! The openraft type configuration and the records that travel through the Raft log.
//!
//! Everything in this module is part of the replicated state or of the wire format between
//! nodes: changing a field changes what is stored in the log, so it is done with care.

use std::collections::HashSet;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Raft node identifier, taken from the `node_id` config key.
pub type NodeId = u64;

/// How a node is reached: peers use `raft_addr`, clients and forwarded writes use `api_addr`.
///
/// Both are `host:port` strings exactly as the node advertised them when it joined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub raft_addr: String,
    pub api_addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// The Raft type configuration of chatraftd.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::store::SnapshotData,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type StorageError = openraft::StorageError<NodeId>;

/// A vector clock as the client sent it: `{"alice": 3, "bob": 1}`.
///
/// The key order of the client's JSON object is kept, so the clock is handed back exactly as
/// it was sent. It is opaque to the server and never influences ordering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VectorClock(pub Vec<(String, u64)>);

impl VectorClock {
    /// Two clocks carry the same information when they map the same keys to the same values,
    /// whatever the key order.
    pub fn same_entries(&self, other: &VectorClock) -> bool {
        let mut a: Vec<_> = self.0.iter().collect();
        let mut b: Vec<_> = other.0.iter().collect();
        a.sort();
        b.sort();
        a == b
    }
}

impl Serialize for VectorClock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for VectorClock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ClockVisitor;
        impl<'de> Visitor<'de> for ClockVisitor {
            type Value = VectorClock;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping node names to non-negative integers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<VectorClock, A::Error> {
                let mut entries: Vec<(String, u64)> = Vec::new();
                // A set, not a scan of `entries`: a request body holds tens of thousands of
                // keys before the API's entry limit is checked, and a scan per key made that
                // seconds of CPU.
                let mut seen = HashSet::new();
                while let Some((k, v)) = access.next_entry::<String, u64>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    entries.push((k, v));
                }
                Ok(VectorClock(entries))
            }
        }
        deserializer.deserialize_map(ClockVisitor)
    }
}

/// A validated message as it is proposed to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub msg_id: Uuid,
    pub conv_id: String,
    pub sender: String,
    pub payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_clock: Option<VectorClock>,
    /// The proposing leader's wall clock, milliseconds since the Unix epoch.
    pub committed_at_ms: i64,
}

impl NewMessage {
    /// Whether a retry carries the same content as the stored record (the de-duplication rule).
    pub fn same_content(&self, r: &Record) -> bool {
        let clocks_match = match (&self.vector_clock, &r.vector_clock) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_entries(b),
            _ => false,
        };
        self.conv_id == r.conv_id
            && self.sender == r.sender
            && self.payload == r.payload
            && clocks_match
    }
}

/// The application command stored in a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Append one chat message to its conversation.
    Post(NewMessage),
    /// Append several chat messages, in this order. The leader groups the writes that arrive
    /// while an earlier entry is being committed, so one fsync on each node covers them all.
    Batch(Vec<NewMessage>),
}

/// A committed chat message, identical on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the global commit order: 1, 2, 3, ... over all conversations, in the order
    /// of the Raft log (messages of one log entry in their order inside it).
    pub index: u64,
    /// Position inside the conversation: 1, 2, 3, ... without gaps.
    pub seq: u64,
    /// Term of the leader that proposed the entry.
    pub term: u64,
    pub conv_id: String,
    pub msg_id: Uuid,
    pub sender: String,
    pub payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_clock: Option<VectorClock>,
    /// The leader's clock when it proposed the message, RFC 3339 in UTC with milliseconds.
    pub committed_at: String,
}

/// What applying an entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry: nothing for a client.
    None,
    /// The message was stored as this record.
    Stored(Record),
    /// The `msg_id` was already stored with the same content: the original record.
    Duplicate(Record),
    /// The `msg_id` was already stored with different content: the stored record.
    Conflict(Record),
    /// One outcome per message of a [`Request::Batch`], in its order.
    Batch(Vec<Response>),
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with millisecond precision.
///
/// Runs for every message a node applies, so the common range skips chrono's format
/// parser (which took a few percent of a busy node's CPU).
pub fn format_millis(ms: i64) -> String {
    let mut buf = [0u8; 24];
    match format_millis_into(ms, &mut buf) {
        Some(s) => s.to_owned(),
        None => format_millis_chrono(ms),
    }
}

/// [`format_millis`] through chrono: every instant chrono can represent.
fn format_millis_chrono(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        // Out of chrono's range only for a clock hundreds of thousands of years off.
        None => ms.to_string(),
    }
}

/// Milliseconds since 1970 as `YYYY-MM-DDTHH:MM:SS.mmmZ`, into `buf`, without
/// chrono's format machinery. Covers 1970 to 9999 (every stamp a live clock makes); `None`
/// outside, where [`format_millis`] falls back to chrono.
pub fn format_millis_into(ms: i64, buf: &mut [u8; 24]) -> Option<&str> {
    // 253402300800000 is 10000-01-01T00:00:00Z.
    if !(0..253_402_300_800_000).contains(&ms) {
        return None;
    }
    let millis = ms % 1000;
    let secs = ms / 1000;
    let days = secs / 86_400;
    let sod = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let digits = |buf: &mut [u8], v: i64| {
        let mut v = v;
        for b in buf.iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(&mut buf[0..4], year);
    buf[4] = b'-';
    digits(&mut buf[5..7], month);
    buf[7] = b'-';
    digits(&mut buf[8..10], day);
    buf[10] = b'T';
    digits(&mut buf[11..13], sod / 3600);
    buf[13] = b':';
    digits(&mut buf[14..16], sod / 60 % 60);
    buf[16] = b':';
    digits(&mut buf[17..19], sod % 60);
    buf[19] = b'.';
    digits(&mut buf[20..23], millis);
    buf[23] = b'Z';
    std::str::from_utf8(&buf[..]).ok()
}

/// Year, month and day of the proleptic Gregorian calendar for a day count since 1970-01-01
/// (not negative here), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_clock_keeps_key_order_and_rejects_duplicates() {
        let vc: VectorClock = serde_json::from_str(r#"{"zed":2,"alice":1}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&vc).unwrap(),
            r#"{"zed":2,"alice":1}"#
        );
        assert!(serde_json::from_str::<VectorClock>(r#"{"a":1,"a":2}"#).is_err());
        assert!(serde_json::from_str::<VectorClock>(r#"{"a":-1}"#).is_err());
        assert!(serde_json::from_str::<VectorClock>(r#"{"a":"x"}"#).is_err());
        let other: VectorClock = serde_json::from_str(r#"{"alice":1,"zed":2}"#).unwrap();
        assert!(vc.same_entries(&other));
    }

    /// CPU time this thread has used (unaffected by other load on the machine).
    fn thread_cpu_time() -> std::time::Duration {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .expect("the thread CPU clock is readable")
            .into()
    }

    #[test]
    fn big_vector_clock_decodes_in_linear_time() {
        // Nearly as many entries as a default-sized request body (256 KiB) holds: 28,000 keys.
        // The API refuses more than limits.max_vector_clock_entries only after decoding, so
        // decoding must stay cheap however many there are; checking each key against all
        // before it took seconds of CPU per request here.
        let keys: Vec<String> = (0..28_000).map(|i| format!("{i:x}")).collect();
        let body = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!("\"{k}\":0"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(body.len() <= 256 * 1024);
        let started = thread_cpu_time();
        let vc: VectorClock = serde_json::from_str(&body).unwrap();
        let spent = thread_cpu_time() - started;
        assert_eq!(vc.0.len(), keys.len());
        assert!(spent.as_secs_f64() < 1.0, "decoding took {spent:?} of CPU");
        let dup = body.replacen("}", ",\"0\":1}", 1);
        let e = serde_json::from_str::<VectorClock>(&dup).unwrap_err();
        assert!(e.to_string().contains("duplicate key `0`"), "{e}");
    }

    #[test]
    fn millis_format_is_rfc3339() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        // Outside the fast range chrono still formats it.
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_millis(253_402_300_800_000),
            "+10000-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn fast_time_format_agrees_with_chrono() {
        let mut buf = [0u8; 24];
        // Day boundaries, leap days and a spread of instants up to year 9999.
        let mut ms: i64 = 0;
        while ms < 253_402_300_800_000 {
            assert_eq!(
                format_millis_into(ms, &mut buf),
                Some(format_millis_chrono(ms).as_str()),
                "{ms}"
            );
            for edge in [ms + 86_399_999, ms + 86_400_000] {
                if edge >= 253_402_300_800_000 {
                    continue;
                }
                assert_eq!(
                    format_millis_into(edge, &mut buf).map(str::to_owned),
                    Some(format_millis_chrono(edge)),
                    "{edge}"
                );
            }
            ms += 86_400_000 * 13 + 3_600_007;
        }
        assert_eq!(format_millis_into(-1, &mut buf), None);
        assert_eq!(format_millis_into(253_402_300_800_000, &mut buf), None);
    }
}
