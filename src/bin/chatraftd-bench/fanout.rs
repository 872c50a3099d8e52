//! The fan-out scenario, the same for every system: subscribers connect (a bounded number at
//! a time), the servers' memory is read, then writers send at a fixed rate while the
//! subscribers measure publish-to-delivery latency from the stamp in each payload.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::{now_micros, Writer};
use crate::procs::{rss_kib, Meter};
use crate::stats::Histogram;

/// Subscribers opening their connection at the same time.
const CONNECT_PARALLEL: usize = 64;
const SHARDS: usize = 16;

/// What subscribers report into.
pub struct Shared {
    connect: Arc<Semaphore>,
    ready: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    delivered: AtomicU64,
    shards: Vec<Mutex<Histogram>>,
    /// Turns true when the subscribers should hang up.
    pub stop: watch::Receiver<bool>,
}

impl Shared {
    pub fn new(stop: watch::Receiver<bool>) -> Arc<Shared> {
        Arc::new(Shared {
            connect: Arc::new(Semaphore::new(CONNECT_PARALLEL)),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            delivered: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Histogram::default()))
                .collect(),
            stop,
        })
    }

    /// Held while a subscriber sets up its connection.
    pub async fn connect_permit(&self) -> OwnedSemaphorePermit {
        self.connect
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// The subscriber is connected and will see every message written from now on.
    pub fn ready(&self) {
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut fe = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        fe.get_or_insert(e);
    }

    /// Records deliveries with these send stamps, arrived now.
    pub fn delivered(&self, idx: usize, stamps: &[u64]) {
        if stamps.is_empty() {
            return;
        }
        let now = now_micros();
        let mut h = self.shards[idx % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for &t in stamps {
            h.record(now.saturating_sub(t));
        }
        drop(h);
        self.delivered
            .fetch_add(stamps.len() as u64, Ordering::Relaxed);
    }

    pub fn delivered_count(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// Sizes of one fan-out measurement.
pub struct Plan {
    pub subscribers: usize,
    pub rate: u64,
    pub secs: f64,
    /// The longest the subscribers may take to connect.
    pub setup_timeout: Duration,
    /// The longest to wait for the last deliveries after the last write.
    pub drain_timeout: Duration,
}

/// Runs one measurement: `rate * secs` messages, or fewer when the servers cannot take them
/// within `2 * secs + 5` seconds. `spawn_sub(i, shared)` starts subscriber `i`; `writers` send the
/// messages (a pool, so one slow acknowledgement does not hold the rate back); `pids` are the
/// server processes whose CPU and memory are read.
pub async fn run<W: Writer>(
    plan: &Plan,
    pids: &[u32],
    spawn_sub: impl Fn(usize, Arc<Shared>) -> JoinHandle<()>,
    writers: Vec<W>,
) -> Value {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared::new(stop_rx);
    let rss_before: u64 = pids.iter().map(|&p| rss_kib(p)).sum();
    let setup_start = Instant::now();
    let tasks: Vec<JoinHandle<()>> = (0..plan.subscribers)
        .map(|i| spawn_sub(i, shared.clone()))
        .collect();
    let n = plan.subscribers;
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < n
        && setup_start.elapsed() < plan.setup_timeout
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();
    let connected = shared.ready.load(Ordering::Relaxed);
    let rss_after: u64 = pids.iter().map(|&p| rss_kib(p)).sum();
    let meter = Meter::start(pids);
    let total = (plan.rate as f64 * plan.secs).round() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    // When the servers cannot keep the rate, stop writing rather than wait for ever.
    let send_deadline = start + Duration::from_secs_f64(plan.secs * 2.0 + 5.0);
    let rate = plan.rate.max(1) as f64;
    let pool: Vec<JoinHandle<()>> = writers
        .into_iter()
        .map(|mut w| {
            let (next, acked, errors) = (next.clone(), acked.clone(), errors.clone());
            tokio::spawn(async move {
                let mut k = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || Instant::now() >= send_deadline {
                        break;
                    }
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                    k += 1;
                    match w.send(k).await {
                        Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for p in pool {
        let _ = p.await;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let usage = meter.read();
    let sent = acked.load(Ordering::Relaxed);
    let expected = sent * connected as u64;
    let drain_start = Instant::now();
    let mut last = shared.delivered_count();
    let mut last_change = Instant::now();
    while last < expected && drain_start.elapsed() < plan.drain_timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.delivered_count();
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let deliveries = shared.delivered_count();
    let delivery_secs = if deliveries >= expected {
        last_change.duration_since(start).as_secs_f64()
    } else {
        start.elapsed().as_secs_f64()
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .is_err()
        {
            break;
        }
    }
    let mut hist = Histogram::default();
    for s in &shared.shards {
        hist.merge(&s.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let mut v = json!({
        "subscribers": n,
        "connected": connected,
        "failed": shared.failed.load(Ordering::Relaxed),
        "first_error": shared.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        "setup_secs": round3(setup_secs),
        "rate": plan.rate,
        "sent": sent,
        "write_errors": errors.load(Ordering::Relaxed),
        "sent_per_s": (sent as f64 / send_secs).round(),
        "expected": expected,
        "deliveries": deliveries,
        "deliveries_per_s": (deliveries as f64 / delivery_secs.max(1e-3)).round(),
        "server_cpu_pct": (usage.server_cpu / send_secs * 100.0).round(),
        "bench_cpu_pct": (usage.bench_cpu / send_secs * 100.0).round(),
        "server_rss_kib_idle_subscribers": rss_after,
        "rss_kib_per_subscriber": if connected > 0 {
            round3(rss_after.saturating_sub(rss_before) as f64 / connected as f64)
        } else {
            0.0
        },
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut v, hist.summary_ms()) {
        a.extend(b);
    }
    v
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
