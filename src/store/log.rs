//! The Raft log in `raft-log.db`: entries, vote, committed and last-purged log ids.
//!
//! Entries are stored as JSON, keyed by their index. The log is a contiguous range
//! `(last_purged, last]`: `purge` cuts the front, `truncate` cuts the back, `append` extends it.
//!
//! # Group commit
//! One writer thread owns the only writing connection. Every write (append, vote, truncate,
//! purge) is a command on its queue; the thread takes everything queued, runs it in ONE
//! transaction, commits (one fsync), and only then reports each command done. The committed
//! log id is not a command: the latest one rides along with the next transaction. While one
//! fsync runs, the next batch queues up, so a busy leader pays one fsync for many entries.
//!
//! `append` returns as soon as its entries are queued, as openraft's storage API allows; the
//! flush callback fires after the commit. Every entry also goes into [`RecentEntries`], which
//! reads overlay on the database: an entry not yet on disk is served from there (the leader
//! counts its own copy toward a quorum only once flushed), and so are the newest entries
//! after their flush, which is what replication reads right after it: a follower that keeps up
//! is sent entries without a database read or a JSON decode.
//!
//! # The leader's own flush
//! On a leader, openraft (as patched in `vendor/openraft`) sends new entries to the followers
//! while they are being written here, and two followers' flushes can commit an entry before
//! this node's own. The state machine therefore waits through [`LogDurability`] until every
//! entry it applies is on this node's disk: no node ever applies an entry its own log could
//! lose, and a client is answered only once the leader has its message on disk too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::checkpoint::Checkpointer;
use super::{
    blocking, ensure_schema, get_json, lock, open_live, put_json, to_sql, Access, KvTable,
    SqlContext, StoreError,
};
use crate::types::{Entry, LogId, NewMessage, NodeId, Request, StorageError, TypeConfig};

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
    /// The writer thread's queue; the thread owns the only connection that writes.
    writer: Mutex<mpsc::Sender<Command>>,
    /// Joined on drop, so the last handle going away means every queued write is done.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The newest entries, on disk or not yet; reads overlay them on the database.
    recent: Arc<SharedRecent>,
    /// A second connection for log reads (replication streams), so that they never queue
    /// behind an append's fsync. WAL gives it every transaction committed before the read starts.
    reader: Mutex<Connection>,
    /// The committed log index as last saved by openraft (0 = none), for `/status` and
    /// `/readyz`; see [`LogStore::commit_index_handle`].
    committed: Arc<AtomicU64>,
    /// The committed log id as openraft last saved it, and whether it is still to be written.
    /// It rides along with the next transaction the writer makes anyway, never costing an
    /// fsync of its own.
    committed_latest: Arc<Mutex<PendingCommitted>>,
}

/// The last committed log id openraft saved; `dirty` until the writer has written it.
#[derive(Default)]
struct PendingCommitted {
    latest: Option<Option<LogId>>,
    dirty: bool,
}

impl LogStore {
    /// Opens `raft-log.db`, creating the schema when the file is new.
    pub(crate) fn open(path: &Path) -> Result<LogStore, StoreError> {
        let mut writer = open_live(path, Access::ReadWrite)?;
        ensure_schema(&mut writer, path, SCHEMA)?;
        let checkpointer = Checkpointer::attach(&writer, path)?;
        let reader = open_live(path, Access::ReadOnly)?;
        let committed: Option<LogId> = get_meta(&reader, path, KEY_COMMITTED)?;
        let committed = Arc::new(AtomicU64::new(committed.map_or(0, |c| c.index)));
        let recent = Arc::new(SharedRecent::default());
        let committed_latest = Arc::new(Mutex::new(PendingCommitted::default()));
        let (tx, rx) = mpsc::channel();
        let thread = Writer {
            conn: writer,
            checkpointer,
            path: path.to_path_buf(),
            rx,
            recent: recent.clone(),
            committed_latest: committed_latest.clone(),
            failed: None,
        };
        let handle = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || thread.run())
            .map_err(StoreError::io("start the log writer thread for", path))?;
        Ok(LogStore {
            inner: Arc::new(LogShared {
                path: path.to_path_buf(),
                writer: Mutex::new(tx),
                thread: Mutex::new(Some(handle)),
                recent,
                reader: Mutex::new(reader),
                committed,
                committed_latest,
            }),
        })
    }

    /// The committed log index (0 = none), updated each time openraft saves it through
    /// `save_committed` and primed from disk at open. Shared by every clone of this store.
    pub fn commit_index_handle(&self) -> Arc<AtomicU64> {
        self.inner.committed.clone()
    }

    /// A handle to wait for entries to reach this node's disk; see [`LogDurability`].
    pub(crate) fn durability(&self) -> LogDurability {
        LogDurability {
            path: self.inner.path.clone(),
            recent: self.inner.recent.clone(),
        }
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

    /// Runs `op` in the writer's next transaction and waits until that transaction is on disk.
    async fn write<F>(&self, subject: ErrorSubject<NodeId>, op: F) -> Result<(), StorageError>
    where
        F: FnOnce(&Transaction<'_>, &Path) -> Result<(), StoreError> + Send + 'static,
    {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Command::Exec {
            op: Some(Box::new(op)),
            done,
        })
        .map_err(|e| e.into_storage(subject.clone(), ErrorVerb::Write))?;
        let result = wait
            .await
            .unwrap_or_else(|_| Err(StoreError::Task("the log writer stopped".into())));
        result.map_err(|e| e.into_storage(subject, ErrorVerb::Write))
    }

    /// Queues `command` for the writer. When the writer is gone, waiters on the disk are told
    /// so (nothing pending will get there any more).
    fn send(&self, command: Command) -> Result<(), StoreError> {
        lock(&self.inner.writer, &self.inner.path)?
            .send(command)
            .map_err(|_| {
                let why = "the log writer stopped";
                self.inner.recent.writer_failed(why);
                StoreError::Task(why.into())
            })
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
    get_json(conn, path, KvTable::Log, key)
}

fn put_meta<T: Serialize>(
    tx: &Transaction<'_>,
    path: &Path,
    key: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    put_json(tx, path, KvTable::Log, key, value)
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
        // The newest entries are served from memory (all of those not yet on disk are among
        // them). Only ask the database for what lies before the first one held.
        let (pending, db_end) = {
            let recent = lock(&self.inner.recent.entries, &self.inner.path)
                .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))?;
            let pending = recent.range(start as u64, end as u64);
            let db_end = match recent.first_index() {
                Some(first) => (first as i64 - 1).min(end),
                None => end,
            };
            (pending, db_end)
        };
        let mut entries = if start <= db_end {
            self.read(ErrorSubject::Logs, move |conn, path| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx",
                    )
                    .at(path)?;
                let rows = stmt
                    .query_map((start, db_end), |r| r.get::<_, String>(0))
                    .at(path)?;
                let mut entries = Vec::new();
                for json in rows {
                    entries.push(decode_entry(path, &json.at(path)?)?);
                }
                Ok(entries)
            })
            .await?
        } else {
            Vec::new()
        };
        entries.extend(pending);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_unflushed = lock(&self.inner.recent.entries, &self.inner.path)
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))?
            .last_log_id();
        let state = self
            .read(ErrorSubject::Logs, |conn, path| {
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
            .await?;
        Ok(LogState {
            last_log_id: last_unflushed.or(state.last_log_id),
            ..state
        })
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

    /// Kept in memory and written with the next transaction the writer makes for other
    /// reasons (an append, a vote), never with an fsync of its own: openraft does not need the
    /// committed index on disk (a lower one at start only means fewer entries re-applied before
    /// the leader tells the commit again), while an fsync just for it would delay the next
    /// append on every node. `commit_index_handle` shows it at once.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut pending = lock(&self.inner.committed_latest, &self.inner.path)
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))?;
        pending.latest = Some(committed);
        pending.dirty = true;
        self.inner
            .committed
            .store(committed.map_or(0, |c| c.index), Ordering::Release);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let latest = lock(&self.inner.committed_latest, &self.inner.path)
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))?
            .latest;
        if let Some(latest) = latest {
            return Ok(latest);
        }
        self.read(ErrorSubject::Store, |conn, path| {
            get_meta(conn, path, KEY_COMMITTED)
        })
        .await
    }

    /// Queues the batch for the writer and returns.
    ///
    /// Durability: `callback` is told only after the group commit holding these entries
    /// returned, i.e. after the WAL was fsynced; openraft counts this node's copy toward a
    /// quorum only then.
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
        let fail = |e: StoreError| e.into_storage(ErrorSubject::Logs, ErrorVerb::Write);
        {
            let mut recent = lock(&self.inner.recent.entries, &self.inner.path).map_err(fail)?;
            for e in &entries {
                recent.insert(e.clone());
            }
        }
        self.send(Command::Append { entries, callback })
            .map_err(fail)
    }

    /// Deletes `log_id.index` and everything after it, in one transaction.
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Queued appends of these indexes still reach the database, but the DELETE below runs
        // after them in the same order; readers stop seeing them now.
        lock(&self.inner.recent.entries, &self.inner.path)
            .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Write))?
            .truncate_from(log_id.index);
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
        // Only entries behind a snapshot are purged: long on disk, never pending.
        lock(&self.inner.recent.entries, &self.inner.path)
            .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Write))?
            .purge_upto(log_id.index);
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

impl Drop for LogShared {
    fn drop(&mut self) {
        // Replacing the only sender disconnects the queue: the writer finishes what is queued,
        // then returns.
        if let Ok(mut writer) = self.writer.lock() {
            *writer = mpsc::channel().0;
        }
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!(path = %self.path.display(), "the log writer thread panicked");
            }
        }
    }
}

/// Waits for entries to be on this node's disk: what the state machine checks before it applies
/// them, since a leader may see an entry committed by its followers' flushes before its own.
#[derive(Clone)]
pub(crate) struct LogDurability {
    path: PathBuf,
    recent: Arc<SharedRecent>,
}

impl LogDurability {
    /// Blocks until every entry of the log up to `index` is on disk, or the log writer failed.
    ///
    /// An entry not in [`RecentEntries`] is on disk (only flushed entries are dropped from it),
    /// so this waits only while one of its pending entries is at or below `index`: never on a
    /// follower, which flushes before it acknowledges, and on a leader at most for one group
    /// commit.
    pub(crate) fn wait_on_disk(&self, index: u64) -> Result<(), StoreError> {
        let mut recent = lock(&self.recent.entries, &self.path)?;
        loop {
            if !matches!(recent.first_pending(), Some(p) if p <= index) {
                return Ok(());
            }
            if let Some(why) = &recent.write_failed {
                return Err(StoreError::Task(format!(
                    "the Raft log could not be written: {why}"
                )));
            }
            recent = self
                .recent
                .flushed
                .wait(recent)
                .map_err(|_| StoreError::Task("a log lock was poisoned".into()))?;
        }
    }
}

/// [`RecentEntries`] and the signal that some of them reached the disk, shared by the store,
/// its writer thread and [`LogDurability`].
#[derive(Default)]
struct SharedRecent {
    entries: Mutex<RecentEntries>,
    /// Signalled each time entries reach the disk or the writer stops.
    flushed: Condvar,
}

impl SharedRecent {
    /// Records that nothing pending will reach the disk any more, and wakes every waiter.
    /// Works on a poisoned lock too: a waiter must never be left behind.
    fn writer_failed(&self, why: &str) {
        let mut recent = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        recent.write_failed.get_or_insert_with(|| why.to_owned());
        self.flushed.notify_all();
    }
}

/// How many entries already on disk [`RecentEntries`] keeps, at most...
const RECENT_ENTRIES: usize = 1024;
/// ...and about how many bytes of them.
const RECENT_BYTES: usize = 32 << 20;

/// The newest entries of the log, in memory: every entry appended and not yet on disk, and
/// after their flush the newest ones up to [`RECENT_ENTRIES`] and [`RECENT_BYTES`]. When not
/// empty they are the log's last entries, with no gap: appends add at the end, a truncate cuts
/// the end, and only the oldest entries already on disk are dropped.
#[derive(Default)]
struct RecentEntries {
    entries: BTreeMap<u64, Recent>,
    /// The indexes of `entries` not yet on disk.
    pending: BTreeSet<u64>,
    /// How many of `entries` are on disk, and their estimated size.
    on_disk: usize,
    on_disk_bytes: usize,
    /// Why the log writer stopped writing, once it has: pending entries never reach the disk.
    write_failed: Option<String>,
}

struct Recent {
    entry: Entry,
    on_disk: bool,
    /// About how many bytes the entry holds.
    size: usize,
}

impl RecentEntries {
    fn insert(&mut self, entry: Entry) {
        let index = entry.log_id.index;
        let size = entry_size(&entry);
        if let Some(old) = self.entries.insert(
            index,
            Recent {
                entry,
                on_disk: false,
                size,
            },
        ) {
            self.forget(&old);
        }
        self.pending.insert(index);
    }

    /// The entry with `log_id` is on disk (a truncate may have replaced its index since).
    fn on_disk(&mut self, log_id: &LogId) {
        if let Some(r) = self.entries.get_mut(&log_id.index) {
            if r.entry.log_id == *log_id && !r.on_disk {
                r.on_disk = true;
                self.on_disk += 1;
                self.on_disk_bytes += r.size;
                self.pending.remove(&log_id.index);
            }
        }
    }

    /// Drops the oldest entries on disk beyond the bounds; never one that is not on disk.
    fn evict(&mut self) {
        while self.on_disk > RECENT_ENTRIES || self.on_disk_bytes > RECENT_BYTES {
            match self.entries.first_entry() {
                Some(first) if first.get().on_disk => {
                    let r = first.remove();
                    self.forget(&r);
                }
                _ => break,
            }
        }
    }

    fn truncate_from(&mut self, index: u64) {
        for r in self.entries.split_off(&index).into_values() {
            self.forget(&r);
        }
    }

    fn purge_upto(&mut self, index: u64) {
        let kept = self.entries.split_off(&index.saturating_add(1));
        for r in std::mem::replace(&mut self.entries, kept).into_values() {
            self.forget(&r);
        }
    }

    fn forget(&mut self, r: &Recent) {
        if r.on_disk {
            self.on_disk -= 1;
            self.on_disk_bytes -= r.size;
        } else {
            self.pending.remove(&r.entry.log_id.index);
        }
    }

    /// The lowest index not yet on disk.
    fn first_pending(&self) -> Option<u64> {
        self.pending.first().copied()
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.first_key_value().map(|(i, _)| *i)
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, r)| r.entry.log_id)
    }

    fn range(&self, start: u64, end: u64) -> Vec<Entry> {
        if start > end {
            return Vec::new();
        }
        self.entries
            .range(start..=end)
            .map(|(_, r)| r.entry.clone())
            .collect()
    }
}

/// About how many bytes an entry holds in memory.
fn entry_size(entry: &Entry) -> usize {
    const OVERHEAD: usize = 128;
    match &entry.payload {
        openraft::EntryPayload::Normal(Request::Post(m)) => OVERHEAD + message_size(m),
        openraft::EntryPayload::Normal(Request::Batch(ms)) => {
            OVERHEAD + ms.iter().map(message_size).sum::<usize>()
        }
        _ => OVERHEAD,
    }
}

fn message_size(m: &NewMessage) -> usize {
    96 + m.conv_id.len()
        + m.sender.len()
        + m.payload.len()
        + m.vector_clock
            .as_ref()
            .map_or(0, |vc| vc.0.iter().map(|(k, _)| k.len() + 32).sum())
}

/// A unit of work for the writer thread.
enum Command {
    /// Entries to insert; `callback` fires once they are on disk.
    Append {
        entries: Vec<Entry>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Any other write; `done` gets the outcome once it is on disk.
    Exec {
        /// Taken (left `None`) when it runs.
        op: Option<WriteOp>,
        done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    },
}

/// A write run inside the writer's transaction.
type WriteOp = Box<dyn FnOnce(&Transaction<'_>, &Path) -> Result<(), StoreError> + Send>;

/// The most commands one group commit takes, so one huge burst cannot delay every ack.
const MAX_GROUP: usize = 1024;

/// The writer thread: one transaction and one fsync per batch of queued commands.
struct Writer {
    conn: Connection,
    /// Copies the WAL back into `raft-log.db` off this thread.
    checkpointer: Checkpointer,
    path: PathBuf,
    rx: mpsc::Receiver<Command>,
    recent: Arc<SharedRecent>,
    /// The committed log id to write with the next transaction, when dirty.
    committed_latest: Arc<Mutex<PendingCommitted>>,
    /// Set by the first failed commit: nothing is written after it, every later command fails
    /// (the node stops on the first error; this keeps a half-broken disk from being trusted).
    failed: Option<String>,
}

impl Writer {
    fn run(mut self) {
        // However the thread ends (every LogStore handle dropped, or a panic), a wait for an
        // entry still pending must not last forever.
        struct Stopped(Arc<SharedRecent>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                let why = if std::thread::panicking() {
                    "the log writer thread panicked"
                } else {
                    "the log writer thread stopped"
                };
                self.0.writer_failed(why);
            }
        }
        let _stopped = Stopped(self.recent.clone());
        // Ends when every LogStore handle is dropped.
        while let Ok(first) = self.rx.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            let result = match &self.failed {
                Some(why) => Err(StoreError::Task(format!("an earlier write failed: {why}"))),
                None => self.commit(&mut group),
            };
            if let Err(e) = &result {
                self.failed.get_or_insert_with(|| e.to_string());
            }
            self.finish(group, result);
        }
    }

    /// Runs every command of the group in one transaction. `Exec` ops are taken out of the
    /// group as they run; appends stay for `finish`.
    fn commit(&mut self, group: &mut [Command]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        for command in group.iter_mut() {
            match command {
                Command::Append { entries, .. } => {
                    let mut stmt = tx
                        .prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")
                        .at(&path)?;
                    for entry in entries.iter() {
                        let json =
                            serde_json::to_string(entry).map_err(|source| StoreError::Serde {
                                what: "log entry",
                                path: path.clone(),
                                source,
                            })?;
                        stmt.execute((to_sql(entry.log_id.index, "log index", &path)?, json))
                            .at(&path)?;
                    }
                }
                Command::Exec { op, .. } => {
                    if let Some(op) = op.take() {
                        op(&tx, &path)?;
                    }
                }
            }
        }
        write_committed(&self.committed_latest, &path, &tx)?;
        // Durability: with synchronous=FULL this COMMIT fsyncs the WAL before returning.
        tx.commit().at(&path)?;
        self.checkpointer.committed();
        Ok(())
    }

    /// Reports the group's outcome: flush callbacks, waiting writers, and the recent entries.
    fn finish(&self, group: Vec<Command>, result: Result<(), StoreError>) {
        match &result {
            Ok(()) => {
                // A panic elsewhere while holding the lock leaves the entries as they were.
                let mut recent = self
                    .recent
                    .entries
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for command in &group {
                    if let Command::Append { entries, .. } = command {
                        for e in entries {
                            recent.on_disk(&e.log_id);
                        }
                    }
                }
                recent.evict();
                self.recent.flushed.notify_all();
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "the Raft log could not be written");
                self.recent.writer_failed(&e.to_string());
            }
        }
        for command in group {
            match command {
                Command::Append { callback, .. } => {
                    let outcome = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    };
                    callback.log_io_completed(outcome);
                }
                Command::Exec { done, .. } => {
                    let outcome = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(StoreError::Task(format!("the group commit failed: {e}"))),
                    };
                    let _ = done.send(outcome);
                }
            }
        }
    }
}

/// Writes the latest committed log id, if it changed, into `tx` after the group's own
/// commands, but never past the last entry this transaction leaves in the log: an
/// entry queued after this group may already count as committed, and a committed id
/// beyond the log on disk would stop the next start (openraft re-applies up to it). Such
/// an id stays pending until a later transaction holds its entry.
fn write_committed(
    committed: &Mutex<PendingCommitted>,
    path: &Path,
    tx: &Transaction<'_>,
) -> Result<(), StoreError> {
    let mut pending = lock(committed, path)?;
    if !pending.dirty {
        return Ok(());
    }
    match pending.latest {
        Some(Some(c)) => {
            // The log's last index: its last entry, or where it was purged up to.
            let last: Option<i64> = tx
                .query_row("SELECT MAX(idx) FROM log", [], |r| r.get(0))
                .at(path)?;
            let purged: Option<LogId> = get_meta(tx, path, KEY_LAST_PURGED)?;
            let last = last.map(from_sql_index).max(purged.map(|p| p.index));
            let on_disk = last.is_some_and(|last| c.index <= last);
            if !on_disk {
                return Ok(());
            }
            put_meta(tx, path, KEY_COMMITTED, &c)?;
        }
        Some(None) => {
            tx.execute("DELETE FROM meta WHERE key = ?1", [KEY_COMMITTED])
                .at(path)?;
        }
        None => return Ok(()),
    }
    pending.dirty = false;
    Ok(())
}

/// A stored (non-negative) log index.
fn from_sql_index(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod recent_tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(r: &RecentEntries) -> Vec<u64> {
        r.entries.keys().copied().collect()
    }

    #[test]
    fn only_entries_on_disk_are_dropped_oldest_first() {
        let mut r = RecentEntries::default();
        let n = RECENT_ENTRIES as u64 + 10;
        for i in 1..=n {
            r.insert(entry(1, i));
        }
        // Nothing is on disk yet: everything stays, however many.
        r.evict();
        assert_eq!(r.entries.len(), n as usize);
        // The first half reaches the disk: the oldest of them go, down to the bound, and
        // none of those still pending.
        for i in 1..=n / 2 {
            r.on_disk(&entry(1, i).log_id);
        }
        r.evict();
        assert_eq!(r.first_index(), Some(1));
        for i in n / 2 + 1..=n {
            r.on_disk(&entry(1, i).log_id);
        }
        r.evict();
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
        assert_eq!(r.first_index(), Some(11));
        assert_eq!(r.last_log_id(), Some(entry(1, n).log_id));
        assert_eq!(r.on_disk, RECENT_ENTRIES);
    }

    #[test]
    fn truncate_and_purge_keep_a_gapless_tail() {
        let mut r = RecentEntries::default();
        for i in 1..=10 {
            r.insert(entry(1, i));
        }
        for i in 1..=6 {
            r.on_disk(&entry(1, i).log_id);
        }
        assert_eq!(r.first_pending(), Some(7));
        r.truncate_from(8);
        assert_eq!(indexes(&r), (1..=7).collect::<Vec<_>>());
        assert_eq!(
            r.first_pending(),
            Some(7),
            "8, 9 and 10 are no longer waited for"
        );
        r.on_disk(&entry(1, 7).log_id);
        assert_eq!(r.first_pending(), None);
        // A newer entry at a truncated index; the old one's flush report does not count.
        r.insert(entry(2, 8));
        r.on_disk(&entry(1, 8).log_id);
        assert!(!r.entries[&8].on_disk);
        assert_eq!(r.first_pending(), Some(8));
        r.on_disk(&entry(2, 8).log_id);
        assert!(r.entries[&8].on_disk);
        assert_eq!(r.first_pending(), None);
        r.purge_upto(3);
        assert_eq!(indexes(&r), (4..=8).collect::<Vec<_>>());
        assert_eq!(r.on_disk, 5, "4 to 7 and the new 8 are on disk");
        assert_eq!(
            r.range(7, 100).iter().map(|e| e.log_id).collect::<Vec<_>>(),
            vec![entry(1, 7).log_id, entry(2, 8).log_id]
        );
        assert!(r.range(9, 8).is_empty());
    }

    fn durability(recent: RecentEntries) -> LogDurability {
        LogDurability {
            path: PathBuf::from("raft-log.db"),
            recent: Arc::new(SharedRecent {
                entries: Mutex::new(recent),
                flushed: Condvar::new(),
            }),
        }
    }

    #[test]
    fn waiting_for_the_disk_ends_with_the_flush_of_every_entry_up_to_the_index() {
        let mut r = RecentEntries::default();
        for i in 1..=4 {
            r.insert(entry(1, i));
        }
        r.on_disk(&entry(1, 1).log_id);
        let d = durability(r);
        // Entry 1 is on disk and older entries are not in memory at all: no wait.
        d.wait_on_disk(1).unwrap();
        d.wait_on_disk(0).unwrap();

        let (done_tx, done_rx) = mpsc::channel();
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || {
                let outcome = d.wait_on_disk(3);
                done_tx.send(outcome.is_ok()).unwrap();
            })
        };
        // The flush of 2 alone does not release a wait for 3; that of 2 and 3 does, while 4
        // is still pending.
        let flush = |ids: &[u64]| {
            let mut r = d.recent.entries.lock().unwrap();
            for &i in ids {
                r.on_disk(&entry(1, i).log_id);
            }
            d.recent.flushed.notify_all();
        };
        flush(&[2]);
        assert_eq!(done_rx.try_recv(), Err(mpsc::TryRecvError::Empty));
        flush(&[3]);
        let released = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(released, Ok(true));
        waiter.join().unwrap();
        assert_eq!(d.recent.entries.lock().unwrap().first_pending(), Some(4));
    }

    #[test]
    fn waiting_for_the_disk_fails_once_the_writer_failed() {
        let mut r = RecentEntries::default();
        r.insert(entry(1, 1));
        r.write_failed = Some("disk full".into());
        let d = durability(r);
        let err = d.wait_on_disk(1).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        // What reached the disk before the failure is still there.
        d.wait_on_disk(0).unwrap();
    }
}
