//! `DELETE /api/v1/cluster/nodes/{id}` on real processes: a node is removed through a follower,
//! removed again (404), wiped and re-added under a new id at the same addresses, and the last
//! voter cannot be removed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use chatraftd::network::HttpClient;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A free loopback port (the listener is closed before the node binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The cluster secret shared by every node of the test, beside their dirs.
fn secret_path(node_dir: &Path) -> PathBuf {
    node_dir
        .parent()
        .expect("a node dir has a parent")
        .join("cluster-secret")
}

struct Node {
    api: String,
    raft: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn new(root: &Path, slot: u32) -> Node {
        Node {
            api: format!("127.0.0.1:{}", free_port()),
            raft: format!("127.0.0.1:{}", free_port()),
            dir: root.join(format!("node{slot}")),
            child: None,
        }
    }

    fn start(&mut self, id: u64, join: Option<&str>) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let start = match join {
            None => "bootstrap = true".to_string(),
            Some(j) => format!("join = [\"{j}\"]"),
        };
        let config = self.dir.join("chatraftd.toml");
        std::fs::write(
            &config,
            format!(
                "node_id = {id}\ndata_dir = \"{}\"\n{start}\n[api]\nlisten = \"{}\"\n[raft]\nlisten = \"{}\"\n[security]\ncluster_secret_file = \"{}\"\n[log]\nlevel = \"warn\"\n",
                self.dir.join("data").display(),
                self.api,
                self.raft,
                secret_path(&self.dir).display()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chatraftd"))
            .arg("--config")
            .arg(&config)
            .kill_on_drop(true)
            .spawn()
            .expect("start chatraftd");
        self.child = Some(child);
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

async fn call(http: &HttpClient, method: hyper::Method, addr: &str, path: &str) -> (u16, Value) {
    let resp = http
        .request(
            method,
            addr,
            path,
            &[],
            Bytes::new(),
            Duration::from_secs(40),
        )
        .await
        .unwrap_or_else(|e| panic!("{path} on {addr}: {e}"));
    let body = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status.as_u16(), body)
}

/// Waits until `addr` reports a leader and exactly these voters.
async fn wait_voters(http: &HttpClient, addr: &str, want: &[u64]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http
            .request(
                hyper::Method::GET,
                addr,
                "/api/v1/status",
                &[],
                Bytes::new(),
                Duration::from_secs(2),
            )
            .await
        {
            let s: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let mut voters: Vec<u64> = s["members"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter(|n| n["voter"] == true)
                        .filter_map(|n| n["node_id"].as_u64())
                        .collect()
                })
                .unwrap_or_default();
            voters.sort();
            if voters == want
                && !s["leader"].is_null()
                && s["members"].as_array().map(Vec::len) == Some(want.len())
            {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never reported voters {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_readd_under_new_id_and_keep_the_last_voter() {
    let root = tempfile::tempdir().unwrap();
    let secret_file = root.path().join("cluster-secret");
    chatraftd::security::ensure_secret_file(&secret_file).unwrap();
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    // Removal is an admin route: the operator's client holds the cluster secret.
    let http = HttpClient::new().with_cluster_secret(Some(secret.trim()));
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(root.path(), i)).collect();
    nodes[0].start(1, None);
    let seed = nodes[0].api.clone();
    nodes[1].start(2, Some(&seed));
    nodes[2].start(3, Some(&seed));
    wait_voters(&http, &seed, &[1, 2, 3]).await;

    // Removed through node 2, which forwards to the leader when it is not the leader itself.
    let (code, body) = call(
        &http,
        hyper::Method::DELETE,
        &nodes[1].api,
        "/api/v1/cluster/nodes/3",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_voters(&http, &seed, &[1, 2]).await;
    let (code, body) = call(
        &http,
        hyper::Method::DELETE,
        &seed,
        "/api/v1/cluster/nodes/3",
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (code, body) = call(
        &http,
        hyper::Method::DELETE,
        &seed,
        "/api/v1/cluster/nodes/x",
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    // Wiped and back under a new id at the same addresses; it gets the whole log.
    nodes[2].stop().await;
    std::fs::remove_dir_all(&nodes[2].dir).unwrap();
    let post = http
        .request(
            hyper::Method::POST,
            &seed,
            "/api/v1/message",
            &[("content-type", "application/json")],
            Bytes::from(r#"{"sender":"a","payload":"while node 3 is gone"}"#),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(post.status.as_u16(), 201);
    nodes[2].start(4, Some(&seed));
    wait_voters(&http, &seed, &[1, 2, 4]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = call(
            &http,
            hyper::Method::GET,
            &nodes[2].api,
            "/api/v1/messages?from=1",
        )
        .await;
        if code == 200 && body["messages"].as_array().map(Vec::len) == Some(1) {
            assert_eq!(body["messages"][0]["payload"], "while node 3 is gone");
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never caught up: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Down to one voter, which cannot be removed.
    for id in [4, 2] {
        let (code, body) = call(
            &http,
            hyper::Method::DELETE,
            &seed,
            &format!("/api/v1/cluster/nodes/{id}"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    wait_voters(&http, &seed, &[1]).await;
    let (code, body) = call(
        &http,
        hyper::Method::DELETE,
        &seed,
        "/api/v1/cluster/nodes/1",
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{body}"
    );
    for n in &mut nodes {
        n.stop().await;
    }
}
