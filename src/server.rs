//! Wiring of one node: lock the data dir, open the stores, start Raft and both listeners,
//! bootstrap or join, then stop in order on a signal.
//!
//! Shutdown order: the API stops accepting and finishes in-flight requests (streams end), a
//! leader hands leadership to an up-to-date voter, then Raft stops, then the Raft listener, then the stores close when the last handle drops.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::handoff;
use crate::network::{self, HttpClient, Network};
use crate::security::Security;
use crate::serve::{serve, ServeOptions};
use crate::store;
use crate::sys;
use crate::types::{Node, NodeId, Raft};

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("data dir {path} is locked by another chatraftd{holder}")]
    Locked { path: PathBuf, holder: String },
    #[error("cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr} ({key}): {reason}")]
    Bind {
        key: &'static str,
        addr: String,
        reason: String,
    },
    #[error("Raft: {0}")]
    Raft(String),
    #[error("the server task failed: {0}")]
    Panicked(String),
}

/// Holds the data dir's lock for the life of the process; the kernel drops it if we crash.
pub struct DataDirLock {
    _lock: Flock<File>,
}

/// Creates the data dir if needed and takes its exclusive lock.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, ServerError> {
    let fail = |reason: String| ServerError::DataDir {
        path: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
    let lock_path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            // The pid is for the operator's eyes only; the lock itself is the flock.
            let _ = lock.set_len(0);
            let _ = writeln!(*lock, "{}", std::process::id());
            Ok(DataDirLock { _lock: lock })
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&lock_path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map_or(String::new(), |pid| format!(" (pid {pid})"));
            Err(ServerError::Locked {
                path: dir.to_path_buf(),
                holder,
            })
        }
        Err((_, e)) => Err(fail(format!("cannot lock {}: {e}", lock_path.display()))),
    }
}

fn raft_config(config: &Config) -> Result<Arc<openraft::Config>, ServerError> {
    let r = &config.raft;
    let c = openraft::Config {
        cluster_name: "chatraftd".into(),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_threshold),
        max_in_snapshot_log_to_keep: r.keep_logs_after_snapshot,
        max_payload_entries: r.max_payload_entries,
        snapshot_max_chunk_size: 1024 * 1024,
        install_snapshot_timeout: r.install_snapshot_timeout_ms,
        ..Default::default()
    };
    c.validate()
        .map(Arc::new)
        .map_err(|e| ServerError::Raft(format!("invalid Raft settings: {e}")))
}

/// The queue of connections the kernel completes before the node accepts them. tokio's own
/// `bind` asks for 128: a burst of more clients at once (a restart of the clients, or a leader
/// change that moves them all) overflows it, and every connection dropped there waits a
/// second for its SYN to be sent again. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(key: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, ServerError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted node binds again at once, whatever
        // connections of its last run are still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| ServerError::Bind {
        key,
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// Runs the node until `stop` resolves (a signal) or Raft fails. Returns Ok on a clean stop.
/// `security` was loaded from `config` by the caller, which also hands it to the reload path.
pub async fn run(
    config: Config,
    security: Arc<Security>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let stores = store::open(&config.data_dir).await?;
    let mut log_store = stores.log.clone();
    let fresh = log_store
        .is_fresh()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let commit_index = log_store.commit_index_handle();
    let growth = stores.sm.growth();

    if security.cluster_secret().is_none() {
        tracing::warn!(
            "running WITHOUT a cluster secret (security.allow_insecure_cluster = true): anyone who \
             reaches the Raft or API port can join the cluster or forge Raft traffic"
        );
    }
    let tls = security.tls().clone();
    if config.tls.raft && !config.tls.api {
        tracing::warn!(
            "tls.raft is on but tls.api is off: nodes forward writes, joins and reads to each \
             other's API with the cluster secret in clear text; turn tls.api on too"
        );
    }
    let client = HttpClient::with_tls(tls.client.clone(), config.tls.api)
        .with_cluster_secret(security.cluster_secret());
    let raft = Raft::new(
        config.node_id,
        raft_config(&config)?,
        Network::new(client.clone(), config.tls.raft),
        stores.log,
        stores.sm,
    )
    .await
    .map_err(|e| ServerError::Raft(e.to_string()))?;

    let raft_listener = bind("raft.listen", config.raft_listen_addr())?;
    let api_listener = bind("api.listen", config.api_listen_addr())?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AppState::new(
        &config,
        raft.clone(),
        stores.reader,
        client.clone(),
        shutdown_rx.clone(),
        commit_index,
        security.clone(),
    ));

    let api_options = ServeOptions {
        tls: tls.api.clone(),
        header_read_timeout: config.header_read_timeout(),
        request_timeout: Some(config.request_timeout()),
        max_header_bytes: config.api.max_header_bytes,
        name: "api",
        event_stream_path: Some("/api/v1/stream"),
        // A write may wait this long for its commit; streams end at once.
        drain: config.write_timeout() + Duration::from_secs(5),
        max_connections: Some(config.api.max_connections),
    };
    let raft_server = {
        let service = warp::service(network::raft_routes(raft.clone(), security.clone()));
        // Raft RPCs carry their own deadlines (openraft's TTLs); a snapshot chunk may take
        // longer to install than a client request may take.
        let options = ServeOptions {
            tls: tls.raft.clone(),
            request_timeout: None,
            name: "raft",
            event_stream_path: None,
            // Raft has stopped by then: peers' connections have nothing left to finish.
            drain: Duration::from_secs(5),
            // Peers keep a few pooled connections each; the port belongs on a private
            // network or behind mutual TLS.
            max_connections: None,
            ..api_options.clone()
        };
        // The Raft listener stops last, after Raft itself: see the end of this function.
        let (raft_stop_tx, raft_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve(raft_listener, service, options, async move {
            let _ = raft_stop_rx.await;
        }));
        (handle, raft_stop_tx)
    };
    let api_server = {
        let mut rx = shutdown_rx.clone();
        let service = warp::service(api::routes(state.clone()));
        tokio::spawn(serve(api_listener, service, api_options, async move {
            let _ = rx.wait_for(|stopping| *stopping).await;
        }))
    };

    let me = Node {
        raft_addr: config.raft_advertise(),
        api_addr: config.api_advertise(),
    };
    tracing::info!(
        node_id = config.node_id,
        api = %config.api.listen,
        raft = %config.raft.listen,
        data_dir = %config.data_dir.display(),
        fresh,
        "chatraftd is listening"
    );
    // The store is open and both listeners are bound: systemd may now order dependents after us.
    sys::notify("READY=1");
    let status = tokio::spawn(report_status(
        raft.clone(),
        state.commit_index.clone(),
        shutdown_rx.clone(),
    ));
    let snapshots = tokio::spawn(snapshot_by_messages(
        raft.clone(),
        growth,
        config.raft.snapshot_threshold_messages,
    ));

    if fresh && config.bootstrap {
        let members = BTreeMap::from([(config.node_id, me.clone())]);
        match raft.initialize(members).await {
            Ok(()) => tracing::info!("bootstrapped a new one-node cluster"),
            Err(e) => tracing::warn!(error = %e, "bootstrap did not run"),
        }
    }
    let joiner = if should_join(&config, fresh, &raft) {
        Some(tokio::spawn(join_loop(
            config.clone(),
            me,
            client.clone(),
            shutdown_rx.clone(),
        )))
    } else {
        None
    };

    // Wait for a signal, or for Raft to stop by itself (a storage error is fatal by design).
    let mut metrics = raft.metrics();
    let fatal = tokio::select! {
        _ = stop => None,
        r = metrics.wait_for(|m| m.running_state.is_err()) => {
            Some(match r {
                Ok(m) => format!("{:?}", m.running_state),
                Err(_) => "Raft stopped".to_string(),
            })
        }
    };
    drop(metrics);
    tracing::info!("stopping");
    sys::notify("STOPPING=1\nSTATUS=stopping");
    status.abort();
    snapshots.abort();
    let _ = shutdown_tx.send(true);
    if let Some(j) = joiner {
        j.abort();
    }
    // The listener drains its connections for at most `drain` and then closes the rest.
    if let Err(e) = api_server.await {
        tracing::warn!(error = %e, "the API listener's task failed");
    }
    // The API takes no more writes: hand leadership over before Raft stops, so the cluster
    // does not wait out an election timeout (see `handoff`).
    if fatal.is_none() {
        let bound = Duration::from_millis(2 * config.raft.election_timeout_max_ms);
        let pace = Duration::from_millis(config.raft.heartbeat_interval_ms);
        handoff::transfer_leadership(&raft, &client, config.node_id, bound, pace).await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "Raft did not stop cleanly");
    }
    let (raft_handle, raft_stop_tx) = raft_server;
    let _ = raft_stop_tx.send(());
    if let Err(e) = raft_handle.await {
        tracing::warn!(error = %e, "the Raft listener's task failed");
    }
    match fatal {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(reason) => Err(ServerError::Raft(format!(
            "stopped after a fatal error: {reason}"
        ))),
    }
}

/// Asks openraft for a snapshot whenever `raft.snapshot_threshold_messages` says one is due
/// (see [`store::snapshot_due`]); openraft's own policy counts entries only. Looks at start,
/// after each change of the counts, and again after [`ASK_AGAIN`] while a snapshot stays due
/// (openraft drops a request that comes while it is building one). Runs until aborted at stop.
async fn snapshot_by_messages(raft: Raft, growth: Arc<store::MessageGrowth>, threshold: u64) {
    if threshold == 0 {
        return;
    }
    // The snapshot size a build was last asked at, and when: one request per snapshot, unless
    // it seems to have been dropped.
    let mut asked: Option<(u64, std::time::Instant)> = None;
    loop {
        let (in_snapshot, since) = growth.since_snapshot();
        let due = store::snapshot_due(in_snapshot, since, threshold);
        let waiting =
            matches!(asked, Some((at, when)) if at == in_snapshot && when.elapsed() < ASK_AGAIN);
        if due && !waiting {
            tracing::info!(
                in_snapshot,
                since,
                "asking for a snapshot: raft.snapshot_threshold_messages reached"
            );
            if raft.trigger().snapshot().await.is_err() {
                // Raft has stopped; `run` reports why.
                return;
            }
            asked = Some((in_snapshot, std::time::Instant::now()));
        }
        if due {
            tokio::select! {
                _ = growth.changed() => {}
                _ = tokio::time::sleep(ASK_AGAIN) => {}
            }
        } else {
            growth.changed().await;
        }
    }
}

/// How long a snapshot request may go unanswered (no new snapshot) before it is made again.
const ASK_AGAIN: Duration = Duration::from_secs(30);

/// A fresh node with `join` set joins. A node whose stored membership lists it only as a
/// learner also asks again: its earlier join was cut short before the promotion.
fn should_join(config: &Config, fresh: bool, raft: &Raft) -> bool {
    if config.join.is_empty() {
        return false;
    }
    if fresh {
        return true;
    }
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    membership.get_node(&config.node_id).is_some()
        && !membership.voter_ids().any(|v| v == config.node_id)
}

/// Asks the members in `join` to add this node until one accepts, with capped back-off.
async fn join_loop(
    config: Config,
    me: Node,
    client: HttpClient,
    mut shutdown: watch::Receiver<bool>,
) {
    let body = serde_json::json!({"node_id": config.node_id, "raft_addr": me.raft_addr, "api_addr": me.api_addr}).to_string();
    let mut backoff = Duration::from_millis(200);
    loop {
        for addr in &config.join {
            let resp = client
                .request(
                    hyper::Method::POST,
                    addr,
                    "/join",
                    &[("content-type", "application/json")],
                    bytes::Bytes::from(body.clone()),
                    Duration::from_secs(60),
                )
                .await;
            match resp {
                Ok(r) if r.status.is_success() => {
                    tracing::info!(via = %addr, "joined the cluster");
                    return;
                }
                Ok(r) if r.status.is_client_error() => {
                    tracing::error!(via = %addr, status = %r.status, body = %String::from_utf8_lossy(&r.body), "the cluster refused the join");
                }
                Ok(r) => {
                    tracing::info!(via = %addr, status = %r.status, "join not done yet; retrying")
                }
                Err(e) => tracing::info!(via = %addr, error = %e, "join not done yet; retrying"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Keeps the service manager's status line (`systemctl status`) at role, term, leader and
/// commit index, and logs each change of role, term or leader with those as fields. Updates at most once a
/// second, however fast the metrics move.
async fn report_status(
    raft: Raft,
    commit_index: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    let mut last_text = String::new();
    let mut last_role: Option<(openraft::ServerState, u64, Option<NodeId>)> = None;
    loop {
        let (text, role) = {
            // A copy, so the watch's lock is not held while we log.
            let m = metrics.borrow_and_update().clone();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let commit = commit_index
                .load(std::sync::atomic::Ordering::Acquire)
                .max(applied);
            let role = format!("{:?}", m.state).to_lowercase();
            let leader = m.current_leader.map_or("none".into(), |l| l.to_string());
            if last_role != Some((m.state, m.current_term, m.current_leader)) {
                tracing::info!(
                    role = %role,
                    term = m.current_term,
                    leader = %leader,
                    commit_index = commit,
                    "role, term or leader changed"
                );
            }
            (
                format!(
                    "{role}, term {}, leader {leader}, commit index {commit}",
                    m.current_term
                ),
                (m.state, m.current_term, m.current_leader),
            )
        };
        last_role = Some(role);
        if text != last_text {
            sys::notify(&format!("STATUS={text}"));
            last_text = text;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of clients larger than tokio's default backlog of 128 all get their
    /// connections completed by the kernel before the node has accepted a single one.
    #[tokio::test]
    async fn a_burst_of_connections_fits_the_listen_queue() {
        let listener = bind("api.listen", "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects: Vec<_> = (0..300)
            .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
            .collect();
        // A connection the queue had no room for has its SYN dropped and would still be
        // waiting here (its retries come after 1 s, 3 s, ...), as nothing is accepted.
        let all = async {
            let mut open = Vec::new();
            for c in connects {
                open.push(c.await.unwrap().unwrap());
            }
            open
        };
        let open = tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("every connection completes without being accepted");
        assert_eq!(open.len(), 300);
        drop(listener);
    }
}
