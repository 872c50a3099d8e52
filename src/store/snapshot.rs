//! Snapshots of `messages.db` in `snapshots/`: recorded at once, written out when sent.
//!
//! The state machine only ever adds rows: a message stored at global index `i` never changes
//! or goes away. So the state as of a log id is the live database cut back to the messages it
//! held then, and a snapshot need not be copied when openraft asks for one. Building one
//! *records* it: `<snapshot_id>.meta.json` holds its [`SnapshotMeta`] and the global index of
//! its last message, written after `messages.db` is on disk (so the log behind it can go).
//! The copy, `<snapshot_id>.db`, is *written out* only when a node has to be sent the snapshot
//! ([`SnapshotData::into_file`]): a `VACUUM INTO` of the live database, cut back to the
//! recorded point. A received snapshot is written out from the start.
//!
//! A `.db` is a standalone SQLite database (rollback journal mode, so the single file is the
//! whole snapshot), moved into place only once complete and fsynced. A `.meta.json` without a
//! `.db` is a recorded snapshot. Work in progress lives in `*.tmp` files, removed when the
//! store opens.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openraft::storage::RaftSnapshotBuilder;
use openraft::{ErrorSubject, ErrorVerb, Snapshot};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::growth::MessageGrowth;
use super::reader::RECORD_COLUMNS;
use super::sm::{cut_back, last_message_index, read_applied_state};
use super::{
    blocking, fsync_dir, lock, open_live, set_journal_mode, sql_path, sync_database, Access,
    SqlContext, StoreError, SCHEMA_VERSION,
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
    /// Held while a recorded snapshot is written out, so that two nodes needing the same one
    /// at once get one copy.
    writing: Mutex<()>,
}

/// What a `.meta.json` holds. Files of chatraftd 0.1 before recorded snapshots hold the bare
/// [`SnapshotMeta`], and always have their `.db`.
#[derive(Serialize, Deserialize)]
struct MetaFile {
    meta: SnapshotMeta,
    /// Global index of the snapshot's last message.
    last_message: Option<u64>,
}

impl MetaFile {
    fn parse(bytes: &[u8], path: &Path) -> Result<MetaFile, StoreError> {
        serde_json::from_slice(bytes)
            .or_else(|e| match serde_json::from_slice::<SnapshotMeta>(bytes) {
                Ok(meta) => Ok(MetaFile {
                    meta,
                    last_message: None,
                }),
                Err(_) => Err(e),
            })
            .map_err(|source| StoreError::Serde {
                what: "snapshot meta",
                path: path.to_path_buf(),
                source,
            })
    }
}

/// A snapshot in the directory.
struct Listed {
    meta: SnapshotMeta,
    last_message: Option<u64>,
    /// Its `.db` exists; otherwise it is recorded only.
    written: bool,
}

impl SnapshotDir {
    /// Creates the directory if needed and removes leftovers of interrupted builds and transfers.
    pub(crate) fn open(path: &Path) -> Result<Arc<SnapshotDir>, StoreError> {
        fs::create_dir_all(path).map_err(StoreError::io("create snapshot directory", path))?;
        for entry in fs::read_dir(path).map_err(StoreError::io("list", path))? {
            let entry = entry.map_err(StoreError::io("list", path))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // SQLite's own files beside a temporary database go too.
            let base = ["-journal", "-wal", "-shm"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if base.ends_with(TMP_SUFFIX) {
                let p = entry.path();
                fs::remove_file(&p).map_err(StoreError::io("remove stale temporary file", &p))?;
            }
        }
        Ok(Arc::new(SnapshotDir {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
            writing: Mutex::new(()),
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
    ///
    /// Durability order: rename the db into place and fsync the directory, then write the meta
    /// (temp file, fsync, rename) and fsync the directory again. Only then are older snapshots
    /// deleted, so a crash at any point leaves at least one complete snapshot.
    pub(crate) fn publish(
        &self,
        db: TempFile,
        meta: &SnapshotMeta,
        last_message: u64,
    ) -> Result<(), StoreError> {
        self.check_id(&meta.snapshot_id)?;
        let _guard = lock(&self.lock, &self.path)?;
        self.move_into_place(db, &meta.snapshot_id)?;
        self.write_meta(meta, last_message)?;
        self.remove_all_but_newest(meta)?;
        tracing::info!(snapshot = %meta, "snapshot is current");
        Ok(())
    }

    /// Makes a recorded snapshot the current one and deletes older ones. The caller has put
    /// the state machine on disk as of `meta` first: from here on the log behind it may go.
    pub(crate) fn record(&self, meta: &SnapshotMeta, last_message: u64) -> Result<(), StoreError> {
        self.check_id(&meta.snapshot_id)?;
        let _guard = lock(&self.lock, &self.path)?;
        self.write_meta(meta, last_message)?;
        self.remove_all_but_newest(meta)?;
        tracing::info!(snapshot = %meta, last_message, "snapshot recorded");
        Ok(())
    }

    /// Renames a complete, fsynced copy to `<id>.db` and fsyncs the directory.
    fn move_into_place(&self, db: TempFile, id: &str) -> Result<PathBuf, StoreError> {
        let db_path = self.db_path(id);
        fs::rename(db.path(), &db_path).map_err(StoreError::io("move snapshot into", &db_path))?;
        db.keep();
        fsync_dir(&self.path)?;
        Ok(db_path)
    }

    /// Writes `<id>.meta.json` through a temporary file and fsyncs the directory.
    fn write_meta(&self, meta: &SnapshotMeta, last_message: u64) -> Result<(), StoreError> {
        let meta_tmp = TempFile::new(self.temp_path("meta"));
        let contents = MetaFile {
            meta: meta.clone(),
            last_message: Some(last_message),
        };
        let json = serde_json::to_vec_pretty(&contents).map_err(|source| StoreError::Serde {
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
        fsync_dir(&self.path)
    }

    /// The file of a recorded snapshot, written out from the live database `live` if this is
    /// the first time it is needed. Runs alongside `apply`, on a connection of its own.
    fn write_out(
        &self,
        live: &Path,
        meta: &SnapshotMeta,
        last_message: u64,
    ) -> Result<fs::File, StoreError> {
        // The lock guards no data: a write-out that panicked leaves nothing to distrust.
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let db_path = self.db_path(&meta.snapshot_id);
        {
            let _guard = lock(&self.lock, &self.path)?;
            match fs::File::open(&db_path) {
                Ok(file) => return Ok(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("open", &db_path)(e)),
            }
        }
        let started = std::time::Instant::now();
        let tmp = TempFile::new(self.temp_path("build"));
        copy_state_as_of(live, tmp.path(), Some((meta, last_message)))?;
        let _guard = lock(&self.lock, &self.path)?;
        let file = if self.meta_path(&meta.snapshot_id).exists() {
            let db_path = self.move_into_place(tmp, &meta.snapshot_id)?;
            fs::File::open(&db_path).map_err(StoreError::io("open", &db_path))?
        } else {
            // A newer snapshot replaced this one meanwhile. The copy is still right for `meta`:
            // hand it out open; the file itself goes with `tmp`.
            fs::File::open(tmp.path()).map_err(StoreError::io("open", tmp.path()))?
        };
        crate::metrics::SNAPSHOT_WRITE.observe(started.elapsed());
        tracing::info!(snapshot = %meta, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot written out");
        Ok(file)
    }

    /// Every snapshot written out or recorded: a meta file, and its db or its last message.
    fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(StoreError::io("list", &self.path))? {
            let entry = entry.map_err(StoreError::io("list", &self.path))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) else {
                continue;
            };
            let p = entry.path();
            let bytes = fs::read(&p).map_err(StoreError::io("read", &p))?;
            let file = MetaFile::parse(&bytes, &p)?;
            let written = self.db_path(id).exists();
            // A meta file of the old format without its db: the rest of a removed snapshot.
            if written || file.last_message.is_some() {
                out.push(Listed {
                    meta: file.meta,
                    last_message: file.last_message,
                    written,
                });
            }
        }
        Ok(out)
    }

    /// Deletes every snapshot but the newest (by last log id; `published` wins ties), and
    /// orphaned db files. Temporary files belong to work in progress and are left alone.
    fn remove_all_but_newest(&self, published: &SnapshotMeta) -> Result<(), StoreError> {
        let mut keep = published.clone();
        for listed in self.list()? {
            if listed.meta.last_log_id > keep.last_log_id {
                keep = listed.meta;
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

    /// The newest snapshot: its file opened for reading at offset 0, or, if it is recorded
    /// only, the means to write it out from the live database `live`.
    pub(crate) fn current(
        self: &Arc<Self>,
        live: &Path,
    ) -> Result<Option<(SnapshotMeta, SnapshotData)>, StoreError> {
        let _guard = lock(&self.lock, &self.path)?;
        let Some(newest) = self.newest()? else {
            return Ok(None);
        };
        let data = match (newest.written, newest.last_message) {
            (false, Some(last_message)) => SnapshotData(Data::Recorded(Recorded {
                snapshots: self.clone(),
                live: live.to_path_buf(),
                meta: newest.meta.clone(),
                last_message,
            })),
            _ => {
                let p = self.db_path(&newest.meta.snapshot_id);
                let file = fs::File::open(&p).map_err(StoreError::io("open", &p))?;
                SnapshotData::from(tokio::fs::File::from_std(file))
            }
        };
        Ok(Some((newest.meta, data)))
    }

    /// The global index of the last message in the newest snapshot (0 without one).
    pub(crate) fn current_last_message(&self) -> Result<u64, StoreError> {
        let _guard = lock(&self.lock, &self.path)?;
        match self.newest()? {
            None => Ok(0),
            Some(Listed {
                last_message: Some(last),
                ..
            }) => Ok(last),
            Some(Listed { meta, .. }) => {
                let p = self.db_path(&meta.snapshot_id);
                last_message_index(&open_snapshot_file(&p, false)?, &p)
            }
        }
    }

    /// The newest snapshot by last log id; the caller holds the directory's lock, so that a
    /// concurrent publish cannot delete its files meanwhile.
    fn newest(&self) -> Result<Option<Listed>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .max_by(|a, b| a.meta.last_log_id.cmp(&b.meta.last_log_id)))
    }
}

/// A snapshot's bytes as openraft holds them: an open file, or a recorded snapshot that
/// [`SnapshotData::into_file`] writes out. Reading, writing or seeking a recorded one fails:
/// the code that sends a snapshot turns it into a file first.
pub struct SnapshotData(Data);

enum Data {
    File(tokio::fs::File),
    Recorded(Recorded),
}

/// A recorded snapshot and what it takes to write it out.
struct Recorded {
    snapshots: Arc<SnapshotDir>,
    live: PathBuf,
    meta: SnapshotMeta,
    last_message: u64,
}

impl From<tokio::fs::File> for SnapshotData {
    fn from(file: tokio::fs::File) -> SnapshotData {
        SnapshotData(Data::File(file))
    }
}

impl SnapshotData {
    /// The snapshot as a file at offset 0, writing a recorded snapshot out first (once: later
    /// calls find the file).
    pub async fn into_file(self) -> Result<tokio::fs::File, StoreError> {
        match self.0 {
            Data::File(file) => Ok(file),
            Data::Recorded(r) => {
                let file =
                    blocking(move || r.snapshots.write_out(&r.live, &r.meta, r.last_message))
                        .await?;
                Ok(tokio::fs::File::from_std(file))
            }
        }
    }

    fn file(&mut self) -> io::Result<Pin<&mut tokio::fs::File>> {
        match &mut self.0 {
            Data::File(file) => Ok(Pin::new(file)),
            Data::Recorded(r) => Err(io::Error::other(format!(
                "snapshot {} is recorded only: write it out before reading it",
                r.meta
            ))),
        }
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().file() {
            Ok(f) => f.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().file() {
            Ok(f) => f.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().file() {
            Ok(f) => f.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().file() {
            Ok(f) => f.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        self.get_mut().file()?.start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut().file() {
            Ok(f) => f.poll_complete(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
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
    copy_state_as_of(source, dst, None)
}

/// [`copy_state`], cut back to the state as of a snapshot when `as_of` gives one: its meta
/// and the global index of its last message.
fn copy_state_as_of(
    source: &Path,
    dst: &Path,
    as_of: Option<(&SnapshotMeta, u64)>,
) -> Result<(), StoreError> {
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
        let mut conn = open_snapshot_file(dst, true)?;
        set_journal_mode(&conn, dst, "DELETE")?;
        if let Some((meta, last_message)) = as_of {
            // The copy is fsynced as a whole below, and a failed one is thrown away: no
            // journal file (which a crash would leave behind), no fsyncs of its own.
            conn.pragma_update(None, "synchronous", "OFF").at(dst)?;
            set_journal_mode(&conn, dst, "MEMORY")?;
            cut_back(&mut conn, dst, meta, last_message)?;
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

/// Records snapshots of the state machine; runs concurrently with `apply`.
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

    fn build_blocking(&self) -> Result<(SnapshotMeta, u64), StoreError> {
        // A separate connection, and one read transaction: the meta and the last message are
        // of the same COMMIT, while the state machine keeps applying.
        let (last_log_id, last_membership, last_message) = {
            let mut conn = open_live(&self.db_path, Access::ReadOnly)?;
            let tx = conn.transaction().at(&self.db_path)?;
            let (applied, membership) = read_applied_state(&tx, &self.db_path)?;
            let last = last_message_index(&tx, &self.db_path)?;
            (applied, membership, last)
        };
        // Durability: the state machine commits without fsync; put it on disk, up to at least
        // this point, before the snapshot lets openraft purge the log behind it. From then on
        // the live database holds the snapshot's state, and it only ever grows.
        sync_database(&self.db_path)?;

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
        self.snapshots.record(&meta, last_message)?;
        self.growth.set_in_snapshot(last_message);
        Ok((meta, last_message))
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
        let (meta, last_message) = blocking(move || builder.build_blocking())
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        crate::metrics::SNAPSHOT_BUILD.observe(started.elapsed());
        let data = SnapshotData(Data::Recorded(Recorded {
            snapshots: self.snapshots.clone(),
            live: self.db_path.clone(),
            meta: meta.clone(),
            last_message,
        }));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_temporary_files_with_their_sqlite_companions() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "build-1.tmp",
            "build-1.tmp-journal",
            "recv-2.tmp-wal",
            "recv-2.tmp-shm",
            "1-5-9.meta.json",
            "1-5-9.db",
            "notes.tmp.txt",
        ];
        for n in names {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        SnapshotDir::open(dir.path()).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["1-5-9.db", "1-5-9.meta.json", "notes.tmp.txt"]);
    }

    #[test]
    fn meta_files_of_both_formats_are_read() {
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 40)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-40-1".to_owned(),
        };
        let path = Path::new("x.meta.json");
        // Earlier versions wrote the bare meta, always beside its db.
        let old = MetaFile::parse(&serde_json::to_vec(&meta).unwrap(), path).unwrap();
        assert_eq!((old.meta, old.last_message), (meta.clone(), None));
        let now = MetaFile {
            meta: meta.clone(),
            last_message: Some(39),
        };
        let new = MetaFile::parse(&serde_json::to_vec(&now).unwrap(), path).unwrap();
        assert_eq!((new.meta, new.last_message), (meta, Some(39)));
        assert!(MetaFile::parse(b"{\"meta\": 1}", path).is_err());
    }

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
