//! `chatraftd local-cluster`: several nodes on 127.0.0.1 from one command, for trying
//! chatraftd out. Node 1 bootstraps, the others join it; Ctrl-C stops every node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::network::HttpClient;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many nodes
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// Parent of each node's data dir (DIR/node1, DIR/node2, ...)
    #[arg(long, default_value = "./data")]
    dir: PathBuf,
    /// HTTP port of node 1; node N uses this + N - 1
    #[arg(long, default_value_t = 8081)]
    api_port: u16,
    /// Raft port of node 1; node N uses this + N - 1
    #[arg(long, default_value_t = 12001)]
    raft_port: u16,
}

fn node_config(
    dir: &Path,
    id: u16,
    api_port: u16,
    raft_port: u16,
    node1_api: &str,
    secret_file: &Path,
) -> String {
    let start = if id == 1 {
        "bootstrap = true".to_string()
    } else {
        format!("join = [\"{node1_api}\"]")
    };
    format!(
        "# Written by `chatraftd local-cluster`.\n\
         node_id = {id}\n\
         data_dir = \"{}\"\n\
         {start}\n\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\n\n\
         [raft]\nlisten = \"127.0.0.1:{raft_port}\"\n\n\
         [security]\ncluster_secret_file = \"{}\"\n",
        dir.display(),
        secret_file.display()
    )
}

pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatraftd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chatraftd: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let last_api = args.api_port.checked_add(args.nodes - 1);
    let last_raft = args.raft_port.checked_add(args.nodes - 1);
    if last_api.is_none() || last_raft.is_none() {
        eprintln!("chatraftd: the ports run past 65535");
        return ExitCode::from(2);
    }
    let node1_api = format!("127.0.0.1:{}", args.api_port);
    let secret_file = match std::fs::create_dir_all(&args.dir)
        .and_then(|_| std::path::absolute(args.dir.join("cluster-secret")))
        .and_then(|p| crate::security::ensure_secret_file(&p).map(|_| p))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "chatraftd: cannot write the cluster secret in {}: {e}",
                args.dir.display()
            );
            return ExitCode::from(1);
        }
    };
    let mut children: Vec<(u16, Child)> = Vec::new();
    for i in 0..args.nodes {
        let id = i + 1;
        let dir = args.dir.join(format!("node{id}"));
        let data_dir = match std::fs::create_dir_all(&dir).and_then(|_| std::path::absolute(&dir)) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("chatraftd: cannot create {}: {e}", dir.display());
                stop_all(&mut children).await;
                return ExitCode::from(1);
            }
        };
        let config_path = data_dir.join("chatraftd.toml");
        let text = node_config(
            &data_dir,
            id,
            args.api_port + i,
            args.raft_port + i,
            &node1_api,
            &secret_file,
        );
        if let Err(e) = std::fs::write(&config_path, text) {
            eprintln!("chatraftd: cannot write {}: {e}", config_path.display());
            stop_all(&mut children).await;
            return ExitCode::from(1);
        }
        match Command::new(&exe)
            .arg("--config")
            .arg(&config_path)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => children.push((id, child)),
            Err(e) => {
                eprintln!("chatraftd: cannot start node {id}: {e}");
                stop_all(&mut children).await;
                return ExitCode::from(1);
            }
        }
    }
    eprintln!(
        "chatraftd local-cluster: {} nodes, HTTP on 127.0.0.1:{}-{}, data in {}; Ctrl-C stops them all",
        args.nodes,
        args.api_port,
        args.api_port + args.nodes - 1,
        args.dir.display()
    );
    let client = HttpClient::new();
    let nodes = args.nodes as usize;
    let ready = report_when_formed(&client, &node1_api, nodes);
    tokio::pin!(ready);
    let mut ready_done = false;
    let code = loop {
        tokio::select! {
            _ = crate::sys::stop_signal() => break ExitCode::SUCCESS,
            _ = &mut ready, if !ready_done => ready_done = true,
            (id, status) = wait_any(&mut children) => {
                eprintln!("chatraftd local-cluster: node {id} exited ({status}); stopping the others");
                break ExitCode::from(1);
            }
        }
    };
    stop_all(&mut children).await;
    code
}

/// Prints one line when node 1 reports a leader and every node as a voter.
async fn report_when_formed(client: &HttpClient, node1_api: &str, nodes: usize) {
    loop {
        let resp = client
            .request(
                hyper::Method::GET,
                node1_api,
                "/api/v1/status",
                &[],
                bytes::Bytes::new(),
                Duration::from_secs(2),
            )
            .await;
        if let Ok(r) = resp {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
                let voters = v["members"]
                    .as_array()
                    .map_or(0, |m| m.iter().filter(|n| n["voter"] == true).count());
                if voters == nodes && !v["leader"].is_null() {
                    eprintln!(
                        "chatraftd local-cluster: cluster formed; leader is node {} (try: curl -s http://{node1_api}/api/v1/status)",
                        v["leader"]["node_id"]
                    );
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_any(children: &mut [(u16, Child)]) -> (u16, String) {
    let waits = children.iter_mut().map(|(id, c)| {
        let id = *id;
        Box::pin(async move {
            let status = c
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            (id, status)
        })
    });
    futures_util::future::select_all(waits).await.0
}

/// SIGTERM to every node, then wait for each (SIGKILL after 15 s).
async fn stop_all(children: &mut [(u16, Child)]) {
    for (_, c) in children.iter() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for (id, c) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(15), c.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("chatraftd local-cluster: node {id} did not stop in 15 s; killing it");
                let _ = c.kill().await;
            }
        }
    }
}
