//! `GET /api/v1/cluster`: every member's status, gathered by the answering node.
//!
//! A browser may only call the node that served its page, so this node asks each other member's
//! `GET /api/v1/status` (in parallel, through the shared keep-alive client, with a short timeout)
//! and answers with one list in which each member is marked up or down; an answer is reused for
//! a second, so many open pages do not multiply the calls. Replication lag comes
//! from the leader's own progress: this node's metrics when it leads, otherwise the `replication`
//! list of the leader's status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use warp::http::StatusCode;
use warp::Filter;

use super::cluster::status;
use super::error::reply_json;
use super::{with_state, AppState};
use crate::types::NodeId;

/// How long a member may take to answer before it is shown as down. A healthy member answers
/// `/api/v1/status` from memory in well under a millisecond on a LAN.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(800);

/// How long an answer is reused. However many pages poll this node, it asks the other members
/// at most once per this interval.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// An answer and when it was made.
type Stamped = (Instant, Arc<Overview>);

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    // The last answer and when it was made. The lock is held while a new answer is gathered,
    // so callers arriving meanwhile wait for it and share it instead of asking again.
    let last: Arc<Mutex<Option<Stamped>>> = Arc::new(Mutex::new(None));
    warp::path!("api" / "v1" / "cluster")
        .and(warp::get())
        .and(with_state(state))
        .then(move |state: Arc<AppState>| {
            let last = last.clone();
            async move {
                let mut last = last.lock().await;
                let answer = match &*last {
                    Some((at, answer)) if at.elapsed() < FRESH_FOR => answer.clone(),
                    _ => {
                        let answer = Arc::new(overview(&state).await);
                        *last = Some((Instant::now(), answer.clone()));
                        answer
                    }
                };
                reply_json(Ok((StatusCode::OK, answer)))
            }
        })
}

#[derive(Serialize)]
struct Overview {
    /// The node that answered, and its own view of the cluster.
    node_id: NodeId,
    role: Value,
    term: Value,
    leader: Value,
    members: Vec<MemberView>,
}

#[derive(Serialize)]
struct MemberView {
    node_id: NodeId,
    api_addr: String,
    voter: bool,
    /// The member answered its status within the timeout.
    up: bool,
    /// Why a member is down (unreachable, timed out, bad answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The member's own words; null when it is down.
    role: Value,
    term: Value,
    last_log_index: Value,
    commit_index: Value,
    last_applied: Value,
    /// The leader's last log index minus what the leader knows this member holds; null when
    /// no reachable leader reported its replication progress.
    lag: Option<u64>,
}

async fn overview(state: &AppState) -> Overview {
    // This node's own status never travels over HTTP.
    let me = serde_json::to_value(status(state)).unwrap_or_default();
    let members: Vec<(NodeId, String, bool)> = me["members"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|m| {
                    Some((
                        m["node_id"].as_u64()?,
                        m["api_addr"].as_str()?.to_string(),
                        m["voter"].as_bool().unwrap_or(false),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();

    let answers = join_all(members.iter().map(|(id, addr, _)| {
        let me = &me;
        async move {
            if *id == state.node_id {
                Ok(me.clone())
            } else {
                member_status(state, addr).await
            }
        }
    }))
    .await;

    let by_id: BTreeMap<NodeId, &Result<Value, String>> = members
        .iter()
        .map(|(id, _, _)| *id)
        .zip(answers.iter())
        .collect();
    let lags = replication_lag(&me, &by_id);

    let views = members
        .iter()
        .zip(answers.iter())
        .map(|((id, addr, voter), answer)| {
            let (up, error, s) = match answer {
                Ok(s) => (true, None, s.clone()),
                Err(e) => (false, Some(e.clone()), Value::Null),
            };
            MemberView {
                node_id: *id,
                api_addr: addr.clone(),
                voter: *voter,
                up,
                error,
                role: s["role"].clone(),
                term: s["term"].clone(),
                last_log_index: s["last_log_index"].clone(),
                commit_index: s["commit_index"].clone(),
                last_applied: s["last_applied"].clone(),
                lag: lags.get(id).copied(),
            }
        })
        .collect();
    Overview {
        node_id: state.node_id,
        role: me["role"].clone(),
        term: me["term"].clone(),
        leader: me["leader"].clone(),
        members: views,
    }
}

async fn member_status(state: &AppState, addr: &str) -> Result<Value, String> {
    let resp = state
        .client
        .request(
            hyper::Method::GET,
            addr,
            "/api/v1/status",
            &[],
            Bytes::new(),
            MEMBER_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    if resp.status != StatusCode::OK {
        return Err(format!("status answered {}", resp.status));
    }
    serde_json::from_slice(&resp.body).map_err(|e| format!("status is not JSON: {e}"))
}

/// Lag per member from the status of whichever member says it leads and reports replication
/// progress (at most one leader per term; the highest term wins if two answered).
fn replication_lag(
    me: &Value,
    statuses: &BTreeMap<NodeId, &Result<Value, String>>,
) -> BTreeMap<NodeId, u64> {
    let leader = std::iter::once(me)
        .chain(statuses.values().filter_map(|r| r.as_ref().ok()))
        .filter(|s| s["role"] == "leader" && s["replication"].is_array())
        .max_by_key(|s| s["term"].as_u64().unwrap_or(0));
    let Some(leader) = leader else {
        return BTreeMap::new();
    };
    let last = leader["last_log_index"].as_u64().unwrap_or(0);
    let mut lags: BTreeMap<NodeId, u64> = leader["replication"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let matched = r["matched_index"].as_u64()?;
            Some((r["node_id"].as_u64()?, last.saturating_sub(matched)))
        })
        .collect();
    if let Some(id) = leader["node_id"].as_u64() {
        lags.insert(id, 0);
    }
    lags
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lag_of(me: Value, others: &[(NodeId, Result<Value, String>)]) -> BTreeMap<NodeId, u64> {
        let by_id = others.iter().map(|(id, r)| (*id, r)).collect();
        replication_lag(&me, &by_id)
    }

    #[test]
    fn lag_comes_from_the_leaders_replication_progress() {
        let follower = json!({"node_id": 2, "role": "follower", "term": 3});
        let leader = json!({
            "node_id": 1, "role": "leader", "term": 3, "last_log_index": 40,
            "replication": [
                {"node_id": 1, "matched_index": 40},
                {"node_id": 2, "matched_index": 38},
                {"node_id": 3, "matched_index": 0},
            ],
        });
        let others = vec![(1, Ok(leader)), (3, Err("refused".into()))];
        let lags = lag_of(follower, &others);
        assert_eq!(lags, BTreeMap::from([(1, 0), (2, 2), (3, 40)]));
    }

    #[test]
    fn no_reachable_leader_means_no_lag() {
        let follower = json!({"node_id": 2, "role": "follower", "term": 3});
        let others = vec![(1, Err("timed out".into()))];
        assert!(lag_of(follower, &others).is_empty());
    }

    #[test]
    fn a_stale_leader_loses_to_the_newer_term() {
        let old = json!({
            "node_id": 1, "role": "leader", "term": 2, "last_log_index": 10,
            "replication": [{"node_id": 2, "matched_index": 1}],
        });
        let new = json!({
            "node_id": 3, "role": "leader", "term": 4, "last_log_index": 12,
            "replication": [{"node_id": 2, "matched_index": 12}],
        });
        let others = vec![(3, Ok(new))];
        assert_eq!(lag_of(old, &others), BTreeMap::from([(2, 0), (3, 0)]));
    }
}
