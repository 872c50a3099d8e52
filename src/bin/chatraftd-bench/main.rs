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
//! - [`cluster`]: the three-node chatraftd cluster, its writer, the no-loss check.
//! - [`report`]: the Markdown report, the JSON and the charts.

// Some helpers serve scenarios that are still being added.
#![allow(dead_code)]

mod cluster;
mod http;
mod load;
mod procs;
mod report;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use crate::cluster::{Cluster, CrWriter};
use crate::load::closed_loop;
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
    /// The nats-server binary (Debian: `apt-get install nats-server`)
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
                subscribers: vec![100],
                fanout_rate: 200,
                fanout_secs: 2.0,
                messages: 5_000,
            }
        } else if a.quick {
            Sizes {
                concurrency: vec![1, 16, 64, 256],
                write_secs: 1.5,
                subscribers: vec![100, 1_000],
                fanout_rate: 500,
                fanout_secs: 3.0,
                messages: 20_000,
            }
        } else {
            Sizes {
                concurrency: vec![1, 16, 64, 256],
                write_secs: 5.0,
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
    pub writes: Vec<Value>,
    pub verify: Vec<Value>,
    pub fanout: Vec<Value>,
    pub catchup: Option<Value>,
    pub recovery: Option<Value>,
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
    runtime.block_on(async {
        tokio::select! {
            code = run(args) => code,
            _ = ::chatraftd::sys::stop_signal() => {
                // Dropping `run` drops every server guard, which kills the servers.
                eprintln!("chatraftd-bench: interrupted; stopping every server");
                ExitCode::from(130)
            }
        }
    })
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
    for sys in &args.systems {
        let r = match sys {
            System::Chatraftd => run_chatraftd(&args, &sizes, &bin, &work, &mut res).await,
            System::Etcd | System::Nats => Err(format!("{sys:?}: not measured by this build")),
        };
        if let Err(e) = r {
            eprintln!("chatraftd-bench: {sys:?}: {e}");
            res.errors.push(format!("{sys:?}: {e}"));
        }
    }
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
    if res.errors.is_empty() && res.verify.iter().all(|v| v["ok"] == true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn run_chatraftd(
    args: &Args,
    sizes: &Sizes,
    bin: &std::path::Path,
    work: &WorkDir,
    res: &mut Results,
) -> Result<(), String> {
    let root = work.sub("chatraftd").map_err(|e| e.to_string())?;
    eprintln!("chatraftd-bench: starting a three-node chatraftd cluster");
    let mut cluster = Cluster::start(bin, &root, 3).await?;
    let outcome = async {
        if args.scenarios.contains(&Scenario::Writes) {
            for mode in ["spread", "leader"] {
                for &c in &sizes.concurrency {
                    let (_, leader) = cluster.leader().await?;
                    let apis = cluster.apis();
                    let conv = format!("w-{mode}-{c}");
                    let writers: Vec<CrWriter> = (0..c)
                        .map(|i| {
                            let addr = if mode == "spread" {
                                &apis[i % apis.len()]
                            } else {
                                &leader
                            };
                            CrWriter::new(&cluster.http, addr, &conv, i)
                        })
                        .collect();
                    let r =
                        closed_loop(writers, secs(sizes.write_secs), MAX_WRITES_PER_POINT).await;
                    let mut v = r.to_json();
                    v["system"] = json!("chatraftd");
                    v["mode"] = json!(mode);
                    v["concurrency"] = json!(c);
                    eprintln!("  chatraftd writes {mode} c={c}: {v}");
                    res.writes.push(v);
                    let check = cluster::verify(&cluster, &conv, &r.writers).await;
                    if check["ok"] != true {
                        eprintln!("  LOST OR DUPLICATED MESSAGES: {check}");
                    }
                    res.verify.push(check);
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    cluster.stop().await;
    outcome
}
