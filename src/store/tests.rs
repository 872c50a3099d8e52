//! Store tests: openraft's conformance suite, then the chat-specific rules.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, Membership, RaftLogReader,
    RaftSnapshotBuilder, Vote,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use super::*;
use crate::types::{
    Entry, LogId, NewMessage, Node, Record, Request, Response, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig, VectorClock,
};

type TestResult = Result<(), Box<dyn Error>>;

/// Opens a fresh store in a temporary directory for each conformance test.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let stores = open(dir.path())
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))?;
        Ok((dir, stores.log, stores.sm))
    }
}

#[test]
fn openraft_conformance_suite() -> TestResult {
    Suite::test_all(Builder)?;
    Ok(())
}

fn lid(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn post(term: u64, index: u64, msg: &NewMessage) -> Entry {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Normal(Request::Post(msg.clone())),
    }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Blank,
    }
}

fn membership(voters: &[u64]) -> Membership<u64, Node> {
    let ids: BTreeSet<u64> = voters.iter().copied().collect();
    let nodes: BTreeMap<u64, Node> = voters
        .iter()
        .map(|&id| {
            (
                id,
                Node {
                    raft_addr: format!("127.0.0.1:{}", 12000 + id),
                    api_addr: format!("127.0.0.1:{}", 8080 + id),
                },
            )
        })
        .collect();
    Membership::new(vec![ids], nodes)
}

fn membership_entry(term: u64, index: u64, voters: &[u64]) -> Entry {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Membership(membership(voters)),
    }
}

fn msg(conv_id: &str, payload: &str) -> NewMessage {
    NewMessage {
        msg_id: Uuid::new_v4(),
        conv_id: conv_id.to_owned(),
        sender: "alice".to_owned(),
        payload: payload.to_owned(),
        vector_clock: None,
        committed_at_ms: 1_700_000_000_123,
    }
}

async fn fresh() -> Result<(TempDir, Stores), Box<dyn Error>> {
    let dir = TempDir::new()?;
    let stores = open(dir.path()).await?;
    Ok((dir, stores))
}

fn stored(r: &Response) -> Result<&Record, Box<dyn Error>> {
    match r {
        Response::Stored(rec) => Ok(rec),
        other => Err(format!("expected Stored, got {other:?}").into()),
    }
}

/// Every conversation with all its records, as the API would list them.
async fn dump(
    reader: &MessageReader,
) -> Result<Vec<(ConversationInfo, Vec<Record>)>, Box<dyn Error>> {
    let mut out = Vec::new();
    for c in reader.conversations().await? {
        let page = reader.page(&c.conv_id, 1, usize::MAX).await?;
        out.push((c, page));
    }
    Ok(out)
}

/// Builds a snapshot of `sm` as openraft would.
async fn build_snapshot(
    sm: &mut StateMachineStore,
) -> Result<openraft::Snapshot<TypeConfig>, StorageError> {
    sm.get_snapshot_builder().await.build_snapshot().await
}

/// Names of the files in `snapshots/`.
fn snapshot_files(dir: &TempDir) -> Result<Vec<String>, Box<dyn Error>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir.path().join(SNAPSHOT_DIR))? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn duplicate_msg_id_returns_original_and_conflict_stores_nothing() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let mut m = msg("general", "hello");
    m.vector_clock = Some(serde_json::from_str(r#"{"a":1,"b":2}"#)?);
    let out = s.sm.apply([blank(1, 1), post(1, 2, &m)]).await?;
    assert_eq!(out[0], Response::None);
    let original = stored(&out[1])?.clone();
    // `index` counts messages, not log entries: the blank entry takes none.
    assert_eq!((original.index, original.seq, original.term), (1, 1, 1));

    // A retry: same content, another leader clock and clock key order, a later entry.
    let mut retry = m.clone();
    retry.committed_at_ms += 5_000;
    retry.vector_clock = Some(serde_json::from_str(r#"{"b":2,"a":1}"#)?);
    // Other content under the same msg_id.
    let mut other = m.clone();
    other.payload = "changed".to_owned();
    // And a retry inside one batch together with a new message.
    let fresh_msg = msg("general", "second");
    let out =
        s.sm.apply([
            post(2, 3, &retry),
            post(2, 4, &other),
            post(2, 5, &fresh_msg),
            post(2, 6, &fresh_msg),
        ])
        .await?;
    assert_eq!(out[0], Response::Duplicate(original.clone()));
    assert_eq!(out[1], Response::Conflict(original.clone()));
    let second = stored(&out[2])?.clone();
    assert_eq!((second.index, second.seq), (2, 2));
    assert_eq!(out[3], Response::Duplicate(second.clone()));

    assert_eq!(s.reader.count().await?, 2);
    assert_eq!(
        s.reader.page("general", 1, 10).await?,
        vec![original.clone(), second]
    );
    assert_eq!(s.reader.by_msg_id(m.msg_id).await?, Some(original));
    assert_eq!(s.sm.applied_state().await?.0, Some(lid(2, 6)));
    assert_eq!(*s.reader.applied().borrow(), 6);
    Ok(())
}

#[tokio::test]
async fn seq_is_dense_per_conversation_across_batches() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let batches: [&[&str]; 3] = [&["a", "b", "a"], &["a"], &["b", "b", "c"]];
    let mut index = 0;
    let mut expected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for batch in batches {
        let entries: Vec<Entry> = batch
            .iter()
            .map(|conv| {
                index += 1;
                expected.entry(conv).or_default().push(index);
                post(1, index, &msg(conv, &format!("m{index}")))
            })
            .collect();
        s.sm.apply(entries).await?;
    }
    for (conv, indexes) in &expected {
        let page = s.reader.page(conv, 1, 100).await?;
        let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
        let want: Vec<u64> = (1..=indexes.len() as u64).collect();
        assert_eq!(seqs, want, "conversation {conv}");
        let got_indexes: Vec<u64> = page.iter().map(|r| r.index).collect();
        assert_eq!(&got_indexes, indexes, "conversation {conv}");
        assert_eq!(s.reader.last_seq(conv).await?, indexes.len() as u64);
    }
    let convs = s.reader.conversations().await?;
    let summary: Vec<(&str, u64, u64, u64)> = convs
        .iter()
        .map(|c| (c.conv_id.as_str(), c.count, c.last_seq, c.last_index))
        .collect();
    assert_eq!(
        summary,
        vec![("a", 3, 3, 4), ("b", 3, 3, 6), ("c", 1, 1, 7)]
    );
    assert_eq!(s.reader.count().await?, 7);
    assert_eq!(s.reader.last_seq("nobody").await?, 0);
    // Paging: from_seq and limit.
    let page: Vec<u64> = s
        .reader
        .page("a", 2, 1)
        .await?
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(page, vec![2]);
    assert!(s.reader.page("a", 4, 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn vector_clock_round_trips_exactly() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let sent = r#"{"zed":2,"alice":1,"m":18446744073709551615}"#;
    let mut with_clock = msg("general", "x");
    with_clock.vector_clock = Some(serde_json::from_str::<VectorClock>(sent)?);
    let without = msg("general", "y");
    let out =
        s.sm.apply([post(1, 1, &with_clock), post(1, 2, &without)])
            .await?;

    let read = s
        .reader
        .by_msg_id(with_clock.msg_id)
        .await?
        .ok_or("message missing")?;
    assert_eq!(&read, stored(&out[0])?);
    let clock = read.vector_clock.as_ref().ok_or("clock missing")?;
    assert_eq!(serde_json::to_string(clock)?, sent);
    let json = serde_json::to_value(&read)?;
    assert_eq!(json["committed_at"], "2023-11-14T22:13:20.123Z");

    let read = s
        .reader
        .by_msg_id(without.msg_id)
        .await?
        .ok_or("message missing")?;
    assert_eq!(read.vector_clock, None);
    assert!(serde_json::to_value(&read)?.get("vector_clock").is_none());
    assert_eq!(s.reader.by_msg_id(Uuid::new_v4()).await?, None);
    Ok(())
}

#[tokio::test]
async fn membership_apply_is_stored() -> TestResult {
    let (dir, mut s) = fresh().await?;
    s.sm.apply([membership_entry(1, 1, &[1, 2, 3]), blank(1, 2)])
        .await?;
    let want = StoredMembership::new(Some(lid(1, 1)), membership(&[1, 2, 3]));
    assert_eq!(s.sm.applied_state().await?, (Some(lid(1, 2)), want.clone()));
    drop(s);
    let mut s = open(dir.path()).await?;
    assert_eq!(s.sm.applied_state().await?, (Some(lid(1, 2)), want));
    Ok(())
}

#[tokio::test]
async fn apply_never_goes_back() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let m = msg("general", "once");
    s.sm.apply([post(1, 5, &m)]).await?;
    assert!(s
        .sm
        .apply([post(1, 5, &msg("general", "again"))])
        .await
        .is_err());
    assert!(s.sm.apply([blank(1, 4)]).await.is_err());
    assert_eq!(s.sm.applied_state().await?.0, Some(lid(1, 5)));
    assert_eq!(s.reader.count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn truncate_and_purge_keep_the_log_contiguous() -> TestResult {
    let (dir, mut s) = fresh().await?;
    assert!(s.log.is_fresh().await?);
    s.log.blocking_append((1..=10).map(|i| blank(1, i))).await?;
    assert!(!s.log.is_fresh().await?);

    s.log.truncate(lid(1, 6)).await?;
    let st = s.log.get_log_state().await?;
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (None, Some(lid(1, 5)))
    );
    s.log.blocking_append([blank(2, 6), blank(2, 7)]).await?;

    s.log.purge(lid(1, 3)).await?;
    s.log.purge(lid(1, 2)).await?; // older: the pointer does not move back
    let ids: Vec<LogId> = s
        .log
        .try_get_log_entries(..)
        .await?
        .iter()
        .map(|e| e.log_id)
        .collect();
    assert_eq!(ids, vec![lid(1, 4), lid(1, 5), lid(2, 6), lid(2, 7)]);
    let st = s.log.get_log_state().await?;
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(lid(1, 3)), Some(lid(2, 7)))
    );
    assert_eq!(s.log.try_get_log_entries(5..=6).await?.len(), 2);
    assert!(s.log.try_get_log_entries(6..6).await?.is_empty());

    // Purge past the end: no entries left, last_log_id falls back to last_purged.
    drop(s);
    let mut s = open(dir.path()).await?;
    s.log.purge(lid(2, 9)).await?;
    assert!(s.log.try_get_log_entries(..).await?.is_empty());
    let st = s.log.get_log_state().await?;
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(lid(2, 9)), Some(lid(2, 9)))
    );
    assert!(!s.log.is_fresh().await?, "a purged log is not fresh");
    Ok(())
}

#[tokio::test]
async fn reopening_keeps_everything() -> TestResult {
    let (dir, mut s) = fresh().await?;
    let vote = Vote::new_committed(3, 1);
    s.log.save_vote(&vote).await?;
    let mut entries = vec![membership_entry(1, 1, &[1])];
    for i in 2..=10 {
        entries.push(post(
            3,
            i,
            &msg(if i % 2 == 0 { "even" } else { "odd" }, &format!("m{i}")),
        ));
    }
    s.log.blocking_append(entries.clone()).await?;
    s.log.save_committed(Some(lid(3, 10))).await?;
    s.sm.apply(entries.clone()).await?;
    let snap = build_snapshot(&mut s.sm).await?;
    s.log.purge(lid(3, 4)).await?;
    // The committed index rides along with the next transaction the writer makes: the purge.
    assert_eq!(s.log.commit_index_handle().load(Ordering::Acquire), 10);
    let before = dump(&s.reader).await?;
    let applied_before = s.sm.applied_state().await?;
    drop(s);

    let mut s = open(dir.path()).await?;
    assert!(!s.log.is_fresh().await?);
    assert_eq!(s.log.read_vote().await?, Some(vote));
    assert_eq!(s.log.read_committed().await?, Some(lid(3, 10)));
    assert_eq!(s.log.commit_index_handle().load(Ordering::Acquire), 10);
    let st = s.log.get_log_state().await?;
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(lid(3, 4)), Some(lid(3, 10)))
    );
    assert_eq!(s.log.try_get_log_entries(..).await?, entries[4..].to_vec());
    assert_eq!(s.sm.applied_state().await?, applied_before);
    assert_eq!(*s.reader.applied().borrow(), 10);
    assert_eq!(dump(&s.reader).await?, before);
    let current =
        s.sm.get_current_snapshot()
            .await?
            .ok_or("snapshot missing")?;
    assert_eq!(current.meta, snap.meta);

    // Applying continues where it stopped: entries 2..=10 held messages 1..=9.
    let out = s.sm.apply([post(3, 11, &msg("even", "m11"))]).await?;
    assert_eq!((stored(&out[0])?.index, stored(&out[0])?.seq), (10, 6));
    Ok(())
}

/// Streams a built snapshot into a follower's receiving file, as the network layer would.
async fn transfer(
    leader: &mut StateMachineStore,
    follower: &mut StateMachineStore,
) -> Result<SnapshotMeta, Box<dyn Error>> {
    let snap = leader
        .get_current_snapshot()
        .await?
        .ok_or("leader has no snapshot")?;
    let mut bytes = Vec::new();
    snap.snapshot
        .into_file()
        .await?
        .read_to_end(&mut bytes)
        .await?;
    let mut rx = follower.begin_receiving_snapshot().await?;
    for chunk in bytes.chunks(1000) {
        rx.write_all(chunk).await?;
    }
    rx.shutdown().await?;
    follower.install_snapshot(&snap.meta, rx).await?;
    Ok(snap.meta)
}

#[tokio::test]
async fn snapshot_installed_on_a_fresh_store_gives_identical_state() -> TestResult {
    let (_ldir, mut leader) = fresh().await?;
    let mut entries = vec![membership_entry(1, 1, &[1, 2])];
    for i in 2..=40 {
        let mut m = msg(
            ["general", "ops", "x.y-z_1"][i as usize % 3],
            &format!("payload {i}"),
        );
        if i % 4 == 0 {
            m.vector_clock = Some(serde_json::from_str(&format!(r#"{{"n{i}":{i},"a":1}}"#))?);
        }
        entries.push(post(2, i, &m));
    }
    leader.sm.apply(entries).await?;
    build_snapshot(&mut leader.sm).await?;

    // The follower has state of its own that the snapshot must replace entirely.
    let (fdir, mut follower) = fresh().await?;
    follower
        .sm
        .apply([post(1, 1, &msg("stale", "gone"))])
        .await?;

    let meta = transfer(&mut leader.sm, &mut follower.sm).await?;
    assert_eq!(meta.last_log_id, Some(lid(2, 40)));
    assert_eq!(dump(&follower.reader).await?, dump(&leader.reader).await?);
    assert_eq!(follower.reader.count().await?, 39);
    assert_eq!(
        follower.sm.applied_state().await?,
        leader.sm.applied_state().await?
    );
    assert_eq!(*follower.reader.applied().borrow(), 40);
    let current = follower
        .sm
        .get_current_snapshot()
        .await?
        .ok_or("follower has no snapshot")?;
    assert_eq!(current.meta, meta);
    // Exactly the one snapshot, no temporary files left over.
    let id = &meta.snapshot_id;
    assert_eq!(
        snapshot_files(&fdir)?,
        vec![format!("{id}.db"), format!("{id}.meta.json")]
    );

    // The follower goes on applying from the snapshot.
    let out = follower
        .sm
        .apply([post(2, 41, &msg("ops", "after"))])
        .await?;
    assert_eq!(stored(&out[0])?.seq, 14);
    Ok(())
}

#[tokio::test]
async fn bad_snapshots_are_refused_and_state_is_kept() -> TestResult {
    let (_ldir, mut leader) = fresh().await?;
    leader
        .sm
        .apply([
            membership_entry(1, 1, &[1]),
            post(1, 2, &msg("general", "real")),
        ])
        .await?;
    build_snapshot(&mut leader.sm).await?;
    let good = leader
        .sm
        .get_current_snapshot()
        .await?
        .ok_or("leader has no snapshot")?;

    let (fdir, mut follower) = fresh().await?;
    follower
        .sm
        .apply([post(1, 1, &msg("general", "mine"))])
        .await?;
    let before = dump(&follower.reader).await?;

    // Not a database at all.
    let mut rx = follower.sm.begin_receiving_snapshot().await?;
    rx.write_all(b"this is not a SQLite database, not even close; padding padding padding")
        .await?;
    rx.shutdown().await?;
    assert!(follower.sm.install_snapshot(&good.meta, rx).await.is_err());

    // A real snapshot whose meta claims another log position.
    let mut lying = good.meta.clone();
    lying.last_log_id = Some(lid(9, 99));
    let rx = follower.sm.begin_receiving_snapshot().await?;
    let snap = leader
        .sm
        .get_current_snapshot()
        .await?
        .ok_or("leader has no snapshot")?;
    let mut rx = rx;
    tokio::io::copy(&mut snap.snapshot.into_file().await?, &mut *rx).await?;
    rx.shutdown().await?;
    assert!(follower.sm.install_snapshot(&lying, rx).await.is_err());

    // A snapshot id that would escape the directory.
    let mut escaping = good.meta.clone();
    escaping.snapshot_id = "../../etc/x".to_owned();
    let rx = follower.sm.begin_receiving_snapshot().await?;
    assert!(follower.sm.install_snapshot(&escaping, rx).await.is_err());

    assert_eq!(dump(&follower.reader).await?, before);
    assert_eq!(follower.sm.applied_state().await?.0, Some(lid(1, 1)));
    assert!(follower.sm.get_current_snapshot().await?.is_none());
    // Only the refused receive of the bad id is left, and reopening removes it.
    drop(follower);
    let _reopened = open(fdir.path()).await?;
    assert!(snapshot_files(&fdir)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_is_consistent_while_apply_continues() -> TestResult {
    let (_ldir, leader) = fresh().await?;
    let Stores {
        sm: mut leader_sm,
        reader,
        ..
    } = leader;
    // Enough rows that VACUUM INTO takes a while.
    let mut first = vec![membership_entry(1, 1, &[1])];
    first.extend((2..=2000).map(|i| {
        post(
            1,
            i,
            &msg(if i % 3 == 0 { "a" } else { "b" }, &"x".repeat(200)),
        )
    }));
    leader_sm.apply(first).await?;
    let mut builder = leader_sm.get_snapshot_builder().await;

    // Apply one entry at a time until the build is over.
    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut next = 2001;
            while !stop.load(Ordering::Acquire) {
                let conv = if next % 3 == 0 { "a" } else { "b" };
                leader_sm.apply([post(1, next, &msg(conv, "y"))]).await?;
                next += 1;
            }
            Ok::<_, StorageError>((leader_sm, next - 1))
        })
    };
    reader.applied().wait_for(|&i| i >= 2050).await?;
    let snap = builder.build_snapshot().await;
    stop.store(true, Ordering::Release);
    let (mut leader_sm, last) = applier.await??;
    let snap = snap?;
    let at = snap
        .meta
        .last_log_id
        .ok_or("snapshot without log id")?
        .index;
    assert!(
        (2050..=last).contains(&at),
        "snapshot at {at}, applied up to {last}"
    );

    let (_fdir, mut follower) = fresh().await?;
    let meta = transfer(&mut leader_sm, &mut follower.sm).await?;
    assert_eq!(meta.last_log_id, Some(lid(1, at)));
    // Exactly the messages with index <= at, each conversation dense.
    assert_eq!(follower.reader.count().await?, at - 1);
    for (info, records) in dump(&follower.reader).await? {
        assert!(records.iter().all(|r| r.index <= at));
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=info.last_seq).collect::<Vec<_>>());
        assert_eq!(records.last().map(|r| r.index), Some(info.last_index));
    }
    assert_eq!(follower.sm.applied_state().await?.0, Some(lid(1, at)));
    Ok(())
}

#[tokio::test]
async fn a_newer_snapshot_replaces_the_older_one() -> TestResult {
    let (dir, mut s) = fresh().await?;
    s.sm.apply([
        membership_entry(1, 1, &[1]),
        post(1, 2, &msg("general", "a")),
    ])
    .await?;
    let first = build_snapshot(&mut s.sm).await?;
    s.sm.apply([post(1, 3, &msg("general", "b"))]).await?;
    let second = build_snapshot(&mut s.sm).await?;
    assert_eq!(first.meta.last_log_id, Some(lid(1, 2)));
    assert_eq!(second.meta.last_log_id, Some(lid(1, 3)));
    // Recorded, not written out: the meta alone.
    let id = &second.meta.snapshot_id;
    assert_eq!(snapshot_files(&dir)?, vec![format!("{id}.meta.json")]);
    // The replaced snapshot can still be written out, as of its own point, and leaves no
    // file behind.
    let mut bytes = Vec::new();
    first
        .snapshot
        .into_file()
        .await?
        .read_to_end(&mut bytes)
        .await?;
    assert_eq!(snapshot_files(&dir)?, vec![format!("{id}.meta.json")]);
    let copy = dir.path().join("first-copy.db");
    std::fs::write(&copy, &bytes)?;
    let conn = rusqlite::Connection::open(&copy)?;
    assert_eq!(
        super::snapshot::check_state_file(&conn, &copy)?,
        (first.meta.last_log_id, first.meta.last_membership.clone())
    );
    let payloads: Vec<String> = conn
        .prepare("SELECT payload FROM messages ORDER BY idx")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(payloads, ["a"]);
    Ok(())
}

/// A recorded snapshot is written out when first needed, cut back to its own point although
/// the state machine went on, and written once.
#[tokio::test]
async fn a_recorded_snapshot_is_written_out_as_of_its_point() -> TestResult {
    let (dir, mut leader) = fresh().await?;
    let mut entries = vec![membership_entry(1, 1, &[1, 2])];
    for i in 2..=20 {
        entries.push(post(
            1,
            i,
            &msg(["a", "b"][i as usize % 2], &format!("m{i}")),
        ));
    }
    leader.sm.apply(entries).await?;
    let built = build_snapshot(&mut leader.sm).await?;
    let at_snapshot = dump(&leader.reader).await?;

    // Later: more of an existing conversation, a new conversation, a new membership.
    let later = vec![
        post(2, 21, &msg("a", "later")),
        post(2, 22, &msg("new", "later")),
        membership_entry(2, 23, &[1, 2, 3]),
        post(2, 24, &msg("b", "later")),
    ];
    leader.sm.apply(later.clone()).await?;
    let id = &built.meta.snapshot_id;
    assert_eq!(snapshot_files(&dir)?, vec![format!("{id}.meta.json")]);

    // Reopened, the store still offers the recorded snapshot.
    drop(leader);
    let mut leader = open(dir.path()).await?;
    let (fdir, mut follower) = fresh().await?;
    let meta = transfer(&mut leader.sm, &mut follower.sm).await?;
    assert_eq!(meta, built.meta);
    assert_eq!(
        snapshot_files(&dir)?,
        vec![format!("{id}.db"), format!("{id}.meta.json")]
    );
    assert_eq!(dump(&follower.reader).await?, at_snapshot);
    assert_eq!(
        follower.sm.applied_state().await?,
        (built.meta.last_log_id, built.meta.last_membership.clone())
    );

    // The second node to need it gets the same file, not a new copy.
    let written = std::fs::metadata(dir.path().join(SNAPSHOT_DIR).join(format!("{id}.db")))?;
    let (_gdir, mut other) = fresh().await?;
    transfer(&mut leader.sm, &mut other.sm).await?;
    let again = std::fs::metadata(dir.path().join(SNAPSHOT_DIR).join(format!("{id}.db")))?;
    assert_eq!(
        (written.ino(), written.modified()?),
        (again.ino(), again.modified()?)
    );
    assert_eq!(dump(&other.reader).await?, at_snapshot);

    // It goes on from the snapshot with the leader's log and ends identical to it.
    follower.sm.apply(later).await?;
    assert_eq!(dump(&follower.reader).await?, dump(&leader.reader).await?);
    assert_eq!(
        follower.sm.applied_state().await?,
        leader.sm.applied_state().await?
    );
    drop(fdir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_see_whole_batches_while_apply_runs() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let batches: u64 = 60;
    let per_batch: u64 = 5;
    let mut readers = Vec::new();
    for _ in 0..6 {
        let reader = s.reader.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let page = reader.page("general", 1, usize::MAX).await?;
                let n = page.len() as u64;
                // Never a partial batch, never a gap.
                assert_eq!(n % per_batch, 0, "saw a partial batch");
                assert!(page.iter().zip(1..).all(|(r, seq)| r.seq == seq));
                if n == batches * per_batch {
                    return Ok::<(), StoreError>(());
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut applied = s.reader.applied();
    let waiter = tokio::spawn(async move { applied.wait_for(|&i| i >= 300).await.map(|i| *i) });
    let mut index = 0;
    for _ in 0..batches {
        let entries: Vec<Entry> = (0..per_batch)
            .map(|_| {
                index += 1;
                post(1, index, &msg("general", "x"))
            })
            .collect();
        s.sm.apply(entries).await?;
    }
    for r in readers {
        r.await??;
    }
    assert_eq!(waiter.await??, batches * per_batch);
    Ok(())
}

#[tokio::test]
async fn a_snapshot_behind_the_state_machine_is_refused() -> TestResult {
    let (_ldir, mut leader) = fresh().await?;
    leader
        .sm
        .apply([
            membership_entry(1, 1, &[1]),
            post(1, 2, &msg("general", "a")),
        ])
        .await?;
    build_snapshot(&mut leader.sm).await?;

    let (_fdir, mut follower) = fresh().await?;
    let entries = [
        membership_entry(1, 1, &[1]),
        post(1, 2, &msg("general", "a")),
        post(1, 3, &msg("general", "b")),
    ];
    follower.sm.apply(entries).await?;
    let before = dump(&follower.reader).await?;
    assert!(transfer(&mut leader.sm, &mut follower.sm).await.is_err());
    assert_eq!(dump(&follower.reader).await?, before);
    assert_eq!(follower.sm.applied_state().await?.0, Some(lid(1, 3)));
    assert_eq!(*follower.reader.applied().borrow(), 3);
    Ok(())
}

/// Appends queued back to back (as a busy leader issues them) share group commits, land in
/// order, and are all on disk once their callbacks fired.
#[tokio::test]
async fn back_to_back_appends_are_group_committed_in_order() -> TestResult {
    let (dir, s) = fresh().await?;
    let appends = (1..=200u64).map(|i| {
        let mut log = s.log.clone();
        async move { log.blocking_append([blank(1, i)]).await }
    });
    for r in futures_util::future::join_all(appends).await {
        r?;
    }
    let mut log = s.log.clone();
    let read: Vec<u64> = log
        .try_get_log_entries(1..=200)
        .await?
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(read, (1..=200).collect::<Vec<_>>());
    drop(log);
    drop(s);

    let mut s = open(dir.path()).await?;
    let st = s.log.get_log_state().await?;
    assert_eq!(st.last_log_id, Some(lid(1, 200)));
    assert_eq!(s.log.try_get_log_entries(..).await?.len(), 200);
    Ok(())
}

/// A batch entry stores its messages in order under consecutive indexes, one outcome each,
/// and de-duplicates inside the batch and against earlier entries.
#[tokio::test]
async fn a_batch_entry_stores_its_messages_in_order() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    let first = msg("general", "before");
    s.sm.apply([post(1, 1, &first)]).await?;
    let a = msg("general", "a");
    let b = msg("other", "b");
    let mut conflicting = first.clone();
    conflicting.payload = "changed".into();
    let batch = Entry {
        log_id: lid(1, 2),
        payload: EntryPayload::Normal(Request::Batch(vec![
            a.clone(),
            first.clone(),
            b.clone(),
            a.clone(),
            conflicting,
        ])),
    };
    let out = s.sm.apply([batch]).await?;
    let Response::Batch(each) = &out[0] else {
        return Err(format!("expected a batch response, got {:?}", out[0]).into());
    };
    assert_eq!(each.len(), 5);
    let ra = stored(&each[0])?.clone();
    assert_eq!((ra.index, ra.seq, ra.term), (2, 2, 1));
    assert!(matches!(&each[1], Response::Duplicate(r) if r.index == 1));
    let rb = stored(&each[2])?.clone();
    assert_eq!((rb.index, rb.seq, rb.conv_id.as_str()), (3, 1, "other"));
    assert_eq!(each[3], Response::Duplicate(ra.clone()));
    assert!(matches!(&each[4], Response::Conflict(r) if r.index == 1));
    assert_eq!(s.reader.count().await?, 3);
    assert_eq!(s.sm.applied_state().await?.0, Some(lid(1, 2)));
    Ok(())
}

/// Takes everything a subscription's window holds from `seq` on.
fn from_window(sub: &crate::fanout::Subscription, seq: u64) -> Option<(bytes::Bytes, u64)> {
    let waker = futures_util::task::noop_waker_ref();
    match sub.next(seq, None, usize::MAX, waker) {
        crate::fanout::Next::Events(b, next) => Some((b, next)),
        _ => None,
    }
}

#[tokio::test]
async fn the_live_window_holds_the_same_event_bytes_as_the_store() -> TestResult {
    let (_dir, mut s) = fresh().await?;
    // Stored before anyone watched: only in SQLite.
    s.sm.apply([post(1, 1, &msg("general", "early"))]).await?;
    let sub = s.reader.tail().subscribe("general");
    let mut clocked = msg("general", "line\nbreak \"quoted\" é");
    clocked.vector_clock = Some(serde_json::from_str(r#"{"zed":2,"alice":1}"#)?);
    let batch = vec![
        msg("general", "second"),
        msg("other", "not watched"),
        clocked,
    ];
    s.sm.apply([
        Entry {
            log_id: lid(1, 2),
            payload: EntryPayload::Normal(Request::Batch(batch)),
        },
        post(1, 3, &msg("general", "fourth")),
    ])
    .await?;
    assert!(from_window(&sub, 1).is_none(), "seq 1 predates the window");
    let (live, next) = from_window(&sub, 2).ok_or("seqs 2.. are in the window")?;
    assert_eq!(next, 5);
    let stored = s
        .reader
        .spawn_event_page("general", 2, 100, 1 << 20)
        .await??;
    assert_eq!((stored.count, stored.next_seq), (3, 5));
    assert_eq!(
        String::from_utf8_lossy(&live),
        String::from_utf8_lossy(&stored.bytes)
    );
    // Byte-bounded store pages stop after the event that passes the bound.
    let first = s.reader.spawn_event_page("general", 1, 100, 1).await??;
    assert_eq!((first.count, first.next_seq), (1, 2));
    let none = s
        .reader
        .spawn_event_page("general", 5, 100, 1 << 20)
        .await??;
    assert_eq!((none.count, none.next_seq), (0, 5));
    assert_eq!(
        s.reader.tail().usage().0,
        1,
        "only the watched conversation"
    );
    Ok(())
}

#[tokio::test]
async fn a_snapshot_install_empties_the_live_windows() -> TestResult {
    let (_ldir, mut leader) = fresh().await?;
    let entries: Vec<Entry> = (1..=20)
        .map(|i| post(1, i, &msg("general", &format!("m{i}"))))
        .collect();
    leader.sm.apply(entries).await?;
    build_snapshot(&mut leader.sm).await?;

    let (_fdir, mut follower) = fresh().await?;
    let sub = follower.reader.tail().subscribe("general");
    follower
        .sm
        .apply([post(1, 1, &msg("general", "m1"))])
        .await?;
    assert!(from_window(&sub, 1).is_some());
    transfer(&mut leader.sm, &mut follower.sm).await?;
    assert!(
        from_window(&sub, 1).is_none(),
        "the window must not describe the replaced state"
    );
    assert_eq!(follower.reader.tail().usage(), (1, 0));
    // Applying goes on after the snapshot, and the window starts at the next seq.
    let out = follower
        .sm
        .apply([post(1, 21, &msg("general", "m21"))])
        .await?;
    assert_eq!(stored(&out[0])?.seq, 21);
    let (live, next) = from_window(&sub, 21).ok_or("seq 21 is in the window")?;
    assert_eq!(next, 22);
    let page = follower
        .reader
        .spawn_event_page("general", 21, 10, 1 << 20)
        .await??;
    assert_eq!(live, page.bytes);
    Ok(())
}

#[tokio::test]
async fn a_committed_id_past_the_log_on_disk_waits_for_its_entry() -> TestResult {
    let (dir, mut s) = fresh().await?;
    let vote = Vote::new_committed(1, 1);
    s.log
        .blocking_append(vec![
            membership_entry(1, 1, &[1]),
            post(1, 2, &msg("c", "two")),
        ])
        .await?;
    // A follower may learn that entry 3 is committed before entry 3 is on its disk.
    s.log.save_committed(Some(lid(1, 3))).await?;
    s.log.save_vote(&vote).await?;
    drop(s);
    let mut s = open(dir.path()).await?;
    let committed = s.log.read_committed().await?;
    assert!(
        committed.map_or(true, |c| c.index <= 2),
        "committed {committed:?} is past the last entry on disk"
    );
    // Once the entry is there, the id is written with the next transaction.
    s.log
        .blocking_append(vec![post(1, 3, &msg("c", "three"))])
        .await?;
    s.log.save_committed(Some(lid(1, 3))).await?;
    s.log.save_vote(&vote).await?;
    drop(s);
    let mut s = open(dir.path()).await?;
    assert_eq!(s.log.read_committed().await?, Some(lid(1, 3)));
    Ok(())
}

/// The counts behind `raft.snapshot_threshold_messages`: moved by applies, built snapshots and
/// installs, and read back from the files when the store is opened again.
#[tokio::test]
async fn message_counts_follow_applies_snapshots_installs_and_reopening() -> TestResult {
    let (ldir, mut leader) = fresh().await?;
    let growth = leader.sm.growth();
    assert_eq!(growth.since_snapshot(), (0, 0));
    let mut entries = vec![membership_entry(1, 1, &[1, 2])];
    for i in 2..=11 {
        entries.push(post(1, i, &msg("general", &format!("m{i}"))));
    }
    leader.sm.apply(entries).await?;
    assert_eq!(growth.since_snapshot(), (0, 10));
    build_snapshot(&mut leader.sm).await?;
    assert_eq!(growth.since_snapshot(), (10, 0));
    leader
        .sm
        .apply([post(1, 12, &msg("general", "after"))])
        .await?;
    assert_eq!(growth.since_snapshot(), (10, 1));

    // A node that installs the snapshot counts from it, whatever it held before.
    let (_fdir, mut follower) = fresh().await?;
    follower
        .sm
        .apply([post(1, 1, &msg("stale", "gone"))])
        .await?;
    transfer(&mut leader.sm, &mut follower.sm).await?;
    assert_eq!(follower.sm.growth().since_snapshot(), (10, 0));

    // Opened again, the store reads both counts back from messages.db and the snapshot.
    drop(leader);
    let reopened = open(ldir.path()).await?;
    assert_eq!(reopened.sm.growth().since_snapshot(), (10, 1));
    Ok(())
}
