//! A local three-node chatraftd cluster with the default (durable) storage settings, its
//! writer, and the check that every acknowledged message is on every node exactly once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::fanout::Shared;
use crate::http::{next_chunk, Conn, Http};
use crate::load::{find_stamp, payload, Lines, Writer};
use crate::procs::{free_port, Proc};

/// How long starting or joining one node may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Node {
    pub id: u64,
    pub api: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Option<Proc>,
}

pub struct Cluster {
    pub bin: PathBuf,
    pub nodes: Vec<Node>,
    pub http: Http,
    root: PathBuf,
}

/// The cluster's view from `/api/v1/status`.
#[derive(Deserialize, Debug)]
pub struct Status {
    pub role: String,
    pub leader: Option<Leader>,
    pub commit_index: u64,
    pub last_applied: u64,
    #[serde(default)]
    pub snapshot_index: u64,
    pub members: Vec<Member>,
}

#[derive(Deserialize, Debug)]
pub struct Leader {
    pub node_id: u64,
    pub api_addr: String,
}

#[derive(Deserialize, Debug)]
pub struct Member {
    pub voter: bool,
}

impl Cluster {
    /// Starts `n` nodes under `root`: node 1 bootstraps, the others join it.
    pub async fn start(bin: &Path, root: &Path, n: u64) -> Result<Cluster, String> {
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
            http: Http::new(Duration::from_secs(30)),
            root: root.to_path_buf(),
        };
        for id in 1..=n {
            c.add_node(id)?;
            let api = c.nodes.last().map(|x| x.api.clone()).unwrap_or_default();
            c.wait_ready(&api, START_TIMEOUT).await?;
        }
        c.wait_voters(n as usize, START_TIMEOUT).await?;
        Ok(c)
    }

    /// Writes node `id`'s config (joining node 1 unless it is node 1) and starts it.
    pub fn add_node(&mut self, id: u64) -> Result<(), String> {
        let dir = self.root.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let api = format!("127.0.0.1:{}", free_port());
        let raft = format!("127.0.0.1:{}", free_port());
        let start = match self.nodes.first() {
            None => "bootstrap = true".to_string(),
            Some(first) => format!("join = [\"{}\"]", first.api),
        };
        // Every client of the benchmark comes from 127.0.0.1: the per-address write rate
        // and stream limits would measure themselves, so they are lifted out of the way. The
        // node caps stay above the most subscribers one node gets (10,000 over three nodes;
        // `--subscribers` up to about 45,000) and within the bench's open-file limit.
        let secret_file = self.root.join("cluster-secret");
        chatraftd::security::ensure_secret_file(&secret_file)
            .map_err(|e| format!("{}: {e}", secret_file.display()))?;
        let text = format!(
            "node_id = {id}\ndata_dir = \"{}\"\n{start}\n\n[api]\nlisten = \"{api}\"\n\
             write_timeout_ms = 10000\nmax_connections = 18000\n\n[raft]\nlisten = \"{raft}\"\n\n\
             [security]\ncluster_secret_file = \"{}\"\n\n\
             [limits]\nwrite_rate_per_sec = 1000000000\nwrite_burst = 1000000000\n\
             max_subscribers = 15000\nmax_subscribers_per_address = 1000000\n\n\
             [log]\nlevel = \"warn\"\n",
            dir.join("data").display(),
            secret_file.display()
        );
        let config = dir.join("chatraftd.toml");
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        let mut node = Node {
            id,
            api,
            dir,
            config,
            proc: None,
        };
        self.spawn(&mut node)?;
        self.nodes.push(node);
        Ok(())
    }

    fn spawn(&self, node: &mut Node) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(&node.config);
        let p = Proc::spawn(
            &format!("chatraftd node {}", node.id),
            &mut cmd,
            &node.dir.join("log.txt"),
        )?;
        node.proc = Some(p);
        Ok(())
    }

    /// Starts a stopped node again with the same config.
    pub fn restart(&mut self, idx: usize) -> Result<(), String> {
        let mut node = std::mem::replace(
            &mut self.nodes[idx],
            Node {
                id: 0,
                api: String::new(),
                dir: PathBuf::new(),
                config: PathBuf::new(),
                proc: None,
            },
        );
        let r = self.spawn(&mut node);
        self.nodes[idx] = node;
        r
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref()?.pid())
            .collect()
    }

    pub fn apis(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api.clone()).collect()
    }

    pub async fn status(&self, api: &str) -> Result<Status, String> {
        let (code, body) = self.http.get(api, "/api/v1/status").await?;
        if !code.is_success() {
            return Err(format!("{api}: status {code}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{api}: status JSON: {e}"))
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&mut self, api: &str, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if let Ok((code, _)) = self.http.get(api, "/readyz").await {
                if code.is_success() {
                    return Ok(start.elapsed());
                }
            }
            if let Some(node) = self.nodes.iter_mut().find(|n| n.api == api) {
                if let Some(p) = node.proc.as_mut() {
                    if let Some(s) = p.exited() {
                        return Err(format!("{} exited ({s}):\n{}", p.name, p.log_tail()));
                    }
                }
            }
            if start.elapsed() > timeout {
                return Err(format!("{api} not ready within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_voters(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.status(&self.nodes[0].api).await {
                if s.members.iter().filter(|m| m.voter).count() == n && s.leader.is_some() {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                return Err(format!("{n} voters not reached within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader's API address and its index in `nodes`.
    pub async fn leader(&self) -> Result<(usize, String), String> {
        let start = Instant::now();
        loop {
            for n in &self.nodes {
                if let Ok(s) = self.status(&n.api).await {
                    if let Some(l) = s.leader {
                        if let Some(i) = self.nodes.iter().position(|x| x.id == l.node_id) {
                            return Ok((i, l.api_addr));
                        }
                    }
                }
            }
            if start.elapsed() > START_TIMEOUT {
                return Err("no leader".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every node (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.stop(Duration::from_secs(20)).await;
            }
        }
    }
}

/// Writes messages to one node of the cluster, remembering which were acknowledged.
pub struct CrWriter {
    conn: Conn,
    conv: String,
    /// This writer's number, part of every message id.
    pub id: usize,
    /// Numbers of the messages answered 201.
    pub acked: Vec<u64>,
    /// Messages with no clear answer (may or may not be stored).
    pub unknown: u64,
}

impl CrWriter {
    pub fn new(http: &Http, addr: &str, conv: &str, id: usize) -> Self {
        CrWriter {
            conn: Conn::new(addr, http.timeout()),
            conv: conv.to_string(),
            id,
            acked: Vec::new(),
            unknown: 0,
        }
    }
}

impl Writer for CrWriter {
    async fn send(&mut self, n: u64) -> Result<(), String> {
        let body = format!(
            "{{\"conv_id\":\"{}\",\"sender\":\"bench\",\"payload\":\"{}\"}}",
            self.conv,
            payload(&format!("c{}-{n}", self.id))
        );
        match self
            .conn
            .post_json("/api/v1/message", body.as_bytes())
            .await
        {
            Ok((201, _)) => {
                self.acked.push(n);
                Ok(())
            }
            Ok((code, body)) => {
                if code >= 500 {
                    self.unknown += 1;
                }
                Err(format!("{code}: {}", String::from_utf8_lossy(&body)))
            }
            Err(e) => {
                self.unknown += 1;
                Err(e)
            }
        }
    }
}

#[derive(Deserialize)]
struct Page {
    messages: Vec<Rec>,
    next_from: u64,
    last_seq: u64,
}

#[derive(Deserialize)]
struct Rec {
    index: u64,
    seq: u64,
    payload: String,
}

/// Pages through `conv` on every node and checks every acknowledged message is there exactly
/// once, that nothing appears twice, and that every node holds the same sequence.
pub async fn verify(cluster: &Cluster, conv: &str, writers: &[CrWriter]) -> Value {
    let acked: usize = writers.iter().map(|w| w.acked.len()).sum();
    let unknown: u64 = writers.iter().map(|w| w.unknown).sum();
    let mut nodes = Vec::new();
    let mut fingerprints = Vec::new();
    let mut ok = true;
    for n in &cluster.nodes {
        let mut seen: HashMap<String, u32> = HashMap::new();
        let mut fp: u64 = 0xcbf2_9ce4_8422_2325;
        let mut from = 1;
        let mut count = 0u64;
        let mut err = None;
        loop {
            let path = format!(
                "/api/v1/messages?conv_id={conv}&from={from}&limit=1000&consistency=linearizable"
            );
            let page: Page = match cluster.http.get(&n.api, &path).await {
                Ok((c, b)) if c.is_success() => match serde_json::from_slice(&b) {
                    Ok(p) => p,
                    Err(e) => {
                        err = Some(format!("page JSON: {e}"));
                        break;
                    }
                },
                Ok((c, b)) => {
                    err = Some(format!("{c}: {}", String::from_utf8_lossy(&b)));
                    break;
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            };
            for m in &page.messages {
                count += 1;
                let key = m.payload.split('~').next().unwrap_or("").to_string();
                // FNV-1a over (index, seq, message id): equal on every node iff same order.
                let (index, seq) = (m.index.to_le_bytes(), m.seq.to_le_bytes());
                for b in index.iter().chain(&seq).chain(key.as_bytes()) {
                    fp = (fp ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
                *seen.entry(key).or_default() += 1;
            }
            if page.messages.is_empty() || page.next_from > page.last_seq {
                break;
            }
            from = page.next_from;
        }
        let missing = writers
            .iter()
            .flat_map(|w| w.acked.iter().map(move |k| format!("c{}-{k}", w.id)))
            .filter(|k| seen.get(k).copied().unwrap_or(0) != 1)
            .count();
        let dup = seen.values().filter(|&&c| c > 1).count();
        let extra = count.saturating_sub(acked as u64);
        let node_ok = err.is_none() && missing == 0 && dup == 0 && extra <= unknown;
        ok &= node_ok;
        fingerprints.push(fp);
        nodes.push(json!({
            "node": n.id, "stored": count, "missing_or_not_once": missing,
            "duplicates": dup, "ok": node_ok, "error": err,
        }));
    }
    let same_order = fingerprints.windows(2).all(|w| w[0] == w[1]);
    json!({
        "conv_id": conv, "acked": acked, "unknown_outcome": unknown,
        "same_order_on_every_node": same_order, "ok": ok && same_order, "nodes": nodes,
    })
}

/// One SSE subscriber to new messages of `conv`, counting deliveries into `shared`.
pub async fn subscriber(http: Http, addr: String, conv: String, idx: usize, shared: Arc<Shared>) {
    let permit = shared.connect_permit().await;
    let path = format!("/api/v1/stream?conv_id={conv}");
    let mut stream = match http
        .open_stream(Method::GET, &addr, &path, Bytes::new())
        .await
    {
        Ok(s) => s,
        Err(e) => return shared.failed(e),
    };
    drop(permit);
    shared.ready();
    let mut lines = Lines::default();
    let mut stop = shared.stop.clone();
    let mut stamps = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = next_chunk(&mut stream) => c,
            _ = stop.changed() => break,
        };
        match chunk {
            Some(Ok(c)) => {
                stamps.clear();
                lines.feed(&c, |l| {
                    if l.starts_with(b"data:") {
                        stamps.extend(find_stamp(l));
                    }
                });
                shared.delivered(idx, &stamps);
            }
            Some(Err(e)) => return shared.failed(e),
            None => break,
        }
    }
}

/// Replays `conv` over SSE from seq 1 until `count` events arrived; returns events/s.
pub async fn catch_up_stream(
    http: &Http,
    addr: &str,
    conv: &str,
    count: u64,
    timeout: Duration,
) -> Result<Value, String> {
    let start = Instant::now();
    let path = format!("/api/v1/stream?conv_id={conv}&from=1");
    let mut stream = http
        .open_stream(Method::GET, addr, &path, Bytes::new())
        .await?;
    let first_byte = start.elapsed();
    let mut lines = Lines::default();
    let mut seen = 0u64;
    let mut bytes = 0u64;
    while seen < count {
        let left = timeout.saturating_sub(start.elapsed());
        let chunk = match tokio::time::timeout(left, next_chunk(&mut stream)).await {
            Err(_) => break,
            Ok(None) => return Err("the stream ended early".into()),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(c))) => c,
        };
        bytes += chunk.len() as u64;
        lines.feed(&chunk, |l| {
            if l.starts_with(b"data:") {
                seen += 1;
            }
        });
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "sse_messages": seen,
        "sse_secs": (secs * 1000.0).round() / 1000.0,
        "sse_msgs_per_s": (seen as f64 / secs).round(),
        "sse_mib_per_s": ((bytes as f64 / secs / 1048576.0) * 10.0).round() / 10.0,
        "sse_first_byte_ms": first_byte.as_millis() as u64,
        "sse_complete": seen >= count,
    }))
}

/// Pages through `conv` with `GET /api/v1/messages` (1,000 a page); returns messages/s.
pub async fn catch_up_pages(
    http: &Http,
    addr: &str,
    conv: &str,
    timeout: Duration,
) -> Result<Value, String> {
    #[derive(Deserialize)]
    struct CountPage {
        messages: Vec<serde::de::IgnoredAny>,
        next_from: u64,
        last_seq: u64,
    }
    let start = Instant::now();
    let mut from = 1;
    let mut seen = 0u64;
    let mut pages = 0u64;
    while start.elapsed() < timeout {
        let path = format!("/api/v1/messages?conv_id={conv}&from={from}&limit=1000");
        let (code, body) = http.get(addr, &path).await?;
        if !code.is_success() {
            return Err(format!("{code}: {}", String::from_utf8_lossy(&body)));
        }
        let p: CountPage = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        pages += 1;
        seen += p.messages.len() as u64;
        if p.messages.is_empty() || p.next_from > p.last_seq {
            break;
        }
        from = p.next_from;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "pages_messages": seen,
        "pages": pages,
        "pages_secs": (secs * 1000.0).round() / 1000.0,
        "pages_msgs_per_s": (seen as f64 / secs).round(),
    }))
}
