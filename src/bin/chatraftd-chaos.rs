//! `chatraftd-chaos`: runs a chatraftd cluster in network namespaces under a seeded schedule of
//! faults, records what the clients see, and checks the history. Exit status: 0 no anomaly,
//! 1 anomalies found, 2 usage error, 3 the harness itself failed, 130 interrupted.
//! Must run as root (namespaces, iptables, tmpfs).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use chatraftd::chaos::cluster::NodeSettings;
use chatraftd::chaos::lab::{self, Lab};
use chatraftd::chaos::nemesis::Fault;
use chatraftd::chaos::run::{self, Options, Report};

#[derive(Parser)]
#[command(
    name = "chatraftd-chaos",
    version,
    about = "Fault-injection test of a chatraftd cluster, with a history checker"
)]
struct Cli {
    /// Seed of the fault schedule and every client choice [default: from the clock]
    #[arg(long)]
    seed: Option<u64>,
    /// Number of nodes (3 to 9: node N has address .(10 + N) in the lab)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    nodes: u64,
    /// Seconds of workload under faults
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    duration: u64,
    /// Concurrent writers
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    writers: u64,
    /// Concurrent linearizable readers
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=64))]
    readers: u64,
    /// Fault kinds, comma-separated, or "all" (see --list-faults)
    #[arg(long, default_value = "all")]
    faults: String,
    /// Print the fault kinds and exit
    #[arg(long)]
    list_faults: bool,
    /// Print the fault schedule of the seed and duration and exit (needs no root)
    #[arg(long, requires = "seed")]
    print_schedule: bool,
    /// First three octets of the private /24 used inside the lab's namespaces
    #[arg(long, default_value = "10.77.0")]
    subnet: String,
    /// Directory for node data (tmpfs mounts), logs, report.json and history.json
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The chatraftd binary [default: next to this one]
    #[arg(long)]
    chatraftd: Option<PathBuf>,
    /// Size of each node's tmpfs data disk, MiB
    #[arg(long, default_value_t = 64)]
    tmpfs_mb: u64,
    /// raft.snapshot_threshold of the nodes (low, so snapshots happen under faults)
    #[arg(long, default_value_t = 300)]
    snapshot_threshold: u64,
    /// Longest acceptable time from healing to the first acknowledged write, seconds
    #[arg(long, default_value_t = 20)]
    recovery_bound: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list_faults {
        for f in Fault::ALL {
            println!("{}", f.name());
        }
        return ExitCode::SUCCESS;
    }
    let faults: Vec<Fault> = if cli.faults == "all" {
        Fault::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for name in cli
            .faults
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match Fault::parse(name) {
                Some(f) => v.push(f),
                None => {
                    eprintln!("chatraftd-chaos: unknown fault {name:?} (see --list-faults)");
                    return ExitCode::from(2);
                }
            }
        }
        v
    };
    if cli.print_schedule {
        let seed = cli.seed.unwrap_or_default();
        let windows =
            chatraftd::chaos::nemesis::schedule(seed, &faults, Duration::from_secs(cli.duration));
        for w in windows {
            let names: Vec<&str> = w.faults.iter().map(|f| f.name()).collect();
            println!(
                "{:>7.1} s  {:>4.1} s  {}",
                w.start_ms as f64 / 1000.0,
                w.duration_ms as f64 / 1000.0,
                names.join(" + ")
            );
        }
        return ExitCode::SUCCESS;
    }
    let octets: Vec<&str> = cli.subnet.split('.').collect();
    if octets.len() != 3 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
        eprintln!("chatraftd-chaos: --subnet must be three octets, like 10.77.0");
        return ExitCode::from(2);
    }
    if !running_as_root() {
        eprintln!("chatraftd-chaos: must run as root (network namespaces, iptables, tmpfs)");
        return ExitCode::from(2);
    }
    let chatraftd = match cli.chatraftd.clone().or_else(sibling_chatraftd) {
        Some(p) if p.is_file() => p,
        other => {
            eprintln!(
                "chatraftd-chaos: no chatraftd binary at {:?}; build it or pass --chatraftd",
                other
            );
            return ExitCode::from(2);
        }
    };
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| run::default_dir(seed, cli.nodes));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("chatraftd-chaos: cannot create {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    let opts = Options {
        seed,
        nodes: cli.nodes,
        duration: Duration::from_secs(cli.duration),
        writers: cli.writers,
        readers: cli.readers,
        faults,
        subnet: cli.subnet.clone(),
        settings: NodeSettings {
            exe: chatraftd,
            dir: dir.clone(),
            tmpfs_mb: cli.tmpfs_mb,
            snapshot_threshold: cli.snapshot_threshold,
            write_timeout_ms: 2000,
        },
        recovery_bound: Duration::from_secs(cli.recovery_bound),
    };
    let lab = match Lab::create(&opts.subnet, opts.nodes) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("chatraftd-chaos: lab setup: {e}");
            return ExitCode::from(3);
        }
    };
    // Every thread that may open a socket lives in the lab's client namespace: this one (it
    // runs the top-level future) and each of the runtime's. A thread that cannot get there must
    // not run at all, or its requests would go to the machine's own network.
    if let Err(e) = lab::enter_client_ns() {
        eprintln!("chatraftd-chaos: cannot enter the client namespace: {e}");
        return ExitCode::from(3);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            if let Err(e) = lab::enter_client_ns() {
                eprintln!(
                    "chatraftd-chaos: a runtime thread cannot enter the client namespace: {e}"
                );
                std::process::abort();
            }
        })
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatraftd-chaos: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run::run(opts, lab) => Some(r),
            // Dropping the run's future kills the nodes and removes the lab.
            _ = chatraftd::sys::stop_signal() => None,
        }
    });
    match outcome {
        None => {
            eprintln!("chatraftd-chaos: interrupted; the lab is cleaned up");
            ExitCode::from(130)
        }
        Some(Err(e)) => {
            eprintln!("chatraftd-chaos: {e} (logs in {})", dir.display());
            ExitCode::from(3)
        }
        Some(Ok((report, history))) => {
            let report_path = dir.join("report.json");
            let history_path = dir.join("history.json");
            let written = serde_json::to_vec_pretty(&report)
                .map_err(std::io::Error::from)
                .and_then(|j| std::fs::write(&report_path, j))
                .and_then(|_| serde_json::to_vec(&history).map_err(std::io::Error::from))
                .and_then(|j| std::fs::write(&history_path, j));
            summary(&report);
            if let Err(e) = written {
                eprintln!("chatraftd-chaos: cannot write the report: {e}");
                return ExitCode::from(3);
            }
            println!("report: {}", report_path.display());
            if report.valid {
                ExitCode::SUCCESS
            } else {
                println!(
                    "reproduce: chatraftd-chaos --seed {} --nodes {} --duration {} (logs in {})",
                    report.seed,
                    report.nodes,
                    report.duration_s,
                    dir.display()
                );
                ExitCode::from(1)
            }
        }
    }
}

/// `/proc/self` belongs to the process's effective uid.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn sibling_chatraftd() -> Option<PathBuf> {
    Some(std::env::current_exe().ok()?.parent()?.join("chatraftd"))
}

fn summary(r: &Report) {
    println!(
        "seed {} | {} nodes | {:.0} s of faults | {:.0} s wall",
        r.seed, r.nodes, r.duration_s, r.wall_time_s
    );
    for (kind, outcomes) in &r.ops {
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!("{kind:>6}: {}", parts.join(", "));
    }
    println!(
        "streams: {} subscribers, {} connections, {} events",
        r.streams.subscribers, r.streams.connections, r.streams.events
    );
    let faults: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("faults: {}", faults.join(", "));
    println!(
        "recovery: first write {} after healing; converged {}",
        r.recovery_ms.map_or("NONE".into(), |m| format!("{m} ms")),
        r.convergence_ms
            .map_or("NEVER".into(), |m| format!("{m} ms after healing")),
    );
    let msgs: Vec<String> = r
        .final_messages
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    println!("final messages: {}", msgs.join(", "));
    for (n, p) in r.properties.iter().enumerate() {
        let mark = if p.held { "ok  " } else { "FAIL" };
        println!("  {mark} {}. {}", n + 1, p.property);
    }
    if r.valid {
        println!("verdict: valid, no anomaly");
    } else {
        let counts: Vec<String> = r
            .anomaly_counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("verdict: INVALID: {}", counts.join(", "));
        for a in r.anomalies.iter().take(20) {
            println!("  {}: {}", a.kind, a.message);
        }
    }
    let held = r.properties.iter().filter(|p| p.held).count();
    println!("chaos: {held} passed, {} failed", r.properties.len() - held);
}
