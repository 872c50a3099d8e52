//! Process-wide counters for `GET /metrics`, and the Prometheus text format they are written in.
//!
//! One daemon runs per process, so the counters are plain statics: the store, the API and the
//! stream record into them without any handle being threaded through their constructors. Every
//! counter is an atomic (or a short critical section on a map), cheap enough for the write path.
//! The gauges read from Raft and from disk are not kept here: `api::metrics` reads them at
//! scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed upper bounds (in seconds), cumulative as Prometheus wants it at
/// rendering time. Counts per bucket are atomics, so observing never blocks.
pub struct Histogram {
    /// Upper bounds in seconds, increasing; `+Inf` is implicit.
    bounds: &'static [f64],
    /// One count per bound, plus one for `+Inf` (non-cumulative: each observation lands in one).
    counts: [AtomicU64; MAX_BUCKETS + 1],
    /// Sum of the observations in microseconds.
    sum_micros: AtomicU64,
}

const MAX_BUCKETS: usize = 16;

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` series.
    pub fn render(&self, out: &mut Exposition, name: &str, help: &str) {
        out.header(name, help, "histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            out.sample(
                &format!("{name}_bucket"),
                &[("le", &format_float(*bound))],
                cumulative as f64,
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        out.sample(
            &format!("{name}_bucket"),
            &[("le", "+Inf")],
            cumulative as f64,
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        out.sample(&format!("{name}_sum"), &[], sum);
        out.sample(&format!("{name}_count"), &[], cumulative as f64);
    }
}

/// Write latency buckets: a commit on a LAN takes milliseconds; the top bound is past the
/// default `api.write_timeout_ms`.
const WRITE_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Snapshot buckets: a `VACUUM INTO` of a large store can take minutes.
const SNAPSHOT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0,
];

/// Time of `POST /api/v1/message` from a valid request to the answer (committed and applied
/// on the answering node), successes and failures alike.
pub static WRITE_LATENCY: Histogram = Histogram::new(WRITE_BOUNDS);
/// Time to record a snapshot (put `messages.db` on disk, write the meta file).
pub static SNAPSHOT_BUILD: Histogram = Histogram::new(SNAPSHOT_BOUNDS);
/// Time to write a recorded snapshot out as a file, the first time a node has to be sent it.
pub static SNAPSHOT_WRITE: Histogram = Histogram::new(SNAPSHOT_BOUNDS);
/// Time to install a snapshot received from the leader (validate, swap the state, publish).
pub static SNAPSHOT_INSTALL: Histogram = Histogram::new(SNAPSHOT_BOUNDS);

/// Error answers by their `code`, counted where every error becomes a response.
static REJECTED: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Payload bytes per conversation, kept by the state machine (the only writer of messages):
/// set from one aggregate query when `messages.db` opens or a snapshot is installed, then
/// increased by each applied message after its COMMIT.
static CONV_BYTES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Background WAL checkpoints by database file name: (all, those that copied every page).
static WAL_CHECKPOINTS: Mutex<BTreeMap<String, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// Client API connections open now (the listener's places under `api.max_connections`).
pub static API_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

pub fn count_rejected(code: &'static str) {
    let mut map = REJECTED.lock().unwrap_or_else(|p| p.into_inner());
    *map.entry(code).or_insert(0) += 1;
}

pub fn rejected() -> BTreeMap<&'static str, u64> {
    REJECTED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Replaces the byte totals (after open or a snapshot install).
pub fn set_conv_bytes(totals: BTreeMap<String, u64>) {
    *CONV_BYTES.lock().unwrap_or_else(|p| p.into_inner()) = totals;
}

/// Adds applied payload bytes, after the transaction that stored them committed.
pub fn add_conv_bytes(added: impl IntoIterator<Item = (String, u64)>) {
    let mut map = CONV_BYTES.lock().unwrap_or_else(|p| p.into_inner());
    for (conv, bytes) in added {
        *map.entry(conv).or_insert(0) += bytes;
    }
}

/// Counts one background checkpoint of the database file `db`.
pub fn count_wal_checkpoint(db: &str, complete: bool) {
    let mut map = WAL_CHECKPOINTS.lock().unwrap_or_else(|p| p.into_inner());
    let counts = map.entry(db.to_string()).or_insert((0, 0));
    counts.0 += 1;
    counts.1 += u64::from(complete);
}

pub fn wal_checkpoints() -> BTreeMap<String, (u64, u64)> {
    WAL_CHECKPOINTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

pub fn conv_bytes() -> BTreeMap<String, u64> {
    CONV_BYTES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A Prometheus text exposition (format 0.0.4) being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// The `# HELP` and `# TYPE` lines of a metric family; write them once, before its samples.
    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample line; label values are escaped (`\\`, `\"`, `\n`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_float(value));
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: &str, value: f64) {
        self.header(name, help, kind);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Integers without a fraction (exact up to 2^53), other values as Rust prints them.
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf() {
        static H: Histogram = Histogram::new(&[0.01, 0.1]);
        H.observe(Duration::from_millis(5));
        H.observe(Duration::from_millis(50));
        H.observe(Duration::from_millis(500));
        let mut e = Exposition::default();
        H.render(&mut e, "x_seconds", "x");
        let text = e.finish();
        assert!(text.contains("x_seconds_bucket{le=\"0.01\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_count 3\n"), "{text}");
        assert!(text.contains("x_seconds_sum 0.555\n"), "{text}");
    }

    #[test]
    fn labels_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("a", "x\"y\\z\nw")], 1.0);
        assert_eq!(e.finish(), "m{a=\"x\\\"y\\\\z\\nw\"} 1\n");
    }
}
