//! The chatraftd processes of a chaos run: one per node namespace, each with its data dir on
//! a tmpfs of its own. They can be killed, paused, resumed, stopped and restarted; a process
//! that exits when nobody killed it is remembered as a crash.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::lab::{node_ns, Lab, LabError};
use crate::network::HttpClient;

/// The ports every node uses on its own address.
pub const API_PORT: u16 = 8081;
pub const RAFT_PORT: u16 = 12001;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(String),
}

/// How the nodes are configured.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The `chatraftd` binary.
    pub exe: PathBuf,
    /// The run's directory: `nodeN/` (a tmpfs, the data dir inside) and `logs/`.
    pub dir: PathBuf,
    pub tmpfs_mb: u64,
    pub snapshot_threshold: u64,
    pub write_timeout_ms: u64,
}

/// A node process that went away without being asked to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Crash {
    pub node: u64,
    pub at_ms: u64,
    pub status: String,
}

pub struct Node {
    /// The node's slot: its namespace and address; clients and the checker name nodes by it.
    pub id: u64,
    /// Its Raft node id: the slot at first, a fresh one after it was removed and re-added.
    pub raft_id: u64,
    /// `host:port` of the API, as clients use it.
    pub api: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP and not yet continued.
    paused: bool,
    /// Killed or stopped by the harness: its exit is not a crash.
    expected_down: bool,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub settings: NodeSettings,
    /// Declared last so it is dropped after the processes are killed.
    pub lab: Lab,
    pub http: HttpClient,
    pub crashes: Vec<Crash>,
    /// The next unused Raft node id, for nodes re-added after a wipe.
    next_raft_id: u64,
    start: Instant,
}

impl Node {
    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .map(|p| Pid::from_raw(p as i32))
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn paused(&self) -> bool {
        self.paused
    }
}

impl Cluster {
    /// Writes every node's config and mounts its tmpfs; starts nothing yet.
    pub fn prepare(
        mut lab: Lab,
        count: u64,
        settings: NodeSettings,
        start: Instant,
    ) -> Result<Cluster, ClusterError> {
        let logs = settings.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|source| ClusterError::Io {
            what: format!("create {}", logs.display()),
            source,
        })?;
        let seed_api = format!("{}:{API_PORT}", lab.addr(1));
        // The nodes and the harness share one cluster secret, as a real deployment does.
        let secret_file = settings.dir.join("cluster-secret");
        let secret = crate::security::ensure_secret_file(&secret_file)
            .and_then(|_| std::fs::read_to_string(&secret_file))
            .map_err(|source| ClusterError::Io {
                what: format!("write {}", secret_file.display()),
                source,
            })?;
        let mut nodes = Vec::new();
        for id in 1..=count {
            let home = settings.dir.join(format!("node{id}"));
            lab.mount_tmpfs(&home, settings.tmpfs_mb)?;
            let log = logs.join(format!("node{id}.log"));
            // A log from an earlier run in the same directory would only mislead.
            let _ = std::fs::remove_file(&log);
            let join = if id == 1 {
                vec![]
            } else {
                vec![seed_api.clone()]
            };
            let config = logs.join(format!("node{id}.toml"));
            write_config(&config, &settings, &lab.addr(id), &home, id, &join)?;
            nodes.push(Node {
                id,
                raft_id: id,
                api: format!("{}:{API_PORT}", lab.addr(id)),
                config,
                log,
                child: None,
                paused: false,
                expected_down: true,
            });
        }
        Ok(Cluster {
            nodes,
            settings,
            lab,
            http: HttpClient::new().with_cluster_secret(Some(secret.trim())),
            crashes: Vec::new(),
            next_raft_id: count + 1,
            start,
        })
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn api(&self, id: u64) -> String {
        self.node(id).api.clone()
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// The node's home (its tmpfs mount).
    pub fn home(&self, id: u64) -> PathBuf {
        self.settings.dir.join(format!("node{id}"))
    }

    /// Starts node `id`'s process inside its namespace (no-op if it runs).
    pub fn start_node(&mut self, id: u64) -> Result<(), ClusterError> {
        if self.node(id).running() {
            return Ok(());
        }
        let exe = self.settings.exe.clone();
        let node = self.node_mut(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|source| ClusterError::Io {
                what: format!("open {}", node.log.display()),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| ClusterError::Io {
            what: "duplicate the log file handle".into(),
            source,
        })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node_ns(id)])
            .arg(&exe)
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it makes the node die with the harness even if the harness is SIGKILLed.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Io {
            what: format!("start node {id}"),
            source,
        })?;
        node.child = Some(child);
        node.paused = false;
        node.expected_down = false;
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub async fn kill_node(&mut self, id: u64) {
        let node = self.node_mut(id);
        node.expected_down = true;
        if let Some(pid) = node.pid() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        if let Some(mut child) = node.child.take() {
            let _ = child.wait().await;
        }
        node.paused = false;
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 15 s). Returns the exit status.
    pub async fn stop_node(&mut self, id: u64) -> Option<String> {
        let node = self.node_mut(id);
        node.expected_down = true;
        let pid = node.pid()?;
        let _ = kill(pid, Signal::SIGCONT);
        let _ = kill(pid, Signal::SIGTERM);
        let mut child = node.child.take()?;
        node.paused = false;
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(status) => Some(status.map_or_else(|e| e.to_string(), |s| s.to_string())),
            Err(_) => {
                let _ = child.kill().await;
                Some("did not stop within 15 s after SIGTERM; killed".into())
            }
        }
    }

    pub fn pause_node(&mut self, id: u64) {
        let node = self.node_mut(id);
        if let Some(pid) = node.pid() {
            if kill(pid, Signal::SIGSTOP).is_ok() {
                node.paused = true;
            }
        }
    }

    pub fn resume_node(&mut self, id: u64) {
        let node = self.node_mut(id);
        if let Some(pid) = node.pid() {
            let _ = kill(pid, Signal::SIGCONT);
        }
        node.paused = false;
    }

    /// Notes every node whose process has exited on its own since the last look, and forgets
    /// its handle so it can be restarted. Returns the crashed ids.
    pub fn reap(&mut self, expected: &[u64]) -> Vec<u64> {
        let at_ms = self.start.elapsed().as_millis() as u64;
        let mut found = Vec::new();
        for node in &mut self.nodes {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                node.paused = false;
                if !node.expected_down && !expected.contains(&node.id) {
                    self.crashes.push(Crash {
                        node: node.id,
                        at_ms,
                        status: status.to_string(),
                    });
                }
                found.push(node.id);
            }
        }
        found
    }

    /// GET a JSON document from node `id`'s API.
    pub async fn get_json(&self, id: u64, path: &str, timeout: Duration) -> Option<Value> {
        let resp = self
            .http
            .request(
                hyper::Method::GET,
                &self.node(id).api,
                path,
                &[],
                bytes::Bytes::new(),
                timeout,
            )
            .await
            .ok()?;
        if !resp.status.is_success() {
            return None;
        }
        serde_json::from_slice(&resp.body).ok()
    }

    /// Node `id`'s `/api/v1/status`, if it answers quickly.
    pub async fn status(&self, id: u64) -> Option<Value> {
        self.get_json(id, "/api/v1/status", Duration::from_millis(800))
            .await
    }

    /// The leader as the nodes see it: the node that calls itself leader in the highest term.
    pub async fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for node in &self.nodes {
            if !node.running() || node.paused {
                continue;
            }
            if let Some(s) = self.status(node.id).await {
                if s["role"] == "leader" {
                    let term = s["term"].as_u64().unwrap_or(0);
                    if best.map_or(true, |(t, _)| t < term) {
                        best = Some((term, node.id));
                    }
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Waits until `id` answers `/healthz`.
    pub async fn wait_healthy(&self, id: u64, within: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .get_json(id, "/healthz", Duration::from_millis(500))
                .await
                .is_some()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ClusterError::Timeout(format!(
            "node {id} did not answer /healthz within {within:?}"
        )))
    }

    /// Waits until node 1 reports a leader and every node as a voter.
    pub async fn wait_formed(&self, within: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + within;
        let want = self.nodes.len();
        while Instant::now() < deadline {
            if let Some(s) = self.status(1).await {
                let voters = s["members"]
                    .as_array()
                    .map_or(0, |m| m.iter().filter(|n| n["voter"] == true).count());
                if voters == want && !s["leader"].is_null() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ClusterError::Timeout(format!(
            "the cluster did not form ({want} voters and a leader) within {within:?}"
        )))
    }

    /// Fills node `id`'s tmpfs with a ballast file until the disk is full.
    pub fn fill_disk(&self, id: u64) -> Result<u64, ClusterError> {
        use std::io::Write;
        let path = ballast(&self.home(id));
        let mut f = std::fs::File::create(&path).map_err(|source| ClusterError::Io {
            what: format!("create {}", path.display()),
            source,
        })?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        // Bounded by the tmpfs size: the write fails with ENOSPC once it is full.
        while written < (self.settings.tmpfs_mb + 1) << 20 {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        Ok(written)
    }

    /// Gives the stopped node in slot `id` an empty data dir and a fresh Raft id, set to join
    /// through the other nodes when it starts. Returns the new id.
    pub fn wipe_as_new_node(&mut self, id: u64) -> Result<u64, ClusterError> {
        assert!(!self.node(id).running(), "wipe a stopped node only");
        let home = self.home(id);
        let data = home.join("data");
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(|source| ClusterError::Io {
                what: format!("wipe {}", data.display()),
                source,
            })?;
        }
        let raft_id = self.next_raft_id;
        self.next_raft_id += 1;
        let join: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| n.api.clone())
            .collect();
        let addr = self.lab.addr(id);
        let config = self.node(id).config.clone();
        write_config(&config, &self.settings, &addr, &home, raft_id, &join)?;
        self.node_mut(id).raft_id = raft_id;
        Ok(raft_id)
    }

    /// Deletes node `id`'s ballast, if any.
    pub fn free_disk(&self, id: u64) {
        let _ = std::fs::remove_file(ballast(&self.home(id)));
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Kills every node at once (for drop and interruption; no waiting).
    fn kill_all_now(&mut self) {
        for node in &mut self.nodes {
            node.expected_down = true;
            if let Some(pid) = node.pid() {
                let _ = kill(pid, Signal::SIGCONT);
                let _ = kill(pid, Signal::SIGKILL);
            }
            if let Some(mut child) = node.child.take() {
                // Reap it if it is already gone; the runtime reaps it later otherwise.
                let _ = child.try_wait();
            }
        }
    }
}

/// Writes a node's config: it bootstraps when `join` is empty, and joins through `join` else.
fn write_config(
    path: &Path,
    settings: &NodeSettings,
    addr: &str,
    home: &Path,
    raft_id: u64,
    join: &[String],
) -> Result<(), ClusterError> {
    let start_line = if join.is_empty() {
        "bootstrap = true".to_string()
    } else {
        let list: Vec<String> = join.iter().map(|a| format!("\"{a}\"")).collect();
        format!("join = [{}]", list.join(", "))
    };
    let text = format!(
        "# Written by chatraftd-chaos.\n\
         node_id = {raft_id}\n\
         data_dir = \"{}\"\n\
         {start_line}\n\n\
         [api]\nlisten = \"{addr}:{API_PORT}\"\nwrite_timeout_ms = {}\nsse_keepalive_secs = 1\n\n\
         [raft]\nlisten = \"{addr}:{RAFT_PORT}\"\nsnapshot_threshold = {}\nkeep_logs_after_snapshot = {}\n\n\
         [security]\ncluster_secret_file = \"{}\"\n\n\
         [limits]\nwrite_rate_per_sec = 1000000000\nwrite_burst = 1000000000\n\
         max_subscribers_per_address = 100000\n\n\
         [log]\nlevel = \"info\"\n",
        home.join("data").display(),
        settings.write_timeout_ms,
        settings.snapshot_threshold,
        (settings.snapshot_threshold / 4).max(1),
        settings.dir.join("cluster-secret").display(),
    );
    std::fs::write(path, text).map_err(|source| ClusterError::Io {
        what: format!("write {}", path.display()),
        source,
    })
}

fn ballast(home: &Path) -> PathBuf {
    home.join("ballast")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all_now();
        self.lab.teardown();
    }
}
