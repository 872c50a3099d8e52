//! The web page in a real headless Chromium, against a real three-node cluster: live chat on
//! two nodes, resumption across a restart of the node a page talks to, escaping of hostile
//! text, the cluster view with a killed node, and a screenshot of each view.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`). Without them
//! the test is skipped, except under `CI=true`, where their absence is a failure.

mod common;
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use common::{new_msg_id, u64_of, wait_until, Cluster, Options};
use serde_json::{json, Value};
use webdriver::{Browser, Driver, Session};

const CONV: &str = "lobby";
const WAIT: Duration = Duration::from_secs(20);
const HOSTILE: &str = "<img src=x onerror=alert(1)>";
const HOSTILE_SENDER: &str = "<script>alert(2)</script>";

/// (seq, index, msg_id, sender, payload) of each record, from the page or from the API.
type Row = (u64, u64, String, String, String);

fn rows(list: &Value) -> Vec<Row> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|r| {
            (
                u64_of(r, "seq"),
                u64_of(r, "index"),
                r["msg_id"].as_str().unwrap_or_default().to_owned(),
                r["sender"].as_str().unwrap_or_default().to_owned(),
                r["payload"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn screenshot_dir() -> PathBuf {
    // target/screenshots, next to cargo's tmp dir for integration tests.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("screenshots")
}

/// The browser, or `None` when the test should be skipped.
fn browser_or_skip() -> Option<Browser> {
    match Browser::find() {
        Ok(b) => Some(b),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and the browser is missing ({why}); .ci/run installs chromium and chromium-driver")
        }
        Err(why) => {
            eprintln!("skipping the browser test: {why} (install chromium and chromium-driver)");
            None
        }
    }
}

/// A page of the chat on one node.
struct Page {
    s: Session,
    node: u64,
}

impl Page {
    async fn open(driver: &mut Driver, c: &Cluster, node: u64, width: u32, height: u32) -> Page {
        let s = driver.session(width, height).await;
        s.goto(&format!("http://{}/#/chat/{CONV}", c.api(node)))
            .await;
        let p = Page { s, node };
        p.wait_live().await;
        p
    }

    /// Waits until the stream is open and the badge names this page's node.
    async fn wait_live(&self) {
        let node = self.node;
        self.s
            .wait_for(
                &format!("the page on node {node} to be live"),
                WAIT,
                "return [document.getElementById('stream-state').dataset.state,
                         document.getElementById('node-badge').textContent];",
                |v| {
                    let badge = v[1].as_str().unwrap_or_default();
                    if v[0] == "live" && badge.starts_with(&format!("node {node} ·")) {
                        Ok(())
                    } else {
                        Err(v.to_string())
                    }
                },
            )
            .await
    }

    /// Waits until the page shows at least `n` messages and none still being sent.
    async fn wait_messages(&self, n: usize) -> Vec<Row> {
        let node = self.node;
        let script = format!(
            "{READ_MESSAGES_FN} return {{shown: read(), pending: document.querySelectorAll('#messages .msg.pending').length}};"
        );
        self.s
            .wait_for(
                &format!("{n} messages on the page of node {node}"),
                WAIT,
                &script,
                |v| {
                    let shown = rows(&v["shown"]);
                    if shown.len() >= n && v["pending"] == json!(0) {
                        Ok(shown)
                    } else {
                        Err(format!("{} shown, {} pending", shown.len(), v["pending"]))
                    }
                },
            )
            .await
    }

    /// Types a message into the box and presses Send.
    async fn send(&self, text: &str) {
        let input = self.s.find("#payload-input").await;
        self.s.send_keys(&input, text).await;
        let button = self.s.find("#send-button").await;
        self.s.click(&button).await;
    }

    async fn set_sender(&self, name: &str) {
        let input = self.s.find("#sender-input").await;
        self.s.clear(&input).await;
        self.s.send_keys(&input, name).await;
    }
}

/// What a page shows of each message, in screen order (pending sends left out).
const READ_MESSAGES_FN: &str = r#"
const read = () => Array.from(document.querySelectorAll('#messages .msg:not(.pending)')).map((li) => ({
  seq: Number(li.dataset.seq),
  index: Number(li.dataset.index),
  msg_id: li.dataset.msgId,
  sender: li.querySelector('.sender').textContent,
  payload: li.querySelector('.payload').textContent,
}));"#;

/// Every record of the conversation, as node `id` serves it.
async fn api_rows(c: &Cluster, id: u64) -> Vec<Row> {
    let records = c
        .messages(id, CONV)
        .await
        .unwrap_or_else(|e| panic!("history of node {id}: {e}"));
    rows(&Value::Array(records))
}

/// Posts through the API until it is acknowledged, retrying with the same msg_id (an
/// election may be under way).
async fn post_until_stored(c: &Cluster, via: u64, sender: &str, payload: &str) {
    let msg =
        json!({"conv_id": CONV, "sender": sender, "payload": payload, "msg_id": new_msg_id()});
    wait_until(
        &format!("node {via} to store {payload:?}"),
        WAIT,
        || async {
            let r = c.post(via, &msg).await?;
            if r.is_success() {
                Ok(())
            } else {
                Err(format!("{} {}", r.status, r.text()))
            }
        },
    )
    .await
}

fn assert_each_seq_once(shown: &[Row], node: u64) {
    let seqs: Vec<u64> = shown.iter().map(|r| r.0).collect();
    let want: Vec<u64> = (1..=shown.len() as u64).collect();
    assert_eq!(
        seqs, want,
        "the page of node {node} must show each seq once, in order"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_page_in_a_real_browser() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let shots = screenshot_dir();
    let mut c = Cluster::start(Options::nodes(3)).await;
    let mut driver = Driver::start(browser).await;

    // 1. A page on node 1 and one on node 3; messages sent from a page and through the API
    //    show on both, with the same seq and index, in the order the history API reports.
    let a = Page::open(&mut driver, &c, 1, 1100, 820).await;
    let b = Page::open(&mut driver, &c, 3, 1100, 820).await;
    a.set_sender("alice").await;
    b.set_sender("bob").await;
    a.send("hello from the page on node 1").await;
    post_until_stored(&c, 2, "carol", "hello through the API on node 2").await;
    a.send("a second line from node 1").await;
    b.send("and bob answers from node 3").await;
    let on_a = a.wait_messages(4).await;
    let on_b = b.wait_messages(4).await;
    assert_eq!(on_a.len(), 4, "node 1's page: {on_a:?}");
    assert_eq!(
        on_a, on_b,
        "both pages show the same messages in the same place"
    );
    assert_eq!(
        on_a,
        api_rows(&c, 2).await,
        "the pages agree with GET /api/v1/messages"
    );
    assert_each_seq_once(&on_a, 1);

    // 3. Hostile text is shown as text: no element is made from it and nothing runs.
    b.set_sender(HOSTILE_SENDER).await;
    b.send(HOSTILE).await;
    let on_a = a.wait_messages(5).await;
    let on_b = b.wait_messages(5).await;
    for (page, shown) in [(&a, &on_a), (&b, &on_b)] {
        let last = shown.last().expect("five messages");
        assert_eq!(last.4, HOSTILE, "the payload shows as typed");
        assert_eq!(last.3, HOSTILE_SENDER, "the sender shows as typed");
        let v = page
            .s
            .exec(
                "const list = document.getElementById('messages');
                 return {
                   elements: list.querySelectorAll('img, script, iframe, object, svg').length,
                   payload_children: list.lastElementChild.querySelector('.payload').childElementCount,
                   fetched_x: performance.getEntriesByType('resource').some((e) => /\\/x$/.test(e.name)),
                 };",
                &[],
            )
            .await;
        assert_eq!(
            v,
            json!({"elements": 0, "payload_children": 0, "fetched_x": false}),
            "page of node {}",
            page.node
        );
        assert_eq!(page.s.alert_text().await, None, "no dialog was opened");
    }
    b.set_sender("bob").await;
    b.s.screenshot(&shots.join("chat.png")).await;

    // 2. Restart the node page A talks to: the page reconnects by itself (no reload), and
    //    shows what was written meanwhile, every message once.
    a.s.exec("window.__sameDocument = true;", &[]).await;
    c.kill(1);
    a.s.wait_for(
        "the page to notice its node is gone",
        WAIT,
        "return document.getElementById('stream-state').dataset.state;",
        |v| {
            if v == "live" {
                Err(v.to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    post_until_stored(&c, 2, "carol", "written while node 1 was down").await;
    post_until_stored(&c, 3, "dave", "also written while node 1 was down").await;
    c.restart(1).await;
    c.wait_ready(1, WAIT).await;
    post_until_stored(&c, 1, "carol", "written after node 1 came back").await;
    a.wait_live().await;
    let after = a.wait_messages(8).await;
    assert_eq!(after.len(), 8, "{after:?}");
    assert_each_seq_once(&after, 1);
    assert_eq!(
        after,
        api_rows(&c, 1).await,
        "node 1's page after the restart"
    );
    let dom_count =
        a.s.exec(
            "return document.querySelectorAll('#messages .msg').length;",
            &[],
        )
        .await;
    assert_eq!(dom_count, json!(8), "no duplicate element on screen");
    let same =
        a.s.exec("return window.__sameDocument === true;", &[])
            .await;
    assert_eq!(same, json!(true), "the page resumed without a reload");
    a.s.screenshot(&shots.join("chat-after-restart.png")).await;

    // 4. The cluster view: three members, one leader; a killed node is shown as down.
    let leader = c.leader().await;
    b.s.goto(&format!("http://{}/#/cluster", c.api(3))).await;
    const MEMBERS: &str =
        "return Array.from(document.querySelectorAll('#members .member')).map((m) => ({
        id: Number(m.dataset.nodeId), up: m.dataset.up === 'true', role: m.dataset.role,
        leader: m.classList.contains('leader') }));";
    let leader_of = |v: &Value| -> Result<u64, String> {
        let members = v.as_array().ok_or("not a list")?;
        let leaders: Vec<u64> = members
            .iter()
            .filter(|m| m["leader"] == json!(true))
            .filter_map(|m| m["id"].as_u64())
            .collect();
        match leaders.as_slice() {
            [one] => Ok(*one),
            _ => Err(format!("leaders {leaders:?} in {v}")),
        }
    };
    b.s.wait_for("three members up and one leader", WAIT, MEMBERS, |v| {
        let ids: Vec<u64> = v
            .as_array()
            .ok_or("not a list")?
            .iter()
            .filter(|m| m["up"] == json!(true))
            .filter_map(|m| m["id"].as_u64())
            .collect();
        if ids != [1, 2, 3] {
            return Err(format!("up: {ids:?} in {v}"));
        }
        match leader_of(v)? {
            l if l == leader => Ok(()),
            l => Err(format!(
                "the page says {l} leads, the cluster says {leader}"
            )),
        }
    })
    .await;
    // Let the chart gather a few samples before the picture.
    b.s.wait_for(
        "a few chart samples",
        WAIT,
        "return document.getElementById('chart').width > 0;",
        |v| {
            if v == true {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;
    b.s.screenshot(&shots.join("cluster.png")).await;

    let victim = if leader == 3 { 2 } else { leader };
    c.kill(victim);
    b.s.wait_for(
        &format!("node {victim} shown as down, one leader among the others"),
        WAIT,
        MEMBERS,
        |v| {
            let list = v.as_array().ok_or("not a list")?;
            if list.len() != 3 {
                return Err(format!("{} members: {v}", list.len()));
            }
            let down: Vec<u64> = list
                .iter()
                .filter(|m| m["up"] == json!(false))
                .filter_map(|m| m["id"].as_u64())
                .collect();
            if down != [victim] {
                return Err(format!("down: {down:?} in {v}"));
            }
            let l = leader_of(v)?;
            if l == victim {
                return Err(format!("the down node {l} is still shown as leader"));
            }
            Ok(())
        },
    )
    .await;
    b.s.screenshot(&shots.join("cluster-node-down.png")).await;

    // 5. The same views at a phone's size.
    b.s.set_window(390, 844).await;
    b.s.screenshot(&shots.join("cluster-phone.png")).await;
    b.s.goto(&format!("http://{}/#/chat/{CONV}", c.api(3)))
        .await;
    b.wait_messages(8).await;
    b.s.screenshot(&shots.join("chat-phone.png")).await;

    a.s.close().await;
    b.s.close().await;
    for name in [
        "chat.png",
        "chat-after-restart.png",
        "cluster.png",
        "cluster-node-down.png",
        "cluster-phone.png",
        "chat-phone.png",
    ] {
        let len = std::fs::metadata(shots.join(name))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {name} was written ({len} bytes)");
    }
    eprintln!("screenshots in {}", shots.display());
}

/// `GET /api/v1/cluster` (what the page's cluster view draws) and the page's files, over
/// plain HTTP: this part runs with or without a browser.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_overview_and_page_files_over_http() {
    let mut c = Cluster::start(Options::nodes(3)).await;
    let leader = c.leader().await;
    post_until_stored(&c, 1, "alice", "one message so the log moves").await;

    let apis = c.apis();
    let http = c.http.clone();
    let overview = |id: u64| {
        let addr = apis[id as usize - 1].clone();
        let http = http.clone();
        async move {
            let r = http.get(&addr, "/api/v1/cluster").await?;
            if r.code() != 200 {
                return Err(format!("node {id}: {} {}", r.status, r.text()));
            }
            Ok::<Value, String>(r.json())
        }
    };
    for id in c.ids() {
        let v = wait_until(
            &format!("node {id}'s overview to show three members up, with lag"),
            WAIT,
            || async {
                let v = overview(id).await?;
                let members = v["members"].as_array().ok_or(format!("no members: {v}"))?;
                let complete = members.len() == 3
                    && members
                        .iter()
                        .all(|m| m["up"] == json!(true) && m["lag"].is_u64());
                if complete {
                    Ok(v)
                } else {
                    Err(v.to_string())
                }
            },
        )
        .await;
        assert_eq!(v["node_id"], json!(id), "{v}");
        assert_eq!(v["leader"]["node_id"], json!(leader), "{v}");
        let members = v["members"].as_array().expect("checked above");
        let ids: Vec<u64> = members.iter().map(|m| u64_of(m, "node_id")).collect();
        assert_eq!(ids, [1, 2, 3], "{v}");
        let leaders: Vec<u64> = members
            .iter()
            .filter(|m| m["role"] == "leader")
            .map(|m| u64_of(m, "node_id"))
            .collect();
        assert_eq!(leaders, [leader], "exactly one leader: {v}");
        for m in members {
            assert_eq!(m["api_addr"], json!(c.api(u64_of(m, "node_id"))), "{m}");
            assert!(
                u64_of(m, "commit_index") >= u64_of(m, "last_applied"),
                "commit is never behind applied: {m}"
            );
            assert!(u64_of(m, "last_log_index") >= 1, "{m}");
            assert!(m.get("error").is_none(), "an up member has no error: {m}");
        }
    }

    // A killed member is shown as down, quickly, by the leader and by the other follower;
    // the leader still knows how far it got.
    let victim = c.others(leader)[0];
    let other = c.others(leader)[1];
    c.kill(victim);
    for id in [leader, other] {
        let v = wait_until(
            &format!("node {id} to show node {victim} down"),
            WAIT,
            || async {
                let v = overview(id).await?;
                if v["members"][victim as usize - 1]["up"] == json!(false) {
                    Ok(v)
                } else {
                    Err(v.to_string())
                }
            },
        )
        .await;
        let m = &v["members"][victim as usize - 1];
        assert!(m["error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
        assert_eq!(m["role"], Value::Null, "{m}");
        assert!(
            m["lag"].is_u64(),
            "the leader's view of {victim} is still known: {m}"
        );
        let up: Vec<u64> = v["members"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|m| m["up"] == json!(true))
            .map(|m| u64_of(m, "node_id"))
            .collect();
        assert_eq!(up.len(), 2, "{v}");
        // A down member costs at most its timeout, never the whole answer.
        let started = std::time::Instant::now();
        overview(id).await.expect("the overview answers");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the overview took {:?} with a member down",
            started.elapsed()
        );
    }

    // The page: its files with their types and a strict policy, and JSON errors elsewhere.
    let page = c.http.get(c.api(other), "/").await.expect("GET /");
    assert_eq!(page.code(), 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(page.text().contains("/assets/app.js"));
    for (path, ty) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let r = c.http.get(c.api(other), path).await.expect(path);
        assert_eq!(
            (r.code(), r.header("content-type")),
            (200, Some(ty)),
            "{path}"
        );
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
    }
    let missing = c
        .http
        .get(c.api(other), "/assets/missing.js")
        .await
        .expect("GET");
    assert_eq!(missing.code(), 404);
    assert_eq!(missing.error_code().as_deref(), Some("not_found"));
}

/// With client tokens on, the page asks for one, keeps it for the tab, sends with it and
/// follows the stream with it (through the cookie EventSource carries), and never puts it into
/// the page's URL.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_asks_for_a_client_token_when_tokens_are_on() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    const TOKEN: &str = "tok-web-page-7f3a";
    let dir = tempfile::tempdir().expect("a temp dir");
    let tokens_file = dir.path().join("tokens.toml");
    let digest: String = chatraftd::security::sha256::sha256(TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &tokens_file,
        format!(
            "[[token]]\nname = \"web\"\nsha256 = \"{digest}\"\nscopes = [\"read\", \"write\"]\n"
        ),
    )
    .expect("writing the tokens file");
    let c = Cluster::start(Options {
        security_toml: format!("tokens_file = {:?}", tokens_file.display().to_string()),
        ..Options::nodes(1)
    })
    .await;
    let mut driver = Driver::start(browser).await;
    let s = driver.session(900, 700).await;
    s.goto(&format!("http://{}/#/chat/{CONV}", c.api(1))).await;

    // Refused without a token: the page asks for one.
    s.wait_for(
        "the token form",
        WAIT,
        "return !document.getElementById('token-form').hidden;",
        |v| {
            if v == &json!(true) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;
    let input = s.find("#token-input").await;
    s.send_keys(&input, TOKEN).await;
    let button = s.find("#token-form button").await;
    s.click(&button).await;

    // With the token the stream goes live and a message sent from the page is stored.
    let p = Page { s, node: 1 };
    p.wait_live().await;
    p.set_sender("tina").await;
    p.send("sent with a token").await;
    let shown = p.wait_messages(1).await;
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].4, "sent with a token");
    let stored = api_rows(&c, 1).await;
    assert_eq!(shown, stored, "the page shows what the node stored");
    let where_is_it =
        p.s.exec(
            "return [location.href, sessionStorage.getItem('chatraftd.token')];",
            &[],
        )
        .await;
    assert!(
        !where_is_it[0].as_str().unwrap_or_default().contains(TOKEN),
        "the token must not be in the page's URL: {where_is_it}"
    );
    assert_eq!(where_is_it[1], json!(TOKEN), "kept for the tab");
    p.s.close().await;
}
