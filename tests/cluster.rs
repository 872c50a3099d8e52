//! A healthy cluster: total order on every node, the same records through GET and SSE,
//! idempotent writes, and idempotent joins.

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
