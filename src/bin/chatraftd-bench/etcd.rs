//! A three-member etcd cluster (Debian's etcd-server) on loopback, driven through its
//! HTTP/JSON gateway: writes are `POST /v3/kv/put`, subscribers are `POST /v3/watch` streams.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde_json::Value;
use tokio::time::Instant;

use crate::fanout::Shared;
use crate::http::{next_chunk, Conn, Http};
use crate::load::{find_stamp, payload, Lines, Writer};
use crate::procs::{free_port, Proc};

const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Etcd {
    pub procs: Vec<Proc>,
    pub clients: Vec<String>,
    pub http: Http,
}

impl Etcd {
    pub async fn start(bin: &Path, root: &Path) -> Result<Etcd, String> {
        let peers: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let clients: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{}=http://{p}", i + 1))
            .collect();
        let mut procs = Vec::new();
        for i in 0..3 {
            let dir = root.join(format!("e{}", i + 1));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut cmd = Command::new(bin);
            cmd.arg("--name")
                .arg(format!("e{}", i + 1))
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--listen-client-urls")
                .arg(format!("http://{}", clients[i]))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}", clients[i]))
                .arg("--listen-peer-urls")
                .arg(format!("http://{}", peers[i]))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}", peers[i]))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-token")
                .arg("chatraftd-bench")
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-level")
                .arg("warn");
            procs.push(Proc::spawn(
                &format!("etcd e{}", i + 1),
                &mut cmd,
                &dir.join("log.txt"),
            )?);
        }
        let mut etcd = Etcd {
            procs,
            clients,
            http: Http::new(Duration::from_secs(30)),
        };
        let start = Instant::now();
        for c in etcd.clients.clone() {
            loop {
                if let Ok((code, body)) = etcd.http.get(&c, "/health").await {
                    if code.is_success() && String::from_utf8_lossy(&body).contains("true") {
                        break;
                    }
                }
                for p in &mut etcd.procs {
                    if let Some(s) = p.exited() {
                        return Err(format!("{} exited ({s}):\n{}", p.name, p.log_tail()));
                    }
                }
                if start.elapsed() > START_TIMEOUT {
                    return Err(format!("etcd {c} not healthy within {START_TIMEOUT:?}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(etcd)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Proc::pid).collect()
    }

    /// The client address of the current leader.
    pub async fn leader(&self) -> Result<String, String> {
        for c in &self.clients {
            let (_, body) = self
                .http
                .post_json(c, "/v3/maintenance/status", Bytes::from_static(b"{}"))
                .await?;
            let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            if v["leader"] == v["header"]["member_id"] && !v["leader"].is_null() {
                return Ok(c.clone());
            }
        }
        Err("etcd: no member says it is the leader".into())
    }

    pub async fn stop(&mut self) {
        for p in &mut self.procs {
            p.stop(Duration::from_secs(20)).await;
        }
    }
}

/// Puts one key per message.
pub struct EtcdWriter {
    conn: Conn,
    prefix: String,
}

impl EtcdWriter {
    pub fn new(http: &Http, addr: &str, prefix: &str, id: usize) -> Self {
        EtcdWriter {
            conn: Conn::new(addr, http.timeout()),
            prefix: format!("{prefix}/{id}"),
        }
    }
}

impl Writer for EtcdWriter {
    async fn send(&mut self, n: u64) -> Result<(), String> {
        let key = format!("{}/{n}", self.prefix);
        let body = format!(
            "{{\"key\":\"{}\",\"value\":\"{}\"}}",
            b64(key.as_bytes()),
            b64(payload(&key).as_bytes())
        );
        match self.conn.post_json("/v3/kv/put", body.as_bytes()).await? {
            (200..=299, _) => Ok(()),
            (code, body) => Err(format!("{code}: {}", String::from_utf8_lossy(&body))),
        }
    }
}

/// One watch on every key under `prefix/`, counting deliveries into `shared`.
pub async fn subscriber(http: Http, addr: String, prefix: String, idx: usize, shared: Arc<Shared>) {
    let range_end = format!("{prefix}0"); // '0' follows '/'
    let body = format!(
        "{{\"create_request\":{{\"key\":\"{}\",\"range_end\":\"{}\"}}}}",
        b64(format!("{prefix}/").as_bytes()),
        b64(range_end.as_bytes())
    );
    let mut permit = Some(shared.connect_permit().await);
    let mut stream = match http
        .open_stream(Method::POST, &addr, "/v3/watch", Bytes::from(body))
        .await
    {
        Ok(s) => s,
        Err(e) => return shared.failed(e),
    };
    let mut lines = Lines::default();
    let mut created = false;
    let mut stop = shared.stop.clone();
    loop {
        let chunk = tokio::select! {
            c = next_chunk(&mut stream) => c,
            _ = stop.changed() => break,
        };
        let chunk = match chunk {
            Some(Ok(c)) => c,
            Some(Err(e)) => return shared.failed(e),
            None => break,
        };
        let mut stamps = Vec::new();
        lines.feed(&chunk, |line| {
            if !created && line.windows(9).any(|w| w == b"\"created\"") {
                created = true;
            }
            let mut rest = line;
            while let Some(at) = rest.windows(9).position(|w| w == b"\"value\":\"") {
                rest = &rest[at + 9..];
                let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
                if let Some(t) = unb64(&rest[..end]).as_deref().and_then(find_stamp) {
                    stamps.push(t);
                }
                rest = &rest[end..];
            }
        });
        if created && permit.take().is_some() {
            shared.ready();
        }
        shared.delivered(idx, &stamps);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as the gateway wants `bytes` fields.
pub fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64; `None` on a character outside the alphabet.
pub fn unb64(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for &ch in text {
        let v = match ch {
            b'A'..=b'Z' => ch - b'A',
            b'a'..=b'z' => ch - b'a' + 26,
            b'0'..=b'9' => ch - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "f/"] {
            assert_eq!(unb64(b64(s.as_bytes()).as_bytes()).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
    }
}
