//! The client HTTP API: messages, the event stream, history, membership and health, the
//! cluster overview and the web page.
//!
//! Every handler answers with a complete response; warp's own rejections (unknown path, wrong
//! method, body too large) are turned into the same JSON error shape by [`recover`].

mod admin;
mod batcher;
mod cluster;
mod error;
mod forwarder;
pub(crate) mod messages;
mod metrics;
mod overview;
mod stream;
mod subscribers;
mod web;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::watch;
use warp::http::StatusCode;
use warp::{Filter, Reply};

pub use error::ApiError;
pub use messages::check_conv_id;

use crate::config::{Config, Limits};
use crate::network::HttpClient;
use crate::security::{self, Security};
use crate::store::MessageReader;
use crate::types::{NodeId, Raft};

/// A request forwarded by a follower carries this header; the receiver answers `not_leader`
/// instead of forwarding again, so a stale leader hint never makes a loop.
pub const FORWARDED_HEADER: &str = "x-chatraftd-forwarded";

/// What every handler shares.
pub struct AppState {
    pub node_id: NodeId,
    pub raft: Raft,
    pub reader: MessageReader,
    /// The shared keep-alive client, for forwarding to the leader.
    pub client: HttpClient,
    pub limits: Limits,
    /// The bound on waiting for a leader and a commit.
    pub write_timeout: Duration,
    /// The listener's bound on one request (`api.request_timeout_ms`).
    pub request_timeout: Duration,
    pub sse_keepalive: Duration,
    /// Becomes true when the node begins to stop: streams end, waits give up.
    pub shutdown: watch::Receiver<bool>,
    /// The highest log index known committed, kept current by the log store.
    pub commit_index: Arc<AtomicU64>,
    /// Serialises membership changes on the leader: one join at a time.
    pub membership_lock: tokio::sync::Mutex<()>,
    /// Groups concurrent writes into one log entry when this node leads.
    pub batcher: batcher::Batcher,
    /// Sends the writes this node takes to the leader together when it follows.
    pub(crate) forwarder: forwarder::Forwarder,
    /// The cluster secret and client tokens.
    pub security: Arc<Security>,
    /// The per-address write rate (`limits.write_rate_per_sec`, `limits.write_burst`).
    pub write_rate: security::rate::RateLimiter,
    /// The node's data dir, for the file sizes in `/metrics`.
    pub data_dir: std::path::PathBuf,
    /// When `/readyz` last had the leader's commit index confirmed, and that index.
    pub ready_confirmed: std::sync::Mutex<Option<(tokio::time::Instant, u64)>>,
    /// Open event streams, capped per node and per client address.
    pub subscribers: subscribers::SubscriberSlots,
    /// Where this node's own listeners are bound (API, Raft): `/join` refuses a node whose
    /// addresses lead back here.
    pub listen: [std::net::SocketAddr; 2],
}

/// Who leads, as this node's Raft metrics say.
pub(crate) enum Leader {
    /// This node.
    Me,
    /// Another node, with its API address when the membership lists it.
    Other(NodeId, Option<String>),
    /// No leader is known.
    Unknown,
}

impl Leader {
    /// Reads the leader and its address from one snapshot of the metrics.
    pub(crate) fn from_metrics(
        m: &openraft::RaftMetrics<NodeId, crate::types::Node>,
        me: NodeId,
    ) -> Leader {
        match m.current_leader {
            Some(id) if id == me => Leader::Me,
            Some(id) => Leader::Other(
                id,
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.api_addr.clone()),
            ),
            None => Leader::Unknown,
        }
    }
}

impl AppState {
    pub(crate) fn leader(&self) -> Leader {
        Leader::from_metrics(&self.raft.metrics().borrow(), self.node_id)
    }

    pub fn new(
        config: &Config,
        raft: Raft,
        reader: MessageReader,
        client: HttpClient,
        shutdown: watch::Receiver<bool>,
        commit_index: Arc<AtomicU64>,
        security: Arc<Security>,
    ) -> Self {
        // Event streams wait on their conversation's live window, not on `shutdown`: closing
        // the windows when the node begins to stop ends them all.
        let tail = reader.tail().clone();
        let mut stopping = shutdown.clone();
        tokio::spawn(async move {
            let _ = stopping.wait_for(|s| *s).await;
            tail.close();
        });
        AppState {
            node_id: config.node_id,
            batcher: batcher::Batcher::start(raft.clone()),
            forwarder: forwarder::Forwarder::new(client.clone()),
            raft,
            reader,
            client,
            limits: config.limits.clone(),
            write_timeout: config.write_timeout(),
            request_timeout: config.request_timeout(),
            sse_keepalive: Duration::from_secs(config.api.sse_keepalive_secs),
            shutdown,
            commit_index,
            membership_lock: tokio::sync::Mutex::new(()),
            security,
            write_rate: security::rate::RateLimiter::new(
                config.limits.write_rate_per_sec,
                config.limits.write_burst,
            ),
            data_dir: config.data_dir.clone(),
            listen: [config.api_listen_addr(), config.raft_listen_addr()],
            ready_confirmed: std::sync::Mutex::new(None),
            subscribers: subscribers::SubscriberSlots::new(
                config.limits.max_subscribers,
                config.limits.max_subscribers_per_address,
            ),
        }
    }

    pub fn commit_index(&self) -> u64 {
        self.commit_index.load(Ordering::Acquire)
    }
}

/// All routes of the API listener. Admin and internal paths need the cluster secret
/// ([`security::is_admin_path`]), checked before any route runs.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let guard = security::guard(state.security.clone());
    let api = messages::routes(state.clone())
        .or(stream::routes(state.clone()))
        .or(cluster::routes(state.clone()))
        .or(metrics::routes(state.clone()))
        .or(admin::routes(state.clone()))
        .or(overview::routes(state))
        .or(web::routes());
    guard.and(api).recover(recover)
}

/// The request body, read up to `max` bytes: a bigger `Content-Length`, or a chunked body that
/// grows past `max`, is refused with 413 before more is read. A body without `Content-Length`
/// is accepted, unlike warp's own limit filter.
fn limited_body(max: u64) -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |declared, body| read_limited(declared, body, max))
}

async fn read_limited<S, B>(
    declared: Option<u64>,
    body: S,
    max: u64,
) -> Result<Bytes, warp::Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || {
        warp::reject::custom(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max} bytes (limits.max_body_bytes)"),
        ))
    };
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            warp::reject::custom(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body could not be read: {e}"),
            ))
        })?;
        if buf.len() as u64 + chunk.remaining() as u64 > max {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

fn with_state(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// Turns warp's own rejections into JSON errors.
async fn recover(rejection: warp::Rejection) -> Result<warp::reply::Response, Infallible> {
    use warp::reject;
    let err = if let Some(e) = rejection.find::<ApiError>() {
        e.clone()
    } else if rejection.find::<reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this path does not take that method",
        )
    } else if rejection.find::<reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than limits.max_body_bytes",
        )
    } else if rejection.find::<reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send the body with a Content-Length header",
        )
    } else if let Some(e) = rejection.find::<reject::InvalidQuery>() {
        ApiError::invalid_field("query", &e.to_string())
    } else if let Some(e) = rejection.find::<reject::InvalidHeader>() {
        ApiError::invalid_field(e.name(), "is not a valid value")
    } else if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path")
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request could not be handled",
        )
    };
    let too_large = err.status == StatusCode::PAYLOAD_TOO_LARGE;
    let mut resp = err.into_response();
    if too_large {
        // The body was refused unread: the connection cannot carry another request, and a
        // client must not reuse it.
        resp.headers_mut().insert(
            warp::http::header::CONNECTION,
            warp::http::HeaderValue::from_static("close"),
        );
    }
    Ok(resp)
}
