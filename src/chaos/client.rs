//! The clients of a chaos run and the recorder of what they see: writers that retry with the
//! same `msg_id` on another node, linearizable readers, and stream subscribers that drop their
//! connection every few seconds and resume with `Last-Event-ID`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;

use super::history::{Action, Entry, Op, Outcome, ReadResult, StreamEvent, Subscription};
use super::prng::Prng;
use crate::network::{HttpClient, HttpError};

/// How long a client waits for any one answer before calling it indeterminate.
const OP_TIMEOUT: Duration = Duration::from_secs(4);

/// Collects operations from every client, stamped on one monotonic clock. An operation is
/// registered when it is sent, so one whose client is cancelled before the answer still counts
/// (as indeterminate): a write that lands without being in the history would look invented.
pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    ops: Mutex<Vec<Op>>,
    /// Sent and not yet answered, by id.
    pending: Mutex<BTreeMap<u64, Op>>,
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Recorder {
            start,
            next_id: AtomicU64::new(0),
            ops: Mutex::new(Vec::new()),
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Registers an operation as sent; returns it with its id.
    fn begin(&self, mut op: Op) -> Op {
        op.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        op.detail = "no answer before the client was stopped".into();
        // A poisoned lock only means another client panicked; its ops are still good.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(op.id, op.clone());
        op
    }

    /// Records the answer of an operation registered with `begin`.
    fn record(&self, op: Op) -> Op {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&op.id);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.push(op.clone());
        op
    }

    /// Every operation so far: the answered ones, and those still waiting as indeterminate.
    pub fn ops(&self) -> Vec<Op> {
        let now = self.now_ns();
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        ops.extend(pending.values().cloned().map(|mut op| {
            op.complete_ns = now;
            op
        }));
        ops.sort_by_key(|o| o.id);
        ops
    }
}

/// What every client shares.
pub struct Clients {
    pub http: HttpClient,
    /// API address of node N at index N - 1.
    pub apis: Vec<String>,
    pub recorder: Arc<Recorder>,
}

impl Clients {
    fn api(&self, node: u64) -> &str {
        &self.apis[node as usize - 1]
    }

    fn nodes(&self) -> u64 {
        self.apis.len() as u64
    }

    /// One `POST /api/v1/message`, recorded.
    pub async fn write(
        &self,
        process: &str,
        node: u64,
        conv_id: &str,
        msg_id: &str,
        sender: &str,
        payload: &str,
    ) -> Op {
        let body = serde_json::json!({
            "conv_id": conv_id, "msg_id": msg_id, "sender": sender, "payload": payload,
        });
        let mut op = self.recorder.begin(Op {
            id: 0,
            process: process.to_string(),
            node,
            invoke_ns: self.recorder.now_ns(),
            complete_ns: 0,
            action: Action::Write {
                conv_id: conv_id.to_string(),
                msg_id: msg_id.to_string(),
                sender: sender.to_string(),
                payload: payload.to_string(),
            },
            outcome: Outcome::Indeterminate,
            status: None,
            detail: String::new(),
            written: None,
            read: None,
        });
        let resp = self
            .http
            .request(
                hyper::Method::POST,
                self.api(node),
                "/api/v1/message",
                &[("content-type", "application/json")],
                Bytes::from(body.to_string()),
                OP_TIMEOUT,
            )
            .await;
        op.complete_ns = self.recorder.now_ns();
        op.detail.clear();
        classify(&mut op, resp, |op, json| {
            op.written = Entry::from_record(json);
            op.written.is_some()
        });
        self.recorder.record(op)
    }

    /// One linearizable `GET /api/v1/messages`, recorded.
    pub async fn read(&self, process: &str, node: u64, conv_id: &str, from: u64) -> Op {
        let path = format!(
            "/api/v1/messages?conv_id={conv_id}&from={from}&limit=100&consistency=linearizable"
        );
        let mut op = self.recorder.begin(Op {
            id: 0,
            process: process.to_string(),
            node,
            invoke_ns: self.recorder.now_ns(),
            complete_ns: 0,
            action: Action::Read {
                conv_id: conv_id.to_string(),
                from,
            },
            outcome: Outcome::Indeterminate,
            status: None,
            detail: String::new(),
            written: None,
            read: None,
        });
        let resp = self
            .http
            .request(
                hyper::Method::GET,
                self.api(node),
                &path,
                &[],
                Bytes::new(),
                OP_TIMEOUT,
            )
            .await;
        op.complete_ns = self.recorder.now_ns();
        op.detail.clear();
        classify(&mut op, resp, |op, json| {
            let last_seq = json["last_seq"].as_u64();
            let entries: Option<Vec<Entry>> = json["messages"]
                .as_array()
                .map(|m| m.iter().map(Entry::from_record).collect())
                .and_then(|v: Option<Vec<Entry>>| v);
            match (last_seq, entries) {
                (Some(last_seq), Some(entries)) => {
                    op.read = Some(ReadResult { last_seq, entries });
                    true
                }
                _ => false,
            }
        });
        self.recorder.record(op)
    }
}

/// Sorts an answer into ok / fail / indeterminate. A request that never connected was never
/// sent, so it is a definite failure; any other missing answer, and any 5xx, may or may not
/// have taken effect.
fn classify(
    op: &mut Op,
    resp: Result<crate::network::HttpResponse, HttpError>,
    parse_ok: impl FnOnce(&mut Op, &serde_json::Value) -> bool,
) {
    match resp {
        Ok(r) => {
            let status = r.status.as_u16();
            op.status = Some(status);
            let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            if r.status.is_success() {
                if parse_ok(op, &json) {
                    op.outcome = Outcome::Ok;
                } else {
                    op.detail = "a 2xx answer the client could not read".into();
                }
            } else {
                op.detail = json["error"]["code"]
                    .as_str()
                    .unwrap_or("no error code")
                    .to_string();
                if r.status.is_client_error() {
                    op.outcome = Outcome::Fail;
                }
            }
        }
        Err(HttpError::Unreachable { reason, .. })
            if reason.starts_with("client error (Connect)") =>
        {
            op.outcome = Outcome::Fail;
            op.detail = format!("not sent: {reason}");
        }
        Err(e) => op.detail = e.to_string(),
    }
}

/// A reproducible version-4 UUID for a client `msg_id`.
pub fn msg_id(rng: &mut Prng) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Sleeps `ms`, or less if `stop` turns true.
async fn pause(stop: &mut watch::Receiver<bool>, ms: u64) {
    let _ = tokio::time::timeout(Duration::from_millis(ms), stop.wait_for(|s| *s)).await;
}

/// A writer: sends new messages to random nodes until `stop` (or `max_ops` messages), and
/// retries a share of them with the same `msg_id` on another node, as a client does after a
/// timeout (and, now and then, after a success).
pub async fn writer(
    clients: Arc<Clients>,
    idx: u64,
    mut rng: Prng,
    convs: Vec<String>,
    mut stop: watch::Receiver<bool>,
    max_ops: u64,
) {
    let process = format!("writer-{idx}");
    for n in 0..max_ops {
        if *stop.borrow() {
            break;
        }
        let conv = rng.pick(&convs).clone();
        let id = msg_id(&mut rng);
        let payload = format!("{process}-{n}");
        let mut node = rng.between(1, clients.nodes());
        for _attempt in 0..3 {
            let op = clients
                .write(&process, node, &conv, &id, &process, &payload)
                .await;
            let retry = match op.outcome {
                Outcome::Ok => rng.chance(0.08),
                Outcome::Fail | Outcome::Indeterminate => rng.chance(0.7),
            };
            if !retry || *stop.borrow() {
                break;
            }
            node = other_node(&mut rng, node, clients.nodes());
            let delay = rng.between(50, 200);
            pause(&mut stop, delay).await;
        }
        let delay = rng.between(0, 30);
        pause(&mut stop, delay).await;
    }
}

fn other_node(rng: &mut Prng, not: u64, nodes: u64) -> u64 {
    if nodes == 1 {
        return not;
    }
    let n = rng.between(1, nodes - 1);
    if n >= not {
        n + 1
    } else {
        n
    }
}

/// A reader: linearizable reads of the recent end of a conversation on random nodes.
pub async fn reader(
    clients: Arc<Clients>,
    idx: u64,
    mut rng: Prng,
    convs: Vec<String>,
    mut stop: watch::Receiver<bool>,
    max_ops: u64,
) {
    let process = format!("reader-{idx}");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..max_ops {
        let delay = rng.between(100, 400);
        pause(&mut stop, delay).await;
        if *stop.borrow() {
            break;
        }
        let conv = rng.pick(&convs).clone();
        let node = rng.between(1, clients.nodes());
        let from = last
            .get(&conv)
            .copied()
            .unwrap_or(0)
            .saturating_sub(20)
            .max(1);
        let op = clients.read(&process, node, &conv, from).await;
        if let Some(r) = &op.read {
            let seen = last.entry(conv).or_insert(0);
            *seen = (*seen).max(r.last_seq);
        }
    }
}

/// A stream subscriber. It starts at seq 1 on its own node, holds each connection for a few
/// seconds, then drops it and resumes with `Last-Event-ID`, on its own node or, one time in
/// four, on another one (as a client fails over). It ends on `stop`, or once `target` names a
/// last seq for its conversation and it has received it.
pub async fn subscriber(
    recorder: Arc<Recorder>,
    apis: Vec<String>,
    sub: Arc<Mutex<Subscription>>,
    mut rng: Prng,
    mut stop: watch::Receiver<bool>,
    target: watch::Receiver<Option<BTreeMap<String, u64>>>,
) {
    let conv = sub
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .conv_id
        .clone();
    let home = sub.lock().unwrap_or_else(|p| p.into_inner()).node;
    let mut last = 0u64;
    let mut connection = 0u32;
    loop {
        let node = if connection > 0 && rng.chance(0.25) {
            rng.between(1, apis.len() as u64)
        } else {
            home
        };
        let api = &apis[node as usize - 1];
        let reached = |last: u64| {
            target
                .borrow()
                .as_ref()
                .is_some_and(|t| last >= t.get(&conv).copied().unwrap_or(0))
        };
        if *stop.borrow() || reached(last) {
            break;
        }
        let hold = Duration::from_millis(rng.between(2000, 6000));
        let deadline = Instant::now() + hold;
        let this = connection;
        let resume_after = last;
        let on_event = |id: u64, data: &str| -> bool {
            let entry = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| Entry::from_record(&v));
            let entry = entry.unwrap_or_else(|| Entry {
                index: 0,
                seq: 0,
                conv_id: String::new(),
                msg_id: format!("unreadable event data: {data}"),
                sender: String::new(),
                payload: String::new(),
            });
            let mut s = sub.lock().unwrap_or_else(|p| p.into_inner());
            s.events.push(StreamEvent {
                at_ns: recorder.now_ns(),
                connection: this,
                node,
                id,
                entry,
            });
            last = id;
            !reached(last)
        };
        let result = tokio::select! {
            r = stream_once(api, &conv, resume_after, deadline, on_event) => r,
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        connection += 1;
        {
            let mut s = sub.lock().unwrap_or_else(|p| p.into_inner());
            s.connections = connection;
        }
        if result.is_err() {
            // The node is down or cut off: back off a little before the next try.
            let delay = rng.between(100, 300);
            pause(&mut stop, delay).await;
        }
    }
}

/// One SSE connection: from seq 1, or after `last` with `Last-Event-ID`, until `deadline`,
/// the end of the stream, or `on_event` returning false.
async fn stream_once(
    api: &str,
    conv: &str,
    last: u64,
    deadline: Instant,
    mut on_event: impl FnMut(u64, &str) -> bool,
) -> Result<(), String> {
    let tcp = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(api))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    // Aborted when this function returns or its future is dropped, so no connection outlives
    // its subscriber.
    let _conn = AbortOnDrop(tokio::spawn(conn));
    async {
        let path = if last == 0 {
            format!("/api/v1/stream?conv_id={conv}&from=1")
        } else {
            format!("/api/v1/stream?conv_id={conv}")
        };
        let mut req = hyper::Request::get(path)
            .header(hyper::header::HOST, api)
            .header(hyper::header::ACCEPT, "text/event-stream");
        if last > 0 {
            req = req.header("last-event-id", last.to_string());
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout_at(deadline, sender.send_request(req))
            .await
            .map_err(|_| "no answer before the hold time ended".to_string())?
            .map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(format!("stream answered {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut id: Option<u64> = None;
        let mut data = String::new();
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) | Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if let Some(event_id) = id.take() {
                        if !on_event(event_id, &data) {
                            return Ok(());
                        }
                    }
                    data.clear();
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => id = value.parse().ok(),
                    "data" => {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(value);
                    }
                    _ => {}
                }
            }
        }
    }
    .await
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes until one is acknowledged (or `within` passes); returns how long that took.
pub async fn probe(clients: &Clients, rng: &mut Prng, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < within {
        let node = rng.between(1, clients.nodes());
        let id = msg_id(rng);
        let op = clients
            .write(
                "probe",
                node,
                "general",
                &id,
                "probe",
                &format!("probe-{n}"),
            )
            .await;
        if op.outcome == Outcome::Ok {
            return Some(start.elapsed());
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_op(msg_id: &str) -> Op {
        Op {
            id: 0,
            process: "writer-0".into(),
            node: 1,
            invoke_ns: 5,
            complete_ns: 0,
            action: Action::Write {
                conv_id: "general".into(),
                msg_id: msg_id.into(),
                sender: "s".into(),
                payload: "p".into(),
            },
            outcome: Outcome::Indeterminate,
            status: None,
            detail: String::new(),
            written: None,
            read: None,
        }
    }

    #[test]
    fn an_operation_never_answered_stays_in_the_history_as_indeterminate() {
        let r = Recorder::new(Instant::now());
        let answered = r.begin(write_op("a"));
        let _cancelled = r.begin(write_op("b"));
        r.record(Op {
            outcome: Outcome::Ok,
            complete_ns: 9,
            ..answered
        });
        let ops = r.ops();
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].msg_id(), ops[0].outcome), (Some("a"), Outcome::Ok));
        assert_eq!(
            (ops[1].msg_id(), ops[1].outcome),
            (Some("b"), Outcome::Indeterminate)
        );
        assert!(ops[1].detail.contains("no answer"));
    }

    #[test]
    fn msg_ids_are_reproducible_v4_uuids() {
        let a = msg_id(&mut Prng::new(1));
        assert_eq!(a, msg_id(&mut Prng::new(1)));
        assert_ne!(a, msg_id(&mut Prng::new(2)));
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 4);
    }
}
