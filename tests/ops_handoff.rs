//! A leader stopped with SIGTERM hands leadership over: writes resume on the other nodes
//! sooner than an election timeout allows, and every acknowledged message is kept.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{new_msg_id, post_message, str_of, u64_of, Cluster, Options};
use serde_json::json;
use tokio::time::Instant;

const CONV: &str = "handoff";

/// What the writers saw: acknowledged msg_ids, and the first acknowledgement (time, term) in a
/// term above `old_term` once that is set.
#[derive(Default)]
struct Seen {
    acked: BTreeSet<String>,
    first_new_term_ack: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_on_the_leader_hands_leadership_over_without_an_election_gap() {
    // Long timeouts, so that a plain failover (leader lease + election timeout, at least
    // 1.5 s + 1 s here) and a hand-off (a few round trips) cannot be mistaken for each other.
    let opts = Options {
        nodes: 3,
        heartbeat_ms: 100,
        election_min_ms: 1000,
        election_max_ms: 1500,
        write_timeout_ms: 5000,
        ..Options::default()
    };
    let election_min = Duration::from_millis(opts.election_min_ms);
    let mut c = Cluster::start(opts).await;
    let leader = c.leader().await;
    let old_term = u64_of(&c.status(leader).await.expect("status"), "term");
    let others = c.others(leader);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut writers = Vec::new();
    for (w, id) in others.iter().enumerate() {
        let http = c.http.clone();
        let addr = c.api(*id).to_owned();
        let stop = stop.clone();
        let seen = seen.clone();
        writers.push(tokio::spawn(async move {
            // Bounded: at most 5000 writes per writer, and the test stops them sooner.
            for i in 0..5000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let msg_id = new_msg_id();
                let body = json!({"conv_id": CONV, "sender": format!("w{w}"), "payload": format!("{w}-{i}"), "msg_id": msg_id});
                match post_message(&http, &addr, &body).await {
                    Ok(r) if r.code() == 201 => {
                        let rec = r.json();
                        let mut s = seen.lock().unwrap();
                        s.acked.insert(str_of(&rec, "msg_id").to_owned());
                        if u64_of(&rec, "term") > old_term && s.first_new_term_ack.is_none() {
                            s.first_new_term_ack = Some(Instant::now());
                        }
                    }
                    // Unavailable or unreachable during the change: the writer goes on with a
                    // new message; only acknowledged ones are checked.
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }

    // Let the writers get going before the stop.
    common::wait_until(
        "some writes before the stop",
        Duration::from_secs(20),
        || {
            let n = seen.lock().unwrap().acked.len();
            async move {
                if n >= 30 {
                    Ok(())
                } else {
                    Err(format!("{n} acknowledged"))
                }
            }
        },
    )
    .await;

    let stopped_at = Instant::now();
    let status = c.terminate(leader, Duration::from_secs(20)).await;
    assert!(status.success(), "the leader's exit: {status:?}");

    let resumed_at = common::wait_until(
        "a write acknowledged in a newer term",
        Duration::from_secs(20),
        || {
            let t = seen.lock().unwrap().first_new_term_ack;
            async move { t.ok_or_else(|| "none yet".to_string()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer task");
    }
    let gap = resumed_at.saturating_duration_since(stopped_at);
    eprintln!("writes resumed {gap:?} after SIGTERM to the leader");
    assert!(
        gap < election_min,
        "writes resumed {gap:?} after the stop; a hand-off must beat election_timeout_min ({election_min:?})"
    );
    let log = c.node(leader).log();
    assert!(log.contains("handed leadership over"), "{log}");

    // Every acknowledged message is on both remaining nodes, in one order.
    let acked = seen.lock().unwrap().acked.clone();
    let records = c
        .wait_same_messages(&others, CONV, acked.len(), Duration::from_secs(20))
        .await;
    let stored: BTreeSet<String> = records
        .iter()
        .map(|r| str_of(r, "msg_id").to_owned())
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    common::assert_dense(&records);
}

/// With five voters the others refuse votes while their lease from the stopping leader lasts,
/// so the hand-off needs several election rounds, each in a new term. The leader paces its
/// requests instead of setting off rounds back to back (which ran to thousands of terms in a
/// few seconds), and a new leader takes over all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_hand_off_among_five_voters_paces_its_election_rounds() {
    let opts = Options {
        nodes: 5,
        heartbeat_ms: 100,
        election_min_ms: 1000,
        election_max_ms: 1500,
        ..Options::default()
    };
    // Lease (1.5 s) over pace (100 ms), plus the two unpaced first asks, plus slack for
    // rounds the candidate's own timer may add.
    const MAX_TERMS: u64 = 40;
    let mut c = Cluster::start(opts).await;
    let leader = c.leader().await;
    let old_term = u64_of(&c.status(leader).await.expect("status"), "term");
    let others = c.others(leader);

    let status = c.terminate(leader, Duration::from_secs(20)).await;
    assert!(status.success(), "the leader's exit: {status:?}");
    let log = c.node(leader).log();
    assert!(log.contains("handed leadership over"), "{log}");

    let (new_leader, term) = common::wait_until(
        "a new leader among the other four",
        Duration::from_secs(20),
        || async {
            for &id in &others {
                let s = c.status(id).await?;
                if str_of(&s, "role") == "leader" {
                    return Ok((id, u64_of(&s, "term")));
                }
            }
            Err("no leader yet".to_string())
        },
    )
    .await;
    eprintln!("node {new_leader} leads in term {term}, the old leader's was {old_term}");
    assert!(
        term <= old_term + MAX_TERMS,
        "the hand-off went from term {old_term} to {term}: election rounds back to back"
    );
    let body = json!({"conv_id": CONV, "sender": "after", "payload": "after the hand-off", "msg_id": new_msg_id()});
    let r = post_message(&c.http, c.api(others[0]), &body)
        .await
        .expect("a write after the hand-off");
    assert_eq!(r.code(), 201, "{}", r.text());
}
