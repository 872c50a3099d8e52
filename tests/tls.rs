//! TLS: a cluster with HTTPS on the API and mutual TLS on the Raft listener forms, forwards
//! and replicates; a plaintext peer, a certificate from another CA, an expired certificate
//! and a caller without a certificate all fail the handshake and change nothing.
//!
//! Certificates are made by `packaging/make-tls-certs.sh` (openssl), the recipe README.md
//! gives operators.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatraftd::config::TlsConfig;
use chatraftd::network::HttpClient;
use chatraftd::tls::Tls;
use common::{Cluster, Options, SECRET_HEADER};
use serde_json::json;

/// Runs the certificate recipe: `dir/name.{crt,key}` for `127.0.0.1` (and `dir/ca.*`).
fn make_cert(dir: &Path, name: &str, expired: bool) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/make-tls-certs.sh");
    let out = std::process::Command::new("sh")
        .arg(script)
        .arg(dir)
        .arg(name)
        .arg("127.0.0.1")
        .arg("localhost")
        .env("EXPIRED", if expired { "1" } else { "0" })
        .output()
        .expect("running make-tls-certs.sh (needs openssl)");
    assert!(
        out.status.success(),
        "make-tls-certs.sh {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client for Raft listeners that trusts `ca` and presents `cert` (signed by whatever CA).
fn raft_client(ca: &Path, cert: &Path, key: &Path, secret: &str) -> HttpClient {
    let tls = Tls::load(
        &TlsConfig {
            raft: true,
            api: false,
            ca_file: ca.display().to_string(),
            cert_file: cert.display().to_string(),
            key_file: key.display().to_string(),
            api_cert_file: String::new(),
            api_key_file: String::new(),
        },
        "test",
    )
    .expect("loading a test certificate");
    HttpClient::with_tls(tls.client, false).with_cluster_secret(Some(secret))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_cluster_works_and_refuses_strangers() {
    let certs = tempfile::tempdir().unwrap();
    let rogue = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_cert(dir, "node", false);
    make_cert(dir, "expired", true);
    make_cert(rogue.path(), "rogue", false);
    let file = |d: &Path, f: &str| -> PathBuf { d.join(f) };
    let tls_toml = format!(
        "[tls]\nraft = true\napi = true\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        file(dir, "ca.crt").display().to_string(),
        file(dir, "node.crt").display().to_string(),
        file(dir, "node.key").display().to_string(),
    );
    let c = Cluster::start(Options {
        extra_toml: tls_toml,
        api_ca: Some(file(dir, "ca.crt")),
        ..Options::nodes(3)
    })
    .await;

    // Joins ran over HTTPS, Raft over mutual TLS; writes to every node (followers forward to
    // the leader's HTTPS API) replicate everywhere in one order.
    for id in c.ids() {
        let r = c
            .post(
                id,
                &json!({"conv_id": "tls", "sender": format!("n{id}"), "payload": "over TLS"}),
            )
            .await
            .expect("an answer over HTTPS");
        assert_eq!(r.code(), 201, "{}", r.text());
    }
    c.wait_same_messages(&c.ids(), "tls", 3, Duration::from_secs(20))
        .await;

    // The operator's commands speak HTTPS with --ca-file, and refuse https:// without it.
    let ca = file(dir, "ca.crt").display().to_string();
    let url = format!("https://{}", c.api(1));
    let (st, out, err) = common::run_to_exit(
        &["status", "--node", &url, "--ca-file", &ca, "--json"],
        Duration::from_secs(20),
    )
    .await;
    assert!(st.success(), "status over HTTPS: {err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).expect("status JSON");
    assert_eq!(status["node_id"], 1, "{out}");
    let (st, _, err) =
        common::run_to_exit(&["status", "--node", &url], Duration::from_secs(20)).await;
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("--ca-file"), "{err}");
    let (st, _, err) = common::run_to_exit(
        &[
            "send",
            "--node",
            c.api(2),
            "--ca-file",
            &ca,
            "--conv",
            "tls",
            "--sender",
            "cli",
            "sent by the CLI",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(st.success(), "send over HTTPS: {err}");
    c.wait_same_messages(&c.ids(), "tls", 4, Duration::from_secs(20))
        .await;

    // Plain HTTP to the HTTPS API gets no HTTP answer.
    let plain = common::Http::new();
    assert!(
        plain.get(c.api(1), "/api/v1/status").await.is_err(),
        "plain HTTP to the HTTPS API was answered"
    );

    let secret = std::fs::read_to_string(c.opts.cluster_secret_file.as_ref().unwrap())
        .unwrap()
        .trim()
        .to_string();
    let leader = c.leader().await;
    let raft = format!("https://{}", c.node(leader).raft());
    let before = c.status(leader).await.unwrap();
    assert_eq!(before["members"].as_array().map(Vec::len), Some(3));
    let rpc = |client: HttpClient| {
        let raft = raft.clone();
        async move {
            client
                .request(
                    hyper::Method::POST,
                    &raft,
                    "/raft/vote",
                    &[("content-type", "application/json")],
                    bytes::Bytes::from_static(b"{}"),
                    Duration::from_secs(5),
                )
                .await
        }
    };
    // A member's certificate gets through TLS to the HTTP layer (which refuses the empty
    // vote): the refusals below are the handshake's.
    let member = raft_client(
        &file(dir, "ca.crt"),
        &file(dir, "node.crt"),
        &file(dir, "node.key"),
        &secret,
    );
    let r = rpc(member)
        .await
        .expect("a member reaches the Raft listener");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    let strangers = [
        (
            "no client certificate",
            HttpClient::with_tls(
                Some(chatraftd::tls::client_trusting(&file(dir, "ca.crt")).unwrap()),
                false,
            )
            .with_cluster_secret(Some(&secret)),
        ),
        (
            "a certificate from another CA",
            raft_client(
                &file(dir, "ca.crt"),
                &file(rogue.path(), "rogue.crt"),
                &file(rogue.path(), "rogue.key"),
                &secret,
            ),
        ),
        (
            "an expired certificate",
            raft_client(
                &file(dir, "ca.crt"),
                &file(dir, "expired.crt"),
                &file(dir, "expired.key"),
                &secret,
            ),
        ),
    ];
    for (what, client) in strangers {
        match rpc(client).await {
            Err(e) => assert!(e.to_string().contains("cannot reach"), "{what}: {e}"),
            Ok(r) => panic!("{what}: the Raft listener answered {}", r.status),
        }
    }
    // A plaintext peer, even with the secret.
    let plaintext = HttpClient::new().with_cluster_secret(Some(&secret));
    let r = plaintext
        .request(
            hyper::Method::POST,
            &format!("http://{}", c.node(leader).raft()),
            "/raft/vote",
            &[
                ("content-type", "application/json"),
                (SECRET_HEADER, &secret),
            ],
            bytes::Bytes::from_static(b"{}"),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        r.is_err(),
        "a plaintext peer got an HTTP answer from the TLS Raft listener"
    );

    // Nothing changed: same members, same leader and term, and writes still work.
    let after = c.status(leader).await.unwrap();
    assert_eq!(after["members"], before["members"]);
    assert_eq!(after["term"], before["term"]);
    let r = c
        .post(
            leader,
            &json!({"conv_id": "tls", "sender": "n", "payload": "after"}),
        )
        .await
        .unwrap();
    assert_eq!(r.code(), 201, "{}", r.text());
    c.wait_same_messages(&c.ids(), "tls", 5, Duration::from_secs(20))
        .await;
}

#[tokio::test]
async fn bad_tls_settings_stop_the_start_naming_key_and_file() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_cert(dir, "node", false);
    let base = TlsConfig {
        raft: true,
        api: false,
        ca_file: dir.join("ca.crt").display().to_string(),
        cert_file: dir.join("node.crt").display().to_string(),
        key_file: dir.join("node.key").display().to_string(),
        api_cert_file: String::new(),
        api_key_file: String::new(),
    };
    assert!(Tls::load(&base, "f.toml").is_ok());
    let cases = [
        (
            "tls.ca_file",
            TlsConfig {
                ca_file: dir.join("missing.crt").display().to_string(),
                ..base.clone()
            },
        ),
        (
            "tls.cert_file",
            TlsConfig {
                // A key is not a certificate.
                cert_file: base.key_file.clone(),
                ..base.clone()
            },
        ),
        (
            "tls.key_file",
            TlsConfig {
                // A certificate is not a key.
                key_file: base.cert_file.clone(),
                ..base.clone()
            },
        ),
    ];
    for (key, config) in cases {
        let e = Tls::load(&config, "f.toml").err().expect(key);
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.source, "f.toml");
    }
}
