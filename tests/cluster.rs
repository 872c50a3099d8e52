//! A healthy cluster: total order on every node, the same records through GET and SSE,
//! streams that pass from the store to the live window (and back) without a gap or a
//! duplicate, also across a snapshot install, idempotent writes, and idempotent joins.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::sse::SseStream;
use common::{
    assert_dense, assert_record_shape, conversation_counts, new_msg_id, str_of, u64_of,
    vector_clock_key_order, wait_until, Cluster, Options,
};
use serde_json::{json, Value};

/// The six-message scenario of the starting design: six messages round-robin over three
/// nodes come back, from every node, through GET and through SSE, in one order.
#[tokio::test(flavor = "multi_thread")]
async fn six_messages_round_robin_read_back_identically_everywhere() {
    let c = Cluster::start(Options::nodes(3)).await;

    let mut sent = Vec::new();
    for i in 1..=6u64 {
        let node = (i - 1) % 3 + 1;
        let sender = format!("u{node}");
        let msg = json!({
            "conv_id": "general",
            "sender": sender,
            "payload": format!("msg-{i}-from-node{node}"),
            "vector_clock": { sender.clone(): i },
        });
        let r = c
            .post(node, &msg)
            .await
            .unwrap_or_else(|e| panic!("message {i} to node {node}: {e}"));
        assert_eq!(r.code(), 201, "message {i} to node {node}: {}", r.text());
        let rec = r.json();
        assert_record_shape(&rec);
        assert_eq!(u64_of(&rec, "seq"), i, "{rec}");
        assert_eq!(rec["conv_id"], "general");
        assert_eq!(rec["sender"], msg["sender"]);
        assert_eq!(rec["payload"], msg["payload"]);
        assert_eq!(
            rec["vector_clock"], msg["vector_clock"],
            "vector clock comes back as sent"
        );
        sent.push(rec);
    }
    assert_dense(&sent);

    for id in c.ids() {
        // A follower answers reads from what it has applied: wait for all six.
        let addr = c.api(id).to_owned();
        let got = wait_until(
            &format!("six records on node {id}"),
            Duration::from_secs(10),
            || async {
                let r = c.http.get(&addr, "/api/v1/messages?from=1").await?;
                if r.code() != 200 {
                    return Err(format!("{} {}", r.status, r.text()));
                }
                let page = r.json();
                let msgs = page["messages"].as_array().cloned().unwrap_or_default();
                if msgs.len() < 6 {
                    return Err(format!("{} records: {page}", msgs.len()));
                }
                Ok(page)
            },
        )
        .await;
        assert_eq!(got["conv_id"], "general", "node {id}: {got}");
        assert_eq!(got["last_seq"], 6, "node {id}: {got}");
        assert_eq!(
            got["messages"],
            Value::Array(sent.clone()),
            "node {id}: GET differs from the write answers"
        );

        let mut stream = SseStream::open(
            &c.http,
            &addr,
            "/api/v1/stream?conv_id=general&from=1",
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("node {id}: {e}"));
        let events = stream.expect(6, Duration::from_secs(10)).await;
        for (ev, rec) in events.iter().zip(&sent) {
            assert_eq!(ev.event.as_deref(), Some("message"), "node {id}: {ev:?}");
            assert_eq!(
                ev.id_u64(),
                u64_of(rec, "seq"),
                "node {id}: SSE id is the seq: {ev:?}"
            );
            assert_eq!(
                &ev.json(),
                rec,
                "node {id}: SSE record differs from the write answer"
            );
        }
    }
}

/// Eight concurrent writers, 200 messages each, spread over all nodes and two conversations:
/// every node ends with all 1600 in one order, seq dense per conversation.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_get_one_total_order_on_every_node() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 200;
    let c = Cluster::start(Options {
        write_timeout_ms: 5000,
        ..Options::nodes(3)
    })
    .await;
    let apis = c.apis();

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let http = c.http.clone();
        let addr = apis[w % apis.len()].clone();
        let conv = if w % 2 == 0 { "alpha" } else { "beta" };
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::with_capacity(PER_WRITER);
            for i in 0..PER_WRITER {
                let msg = json!({
                    "conv_id": conv,
                    "sender": format!("writer{w}"),
                    "payload": format!("w{w}-m{i}"),
                    "msg_id": new_msg_id(),
                });
                let r = common::post_message(&http, &addr, &msg)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} message {i}: {e}"));
                assert_eq!(
                    r.code(),
                    201,
                    "writer {w} message {i} to {addr}: {}",
                    r.text()
                );
                let rec = r.json();
                assert_eq!(rec["msg_id"], msg["msg_id"]);
                assert!(
                    rec.get("vector_clock").is_none(),
                    "no vector_clock sent, none returned: {rec}"
                );
                acked.push(rec);
            }
            acked
        }));
    }
    let mut acked: Vec<Vec<Value>> = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("a writer panicked"));
    }

    let ids = c.ids();
    let expected = (WRITERS / 2 * PER_WRITER) as u64;
    // Followers apply asynchronously: wait until each holds both conversations whole.
    for &id in &ids {
        let addr = c.api(id).to_owned();
        wait_until(
            &format!("node {id} to hold {expected} records per conversation"),
            Duration::from_secs(20),
            || async {
                let counts = conversation_counts(&c.http, &addr).await?;
                if counts.get("alpha") == Some(&expected) && counts.get("beta") == Some(&expected) {
                    Ok(())
                } else {
                    Err(format!("{counts:?}"))
                }
            },
        )
        .await;
    }

    let mut by_conv: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for conv in ["alpha", "beta"] {
        let reference = c.messages(ids[0], conv).await.expect("reading node 1");
        assert_eq!(reference.len() as u64, expected, "{conv}");
        assert_dense(&reference);
        for &id in &ids[1..] {
            let other = c.messages(id, conv).await.expect("reading a node");
            assert_eq!(
                other,
                reference,
                "node {id} differs from node 1 in {conv}: {}",
                common::first_difference(&reference, &other)
            );
        }
        by_conv.insert(conv, reference);
    }

    // The global order interleaves both conversations without a shared index.
    let mut all_indexes: Vec<u64> = by_conv
        .values()
        .flatten()
        .map(|r| u64_of(r, "index"))
        .collect();
    all_indexes.sort_unstable();
    let unique: HashSet<u64> = all_indexes.iter().copied().collect();
    assert_eq!(
        unique.len(),
        all_indexes.len(),
        "two records share a Raft index"
    );

    // Every acknowledged record is stored as acknowledged, and each writer's messages (sent
    // one after the other) are ordered as sent.
    let stored: BTreeMap<&str, &Value> = by_conv
        .values()
        .flatten()
        .map(|r| (str_of(r, "msg_id"), r))
        .collect();
    assert_eq!(
        stored.len(),
        WRITERS * PER_WRITER,
        "msg_ids are unique and complete"
    );
    for (w, recs) in acked.iter().enumerate() {
        let mut last_index = 0;
        for rec in recs {
            let s = stored
                .get(str_of(rec, "msg_id"))
                .unwrap_or_else(|| panic!("acknowledged record missing: {rec}"));
            assert_eq!(*s, rec, "stored record differs from the acknowledgement");
            let index = u64_of(rec, "index");
            assert!(
                index > last_index,
                "writer {w}: a later message got an earlier index: {rec}"
            );
            last_index = index;
        }
    }
}

/// The same msg_id sent to all three nodes at once is stored once; reusing it with other
/// content is refused and stores nothing.
#[tokio::test(flavor = "multi_thread")]
async fn duplicate_msg_id_is_stored_once_and_conflicts_are_refused() {
    let c = Cluster::start(Options::nodes(3)).await;
    let msg_id = new_msg_id();
    // Keys deliberately not in sorted order: the clock must come back as sent.
    let body = br#"{"conv_id":"dedup","sender":"u1","payload":"only once","msg_id":"MSGID","vector_clock":{"u3":3,"u1":1,"u2":2}}"#;
    let body = String::from_utf8_lossy(body)
        .replace("MSGID", &msg_id)
        .into_bytes();

    let post = |id: u64| {
        let (http, addr, body) = (c.http.clone(), c.api(id).to_owned(), body.clone());
        async move {
            http.post_raw(&addr, "/api/v1/message", "application/json", body)
                .await
        }
    };
    let (r1, r2, r3) = tokio::join!(post(1), post(2), post(3));
    let answers: Vec<_> = [r1, r2, r3]
        .into_iter()
        .map(|r| r.expect("an answer"))
        .collect();
    let mut codes: Vec<u16> = answers.iter().map(|r| r.code()).collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        vec![200, 200, 201],
        "one 201 (new) and two 200 (same msg_id, same content); bodies: {:?}",
        answers.iter().map(|r| r.text()).collect::<Vec<_>>()
    );
    let first = answers[0].json();
    assert_record_shape(&first);
    assert_eq!(u64_of(&first, "seq"), 1);
    for r in &answers {
        assert_eq!(r.json(), first, "every answer carries the one record");
        assert_eq!(
            vector_clock_key_order(&r.body),
            Some(vec!["u3".to_owned(), "u1".to_owned(), "u2".to_owned()]),
            "vector_clock key order as sent: {}",
            r.text()
        );
    }

    // The same again, later, on each node: 200 and the original record.
    for id in c.ids() {
        let r = post(id).await.expect("an answer");
        assert_eq!(r.code(), 200, "node {id}: {}", r.text());
        assert_eq!(r.json(), first);
    }

    // Same msg_id, other content: 409 on every node.
    let others = [
        json!({"conv_id": "dedup", "sender": "u1", "payload": "other payload", "msg_id": msg_id}),
        json!({"conv_id": "dedup", "sender": "u9", "payload": "only once", "msg_id": msg_id}),
        json!({"conv_id": "elsewhere", "sender": "u1", "payload": "only once", "msg_id": msg_id}),
    ];
    for id in c.ids() {
        for other in &others {
            let r = c.post(id, other).await.expect("an answer");
            assert_eq!(r.code(), 409, "node {id}, {other}: {}", r.text());
            assert_eq!(
                r.error_code().as_deref(),
                Some("msg_id_conflict"),
                "{}",
                r.text()
            );
        }
    }

    for id in c.ids() {
        let got = c.messages(id, "dedup").await.expect("reading");
        assert_eq!(
            got,
            vec![first.clone()],
            "node {id} holds exactly the one record"
        );
        assert!(
            c.messages(id, "elsewhere")
                .await
                .expect("reading")
                .is_empty(),
            "node {id}"
        );
    }
}

/// POST /join for a member already in the cluster: same addresses is a 200 no-op, other
/// addresses is 409 node_conflict; membership is unchanged either way.
#[tokio::test(flavor = "multi_thread")]
async fn join_is_idempotent_and_refuses_a_changed_address() {
    let c = Cluster::start(Options::nodes(2)).await;
    let before = c.status(1).await.expect("status");
    let member2 = json!({"node_id": 2, "raft_addr": c.node(2).raft(), "api_addr": c.api(2)});

    for via in c.ids() {
        let r = c
            .http
            .post_json(c.api(via), "/join", &member2)
            .await
            .expect("an answer");
        assert_eq!(
            r.code(),
            200,
            "same id and addresses via node {via}: {}",
            r.text()
        );
        let s = r.json();
        assert!(
            s["members"].is_array() && s["node_id"].is_u64(),
            "a status object: {s}"
        );
        assert_eq!(s["members"], before["members"], "membership unchanged");
    }

    let moved = [
        json!({"node_id": 2, "raft_addr": common::free_addr(), "api_addr": c.api(2)}),
        json!({"node_id": 2, "raft_addr": c.node(2).raft(), "api_addr": common::free_addr()}),
    ];
    for via in c.ids() {
        for m in &moved {
            let r = c
                .http
                .post_json(c.api(via), "/join", m)
                .await
                .expect("an answer");
            assert_eq!(r.code(), 409, "{m} via node {via}: {}", r.text());
            assert_eq!(
                r.error_code().as_deref(),
                Some("node_conflict"),
                "{}",
                r.text()
            );
        }
    }

    for id in c.ids() {
        let s = c.status(id).await.expect("status");
        assert_eq!(
            s["members"], before["members"],
            "node {id}: membership unchanged"
        );
    }
}

/// POST /join for a new id whose addresses are an existing member's (or the answering node's
/// own) under another spelling is 409; an address that does not resolve, or is unspecified,
/// is 400. Membership is unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn join_refuses_addresses_that_lead_to_a_member_however_spelt() {
    let c = Cluster::start(Options::nodes(2)).await;
    let before = c.status(1).await.expect("status");
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_string();
    let fresh = common::free_addr();
    let cases = [
        // Node 1's Raft listener, by name.
        (
            json!({"node_id": 3, "raft_addr": format!("localhost:{}", port(c.node(1).raft())), "api_addr": fresh}),
            409,
        ),
        // Node 2's API, as an IPv4-mapped IPv6 address.
        (
            json!({"node_id": 3, "raft_addr": common::free_addr(), "api_addr": format!("[::ffff:127.0.0.1]:{}", port(c.api(2)))}),
            409,
        ),
        // Node 1's API, spelt with its IP in another form.
        (
            json!({"node_id": 3, "raft_addr": common::free_addr(), "api_addr": format!("127.0.0.01:{}", port(c.api(1)))}),
            409,
        ),
        (
            json!({"node_id": 3, "raft_addr": "0.0.0.0:4000", "api_addr": common::free_addr()}),
            400,
        ),
        (
            json!({"node_id": 3, "raft_addr": "no-such-host.invalid:4000", "api_addr": common::free_addr()}),
            400,
        ),
    ];
    for via in c.ids() {
        for (body, code) in &cases {
            let r = c
                .http
                .post_json(c.api(via), "/join", body)
                .await
                .expect("an answer");
            assert_eq!(r.code(), *code, "{body} via node {via}: {}", r.text());
            let expected = if *code == 409 {
                "node_conflict"
            } else {
                "invalid_field"
            };
            assert_eq!(r.error_code().as_deref(), Some(expected), "{}", r.text());
        }
    }
    for id in c.ids() {
        let s = c.status(id).await.expect("status");
        assert_eq!(
            s["members"], before["members"],
            "node {id}: membership unchanged"
        );
    }
}

/// A linearizable read on a follower sees every write acknowledged before it began, even one
/// the follower has not applied yet; the conversation list agrees with the history.
#[tokio::test(flavor = "multi_thread")]
async fn linearizable_reads_on_followers_see_every_acknowledged_write() {
    let c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    let followers = c.others(leader);
    let mut stale_local_reads = 0;
    for i in 1..=20u64 {
        let msg = json!({"conv_id": "lin", "sender": "w", "payload": format!("p{i}")});
        let r = c.post(leader, &msg).await.expect("write to the leader");
        assert_eq!(r.code(), 201, "{}", r.text());
        let follower = followers[(i % 2) as usize];
        let local = c
            .http
            .get(
                c.api(follower),
                "/api/v1/messages?conv_id=lin&from=1&limit=1000",
            )
            .await
            .expect("local read");
        if local.json()["last_seq"].as_u64() < Some(i) {
            stale_local_reads += 1;
        }
        let lin = c
            .http
            .get(
                c.api(follower),
                "/api/v1/messages?conv_id=lin&from=1&limit=1000&consistency=linearizable",
            )
            .await
            .expect("linearizable read");
        assert_eq!(lin.code(), 200, "{}", lin.text());
        let page = lin.json();
        let records = page["messages"].as_array().expect("messages");
        assert_eq!(
            records.len() as u64,
            i,
            "linearizable read on node {follower} missed an acknowledged write"
        );
        assert_eq!(u64_of(records.last().expect("a record"), "seq"), i);
        assert_eq!(page["next_from"].as_u64(), Some(i + 1));
    }
    eprintln!("local follower reads that lagged the leader: {stale_local_reads} of 20");

    for id in c.ids() {
        let r = c
            .http
            .get(c.api(id), "/api/v1/conversations")
            .await
            .expect("conversations");
        let convs = r.json()["conversations"].clone();
        let lin = convs
            .as_array()
            .expect("a list")
            .iter()
            .find(|cv| cv["conv_id"] == "lin")
            .cloned();
        let lin = match lin {
            Some(v) => v,
            None => {
                wait_until("node to list conv lin", Duration::from_secs(5), || async {
                    let r = c.http.get(c.api(id), "/api/v1/conversations").await?;
                    r.json()["conversations"]
                        .as_array()
                        .and_then(|a| a.iter().find(|cv| cv["conv_id"] == "lin").cloned())
                        .ok_or_else(|| "conv lin missing".to_string())
                })
                .await
            }
        };
        assert_eq!(lin["count"].as_u64(), Some(20), "node {id}: {lin}");
        assert_eq!(lin["last_seq"].as_u64(), Some(20), "node {id}: {lin}");
    }
}

/// Sends `n` messages to `conv` with `writers` concurrent writers spread over `apis`, each
/// retried with its `msg_id` until acknowledged (a node may answer 503 around an election).
async fn write_concurrently(
    http: common::Http,
    apis: Vec<String>,
    conv: &'static str,
    tag: &'static str,
    n: usize,
    writers: usize,
) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, apis) = (http.clone(), apis.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(writers) {
                let msg = json!({"conv_id": conv, "sender": format!("w{w}"),
                    "payload": format!("{tag}-{i}"), "msg_id": new_msg_id()});
                wait_until(
                    &format!("{tag} {i} to be acknowledged"),
                    Duration::from_secs(20),
                    || async {
                        let addr = &apis[(w + i) % apis.len()];
                        let r = common::post_message(&http, addr, &msg).await?;
                        if r.is_success() {
                            Ok(())
                        } else {
                            Err(format!("{addr}: {} {}", r.status, r.text()))
                        }
                    },
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a writer panicked");
    }
}

/// Reads `n` events and checks them against the stored records: ids `first..first + n`,
/// each event the stored record, and nothing more within a short wait.
async fn expect_records(stream: &mut SseStream, first: u64, records: &[Value], what: &str) {
    let n = records.len() - (first as usize - 1);
    let events = stream.expect(n, Duration::from_secs(60)).await;
    let ids: Vec<u64> = events.iter().map(|e| e.id_u64()).collect();
    let want: Vec<u64> = (first..first + n as u64).collect();
    assert_eq!(ids, want, "{what}: a gap-free, duplicate-free seq run");
    for (ev, rec) in events.iter().zip(&records[first as usize - 1..]) {
        assert_eq!(ev.event.as_deref(), Some("message"), "{what}");
        assert_eq!(
            &ev.json(),
            rec,
            "{what}: the event differs from the stored record"
        );
    }
    let (extra, _) = stream
        .take(1, tokio::time::Instant::now() + Duration::from_millis(300))
        .await;
    assert!(
        extra.is_empty(),
        "{what}: an event beyond the history: {extra:?}"
    );
}

/// Subscribers that start in the history while writes go on pass from the store to the live
/// window without a gap or a duplicate, on every node, as do live-only subscribers.
#[tokio::test(flavor = "multi_thread")]
async fn streams_join_history_and_live_tail_while_writes_go_on() {
    const CONV: &str = "switch";
    let c = Cluster::start(Options::nodes(3)).await;
    write_concurrently(c.http.clone(), c.apis(), CONV, "history", 200, 4).await;
    let mut from_start = Vec::new();
    for id in c.ids() {
        let path = format!("/api/v1/stream?conv_id={CONV}&from=1");
        let s = SseStream::open(&c.http, c.api(id), &path, None)
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e}"));
        from_start.push((id, s));
    }
    let live_path = format!("/api/v1/stream?conv_id={CONV}");
    let mut live = SseStream::open(&c.http, c.api(1), &live_path, None)
        .await
        .expect("a live-only stream");
    let writing = tokio::spawn(write_concurrently(
        c.http.clone(),
        c.apis(),
        CONV,
        "live",
        300,
        6,
    ));
    // More subscribers arrive mid-way, resuming inside the history.
    let resume_path = format!("/api/v1/stream?conv_id={CONV}&from=1");
    let mut resumed = SseStream::open(&c.http, c.api(2), &resume_path, Some("150"))
        .await
        .expect("a resumed stream");
    writing.await.expect("the writers panicked");
    let records = c
        .wait_same_messages(&c.ids(), CONV, 500, Duration::from_secs(20))
        .await;
    assert_eq!(records.len(), 500);
    for (id, s) in &mut from_start {
        expect_records(s, 1, &records, &format!("node {id} from seq 1")).await;
    }
    expect_records(&mut resumed, 151, &records, "resumed after seq 150").await;
    // The live-only stream starts at the first message after it opened: a suffix.
    let events = live.expect(300, Duration::from_secs(30)).await;
    let first = events[0].id_u64();
    assert!(
        first <= 201,
        "the live stream skipped new messages: starts at {first}"
    );
    let rest = 500 - (first as usize - 1) - 300;
    let mut all = events;
    all.extend(live.expect(rest, Duration::from_secs(30)).await);
    let ids: Vec<u64> = all.iter().map(|e| e.id_u64()).collect();
    assert_eq!(ids, (first..=500).collect::<Vec<u64>>());
}

/// A subscriber that resumes further back than the live window holds reads the missing part
/// from the store, then goes on from the window; and both go on with new messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_resumes_from_the_store_after_the_live_window_moved_on() {
    const CONV: &str = "window";
    // More than the live window keeps (4096 events).
    const N: usize = 4_400;
    let c = Cluster::start(Options::nodes(3)).await;
    // A subscriber watching from the start keeps the conversation's window filled.
    let path = format!("/api/v1/stream?conv_id={CONV}");
    let mut watcher = SseStream::open(&c.http, c.api(1), &path, None)
        .await
        .expect("the watching stream");
    write_concurrently(c.http.clone(), c.apis(), CONV, "m", N, 16).await;
    let records = c
        .wait_same_messages(&c.ids(), CONV, N, Duration::from_secs(30))
        .await;
    expect_records(&mut watcher, 1, &records, "the watcher").await;

    let mut resumed = SseStream::open(&c.http, c.api(1), &path, Some("10"))
        .await
        .expect("the resumed stream");
    expect_records(&mut resumed, 11, &records, "resumed from seq 10").await;

    write_concurrently(c.http.clone(), c.apis(), CONV, "after", 20, 2).await;
    let records = c
        .wait_same_messages(&c.ids(), CONV, N + 20, Duration::from_secs(10))
        .await;
    for (s, what) in [
        (&mut watcher, "the watcher"),
        (&mut resumed, "the resumed stream"),
    ] {
        let events = s.expect(20, Duration::from_secs(10)).await;
        let ids: Vec<u64> = events.iter().map(|e| e.id_u64()).collect();
        assert_eq!(
            ids,
            (N as u64 + 1..=N as u64 + 20).collect::<Vec<u64>>(),
            "{what}"
        );
        for (ev, rec) in events.iter().zip(&records[N..]) {
            assert_eq!(&ev.json(), rec, "{what}");
        }
    }
}

/// Sends a signal to a node's process.
fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
    nix::sys::signal::kill(pid, sig).expect("signalling a node");
}

/// A follower that fell behind the leader's purged log installs a snapshot while a subscriber
/// is connected to it: the stream goes on after the install with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_goes_on_across_a_snapshot_install_on_its_node() {
    const CONV: &str = "snapstream";
    let c = Cluster::start(Options {
        snapshot_threshold: 50,
        keep_logs_after_snapshot: 5,
        ..Options::nodes(3)
    })
    .await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];
    let path = format!("/api/v1/stream?conv_id={CONV}&from=1");
    let mut stream = SseStream::open(&c.http, c.api(follower), &path, None)
        .await
        .expect("opening the stream");
    write_concurrently(
        c.http.clone(),
        vec![c.api(leader).to_owned()],
        CONV,
        "before",
        20,
        2,
    )
    .await;
    let events = stream.expect(20, Duration::from_secs(10)).await;
    assert_eq!(events.last().map(|e| e.id_u64()), Some(20));
    let follower_log = c.status(follower).await.expect("status")["last_log_index"]
        .as_u64()
        .expect("last_log_index");

    // Freeze the follower (its connections stay open) while the others move on far enough
    // that the leader purges the log the follower still needs.
    let pid = c.node(follower).pid().expect("the follower runs");
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let majority: Vec<String> = c
        .others(follower)
        .iter()
        .map(|&id| c.api(id).to_owned())
        .collect();
    write_concurrently(c.http.clone(), majority, CONV, "while-frozen", 200, 4).await;
    wait_until(
        "the leader to purge the log behind a snapshot",
        Duration::from_secs(20),
        || async {
            let s = c.status(leader).await?;
            match s["purged_index"].as_u64() {
                Some(p) if p > follower_log + 1 => Ok(()),
                other => Err(format!(
                    "purged_index {other:?}, follower at {follower_log}"
                )),
            }
        },
    )
    .await;
    signal(pid, nix::sys::signal::Signal::SIGCONT);

    let records = c
        .wait_same_messages(&c.ids(), CONV, 220, Duration::from_secs(30))
        .await;
    let installs = wait_until(
        "the follower to install a snapshot",
        Duration::from_secs(10),
        || async {
            let r = c.http.get(c.api(follower), "/metrics").await?;
            let n = r
                .text()
                .lines()
                .find_map(|l| l.strip_prefix("chatraftd_snapshot_install_duration_seconds_count "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if n >= 1.0 {
                Ok(n)
            } else {
                Err("no snapshot install yet".to_string())
            }
        },
    )
    .await;
    eprintln!("snapshot installs on node {follower}: {installs}");
    expect_records(&mut stream, 21, &records, "across the install").await;

    // Applying by log goes on after the install, and so does the stream.
    write_concurrently(
        c.http.clone(),
        vec![c.api(follower).to_owned()],
        CONV,
        "after",
        10,
        1,
    )
    .await;
    let records = c
        .wait_same_messages(&c.ids(), CONV, 230, Duration::from_secs(10))
        .await;
    expect_records(&mut stream, 221, &records, "after the install").await;
}

/// Stopping a node ends its open streams cleanly (the body ends, no reset), both a caught-up
/// one and one still reading history, and the node exits 0 without waiting for them.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_a_node_ends_its_streams() {
    const CONV: &str = "stopping";
    let mut c = Cluster::start(Options::nodes(3)).await;
    write_concurrently(c.http.clone(), c.apis(), CONV, "m", 50, 4).await;
    c.wait_same_messages(&c.ids(), CONV, 50, Duration::from_secs(10))
        .await;
    let path = format!("/api/v1/stream?conv_id={CONV}&from=1");
    let mut caught_up = SseStream::open(&c.http, c.api(3), &path, None)
        .await
        .expect("a stream");
    caught_up.expect(50, Duration::from_secs(10)).await;
    // This one reads nothing, so it stays behind with the history unread.
    let mut unread = SseStream::open(&c.http, c.api(3), &path, None)
        .await
        .expect("a stream");
    let status = c.terminate(3, Duration::from_secs(15)).await;
    assert!(status.success(), "node 3 exited with {status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    match caught_up.next_event(deadline).await {
        Err(common::sse::SseEnd::Closed) => {}
        other => panic!("the caught-up stream did not end cleanly: {other:?}"),
    }
    let (events, end) = unread.take(51, deadline).await;
    assert!(events.len() <= 50, "{events:?}");
    assert_eq!(end, Some(common::sse::SseEnd::Closed));
}

/// Writes a follower takes at the same moment go to the leader together; each still gets
/// its own answer: new ones 201, a repeat of one of them 200 or 201 (whichever came first),
/// another content under a taken msg_id 409, and a bad one its own 400, while the others in
/// the same request are stored. Every node then holds each stored message once, in one order.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_through_a_follower_each_get_their_own_answer() {
    let c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];

    let pair_ids: Vec<String> = (0..20).map(|_| new_msg_id()).collect();
    let mut bodies = Vec::new();
    for i in 0..200 {
        bodies.push((
            "new",
            json!({"conv_id": "herd", "sender": "h", "payload": format!("new-{i}")}),
        ));
    }
    for (i, id) in pair_ids.iter().enumerate() {
        let same =
            json!({"conv_id": "herd", "sender": "h", "payload": format!("pair-{i}"), "msg_id": id});
        bodies.push(("same", same.clone()));
        bodies.push(("same", same));
    }
    let clash_ids: Vec<String> = (0..10).map(|_| new_msg_id()).collect();
    for (i, id) in clash_ids.iter().enumerate() {
        for side in ["a", "b"] {
            bodies.push((
                "clash",
                json!({"conv_id": "herd", "sender": "h", "payload": format!("clash-{i}-{side}"), "msg_id": id}),
            ));
        }
    }
    bodies.push((
        "bad",
        json!({"conv_id": "herd", "sender": "", "payload": "no sender"}),
    ));

    let c = &c;
    let answers = futures_util::future::join_all(bodies.iter().map(|(kind, body)| async move {
        let r = c.post(follower, body).await.expect("an answer");
        (*kind, body, r)
    }))
    .await;

    let mut codes: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for (kind, body, r) in &answers {
        codes.entry(kind).or_default().push(r.code());
        match (*kind, r.code()) {
            ("new", 201) | ("same", 200 | 201) | ("clash", 201) => {
                assert_eq!(r.json()["payload"], body["payload"], "{}", r.text());
            }
            ("clash", 409) => assert_eq!(r.error_code().as_deref(), Some("msg_id_conflict")),
            ("bad", 400) => assert_eq!(r.error_code().as_deref(), Some("invalid_field")),
            (kind, code) => panic!("a {kind} write answered {code}: {}", r.text()),
        }
    }
    let count = |kind: &str, code: u16| codes[kind].iter().filter(|c| **c == code).count();
    assert_eq!(count("new", 201), 200);
    assert_eq!(count("same", 201), 20, "{codes:?}");
    assert_eq!(count("same", 200), 20, "{codes:?}");
    assert_eq!(count("clash", 201), 10, "{codes:?}");
    assert_eq!(count("clash", 409), 10, "{codes:?}");

    // 200 + 20 + 10 stored, once each, the same on every node.
    let ids = c.ids();
    let stored = c
        .wait_same_messages(&ids, "herd", 230, Duration::from_secs(10))
        .await;
    assert_eq!(stored.len(), 230);
    assert_dense(&stored);
    let msg_ids: HashSet<&str> = stored.iter().map(|r| str_of(r, "msg_id")).collect();
    assert_eq!(msg_ids.len(), 230, "a msg_id stored twice");
}
