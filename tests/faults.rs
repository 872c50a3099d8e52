//! Failures: the leader killed under load, a follower restarted under an SSE subscriber, a
//! new node caught up from a snapshot, and a minority that must refuse writes.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sse::{SseEnd, SseStream};
use common::{
    assert_dense, assert_record_shape, new_msg_id, str_of, u64_of, wait_until, Cluster, Options,
};
use serde_json::{json, Value};

/// Writes `n` messages to node `id`, each expected to be acknowledged with 201.
async fn write_n(c: &Cluster, id: u64, conv: &str, tag: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let msg = json!({"conv_id": conv, "sender": "writer", "payload": format!("{tag}-{i}")});
        let r = c
            .post(id, &msg)
            .await
            .unwrap_or_else(|e| panic!("{tag} {i}: {e}"));
        assert_eq!(r.code(), 201, "{tag} {i} to node {id}: {}", r.text());
        out.push(r.json());
    }
    out
}

/// `writers` concurrent writers, writer `w` on node `w % nodes + 1`, each sending `each`
/// messages one after another; every one must be acknowledged with 201.
async fn write_in_parallel(c: &Cluster, conv: &'static str, writers: u64, each: usize) {
    let nodes = c.ids().len() as u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, addr) = (c.http.clone(), c.api(w % nodes + 1).to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let msg = json!({"conv_id": conv, "sender": format!("w{w}"), "payload": format!("w{w}-{i}")});
                let r = common::post_message(&http, &addr, &msg).await.unwrap_or_else(|e| panic!("w{w} {i}: {e}"));
                assert_eq!(r.code(), 201, "w{w} {i}: {}", r.text());
            }
        }));
    }
    for t in tasks {
        t.await.expect("a writer panicked");
    }
}

/// Writes to `id` until one is acknowledged (a follower may answer 503 until it learns the
/// new leader). Panics if none is within `timeout`.
async fn write_eventually(
    c: &Cluster,
    id: u64,
    conv: &str,
    payload: &str,
    timeout: Duration,
) -> Value {
    let msg =
        json!({"conv_id": conv, "sender": "prober", "payload": payload, "msg_id": new_msg_id()});
    wait_until(
        &format!("a write through node {id} to succeed"),
        timeout,
        || async {
            let r = c.post(id, &msg).await?;
            if r.is_success() {
                Ok(r.json())
            } else {
                Err(format!("{} {}", r.status, r.text()))
            }
        },
    )
    .await
}

/// kill -9 of the leader while writers run: a new leader is elected quickly, no acknowledged
/// message is lost, writes resume, and the old leader catches up after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn leader_kill_loses_no_acknowledged_write() {
    const CONV: &str = "failover";
    let mut c = Cluster::start(Options {
        write_timeout_ms: 3000,
        ..Options::nodes(3)
    })
    .await;
    let old_leader = c.leader().await;
    let survivors = c.others(old_leader);

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Value>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let unexpected: Arc<Mutex<Vec<String>>> = Arc::default();
    let apis = c.apis();
    let mut writers = Vec::new();
    for w in 0..3usize {
        let (http, apis, stop) = (c.http.clone(), apis.clone(), stop.clone());
        let (acked, failures, unexpected) = (acked.clone(), failures.clone(), unexpected.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let addr = &apis[(w + i) % apis.len()];
                let msg = json!({"conv_id": CONV, "sender": format!("w{w}"), "payload": format!("w{w}-{i}"), "msg_id": new_msg_id()});
                i += 1;
                match common::post_message(&http, addr, &msg).await {
                    Ok(r) if r.is_success() => {
                        let rec = r.json();
                        assert_eq!(rec["msg_id"], msg["msg_id"]);
                        acked.lock().unwrap().push(rec);
                    }
                    Ok(r) => {
                        // 503 is the documented answer when no leader is reachable in time;
                        // anything else is checked after the data (so both get reported).
                        let line = format!("{addr}: {} {}", r.status, r.text());
                        if r.code() != 503 || r.error_code().as_deref() != Some("unavailable") {
                            unexpected.lock().unwrap().push(line.clone());
                        }
                        failures.lock().unwrap().push(line);
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        // The killed node refuses at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    let count = |a: &Arc<Mutex<Vec<Value>>>| a.lock().unwrap().len();

    wait_until(
        "writes to flow before the kill",
        Duration::from_secs(10),
        || async {
            let n = count(&acked);
            if n >= 30 {
                Ok(())
            } else {
                Err(format!("{n} acknowledged"))
            }
        },
    )
    .await;

    c.kill(old_leader);
    let killed_at = Instant::now();
    let new_leader = c.leader_among(&survivors, Duration::from_secs(10)).await;
    let election = killed_at.elapsed();
    eprintln!("new leader {new_leader} after {election:?}");
    assert_ne!(new_leader, old_leader);
    assert!(
        election < Duration::from_secs(10),
        "new leader after {election:?}"
    );

    // Writes resume: through each survivor, and for the running writers.
    for &id in &survivors {
        write_eventually(
            &c,
            id,
            CONV,
            &format!("after-failover-via-{id}"),
            Duration::from_secs(10),
        )
        .await;
    }
    let at_election = count(&acked);
    wait_until(
        "the writers to be acknowledged again",
        Duration::from_secs(10),
        || async {
            let n = count(&acked);
            if n >= at_election + 30 {
                Ok(())
            } else {
                Err(format!("{} since the election", n - at_election))
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("a writer panicked");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "{} acknowledged, {} failed during the test",
        acked.len(),
        failures.lock().unwrap().len()
    );

    let history = c
        .wait_same_messages(&survivors, CONV, acked.len(), Duration::from_secs(15))
        .await;
    assert_dense(&history);
    let by_id: BTreeMap<&str, &Value> = history.iter().map(|r| (str_of(r, "msg_id"), r)).collect();
    assert_eq!(by_id.len(), history.len(), "a msg_id is stored twice");
    for rec in &acked {
        let stored = by_id
            .get(str_of(rec, "msg_id"))
            .unwrap_or_else(|| panic!("acknowledged but lost: {rec}"));
        assert_eq!(*stored, rec, "stored differently than acknowledged");
    }

    c.restart(old_leader).await;
    c.wait_ready(old_leader, Duration::from_secs(15)).await;
    let all = c.ids();
    let after = c
        .wait_same_messages(&all, CONV, history.len(), Duration::from_secs(20))
        .await;
    assert_eq!(
        &after[..history.len()],
        &history[..],
        "the restarted node rewrote history"
    );

    let unexpected = unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "writes answered other than 2xx or 503 unavailable: {unexpected:#?}"
    );
}

/// An SSE subscriber on a follower: the follower is killed and restarted, the subscriber
/// reconnects with Last-Event-ID, and sees every seq exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sse_subscriber_resumes_on_a_restarted_follower_without_gaps() {
    const CONV: &str = "live";
    let mut c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];
    let path = format!("/api/v1/stream?conv_id={CONV}&from=1");

    write_n(&c, leader, CONV, "before", 20).await;
    let mut seen = Vec::new();
    let mut stream = SseStream::open(&c.http, c.api(follower), &path, None)
        .await
        .expect("opening the stream");
    seen.extend(stream.expect(10, Duration::from_secs(10)).await);

    c.kill(follower);
    // A real client processes what reached it before the connection broke, then reconnects.
    loop {
        match stream
            .next_event(tokio::time::Instant::now() + Duration::from_secs(5))
            .await
        {
            Ok(ev) => seen.push(ev),
            Err(SseEnd::Timeout) => panic!("the stream of a killed node stayed open"),
            Err(_) => break,
        }
    }
    drop(stream);
    eprintln!("{} events before the follower died", seen.len());

    let survivor = c.others(follower)[0];
    write_n(&c, survivor, CONV, "while-down", 20).await;
    c.restart(follower).await;
    c.wait_ready(follower, Duration::from_secs(15)).await;

    let last = seen
        .last()
        .expect("events were read")
        .id
        .clone()
        .expect("events carry ids");
    // Same URL (from=1) as the first connection, as EventSource does: Last-Event-ID must win.
    let mut stream = SseStream::open(&c.http, c.api(follower), &path, Some(&last))
        .await
        .expect("reopening the stream");
    write_n(&c, leader, CONV, "after", 10).await;
    let missing = 50 - seen.len();
    seen.extend(stream.expect(missing, Duration::from_secs(15)).await);
    // Nothing beyond the history may follow.
    let (extra, _) = stream
        .take(1, tokio::time::Instant::now() + Duration::from_millis(500))
        .await;
    assert!(extra.is_empty(), "an event beyond the history: {extra:?}");

    let seqs: Vec<u64> = seen.iter().map(|e| e.id_u64()).collect();
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<u64>>(),
        "gap-free, duplicate-free seq run"
    );
    let history = c
        .wait_same_messages(&c.ids(), CONV, 50, Duration::from_secs(10))
        .await;
    assert_eq!(history.len(), 50);
    for (ev, rec) in seen.iter().zip(&history) {
        assert_eq!(ev.event.as_deref(), Some("message"));
        assert_eq!(&ev.json(), rec, "the event differs from the stored record");
    }
}

/// With a low snapshot threshold the log is purged; a node that joins afterwards gets the
/// state by snapshot and ends with the same messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_node_catches_up_from_a_snapshot() {
    const CONV: &str = "snap";
    let mut c = Cluster::start(Options {
        snapshot_threshold: 50,
        keep_logs_after_snapshot: 5,
        ..Options::nodes(3)
    })
    .await;

    write_in_parallel(&c, CONV, 3, 100).await;
    let before = c
        .wait_same_messages(&c.ids(), CONV, 300, Duration::from_secs(15))
        .await;
    assert_eq!(before.len(), 300);
    assert_dense(&before);

    // The point of the test is a join that cannot be served from the log alone: wait until
    // node 1 reports that it purged its log behind a snapshot.
    let data_dir = c.node(1).config.data_dir.clone();
    let purged = wait_until(
        "node 1 to purge its log",
        Duration::from_secs(10),
        || async {
            let s = c.status(1).await?;
            match s["purged_index"].as_u64() {
                Some(i) if i > 1 => Ok(i),
                other => Err(format!("purged_index {other:?}")),
            }
        },
    )
    .await;
    let first = purged + 1;
    eprintln!("node 1 keeps its log from index {first}");
    let snapshots = std::fs::read_dir(data_dir.join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        snapshots > 0,
        "node 1 has an empty snapshots/ after 300 entries"
    );

    let new = c.add_node().await;
    assert_eq!(new, 4);
    let all = c.ids();
    let after = c
        .wait_same_messages(&all, CONV, 300, Duration::from_secs(20))
        .await;
    assert_eq!(after, before, "the new node's records differ");

    // Replication by log goes on after the snapshot install.
    let more = write_n(&c, 4, CONV, "after-join", 10).await;
    let last = c
        .wait_same_messages(&all, CONV, 310, Duration::from_secs(10))
        .await;
    assert_eq!(&last[300..], &more[..]);
    assert_dense(&last);

    let statuses: Vec<Value> = {
        let mut v = Vec::new();
        for &id in &all {
            v.push(c.status(id).await.expect("status"));
        }
        v
    };
    for s in &statuses {
        assert_eq!(s["members"].as_array().map(Vec::len), Some(4), "{s}");
    }
}

/// Entries that each hold many messages never reach `raft.snapshot_threshold` (counted in
/// entries); `raft.snapshot_threshold_messages` still makes the nodes snapshot and purge, so
/// a node that joins afterwards receives a snapshot instead of replaying the whole log.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_follow_the_message_count_and_a_join_installs_one() {
    const CONV: &str = "snapmsgs";
    let mut c = Cluster::start(Options {
        snapshot_threshold: 50_000,
        keep_logs_after_snapshot: 5,
        raft_toml: "snapshot_threshold_messages = 100".into(),
        ..Options::nodes(3)
    })
    .await;

    write_in_parallel(&c, CONV, 8, 50).await;
    let before = c
        .wait_same_messages(&c.ids(), CONV, 400, Duration::from_secs(15))
        .await;
    assert_dense(&before);

    // Every node counts for itself: each builds a snapshot and purges its log behind it,
    // though 400 messages make at most 400 entries, far below 50,000.
    for id in c.ids() {
        wait_until(
            &format!("node {id} to snapshot and purge by message count"),
            Duration::from_secs(15),
            || async {
                let s = c.status(id).await?;
                match (s["snapshot_index"].as_u64(), s["purged_index"].as_u64()) {
                    (Some(snap), Some(purged)) if snap > 0 && purged > 1 => Ok(s),
                    other => Err(format!("snapshot and purged index {other:?}")),
                }
            },
        )
        .await;
    }

    let new = c.add_node().await;
    let all = c.ids();
    let after = c
        .wait_same_messages(&all, CONV, 400, Duration::from_secs(20))
        .await;
    assert_eq!(after, before, "the new node's records differ");
    // The new node received a snapshot: it installed one (a node that replayed the log would
    // have built its own, but installed none).
    let metrics = c
        .http
        .get(c.api(new), "/metrics")
        .await
        .expect("metrics of the new node");
    let installs = metrics
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("chatraftd_snapshot_install_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        installs >= Some(1.0),
        "node {new} installed no snapshot: {installs:?}"
    );
}

/// A lone node of three cannot commit: a write answers 503 with Retry-After within the
/// write timeout, and the message never appears once the others are back.
#[tokio::test(flavor = "multi_thread")]
async fn a_minority_refuses_writes_with_503() {
    const CONV: &str = "minority";
    const WRITE_TIMEOUT_MS: u64 = 1500;
    let mut c = Cluster::start(Options {
        write_timeout_ms: WRITE_TIMEOUT_MS,
        ..Options::nodes(3)
    })
    .await;
    let first = write_n(&c, 1, CONV, "ok", 1).await;
    let leader = c.leader().await;
    let lone = c.others(leader)[0];
    for id in c.others(lone) {
        c.kill(id);
    }

    let msg_id = new_msg_id();
    let msg =
        json!({"conv_id": CONV, "sender": "u1", "payload": "must not be stored", "msg_id": msg_id});
    let started = Instant::now();
    let r = c.post(lone, &msg).await.expect("the lone node answers");
    let took = started.elapsed();
    assert_eq!(r.code(), 503, "{}", r.text());
    assert_eq!(
        r.error_code().as_deref(),
        Some("unavailable"),
        "{}",
        r.text()
    );
    let retry_after = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After header: {:?}", r.headers));
    retry_after
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("Retry-After {retry_after:?} is not seconds"));
    let limit = Duration::from_millis(WRITE_TIMEOUT_MS + 1500);
    assert!(
        took <= limit,
        "503 after {took:?}, more than write_timeout_ms + margin ({limit:?})"
    );

    // A second try fails the same way (nothing was queued behind the first).
    let r = c.post(lone, &msg).await.expect("the lone node answers");
    assert_eq!(r.code(), 503, "{}", r.text());

    // Nor does it call itself ready: no leader confirms a commit index to it.
    let r = c.outsider().get(c.api(lone), "/readyz").await.unwrap();
    assert_eq!(r.code(), 503, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("not_ready"), "{}", r.text());

    for id in c.ids() {
        if id != lone {
            c.restart(id).await;
        }
    }
    c.wait_members(&c.ids(), Duration::from_secs(15)).await;
    // Let every node apply everything the leader committed (its blank entry included).
    let probe = write_eventually(&c, lone, CONV, "probe", Duration::from_secs(10)).await;
    let history = c
        .wait_same_messages(&c.ids(), CONV, 2, Duration::from_secs(10))
        .await;
    assert_eq!(
        history.len(),
        2,
        "only the first write and the probe: {history:?}"
    );
    assert_eq!(history[0], first[0]);
    assert_eq!(history[1], probe);
    assert!(history.iter().all(|r| r["msg_id"] != msg_id.as_str()));
    assert_record_shape(&probe);

    // The msg_id is free: sending it now stores it as new.
    let r = c.post(lone, &msg).await.expect("an answer");
    assert_eq!(
        r.code(),
        201,
        "the refused msg_id must not have been stored: {}",
        r.text()
    );
    assert_eq!(u64_of(&r.json(), "seq"), 3);
}

/// The state machine commits without fsync (the Raft log is the durable record), so after a
/// power cut `messages.db` may be back at an earlier COMMIT. Played here by putting an older
/// copy of a stopped follower's `messages.db` in place: on start the node re-applies the
/// committed entries from its log and ends identical to the others, with no message lost,
/// doubled or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_machine_behind_its_log_is_rebuilt_from_the_log() {
    let mut c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];
    write_n(&c, leader, "rewind", "before", 10).await;
    c.wait_same_messages(&c.ids(), "rewind", 10, Duration::from_secs(20))
        .await;

    // An older state: a consistent copy of the follower's state machine, taken live.
    let older = c.root().join("older-messages.db");
    let config = c.node(follower).config_path.clone();
    let (status, _, err) = common::run_to_exit(
        &[
            "backup",
            "--config",
            config.to_str().unwrap(),
            "--out",
            older.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(status.success(), "backup: {err}");

    write_n(&c, leader, "rewind", "after", 10).await;
    let expected = c
        .wait_same_messages(&c.ids(), "rewind", 20, Duration::from_secs(20))
        .await;
    c.terminate(follower, Duration::from_secs(20)).await;
    let data = c.node(follower).config.data_dir.clone();
    for stale in ["messages.db-wal", "messages.db-shm"] {
        let _ = std::fs::remove_file(data.join(stale));
    }
    std::fs::copy(&older, data.join("messages.db")).expect("rolling messages.db back");

    c.restart(follower).await;
    let log = c.node(follower).log();
    assert!(
        log.contains("re-apply log"),
        "the restarted node did not re-apply from its log:\n{log}"
    );
    let again = c
        .wait_same_messages(&c.ids(), "rewind", 20, Duration::from_secs(30))
        .await;
    assert_eq!(again, expected);
    assert_dense(&again);
}
