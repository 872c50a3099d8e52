//! `chatraftd backup` and `chatraftd restore`: a consistent copy of the message store, and a
//! new one-node cluster seeded from it.
//!
//! # Backup
//! The backup is taken on the node's host from `data_dir/messages.db` with `VACUUM INTO`
//! through a read-only connection. `VACUUM INTO` reads inside one read transaction, so the copy
//! is the state machine as of one COMMIT: every message applied up to some log index, with that
//! index (`last_applied`) and the membership stored beside them. It runs while the daemon runs
//! (WAL readers never block the writer, nor the reverse) and while it is stopped. The file is
//! a standalone SQLite database, the same format as a Raft snapshot; it is written to a
//! temporary name, fsynced and renamed, so `--out` never holds half a backup.
//!
//! # Restore
//! A restore seeds the FRESH data dir of a node that will be the only member of a new cluster:
//! 1. the backup is checked (`quick_check`, schema version, tables) and its `last_applied` L
//!    read; its membership is replaced by a one-voter membership of this node (its advertised
//!    addresses from the config);
//! 2. it is installed as the state machine and the current snapshot, through the state
//!    machine's own `install_snapshot`;
//! 3. the Raft log is marked purged up to L, committed up to L, and the vote set to L's term,
//!    so the node's first election is in a term above every entry it holds.
//!
//! On start, openraft sees last_applied = L, a snapshot at L and a one-voter membership: the
//! node elects itself, and keeps the backed-up seq of each conversation. Nodes that join later
//! receive the snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{Membership, Vote};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use crate::config::Config;
use crate::server::{self, ServerError};
use crate::store::{self, SqlContext, StoreError, LOG_DB, MESSAGES_DB};
use crate::types::{LogId, Node, SnapshotMeta, StoredMembership};

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("{0}")]
    Refused(String),
    #[error("storage: {0}")]
    Raft(String),
}

/// What a backup holds, as `backup` and `restore` report it.
#[derive(Debug, Serialize)]
pub struct BackupInfo {
    pub file: PathBuf,
    /// Log index of the last entry the backup covers.
    pub last_applied_index: u64,
    pub last_applied_term: u64,
    pub messages: u64,
    pub conversations: u64,
    pub bytes: u64,
}

/// Writes a consistent copy of `data_dir/messages.db` to `out`.
pub fn backup(config: &Config, out: &Path) -> Result<BackupInfo, BackupError> {
    let source = config.data_dir.join(MESSAGES_DB);
    if !source.is_file() {
        return Err(BackupError::Refused(format!(
            "{} does not exist: is data_dir right, and has the node ever run?",
            source.display()
        )));
    }
    if out.exists() {
        return Err(BackupError::Refused(format!(
            "{} already exists; choose a new file",
            out.display()
        )));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let tmp =
        store::TempPath::new(dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple())));
    store::copy_state(&source, tmp.path())?;
    let info = inspect(tmp.path(), out)?;
    std::fs::rename(tmp.path(), out).map_err(StoreError::io("move the backup to", out))?;
    tmp.keep();
    store::fsync_dir(&dir)?;
    Ok(info)
}

/// Checks a backup file and reads what it holds.
pub fn inspect(path: &Path, report_as: &Path) -> Result<BackupInfo, BackupError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .at(path)?;
    let (last_applied, _) = store::check_state_file(&conn, path)?;
    let last_applied = last_applied.ok_or_else(|| {
        BackupError::Refused(format!(
            "{} holds no applied entry: there is nothing to restore",
            path.display()
        ))
    })?;
    let (messages, conversations): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM conversations)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .at(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(StoreError::io("stat", path))?
        .len();
    Ok(BackupInfo {
        file: report_as.to_path_buf(),
        last_applied_index: last_applied.index,
        last_applied_term: last_applied.leader_id.term,
        messages: messages.max(0) as u64,
        conversations: conversations.max(0) as u64,
        bytes,
    })
}

/// Seeds the fresh data dir of `config` from `backup_file` (see the module docs).
pub async fn restore(config: &Config, backup_file: &Path) -> Result<BackupInfo, BackupError> {
    let _lock = server::lock_data_dir(&config.data_dir)?;
    for name in [LOG_DB, MESSAGES_DB] {
        let p = config.data_dir.join(name);
        if p.exists() {
            return Err(BackupError::Refused(format!(
                "data dir {} already holds {name}: restore needs a fresh data dir",
                config.data_dir.display()
            )));
        }
    }
    // A snapshot left from another state would outrank the restored one, and be cut back from
    // the restored messages when it is sent.
    let snapshots = config.data_dir.join(store::SNAPSHOT_DIR);
    let leftover = match std::fs::read_dir(&snapshots) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(StoreError::io("list", &snapshots)(e).into()),
    };
    if leftover {
        return Err(BackupError::Refused(format!(
            "data dir {} already holds {}/ with files in it: restore needs a fresh data dir",
            config.data_dir.display(),
            store::SNAPSHOT_DIR
        )));
    }
    let info = inspect(backup_file, backup_file)?;

    // A private copy whose membership is this node alone; the backup itself is not touched.
    let seed = store::TempPath::new(
        config
            .data_dir
            .join(format!("restore-{}.tmp", uuid::Uuid::new_v4().simple())),
    );
    std::fs::copy(backup_file, seed.path())
        .map_err(StoreError::io("copy the backup to", seed.path()))?;
    let me = Node {
        raft_addr: config.raft_advertise(),
        api_addr: config.api_advertise(),
    };
    let last_applied = {
        let conn = Connection::open(seed.path()).at(seed.path())?;
        let (last_applied, _) = store::check_state_file(&conn, seed.path())?;
        let last_applied: LogId = last_applied.ok_or_else(|| {
            BackupError::Refused(format!("{} holds no applied entry", backup_file.display()))
        })?;
        let membership = StoredMembership::new(
            Some(last_applied),
            Membership::new(
                vec![BTreeSet::from([config.node_id])],
                BTreeMap::from([(config.node_id, me)]),
            ),
        );
        store::set_state_membership(&conn, seed.path(), &membership)?;
        last_applied
    };
    let (_, membership) = {
        let conn = Connection::open(seed.path()).at(seed.path())?;
        store::check_state_file(&conn, seed.path())?
    };

    let stores = store::open(&config.data_dir).await?;
    let mut sm = stores.sm;
    let mut log = stores.log;
    let meta = SnapshotMeta {
        last_log_id: Some(last_applied),
        last_membership: membership,
        snapshot_id: format!(
            "{}-{}-{}",
            last_applied.leader_id.term,
            last_applied.index,
            chrono::Utc::now().timestamp_millis()
        ),
    };
    let file = tokio::fs::File::open(seed.path())
        .await
        .map_err(StoreError::io("open", seed.path()))?;
    let raft_err = |e: crate::types::StorageError| BackupError::Raft(e.to_string());
    sm.install_snapshot(&meta, Box::new(store::SnapshotData::from(file)))
        .await
        .map_err(raft_err)?;
    // The log: nothing kept, everything up to L purged and committed, and a vote in L's term,
    // so the first election is in a later term than any entry the node holds.
    log.purge(last_applied).await.map_err(raft_err)?;
    log.save_committed(Some(last_applied))
        .await
        .map_err(raft_err)?;
    log.save_vote(&Vote::new(last_applied.leader_id.term, config.node_id))
        .await
        .map_err(raft_err)?;
    drop(seed);
    Ok(info)
}
