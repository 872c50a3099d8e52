//! SQLite storage: the Raft log, the chat state machine and its snapshots.
//!
//! # Layout
//! - [`log`]: [`LogStore`], the Raft log, vote, committed and last-purged pointers in
//!   `raft-log.db`.
//! - [`sm`]: [`StateMachineStore`], the only writer of `messages.db` (messages, conversations,
//!   last applied log id and membership).
//! - [`snapshot`]: [`SnapshotBuilder`] and the `snapshots/` directory: snapshots recorded
//!   when taken and copied from `messages.db` (`VACUUM INTO`, cut back to the snapshot's point)
//!   when first sent, and the install of a received one.
//! - [`reader`]: [`MessageReader`], a small pool of read-only connections for the HTTP API,
//!   and the live tails ([`crate::fanout::Tail`]) the state machine fills after each apply.
//!
//! # Durability rules, and where they are enforced
//! - Every live connection runs `journal_mode=WAL` and `synchronous=FULL` ([`open_live`]): a
//!   `COMMIT` returns only after the WAL is fsynced, so "committed" means "on disk". The one
//!   exception is the state machine's writer (below).
//! - The state machine need not be on disk at each apply: every applied entry is already
//!   fsynced in the Raft log of a majority, and at start openraft re-applies the committed
//!   entries after the stored `last_applied`. So `messages.db` commits with
//!   `synchronous=NORMAL` (one fsync fewer on every write's path; a crash of the process loses
//!   nothing, a power cut may roll it back to an earlier COMMIT, never a torn one). What must
//!   hold is that no entry it lacks is purged from the log: the log is purged only behind a
//!   snapshot, and a snapshot is recorded only after [`sync_database`] has put the state
//!   machine on disk up to it; an installed snapshot is synced the same way.
//! - `append` reports the flush to openraft only after its transaction committed
//!   ([`LogStore`]'s `append`); `save_vote` returns only after its commit.
//! - `apply` waits until every entry it applies is in this node's log on disk
//!   ([`log::LogDurability`]): a leader replicates while it writes its own log, and its
//!   followers can commit an entry first. So the log always holds what the state machine has
//!   applied, and a client is answered only once the leader, too, has its message on disk.
//! - `apply` writes the rows and `last_applied` in one transaction, so a crash can never leave a
//!   message applied without `last_applied` covering it, nor the reverse: after a restart no
//!   entry is applied twice and none is skipped ([`StateMachineStore`]'s `apply`).
//! - A snapshot's files are fsynced, renamed into place and the directory fsynced before older
//!   snapshots are deleted ([`snapshot`]).
//!
//! Both live databases copy their WAL back into the database file on a thread of their own
//! ([`checkpoint`]), not on the commit that crosses SQLite's 1,000-page mark.
//!
//! All SQLite and file work runs on tokio's blocking pool ([`blocking`]); connections live
//! behind `std::sync::Mutex` so that the blocking closures can own an `Arc` of them.

mod checkpoint;
mod growth;
mod log;
mod reader;
mod sm;
mod snapshot;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

pub use self::growth::{snapshot_due, MessageGrowth};
pub use self::log::LogStore;
pub use self::reader::{ConversationInfo, EventPage, MessageReader};
pub(crate) use self::sm::set_state_membership;
pub use self::sm::StateMachineStore;
pub(crate) use self::snapshot::{check_state_file, copy_state, TempFile as TempPath};
pub use self::snapshot::{SnapshotBuilder, SnapshotData};
use crate::types::{NodeId, StorageError};

/// File name of the Raft log database inside `data_dir`.
pub const LOG_DB: &str = "raft-log.db";
/// File name of the state machine database inside `data_dir`.
pub const MESSAGES_DB: &str = "messages.db";
/// Directory holding the current snapshot inside `data_dir`.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// How many read-only connections [`MessageReader`] keeps.
const READ_POOL_SIZE: usize = 4;

/// How long a statement waits for a lock held by another connection before failing.
///
/// In WAL mode readers never block the writer; only checkpoints and the rare second writer
/// (none by design) can make a connection wait.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRAGMA user_version` of the schemas this build reads and writes.
const SCHEMA_VERSION: i64 = 1;

/// The three storage handles of one node, all opened on the same `data_dir`.
pub struct Stores {
    /// Raft log storage, handed to `openraft::Raft::new`.
    pub log: LogStore,
    /// State machine storage, handed to `openraft::Raft::new`.
    pub sm: StateMachineStore,
    /// Read access to applied messages for the HTTP API.
    pub reader: MessageReader,
}

/// Opens (creating if needed) `data_dir/raft-log.db`, `messages.db` and `snapshots/`.
///
/// Leftover temporary files of an interrupted snapshot build or transfer are removed.
pub async fn open(data_dir: &Path) -> Result<Stores, StoreError> {
    let data_dir = data_dir.to_path_buf();
    blocking(move || {
        std::fs::create_dir_all(&data_dir).map_err(|source| StoreError::Io {
            op: "create data directory",
            path: data_dir.clone(),
            source,
        })?;
        let log = LogStore::open(&data_dir.join(LOG_DB))?;
        let snapshots = snapshot::SnapshotDir::open(&data_dir.join(SNAPSHOT_DIR))?;
        let messages = data_dir.join(MESSAGES_DB);
        let tail = crate::fanout::Tail::new();
        let (sm, applied) =
            StateMachineStore::open(&messages, snapshots, tail.clone(), log.durability())?;
        // The state machine created the schema and switched the file to WAL: only now can the
        // read-only connections open it.
        let reader = MessageReader::open(&messages, applied, tail, READ_POOL_SIZE)?;
        Ok(Stores { log, sm, reader })
    })
    .await
}

/// Everything that can go wrong in the store, with the file it happened on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot encode or decode {what} in {path}: {source}")]
    Serde {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has schema version {found}; this build knows version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: i64 },
    /// Stored data or an input violates an invariant of the store (a bug or a damaged file).
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    /// A previous storage operation panicked while holding this connection.
    #[error("connection to {path} is unusable after a panic in an earlier operation")]
    Poisoned { path: PathBuf },
    /// The blocking task running a storage operation panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn invalid(path: &Path, detail: impl Into<String>) -> Self {
        StoreError::Invalid {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    }

    /// Wraps this error as an openraft storage error about `subject`.
    pub(crate) fn into_storage(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError {
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// Attaches the database path to a rusqlite error.
pub(crate) trait SqlContext<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Runs blocking storage work on tokio's blocking pool, never on an async worker.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Task(e.to_string())),
    }
}

/// Locks a connection mutex, turning poisoning into an error instead of a panic.
pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, path: &Path) -> Result<MutexGuard<'a, T>, StoreError> {
    m.lock().map_err(|_| StoreError::Poisoned {
        path: path.to_path_buf(),
    })
}

/// Whether a live connection may write.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    ReadOnly,
}

/// Opens a connection to a live database (`raft-log.db` or `messages.db`).
///
/// Durability: `journal_mode=WAL` with `synchronous=FULL` makes every `COMMIT` fsync the WAL
/// before it returns. The journal mode is checked, not assumed: a database that cannot be put in
/// WAL mode is an error.
pub(crate) fn open_live(path: &Path, access: Access) -> Result<Connection, StoreError> {
    let flags = match access {
        Access::ReadWrite => {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        }
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    };
    let conn = Connection::open_with_flags(path, flags).at(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    set_journal_mode(&conn, path, "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL").at(path)?;
    Ok(conn)
}

/// Creates the schema of a fresh database, or checks the version of an existing one.
pub(crate) fn ensure_schema(
    conn: &mut Connection,
    path: &Path,
    ddl: &str,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .at(path)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .at(path)?;
    match version {
        0 => {
            tx.execute_batch(ddl).at(path)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .at(path)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(StoreError::SchemaVersion {
                path: path.to_path_buf(),
                found,
            })
        }
    }
    tx.commit().at(path)
}

/// The key/value tables: `meta` in `raft-log.db`, `sm_meta` in `messages.db`.
#[derive(Clone, Copy)]
pub(crate) enum KvTable {
    Log,
    StateMachine,
}

/// The JSON value of `key` in one of the key/value tables, decoded; `None` when unset.
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    path: &Path,
    table: KvTable,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let sql = match table {
        KvTable::Log => "SELECT value FROM meta WHERE key = ?1",
        KvTable::StateMachine => "SELECT value FROM sm_meta WHERE key = ?1",
    };
    let raw: Option<String> = conn
        .prepare_cached(sql)
        .at(path)?
        .query_row([key], |r| r.get(0))
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

/// Sets `key` to `value`, as JSON, in one of the key/value tables.
pub(crate) fn put_json<T: serde::Serialize>(
    conn: &Connection,
    path: &Path,
    table: KvTable,
    key: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(value).map_err(|source| StoreError::Serde {
        what: key,
        path: path.to_path_buf(),
        source,
    })?;
    let sql = match table {
        KvTable::Log => {
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        }
        KvTable::StateMachine => {
            "INSERT INTO sm_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        }
    };
    conn.prepare_cached(sql)
        .at(path)?
        .execute((key, json))
        .at(path)?;
    Ok(())
}

/// Converts a log index, term or sequence number to SQLite's signed integer.
pub(crate) fn to_sql(v: u64, what: &str, path: &Path) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::invalid(path, format!("{what} {v} exceeds SQLite's integer range"))
    })
}

/// Converts a stored integer back; a negative value means a damaged row.
pub(crate) fn from_sql(v: i64, what: &str, path: &Path) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::invalid(path, format!("negative {what} {v}")))
}

/// Fsyncs a directory so that renames and creations inside it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", dir))
}

/// Puts every COMMIT made so far to a WAL-mode database on disk: fsyncs its WAL and the
/// database file (either may hold committed pages; SQLite syncs the WAL before it checkpoints).
pub(crate) fn sync_database(db: &Path) -> Result<(), StoreError> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    for path in [wal.as_path(), db] {
        match std::fs::File::open(path) {
            Ok(f) => f.sync_all().map_err(StoreError::io("fsync", path))?,
            // No WAL file: everything is in the database file.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path == wal => {}
            Err(e) => return Err(StoreError::io("open for fsync", path)(e)),
        }
    }
    Ok(())
}

/// Switches `conn` to journal mode `mode`, and fails unless SQLite says it did.
pub(crate) fn set_journal_mode(
    conn: &Connection,
    path: &Path,
    mode: &str,
) -> Result<(), StoreError> {
    let now: String = conn
        .pragma_update_and_check(None, "journal_mode", mode, |row| row.get(0))
        .at(path)?;
    if now.eq_ignore_ascii_case(mode) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            path,
            format!("journal_mode is {now}, expected {}", mode.to_lowercase()),
        ))
    }
}

/// A path as SQLite wants it in `VACUUM INTO` and `ATTACH`.
pub(crate) fn sql_path(path: &Path) -> Result<&str, StoreError> {
    path.to_str()
        .ok_or_else(|| StoreError::invalid(path, "path is not valid UTF-8"))
}
