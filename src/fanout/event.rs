//! The wire form of a record as one Server-Sent Event, written straight into a byte buffer.
//!
//! Every event of `GET /api/v1/stream` is
//!
//! ```text
//! event:message
//! data:<the record as compact JSON, on one line>
//! id:<seq>
//!
//! ```
//!
//! exactly as warp's `sse::Event` formats an event with those three fields (its field order,
//! no space after the colons). The JSON is byte for byte `serde_json::to_string(&Record)`:
//! [`write_record`] serialises a [`Record`] with serde, [`write_row`] writes the same bytes by
//! hand from borrowed SQLite columns without building a `Record` (no allocation per event), and
//! the tests hold the two to each other.

use serde_json::value::RawValue;

use crate::types::{format_millis, format_millis_into, Record};

/// What a keep-alive looks like on the wire: an SSE comment.
pub const KEEP_ALIVE: &[u8] = b":keep-alive\n\n";

const EVENT_HEAD: &[u8] = b"event:message\ndata:";
const ID_FIELD: &[u8] = b"\nid:";

/// Appends the event of one applied record to `out`.
pub fn write_record(out: &mut Vec<u8>, record: &Record) {
    out.extend_from_slice(EVENT_HEAD);
    // Writing into a Vec cannot fail, and a Record always serialises: every field is a
    // string, a number or a map of string to number.
    let _ = serde_json::to_writer(&mut *out, record);
    finish(out, record.seq);
}

/// The columns of one `messages` row, borrowed from the SQLite statement.
pub struct RowFields<'a> {
    pub index: u64,
    pub seq: u64,
    pub term: u64,
    pub conv_id: &'a str,
    /// The stored text of the id: a hyphenated lower-case UUID, as `Uuid` serialises.
    pub msg_id: &'a str,
    pub sender: &'a str,
    pub payload: &'a str,
    /// The stored JSON of the clock, which the state machine wrote with the same serialiser
    /// that `Record` uses, so it is copied as it is.
    pub vector_clock: Option<&'a str>,
    pub committed_at_ms: i64,
}

/// Appends one stored row's event to `out`: the JSON `Record` serialises to (the same field
/// names, order and skipping rule), written field by field. Catch-up writes every stored event
/// through here, and going through serde's string escaping byte by byte for text that, like
/// most, holds nothing to escape took a seventh of a node's CPU while it sent history.
pub fn write_row(out: &mut Vec<u8>, row: &RowFields<'_>) {
    let mut stamp = [0u8; 24];
    let formatted;
    let committed_at = match format_millis_into(row.committed_at_ms, &mut stamp) {
        Some(s) => s,
        None => {
            formatted = format_millis(row.committed_at_ms);
            formatted.as_str()
        }
    };
    // A stored clock that is not JSON (a damaged row) is left out rather than breaking the
    // event's JSON.
    let vector_clock = row
        .vector_clock
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
    out.extend_from_slice(EVENT_HEAD);
    let numbers: [(&[u8], u64); 3] = [
        (b"{\"index\":", row.index),
        (b",\"seq\":", row.seq),
        (b",\"term\":", row.term),
    ];
    for (key, n) in numbers {
        out.extend_from_slice(key);
        write_u64(out, n);
    }
    let texts: [(&[u8], &str); 4] = [
        (b",\"conv_id\":", row.conv_id),
        (b",\"msg_id\":", row.msg_id),
        (b",\"sender\":", row.sender),
        (b",\"payload\":", row.payload),
    ];
    for (key, text) in texts {
        out.extend_from_slice(key);
        write_str(out, text);
    }
    if let Some(clock) = vector_clock {
        out.extend_from_slice(b",\"vector_clock\":");
        out.extend_from_slice(clock.get().as_bytes());
    }
    out.extend_from_slice(b",\"committed_at\":");
    write_str(out, committed_at);
    out.push(b'}');
    finish(out, row.seq);
}

/// Appends `s` as a JSON string, byte for byte as serde_json writes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly the control characters, '"' and '\\'. The check has no
    // early exit, so it compiles to a vector loop; text that needs an escape goes to serde.
    let needs_escape = s
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if needs_escape {
        let _ = serde_json::to_writer(&mut *out, s); // into a Vec: cannot fail
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    let _ = serde_json::to_writer(&mut *out, &n); // into a Vec: cannot fail
}

fn finish(out: &mut Vec<u8>, seq: u64) {
    out.extend_from_slice(ID_FIELD);
    write_u64(out, seq);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VectorClock;
    use uuid::Uuid;

    /// What warp's `sse::Event` made of a record, the reference for the wire format.
    fn warp_event(record: &Record) -> Vec<u8> {
        let data = serde_json::to_string(record).unwrap();
        warp::sse::Event::default()
            .event("message")
            .id(record.seq.to_string())
            .data(data)
            .to_string()
            .into_bytes()
    }

    fn record(ms: i64, payload: &str, clock: Option<VectorClock>) -> Record {
        Record {
            index: 1 << 40,
            seq: 77,
            term: 3,
            conv_id: "general.x_y-z".into(),
            msg_id: Uuid::new_v4(),
            sender: "al\"ice\\ \u{1F600}".into(),
            payload: payload.into(),
            vector_clock: clock,
            committed_at: format_millis(ms),
        }
    }

    fn from_row(r: &Record, ms: i64, clock_json: Option<&str>) -> Vec<u8> {
        let msg_id = r.msg_id.to_string();
        let mut out = Vec::new();
        write_row(
            &mut out,
            &RowFields {
                index: r.index,
                seq: r.seq,
                term: r.term,
                conv_id: &r.conv_id,
                msg_id: &msg_id,
                sender: &r.sender,
                payload: &r.payload,
                vector_clock: clock_json,
                committed_at_ms: ms,
            },
        );
        out
    }

    #[test]
    fn both_writers_match_warps_event_byte_for_byte() {
        let hostile = "line1\nline2\r\n\t\u{0}\u{1f}\u{7f} </script> \"q\" \\ é 日本 \u{2028}";
        let clocks = [
            None,
            Some(VectorClock(vec![])),
            Some(VectorClock(vec![
                ("zed".into(), 2),
                ("a\"b".into(), u64::MAX),
            ])),
        ];
        let plain = "plain text, nothing to escape: é 日本 \u{7f} ~!@#$%^&*()";
        for (ms, payload) in [0, 1_700_000_000_123, 951_782_400_000, 253_402_300_799_999]
            .into_iter()
            .flat_map(|ms| [(ms, hostile), (ms, plain)])
        {
            for clock in &clocks {
                let r = record(ms, payload, clock.clone());
                let want = warp_event(&r);
                let mut got = Vec::new();
                write_record(&mut got, &r);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
                let stored = clock.as_ref().map(|c| serde_json::to_string(c).unwrap());
                let got = from_row(&r, ms, stored.as_deref());
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
            }
        }
    }
}
