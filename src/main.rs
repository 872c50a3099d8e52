//! The `chatraftd` command: parses the command line, and turns every failure into a message on
//! stderr and an exit code (0 clean stop, 1 failure, 2 configuration or usage error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chatraftd::config::{self, Config};
use chatraftd::security::Security;
use chatraftd::{cli, local_cluster, server, sys};

/// mimalloc instead of glibc's malloc: see Cargo.toml for what it buys.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chatraftd",
    version,
    about = "A replicated, totally ordered chat-message log on Raft and SQLite"
)]
struct Cli {
    /// The config file [default: $CHATRAFTD_CONFIG, else /etc/chatraftd/chatraftd.toml]
    #[arg(long, short = 'c', global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config file and exit (0 when it is good, 2 when it is not)
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default)
    Run,
    /// Validate the config file and exit
    CheckConfig,
    /// Run a local cluster of several nodes on 127.0.0.1 until Ctrl-C
    LocalCluster(local_cluster::Args),
    /// Show a node's Raft role, term, leader and indexes
    Status(cli::NodeArgs),
    /// List the cluster's members as a node sees them
    Members(cli::NodeArgs),
    /// Send one message (retried with the same msg_id while the cluster is unavailable)
    Send(cli::SendArgs),
    /// Print a conversation's messages as they are committed, resuming after reconnects
    Tail(cli::TailArgs),
    /// Write a consistent copy of this node's message store (data_dir from --config)
    Backup(cli::BackupArgs),
    /// Seed a fresh data dir (from --config) from a backup, as a new one-node cluster
    Restore(cli::RestoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::LocalCluster(args)) => return local_cluster::run(args),
        Some(Command::Status(args)) => return cli::status(args),
        Some(Command::Members(args)) => return cli::members(args),
        Some(Command::Send(args)) => return cli::send(args),
        Some(Command::Tail(args)) => return cli::tail(args),
        Some(Command::Backup(args)) => return cli::backup(cli.config, args),
        Some(Command::Restore(args)) => return cli::restore(cli.config, args),
        Some(Command::CheckConfig) => return check_config(cli.config),
        Some(Command::Run) | None if cli.check_config => return check_config(cli.config),
        Some(Command::Run) | None => {}
    }
    let path = config::resolve_path(cli.config.as_deref());
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatraftd: {e}");
            return ExitCode::from(2);
        }
    };
    let security = match Security::load(&config, &path.display().to_string()) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            eprintln!("chatraftd: {e}");
            return ExitCode::from(2);
        }
    };
    let log = sys::init_logging(&config.log.level, config.node_id);
    sys::raise_open_file_limit(config.api.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatraftd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let reload = {
        let _context = runtime.enter();
        sys::reload_on_sighup(path, config.clone(), log, security.clone())
    };
    runtime.spawn(reload);
    // The server runs as a task on the worker threads, not on this thread inside `block_on`:
    // it waits on Raft's metrics, which change several times per write, and every change
    // would otherwise wake this thread (a context switch each) just to look at them.
    let server = runtime.spawn(server::run(config, security, sys::stop_signal()));
    let outcome = runtime
        .block_on(server)
        .unwrap_or_else(|e| Err(server::ServerError::Panicked(e.to_string())));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("chatraftd: {e}");
            ExitCode::from(1)
        }
    }
}

fn check_config(cli_path: Option<PathBuf>) -> ExitCode {
    let path = config::resolve_path(cli_path.as_deref());
    match Config::load(&path).and_then(|c| Security::load(&c, &path.display().to_string())) {
        Ok(_) => {
            println!("config OK: {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chatraftd: {e}");
            ExitCode::from(2)
        }
    }
}
