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
//! [`write_record`] serialises a [`Record`] with serde, [`write_row`] writes the same bytes from
//! borrowed SQLite columns without building a `Record` (no allocation per event), and the tests
//! hold the two to each other.

use std::io::Write;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::types::{format_millis, Record};

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

/// The same field names, order and skipping rule as [`Record`].
#[derive(Serialize)]
struct RecordRef<'a> {
    index: u64,
    seq: u64,
    term: u64,
    conv_id: &'a str,
    msg_id: &'a str,
    sender: &'a str,
    payload: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector_clock: Option<&'a RawValue>,
    committed_at: &'a str,
}

/// Appends the event of one stored row to `out`.
pub fn write_row(out: &mut Vec<u8>, row: &RowFields<'_>) {
    let mut stamp = [0u8; 24];
    let formatted;
    let committed_at = match format_millis_fast(row.committed_at_ms, &mut stamp) {
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
    let r = RecordRef {
        index: row.index,
        seq: row.seq,
        term: row.term,
        conv_id: row.conv_id,
        msg_id: row.msg_id,
        sender: row.sender,
        payload: row.payload,
        vector_clock,
        committed_at,
    };
    out.extend_from_slice(EVENT_HEAD);
    let _ = serde_json::to_writer(&mut *out, &r); // into a Vec: cannot fail
    finish(out, row.seq);
}

fn finish(out: &mut Vec<u8>, seq: u64) {
    out.extend_from_slice(ID_FIELD);
    let _ = write!(out, "{seq}"); // into a Vec: cannot fail
    out.extend_from_slice(b"\n\n");
}

/// Milliseconds since 1970 as `YYYY-MM-DDTHH:MM:SS.mmmZ`, like [`format_millis`] but without
/// chrono's format machinery. Covers 1970 to 9999 (every stamp a live clock makes); `None`
/// outside, where the caller falls back to [`format_millis`].
fn format_millis_fast(ms: i64, buf: &mut [u8; 24]) -> Option<&str> {
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
        for ms in [0, 1_700_000_000_123, 951_782_400_000, 253_402_300_799_999] {
            for clock in &clocks {
                let r = record(ms, hostile, clock.clone());
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

    #[test]
    fn fast_time_format_agrees_with_chrono() {
        let mut buf = [0u8; 24];
        // Day boundaries, leap days and a spread of instants up to year 9999.
        let mut ms: i64 = 0;
        while ms < 253_402_300_800_000 {
            assert_eq!(
                format_millis_fast(ms, &mut buf),
                Some(format_millis(ms).as_str()),
                "{ms}"
            );
            for edge in [ms + 86_399_999, ms + 86_400_000] {
                if edge >= 253_402_300_800_000 {
                    continue;
                }
                assert_eq!(
                    format_millis_fast(edge, &mut buf).map(str::to_owned),
                    Some(format_millis(edge)),
                    "{edge}"
                );
            }
            ms += 86_400_000 * 13 + 3_600_007;
        }
        assert_eq!(format_millis_fast(-1, &mut buf), None);
        assert_eq!(format_millis_fast(253_402_300_800_000, &mut buf), None);
    }
}
