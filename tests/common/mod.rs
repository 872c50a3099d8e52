//! The process-level test harness for chatraftd.
//!
//! # Layout
//! - [`http`]: a tiny HTTP/1.1 client (one shared hyper pool, timeouts, whole answers).
//! - [`sse`]: a `text/event-stream` reader with `Last-Event-ID` and deadlines.
//! - this file: free loopback ports, per-node TOML configs in a temp dir, real `chatraftd`
//!   processes (spawn, kill -9, SIGTERM, restart with the same config), cluster formation,
//!   leader discovery, polling waits with deadlines, and API helpers.
//!
//! Every process a [`Cluster`] started is killed when it is dropped, also while a test panics;
//! a panicking test prints the tail of each node's stderr (and keeps the temp dir when
//! `CHATRAFTD_TEST_KEEP` is set) so the failure can be read from the test output.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

pub mod http;
pub mod sse;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

pub use http::{Http, Response};

/// The daemon under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatraftd");

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(50);
/// How long a fresh node may take to answer /healthz.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long forming the cluster (each join) may take.
const FORM_TIMEOUT: Duration = Duration::from_secs(20);

/// Timings and limits written into every node's config.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub write_timeout_ms: u64,
    pub sse_keepalive_secs: u64,
    pub snapshot_threshold: u64,
    pub keep_logs_after_snapshot: u64,
    pub log_level: String,
    /// The cluster secret file every node names; a [`Cluster`] writes one in its temp dir
    /// when this is `None`. Configs rendered without one run with `allow_insecure_cluster`.
    pub cluster_secret_file: Option<PathBuf>,
    /// More `key = value` lines for the `[security]` table.
    pub security_toml: String,
    /// More `key = value` lines for the `[limits]` table.
    pub limits_toml: String,
    /// More `key = value` lines for the `[api]` table.
    pub api_toml: String,
    /// More `key = value` lines for the `[raft]` table.
    pub raft_toml: String,
    /// Whole tables appended to the file (`[tls]` ...).
    pub extra_toml: String,
    /// With HTTPS on the API: the CA the harness's clients trust.
    pub api_ca: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            // openraft 0.9 drops a replication request that takes longer than the heartbeat
            // interval; tests share two cores with other tests, so leave room.
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            write_timeout_ms: 3000,
            sse_keepalive_secs: 1,
            snapshot_threshold: 50_000,
            keep_logs_after_snapshot: 1_000,
            log_level: "info".into(),
            cluster_secret_file: None,
            security_toml: String::new(),
            limits_toml: String::new(),
            api_toml: String::new(),
            raft_toml: String::new(),
            extra_toml: String::new(),
            api_ca: None,
        }
    }
}

impl Options {
    pub fn nodes(n: usize) -> Self {
        Options {
            nodes: n,
            ..Options::default()
        }
    }
}

/// Ports handed out by this test process, so two clusters in one test binary never get the
/// same one. (Another process may still take a released port: that bind race is retried.)
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago: bind port 0, read the port, release it.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        drop(listener);
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// What goes into one node's config file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub bootstrap: bool,
    pub join: Vec<String>,
    pub api: String,
    pub raft: String,
}

impl NodeConfig {
    pub fn render(&self, o: &Options) -> String {
        let join: Vec<String> = self.join.iter().map(|a| format!("{a:?}")).collect();
        format!(
            r#"# written by the chatraftd integration tests
node_id = {id}
data_dir = {data:?}
bootstrap = {bootstrap}
join = [{join}]

[api]
listen = "{api}"
write_timeout_ms = {wt}
sse_keepalive_secs = {ka}
{api_extra}

[raft]
listen = "{raft}"
heartbeat_interval_ms = {hb}
election_timeout_min_ms = {emin}
election_timeout_max_ms = {emax}
snapshot_threshold = {st}
keep_logs_after_snapshot = {keep}
{raft_extra}

[limits]
{limits}
[security]
{secret}
{security}
{extra}
[log]
level = "{level}"
"#,
            id = self.node_id,
            data = self.data_dir.display().to_string(),
            bootstrap = self.bootstrap,
            join = join.join(", "),
            api = self.api,
            wt = o.write_timeout_ms,
            ka = o.sse_keepalive_secs,
            raft = self.raft,
            hb = o.heartbeat_ms,
            emin = o.election_min_ms,
            emax = o.election_max_ms,
            st = o.snapshot_threshold,
            keep = o.keep_logs_after_snapshot,
            level = o.log_level,
            limits = o.limits_toml,
            secret = match &o.cluster_secret_file {
                Some(p) => format!("cluster_secret_file = {:?}", p.display().to_string()),
                None => "allow_insecure_cluster = true\ncluster_secret_file = \"\"".into(),
            },
            security = o.security_toml,
            api_extra = o.api_toml,
            raft_extra = o.raft_toml,
            extra = o.extra_toml,
        )
    }
}

/// The header that carries the cluster secret (the daemon's `security::SECRET_HEADER`).
pub const SECRET_HEADER: &str = "x-chatraftd-cluster-secret";

/// Writes a cluster secret file, mode 0600 as the daemon demands.
pub fn write_secret_file(path: &Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{secret}\n")).expect("writing a secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 of the secret file");
}

/// A `chatraftd` command with a clean environment: no `CHATRAFTD_*` override of the test
/// machine leaks into the daemon under test.
pub fn daemon_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATRAFTD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_BACKTRACE", "1");
    cmd.stdin(Stdio::null());
    cmd
}

/// Sends SIGTERM to a process this harness started.
pub fn sigterm(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = i32::try_from(pid).expect("a pid fits in i32");
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to {pid}: {e}"));
}

/// Waits for `child` to exit, polling; `None` if it is still running at the deadline.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs the daemon with `args` until it exits by itself; kills it and panics if it is still
/// running after `timeout`. Returns (status, stdout, stderr).
pub async fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = daemon_command()
        .args(args)
        .stdout(File::create(&out_path).expect("creating stdout file"))
        .stderr(File::create(&err_path).expect("creating stderr file"))
        .spawn()
        .expect("spawning chatraftd");
    let status = wait_exit(&mut child, timeout).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        Some(s) => (s, stdout, stderr),
        None => panic!("chatraftd {args:?} still running after {timeout:?}; stdout {stdout:?} stderr {stderr:?}"),
    }
}

/// Polls `probe` until it returns `Ok`, at most `timeout`; panics with `what` and the last
/// `Err` otherwise. This is the only way tests wait: never a fixed sleep.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One daemon of a cluster.
pub struct Node {
    pub id: u64,
    /// The node's own folder: config, stderr log, data dir.
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// stdout and stderr of every run, appended, with a marker line per start.
    pub log_path: PathBuf,
    pub config: NodeConfig,
    child: Option<Child>,
    /// How many times this node was started.
    starts: u32,
}

impl Node {
    pub fn api(&self) -> &str {
        &self.config.api
    }

    pub fn raft(&self) -> &str {
        &self.config.raft
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The captured output of every run of this node.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn write_config(&self, opts: &Options) {
        std::fs::write(&self.config_path, self.config.render(opts)).expect("writing a node config");
    }

    /// Starts the process; returns the log length before the start, so the caller can read
    /// just this run's output.
    fn spawn(&mut self) -> u64 {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the node log");
        writeln!(
            log,
            "===== test harness: start #{} of node {} =====",
            self.starts, self.id
        )
        .expect("writing the node log");
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let out = log.try_clone().expect("cloning the log handle");
        let child = daemon_command()
            .arg("--config")
            .arg(&self.config_path)
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawning chatraftd");
        self.child = Some(child);
        offset
    }

    fn log_since(&self, offset: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `Some(status)` when the process has exited (it is then reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .as_mut()?
            .try_wait()
            .expect("try_wait on a node")?;
        self.child = None;
        Some(status)
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client for the API of a cluster started with `opts`: HTTPS when it has a CA.
fn client_for(opts: &Options) -> Http {
    Http::with_tls(opts.api_ca.as_deref().map(|ca| {
        chatraftd::tls::client_trusting(ca).unwrap_or_else(|e| panic!("loading the test CA: {e}"))
    }))
}

/// A set of chatraftd processes in one temp dir, on free loopback ports.
pub struct Cluster {
    pub http: Http,
    pub opts: Options,
    nodes: Vec<Node>,
    /// Removed on drop (unless CHATRAFTD_TEST_KEEP is set); `None` once kept.
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `opts.nodes` nodes: node 1 bootstraps, the others join through node 1's API,
    /// one after another. Returns when every node lists all of them as voters and agrees on a
    /// leader.
    pub async fn start(opts: Options) -> Cluster {
        let n = opts.nodes;
        assert!(n >= 1);
        let mut c = Cluster::empty(opts);
        c.add_node().await;
        for _ in 1..n {
            c.add_node().await;
        }
        c
    }

    /// A cluster with no node yet. Unless `opts` names one, a cluster secret is written in
    /// the temp dir; [`Cluster::http`] presents it on every request (so it can use admin
    /// routes), while [`Cluster::outsider`] does not.
    pub fn empty(mut opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("chatraftd-it-")
            .tempdir()
            .expect("creating a temp dir");
        let secret_path = match &opts.cluster_secret_file {
            Some(p) => p.clone(),
            None => {
                let p = dir.path().join("cluster-secret");
                write_secret_file(&p, &format!("it-secret-{}", uuid::Uuid::new_v4().simple()));
                opts.cluster_secret_file = Some(p.clone());
                p
            }
        };
        let secret = std::fs::read_to_string(&secret_path)
            .expect("reading the cluster secret")
            .trim()
            .to_string();
        Cluster {
            http: client_for(&opts).with_header(SECRET_HEADER, &secret),
            opts,
            nodes: Vec::new(),
            dir: Some(dir),
        }
    }

    /// A client without the cluster secret.
    pub fn outsider(&self) -> Http {
        client_for(&self.opts)
    }

    pub fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the temp dir is kept until drop")
            .path()
    }

    /// Adds node `len + 1`: the first bootstraps, later ones join through the first running
    /// node's API. Waits until every running node lists it as a voter. Returns its id.
    pub async fn add_node(&mut self) -> u64 {
        self.add_node_prepared(&|_| {}).await
    }

    /// Like [`Cluster::add_node`], and calls `prepare` with the node after its config is
    /// written and before it starts (again on a retry with new ports).
    pub async fn add_node_prepared(&mut self, prepare: &dyn Fn(&Node)) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let dir = self.root().join(format!("node{id}"));
        std::fs::create_dir_all(&dir).expect("creating a node dir");
        let join = if id == 1 {
            Vec::new()
        } else {
            let via = self
                .running()
                .first()
                .copied()
                .expect("a running node to join through");
            vec![self.api(via).to_owned()]
        };
        let config = NodeConfig {
            node_id: id,
            data_dir: dir.join("data"),
            bootstrap: id == 1,
            join,
            api: String::new(),
            raft: String::new(),
        };
        self.nodes.push(Node {
            id,
            config_path: dir.join("chatraftd.toml"),
            log_path: dir.join("output.log"),
            dir,
            config,
            child: None,
            starts: 0,
        });
        self.launch_fresh(id, prepare).await;
        let mut voters = self.running();
        voters.sort_unstable();
        self.wait_members(&voters, FORM_TIMEOUT).await;
        id
    }

    /// First start of a node: pick ports, write the config, start, and wait for /healthz.
    /// A start that fails because a picked port was taken meanwhile is retried on new ports.
    async fn launch_fresh(&mut self, id: u64, prepare: &dyn Fn(&Node)) {
        for attempt in 1..=3 {
            {
                let opts = self.opts.clone();
                let node = self.node_mut(id);
                node.config.api = free_addr();
                node.config.raft = free_addr();
                node.write_config(&opts);
            }
            prepare(self.node(id));
            let offset = self.node_mut(id).spawn();
            match self.wait_healthy(id, START_TIMEOUT).await {
                Ok(()) => return,
                Err(status) => {
                    let out = self.node(id).log_since(offset);
                    let lower = out.to_lowercase();
                    let bind_race = lower.contains("address already in use")
                        || lower.contains("addrinuse")
                        || lower.contains("bind");
                    if bind_race && attempt < 3 {
                        eprintln!(
                            "node {id}: port taken meanwhile ({status}), retrying on new ports"
                        );
                        continue;
                    }
                    panic!("node {id} did not start ({status}); its output:\n{out}");
                }
            }
        }
    }

    /// Waits until node `id` answers /healthz with 200. `Err` describes an exit or timeout.
    async fn wait_healthy(&mut self, id: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let addr = self.api(id).to_owned();
        loop {
            if let Some(status) = self.node_mut(id).exited() {
                return Err(format!("exited with {status}"));
            }
            if let Ok(r) = self.http.get(&addr, "/healthz").await {
                if r.code() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no 200 from /healthz within {timeout:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .get(id as usize - 1)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .get_mut(id as usize - 1)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the nodes whose process is running (as far as the harness knows).
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub fn api(&self, id: u64) -> &str {
        self.node(id).api()
    }

    /// API addresses of all nodes, index `id - 1`.
    pub fn apis(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api().to_owned()).collect()
    }

    /// Kills node `id` with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill(&mut self, id: u64) {
        let node = self.node_mut(id);
        assert!(node.child.is_some(), "node {id} is not running");
        node.kill_now();
    }

    /// Sends SIGTERM and waits for the exit, at most `timeout`.
    pub async fn terminate(&mut self, id: u64, timeout: Duration) -> ExitStatus {
        let node = self.node_mut(id);
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        sigterm(child.id());
        match wait_exit(&mut child, timeout).await {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {id} did not exit within {timeout:?} of SIGTERM");
            }
        }
    }

    /// Starts a stopped node again with the same config and data dir; waits for /healthz.
    pub async fn restart(&mut self, id: u64) {
        let offset = self.node_mut(id).spawn();
        if let Err(e) = self.wait_healthy(id, START_TIMEOUT).await {
            panic!(
                "node {id} did not come back ({e}); its output:\n{}",
                self.node(id).log_since(offset)
            );
        }
    }

    /// GET /api/v1/status of node `id`.
    pub async fn status(&self, id: u64) -> Result<Value, String> {
        let r = self.http.get(self.api(id), "/api/v1/status").await?;
        if r.code() != 200 {
            return Err(format!("node {id}: status {} {}", r.status, r.text()));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("node {id}: status is not JSON: {e}"))
    }

    /// Waits until node `id` answers /readyz with 200.
    pub async fn wait_ready(&self, id: u64, timeout: Duration) {
        let addr = self.api(id).to_owned();
        let http = self.http.clone();
        wait_until(&format!("node {id} to be ready"), timeout, || {
            let (addr, http) = (addr.clone(), http.clone());
            async move {
                let r = http.get(&addr, "/readyz").await?;
                if r.code() == 200 {
                    Ok(())
                } else {
                    Err(format!("{} {}", r.status, r.text()))
                }
            }
        })
        .await
    }

    /// Waits until every running node lists exactly `voters` as voting members, knows the
    /// same leader, and is ready.
    pub async fn wait_members(&self, voters: &[u64], timeout: Duration) {
        let running = self.running();
        wait_until(
            &format!("nodes {running:?} to agree on voters {voters:?} and a leader"),
            timeout,
            || async {
                let mut leader = None;
                for &id in &running {
                    let s = self.status(id).await?;
                    let mut got: Vec<u64> = s["members"]
                        .as_array()
                        .ok_or(format!("node {id}: no members in {s}"))?
                        .iter()
                        .filter(|m| m["voter"] == json!(true))
                        .filter_map(|m| m["node_id"].as_u64())
                        .collect();
                    got.sort_unstable();
                    if got != voters {
                        return Err(format!("node {id} has voters {got:?}: {s}"));
                    }
                    let l = s["leader"]["node_id"]
                        .as_u64()
                        .ok_or(format!("node {id} knows no leader: {s}"))?;
                    if leader.is_some_and(|x| x != l) {
                        return Err(format!("leaders differ: {leader:?} vs {l} (node {id})"));
                    }
                    leader = Some(l);
                    let r = self.http.get(self.api(id), "/readyz").await?;
                    if r.code() != 200 {
                        return Err(format!("node {id} not ready: {}", r.text()));
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// The leader that all of `among` agree on, and which itself says it leads.
    pub async fn leader_among(&self, among: &[u64], timeout: Duration) -> u64 {
        wait_until(
            &format!("nodes {among:?} to agree on a leader"),
            timeout,
            || async {
                let mut leader = None;
                for &id in among {
                    let s = self.status(id).await?;
                    let l = s["leader"]["node_id"]
                        .as_u64()
                        .ok_or(format!("node {id} knows no leader: {s}"))?;
                    if leader.is_some_and(|x| x != l) {
                        return Err(format!("leaders differ: {leader:?} vs {l} (node {id})"));
                    }
                    leader = Some(l);
                }
                let l = leader.ok_or("no node asked")?;
                if !among.contains(&l) {
                    return Err(format!("leader {l} is not among {among:?}"));
                }
                let s = self.status(l).await?;
                if s["role"] != "leader" {
                    return Err(format!("node {l} is named leader but says {s}"));
                }
                Ok(l)
            },
        )
        .await
    }

    /// The leader all running nodes agree on.
    pub async fn leader(&self) -> u64 {
        self.leader_among(&self.running(), Duration::from_secs(15))
            .await
    }

    /// Running nodes other than `id`.
    pub fn others(&self, id: u64) -> Vec<u64> {
        self.running().into_iter().filter(|&x| x != id).collect()
    }

    /// POSTs a message to node `id`.
    pub async fn post(&self, id: u64, msg: &Value) -> Result<Response, String> {
        post_message(&self.http, self.api(id), msg).await
    }

    /// Every record of `conv` on node `id` (local reads, all pages).
    pub async fn messages(&self, id: u64, conv: &str) -> Result<Vec<Value>, String> {
        all_messages(&self.http, self.api(id), conv).await
    }

    /// Waits until every node in `ids` has the same records of `conv`, and at least
    /// `at_least` of them. Returns them.
    pub async fn wait_same_messages(
        &self,
        ids: &[u64],
        conv: &str,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        wait_until(
            &format!("nodes {ids:?} to hold the same >= {at_least} records of {conv:?}"),
            timeout,
            || async {
                let first = self.messages(ids[0], conv).await?;
                if first.len() < at_least {
                    return Err(format!("node {} has {} records", ids[0], first.len()));
                }
                for &id in &ids[1..] {
                    let other = self.messages(id, conv).await?;
                    if other != first {
                        return Err(format!(
                            "node {id} has {} records, node {} has {}; first difference: {}",
                            other.len(),
                            ids[0],
                            first.len(),
                            first_difference(&first, &other)
                        ));
                    }
                }
                Ok(first)
            },
        )
        .await
    }

    fn keep_dir(&mut self) -> Option<PathBuf> {
        std::env::var_os("CHATRAFTD_TEST_KEEP")?;
        self.dir.take().map(|d| d.keep())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_now();
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(150)..];
                eprintln!(
                    "\n----- node {} (api {}, raft {}), last {} of {} output lines ({}) -----\n{}",
                    node.id,
                    node.api(),
                    node.raft(),
                    tail.len(),
                    lines.len(),
                    node.log_path.display(),
                    tail.join("\n")
                );
            }
            if let Some(kept) = self.keep_dir() {
                eprintln!("----- kept the cluster dir {} -----", kept.display());
            }
        }
    }
}

/// POST /api/v1/message.
pub async fn post_message(http: &Http, addr: &str, msg: &Value) -> Result<Response, String> {
    http.post_json(addr, "/api/v1/message", msg).await
}

/// Reads every record of `conv` from `addr` with `GET /api/v1/messages`, page by page.
pub async fn all_messages(http: &Http, addr: &str, conv: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut from = 1u64;
    loop {
        let path = format!("/api/v1/messages?conv_id={conv}&from={from}&limit=1000");
        let r = http.get(addr, &path).await?;
        if r.code() != 200 {
            return Err(format!("GET {addr}{path}: {} {}", r.status, r.text()));
        }
        let page = r.json();
        let msgs = page["messages"]
            .as_array()
            .ok_or(format!("no messages array: {page}"))?;
        if msgs.is_empty() {
            return Ok(out);
        }
        out.extend(msgs.iter().cloned());
        let next = page["next_from"]
            .as_u64()
            .ok_or(format!("no next_from: {page}"))?;
        if next <= from {
            return Err(format!(
                "next_from {next} does not advance past {from}: {page}"
            ));
        }
        from = next;
    }
}

/// GET /api/v1/conversations as conv_id -> count.
pub async fn conversation_counts(
    http: &Http,
    addr: &str,
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let r = http.get(addr, "/api/v1/conversations").await?;
    if r.code() != 200 {
        return Err(format!("conversations: {} {}", r.status, r.text()));
    }
    let v = r.json();
    let list = v["conversations"]
        .as_array()
        .ok_or(format!("no conversations array: {v}"))?;
    Ok(list
        .iter()
        .filter_map(|c| Some((c["conv_id"].as_str()?.to_owned(), c["count"].as_u64()?)))
        .collect())
}

/// Describes where two record lists first differ.
pub fn first_difference(a: &[Value], b: &[Value]) -> String {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return format!("at position {i}: {x} vs {y}");
        }
    }
    format!(
        "one is a prefix of the other ({} vs {} records)",
        a.len(),
        b.len()
    )
}

/// A fresh random msg_id.
pub fn new_msg_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Reads a u64 field of a record, panicking with the record when it is missing.
pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a u64 in {v}"))
}

pub fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("`{field}` is not a string in {v}"))
}

/// Checks the documented shape of a message record.
pub fn assert_record_shape(r: &Value) {
    for f in ["index", "seq", "term"] {
        assert!(
            r[f].as_u64().is_some_and(|x| x >= 1),
            "`{f}` must be a number >= 1: {r}"
        );
    }
    for f in ["conv_id", "msg_id", "sender", "payload", "committed_at"] {
        assert!(r[f].is_string(), "`{f}` must be a string: {r}");
    }
    uuid::Uuid::parse_str(str_of(r, "msg_id"))
        .unwrap_or_else(|e| panic!("msg_id is not a UUID ({e}): {r}"));
    let at = str_of(r, "committed_at");
    assert!(at.ends_with('Z'), "committed_at must be UTC with a Z: {r}");
    chrono::DateTime::parse_from_rfc3339(at)
        .unwrap_or_else(|e| panic!("committed_at is not RFC 3339 ({e}): {r}"));
    if let Some(vc) = r.get("vector_clock") {
        assert!(
            vc.is_object(),
            "vector_clock, when present, is an object: {r}"
        );
    }
}

/// Checks that `records` (one conversation, in order) have seq 1..=n and rising indexes.
pub fn assert_dense(records: &[Value]) {
    let mut last_index = 0;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            u64_of(r, "seq"),
            i as u64 + 1,
            "seq is not dense at position {i}: {r}"
        );
        let index = u64_of(r, "index");
        assert!(
            index > last_index,
            "index does not rise at position {i}: {r}"
        );
        last_index = index;
    }
}

/// The keys of the `vector_clock` object in a raw JSON record, in the order they appear in
/// the text (serde_json's `Value` sorts keys, so the order is read from the raw bytes).
pub fn vector_clock_key_order(raw: &[u8]) -> Option<Vec<String>> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    struct OrderedKeys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for OrderedKeys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Keys).map(OrderedKeys)
        }
    }
    #[derive(serde::Deserialize)]
    struct Rec {
        vector_clock: Option<OrderedKeys>,
    }
    let rec: Rec = serde_json::from_slice(raw).ok()?;
    rec.vector_clock.map(|k| k.0)
}
