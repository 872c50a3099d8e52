//! The chat state machine in `messages.db`: the only writer of messages and conversations.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, Snapshot};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::fs::File;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::checkpoint::Checkpointer;
use super::growth::MessageGrowth;
use super::log::LogDurability;
use super::reader::record_by_msg_id;
use super::snapshot::{self, SnapshotBuilder, SnapshotData, SnapshotDir, TempFile};
use super::{
    blocking, ensure_schema, from_sql, get_json, lock, open_live, put_json, sql_path,
    sync_database, to_sql, Access, KvTable, SqlContext, StoreError,
};
use crate::fanout::Tail;
use crate::types::{
    format_millis, Entry, LogId, NewMessage, Record, Request, Response, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};

const SCHEMA: &str = "
    CREATE TABLE messages (
        idx             INTEGER PRIMARY KEY,   -- Raft log index: the global order
        conv_id         TEXT NOT NULL,
        seq             INTEGER NOT NULL,      -- dense per conversation, from 1
        term            INTEGER NOT NULL,
        msg_id          TEXT NOT NULL UNIQUE,
        sender          TEXT NOT NULL,
        payload         TEXT NOT NULL,
        vector_clock    TEXT NULL,             -- JSON as serialized by VectorClock, key order kept
        committed_at_ms INTEGER NOT NULL,
        UNIQUE (conv_id, seq)
    );
    CREATE TABLE conversations (
        conv_id    TEXT PRIMARY KEY,
        last_seq   INTEGER NOT NULL,
        last_index INTEGER NOT NULL
    );
    CREATE TABLE sm_meta (
        key   TEXT PRIMARY KEY,                -- 'last_applied' (LogId), 'membership' (StoredMembership)
        value TEXT NOT NULL                    -- JSON
    );
";

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";

/// State machine storage on `messages.db`, with its snapshots.
pub struct StateMachineStore {
    inner: Arc<SmShared>,
}

struct SmShared {
    /// Path of `messages.db`.
    path: PathBuf,
    /// The only connection that writes `messages.db`. Openraft calls the state machine from one
    /// task at a time; the mutex makes the connection shareable with blocking tasks.
    conn: Mutex<Connection>,
    /// Copies the WAL back into `messages.db` off the apply path.
    checkpointer: Checkpointer,
    /// The `snapshots/` directory, shared with snapshot builders.
    snapshots: Arc<SnapshotDir>,
    /// Last applied log index, published after each COMMIT for [`super::MessageReader`].
    applied: watch::Sender<u64>,
    /// The live tails of event streams: handed each newly stored record after its COMMIT,
    /// reset when a snapshot replaces the state.
    tail: Tail,
    /// Files handed out by `begin_receiving_snapshot`, by (device, inode), so that
    /// `install_snapshot` can use the received file in place instead of copying it.
    receiving: Mutex<HashMap<(u64, u64), PathBuf>>,
    /// Messages stored since the newest snapshot, moved after each COMMIT and each snapshot.
    growth: Arc<MessageGrowth>,
    /// This node's Raft log: `apply` waits for its entries to be on this node's disk.
    log: LogDurability,
}

impl StateMachineStore {
    /// Opens `messages.db`, creating the schema when the file is new. Returns the receiving side
    /// of the applied-index channel, primed with the stored `last_applied`.
    pub(crate) fn open(
        path: &Path,
        snapshots: Arc<SnapshotDir>,
        tail: Tail,
        log: LogDurability,
    ) -> Result<(StateMachineStore, watch::Receiver<u64>), StoreError> {
        let mut conn = open_live(path, Access::ReadWrite)?;
        // Durability: see the rules in `store` — the Raft log holds every applied entry on
        // disk; this file is synced before a snapshot lets the log behind it go.
        conn.pragma_update(None, "synchronous", "NORMAL").at(path)?;
        ensure_schema(&mut conn, path, SCHEMA)?;
        let checkpointer = Checkpointer::attach(&conn, path)?;
        let (last_applied, _) = read_applied_state(&conn, path)?;
        crate::metrics::set_conv_bytes(conv_payload_bytes(&conn, path)?);
        // An unreadable snapshot is the sender's problem when it is sent; here it only means
        // the next snapshot is due sooner, which replaces it.
        let in_snapshot = snapshots.current_last_message().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the newest snapshot's last message; counting from 0");
            0
        });
        let growth = Arc::new(MessageGrowth::new(
            last_message_index(&conn, path)?,
            in_snapshot,
        ));
        let (tx, rx) = watch::channel(last_applied.map_or(0, |l| l.index));
        let sm = StateMachineStore {
            inner: Arc::new(SmShared {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
                checkpointer,
                snapshots,
                applied: tx,
                tail,
                receiving: Mutex::new(HashMap::new()),
                growth,
                log,
            }),
        };
        Ok((sm, rx))
    }

    /// Messages stored since the newest snapshot, for `raft.snapshot_threshold_messages`.
    pub fn growth(&self) -> Arc<MessageGrowth> {
        self.inner.growth.clone()
    }
}

/// Payload bytes (UTF-8) per conversation: one full scan, run only when the whole state
/// changes (open, snapshot install); `apply` keeps the totals current after that.
fn conv_payload_bytes(
    conn: &Connection,
    path: &Path,
) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT conv_id, SUM(length(CAST(payload AS BLOB))) FROM messages GROUP BY conv_id",
        )
        .at(path)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .at(path)?;
    let mut out = std::collections::BTreeMap::new();
    for row in rows {
        let (conv, bytes) = row.at(path)?;
        out.insert(conv, from_sql(bytes, "payload bytes", path)?);
    }
    Ok(out)
}

/// Reads `last_applied` and the membership from `sm_meta` of a state machine database (the live
/// one or a snapshot copy).
pub(crate) fn read_applied_state(
    conn: &Connection,
    path: &Path,
) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let last_applied = read_last_applied(conn, path)?;
    let membership =
        get_json(conn, path, KvTable::StateMachine, KEY_MEMBERSHIP)?.unwrap_or_default();
    Ok((last_applied, membership))
}

/// Reads `last_applied` alone (every apply does; the membership is read only at open).
fn read_last_applied(conn: &Connection, path: &Path) -> Result<Option<LogId>, StoreError> {
    get_json(conn, path, KvTable::StateMachine, KEY_LAST_APPLIED)
}

fn put_sm_meta<T: serde::Serialize>(
    tx: &Transaction<'_>,
    path: &Path,
    key: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    put_json(tx, path, KvTable::StateMachine, key, value)
}

/// Replaces the membership stored in a standalone state file (a backup being restored).
pub(crate) fn set_state_membership(
    conn: &Connection,
    path: &Path,
    membership: &StoredMembership,
) -> Result<(), StoreError> {
    put_json(
        conn,
        path,
        KvTable::StateMachine,
        KEY_MEMBERSHIP,
        membership,
    )
}

/// Collects the payload bytes of the messages `response` newly stored, for `/metrics`.
///
/// The match is exhaustive on purpose: a new kind of response must say here whether it
/// stores messages, or the byte totals would silently drift.
fn newly_stored_bytes(response: &Response, out: &mut Vec<(String, u64)>) {
    match response {
        Response::Stored(r) => out.push((r.conv_id.clone(), r.payload.len() as u64)),
        Response::Duplicate(_) | Response::Conflict(_) | Response::None => {}
        Response::Batch(each) => {
            for r in each {
                newly_stored_bytes(r, out);
            }
        }
    }
}

/// The records `response` newly stored, in order (for the live tails).
///
/// Exhaustive like [`newly_stored_bytes`], for the same reason.
fn newly_stored<'a>(response: &'a Response, out: &mut Vec<&'a Record>) {
    match response {
        Response::Stored(r) => out.push(r),
        Response::Duplicate(_) | Response::Conflict(_) | Response::None => {}
        Response::Batch(each) => {
            for r in each {
                newly_stored(r, out);
            }
        }
    }
}

/// The last global message index stored (0 when there is none).
pub(crate) fn last_message_index(conn: &Connection, path: &Path) -> Result<u64, StoreError> {
    let last: Option<i64> = conn
        .prepare_cached("SELECT MAX(idx) FROM messages")
        .at(path)?
        .query_row([], |r| r.get(0))
        .at(path)?;
    from_sql(last.unwrap_or(0), "message index", path)
}

/// Cuts a copy of the state machine back to its state as of a snapshot: `meta`'s last log id
/// and membership, and the messages up to global index `last_message`. Exact because applying
/// only ever adds rows: a message, once stored, never changes; a conversation's counters are
/// those of its last message.
pub(crate) fn cut_back(
    conn: &mut Connection,
    path: &Path,
    meta: &SnapshotMeta,
    last_message: u64,
) -> Result<(), StoreError> {
    let last = to_sql(last_message, "message index", path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let stored = last_message_index(&tx, path)?;
    if stored < last_message {
        return Err(StoreError::invalid(
            path,
            format!("the copy ends at message {stored}, before snapshot {meta} (message {last_message})"),
        ));
    }
    tx.execute_batch("CREATE TEMP TABLE later (conv_id TEXT PRIMARY KEY) WITHOUT ROWID;")
        .at(path)?;
    tx.execute(
        "INSERT INTO temp.later SELECT DISTINCT conv_id FROM messages WHERE idx > ?1",
        [last],
    )
    .at(path)?;
    tx.execute("DELETE FROM messages WHERE idx > ?1", [last])
        .at(path)?;
    tx.execute_batch(
        "DELETE FROM conversations WHERE conv_id IN (SELECT conv_id FROM temp.later);
         INSERT INTO conversations (conv_id, last_seq, last_index)
         SELECT m.conv_id, m.seq, m.idx
         FROM temp.later l
         JOIN messages m ON m.conv_id = l.conv_id
             AND m.seq = (SELECT MAX(seq) FROM messages WHERE conv_id = l.conv_id);
         DROP TABLE temp.later;",
    )
    .at(path)?;
    match &meta.last_log_id {
        Some(l) => put_sm_meta(&tx, path, KEY_LAST_APPLIED, l)?,
        None => {
            tx.execute("DELETE FROM sm_meta WHERE key = ?1", [KEY_LAST_APPLIED])
                .at(path)?;
        }
    }
    put_sm_meta(&tx, path, KEY_MEMBERSHIP, &meta.last_membership)?;
    tx.commit().at(path)
}

/// Stores the messages of one apply transaction.
///
/// Built once per transaction: the statements are looked up once (not per message), and each
/// conversation's counters are kept here and written once at [`Applier::finish`] instead of
/// once per message.
struct Applier<'t> {
    tx: &'t Transaction<'t>,
    path: &'t Path,
    /// `INSERT INTO messages ... ON CONFLICT (msg_id) DO NOTHING`: the UNIQUE check on
    /// `msg_id` is the de-duplication lookup, so a new message costs no separate SELECT.
    insert: rusqlite::CachedStatement<'t>,
    /// `last_seq` of a conversation not yet touched in this transaction.
    last_seq: rusqlite::CachedStatement<'t>,
    /// The global index of the last stored message.
    last_index: u64,
    /// (last seq, last index) of each conversation stored to in this transaction.
    convs: HashMap<String, (u64, u64)>,
}

impl<'t> Applier<'t> {
    fn new(tx: &'t Transaction<'t>, path: &'t Path) -> Result<Applier<'t>, StoreError> {
        Ok(Applier {
            tx,
            path,
            insert: tx
                .prepare_cached(
                    "INSERT INTO messages
                         (idx, conv_id, seq, term, msg_id, sender, payload, vector_clock,
                          committed_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (msg_id) DO NOTHING",
                )
                .at(path)?,
            last_seq: tx
                .prepare_cached("SELECT last_seq FROM conversations WHERE conv_id = ?1")
                .at(path)?,
            last_index: last_message_index(tx, path)?,
            convs: HashMap::new(),
        })
    }

    /// The seq the next message of `conv_id` gets.
    fn next_seq(&mut self, conv_id: &str) -> Result<u64, StoreError> {
        if let Some((seq, _)) = self.convs.get(conv_id) {
            return Ok(seq + 1);
        }
        let last: Option<i64> = self
            .last_seq
            .query_row([conv_id], |r| r.get(0))
            .optional()
            .at(self.path)?;
        Ok(from_sql(last.unwrap_or(0), "last_seq", self.path)? + 1)
    }

    /// Stores one message, or answers with the stored one when its `msg_id` is taken.
    fn post(&mut self, log_id: &LogId, msg: NewMessage) -> Result<Response, StoreError> {
        let path = self.path;
        let seq = self.next_seq(&msg.conv_id)?;
        let index = self.last_index + 1;
        let clock_json = match &msg.vector_clock {
            Some(vc) => Some(
                serde_json::to_string(vc).map_err(|source| StoreError::Serde {
                    what: "vector_clock",
                    path: path.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        let mut id_buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let msg_id: &str = msg.msg_id.hyphenated().encode_lower(&mut id_buf);
        let inserted = self
            .insert
            .execute(rusqlite::params![
                to_sql(index, "message index", path)?,
                msg.conv_id,
                to_sql(seq, "seq", path)?,
                to_sql(log_id.leader_id.term, "term", path)?,
                msg_id,
                msg.sender,
                msg.payload,
                clock_json,
                msg.committed_at_ms,
            ])
            .at(path)?;
        if inserted == 0 {
            // De-duplication: a msg_id is stored at most once, whatever the retries.
            let existing = record_by_msg_id(self.tx, path, msg.msg_id)?.ok_or_else(|| {
                StoreError::invalid(
                    path,
                    format!("msg_id {} neither new nor stored", msg.msg_id),
                )
            })?;
            return Ok(if msg.same_content(&existing) {
                Response::Duplicate(existing)
            } else {
                Response::Conflict(existing)
            });
        }
        self.last_index = index;
        match self.convs.get_mut(&msg.conv_id) {
            Some(c) => *c = (seq, index),
            None => {
                self.convs.insert(msg.conv_id.clone(), (seq, index));
            }
        }
        Ok(Response::Stored(Record {
            index,
            seq,
            term: log_id.leader_id.term,
            conv_id: msg.conv_id,
            msg_id: msg.msg_id,
            sender: msg.sender,
            payload: msg.payload,
            vector_clock: msg.vector_clock,
            committed_at: format_millis(msg.committed_at_ms),
        }))
    }

    /// Writes the counters of every conversation stored to; returns the global index of the
    /// last stored message.
    fn finish(self) -> Result<u64, StoreError> {
        let path = self.path;
        let mut upsert = self
            .tx
            .prepare_cached(
                "INSERT INTO conversations (conv_id, last_seq, last_index) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conv_id) DO UPDATE
                 SET last_seq = excluded.last_seq, last_index = excluded.last_index",
            )
            .at(path)?;
        for (conv_id, (seq, index)) in &self.convs {
            upsert
                .execute((
                    conv_id,
                    to_sql(*seq, "seq", path)?,
                    to_sql(*index, "message index", path)?,
                ))
                .at(path)?;
        }
        Ok(self.last_index)
    }
}

impl SmShared {
    fn apply_blocking(&self, entries: Vec<Entry>) -> Result<Vec<Response>, StoreError> {
        let path = self.path.as_path();
        let mut conn = lock(&self.conn, path)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut last_applied = read_last_applied(&tx, path)?;
        let mut responses = Vec::with_capacity(entries.len());
        let mut added_bytes = Vec::new();
        let mut applier = Applier::new(&tx, path)?;
        for entry in entries {
            // Applying an entry twice would be an openraft bug; refuse instead of guessing.
            if let Some(prev) = last_applied {
                if entry.log_id.index <= prev.index {
                    return Err(StoreError::invalid(
                        path,
                        format!("apply of {} after last_applied {}", entry.log_id, prev),
                    ));
                }
            }
            let response = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m);
                    put_sm_meta(&tx, path, KEY_MEMBERSHIP, &stored)?;
                    Response::None
                }
                EntryPayload::Normal(Request::Post(msg)) => applier.post(&entry.log_id, msg)?,
                EntryPayload::Normal(Request::Batch(msgs)) => {
                    let mut out = Vec::with_capacity(msgs.len());
                    for msg in msgs {
                        out.push(applier.post(&entry.log_id, msg)?);
                    }
                    Response::Batch(out)
                }
            };
            newly_stored_bytes(&response, &mut added_bytes);
            responses.push(response);
            last_applied = Some(entry.log_id);
        }
        let last_index = applier.finish()?;
        if let Some(last) = last_applied {
            // Durability: last_applied is written in the same transaction as the rows, so after
            // a crash the database holds both or neither; no entry is lost or applied twice.
            put_sm_meta(&tx, path, KEY_LAST_APPLIED, &last)?;
        }
        tx.commit().at(path)?;
        self.checkpointer.committed();
        // Only after COMMIT: subscribers may send these records on at once, and readers that
        // wake on the applied index see the rows. Still under the connection's lock, so the
        // tails get the records in apply order and never after a later snapshot install.
        let mut stored = Vec::new();
        for r in &responses {
            newly_stored(r, &mut stored);
        }
        self.tail.publish(stored);
        if let Some(last) = last_applied {
            self.applied.send_replace(last.index);
        }
        self.growth.set_stored(last_index);
        crate::metrics::add_conv_bytes(added_bytes);
        Ok(responses)
    }

    /// Replaces the whole state with a validated snapshot file, then makes it the current
    /// snapshot.
    fn install_blocking(&self, file: TempFile, meta: &SnapshotMeta) -> Result<(), StoreError> {
        snapshot::validate(file.path(), meta)?;
        let last;
        {
            let mut conn = lock(&self.conn, &self.path)?;
            replace_state(&mut conn, &self.path, file.path(), meta)?;
            // A whole state in one commit: the WAL is long.
            self.checkpointer.committed();
            // The windows describe the replaced state: subscribers re-read from the new one.
            self.tail.reset();
            crate::metrics::set_conv_bytes(conv_payload_bytes(&conn, &self.path)?);
            last = last_message_index(&conn, &self.path)?;
            self.growth.set_in_snapshot(last);
            self.growth.set_stored(last);
        }
        // The state machine now is the snapshot: tell readers before anything else can fail.
        self.applied
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        self.snapshots.publish(file, meta, last)?;
        Ok(())
    }
}

/// Swaps the content of `messages.db` for that of the snapshot at `snap_path`.
///
/// SQLite refuses ATTACH and DETACH inside a transaction, so the file is attached first and the
/// whole replacement (rows, `last_applied`, membership) is ONE transaction: readers and a crash
/// see the old state or the new one, never a mix.
fn replace_state(
    conn: &mut Connection,
    path: &Path,
    snap_path: &Path,
    meta: &SnapshotMeta,
) -> Result<(), StoreError> {
    conn.execute("ATTACH DATABASE ?1 AS snap", [sql_path(snap_path)?])
        .at(path)?;
    let copied = copy_from_attached(conn, path, meta);
    // Detach even when the copy failed (its transaction is rolled back by then).
    let detached = conn.execute_batch("DETACH DATABASE snap").at(path);
    copied.and(detached)
}

fn copy_from_attached(
    conn: &mut Connection,
    path: &Path,
    meta: &SnapshotMeta,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    // Openraft installs only snapshots past the committed index; going back would silently
    // drop applied messages, so a violation is an error, checked inside the transaction.
    let (current, _) = read_applied_state(&tx, path)?;
    if meta.last_log_id < current {
        return Err(StoreError::invalid(
            path,
            format!("snapshot {meta} is behind last_applied {current:?}"),
        ));
    }
    tx.execute_batch(
        "DELETE FROM messages;
         DELETE FROM conversations;
         DELETE FROM sm_meta;
         INSERT INTO messages
             (idx, conv_id, seq, term, msg_id, sender, payload, vector_clock, committed_at_ms)
         SELECT idx, conv_id, seq, term, msg_id, sender, payload, vector_clock, committed_at_ms
         FROM snap.messages;
         INSERT INTO conversations (conv_id, last_seq, last_index)
         SELECT conv_id, last_seq, last_index FROM snap.conversations;",
    )
    .at(path)?;
    if let Some(last) = &meta.last_log_id {
        put_sm_meta(&tx, path, KEY_LAST_APPLIED, last)?;
    }
    put_sm_meta(&tx, path, KEY_MEMBERSHIP, &meta.last_membership)?;
    // One COMMIT switches rows and last_applied together; it is put on disk before openraft
    // purges the log behind the snapshot.
    tx.commit().at(path)?;
    sync_database(path)
}

/// Copies a snapshot handed over as an arbitrary open file into a new file in `snapshots/`.
async fn copy_to_temp(src: &mut File, snapshots: &SnapshotDir) -> Result<TempFile, StoreError> {
    let temp = TempFile::new(snapshots.temp_path("recv"));
    src.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(StoreError::io("rewind received snapshot", temp.path()))?;
    let mut dst = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp.path())
        .await
        .map_err(StoreError::io("create", temp.path()))?;
    tokio::io::copy(src, &mut dst)
        .await
        .map_err(StoreError::io("copy received snapshot to", temp.path()))?;
    dst.flush()
        .await
        .map_err(StoreError::io("flush", temp.path()))?;
    dst.sync_all()
        .await
        .map_err(StoreError::io("fsync", temp.path()))?;
    Ok(temp)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.inner.clone();
        blocking(move || {
            let conn = lock(&inner.conn, &inner.path)?;
            read_applied_state(&conn, &inner.path)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Read))
    }

    /// Applies the batch in ONE transaction; see [`SmShared::apply_blocking`].
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.inner.clone();
        let last = entries[entries.len() - 1].log_id.index;
        blocking(move || {
            // A leader can see an entry committed by its followers before its own flush.
            inner.log.wait_on_disk(last)?;
            inner.apply_blocking(entries)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Write))
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder::new(
            self.inner.path.clone(),
            self.inner.snapshots.clone(),
            self.inner.growth.clone(),
        )
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let inner = self.inner.clone();
        let file = blocking(move || {
            let path = inner.snapshots.temp_path("recv");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(StoreError::io("create", &path))?;
            let md = file.metadata().map_err(StoreError::io("stat", &path))?;
            lock(&inner.receiving, &inner.path)?.insert((md.dev(), md.ino()), path);
            Ok(file)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        Ok(Box::new(SnapshotData::from(File::from_std(file))))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let fail = |e: StoreError| e.into_storage(subject.clone(), ErrorVerb::Write);
        let snapshots = self.inner.snapshots.clone();
        snapshots.check_id(&meta.snapshot_id).map_err(fail)?;
        // A recorded snapshot handed over whole (a test, say) is written out first.
        let mut snapshot = snapshot.into_file().await.map_err(fail)?;

        // Durability: the received bytes are on disk before the state machine depends on them.
        let here = snapshots.path().to_path_buf();
        snapshot
            .flush()
            .await
            .map_err(|e| fail(StoreError::io("flush received snapshot in", &here)(e)))?;
        snapshot
            .sync_all()
            .await
            .map_err(|e| fail(StoreError::io("fsync received snapshot in", &here)(e)))?;
        let md = snapshot
            .metadata()
            .await
            .map_err(|e| fail(StoreError::io("stat received snapshot in", &here)(e)))?;
        let received = lock(&self.inner.receiving, &self.inner.path)
            .map_err(fail)?
            .remove(&(md.dev(), md.ino()));
        let file = match received {
            // The file we handed out: use it in place.
            Some(path) => TempFile::new(path),
            // Any other file (a test handing over a built snapshot, say): copy it first, so that
            // the installed snapshot is ours to rename and keep.
            None => copy_to_temp(&mut snapshot, &snapshots)
                .await
                .map_err(fail)?,
        };
        drop(snapshot);

        let inner = self.inner.clone();
        let meta_owned = meta.clone();
        let started = std::time::Instant::now();
        blocking(move || inner.install_blocking(file, &meta_owned))
            .await
            .map_err(fail)?;
        crate::metrics::SNAPSHOT_INSTALL.observe(started.elapsed());
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.inner.clone();
        let current = blocking(move || inner.snapshots.current(&inner.path))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}
