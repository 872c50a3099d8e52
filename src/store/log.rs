//! The Raft log in `raft-log.db`: entries, vote, committed and last-purged log ids.
//!
//! Entries are stored as JSON, keyed by their index. The log is a contiguous range
//! `(last_purged, last]`: `purge` cuts the front, `truncate` cuts the back, `append` extends it.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{blocking, ensure_schema, lock, open_live, to_sql, Access, SqlContext, StoreError};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const SCHEMA: &str = "
    CREATE TABLE log (
        idx   INTEGER PRIMARY KEY,
        entry TEXT NOT NULL          -- openraft::Entry<TypeConfig> as JSON
    );
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,      -- 'vote', 'committed', 'last_purged'
        value TEXT NOT NULL          -- JSON
    );
";

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Raft log storage on `raft-log.db`. Cloning shares the connections.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<LogShared>,
}

struct LogShared {
    /// Path of `raft-log.db`, for error messages.
    path: PathBuf,
    /// The only connection that writes. Openraft already serializes write IO (append, truncate,
    /// purge, vote); the mutex makes the connection shareable with blocking tasks.
    writer: Mutex<Connection>,
    /// A second connection for log reads (replication streams), so that they never queue
    /// behind an append's fsync. WAL gives it every transaction committed before the read starts.
    reader: Mutex<Connection>,
    /// The committed log index as last saved by openraft (0 = none), for `/status` and
    /// `/readyz`; see [`LogStore::commit_index_handle`].
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens `raft-log.db`, creating the schema when the file is new.
    pub(crate) fn open(path: &Path) -> Result<LogStore, StoreError> {
        let mut writer = open_live(path, Access::ReadWrite)?;
        ensure_schema(&mut writer, path, SCHEMA)?;
        let reader = open_live(path, Access::ReadOnly)?;
        let committed: Option<LogId> = get_meta(&reader, path, KEY_COMMITTED)?;
        Ok(LogStore {
            inner: Arc::new(LogShared {
                path: path.to_path_buf(),
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                committed: Arc::new(AtomicU64::new(committed.map_or(0, |c| c.index))),
            }),
        })
    }

    /// The committed log index (0 = none), updated each time openraft saves it through
    /// `save_committed` and primed from disk at open. Shared by every clone of this store.
    pub fn commit_index_handle(&self) -> Arc<AtomicU64> {
        self.inner.committed.clone()
    }

    /// True when the log has no entries, no vote and nothing purged (a fresh node).
    pub async fn is_fresh(&mut self) -> Result<bool, StorageError> {
        let inner = self.inner.clone();
        blocking(move || {
            let conn = lock(&inner.reader, &inner.path)?;
            let (has_entries, has_meta): (bool, bool) = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM log),
                            EXISTS (SELECT 1 FROM meta WHERE key IN (?1, ?2))",
                    [KEY_VOTE, KEY_LAST_PURGED],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .at(&inner.path)?;
            Ok(!has_entries && !has_meta)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn write<T, F>(&self, subject: ErrorSubject<NodeId>, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Transaction<'_>, &Path) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || {
            let path = inner.path.as_path();
            let mut conn = lock(&inner.writer, path)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .at(path)?;
            let out = f(&tx, path)?;
            // Durability: with synchronous=FULL this COMMIT fsyncs the WAL before returning.
            tx.commit().at(path)?;
            Ok(out)
        })
        .await
        .map_err(|e| e.into_storage(subject, ErrorVerb::Write))
    }

    async fn read<T, F>(&self, subject: ErrorSubject<NodeId>, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Connection, &Path) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || {
            let path = inner.path.as_path();
            let conn = lock(&inner.reader, path)?;
            f(&conn, path)
        })
        .await
        .map_err(|e| e.into_storage(subject, ErrorVerb::Read))
    }
}

fn get_meta<T: DeserializeOwned>(
    conn: &Connection,
    path: &Path,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let raw: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .at(path)?;
    raw.map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|source| StoreError::Serde {
            what: key,
            path: path.to_path_buf(),
            source,
        })
}

fn put_meta<T: Serialize>(
    tx: &Transaction<'_>,
    path: &Path,
    key: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(value).map_err(|source| StoreError::Serde {
        what: key,
        path: path.to_path_buf(),
        source,
    })?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, json),
    )
    .at(path)?;
    Ok(())
}

fn decode_entry(path: &Path, json: &str) -> Result<Entry, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Serde {
        what: "log entry",
        path: path.to_path_buf(),
        source,
    })
}

/// Turns any index range into inclusive SQL bounds, or `None` when it is empty.
fn sql_bounds<RB: RangeBounds<u64>>(range: &RB) -> Option<(i64, i64)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    if start > end {
        return None;
    }
    // Indexes above i64::MAX cannot be stored, so clamping loses nothing.
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Some((clamp(start), clamp(end)))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some((start, end)) = sql_bounds(&range) else {
            return Ok(Vec::new());
        };
        self.read(ErrorSubject::Logs, move |conn, path| {
            let mut stmt = conn
                .prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx")
                .at(path)?;
            let rows = stmt
                .query_map((start, end), |r| r.get::<_, String>(0))
                .at(path)?;
            let mut entries = Vec::new();
            for json in rows {
                entries.push(decode_entry(path, &json.at(path)?)?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.read(ErrorSubject::Logs, |conn, path| {
            let last_purged_log_id: Option<LogId> = get_meta(conn, path, KEY_LAST_PURGED)?;
            let last_json: Option<String> = conn
                .query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                    r.get(0)
                })
                .optional()
                .at(path)?;
            let last_entry_id = match last_json {
                Some(json) => Some(decode_entry(path, &json)?.log_id),
                None => None,
            };
            // purge deletes every entry up to last_purged, so a remaining entry is always newer.
            let last_log_id = last_entry_id.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durability: the vote is committed (WAL fsynced) before this returns.
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.write(ErrorSubject::Vote, move |tx, path| {
            put_meta(tx, path, KEY_VOTE, &vote)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read(ErrorSubject::Vote, |conn, path| {
            get_meta(conn, path, KEY_VOTE)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write(ErrorSubject::Store, move |tx, path| match committed {
            Some(c) => put_meta(tx, path, KEY_COMMITTED, &c),
            None => {
                tx.execute("DELETE FROM meta WHERE key = ?1", [KEY_COMMITTED])
                    .at(path)?;
                Ok(())
            }
        })
        .await?;
        // Published only once it is on disk, like everything else this store reports.
        self.inner
            .committed
            .store(committed.map_or(0, |c| c.index), Ordering::Release);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read(ErrorSubject::Store, |conn, path| {
            get_meta(conn, path, KEY_COMMITTED)
        })
        .await
    }

    /// Writes the whole batch in one transaction.
    ///
    /// Durability: `callback` is told only after the COMMIT returned, i.e. after the WAL was
    /// fsynced; openraft counts this node's copy toward a quorum only then.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self
            .write(ErrorSubject::Logs, move |tx, path| {
                let mut stmt = tx
                    .prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")
                    .at(path)?;
                for entry in &entries {
                    let json =
                        serde_json::to_string(entry).map_err(|source| StoreError::Serde {
                            what: "log entry",
                            path: path.to_path_buf(),
                            source,
                        })?;
                    stmt.execute((to_sql(entry.log_id.index, "log index", path)?, json))
                        .at(path)?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    /// Deletes `log_id.index` and everything after it, in one transaction.
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.write(ErrorSubject::Log(log_id), move |tx, path| {
            tx.execute(
                "DELETE FROM log WHERE idx >= ?1",
                [to_sql(log_id.index, "log index", path)?],
            )
            .at(path)?;
            Ok(())
        })
        .await
    }

    /// Deletes everything up to `log_id.index` and records `last_purged` in the same
    /// transaction, so that `get_log_state` never sees the entries gone without the pointer.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.write(ErrorSubject::Log(log_id), move |tx, path| {
            let prev: Option<LogId> = get_meta(tx, path, KEY_LAST_PURGED)?;
            if prev.is_some_and(|p| p >= log_id) {
                // Already purged that far; the pointer never moves back.
                return Ok(());
            }
            tx.execute(
                "DELETE FROM log WHERE idx <= ?1",
                [to_sql(log_id.index, "log index", path)?],
            )
            .at(path)?;
            put_meta(tx, path, KEY_LAST_PURGED, &log_id)
        })
        .await
    }
}
