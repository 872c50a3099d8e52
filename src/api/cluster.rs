//! Membership and health: `POST /join`, `DELETE /api/v1/cluster/nodes/{id}`,
//! `GET /api/v1/status`, `GET /healthz`, `GET /readyz`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::error::reply_json;
use super::{limited_body, with_state, ApiError, AppState, Leader, FORWARDED_HEADER};
use crate::types::{Node, NodeId};

/// A join waits this long at least: a new node may need a whole snapshot before it is a voter.
const MIN_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let join = warp::path!("join")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(warp::header::headers_cloned())
        .and(limited_body(64 * 1024))
        .then(
            |state: Arc<AppState>, headers: HeaderMap, body: Bytes| async move {
                reply_json(
                    join(&state, &headers, &body)
                        .await
                        .map(|s| (StatusCode::OK, s)),
                )
            },
        );
    let remove = warp::path!("api" / "v1" / "cluster" / "nodes" / NodeId)
        .and(warp::delete())
        .and(with_state(state.clone()))
        .and(warp::header::headers_cloned())
        .then(
            |node_id: NodeId, state: Arc<AppState>, headers: HeaderMap| async move {
                reply_json(
                    remove(&state, &headers, node_id)
                        .await
                        .map(|s| (StatusCode::OK, s)),
                )
            },
        );
    let status = warp::path!("api" / "v1" / "status")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(
            |state: Arc<AppState>| async move { reply_json(Ok((StatusCode::OK, status(&state)))) },
        );
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state: Arc<AppState>| async move {
            let running = state.raft.metrics().borrow().running_state.is_ok();
            reply_json(if running {
                Ok((StatusCode::OK, serde_json::json!({"status": "ok"})))
            } else {
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_running",
                    "Raft has stopped on this node",
                ))
            })
        });
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state))
        .then(|state: Arc<AppState>| async move {
            reply_json(match not_ready_reason(&state).await {
                None => Ok((StatusCode::OK, serde_json::json!({"status": "ready"}))),
                Some(why) => Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    why,
                )),
            })
        });
    join.or(remove)
        .unify()
        .or(status)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    node_id: NodeId,
    raft_addr: String,
    api_addr: String,
}

#[derive(Serialize)]
pub struct Status {
    node_id: NodeId,
    role: &'static str,
    term: u64,
    leader: Option<LeaderInfo>,
    last_log_index: u64,
    commit_index: u64,
    last_applied: u64,
    snapshot_index: u64,
    purged_index: u64,
    members: Vec<Member>,
    /// Only on the leader: the highest log index each member is known to hold, from the
    /// leader's own replication progress. Followers cannot know it, so they leave it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<Vec<Replicated>>,
}

#[derive(Serialize)]
struct Replicated {
    node_id: NodeId,
    matched_index: u64,
}

#[derive(Serialize)]
struct LeaderInfo {
    node_id: NodeId,
    api_addr: String,
}

#[derive(Serialize)]
struct Member {
    node_id: NodeId,
    raft_addr: String,
    api_addr: String,
    voter: bool,
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

pub fn status(state: &AppState) -> Status {
    let m = state.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| Member {
            node_id: *id,
            raft_addr: n.raft_addr.clone(),
            api_addr: n.api_addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let leader = m.current_leader.map(|id| LeaderInfo {
        node_id: id,
        api_addr: membership
            .get_node(&id)
            .map(|n| n.api_addr.clone())
            .unwrap_or_default(),
    });
    let last_applied = m.last_applied.map_or(0, |l| l.index);
    let replication = m.replication.as_ref().map(|r| {
        r.iter()
            .map(|(id, matched)| Replicated {
                node_id: *id,
                matched_index: matched.map_or(0, |l| l.index),
            })
            .collect()
    });
    Status {
        node_id: state.node_id,
        role: role_name(m.state),
        term: m.current_term,
        leader,
        last_log_index: m.last_log_index.unwrap_or(0),
        // The committed index the log store last saved; never behind what was applied.
        commit_index: state.commit_index().max(last_applied),
        last_applied,
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        purged_index: m.purged.map_or(0, |l| l.index),
        members,
        replication,
    }
}

/// How long `/readyz` waits for the leader to confirm its commit index.
const READY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one confirmation serves later `/readyz` probes.
const CONFIRM_REUSE: Duration = Duration::from_millis(500);

/// Why this node should not get traffic yet, or `None` when it is ready: a member, with a
/// leader that confirms its commit index now (a restarted node may still remember a leader
/// and a commit index from before it stopped), and applied up to that index.
async fn not_ready_reason(state: &AppState) -> Option<String> {
    let m = state.raft.metrics().borrow().clone();
    if let Err(e) = &m.running_state {
        return Some(format!("Raft has stopped: {e}"));
    }
    if m.membership_config
        .membership()
        .get_node(&state.node_id)
        .is_none()
    {
        return Some("this node is not a member of a cluster yet".into());
    }
    if m.current_leader.is_none() {
        return Some("no leader is known".into());
    }
    // `/readyz` is open to everyone and a leader confirms with a round to a quorum: probes
    // within CONFIRM_REUSE of a confirmation reuse it, so a flood of probes costs no Raft work.
    let reused = {
        let cache = state
            .ready_confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cache.filter(|(at, _)| at.elapsed() < CONFIRM_REUSE)
    };
    let confirmed = match (reused, state.leader()) {
        (Some((_, index)), _) => Some(index),
        (None, leader) => confirm_commit(state, leader).await,
    };
    if let Some(index) = confirmed {
        if reused.is_none() {
            *state
                .ready_confirmed
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), index));
        }
    }
    let Some(leader_commit) = confirmed else {
        return Some("the leader did not confirm its commit index".into());
    };
    // Under steady writes the applied index trails the commit by a moment: wait for it a
    // little rather than answer "not ready" for what is only the next apply.
    let mut applied = state.reader.applied();
    let caught_up = matches!(
        tokio::time::timeout(
            READY_CONFIRM_TIMEOUT,
            applied.wait_for(|a| *a >= leader_commit)
        )
        .await,
        Ok(Ok(_))
    );
    if caught_up {
        return None;
    }
    let now = *applied.borrow();
    Some(format!(
        "catching up: applied {now} of {leader_commit} committed on the leader"
    ))
}

/// The leader's commit index, confirmed now: by a quorum round when this node leads, else by
/// asking the leader.
async fn confirm_commit(state: &AppState, leader: Leader) -> Option<u64> {
    match leader {
        Leader::Me => tokio::time::timeout(
            READY_CONFIRM_TIMEOUT,
            super::messages::leader_read_index(state),
        )
        .await
        .ok()
        .and_then(Result::ok),
        Leader::Other(_, Some(addr)) => {
            let deadline = Instant::now() + READY_CONFIRM_TIMEOUT;
            super::messages::remote_read_index(state, &addr, deadline)
                .await
                .ok()
                .flatten()
        }
        Leader::Other(_, None) | Leader::Unknown => None,
    }
}

async fn join(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Status, ApiError> {
    let req: JoinRequest = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    if req.node_id == 0 {
        return Err(ApiError::invalid_field("node_id", "must be 1 or more"));
    }
    for (field, addr) in [("raft_addr", &req.raft_addr), ("api_addr", &req.api_addr)] {
        if !looks_like_host_port(addr) {
            return Err(ApiError::invalid_field(field, "must be host:port"));
        }
    }
    let forward = Forward {
        what: "join",
        method: hyper::Method::POST,
        path: "/join".to_string(),
        body: Bytes::copy_from_slice(body),
        codes: &["node_conflict", "cluster_full", "invalid_field"],
    };
    on_leader(state, headers, forward, |deadline| {
        join_as_leader(state, req, deadline)
    })
    .await
}

fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', ' '])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// How long resolving one join address may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket addresses `host:port` names (a host name may name several).
async fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(addr)).await {
        Ok(Ok(addrs)) => {
            // `::ffff:a.b.c.d` and `a.b.c.d` are one address.
            let v: Vec<SocketAddr> = addrs
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect();
            if v.is_empty() {
                Err(format!("{addr} resolves to no address"))
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => Err(format!("{addr} does not resolve: {e}")),
        Err(_) => Err(format!("{addr} did not resolve within {RESOLVE_TIMEOUT:?}")),
    }
}

/// Whether `a` reaches a listener bound to `bound` on this host.
fn reaches(a: SocketAddr, bound: SocketAddr, local_ips: &[IpAddr]) -> bool {
    if a.port() != bound.port() {
        return false;
    }
    let ip = a.ip();
    if bound.ip().is_unspecified() {
        ip.is_loopback() || ip.is_unspecified() || local_ips.contains(&ip)
    } else {
        ip == bound.ip().to_canonical() || (ip.is_unspecified() && bound.ip().is_loopback())
    }
}

/// The addresses of this host's network interfaces.
fn local_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// A new node's addresses must be its own: 400 for an address that resolves to nothing or to
/// an unspecified address, 409 for one that leads to this node's listeners or to another
/// member's, however it is spelt (`localhost`, `127.0.0.1`, `::ffff:127.0.0.1` are one).
async fn check_new_addresses(
    state: &AppState,
    node_id: NodeId,
    node: &Node,
) -> Result<(), ApiError> {
    let conflict = |message: String| ApiError::new(StatusCode::CONFLICT, "node_conflict", message);
    let fields = [("raft_addr", &node.raft_addr), ("api_addr", &node.api_addr)];
    // Resolved all at once, so the membership lock is held for one lookup's time at most.
    let lookups = futures_util::future::join_all(fields.iter().map(|(_, a)| resolve(a))).await;
    let mut new = Vec::new();
    for ((field, addr), resolved) in fields.into_iter().zip(lookups) {
        let resolved = resolved.map_err(|m| ApiError::invalid_field(field, &m))?;
        if resolved.iter().any(|a| a.ip().is_unspecified()) {
            return Err(ApiError::invalid_field(
                field,
                &format!("{addr} is an unspecified address, which peers cannot reach"),
            ));
        }
        new.push((field, addr, resolved));
    }
    let local = local_ips();
    for (field, addr, resolved) in &new {
        if resolved
            .iter()
            .any(|a| state.listen.iter().any(|bound| reaches(*a, *bound, &local)))
        {
            return Err(conflict(format!(
                "{field} {addr} leads to node {} itself, not to node {node_id}",
                state.node_id
            )));
        }
    }
    let members: Vec<(NodeId, Node)> = {
        let m = state.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    };
    let existing: Vec<(NodeId, &String)> = members
        .iter()
        .flat_map(|(id, m)| [(*id, &m.raft_addr), (*id, &m.api_addr)])
        .collect();
    let theirs_all = futures_util::future::join_all(existing.iter().map(|(_, a)| resolve(a))).await;
    for ((id, existing), theirs) in existing.into_iter().zip(theirs_all) {
        // A member whose name no longer resolves is compared by its spelling alone.
        let theirs = theirs.unwrap_or_default();
        for (field, addr, resolved) in &new {
            if *addr == existing || resolved.iter().any(|a| theirs.contains(a)) {
                return Err(conflict(format!(
                    "{field} {addr} is already used by node {id} (as {existing})"
                )));
            }
        }
    }
    Ok(())
}

async fn join_as_leader(
    state: &AppState,
    req: JoinRequest,
    deadline: Instant,
) -> Result<Status, ApiError> {
    // One membership change at a time: the check below must still hold when the change lands.
    let _guard = tokio::time::timeout_at(deadline, state.membership_lock.lock())
        .await
        .map_err(|_| ApiError::unavailable("another membership change is in progress"))?;
    let node = Node {
        raft_addr: req.raft_addr.clone(),
        api_addr: req.api_addr.clone(),
    };
    let (is_member, is_voter) = {
        let m = state.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        match membership.get_node(&req.node_id) {
            Some(existing) if *existing != node => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "node_conflict",
                    format!("node {} is already a member with {existing}", req.node_id),
                ))
            }
            Some(_) => (true, membership.voter_ids().any(|v| v == req.node_id)),
            None => {
                let size = membership.nodes().count();
                if size >= state.limits.max_cluster_size {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "cluster_full",
                        format!(
                            "the cluster has {size} members, the most limits.max_cluster_size allows"
                        ),
                    ));
                }
                (false, false)
            }
        }
    };
    if is_voter {
        return Ok(status(state));
    }
    if !is_member {
        check_new_addresses(state, req.node_id, &node).await?;
    }
    let raft_failed =
        |e: String| ApiError::unavailable(format!("the membership change failed: {e}"));
    if !is_member {
        tracing::info!(node_id = req.node_id, %node, "adding a learner");
        tokio::time::timeout_at(deadline, state.raft.add_learner(req.node_id, node, true))
            .await
            .map_err(|_| {
                ApiError::unavailable("the new node did not catch up in time; join again")
            })?
            .map_err(|e| raft_failed(e.to_string()))?;
    }
    tracing::info!(node_id = req.node_id, "promoting to voter");
    let voters: BTreeSet<NodeId> = [req.node_id].into();
    tokio::time::timeout_at(
        deadline,
        state
            .raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false),
    )
    .await
    .map_err(|_| {
        ApiError::unavailable("the membership change was not committed in time; join again")
    })?
    .map_err(|e| raft_failed(e.to_string()))?;
    Ok(status(state))
}

/// Removes a node from the cluster, on the leader (forwarded there from any node). Answers
/// once the new membership is committed; the removed node's own process is left running and
/// should be stopped by its operator.
async fn remove(
    state: &AppState,
    headers: &HeaderMap,
    node_id: NodeId,
) -> Result<Status, ApiError> {
    let forward = Forward {
        what: "removal",
        method: hyper::Method::DELETE,
        path: format!("/api/v1/cluster/nodes/{node_id}"),
        body: Bytes::new(),
        codes: &["not_found", "invalid_field"],
    };
    on_leader(state, headers, forward, |deadline| {
        remove_as_leader(state, node_id, deadline)
    })
    .await
}

/// A membership request as this node would pass it on to the leader.
struct Forward {
    /// What it is, for error messages: "join", "removal".
    what: &'static str,
    method: hyper::Method,
    path: String,
    body: Bytes,
    /// Error codes of the leader's answer passed on as they are; others become `internal`.
    codes: &'static [&'static str],
}

/// Runs a membership change on the leader: here when this node leads, else by forwarding it
/// (once: a forwarded request is never forwarded again), waiting for a leader within the
/// join deadline.
async fn on_leader<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    forward: Forward,
    local: F,
) -> Result<Status, ApiError>
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = Result<Status, ApiError>>,
{
    // Within the API's request timeout (a tenth of it left for the answer), so a slow change
    // ends in this route's 503 "join again", not in the listener's 408.
    let bound = state
        .write_timeout
        .max(MIN_JOIN_TIMEOUT)
        .min(state.request_timeout.mul_f64(0.9));
    let deadline = Instant::now() + bound;
    let forwarded = headers.contains_key(FORWARDED_HEADER);
    loop {
        match state.leader() {
            Leader::Me => return local(deadline).await,
            Leader::Other(_, addr) if !forwarded => {
                if let Some(addr) = addr {
                    if let Some(result) = forward_to(state, &addr, &forward, deadline).await {
                        return result;
                    }
                }
            }
            Leader::Other(..) => {
                return Err(ApiError {
                    code: "not_leader",
                    ..ApiError::unavailable("this node is not the leader")
                })
            }
            Leader::Unknown => {}
        }
        if Instant::now() >= deadline {
            return Err(ApiError::unavailable(format!(
                "no leader could take the {} in time",
                forward.what
            )));
        }
        let mut metrics = state.raft.metrics();
        let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
    }
}

/// Returns None when the leader could not be reached and the caller should look again.
async fn forward_to(
    state: &AppState,
    addr: &str,
    forward: &Forward,
    deadline: Instant,
) -> Option<Result<Status, ApiError>> {
    let left = deadline.saturating_duration_since(Instant::now());
    let resp = state
        .client
        .request(
            forward.method.clone(),
            addr,
            &forward.path,
            &[
                ("content-type", "application/json"),
                (FORWARDED_HEADER, "1"),
            ],
            forward.body.clone(),
            left,
        )
        .await
        .ok()?;
    match resp.status {
        StatusCode::OK => Some(Ok(status(state))),
        StatusCode::SERVICE_UNAVAILABLE => None,
        s => {
            let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
            let code = v["error"]["code"]
                .as_str()
                .and_then(|c| forward.codes.iter().find(|known| **known == c))
                .copied()
                .unwrap_or("internal");
            let message = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("the leader refused the {}", forward.what));
            Some(Err(ApiError::new(s, code, message)))
        }
    }
}

async fn remove_as_leader(
    state: &AppState,
    node_id: NodeId,
    deadline: Instant,
) -> Result<Status, ApiError> {
    // One membership change at a time: the checks below must still hold when the change lands.
    let _guard = tokio::time::timeout_at(deadline, state.membership_lock.lock())
        .await
        .map_err(|_| ApiError::unavailable("another membership change is in progress"))?;
    let change = {
        let m = state.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if membership.get_node(&node_id).is_none() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("node {node_id} is not a member"),
            ));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&node_id) {
            if voters.len() == 1 {
                return Err(ApiError::invalid_field(
                    "node_id",
                    "is the last voter; a cluster cannot remove it",
                ));
            }
            ChangeMembers::RemoveVoters([node_id].into())
        } else {
            ChangeMembers::RemoveNodes([node_id].into())
        }
    };
    tracing::info!(node_id, "removing a node");
    // retain = false: a removed voter does not stay on as a learner.
    tokio::time::timeout_at(deadline, state.raft.change_membership(change, false))
        .await
        .map_err(|_| {
            ApiError::unavailable("the membership change was not committed in time; try again")
        })?
        .map_err(|e| ApiError::unavailable(format!("the membership change failed: {e}")))?;
    Ok(status(state))
}
