//! Security, end to end on real processes: the cluster secret keeps outsiders from joining
//! or forging Raft traffic, and a node refuses to start with an unsafe secret file.

mod common;

use std::time::Duration;

use hyper::Method;
use serde_json::{json, Value};

use common::{run_to_exit, Cluster, Http, NodeConfig, Options, SECRET_HEADER};

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// What must not move when a forged request is refused.
fn fingerprint(s: &Value) -> Value {
    json!({
        "term": s["term"],
        "members": s["members"],
        "leader": s["leader"],
        "last_log_index": s["last_log_index"],
    })
}

/// A vote request for `term` from a candidate whose log is far ahead of everyone's, which a
/// node grants (taking the term) when it comes with the cluster secret.
fn forged_vote(term: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "vote": {"leader_id": {"term": term, "node_id": 99}, "committed": false},
        "last_log_id": {"leader_id": {"term": term, "node_id": 99}, "index": 1_000_000},
    }))
    .unwrap()
}

fn forged_append(term: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "vote": {"leader_id": {"term": term, "node_id": 99}, "committed": true},
        "prev_log_id": null,
        "leader_commit": null,
        "entries": [],
    }))
    .unwrap()
}

async fn post(
    http: &Http,
    addr: &str,
    path: &str,
    secret: Option<&str>,
    body: Vec<u8>,
) -> common::Response {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = secret {
        headers.push((SECRET_HEADER, s));
    }
    http.request(Method::POST, addr, path, &headers, body)
        .await
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread")]
async fn outsiders_cannot_join_or_forge_raft_traffic() {
    let c = Cluster::start(Options::nodes(2)).await;
    let outsider = c.outsider();
    let before: Vec<Value> = {
        let mut v = Vec::new();
        for id in c.ids() {
            v.push(fingerprint(&c.status(id).await.expect("status")));
        }
        v
    };

    // A stranger asks to join, through the leader and through the follower.
    let stranger =
        json!({"node_id": 7, "raft_addr": common::free_addr(), "api_addr": common::free_addr()});
    for id in c.ids() {
        for secret in [None, Some("not-the-cluster-secret-at-all")] {
            let r = post(
                &outsider,
                c.api(id),
                "/join",
                secret,
                serde_json::to_vec(&stranger).unwrap(),
            )
            .await;
            assert_eq!(r.code(), 401, "join via {id} with {secret:?}: {}", r.text());
            assert_eq!(r.error_code().as_deref(), Some("unauthorized"));
        }
        // The internal read-index route is refused too.
        let r = outsider
            .get(c.api(id), "/api/v1/internal/read-index")
            .await
            .expect("an answer");
        assert_eq!(r.code(), 401, "read-index: {}", r.text());
    }

    // Forged Raft RPC straight at the Raft listeners: a vote and an append for a term far
    // ahead, which would depose the leader if they were taken.
    for id in c.ids() {
        for (path, body) in [
            ("/raft/vote", forged_vote(1_000)),
            ("/raft/append", forged_append(1_000)),
            ("/raft/snapshot", vec![0, 0, 0, 2, b'{', b'}']),
        ] {
            for secret in [None, Some("not-the-cluster-secret-at-all")] {
                let r = post(&outsider, c.node(id).raft(), path, secret, body.clone()).await;
                assert_eq!(
                    r.code(),
                    401,
                    "{path} to {id} with {secret:?}: {}",
                    r.text()
                );
                assert_eq!(r.error_code().as_deref(), Some("unauthorized"));
            }
        }
    }

    // Nothing moved: same term, leader, members and log on every node.
    for (i, id) in c.ids().into_iter().enumerate() {
        let now = fingerprint(&c.status(id).await.expect("status"));
        assert_eq!(now, before[i], "node {id} changed after refused requests");
    }
    let log = c.node(1).log() + &c.node(2).log();
    assert!(
        log.contains("refused a request"),
        "refusals are logged:\n{log}"
    );
    assert!(
        !log.contains("not-the-cluster-secret-at-all"),
        "a presented secret is never logged"
    );

    // The same vote WITH the secret reaches Raft and is answered (refused by the leader
    // lease, but considered): the checks above could have failed.
    let secret = std::fs::read_to_string(c.opts.cluster_secret_file.as_ref().unwrap())
        .unwrap()
        .trim()
        .to_string();
    let r = post(
        &outsider,
        c.node(2).raft(),
        "/raft/vote",
        Some(&secret),
        forged_vote(1_000),
    )
    .await;
    assert_eq!(r.code(), 200, "{}", r.text());
    assert!(
        r.json()["Ok"]["vote_granted"].is_boolean(),
        "Raft answered the vote: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_secret_files_stop_the_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let secret = dir.path().join("cluster-secret");
    common::write_secret_file(&secret, "0123456789abcdef0123456789");
    let config = |opts: &Options| {
        NodeConfig {
            node_id: 1,
            data_dir: dir.path().join("data"),
            bootstrap: true,
            join: Vec::new(),
            api: common::free_addr(),
            raft: common::free_addr(),
        }
        .render(opts)
    };
    let path = dir.path().join("chatraftd.toml");
    let path_s = path.display().to_string();
    let with_secret = Options {
        cluster_secret_file: Some(secret.clone()),
        ..Options::nodes(1)
    };
    std::fs::write(&path, config(&with_secret)).unwrap();
    let (status, _, stderr) =
        run_to_exit(&["--check-config", "--config", &path_s], EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{stderr}");

    // Readable by the group: refused, naming the key and the file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    for args in [
        vec!["--config", path_s.as_str()],
        vec!["--check-config", "--config", path_s.as_str()],
    ] {
        let (status, _, stderr) = run_to_exit(&args, EXIT_TIMEOUT).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("security.cluster_secret_file")
                && stderr.contains(&secret.display().to_string())
                && stderr.contains("chmod 600"),
            "{stderr}"
        );
    }
    assert!(!dir.path().join("data").exists(), "nothing was started");

    // A missing file.
    std::fs::remove_file(&secret).unwrap();
    let (status, _, stderr) = run_to_exit(&["--config", &path_s], EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("security.cluster_secret_file"), "{stderr}");

    // No secret at all needs the explicit opt-out.
    let text = config(&Options::nodes(1)).replace("allow_insecure_cluster = true\n", "");
    std::fs::write(&path, text).unwrap();
    let (status, _, stderr) = run_to_exit(&["--config", &path_s], EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("security.cluster_secret_file")
            && stderr.contains("allow_insecure_cluster"),
        "{stderr}"
    );
}
