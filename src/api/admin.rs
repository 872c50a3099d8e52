//! Node-to-node operations routes under `/api/v1/internal/`: `POST /api/v1/internal/elect`,
//! sent by a stopping leader to the voter it hands leadership to (see [`crate::handoff`]).

use std::sync::Arc;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::Filter;

use super::error::reply_json;
use super::{limited_body, with_state, ApiError, AppState};
use crate::handoff::{self, ElectRequest};

/// The elect request is three numbers; anything bigger is not one.
const MAX_ELECT_BODY: u64 = 1024;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("api" / "v1" / "internal" / "elect")
        .and(warp::post())
        .and(with_state(state))
        .and(limited_body(MAX_ELECT_BODY))
        .then(|state: Arc<AppState>, body: Bytes| async move {
            reply_json(elect(&state, &body).await)
        })
}

async fn elect(state: &AppState, body: &[u8]) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let req: ElectRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not an elect request: {e}"),
        )
    })?;
    handoff::elect(&state.raft, state.node_id, &req)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "not_eligible", e))?;
    Ok((
        StatusCode::ACCEPTED,
        serde_json::json!({"status": "election started", "node_id": state.node_id}),
    ))
}
