//! Load shapes shared by every system: the message payload (with a send-time stamp the
//! subscribers read back), a closed-loop writer pool, and the line scanner that finds stamps
//! in whatever a subscriber receives.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::procs::Meter;
use crate::stats::Histogram;

/// The bytes of every payload, about the size of a chat message.
pub const PAYLOAD_BYTES: usize = 200;

/// The instant all stamps count from.
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Microseconds since the bench's epoch.
pub fn now_micros() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// `"<id>~T<micros>~xxxx..."`, padded to [`PAYLOAD_BYTES`]; only `[A-Za-z0-9~-]`, so it
/// stays the same in JSON and needs no escaping anywhere.
pub fn payload(id: &str) -> String {
    let mut p = format!("{id}~T{}~", now_micros());
    while p.len() < PAYLOAD_BYTES {
        p.push('x');
    }
    p
}

/// The send stamp in a payload-bearing line, if any.
pub fn find_stamp(line: &[u8]) -> Option<u64> {
    let at = line.windows(2).position(|w| w == b"~T")?;
    let digits = &line[at + 2..];
    let mut v: u64 = 0;
    let mut n = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        v = v * 10 + u64::from(b - b'0');
        n += 1;
    }
    (n > 0).then_some(v)
}

/// One writer with one request in flight at a time.
pub trait Writer: Send + 'static {
    /// Sends message `n` of this writer and waits for its acknowledgement.
    fn send(&mut self, n: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// The outcome of one closed-loop run.
pub struct LoadResult<W> {
    pub writers: Vec<W>,
    pub hist: Histogram,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// CPU seconds the servers used meanwhile (user plus system, all of them together).
    pub server_cpu: f64,
    /// CPU seconds this process (the clients) used meanwhile.
    pub bench_cpu: f64,
    /// Context switches of the servers' threads meanwhile.
    pub server_switches: u64,
}

impl<W> LoadResult<W> {
    pub fn to_json(&self) -> Value {
        let acked = self.hist.count();
        let secs = self.elapsed.as_secs_f64();
        let mut v = json!({
            "acked": acked,
            "errors": self.errors,
            "secs": (secs * 1000.0).round() / 1000.0,
            "msgs_per_s": (acked as f64 / secs).round(),
        });
        if let (Value::Object(a), Value::Object(b)) = (&mut v, self.hist.summary_ms()) {
            a.extend(b);
        }
        if let Some(e) = &self.first_error {
            v["first_error"] = json!(e);
        }
        // What each acknowledged message cost the machine: on two shared cores, CPU per
        // message is what bounds throughput, so it says more than msgs/s alone.
        let per_msg = |cpu: f64| (cpu * 1e6 / acked.max(1) as f64).round();
        v["server_cpu_pct"] = json!((self.server_cpu / secs * 100.0).round());
        v["bench_cpu_pct"] = json!((self.bench_cpu / secs * 100.0).round());
        v["server_cpu_us_per_msg"] = json!(per_msg(self.server_cpu));
        v["bench_cpu_us_per_msg"] = json!(per_msg(self.bench_cpu));
        // Unlike CPU time, which a busy neighbour on the host inflates, this count moves
        // only with what the servers do.
        v["server_switches_per_msg"] =
            json!((self.server_switches as f64 / acked.max(1) as f64 * 10.0).round() / 10.0);
        v
    }
}

/// Every writer sends back to back until `duration` has passed or `max_total` messages were
/// started, whichever comes first. Latency counts only acknowledged messages; `pids` are the
/// servers whose CPU time is measured.
pub async fn closed_loop<W: Writer>(
    writers: Vec<W>,
    duration: Duration,
    max_total: u64,
    pids: &[u32],
) -> LoadResult<W> {
    let meter = Meter::start(pids);
    let started = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            let started = started.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::default();
                let mut errors = 0u64;
                let mut first_error = None;
                let mut n = 0u64;
                while Instant::now() < deadline
                    && started.fetch_add(1, Ordering::Relaxed) < max_total
                {
                    n += 1;
                    let t = Instant::now();
                    match w.send(n).await {
                        Ok(()) => hist.record(t.elapsed().as_micros() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                            // Back off a little so a refusing server is not spun on.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (w, hist, errors, first_error)
            })
        })
        .collect();
    let mut result = LoadResult {
        writers: Vec::new(),
        hist: Histogram::default(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        server_cpu: 0.0,
        bench_cpu: 0.0,
        server_switches: 0,
    };
    for t in tasks {
        let (w, h, e, fe) = t.await.expect("a writer task panicked");
        result.writers.push(w);
        result.hist.merge(&h);
        result.errors += e;
        if result.first_error.is_none() {
            result.first_error = fe;
        }
    }
    result.elapsed = start.elapsed();
    let usage = meter.read();
    result.server_cpu = usage.server_cpu;
    result.bench_cpu = usage.bench_cpu;
    result.server_switches = usage.server_switches;
    result
}

/// Splits a byte stream into lines, across chunk boundaries.
#[derive(Default)]
pub struct Lines {
    carry: Vec<u8>,
}

impl Lines {
    /// Calls `f` for every complete line in `chunk` (and what was carried over).
    pub fn feed(&mut self, chunk: &[u8], mut f: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if self.carry.is_empty() {
                f(&rest[..nl]);
            } else {
                self.carry.extend_from_slice(&rest[..nl]);
                f(&self.carry);
                self.carry.clear();
            }
            rest = &rest[nl + 1..];
        }
        self.carry.extend_from_slice(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_json_and_chunking() {
        let p = payload("c1-2");
        assert_eq!(p.len(), PAYLOAD_BYTES);
        let line = format!("data:{{\"payload\":\"{p}\",\"seq\":3}}\n");
        let want = find_stamp(line.as_bytes()).expect("stamp present");
        let mut lines = Lines::default();
        let mut got = Vec::new();
        let (a, b) = line.as_bytes().split_at(17);
        lines.feed(a, |l| got.extend(find_stamp(l)));
        assert!(got.is_empty());
        lines.feed(b, |l| got.extend(find_stamp(l)));
        assert_eq!(got, vec![want]);
        assert_eq!(find_stamp(b"no stamp here"), None);
    }
}
