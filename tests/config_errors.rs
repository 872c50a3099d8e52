//! Start-up failures: each exits non-zero at once (2 for configuration, 1 for a locked data
//! dir) and says what is wrong; `--check-config` accepts a good file.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run_to_exit, Cluster, NodeConfig, Options};

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// A valid config for a fresh single node in `dir`.
fn good_config(dir: &Path) -> String {
    NodeConfig {
        node_id: 1,
        data_dir: dir.join("data"),
        bootstrap: true,
        join: Vec::new(),
        api: common::free_addr(),
        raft: common::free_addr(),
    }
    .render(&Options::nodes(1))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = write(dir.path(), "good.toml", &good_config(dir.path()));
    for args in [
        vec!["--check-config", "--config", &path],
        vec!["check-config", "--config", &path],
    ] {
        let (status, stdout, stderr) = run_to_exit(&args, EXIT_TIMEOUT).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{args:?}: stdout {stdout:?} stderr {stderr:?}"
        );
        assert!(
            stdout.contains("config OK") && stdout.contains(&path),
            "{args:?}: stdout {stdout:?}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "--check-config must not create the data dir"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let good = good_config(dir.path());

    let missing = dir
        .path()
        .join("no-such-dir")
        .join("chatraftd.toml")
        .display()
        .to_string();
    let unknown_top = write(
        dir.path(),
        "unknown-top.toml",
        &format!("colour = \"red\"\n{good}"),
    );
    let unknown_key = write(
        dir.path(),
        "unknown-key.toml",
        &good.replace("[api]\n", "[api]\nlisten_addr = \"127.0.0.1:1\"\n"),
    );
    let bad_addr = write(
        dir.path(),
        "bad-addr.toml",
        &replace_listen(&good, "raft", "not-an-address"),
    );
    let bad_api_addr = write(
        dir.path(),
        "bad-api-addr.toml",
        &replace_listen(&good, "api", "127.0.0.1:99999"),
    );
    let not_toml = write(dir.path(), "not-toml.toml", "node_id = = 1\n");

    let cases: Vec<(&str, &String, Vec<&str>)> = vec![
        ("missing file", &missing, vec![missing.as_str()]),
        ("unknown top-level key", &unknown_top, vec!["colour"]),
        ("unknown key", &unknown_key, vec!["listen_addr"]),
        ("bad raft address", &bad_addr, vec!["raft.listen"]),
        ("bad api address", &bad_api_addr, vec!["api.listen"]),
        ("not TOML", &not_toml, vec![not_toml.as_str()]),
    ];
    for (what, path, needles) in &cases {
        for check in [false, true] {
            let mut args = vec!["--config", path.as_str()];
            if check {
                args.insert(0, "--check-config");
            }
            let (status, stdout, stderr) = run_to_exit(&args, EXIT_TIMEOUT).await;
            assert_eq!(
                status.code(),
                Some(2),
                "{what} {args:?}: stdout {stdout:?} stderr {stderr:?}"
            );
            for needle in needles {
                assert!(
                    stderr.contains(needle),
                    "{what} {args:?}: stderr should name {needle:?}: {stderr:?}"
                );
            }
        }
    }
    assert!(
        !dir.path().join("data").exists(),
        "a refused config must not create the data dir"
    );
}

/// Rewrites the `listen` line of table `table` ("api" or "raft").
fn replace_listen(config: &str, table: &str, value: &str) -> String {
    let mut out = String::new();
    let mut current = "";
    for line in config.lines() {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']);
        }
        if current == table && line.starts_with("listen =") {
            out.push_str(&format!("listen = \"{value}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A second daemon on a data dir in use exits 1 saying it is locked; after the first one
/// stops cleanly on SIGTERM (exit 0) the dir can be used again.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_data_dir_exits_1() {
    let mut c = Cluster::start(Options::nodes(1)).await;
    let r = c
        .post(1, &serde_json::json!({"sender": "u1", "payload": "x"}))
        .await
        .expect("an answer");
    assert_eq!(r.code(), 201, "{}", r.text());

    let second = NodeConfig {
        api: common::free_addr(),
        raft: common::free_addr(),
        ..c.node(1).config.clone()
    };
    let path = write(c.root(), "second.toml", &second.render(&c.opts));
    let (status, stdout, stderr) = run_to_exit(&["--config", &path], EXIT_TIMEOUT).await;
    assert_eq!(
        status.code(),
        Some(1),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert!(
        stderr.contains("locked"),
        "stderr should say the data dir is locked: {stderr:?}"
    );

    // The first daemon is unharmed.
    c.wait_ready(1, Duration::from_secs(5)).await;
    let msgs = c.messages(1, "general").await.expect("reading");
    assert_eq!(msgs.len(), 1);

    let status = c.terminate(1, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "a clean stop on SIGTERM exits 0");

    // Lock released: the same node comes back with its data.
    c.restart(1).await;
    c.wait_ready(1, Duration::from_secs(15)).await;
    assert_eq!(c.messages(1, "general").await.expect("reading"), msgs);
}

/// `CHATRAFTD_*` variables override file keys (`__` between table and key), and a bad value
/// from the environment is reported with the variable's name.
#[tokio::test(flavor = "multi_thread")]
async fn environment_overrides_file_keys() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let bad_listen = replace_listen(&good_config(dir.path()), "api", "not-an-address");
    let path = write(dir.path(), "bad.toml", &bad_listen);
    let check = |env: Vec<(&'static str, String)>| {
        let path = path.clone();
        async move {
            let mut cmd = common::daemon_command();
            cmd.args(["--check-config", "--config", &path]);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .expect("joining the check")
                .expect("running chatraftd --check-config");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };

    let (code, stderr) = check(vec![]).await;
    assert_eq!(code, Some(2), "the file alone is bad: {stderr}");
    assert!(stderr.contains("api.listen"), "{stderr}");

    // The environment repairs the file's bad key.
    let (code, stderr) = check(vec![("CHATRAFTD_API__LISTEN", common::free_addr())]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // A bad value from the environment names the variable.
    let (code, stderr) = check(vec![
        ("CHATRAFTD_API__LISTEN", common::free_addr()),
        ("CHATRAFTD_NODE_ID", "seven".into()),
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("CHATRAFTD_NODE_ID"), "{stderr}");
}
