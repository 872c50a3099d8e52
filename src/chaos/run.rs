//! One chaos run from start to verdict: build the lab, start and form the cluster, run the
//! clients while the nemesis works through its schedule, heal, measure recovery, wait for
//! convergence, read every node's final state, let the subscribers catch up, check, report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::checker::{self, Verdict};
use super::client::{self, Clients, Recorder};
use super::cluster::{Cluster, ClusterError, Crash, NodeSettings};
use super::history::{Entry, History, Outcome, Recovery, Subscription};
use super::lab::Lab;
use super::nemesis::{self, Fault, FaultRecord, Nemesis, Window};
use super::prng::Prng;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub nodes: u64,
    /// How long the clients run under faults.
    pub duration: Duration,
    pub writers: u64,
    pub readers: u64,
    pub faults: Vec<Fault>,
    /// The lab's /24, as its first three octets.
    pub subnet: String,
    pub settings: NodeSettings,
    /// The longest acceptable time from healing to the first acknowledged write.
    pub recovery_bound: Duration,
}

/// The conversations the clients write to and follow.
const CONVS: [&str; 2] = ["general", "ops"];

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub duration_s: f64,
    pub wall_time_s: f64,
    pub ops: BTreeMap<&'static str, BTreeMap<&'static str, usize>>,
    pub streams: StreamStats,
    pub faults: BTreeMap<&'static str, usize>,
    pub schedule: Vec<Window>,
    pub fault_log: Vec<FaultRecord>,
    pub recovery_ms: Option<u64>,
    pub convergence_ms: Option<u64>,
    pub final_messages: BTreeMap<String, u64>,
    pub crashes: Vec<Crash>,
    pub properties: Vec<PropertyResult>,
    pub anomaly_counts: BTreeMap<&'static str, usize>,
    pub anomalies: Vec<checker::Anomaly>,
    pub valid: bool,
}

#[derive(Debug, Serialize)]
pub struct PropertyResult {
    pub property: &'static str,
    pub held: bool,
}

#[derive(Debug, Serialize)]
pub struct StreamStats {
    pub subscribers: usize,
    pub connections: u64,
    pub events: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("lab setup: {0}")]
    Lab(#[from] super::lab::LabError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Runs everything in `lab` (created, and the calling threads moved into its client
/// namespace, before the runtime started); the lab is gone when this returns (or when its
/// future is dropped).
pub async fn run(opts: Options, lab: Lab) -> Result<(Report, History), RunError> {
    let start = Instant::now();
    let netem = lab.has_netem();
    let mut cluster = Cluster::prepare(lab, opts.nodes, opts.settings.clone(), start)?;
    let schedule = nemesis::schedule(opts.seed, &opts.faults, opts.duration);
    say(&format!(
        "seed {} | {} nodes | {} s | {} fault windows | netem {}",
        opts.seed,
        opts.nodes,
        opts.duration.as_secs(),
        schedule.len(),
        if netem { "yes" } else { "no (tbf instead)" }
    ));

    // Form the cluster: node 1 first, then the others join it.
    cluster.start_node(1)?;
    cluster.wait_healthy(1, Duration::from_secs(20)).await?;
    for id in 2..=opts.nodes {
        cluster.start_node(id)?;
    }
    cluster.wait_formed(Duration::from_secs(60)).await?;
    say(&format!(
        "cluster formed after {:.1} s",
        start.elapsed().as_secs_f64()
    ));

    let recorder = Arc::new(Recorder::new(start));
    let clients = Arc::new(Clients {
        http: cluster.http.clone(),
        apis: cluster.nodes.iter().map(|n| n.api.clone()).collect(),
        recorder: recorder.clone(),
    });
    let convs: Vec<String> = CONVS.iter().map(|c| c.to_string()).collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_stop_tx, sub_stop_rx) = watch::channel(false);
    let (target_tx, target_rx) = watch::channel(None::<BTreeMap<String, u64>>);

    let mut subs: Vec<Arc<Mutex<Subscription>>> = Vec::new();
    let mut sub_tasks = JoinSet::new();
    for id in cluster.ids() {
        for conv in &convs {
            let sub = Arc::new(Mutex::new(Subscription {
                name: format!("stream-n{id}-{conv}"),
                node: id,
                conv_id: conv.clone(),
                connections: 0,
                events: Vec::new(),
            }));
            subs.push(sub.clone());
            sub_tasks.spawn(client::subscriber(
                recorder.clone(),
                clients.apis.clone(),
                sub,
                Prng::fork(opts.seed, 0x5B00 + subs.len() as u64),
                sub_stop_rx.clone(),
                target_rx.clone(),
            ));
        }
    }
    // Bounded in count as well as time: a writer sends at most this many messages.
    let max_ops = 200 * opts.duration.as_secs().max(1);
    let mut workers = JoinSet::new();
    for w in 0..opts.writers {
        workers.spawn(client::writer(
            clients.clone(),
            w,
            Prng::fork(opts.seed, 0x3000 + w),
            convs.clone(),
            stop_rx.clone(),
            max_ops,
        ));
    }
    for r in 0..opts.readers {
        workers.spawn(client::reader(
            clients.clone(),
            r,
            Prng::fork(opts.seed, 0x4000 + r),
            convs.clone(),
            stop_rx.clone(),
            max_ops,
        ));
    }

    // The nemesis works through the schedule.
    let mut nemesis = Nemesis::new(opts.seed, netem);
    let workload_start = Instant::now();
    for window in &schedule {
        tokio::time::sleep_until(workload_start + Duration::from_millis(window.start_ms)).await;
        let names: Vec<&str> = window.faults.iter().map(|f| f.name()).collect();
        say(&format!(
            "t={:>5.1}s {} for {:.1} s",
            workload_start.elapsed().as_secs_f64(),
            names.join(" + "),
            window.duration_ms as f64 / 1000.0
        ));
        nemesis.run_window(&mut cluster, window).await;
    }
    tokio::time::sleep_until(workload_start + opts.duration).await;
    nemesis.heal(&mut cluster).await;
    let healed = Instant::now();

    // Stop the clients; in-flight operations finish (each is bounded by its timeout).
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();

    // Property 7: a leader, and a write acknowledged, within the bound.
    let mut probe_rng = Prng::fork(opts.seed, 0x9E0B);
    let probe = client::probe(&clients, &mut probe_rng, opts.recovery_bound).await;
    let recovery_ms = probe.map(|_| healed.elapsed().as_millis() as u64);
    say(&match recovery_ms {
        Some(ms) => format!("healed: a write was acknowledged {ms} ms after healing"),
        None => format!(
            "healed: NO write acknowledged within {} s",
            opts.recovery_bound.as_secs()
        ),
    });
    let convergence_ms = wait_converged(&cluster, Duration::from_secs(60))
        .await
        .then(|| healed.elapsed().as_millis() as u64);
    cluster.reap(&[]);

    // Every node's final state.
    let mut finals = BTreeMap::new();
    for id in cluster.ids() {
        match read_all(&cluster, id).await {
            Some(entries) => {
                finals.insert(id, entries);
            }
            None => say(&format!("could not read the final state of node {id}")),
        }
    }
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(entries) = finals.values().next() {
        for e in entries {
            let l = last.entry(e.conv_id.clone()).or_insert(0);
            *l = (*l).max(e.seq);
        }
    }
    for c in &convs {
        last.entry(c.clone()).or_insert(0);
    }

    // Subscribers catch up to the final sequence, then stop.
    let _ = target_tx.send(Some(last.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(40), async {
        while sub_tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = sub_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while sub_tasks.join_next().await.is_some() {}
    })
    .await;
    sub_tasks.abort_all();

    for id in cluster.ids() {
        cluster.stop_node(id).await;
    }
    let subscriptions: Vec<Subscription> = subs
        .iter()
        .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    let history = History {
        ops: recorder.ops(),
        subscriptions,
        finals,
        recovery: Recovery {
            write_after_heal_ms: recovery_ms,
            bound_ms: opts.recovery_bound.as_millis() as u64,
        },
    };
    let mut verdict = checker::check(&history);
    if finals_missing(&history, opts.nodes) {
        add(
            &mut verdict,
            "final_state_unreadable",
            "a node's final state could not be read".into(),
        );
    }
    if convergence_ms.is_none() {
        add(
            &mut verdict,
            "no_convergence",
            "the nodes did not all become voters with the same applied index within 60 s of healing"
                .into(),
        );
    }
    for c in &cluster.crashes {
        add(
            &mut verdict,
            "node_crashed",
            format!(
                "node {} exited on its own at {} ms ({})",
                c.node, c.at_ms, c.status
            ),
        );
    }
    let report = Report {
        seed: opts.seed,
        nodes: opts.nodes,
        duration_s: opts.duration.as_secs_f64(),
        wall_time_s: start.elapsed().as_secs_f64(),
        ops: op_counts(&history),
        streams: StreamStats {
            subscribers: history.subscriptions.len(),
            connections: history
                .subscriptions
                .iter()
                .map(|s| s.connections as u64)
                .sum(),
            events: history.subscriptions.iter().map(|s| s.events.len()).sum(),
        },
        faults: nemesis.counts(),
        schedule,
        fault_log: nemesis.log.clone(),
        recovery_ms,
        convergence_ms,
        final_messages: last,
        crashes: cluster.crashes.clone(),
        properties: checker::PROPERTIES
            .iter()
            .enumerate()
            .map(|(n, (property, _))| PropertyResult {
                property,
                held: verdict.property_held(n),
            })
            .collect(),
        anomaly_counts: verdict.counts.clone(),
        valid: verdict.is_clean(),
        anomalies: verdict.anomalies,
    };
    drop(cluster);
    Ok((report, history))
}

fn add(v: &mut Verdict, kind: &'static str, message: String) {
    *v.counts.entry(kind).or_insert(0) += 1;
    v.anomalies.push(checker::Anomaly {
        kind,
        message,
        ops: vec![],
    });
}

fn finals_missing(h: &History, nodes: u64) -> bool {
    h.finals.len() as u64 != nodes
}

fn op_counts(h: &History) -> BTreeMap<&'static str, BTreeMap<&'static str, usize>> {
    let mut m: BTreeMap<&'static str, BTreeMap<&'static str, usize>> = BTreeMap::new();
    for op in &h.ops {
        let kind = if op.msg_id().is_some() {
            "write"
        } else {
            "read"
        };
        let outcome = match op.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Indeterminate => "indeterminate",
        };
        *m.entry(kind).or_default().entry(outcome).or_insert(0) += 1;
    }
    m
}

/// Waits until every node is a voter and answers with the same commit index and last applied
/// index.
async fn wait_converged(cluster: &Cluster, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut want_voters: Vec<u64> = cluster.nodes.iter().map(|n| n.raft_id).collect();
    want_voters.sort();
    while Instant::now() < deadline {
        let mut seen = Vec::new();
        let mut voters_ok = true;
        for id in cluster.ids() {
            match cluster.status(id).await {
                Some(s) => {
                    let mut voters: Vec<u64> = s["members"]
                        .as_array()
                        .map(|m| {
                            m.iter()
                                .filter(|n| n["voter"] == true)
                                .filter_map(|n| n["node_id"].as_u64())
                                .collect()
                        })
                        .unwrap_or_default();
                    voters.sort();
                    voters_ok &= voters == want_voters;
                    seen.push((
                        s["commit_index"].as_u64().unwrap_or(0),
                        s["last_applied"].as_u64().unwrap_or(0),
                        s["leader"].is_null(),
                    ))
                }
                None => break,
            }
        }
        let all = seen.len() == cluster.nodes.len() && voters_ok;
        if all && seen.iter().all(|s| !s.2 && s.0 == s.1 && s.1 == seen[0].1) && seen[0].1 > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Every message on node `id`, all conversations, in index order.
async fn read_all(cluster: &Cluster, id: u64) -> Option<Vec<Entry>> {
    let t = Duration::from_secs(5);
    let convs = cluster.get_json(id, "/api/v1/conversations", t).await?;
    let mut entries = Vec::new();
    for c in convs["conversations"].as_array()? {
        let conv = c["conv_id"].as_str()?;
        let mut from = 1u64;
        loop {
            let page = cluster
                .get_json(
                    id,
                    &format!("/api/v1/messages?conv_id={conv}&from={from}&limit=1000"),
                    t,
                )
                .await?;
            let msgs = page["messages"].as_array()?;
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                entries.push(Entry::from_record(m)?);
            }
            from = page["next_from"].as_u64()?;
        }
    }
    entries.sort_by_key(|e| e.index);
    Some(entries)
}

fn say(line: &str) {
    eprintln!("chatraftd-chaos: {line}");
}

/// Where a run's files go.
pub fn default_dir(seed: u64, nodes: u64) -> PathBuf {
    std::env::temp_dir().join(format!("chatraftd-chaos-{seed}-{nodes}n"))
}
