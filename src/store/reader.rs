//! Read access to applied messages for the HTTP API.
//!
//! A small pool of read-only connections to `messages.db`. In WAL mode readers never block the
//! state machine's writer and always see whole apply batches: a reader's statement sees the
//! database as of the last COMMIT before it started.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{blocking, from_sql, lock, open_live, Access, SqlContext, StoreError};
use crate::fanout::{event, Tail};
use crate::types::{format_millis, Record, VectorClock};

/// The columns [`RawRecord::from_row`] expects, in order.
pub(crate) const RECORD_COLUMNS: &str =
    "idx, seq, term, conv_id, msg_id, sender, payload, vector_clock, committed_at_ms";

/// One `messages` row as SQLite returns it, before its values are checked.
pub(crate) struct RawRecord {
    idx: i64,
    seq: i64,
    term: i64,
    conv_id: String,
    msg_id: String,
    sender: String,
    payload: String,
    vector_clock: Option<String>,
    committed_at_ms: i64,
}

impl RawRecord {
    /// Reads a row selected with [`RECORD_COLUMNS`].
    pub(crate) fn from_row(r: &Row<'_>) -> rusqlite::Result<RawRecord> {
        Ok(RawRecord {
            idx: r.get(0)?,
            seq: r.get(1)?,
            term: r.get(2)?,
            conv_id: r.get(3)?,
            msg_id: r.get(4)?,
            sender: r.get(5)?,
            payload: r.get(6)?,
            vector_clock: r.get(7)?,
            committed_at_ms: r.get(8)?,
        })
    }

    pub(crate) fn into_record(self, path: &Path) -> Result<Record, StoreError> {
        let msg_id = Uuid::parse_str(&self.msg_id)
            .map_err(|e| StoreError::invalid(path, format!("bad msg_id {:?}: {e}", self.msg_id)))?;
        let vector_clock = match self.vector_clock {
            Some(json) => Some(
                serde_json::from_str::<VectorClock>(&json).map_err(|source| StoreError::Serde {
                    what: "vector_clock",
                    path: path.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        Ok(Record {
            index: from_sql(self.idx, "index", path)?,
            seq: from_sql(self.seq, "seq", path)?,
            term: from_sql(self.term, "term", path)?,
            conv_id: self.conv_id,
            msg_id,
            sender: self.sender,
            payload: self.payload,
            vector_clock,
            committed_at: format_millis(self.committed_at_ms),
        })
    }
}

/// Looks a message up by its id on any connection or transaction.
pub(crate) fn record_by_msg_id(
    conn: &Connection,
    path: &Path,
    msg_id: Uuid,
) -> Result<Option<Record>, StoreError> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM messages WHERE msg_id = ?1");
    let raw = conn
        .prepare_cached(&sql)
        .at(path)?
        .query_row([msg_id.to_string()], RawRecord::from_row)
        .optional()
        .at(path)?;
    raw.map(|r| r.into_record(path)).transpose()
}

/// One conversation as `GET /api/v1/conversations` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationInfo {
    /// The conversation's id, as clients name it.
    pub conv_id: String,
    /// Number of messages; equal to `last_seq` because seq is dense from 1.
    pub count: u64,
    /// Seq of the conversation's latest message.
    pub last_seq: u64,
    /// Raft log index of the conversation's latest message.
    pub last_index: u64,
}

/// Read-only access to applied messages. Cloning shares the pool.
#[derive(Clone)]
pub struct MessageReader {
    inner: Arc<ReaderShared>,
}

struct ReaderShared {
    /// Path of `messages.db`, for error messages.
    path: PathBuf,
    /// Read-only connections; a query takes whichever is free.
    conns: Vec<Mutex<Connection>>,
    /// Where the next search for a free connection starts, to spread the load.
    next: AtomicUsize,
    /// Last applied log index, published by the state machine after each COMMIT.
    applied: watch::Receiver<u64>,
    /// The live tails of watched conversations, filled by the state machine.
    tail: Tail,
}

/// Events of one conversation read from the store for an event stream.
pub struct EventPage {
    /// The events, back to back, in the wire form of [`crate::fanout::event`].
    pub bytes: Bytes,
    /// How many events `bytes` holds (0: none stored from the asked seq on).
    pub count: usize,
    /// The seq after the last event (the asked seq when there is none).
    pub next_seq: u64,
}

impl MessageReader {
    pub(crate) fn open(
        path: &Path,
        applied: watch::Receiver<u64>,
        tail: Tail,
        size: usize,
    ) -> Result<MessageReader, StoreError> {
        let conns = (0..size.max(1))
            .map(|_| {
                let conn = open_live(path, Access::ReadOnly)?;
                // Belt and braces: even a bug cannot write through the API's connections.
                conn.pragma_update(None, "query_only", true).at(path)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(MessageReader {
            inner: Arc::new(ReaderShared {
                path: path.to_path_buf(),
                conns,
                next: AtomicUsize::new(0),
                applied,
                tail,
            }),
        })
    }

    /// Runs `f` on a free pooled connection, in the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection, &Path) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || inner.on_free_conn(f)).await
    }

    /// The events of `conv_id` from `from_seq` on, in seq order: at most `max_events`, and no
    /// more once they pass `max_bytes`. Runs in the blocking pool; the handle is `Sync` and
    /// `Unpin`, so a hand-written stream can hold and poll it.
    pub fn spawn_event_page(
        &self,
        conv_id: &str,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> JoinHandle<Result<EventPage, StoreError>> {
        let inner = self.inner.clone();
        let conv_id = conv_id.to_owned();
        tokio::task::spawn_blocking(move || {
            inner.on_free_conn(|conn, path| {
                event_page(conn, path, &conv_id, from_seq, max_events, max_bytes)
            })
        })
    }

    /// Messages of `conv_id` with `seq >= from_seq`, ascending, at most `limit`.
    pub async fn page(
        &self,
        conv_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let conv_id = conv_id.to_owned();
        self.with_conn(move |conn, path| {
            let (sql, from, limit) = page_query(from_seq, limit);
            let mut stmt = conn.prepare_cached(&sql).at(path)?;
            let rows = stmt
                .query_map((conv_id, from, limit), RawRecord::from_row)
                .at(path)?;
            let mut out = Vec::new();
            for raw in rows {
                out.push(raw.at(path)?.into_record(path)?);
            }
            Ok(out)
        })
        .await
    }

    /// The highest seq of `conv_id`, 0 when it has no message.
    pub async fn last_seq(&self, conv_id: &str) -> Result<u64, StoreError> {
        let conv_id = conv_id.to_owned();
        self.with_conn(move |conn, path| {
            let last: Option<i64> = conn
                .prepare_cached("SELECT last_seq FROM conversations WHERE conv_id = ?1")
                .at(path)?
                .query_row([conv_id], |r| r.get(0))
                .optional()
                .at(path)?;
            from_sql(last.unwrap_or(0), "last_seq", path)
        })
        .await
    }

    /// Every conversation, sorted by `conv_id`.
    pub async fn conversations(&self) -> Result<Vec<ConversationInfo>, StoreError> {
        self.with_conn(|conn, path| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT conv_id, last_seq, last_index FROM conversations ORDER BY conv_id",
                )
                .at(path)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .at(path)?;
            let mut out = Vec::new();
            for row in rows {
                let (conv_id, last_seq, last_index) = row.at(path)?;
                let last_seq = from_sql(last_seq, "last_seq", path)?;
                out.push(ConversationInfo {
                    conv_id,
                    count: last_seq,
                    last_seq,
                    last_index: from_sql(last_index, "last_index", path)?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// The message with this id, if it was applied.
    pub async fn by_msg_id(&self, msg_id: Uuid) -> Result<Option<Record>, StoreError> {
        self.with_conn(move |conn, path| record_by_msg_id(conn, path, msg_id))
            .await
    }

    /// Number of messages in all conversations.
    ///
    /// Seq is dense from 1 in every conversation, so the sum of `last_seq` is the row count,
    /// read from one row per conversation instead of a scan of every message.
    pub async fn count(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn, path| {
            let total: i64 = conn
                .query_row(
                    "SELECT COALESCE(SUM(last_seq), 0) FROM conversations",
                    [],
                    |r| r.get(0),
                )
                .at(path)?;
            from_sql(total, "message count", path)
        })
        .await
    }

    /// The last applied log index (0 = none yet), updated after every apply and install.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// The live tails of watched conversations, for event streams.
    pub fn tail(&self) -> &Tail {
        &self.inner.tail
    }
}

impl ReaderShared {
    /// Runs `f` on a free pooled connection, on the calling (blocking) thread.
    fn on_free_conn<T>(
        &self,
        f: impl FnOnce(&Connection, &Path) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.conns[(start + i) % n].try_lock() {
                Ok(conn) => return f(&conn, &self.path),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Poisoned(_)) => {
                    return Err(StoreError::Poisoned {
                        path: self.path.clone(),
                    })
                }
            }
        }
        // All busy: wait for the one this call was assigned.
        let conn = lock(&self.conns[start], &self.path)?;
        f(&conn, &self.path)
    }
}

/// Reads rows straight into event bytes: the columns are borrowed from the statement, so no
/// `Record` and no string is built per event.
fn event_page(
    conn: &Connection,
    path: &Path,
    conv_id: &str,
    from_seq: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<EventPage, StoreError> {
    let (sql, from, limit) = page_query(from_seq, max_events);
    let mut stmt = conn.prepare_cached(&sql).at(path)?;
    let mut rows = stmt.query((conv_id, from, limit)).at(path)?;
    // Small to start with: most reads of a subscriber at the head find nothing or a few
    // events, and a large buffer kept per read would show in the node's memory.
    let mut out = Vec::with_capacity(4096);
    let mut count = 0;
    let mut next_seq = from_seq;
    while out.len() < max_bytes {
        let Some(row) = rows.next().at(path)? else {
            break;
        };
        let text = |i: usize, what: &str| -> Result<&str, StoreError> {
            match row.get_ref(i).at(path)? {
                ValueRef::Text(t) => std::str::from_utf8(t)
                    .map_err(|e| StoreError::invalid(path, format!("{what} is not UTF-8: {e}"))),
                other => Err(StoreError::invalid(
                    path,
                    format!("{what} is {:?}, not text", other.data_type()),
                )),
            }
        };
        let int = |i: usize, what: &str| -> Result<u64, StoreError> {
            from_sql(row.get::<_, i64>(i).at(path)?, what, path)
        };
        let seq = int(1, "seq")?;
        let fields = event::RowFields {
            index: int(0, "index")?,
            seq,
            term: int(2, "term")?,
            conv_id: text(3, "conv_id")?,
            msg_id: text(4, "msg_id")?,
            sender: text(5, "sender")?,
            payload: text(6, "payload")?,
            vector_clock: match row.get_ref(7).at(path)? {
                ValueRef::Null => None,
                _ => Some(text(7, "vector_clock")?),
            },
            committed_at_ms: row.get(8).at(path)?,
        };
        event::write_row(&mut out, &fields);
        count += 1;
        next_seq = seq + 1;
    }
    Ok(EventPage {
        bytes: Bytes::from(out),
        count,
        next_seq,
    })
}

/// The query of one page of a conversation from `from_seq` on, at most `limit` records, with
/// its bound parameters (`?1` is the conversation).
fn page_query(from_seq: u64, limit: usize) -> (String, i64, i64) {
    let from = i64::try_from(from_seq).unwrap_or(i64::MAX); // beyond any stored seq
    let limit = i64::try_from(limit).unwrap_or(i64::MAX); // SQLite's LIMIT is signed
    let sql = format!(
        "SELECT {RECORD_COLUMNS} FROM messages
         WHERE conv_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3"
    );
    (sql, from, limit)
}
