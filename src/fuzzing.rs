//! Entry points for the fuzz targets in `fuzz/`: the code that turns untrusted bytes into
//! typed values, reached exactly as the listeners reach it.
//!
//! Each function is a thin call into the real decoder; nothing here is used by the daemon.
//! They are public only because the fuzz targets are a separate crate.

use bytes::Bytes;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use uuid::Uuid;
use warp::http::{HeaderMap, HeaderValue};

use crate::api::messages;
use crate::api::ApiError;
use crate::config::Limits;
use crate::network;
use crate::types::{NodeId, TypeConfig, VectorClock};

/// A `POST /api/v1/message` body the API accepted, as the route hands it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedMessage {
    pub msg_id: Uuid,
    pub conv_id: String,
    pub sender: String,
    pub payload: String,
    pub vector_clock: Option<VectorClock>,
    /// Whether the client chose `msg_id` (else the server made a fresh one).
    pub client_msg_id: bool,
    /// The body a follower forwards to the leader, which decodes it with the same function.
    pub forwarded_body: Vec<u8>,
}

/// Decodes and validates a message body sent with `Content-Type: content_type` (no header
/// when the value is not a valid header value): the check `POST /api/v1/message` runs.
pub fn message_request(
    content_type: &str,
    body: &[u8],
    limits: &Limits,
) -> Result<AcceptedMessage, ApiError> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(warp::http::header::CONTENT_TYPE, v);
    }
    let v = messages::validate(&headers, body, limits)?;
    // As the follower's forward() encodes it.
    let forwarded_body = serde_json::to_vec(&v).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(AcceptedMessage {
        msg_id: v.msg_id,
        conv_id: v.conv_id,
        sender: v.sender,
        payload: v.payload,
        vector_clock: v.vector_clock,
        client_msg_id: v.client_msg_id,
        forwarded_body,
    })
}

/// The body of `POST /raft/vote`, decoded as [`network::raft_routes`] decodes it.
pub fn raft_vote(body: &[u8]) -> Result<VoteRequest<NodeId>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// The body of `POST /raft/append`, decoded as [`network::raft_routes`] decodes it.
pub fn raft_append(body: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// The body of `POST /raft/snapshot`: a length-prefixed JSON header, then the chunk's data.
pub fn raft_snapshot_chunk(body: &[u8]) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
    network::decode_snapshot_chunk(Bytes::copy_from_slice(body))
}

/// A snapshot chunk encoded as the sending peer encodes it.
pub fn encode_raft_snapshot_chunk(
    rpc: InstallSnapshotRequest<TypeConfig>,
) -> Result<Vec<u8>, serde_json::Error> {
    network::encode_snapshot_chunk(rpc).map(|b| b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The seed inputs committed for one fuzz target, by name.
    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = format!("{}/fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("a readable directory entry").path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
            })
            .map(|p| {
                (
                    p.display().to_string(),
                    std::fs::read(&p).expect("a readable seed"),
                )
            })
            .collect();
        out.sort();
        assert!(out.len() >= 3, "{dir} holds too few seeds");
        out
    }

    // The seeds are only useful while they are accepted: a fuzzer starting from refused
    // inputs spends its time rediscovering the format. When a format changes, so must they.

    #[test]
    fn message_seeds_are_accepted() {
        let limits = Config::default().limits;
        for (name, body) in seeds("message_request") {
            let m = message_request("application/json", &body, &limits)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let again = message_request("application/json", &m.forwarded_body, &limits)
                .unwrap_or_else(|e| panic!("{name}, forwarded: {e}"));
            assert_eq!(again.msg_id, m.msg_id, "{name}");
        }
    }

    #[test]
    fn config_seeds_are_accepted() {
        for (name, text) in seeds("config") {
            let text = String::from_utf8(text).expect("UTF-8");
            Config::from_toml_str(&text, &name).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn raft_rpc_seeds_decode() {
        // The fuzz target reads the first byte as the RPC: 0 vote, 1 append, 2 snapshot chunk.
        let mut kinds = [0; 3];
        for (name, input) in seeds("raft_rpc") {
            let (kind, body) = input.split_first().expect("not empty");
            match kind {
                0 => drop(raft_vote(body).unwrap_or_else(|e| panic!("{name}: {e}"))),
                1 => {
                    let req = raft_append(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(
                        !req.entries.is_empty() || name.contains("heartbeat"),
                        "{name}"
                    );
                }
                2 => {
                    let req = raft_snapshot_chunk(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                    let back = encode_raft_snapshot_chunk(req.clone()).expect("encodes");
                    assert_eq!(raft_snapshot_chunk(&back).expect("decodes"), req, "{name}");
                }
                other => panic!("{name}: unknown RPC kind {other}"),
            }
            kinds[*kind as usize] += 1;
        }
        assert!(
            kinds.iter().all(|n| *n > 0),
            "a seed for each RPC: {kinds:?}"
        );
    }
}
