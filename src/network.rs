//! Raft RPC over HTTP: the client side openraft calls ([`Network`]) and the routes of the Raft
//! listener that answer it ([`raft_routes`]).
//!
//! Votes and append-entries travel as JSON. Snapshot chunks carry raw bytes: the body is a
//! 4-byte big-endian length, the JSON of the request without its data, then the data.
//! A peer answers 200 with the JSON of `Result<Response, RaftError>`; anything else is a transport
//! problem, which openraft treats as an unreachable peer and retries with back-off.

// openraft's RaftNetwork trait fixes the error type (RPCError, a few hundred bytes); helpers
// returning it are on the RPC path, where one allocation more would buy nothing.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use warp::Filter;

use crate::security::{self, Security, SECRET_HEADER};
use crate::store::SnapshotData;
use crate::tls::Connector;
use crate::types::{Node, NodeId, Raft, TypeConfig};

/// The one HTTP client of a node: keep-alive connections to peers are pooled and reused by
/// Raft RPC and by forwarded client requests alike.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<Connector, Full<Bytes>>,
    /// `http` or `https`: how to reach an address given without a scheme (API addresses).
    api_scheme: &'static str,
    /// Sent in [`SECRET_HEADER`] on every request: every request a node sends goes to
    /// another member (Raft RPC, forwarded writes and joins, read-index, status).
    cluster_secret: Option<Arc<str>>,
}

/// A failed HTTP exchange: either no answer at all, or an answer that was not the expected one.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{addr} did not answer within {0:?}", .timeout)]
    Timeout { addr: String, timeout: Duration },
    #[error("bad answer from {addr}: {reason}")]
    BadResponse { addr: String, reason: String },
}

/// A complete HTTP response.
pub struct HttpResponse {
    pub status: hyper::StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// How long an idle pooled connection is kept. Below the shortest header read timeout a
/// node allows (`api.header_read_timeout_ms`), so a node never reuses a connection its peer
/// is closing for idleness.
pub const POOL_IDLE_MS: u64 = 4_000;

impl HttpClient {
    /// A plain-HTTP client.
    pub fn new() -> Self {
        Self::with_tls(None, false)
    }

    /// A client that speaks TLS with `tls` to `https://` addresses; with `api_https`,
    /// addresses given without a scheme are reached over HTTPS too.
    pub fn with_tls(tls: Option<Arc<rustls::ClientConfig>>, api_https: bool) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(POOL_IDLE_MS))
            .pool_max_idle_per_host(64)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(Connector::new(http, tls));
        HttpClient {
            inner,
            api_scheme: if api_https { "https" } else { "http" },
            cluster_secret: None,
        }
    }

    /// The URI of `path_and_query` at `addr`: `host:port`, or a URL base with its scheme.
    fn uri(&self, addr: &str, path_and_query: &str) -> String {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            format!("{}{path_and_query}", addr.trim_end_matches('/'))
        } else {
            format!("{}://{addr}{path_and_query}", self.api_scheme)
        }
    }

    /// The same client, presenting `secret` to peers.
    pub fn with_cluster_secret(mut self, secret: Option<&str>) -> Self {
        self.cluster_secret = secret.map(Arc::from);
        self
    }

    /// Sends one request to `{addr}{path}` and reads the whole answer within `timeout`.
    /// `addr` is `host:port` (an API address) or a URL base such as `https://host:port`.
    pub async fn request(
        &self,
        method: hyper::Method,
        addr: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let uri = self.uri(addr, path_and_query);
        let mut builder = hyper::Request::builder().method(method).uri(&uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if let Some(secret) = &self.cluster_secret {
            builder = builder.header(SECRET_HEADER, &**secret);
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|e| HttpError::Unreachable {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| HttpError::Unreachable {
                    addr: addr.to_string(),
                    reason: error_chain(&e),
                })?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| HttpError::BadResponse {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }
}

impl HttpClient {
    /// Sends a GET and returns as soon as the response head arrives (within `timeout`), with
    /// the body still streaming: for `text/event-stream` answers, which never end by themselves.
    pub async fn get_streaming(
        &self,
        addr: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
        let uri = self.uri(addr, path_and_query);
        let mut builder = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri(&uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder
            .body(Full::new(Bytes::new()))
            .map_err(|e| HttpError::Unreachable {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        match tokio::time::timeout(timeout, self.inner.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(HttpError::Unreachable {
                addr: addr.to_string(),
                reason: error_chain(&e),
            }),
            Err(_) => Err(HttpError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Creates one [`PeerConnection`] per replication stream; all of them share the client.
#[derive(Clone)]
pub struct Network {
    client: HttpClient,
    /// `http://` or `https://` (mutual TLS): how peers' Raft listeners are reached.
    raft_scheme: &'static str,
}

impl Network {
    pub fn new(client: HttpClient, raft_tls: bool) -> Self {
        Network {
            client,
            raft_scheme: if raft_tls { "https://" } else { "http://" },
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection {
            client: self.client.clone(),
            target,
            addr: Arc::from(format!("{}{}", self.raft_scheme, node.raft_addr)),
        }
    }
}

/// RPC to one peer.
pub struct PeerConnection {
    client: HttpClient,
    target: NodeId,
    addr: Arc<str>,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Node, E>>;

impl PeerConnection {
    async fn call<Resp, E>(&self, path: &str, body: Bytes, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let resp = self
            .client
            .request(
                hyper::Method::POST,
                &self.addr,
                path,
                &[],
                body,
                option.hard_ttl(),
            )
            .await
            .map_err(|e| match e {
                HttpError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        if resp.status != hyper::StatusCode::OK {
            let e = HttpError::BadResponse {
                addr: self.addr.to_string(),
                reason: format!(
                    "status {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                ),
            };
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let result: Result<Resp, E> = serde_json::from_slice(&resp.body)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Encodes an RPC request; a failure is reported to openraft as a network error.
fn json_body<T: Serialize, E: std::error::Error>(
    value: &T,
) -> Result<Bytes, RPCError<NodeId, Node, E>> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let body = json_body(&rpc)?;
        self.call("/raft/append", body, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let body =
            encode_snapshot_chunk(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call("/raft/snapshot", body, &option).await
    }

    /// Sends a snapshot in chunks, as openraft's default does, after writing a recorded
    /// snapshot out as a file (see [`crate::store::SnapshotData`]). The leader's replication to
    /// this peer waits meanwhile; the state machine goes on applying.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let Snapshot { meta, snapshot } = snapshot;
        let mut cancel = Box::pin(cancel);
        let file = tokio::select! {
            file = snapshot.into_file() => match file {
                Ok(file) => file,
                // Not a storage error: openraft stops the node on one of those. The copy can
                // fail for a while (a full disk) while the node is sound; replication backs
                // off and asks again.
                Err(e) => {
                    tracing::warn!(snapshot = %meta, peer = self.target, error = %e, "cannot write out the snapshot to send; will try again");
                    return Err(StreamingError::Unreachable(Unreachable::new(&e)));
                }
            },
            closed = cancel.as_mut() => return Err(closed.into()),
        };
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::from(file)),
        };
        Chunked::send_snapshot(self, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let body = json_body(&rpc)?;
        self.call("/raft/vote", body, &option).await
    }
}

/// A snapshot chunk without its data, which travels raw after it.
#[derive(Serialize, Deserialize)]
struct ChunkHeader {
    vote: openraft::Vote<NodeId>,
    meta: openraft::SnapshotMeta<NodeId, Node>,
    offset: u64,
    done: bool,
}

pub(crate) fn encode_snapshot_chunk(
    rpc: InstallSnapshotRequest<TypeConfig>,
) -> Result<Bytes, serde_json::Error> {
    let header = serde_json::to_vec(&ChunkHeader {
        vote: rpc.vote,
        meta: rpc.meta,
        offset: rpc.offset,
        done: rpc.done,
    })?;
    let mut buf = BytesMut::with_capacity(4 + header.len() + rpc.data.len());
    // The header is a few hundred bytes: far below u32::MAX.
    buf.put_u32(header.len() as u32);
    buf.put_slice(&header);
    buf.put_slice(&rpc.data);
    Ok(buf.freeze())
}

pub(crate) fn decode_snapshot_chunk(
    mut body: Bytes,
) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
    if body.len() < 4 {
        return Err("snapshot chunk shorter than its length prefix".into());
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err("snapshot chunk header is cut short".into());
    }
    let header: ChunkHeader = serde_json::from_slice(&body.split_to(len))
        .map_err(|e| format!("bad snapshot chunk header: {e}"))?;
    Ok(InstallSnapshotRequest {
        vote: header.vote,
        meta: header.meta,
        offset: header.offset,
        data: body.to_vec(),
        done: header.done,
    })
}

/// The largest Raft RPC body accepted: a full append-entries batch or snapshot chunk.
const MAX_RPC_BODY: u64 = 64 * 1024 * 1024;

/// Routes of the Raft listener: `POST /raft/{vote,append,snapshot}`. Every request must
/// carry the cluster secret; one without it is answered 401 before its body is read, so a
/// forged RPC never reaches Raft.
pub fn raft_routes(
    raft: Raft,
    security: Arc<Security>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
    let with_raft = warp::any().map(move || raft.clone());
    let body = warp::body::content_length_limit(MAX_RPC_BODY).and(warp::body::bytes());

    let vote = warp::path!("raft" / "vote")
        .and(with_raft.clone())
        .and(body)
        .then(|raft: Raft, body: Bytes| async move {
            match serde_json::from_slice::<VoteRequest<NodeId>>(&body) {
                Ok(req) => json_reply(&raft.vote(req).await),
                Err(e) => bad_rpc(e.to_string()),
            }
        });
    let append = warp::path!("raft" / "append")
        .and(with_raft.clone())
        .and(body)
        .then(|raft: Raft, body: Bytes| async move {
            match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&body) {
                Ok(req) => json_reply(&raft.append_entries(req).await),
                Err(e) => bad_rpc(e.to_string()),
            }
        });
    let snapshot = warp::path!("raft" / "snapshot")
        .and(with_raft)
        .and(body)
        .then(|raft: Raft, body: Bytes| async move {
            match decode_snapshot_chunk(body) {
                Ok(req) => json_reply(&raft.install_snapshot(req).await),
                Err(e) => bad_rpc(e),
            }
        });

    security::peer_only(security)
        .and(warp::post())
        .and(vote.or(append).unify().or(snapshot).unify())
        .recover(|rejection: warp::Rejection| async move {
            let resp = match rejection.find::<crate::api::ApiError>() {
                Some(e) => warp::Reply::into_response(e.clone()),
                None => bad_rpc("no such Raft RPC".into()),
            };
            Ok::<_, std::convert::Infallible>(resp)
        })
}

fn json_reply<T: Serialize>(value: &T) -> warp::reply::Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = warp::reply::Response::new(body.into());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            let mut resp = warp::reply::Response::new(e.to_string().into());
            *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

fn bad_rpc(reason: String) -> warp::reply::Response {
    tracing::warn!(%reason, "rejected a Raft RPC");
    let mut resp = warp::reply::Response::new(reason.into());
    *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunk_round_trips() {
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 1),
            meta: Default::default(),
            offset: 42,
            data: vec![0, 1, 2, 255],
            done: true,
        };
        let back = decode_snapshot_chunk(encode_snapshot_chunk(rpc.clone()).unwrap()).unwrap();
        assert_eq!(back, rpc);
        assert!(decode_snapshot_chunk(Bytes::from_static(&[0, 0, 0, 9, b'{'])).is_err());
    }

    /// A storage error would stop the leader; a copy that cannot be made yet (a full disk, a
    /// vanished file) must only make replication to that peer back off and try again.
    #[tokio::test]
    async fn a_snapshot_that_cannot_be_written_out_is_an_unreachable_peer() {
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

        let dir = tempfile::tempdir().unwrap();
        let mut stores = crate::store::open(dir.path()).await.unwrap();
        let snapshot = stores
            .sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // The copy is made from the live database: without it, writing out fails.
        std::fs::remove_file(dir.path().join(crate::store::MESSAGES_DB)).unwrap();
        let node = Node {
            raft_addr: "127.0.0.1:9".into(),
            api_addr: "127.0.0.1:9".into(),
        };
        let mut peer = Network::new(HttpClient::new(), false)
            .new_client(2, &node)
            .await;
        let sent = peer
            .full_snapshot(
                Vote::new_committed(1, 1),
                snapshot,
                std::future::pending(),
                RPCOption::new(Duration::from_secs(1)),
            )
            .await;
        assert!(
            matches!(sent, Err(StreamingError::Unreachable(_))),
            "{sent:?}"
        );
    }
}
