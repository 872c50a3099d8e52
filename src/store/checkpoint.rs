//! WAL checkpoints on a thread of their own.
//!
//! SQLite copies a database's WAL back into the database file (a checkpoint) on the
//! committing connection once the WAL holds 1,000 pages: the commit that crosses the mark
//! waits for the copy of every page and an fsync of the database file, and on the Raft log
//! and the message store every write behind it waits too. Here the writer's connection only
//! notes the WAL's size after each commit (SQLite's WAL hook) and wakes a checkpointer
//! thread, with a connection of its own, once the WAL holds [`BACKGROUND_PAGES`]. Its
//! checkpoints are `PASSIVE`: they never hold up the writer. When one copies every page with
//! no commit in between, the writer's next transaction starts the WAL afresh (unless a reader
//! still holds an older view, a snapshot copy say).
//!
//! Under a steady load a commit nearly always lands during the background checkpoint, so
//! the WAL does not start afresh by itself; the writer then checkpoints at
//! [`FOREGROUND_PAGES`] as SQLite would, but copies only the pages written since the last
//! background checkpoint, and the WAL stays as short as with SQLite's own checkpoints.
//!
//! Durability is unchanged: a checkpoint only copies pages that are already committed (and,
//! with `synchronous=FULL`, already on disk in the WAL), and SQLite syncs the WAL before and
//! the database file after each one.

use std::cell::Cell;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::Connection;

use super::{open_live, Access, SqlContext, StoreError};

/// WAL pages from which a commit wakes the checkpointer thread.
pub(crate) const BACKGROUND_PAGES: i32 = 250;
/// WAL pages from which the writer checkpoints itself (SQLite's own default).
pub(crate) const FOREGROUND_PAGES: i32 = 1000;
/// The least time between two background checkpoints: each ends with an fsync of the
/// database file, which must not crowd out the commits' fsyncs of the WAL.
const MIN_INTERVAL: Duration = Duration::from_millis(20);

thread_local! {
    /// Pages in the WAL after the last commit on this thread, set by [`wal_hook`] (which
    /// SQLite calls on the committing thread, before `COMMIT` returns) and taken by
    /// [`Checkpointer::committed`].
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

/// Runs inside every commit of a connection set up by [`Checkpointer::attach`]. It replaces
/// SQLite's automatic checkpoint, which is the same hook.
fn wal_hook(wal: &Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    if pages >= FOREGROUND_PAGES {
        // PASSIVE, as SQLite's automatic checkpoint. An error is not the commit's (it has
        // happened), so it is logged, never returned: SQLite would report the commit failed.
        // Busy means the background checkpoint is running, which does the same work.
        if let Err(e) = wal.checkpoint() {
            if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) {
                tracing::warn!(error = %e, "a WAL checkpoint on the writer failed");
            }
        }
    }
    Ok(())
}

/// The checkpointer thread of one database, and the writer's handle on it.
pub(crate) struct Checkpointer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the checkpointer of the live database at `path` (its schema already in place),
    /// and hooks `writer`, the database's only writing connection, up to it.
    pub(crate) fn attach(writer: &Connection, path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = open_live(path, Access::ReadWrite)?;
        let (wake, woken) = mpsc::sync_channel(1);
        let worker = Worker {
            conn,
            path: path.to_path_buf(),
            db: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        };
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || worker.run(woken))
            .map_err(StoreError::io("start the checkpoint thread for", path))?;
        writer.wal_hook(Some(wal_hook));
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Call after each `COMMIT` of the writer, on the thread that committed: wakes the
    /// checkpointer when the WAL has grown enough. Returns the pages in the WAL.
    pub(crate) fn committed(&self) -> i32 {
        let pages = WAL_PAGES.with(|p| p.replace(0));
        if pages < BACKGROUND_PAGES {
            return pages;
        }
        if let Some(wake) = &self.wake {
            // Full: a wake-up is already pending, and one is enough.
            if let Err(TrySendError::Disconnected(())) = wake.try_send(()) {
                tracing::warn!("the WAL checkpoint thread is gone; the writer checkpoints alone");
            }
        }
        pages
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the checkpoint it may be running.
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    conn: Connection,
    path: PathBuf,
    /// The file name, for the metrics.
    db: String,
}

impl Worker {
    fn run(self, woken: Receiver<()>) {
        let mut last: Option<Instant> = None;
        while woken.recv().is_ok() {
            if let Some(at) = last {
                // Wake-ups during the wait are folded into this one checkpoint.
                let until = at + MIN_INTERVAL;
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    match woken.recv_timeout(left) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
            last = Some(Instant::now());
            match self.checkpoint() {
                Ok(Some(complete)) => crate::metrics::count_wal_checkpoint(&self.db, complete),
                // The writer's own checkpoint was running: it does the same work.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.path.display(), "a background WAL checkpoint failed; the writer checkpoints alone until the next");
                }
            }
        }
    }

    /// One `PASSIVE` checkpoint: whether it copied every page of the WAL, or `None` when
    /// another checkpoint held the lock and it did nothing.
    fn checkpoint(&self) -> Result<Option<bool>, StoreError> {
        let (busy, log, copied): (i64, i64, i64) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .at(&self.path)?;
        Ok((busy == 0).then_some(log == copied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live database with one table, its writer hooked up to a checkpointer. `name` is
    /// the test's own: the metrics count by file name.
    fn open(dir: &Path, name: &str) -> (Connection, Checkpointer) {
        let path = dir.join(name);
        let conn = open_live(&path, Access::ReadWrite).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            .unwrap();
        let checkpointer = Checkpointer::attach(&conn, &path).unwrap();
        (conn, checkpointer)
    }

    /// One commit of one row of about a page; the pages in the WAL after it.
    fn commit_row(conn: &mut Connection, checkpointer: &Checkpointer, id: i64) -> i32 {
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO t (id, body) VALUES (?1, zeroblob(3000))", [id])
            .unwrap();
        tx.commit().unwrap();
        checkpointer.committed()
    }

    /// Background checkpoints of `name` so far: (all, complete).
    fn checkpoints(name: &str) -> (u64, u64) {
        crate::metrics::wal_checkpoints()
            .get(name)
            .copied()
            .unwrap_or_default()
    }

    #[test]
    fn a_background_checkpoint_lets_the_wal_start_afresh_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, checkpointer) = open(dir.path(), "afresh.db");
        let mut id = 0;
        let mut pages = 0;
        while pages < BACKGROUND_PAGES {
            id += 1;
            pages = commit_row(&mut conn, &checkpointer, id);
        }
        assert!(pages < FOREGROUND_PAGES, "{pages} pages");
        let deadline = Instant::now() + Duration::from_secs(10);
        while checkpoints("afresh.db").1 == 0 {
            assert!(
                Instant::now() < deadline,
                "no complete background checkpoint"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The writer never reached its own checkpoint, yet the next commit starts the WAL
        // from its first page.
        let after = commit_row(&mut conn, &checkpointer, id + 1);
        assert!(after < 10, "the WAL still holds {after} pages");
    }

    #[test]
    fn under_steady_writes_the_wal_stays_short_and_every_row_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, checkpointer) = open(dir.path(), "steady.db");
        const ROWS: i64 = 3000;
        let mut most = 0;
        for id in 1..=ROWS {
            most = most.max(commit_row(&mut conn, &checkpointer, id));
        }
        // Without the writer's own checkpoint (the hook replaces SQLite's) the WAL would keep
        // growing: each of these commits adds two pages or more, and the background
        // checkpoints alone rarely find a gap between two commits. A background checkpoint
        // may hold the writer's off for a few commits, hence the margin.
        assert!(most < 2 * FOREGROUND_PAGES, "the WAL reached {most} pages");
        assert!(checkpoints("steady.db").0 > 0);
        drop(checkpointer);
        drop(conn);
        let conn = Connection::open(dir.path().join("steady.db")).unwrap();
        let (n, sum): (i64, i64) = conn
            .query_row("SELECT COUNT(*), SUM(id) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((n, sum), (ROWS, ROWS * (ROWS + 1) / 2));
    }
}
