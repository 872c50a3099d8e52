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

/// The hex SHA-256 of `token`, as `sha256sum` prints it.
fn sha256_hex(token: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(token.as_bytes())?;
            c.wait_with_output()
        })
        .expect("running sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn tokens_toml(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, token, rest)| {
            format!(
                "[[token]]\nname = {name:?}\nsha256 = {:?}\n{rest}\n",
                sha256_hex(token)
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_limit_conversations_scopes_and_sender() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let tokens_file = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens_file,
        tokens_toml(&[
            (
                "general-only",
                "tok-general",
                "scopes = [\"read\", \"write\"]\nconversations = [\"general\"]",
            ),
            ("reader", "tok-reader", "scopes = [\"read\"]"),
            (
                "alice",
                "tok-alice",
                "scopes = [\"read\", \"write\"]\nsender = \"alice\"",
            ),
        ]),
    )
    .unwrap();
    let c = Cluster::start(Options {
        security_toml: format!("tokens_file = {:?}", tokens_file.display().to_string()),
        ..Options::nodes(2)
    })
    .await;
    let out = c.outsider();
    let as_token = |t: &str| out.with_header("authorization", &format!("Bearer {t}"));
    let general = as_token("tok-general");
    let reader = as_token("tok-reader");
    let alice = as_token("tok-alice");
    let follower = c.others(c.leader().await)[0];

    // Writes through a follower exercise the forwarding to the leader too.
    for id in c.ids() {
        let msg =
            |conv: &str, sender: &str| json!({"conv_id": conv, "sender": sender, "payload": "x"});
        let code = |r: Result<common::Response, String>| r.expect("an answer").code();
        // No token, an unknown one: 401 on every client route.
        for http in [&out, &as_token("tok-unknown")] {
            assert_eq!(
                code(common::post_message(http, c.api(id), &msg("general", "a")).await),
                401
            );
            for path in [
                "/api/v1/messages?conv_id=general",
                "/api/v1/conversations",
                "/api/v1/stream?conv_id=general",
                "/api/v1/status",
            ] {
                assert_eq!(code(http.get(c.api(id), path).await), 401, "{path}");
            }
        }
        // Health stays open.
        assert_eq!(code(out.get(c.api(id), "/healthz").await), 200);

        // A token limited to "general" reads and writes it, and nothing else.
        assert_eq!(
            code(common::post_message(&general, c.api(id), &msg("general", "g")).await),
            201
        );
        let r = common::post_message(&general, c.api(id), &msg("secret-room", "g"))
            .await
            .unwrap();
        assert_eq!(r.code(), 403, "{}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("forbidden"));
        assert_eq!(
            code(
                general
                    .get(c.api(id), "/api/v1/messages?conv_id=general")
                    .await
            ),
            200
        );
        assert_eq!(
            code(
                general
                    .get(c.api(id), "/api/v1/messages?conv_id=secret-room")
                    .await
            ),
            403
        );
        assert_eq!(
            code(
                general
                    .get(c.api(id), "/api/v1/stream?conv_id=secret-room")
                    .await
            ),
            403
        );
        // The cookie works like the header (for EventSource).
        let by_cookie = out.with_header("cookie", "theme=dark; chatraftd_token=tok-general");
        assert_eq!(
            code(
                by_cookie
                    .get(c.api(id), "/api/v1/messages?conv_id=general")
                    .await
            ),
            200
        );
        assert_eq!(
            code(
                by_cookie
                    .get(c.api(id), "/api/v1/messages?conv_id=secret-room")
                    .await
            ),
            403
        );

        // A read-only token cannot write.
        assert_eq!(
            code(common::post_message(&reader, c.api(id), &msg("general", "r")).await),
            403
        );
        assert_eq!(
            code(
                reader
                    .get(c.api(id), "/api/v1/messages?conv_id=secret-room")
                    .await
            ),
            200
        );

        // Sender binding.
        assert_eq!(
            code(common::post_message(&alice, c.api(id), &msg("secret-room", "alice")).await),
            201
        );
        let r = common::post_message(&alice, c.api(id), &msg("secret-room", "mallory"))
            .await
            .unwrap();
        assert_eq!(r.code(), 403, "{}", r.text());
        assert!(r.text().contains("alice"), "{}", r.text());
    }
    // The listing shows a limited token only its conversations.
    let r = general
        .get(c.api(follower), "/api/v1/conversations")
        .await
        .unwrap();
    let listing = r.json();
    let convs: Vec<&str> = listing["conversations"]
        .as_array()
        .expect("a conversations array")
        .iter()
        .filter_map(|c| c["conv_id"].as_str())
        .collect();
    assert_eq!(convs, ["general"], "{listing}");
    // Refused writes changed nothing: secret-room holds only alice's two messages.
    let records = c
        .wait_same_messages(&c.ids(), "secret-room", 2, Duration::from_secs(10))
        .await;
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["sender"] == "alice"));

    // SIGHUP re-reads the tokens file: the reader token is revoked, a new one works.
    std::fs::write(
        &tokens_file,
        tokens_toml(&[("newcomer", "tok-new", "scopes = [\"read\"]")]),
    )
    .unwrap();
    for id in c.ids() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.node(id).pid().unwrap() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
    for id in c.ids() {
        let addr = c.api(id).to_string();
        let (reader, newcomer) = (reader.clone(), as_token("tok-new"));
        common::wait_until(
            "the tokens file to be reloaded",
            Duration::from_secs(10),
            || {
                let (addr, reader, newcomer) = (addr.clone(), reader.clone(), newcomer.clone());
                async move {
                    let old = reader.get(&addr, "/api/v1/conversations").await?.code();
                    let new = newcomer.get(&addr, "/api/v1/conversations").await?.code();
                    if (old, new) == (401, 200) {
                        Ok(())
                    } else {
                        Err(format!("old token {old}, new token {new}"))
                    }
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn write_rate_and_cluster_size_limits() {
    let c = Cluster::start(Options {
        limits_toml: "write_rate_per_sec = 1\nwrite_burst = 3\nmax_cluster_size = 2".into(),
        ..Options::nodes(2)
    })
    .await;
    let client = c.outsider();
    let leader = c.leader().await;
    let msg = json!({"sender": "flood", "payload": "x"});
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = common::post_message(&client, c.api(leader), &msg)
            .await
            .expect("an answer");
        if r.code() == 429 {
            assert_eq!(r.error_code().as_deref(), Some("rate_limited"));
            let secs: u64 = r
                .header("retry-after")
                .expect("Retry-After on 429")
                .parse()
                .unwrap();
            assert!((1..=2).contains(&secs), "Retry-After {secs}");
        }
        codes.push(r.code());
    }
    assert_eq!(&codes[..3], [201, 201, 201], "{codes:?}");
    assert!(codes[3..].iter().all(|&c| c == 429), "{codes:?}");
    // The node keeps serving: reads work, and the other node takes writes (each node has
    // its own buckets; the copy it forwards to the leader carries the cluster secret and is
    // not counted again).
    let follower = c.others(leader)[0];
    let r = common::post_message(&client, c.api(follower), &msg)
        .await
        .expect("an answer");
    assert_eq!(r.code(), 201, "{}", r.text());
    let r = client
        .get(c.api(leader), "/api/v1/messages?conv_id=general")
        .await
        .expect("an answer");
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["messages"].as_array().unwrap().len(), 4);

    // The cluster is full at two members: a third node is refused, membership unchanged.
    let before = c.status(leader).await.unwrap()["members"].clone();
    let third =
        json!({"node_id": 3, "raft_addr": common::free_addr(), "api_addr": common::free_addr()});
    for id in c.ids() {
        let r = c
            .http
            .post_json(c.api(id), "/join", &third)
            .await
            .expect("an answer");
        assert_eq!(r.code(), 409, "{}", r.text());
        assert_eq!(
            r.error_code().as_deref(),
            Some("cluster_full"),
            "{}",
            r.text()
        );
    }
    assert_eq!(c.status(leader).await.unwrap()["members"], before);
}
