//! Backup and restore: a cluster that lost every node is rebuilt from a backup, holds exactly
//! the backed-up messages, and continues each conversation at the right seq.

mod common;

use std::time::Duration;

use common::{daemon_command, u64_of, Cluster, Options};
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

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_rebuilt_from_a_backup_holds_exactly_the_backed_up_messages() {
    let opts = Options::nodes(3);
    let mut c = Cluster::start(opts.clone()).await;
    let ids = c.ids();

    for i in 1..=5u64 {
        let via = ids[(i as usize) % 3];
        let r = c
            .post(
                via,
                &json!({"conv_id": "b.one", "sender": "s", "payload": format!("one-{i}")}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201, "{}", r.text());
    }
    for i in 1..=3u64 {
        let r = c
            .post(
                ids[0],
                &json!({"conv_id": "b.two", "sender": "t", "payload": format!("two-{i} é")}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201, "{}", r.text());
    }
    let one = c
        .wait_same_messages(&ids, "b.one", 5, Duration::from_secs(20))
        .await;
    let two = c
        .wait_same_messages(&ids, "b.two", 3, Duration::from_secs(20))
        .await;
    assert_eq!((one.len(), two.len()), (5, 3));

    // An online backup from a follower's data dir while the node runs.
    let leader = c.leader().await;
    let source = c.others(leader)[0];
    let backup = c.root().join("chat.backup");
    let config = c.node(source).config_path.clone();
    let (ok, out, err) = run_cli(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--out",
        backup.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "backup failed: {err}");
    let info: Value = serde_json::from_str(out.trim()).expect("backup --json");
    assert_eq!(u64_of(&info, "messages"), 8, "{info}");
    assert_eq!(u64_of(&info, "conversations"), 2, "{info}");
    assert!(u64_of(&info, "last_applied_index") >= 8, "{info}");
    let old_term = u64_of(&c.status(leader).await.unwrap(), "term");
    // An existing file is never overwritten.
    let (ok, _, err) = run_cli(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--out",
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");

    // Written after the backup: must not come back.
    for i in 6..=7u64 {
        let r = c
            .post(
                leader,
                &json!({"conv_id": "b.one", "sender": "s", "payload": format!("late-{i}")}),
            )
            .await
            .expect("post");
        assert_eq!(r.code(), 201, "{}", r.text());
    }

    // Lose every node and its data.
    for id in c.running() {
        c.kill(id);
    }
    for id in &ids {
        std::fs::remove_dir_all(&c.node(*id).config.data_dir).expect("deleting a data dir");
    }

    // A new cluster: node 1 restored from the backup, two fresh nodes join it.
    let mut r = Cluster::empty(opts);
    let backup_path = backup.clone();
    r.add_node_prepared(&|node| {
        let _ = std::fs::remove_dir_all(&node.config.data_dir);
        let (ok, out, err) = run_cli(&[
            "restore",
            "--backup",
            backup_path.to_str().unwrap(),
            "--config",
            node.config_path.to_str().unwrap(),
        ]);
        assert!(ok, "restore failed: {err}");
        assert!(out.contains("restored 8 messages"), "{out}");
    })
    .await;
    // Restoring into a data dir that holds state is refused.
    let (ok, _, err) = run_cli(&[
        "restore",
        "--backup",
        backup.to_str().unwrap(),
        "--config",
        r.node(1).config_path.to_str().unwrap(),
    ]);
    assert!(!ok, "a second restore into a live data dir must fail");
    assert!(err.contains("locked") || err.contains("fresh"), "{err}");
    // So is one into a data dir that holds nothing but a snapshot of another state.
    let node1 = r.node(1);
    let stale = node1.config.data_dir.with_file_name("stale-data");
    std::fs::create_dir_all(stale.join("snapshots")).expect("creating a stale data dir");
    std::fs::write(stale.join("snapshots").join("9-9-9.meta.json"), "{}").expect("writing");
    let stale_config = node1.config_path.with_file_name("stale.toml");
    let text = std::fs::read_to_string(&node1.config_path).expect("reading the config");
    let data_line = format!(
        "data_dir = {:?}",
        node1.config.data_dir.display().to_string()
    );
    assert!(text.contains(&data_line), "{text}");
    let other_line = format!("data_dir = {:?}", stale.display().to_string());
    std::fs::write(&stale_config, text.replace(&data_line, &other_line)).expect("writing");
    let (ok, _, err) = run_cli(&[
        "restore",
        "--backup",
        backup.to_str().unwrap(),
        "--config",
        stale_config.to_str().unwrap(),
    ]);
    assert!(!ok, "a restore next to a stale snapshot must fail");
    assert!(err.contains("snapshots/"), "{err}");
    r.add_node().await;
    r.add_node().await;
    let new_ids = r.ids();

    let got_one = r
        .wait_same_messages(&new_ids, "b.one", 5, Duration::from_secs(30))
        .await;
    let got_two = r
        .wait_same_messages(&new_ids, "b.two", 3, Duration::from_secs(30))
        .await;
    assert_eq!(got_one, one, "b.one after the restore");
    assert_eq!(got_two, two, "b.two after the restore");

    // New writes continue each conversation, in a later term and past the backup's index.
    let rec = r
        .post(
            new_ids[2],
            &json!({"conv_id": "b.one", "sender": "s", "payload": "after"}),
        )
        .await
        .expect("post");
    assert_eq!(rec.code(), 201, "{}", rec.text());
    let rec = rec.json();
    assert_eq!(u64_of(&rec, "seq"), 6, "{rec}");
    let backed_up_max = one.iter().chain(&two).map(|r| u64_of(r, "index")).max();
    assert!(Some(u64_of(&rec, "index")) > backed_up_max, "{rec}");
    assert!(u64_of(&rec, "term") >= old_term, "{rec}");
    let rec = r
        .post(
            new_ids[1],
            &json!({"conv_id": "b.two", "sender": "t", "payload": "after"}),
        )
        .await
        .expect("post");
    assert_eq!(u64_of(&rec.json(), "seq"), 4, "{}", rec.text());
    let all = r
        .wait_same_messages(&new_ids, "b.one", 6, Duration::from_secs(20))
        .await;
    assert_eq!(all.len(), 6);
    common::assert_dense(&all);
}
