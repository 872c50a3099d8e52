//! Leadership hand-off before a leader stops gracefully.
//!
//! openraft 0.9 has no leadership transfer, so a stopping leader would leave the cluster with no
//! leader until a follower's timer fires: the leader lease (`election_timeout_max_ms`) plus an
//! election timeout. Instead, once the API has stopped taking writes, the leader:
//!
//! 1. waits (bounded) until a voter's matched index equals the leader's last log index;
//! 2. asks that voter, through `POST /api/v1/internal/elect` on its API, to start an election
//!    at once (`raft.trigger().elect()`), naming the term and log index it must have;
//! 3. waits (bounded) until it sees another leader, asking again once in each new term it
//!    enters (from the third request on, no sooner than a heartbeat interval after the last
//!    one), then lets Raft stop.
//!
//! Why the election succeeds: the candidate's log is as long as the leader's, and the stopping
//! leader grants its vote: at once if it has led for longer than its lease
//! (`election_timeout_max_ms`), else on the second request, after the first one's higher term
//! made it step down. In a three-voter cluster that vote and the candidate's own make a
//! quorum. With more voters, the others refuse votes while their lease from the old leader
//! lasts; the candidate then wins on a later round, still sooner than a plain failover. Each
//! refused round puts the candidate in a new term, so asking at once in every new term would
//! run rounds back to back (hundreds of terms a second) until the leases end: hence the pace.
//! Every step is bounded; if one fails the node simply stops, and the cluster elects a leader
//! the usual way. No acknowledged write is at risk either way: the candidate can only win with
//! a log at least as long as a quorum's.

use std::time::Duration;

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::network::HttpClient;
use crate::types::{NodeId, Raft};

/// Path of the route that starts an election on the node that receives it.
pub const ELECT_PATH: &str = "/api/v1/internal/elect";

/// The body of [`ELECT_PATH`]: the receiver refuses unless it is in `term` and holds the log up
/// to `last_log_index`, so a late or misdirected request cannot start a useless election.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectRequest {
    pub from: NodeId,
    pub term: u64,
    pub last_log_index: u64,
}

/// Hands leadership to an up-to-date voter if this node is the leader. Returns the new leader's
/// id when the hand-off was seen to complete within `bound`. From the third request on, asks
/// are at least `pace` apart: each refused round costs a term, and the other voters' leases
/// end only `election_timeout_max_ms` after their last heartbeat, so the pace (the heartbeat
/// interval) bounds the rounds to about lease / pace. A request that failed (unreachable,
/// refused) is made again after `pace` even in the same term.
pub async fn transfer_leadership(
    raft: &Raft,
    client: &HttpClient,
    me: NodeId,
    bound: Duration,
    pace: Duration,
) -> Option<NodeId> {
    let deadline = Instant::now() + bound;
    let mut metrics = raft.metrics();
    let (target, addr, term, last_log_index) = loop {
        let m = metrics.borrow_and_update().clone();
        if m.state != ServerState::Leader {
            return None;
        }
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().filter(|v| *v != me).collect();
        if voters.is_empty() {
            return None;
        }
        let last = m.last_log_index.unwrap_or(0);
        let caught_up = m.replication.as_ref().and_then(|r| {
            voters
                .iter()
                .find(|v| r.get(v).and_then(|l| l.as_ref()).map(|l| l.index) == Some(last))
                .copied()
        });
        if let Some(v) = caught_up {
            if let Some(node) = membership.get_node(&v) {
                break (v, node.api_addr.clone(), m.current_term, last);
            }
        }
        if tokio::time::timeout_at(deadline, metrics.changed())
            .await
            .map_or(true, |r| r.is_err())
        {
            tracing::info!("no voter caught up in time; stopping without a hand-off");
            return None;
        }
    };

    // Ask until another leader is seen, once per term this node is in. The first request
    // may be refused by this very node: a leader elected less than `election_timeout_max_ms`
    // ago still holds its lease and rejects the vote. It then sees the candidate's higher term
    // and steps down to an uncommitted vote, which grants the second request at once. Later
    // requests wait for the pace: only other voters' leases can still be in the way.
    let mut last_ask: Option<(u64, Instant, bool)> = None;
    let mut asks = 0u32;
    loop {
        let m = metrics.borrow_and_update().clone();
        if let Some(leader) = m.current_leader.filter(|l| *l != me) {
            tracing::info!(
                new_leader = leader,
                term = m.current_term,
                asks,
                "handed leadership over"
            );
            return Some(leader);
        }
        let now = Instant::now();
        let next_ask = match last_ask {
            Some((asked_in, _, true)) if asked_in == m.current_term => None,
            Some((asked_in, at, false)) if asked_in == m.current_term => Some(at + pace),
            Some((_, at, _)) if asks >= 2 => Some(at + pace),
            _ => Some(now),
        };
        if next_ask.is_some_and(|at| at <= now) {
            asks += 1;
            let started = ask_to_elect(
                client,
                &addr,
                target,
                me,
                m.current_term,
                last_log_index,
                deadline,
            )
            .await;
            last_ask = Some((m.current_term, now, started));
            continue;
        }
        let wake = next_ask.map_or(deadline, |at| at.min(deadline));
        match tokio::time::timeout_at(wake, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return None,
            Err(_) if Instant::now() < deadline => {}
            Err(_) => {
                tracing::info!(
                    target_node = target,
                    first_term = term,
                    asks,
                    "no new leader seen in time; stopping anyway"
                );
                return None;
            }
        }
    }
}

/// Sends one elect request; true when the voter started an election. A refusal or an error
/// is logged.
async fn ask_to_elect(
    client: &HttpClient,
    addr: &str,
    target: NodeId,
    me: NodeId,
    term: u64,
    last_log_index: u64,
    deadline: Instant,
) -> bool {
    let body = ElectRequest {
        from: me,
        term,
        last_log_index,
    };
    // Three integers always serialise.
    let body = bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let left = deadline.saturating_duration_since(Instant::now());
    match client
        .request(
            hyper::Method::POST,
            addr,
            ELECT_PATH,
            &[("content-type", "application/json")],
            body,
            left,
        )
        .await
    {
        Ok(r) if r.status.is_success() => {
            tracing::info!(target_node = target, term, "asked a voter to take over");
            true
        }
        Ok(r) => {
            tracing::info!(target_node = target, status = %r.status, body = %String::from_utf8_lossy(&r.body), "the hand-off was refused");
            false
        }
        Err(e) => {
            tracing::info!(target_node = target, error = %e, "the hand-off request failed");
            false
        }
    }
}

/// Handles [`ELECT_PATH`] on the receiving node: starts an election at once if the request
/// matches this node's view.
pub async fn elect(raft: &Raft, me: NodeId, req: &ElectRequest) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == me)
    {
        return Err(format!("node {me} is not a voter"));
    }
    if m.current_term != req.term {
        return Err(format!(
            "node {me} is in term {}, the request names term {}",
            m.current_term, req.term
        ));
    }
    if m.last_log_index.unwrap_or(0) < req.last_log_index {
        return Err(format!(
            "node {me} holds the log up to {}, the request needs {}",
            m.last_log_index.unwrap_or(0),
            req.last_log_index
        ));
    }
    tracing::info!(
        from = req.from,
        term = req.term,
        "starting an election on the stopping leader's request"
    );
    raft.trigger()
        .elect()
        .await
        .map_err(|e| format!("Raft cannot start an election: {e}"))
}
