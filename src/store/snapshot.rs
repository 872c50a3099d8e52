//! Snapshots: consistent SQLite copies of `messages.db` in `snapshots/`.
//!
//! A snapshot is two files: `<snapshot_id>.db`, a standalone SQLite database (rollback journal
//! mode, so the single file is the whole snapshot), and `<snapshot_id>.meta.json`, its
//! [`SnapshotMeta`]. The meta file is written last: a `.meta.json` exists only for a complete,
//! fsynced `.db`. Work in progress lives in `*.tmp` files, removed when the store opens.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftSnapshotBuilder;
use openraft::{ErrorSubject, ErrorVerb, Snapshot};
use rusqlite::{Connection, OpenFlags};

use super::growth::MessageGrowth;
use super::reader::RECORD_COLUMNS;
use super::sm::{last_message_index, read_applied_state};
use super::{
    blocking, fsync_dir, lock, open_live, sql_path, sync_database, Access, SqlContext, StoreError,
    SCHEMA_VERSION,
};
use crate::types::{LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const DB_SUFFIX: &str = ".db";
const META_SUFFIX: &str = ".meta.json";
const TMP_SUFFIX: &str = ".tmp";

/// The `snapshots/` directory.
pub(crate) struct SnapshotDir {
    path: PathBuf,
    /// Serializes publishing, clean-up and lookup, so that a lookup never opens a file that a
    /// concurrent publish is deleting, and a slow build never deletes a newer install.
    lock: Mutex<()>,
}

impl SnapshotDir {
    /// Creates the directory if needed and removes leftovers of interrupted builds and transfers.
    pub(crate) fn open(path: &Path) -> Result<Arc<SnapshotDir>, StoreError> {
        fs::create_dir_all(path).map_err(StoreError::io("create snapshot directory", path))?;
        for entry in fs::read_dir(path).map_err(StoreError::io("list", path))? {
            let entry = entry.map_err(StoreError::io("list", path))?;
            if entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                let p = entry.path();
                fs::remove_file(&p).map_err(StoreError::io("remove stale temporary file", &p))?;
            }
        }
        Ok(Arc::new(SnapshotDir {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh temporary file name; `kind` says what it is for ("build", "recv", "meta").
    pub(crate) fn temp_path(&self, kind: &str) -> PathBuf {
        self.path.join(format!(
            "{kind}-{}{TMP_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Snapshot ids become file names: only `[A-Za-z0-9._-]`, not starting with a dot. Ours are
    /// `<term>-<index>-<millis>`; anything else from a peer is refused, never used as a path.
    pub(crate) fn check_id(&self, id: &str) -> Result<(), StoreError> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(())
        } else {
            Err(StoreError::invalid(
                &self.path,
                format!("unusable snapshot id {id:?}"),
            ))
        }
    }

    fn db_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}{DB_SUFFIX}"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}{META_SUFFIX}"))
    }

    /// Makes a complete, fsynced snapshot file the current snapshot and deletes older ones.
    /// Returns the snapshot opened for reading at offset 0.
    ///
    /// Durability order: rename the db into place and fsync the directory, then write the meta
    /// (temp file, fsync, rename) and fsync the directory again. Only then are older snapshots
    /// deleted, so a crash at any point leaves at least one complete snapshot.
    pub(crate) fn publish(
        &self,
        db: TempFile,
        meta: &SnapshotMeta,
    ) -> Result<fs::File, StoreError> {
        self.check_id(&meta.snapshot_id)?;
        let _guard = lock(&self.lock, &self.path)?;
        let db_path = self.db_path(&meta.snapshot_id);
        fs::rename(db.path(), &db_path).map_err(StoreError::io("move snapshot into", &db_path))?;
        db.keep();
        fsync_dir(&self.path)?;

        let meta_tmp = TempFile::new(self.temp_path("meta"));
        let json = serde_json::to_vec_pretty(meta).map_err(|source| StoreError::Serde {
            what: "snapshot meta",
            path: meta_tmp.path().to_path_buf(),
            source,
        })?;
        let mut f =
            fs::File::create(meta_tmp.path()).map_err(StoreError::io("create", meta_tmp.path()))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(StoreError::io("write", meta_tmp.path()))?;
        drop(f);
        let meta_path = self.meta_path(&meta.snapshot_id);
        fs::rename(meta_tmp.path(), &meta_path)
            .map_err(StoreError::io("move snapshot meta into", &meta_path))?;
        meta_tmp.keep();
        fsync_dir(&self.path)?;

        // Open before the clean-up: even if a newer snapshot wins, the handle stays readable.
        let file = fs::File::open(&db_path).map_err(StoreError::io("open", &db_path))?;
        self.remove_all_but_newest(meta)?;
        tracing::info!(snapshot = %meta, "snapshot is current");
        Ok(file)
    }

    /// Every snapshot with a meta file and its db present.
    fn list(&self) -> Result<Vec<SnapshotMeta>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(StoreError::io("list", &self.path))? {
            let entry = entry.map_err(StoreError::io("list", &self.path))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) else {
                continue;
            };
            if !self.db_path(id).exists() {
                continue;
            }
            let p = entry.path();
            let bytes = fs::read(&p).map_err(StoreError::io("read", &p))?;
            let meta: SnapshotMeta =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Serde {
                    what: "snapshot meta",
                    path: p.clone(),
                    source,
                })?;
            out.push(meta);
        }
        Ok(out)
    }

    /// Deletes every snapshot but the newest (by last log id; `published` wins ties), and
    /// orphaned db files. Temporary files belong to work in progress and are left alone.
    fn remove_all_but_newest(&self, published: &SnapshotMeta) -> Result<(), StoreError> {
        let mut keep = published.clone();
        for m in self.list()? {
            if m.last_log_id > keep.last_log_id {
                keep = m;
            }
        }
        for entry in fs::read_dir(&self.path).map_err(StoreError::io("list", &self.path))? {
            let entry = entry.map_err(StoreError::io("list", &self.path))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let id = name
                .strip_suffix(META_SUFFIX)
                .or_else(|| name.strip_suffix(DB_SUFFIX));
            if let Some(id) = id {
                if id != keep.snapshot_id {
                    let p = entry.path();
                    fs::remove_file(&p).map_err(StoreError::io("remove old snapshot file", &p))?;
                }
            }
        }
        Ok(())
    }

    /// The newest complete snapshot, opened for reading at offset 0.
    pub(crate) fn current(&self) -> Result<Option<(SnapshotMeta, fs::File)>, StoreError> {
        self.with_newest(|newest| match newest {
            None => Ok(None),
            Some((meta, p)) => {
                let file = fs::File::open(&p).map_err(StoreError::io("open", &p))?;
                Ok(Some((meta, file)))
            }
        })
    }

    /// The global index of the last message in the newest complete snapshot (0 without one).
    pub(crate) fn current_last_message(&self) -> Result<u64, StoreError> {
        self.with_newest(|newest| match newest {
            None => Ok(0),
            Some((_, p)) => last_message_index(&open_snapshot_file(&p, false)?, &p),
        })
    }

    /// Runs `f` on the newest complete snapshot's meta and file, under the directory's lock,
    /// so that a concurrent publish cannot delete the file meanwhile.
    fn with_newest<T>(
        &self,
        f: impl FnOnce(Option<(SnapshotMeta, PathBuf)>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _guard = lock(&self.lock, &self.path)?;
        let newest = self
            .list()?
            .into_iter()
            .max_by(|a, b| a.last_log_id.cmp(&b.last_log_id));
        f(newest.map(|meta| {
            let p = self.db_path(&meta.snapshot_id);
            (meta, p)
        }))
    }
}

/// A file that is deleted when dropped, unless [`TempFile::keep`] was called.
pub(crate) struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    pub(crate) fn new(path: PathBuf) -> TempFile {
        TempFile { path, armed: true }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file was moved or is to stay: do not delete it.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Best effort on an error path; what is left is removed when the store next opens.
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary file");
            }
        }
    }
}

/// Opens a snapshot file (not a live database: no WAL, no creation).
fn open_snapshot_file(path: &Path, writable: bool) -> Result<Connection, StoreError> {
    let flags = if writable {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    Connection::open_with_flags(path, flags).at(path)
}

/// Checks that a received file is an intact state machine database matching `meta`.
pub(crate) fn validate(path: &Path, meta: &SnapshotMeta) -> Result<(), StoreError> {
    let conn = open_snapshot_file(path, false)?;
    let (last_applied, membership) = check_state_file(&conn, path)?;
    if last_applied != meta.last_log_id || membership != meta.last_membership {
        return Err(StoreError::invalid(
            path,
            format!(
                "snapshot content (last_applied {last_applied:?}, membership {membership}) does not match its meta {meta}"
            ),
        ));
    }
    Ok(())
}

/// Checks that a standalone copy of the state machine (a snapshot or a backup) is intact and
/// of this build's schema; returns its `last_applied` and membership.
pub(crate) fn check_state_file(
    conn: &Connection,
    path: &Path,
) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .at(path)?;
    if check != "ok" {
        return Err(StoreError::invalid(
            path,
            format!("the database fails quick_check: {check}"),
        ));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .at(path)?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::SchemaVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    // Preparing a statement fails unless every table and column exists.
    for sql in [
        format!("SELECT {RECORD_COLUMNS} FROM messages LIMIT 0"),
        "SELECT conv_id, last_seq, last_index FROM conversations LIMIT 0".to_owned(),
        "SELECT key, value FROM sm_meta LIMIT 0".to_owned(),
    ] {
        conn.prepare(&sql).at(path)?;
    }
    read_applied_state(conn, path)
}

/// Writes a consistent, self-contained copy of the live state machine database `source` to
/// `dst` (which must not exist): `VACUUM INTO` inside one read transaction, switched to a
/// rollback journal so the single file is the whole copy, and fsynced.
pub(crate) fn copy_state(source: &Path, dst: &Path) -> Result<(), StoreError> {
    {
        let conn = open_live(source, Access::ReadOnly)?;
        // VACUUM INTO writes the copy with this connection's `synchronous`: with FULL it
        // fsyncs the whole copy at once, and one flush of hundreds of MiB held every commit's
        // fsync of the live databases up behind it for tens of milliseconds. The copy is put
        // on disk below instead, a step at a time.
        conn.pragma_update(None, "synchronous", "OFF").at(source)?;
        conn.execute("VACUUM INTO ?1", [sql_path(dst)?])
            .at(source)?;
    }
    {
        let conn = open_snapshot_file(dst, true)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .at(dst)?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(StoreError::invalid(
                dst,
                format!("copy journal_mode is {mode}, expected delete"),
            ));
        }
    }
    let file = fs::File::open(dst).map_err(StoreError::io("open", dst))?;
    if let Err(e) = write_out_in_steps(&file) {
        // A write error must fail the copy here: the kernel reports it to this descriptor
        // once, and the fsync below would then succeed. A file system or a syscall filter
        // that does not have the call only loses the pacing: the fsync writes everything.
        let unsupported = [
            nix::libc::EINVAL,
            nix::libc::ENOSYS,
            nix::libc::ESPIPE,
            nix::libc::EPERM,
            nix::libc::EOPNOTSUPP,
        ];
        if !e.raw_os_error().is_some_and(|c| unsupported.contains(&c)) {
            return Err(StoreError::io("write out", dst)(e));
        }
        tracing::debug!(error = %e, path = %dst.display(), "cannot write the copy out in steps");
    }
    // Durability: the snapshot is published only after this.
    file.sync_all().map_err(StoreError::io("fsync", dst))
}

/// How much of a new copy [`write_out_in_steps`] writes at a time.
const WRITE_OUT_STEP: u64 = 4 << 20;

/// Starts the writing of `file`'s dirty pages a step at a time and waits for each step before
/// the next, so that the disk never has more than a step of it queued ahead of the commits'
/// own small fsyncs. Not a durability point: it flushes neither metadata nor the disk's cache.
fn write_out_in_steps(file: &fs::File) -> io::Result<()> {
    let len = file.metadata()?.len();
    let flags = nix::libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | nix::libc::SYNC_FILE_RANGE_WRITE
        | nix::libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let mut offset = 0;
    while offset < len {
        let n = WRITE_OUT_STEP.min(len - offset);
        let (Ok(off), Ok(count)) = (i64::try_from(offset), i64::try_from(n)) else {
            return Err(io::Error::other("file too large"));
        };
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor belongs to
        // `file`, which outlives the call.
        let rc = unsafe { nix::libc::sync_file_range(file.as_raw_fd(), off, count, flags) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        offset += n;
    }
    Ok(())
}

/// Builds snapshots of the state machine; runs concurrently with `apply`.
pub struct SnapshotBuilder {
    /// Path of `messages.db`; the builder opens its own connection to it.
    db_path: PathBuf,
    /// Where the snapshot goes.
    snapshots: Arc<SnapshotDir>,
    /// Told how many messages each built snapshot holds.
    growth: Arc<MessageGrowth>,
}

impl SnapshotBuilder {
    pub(crate) fn new(
        db_path: PathBuf,
        snapshots: Arc<SnapshotDir>,
        growth: Arc<MessageGrowth>,
    ) -> SnapshotBuilder {
        SnapshotBuilder {
            db_path,
            snapshots,
            growth,
        }
    }

    fn build_blocking(&self) -> Result<(SnapshotMeta, fs::File), StoreError> {
        let tmp = TempFile::new(self.snapshots.temp_path("build"));
        // A separate connection: VACUUM INTO reads inside one read transaction, so the copy
        // is the database as of one COMMIT, while the state machine keeps applying.
        copy_state(&self.db_path, tmp.path())?;
        // Durability: the state machine commits without fsync; put what the copy holds on disk
        // in the live database too before the snapshot lets openraft purge the log behind it.
        sync_database(&self.db_path)?;
        // The meta is read from the copy itself, so it describes exactly what was copied.
        let (last_log_id, last_membership, last_message) = {
            let conn = open_snapshot_file(tmp.path(), false)?;
            let (applied, membership) = read_applied_state(&conn, tmp.path())?;
            (applied, membership, last_message_index(&conn, tmp.path())?)
        };
        // Durability: copy_state fsynced the snapshot's bytes before it is published.

        let millis = chrono::Utc::now().timestamp_millis();
        let snapshot_id = match &last_log_id {
            Some(l) => format!("{}-{}-{millis}", l.leader_id.term, l.index),
            None => format!("0-0-{millis}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let file = self.snapshots.publish(tmp, &meta)?;
        self.growth.set_in_snapshot(last_message);
        Ok((meta, file))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let builder = SnapshotBuilder::new(
            self.db_path.clone(),
            self.snapshots.clone(),
            self.growth.clone(),
        );
        let started = std::time::Instant::now();
        let (meta, file) = blocking(move || builder.build_blocking())
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        crate::metrics::SNAPSHOT_BUILD.observe(started.elapsed());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_written_out_in_steps_without_an_error() {
        // Wrong arguments (EINVAL) would go unnoticed in use: `copy_state` takes them for a
        // file system without the call and lets the fsync write the copy in one go. So the
        // syscall's arguments are checked here, over several steps and a partial one.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let len = 2 * WRITE_OUT_STEP as usize + 12_345;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let file = fs::File::open(&path).unwrap();
        write_out_in_steps(&file).unwrap();
        file.sync_all().unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }
}
