//! The client subcommands against a real cluster: status, members, send (with retries under
//! an outage, stored once), and tail (resumes across a restart of its node).

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{daemon_command, str_of, u64_of, wait_until, Cluster, Options};
use serde_json::{json, Value};

fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = daemon_command()
        .args(args)
        .output()
        .expect("running chatraftd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client subcommand running in the background, its output in files; killed on drop.
struct Background {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> Background {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = daemon_command()
            .args(args)
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .expect("spawning chatraftd");
        Background {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn out(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the exit, at most `timeout`; true when it exited with 0.
    async fn finish(&mut self, timeout: Duration) -> bool {
        let child = self.child.as_mut().expect("still running");
        let status = common::wait_exit(child, timeout)
            .await
            .unwrap_or_else(|| panic!("no exit within {timeout:?}; stderr: {}", self.err()));
        self.child = None;
        status.success()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_members_and_send() {
    let opts = Options {
        write_timeout_ms: 1000,
        ..Options::nodes(3)
    };
    let mut c = Cluster::start(opts).await;
    let leader = c.leader().await;
    let follower = c.others(leader)[0];

    let (ok, out, err) = run_cli(&["status", "--node", c.api(leader)]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("node {leader}: leader, term ")),
        "{out}"
    );
    let (ok, out, err) = run_cli(&["status", "--node", c.api(follower), "--json"]);
    assert!(ok, "{err}");
    let s: Value = serde_json::from_str(&out).expect("status --json");
    assert_eq!(str_of(&s, "role"), "follower");
    assert_eq!(s["leader"]["node_id"].as_u64(), Some(leader));

    let (ok, out, err) = run_cli(&["members", "--node", c.api(follower)]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("voter leader")).count(),
        1
    );
    assert!(out.contains(&format!("api {}", c.api(leader))), "{out}");
    let (ok, out, _) = run_cli(&["members", "--node", c.api(leader), "--json"]);
    assert!(ok);
    let m: Value = serde_json::from_str(&out).expect("members --json");
    assert_eq!(m["members"].as_array().map(Vec::len), Some(3));

    // A node that is not there: exit 1 and a message naming it.
    let nowhere = common::free_addr();
    let (ok, _, err) = run_cli(&["status", "--node", &nowhere]);
    assert!(!ok && err.contains(&nowhere), "{err}");

    // send: stored, then the same msg_id again is recognised, never stored twice.
    let id = uuid_like();
    let (ok, out, err) = run_cli(&[
        "send",
        "--node",
        c.api(follower),
        "--conv",
        "cli",
        "--sender",
        "op",
        "--msg-id",
        &id,
        "hello there",
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("stored: conv cli seq 1 "), "{out}");
    let (ok, out, err) = run_cli(&[
        "send",
        "--node",
        c.api(leader),
        "--conv",
        "cli",
        "--sender",
        "op",
        "--msg-id",
        &id,
        "hello there",
        "--json",
    ]);
    assert!(ok, "{err}");
    let rec: Value = serde_json::from_str(&out).expect("send --json");
    assert_eq!(u64_of(&rec, "seq"), 1);
    // A refused message is not retried: exit 1 with the API's code.
    let (ok, _, err) = run_cli(&[
        "send",
        "--node",
        c.api(leader),
        "--conv",
        "no spaces",
        "--sender",
        "op",
        "x",
    ]);
    assert!(!ok && err.contains("invalid_field"), "{err}");

    // An outage: the leader alone cannot commit, so send retries (same msg_id) until a
    // follower is back, and the message is stored once.
    let others = c.others(leader);
    for id in &others {
        c.kill(*id);
    }
    let id2 = uuid_like();
    let mut send = Background::start(
        c.root(),
        "send",
        &[
            "send",
            "--node",
            c.api(leader),
            "--conv",
            "cli",
            "--sender",
            "op",
            "--msg-id",
            &id2,
            "during the outage",
        ],
    );
    wait_until("send to retry", Duration::from_secs(20), || {
        let err = send.err();
        async move {
            if err.contains("retrying with msg_id") {
                Ok(())
            } else {
                Err(err)
            }
        }
    })
    .await;
    c.restart(others[0]).await;
    assert!(
        send.finish(Duration::from_secs(30)).await,
        "send failed: {}",
        send.err()
    );
    assert!(
        send.out().contains("stored: conv cli seq 2 "),
        "{}",
        send.out()
    );
    let records = c.messages(leader, "cli").await.expect("messages");
    let n = records
        .iter()
        .filter(|r| str_of(r, "msg_id") == id2)
        .count();
    assert_eq!(n, 1, "{records:?}");
    assert_eq!(records.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_and_resumes_across_a_restart_of_its_node() {
    let mut c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    let watched = c.others(leader)[0];

    let mut tail = Background::start(
        c.root(),
        "tail",
        &[
            "tail",
            "--node",
            c.api(watched),
            "--conv",
            "t",
            "--from",
            "1",
            "--count",
            "6",
            "--json",
        ],
    );
    for i in 1..=3 {
        let r = c
            .post(
                leader,
                &json!({"conv_id": "t", "sender": "s", "payload": format!("m{i}")}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201);
    }
    wait_until("tail to print 3 messages", Duration::from_secs(20), || {
        let n = tail.out().lines().count();
        async move {
            if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} lines"))
            }
        }
    })
    .await;

    // Its node stops (the stream ends) and comes back; messages sent meanwhile still arrive.
    let status = c.terminate(watched, Duration::from_secs(20)).await;
    assert!(status.success());
    for i in 4..=6 {
        let r = c
            .post(
                leader,
                &json!({"conv_id": "t", "sender": "s", "payload": format!("m{i}")}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201);
    }
    c.restart(watched).await;
    assert!(
        tail.finish(Duration::from_secs(30)).await,
        "tail failed: {}",
        tail.err()
    );
    assert!(tail.err().contains("reconnecting"), "{}", tail.err());
    let seqs: Vec<u64> = tail
        .out()
        .lines()
        .map(|l| {
            u64_of(
                &serde_json::from_str::<Value>(l).expect("a JSON line"),
                "seq",
            )
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "{}", tail.out());

    // Without --from: only messages committed after the start.
    let mut fresh = Background::start(
        c.root(),
        "tail-new",
        &[
            "tail",
            "--node",
            c.api(watched),
            "--conv",
            "t",
            "--count",
            "1",
        ],
    );
    wait_until("tail to connect", Duration::from_secs(20), || {
        let http = c.http.clone();
        let addr = c.api(watched).to_owned();
        async move {
            let r = http.get(&addr, "/metrics").await?;
            if r.text().contains("chatraftd_sse_subscribers 1") {
                Ok(())
            } else {
                Err("no subscriber yet".to_string())
            }
        }
    })
    .await;
    let r = c
        .post(
            leader,
            &json!({"conv_id": "t", "sender": "s", "payload": "m7"}),
        )
        .await
        .expect("post");
    assert_eq!(r.code(), 201);
    assert!(
        fresh.finish(Duration::from_secs(20)).await,
        "{}",
        fresh.err()
    );
    assert!(
        fresh.out().trim_end().ends_with("#7 s: m7"),
        "{}",
        fresh.out()
    );

    // Human-readable lines: one per message.
    let (ok, out, err) = run_cli(&[
        "tail",
        "--node",
        c.api(leader),
        "--conv",
        "t",
        "--from",
        "5",
        "--count",
        "2",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].ends_with("#5 s: m5"), "{out}");
    assert!(lines[1].ends_with("#6 s: m6"), "{out}");
}

fn uuid_like() -> String {
    common::new_msg_id()
}
