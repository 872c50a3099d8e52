//! `GET /metrics`: values after real traffic, and a well-formed Prometheus text exposition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::sse::SseStream;
use common::{wait_until, Cluster, Options};
use serde_json::json;

/// One parsed sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the text format strictly enough to catch mistakes: every sample belongs to a family
/// whose `# HELP` and `# TYPE` came first, label values are quoted and unescaped, and values
/// parse as floats.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut helped = BTreeSet::new();
    let mut typed = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !helped.insert(name.to_string()) {
                return Err(format!("HELP twice for {name}"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap_or_default().to_string();
            let kind = parts.next().unwrap_or_default().to_string();
            if !["gauge", "counter", "histogram"].contains(&kind.as_str()) {
                return Err(format!("bad TYPE line {line:?}"));
            }
            if !helped.contains(&name) || typed.insert(name.clone(), kind).is_some() {
                return Err(format!("TYPE of {name} without HELP first, or twice"));
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            return Err(format!("unexpected line {line:?}"));
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels in {line:?}"))?;
                (name.to_string(), parse_labels(body)?)
            }
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&name);
        if !typed.contains_key(family) {
            return Err(format!("sample {name} before its TYPE line"));
        }
        samples.push((name, labels, value));
    }
    Ok(samples)
}

fn parse_labels(body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return Err(format!("label {key} is not quoted in {body:?}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in {body:?}")),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated label in {body:?}")),
            }
        }
        out.insert(key, value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Ok(out)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

async fn scrape(c: &Cluster, id: u64) -> Vec<Sample> {
    let r = c
        .http
        .get(c.api(id), "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(r.code(), 200, "{}", r.text());
    let ctype = r.header("content-type").unwrap_or_default().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = r.text();
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_report_raft_state_traffic_and_storage() {
    // Snapshots after a few entries, and a short log behind them, so that a late node is
    // brought up by a snapshot install.
    let opts = Options {
        snapshot_threshold: 3,
        keep_logs_after_snapshot: 1,
        ..Options::nodes(3)
    };
    let mut c = Cluster::start(opts).await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];

    // Payload bytes are counted in UTF-8: "é" is two bytes, "→" three.
    let payloads = ["hello", "é→", ""];
    for (i, p) in payloads.iter().enumerate() {
        let via = if i % 2 == 0 { leader } else { follower };
        let r = c
            .post(
                via,
                &json!({"conv_id": "ops.a", "sender": "s", "payload": p}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201, "{}", r.text());
    }
    let r = c
        .post(
            leader,
            &json!({"conv_id": "ops-b", "sender": "s", "payload": "xyz"}),
        )
        .await
        .expect("post");
    assert_eq!(r.code(), 201, "{}", r.text());
    let expected_a_bytes = payloads.iter().map(|p| p.len()).sum::<usize>() as f64;
    assert_eq!(expected_a_bytes, 10.0);

    // Two rejections the leader answers itself.
    for _ in 0..2 {
        let r = c
            .http
            .post_raw(c.api(leader), "/api/v1/message", "application/json", "{")
            .await
            .expect("post");
        assert_eq!(r.code(), 400);
    }
    let r = c
        .http
        .get(c.api(leader), "/no/such/path")
        .await
        .expect("get");
    assert_eq!(r.code(), 404);

    let stream = SseStream::open(&c.http, c.api(leader), "/api/v1/stream?conv_id=ops.a", None)
        .await
        .expect("open stream");

    let s = scrape(&c, leader).await;
    assert_eq!(
        value(&s, "chatraftd_raft_role", &[("role", "leader")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "chatraftd_raft_role", &[("role", "follower")]),
        Some(0.0)
    );
    let term = value(&s, "chatraftd_raft_term", &[]).expect("term");
    assert!(term >= 1.0);
    let status = c.status(leader).await.expect("status");
    assert_eq!(term, status["term"].as_u64().unwrap() as f64);
    let last_log = value(&s, "chatraftd_raft_last_log_index", &[]).expect("last log");
    let applied = value(&s, "chatraftd_raft_applied_index", &[]).expect("applied");
    let commit = value(&s, "chatraftd_raft_commit_index", &[]).expect("commit");
    assert!(
        applied >= 4.0 && commit >= applied && last_log >= commit,
        "{s:?}"
    );
    assert_eq!(
        value(&s, "chatraftd_raft_leader_id", &[]),
        Some(leader as f64)
    );
    // One lag series per peer on the leader; none on a follower.
    for peer in c.others(leader) {
        let lag = value(
            &s,
            "chatraftd_raft_replication_lag_entries",
            &[("peer", &peer.to_string())],
        )
        .unwrap_or_else(|| panic!("no lag for peer {peer}"));
        assert!(lag >= 0.0 && lag <= last_log);
    }
    assert_eq!(
        value(
            &s,
            "chatraftd_conversation_messages",
            &[("conv_id", "ops.a")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "chatraftd_conversation_messages",
            &[("conv_id", "ops-b")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "chatraftd_conversation_payload_bytes",
            &[("conv_id", "ops.a")]
        ),
        Some(expected_a_bytes)
    );
    assert_eq!(
        value(
            &s,
            "chatraftd_conversation_payload_bytes",
            &[("conv_id", "ops-b")]
        ),
        Some(3.0)
    );
    // The leader answered the three writes sent to it, and the forwarded one.
    let writes = value(&s, "chatraftd_write_duration_seconds_count", &[]).expect("count");
    assert_eq!(writes, 4.0);
    let inf = value(
        &s,
        "chatraftd_write_duration_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(inf, Some(writes));
    let mut last = 0.0;
    for (name, labels, v) in &s {
        if name == "chatraftd_write_duration_seconds_bucket" {
            assert!(*v >= last, "buckets are cumulative: {labels:?}");
            last = *v;
        }
    }
    assert_eq!(
        value(
            &s,
            "chatraftd_rejected_requests_total",
            &[("code", "invalid_json")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "chatraftd_rejected_requests_total",
            &[("code", "not_found")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&s, "chatraftd_sse_subscribers", &[]), Some(1.0));
    assert!(value(&s, "chatraftd_storage_bytes", &[("file", "messages.db")]).unwrap() > 0.0);
    assert!(value(&s, "chatraftd_storage_bytes", &[("file", "raft-log.db")]).unwrap() > 0.0);
    assert!(value(&s, "chatraftd_storage_bytes", &[("file", "snapshots")]).is_some());

    // The follower: a follower role, no lag series, the same per-conversation totals once
    // it applied everything.
    let s = scrape(&c, follower).await;
    assert_eq!(
        value(&s, "chatraftd_raft_role", &[("role", "follower")]),
        Some(1.0)
    );
    assert!(!s
        .iter()
        .any(|(n, _, _)| n == "chatraftd_raft_replication_lag_entries"));
    let addr = c.api(follower).to_owned();
    let http = c.http.clone();
    wait_until(
        "the follower to count every payload byte",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let addr = addr.clone();
            async move {
                let r = http.get(&addr, "/metrics").await?;
                let s = parse(&r.text())?;
                let got = value(
                    &s,
                    "chatraftd_conversation_payload_bytes",
                    &[("conv_id", "ops.a")],
                );
                if got == Some(expected_a_bytes) {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;

    // Closing the stream takes the subscriber gauge back down.
    drop(stream);
    let addr = c.api(leader).to_owned();
    wait_until(
        "a snapshot build on the leader",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            let addr = addr.clone();
            async move {
                let r = http.get(&addr, "/metrics").await?;
                let s = parse(&r.text())?;
                let built = value(&s, "chatraftd_snapshot_build_duration_seconds_count", &[]);
                let size = value(&s, "chatraftd_storage_bytes", &[("file", "snapshots")]);
                match (built, size) {
                    (Some(b), Some(n)) if b >= 1.0 && n > 0.0 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    wait_until(
        "the SSE gauge to drop to 0",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let addr = addr.clone();
            async move {
                let r = http.get(&addr, "/metrics").await?;
                let s = parse(&r.text())?;
                match value(&s, "chatraftd_sse_subscribers", &[]) {
                    Some(0.0) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    // A late node receives the state as a snapshot: the install is timed, and its byte totals
    // are recomputed from what it installed.
    let late = c.add_node().await;
    let addr = c.api(late).to_owned();
    wait_until(
        "the late node's install and totals",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            let addr = addr.clone();
            async move {
                let r = http.get(&addr, "/metrics").await?;
                let s = parse(&r.text())?;
                let installs = value(&s, "chatraftd_snapshot_install_duration_seconds_count", &[]);
                let a = value(
                    &s,
                    "chatraftd_conversation_payload_bytes",
                    &[("conv_id", "ops.a")],
                );
                let b = value(
                    &s,
                    "chatraftd_conversation_payload_bytes",
                    &[("conv_id", "ops-b")],
                );
                if installs >= Some(1.0) && a == Some(expected_a_bytes) && b == Some(3.0) {
                    Ok(())
                } else {
                    Err(format!("installs {installs:?}, bytes {a:?} {b:?}"))
                }
            }
        },
    )
    .await;
}

#[test]
fn the_parser_catches_format_mistakes() {
    assert!(parse("# HELP a x\n# TYPE a gauge\na 1\n").is_ok());
    assert!(parse("a 1\n").is_err(), "a sample without TYPE");
    assert!(parse("# TYPE a gauge\na 1\n").is_err(), "TYPE without HELP");
    assert!(parse("# HELP a x\n# TYPE a gauge\na{l=\"x} 1\n").is_err());
    let s = parse("# HELP a x\n# TYPE a gauge\na{l=\"q\\\"\\\\\\n\"} 1\n").unwrap();
    assert_eq!(s[0].1["l"], "q\"\\\n");
}
