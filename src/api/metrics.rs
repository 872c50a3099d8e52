//! `GET /metrics`: the node's state in the Prometheus text format (version 0.0.4).
//!
//! Raft gauges come from a copy of openraft's metrics; message counts from the `conversations`
//! table (one row per conversation, no scan); payload bytes from the running totals the state
//! machine keeps (see [`crate::metrics`]); file sizes from `stat` at scrape time.

use std::path::Path;
use std::sync::Arc;

use openraft::ServerState;
use warp::http::{header, StatusCode};
use warp::{Filter, Reply};

use super::error::reply_json;
use super::{with_state, ApiError, AppState};
use crate::metrics::{self, Exposition};
use crate::store::{LOG_DB, MESSAGES_DB, SNAPSHOT_DIR};

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .then(|state: Arc<AppState>| async move {
            match render(&state).await {
                Ok(text) => {
                    let mut resp = warp::reply::with_status(text, StatusCode::OK).into_response();
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                    resp
                }
                Err(e) => reply_json::<()>(Err(e)),
            }
        })
}

const ROLES: [(ServerState, &str); 5] = [
    (ServerState::Leader, "leader"),
    (ServerState::Follower, "follower"),
    (ServerState::Candidate, "candidate"),
    (ServerState::Learner, "learner"),
    (ServerState::Shutdown, "shutdown"),
];

async fn render(state: &AppState) -> Result<String, ApiError> {
    let m = state.raft.metrics().borrow().clone();
    let conversations = state
        .reader
        .conversations()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let data_dir = state.data_dir.clone();
    let sizes = tokio::task::spawn_blocking(move || file_sizes(&data_dir))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;

    let mut out = Exposition::default();
    out.single(
        "chatraftd_node_id",
        "This node's Raft id.",
        "gauge",
        state.node_id as f64,
    );
    out.header(
        "chatraftd_raft_role",
        "1 for the node's current Raft role, 0 for the others.",
        "gauge",
    );
    for (role, name) in ROLES {
        let v = if m.state == role { 1.0 } else { 0.0 };
        out.sample("chatraftd_raft_role", &[("role", name)], v);
    }
    out.single(
        "chatraftd_raft_term",
        "Current Raft term.",
        "gauge",
        m.current_term as f64,
    );
    out.single(
        "chatraftd_raft_leader_id",
        "Id of the leader this node knows, 0 when none.",
        "gauge",
        m.current_leader.unwrap_or(0) as f64,
    );
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map_or(0, |l| l.index);
    out.single(
        "chatraftd_raft_last_log_index",
        "Index of the last entry in this node's log.",
        "gauge",
        last_log as f64,
    );
    out.single(
        "chatraftd_raft_commit_index",
        "Highest log index known committed.",
        "gauge",
        state.commit_index().max(applied) as f64,
    );
    out.single(
        "chatraftd_raft_applied_index",
        "Highest log index applied to the message store.",
        "gauge",
        applied as f64,
    );
    out.header(
        "chatraftd_raft_replication_lag_entries",
        "On the leader: entries each peer lacks (leader's last log index minus the peer's matched index).",
        "gauge",
    );
    if let Some(replication) = &m.replication {
        for (peer, matched) in replication {
            if *peer == state.node_id {
                continue;
            }
            let lag = last_log.saturating_sub(matched.map_or(0, |l| l.index));
            out.sample(
                "chatraftd_raft_replication_lag_entries",
                &[("peer", &peer.to_string())],
                lag as f64,
            );
        }
    }

    metrics::WRITE_LATENCY.render(
        &mut out,
        "chatraftd_write_duration_seconds",
        "Time to answer POST /api/v1/message, from the valid request to the answer.",
    );

    out.header(
        "chatraftd_conversation_messages",
        "Messages stored per conversation.",
        "gauge",
    );
    for c in &conversations {
        out.sample(
            "chatraftd_conversation_messages",
            &[("conv_id", &c.conv_id)],
            c.count as f64,
        );
    }
    out.header(
        "chatraftd_conversation_payload_bytes",
        "Payload bytes (UTF-8) stored per conversation.",
        "gauge",
    );
    for (conv, bytes) in metrics::conv_bytes() {
        out.sample(
            "chatraftd_conversation_payload_bytes",
            &[("conv_id", &conv)],
            bytes as f64,
        );
    }
    out.single(
        "chatraftd_sse_subscribers",
        "Open event-stream subscriptions on this node.",
        "gauge",
        state.subscribers.open() as f64,
    );
    out.single(
        "chatraftd_api_connections",
        "Client API connections open on this node (event streams included); at most api.max_connections.",
        "gauge",
        metrics::API_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    out.header(
        "chatraftd_rejected_requests_total",
        "Error answers of the API, by error code.",
        "counter",
    );
    for (code, n) in metrics::rejected() {
        out.sample(
            "chatraftd_rejected_requests_total",
            &[("code", code)],
            n as f64,
        );
    }
    out.header(
        "chatraftd_storage_bytes",
        "Size of the node's files on disk (SQLite databases with their WAL, and the snapshot directory).",
        "gauge",
    );
    for (file, bytes) in &sizes {
        out.sample("chatraftd_storage_bytes", &[("file", file)], *bytes as f64);
    }
    out.header(
        "chatraftd_wal_checkpoints_total",
        "Background checkpoints of each database's WAL; outcome=complete when one copied every page, so the WAL can start afresh.",
        "counter",
    );
    for (db, (all, complete)) in metrics::wal_checkpoints() {
        for (outcome, n) in [("complete", complete), ("partial", all - complete)] {
            out.sample(
                "chatraftd_wal_checkpoints_total",
                &[("db", &db), ("outcome", outcome)],
                n as f64,
            );
        }
    }
    metrics::SNAPSHOT_BUILD.render(
        &mut out,
        "chatraftd_snapshot_build_duration_seconds",
        "Time to record a snapshot of the message store (its file is written out later, when a node needs it).",
    );
    metrics::SNAPSHOT_WRITE.render(
        &mut out,
        "chatraftd_snapshot_write_duration_seconds",
        "Time to write a recorded snapshot out as a file, the first time a node has to be sent it.",
    );
    metrics::SNAPSHOT_INSTALL.render(
        &mut out,
        "chatraftd_snapshot_install_duration_seconds",
        "Time to install a snapshot received from the leader.",
    );
    Ok(out.finish())
}

/// Sizes of the databases, their WAL files, and the snapshot directory; a missing file is 0.
fn file_sizes(data_dir: &Path) -> Vec<(String, u64)> {
    let size = |name: &str| std::fs::metadata(data_dir.join(name)).map_or(0, |m| m.len());
    let mut out = Vec::new();
    for db in [LOG_DB, MESSAGES_DB] {
        out.push((db.to_string(), size(db)));
        let wal = format!("{db}-wal");
        out.push((wal.clone(), size(&wal)));
    }
    let snapshots = std::fs::read_dir(data_dir.join(SNAPSHOT_DIR))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    out.push((SNAPSHOT_DIR.to_string(), snapshots));
    out
}
