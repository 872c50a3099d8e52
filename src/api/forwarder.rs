//! A follower's writes go to the leader together: group forwarding.
//!
//! Every write a follower takes must be proposed by the leader. Sent one HTTP request per
//! message, the leader parses and answers as many requests for the followers as for its own
//! clients. Instead, writes that arrive at a follower while earlier ones are on their way are
//! sent as one `POST /api/v1/internal/forward` request, which the leader takes apart and
//! proposes message by message (where its own group commit puts them in one Raft entry again)
//! and answers with one result per message. A lone write still goes at once.
//!
//! Each message keeps its own outcome: created, already stored, a conflict, or an error, and
//! each caller its own deadline. A request that fails as a whole (the leader changed, the
//! connection broke) makes each of its messages retry through the caller's usual loop, with
//! the same `msg_id`, so a message the leader did store is found again, not stored twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use warp::http::StatusCode;

use super::messages::{Attempt, Validated, Written, LOG_INDEX_HEADER};
use super::{ApiError, FORWARDED_HEADER};
use crate::network::HttpClient;
use crate::types::Record;

/// The path of the leader's route.
pub(crate) const FORWARD_PATH: &str = "/api/v1/internal/forward";
/// The most messages in one request (the leader proposes up to 256 per Raft entry, and
/// refuses a request with more).
pub(crate) const MAX_MESSAGES: usize = 256;
/// About the most bytes in one request body (one larger message still goes alone).
const MAX_BYTES: usize = 1 << 20;

/// The largest forwarded request body the leader takes, for a node whose own requests may
/// be up to `max_body_bytes`: a request stops growing at [`MAX_BYTES`], and a message is no
/// larger serialised than the body it came in.
pub(crate) fn body_limit(max_body_bytes: u64) -> u64 {
    MAX_BYTES as u64 + max_body_bytes + (64 << 10)
}
/// Requests on their way at once: while they are answered, the next one fills.
const IN_FLIGHT: usize = 4;

/// One message in a forwarded request.
#[derive(Serialize, Deserialize)]
pub(crate) struct ForwardedMessage<M> {
    /// The message in the shape of a `POST /api/v1/message` body, with its `msg_id`.
    pub(crate) message: M,
    /// True when the follower made the `msg_id` (the client sent none): such an id cannot be
    /// stored yet, so the leader need not look it up before proposing.
    pub(crate) server_msg_id: bool,
}

/// A forwarded request's body. The follower writes each message as the raw JSON it made
/// once; the leader reads each one raw too, to check it exactly like a body of its own.
#[derive(Serialize, Deserialize)]
pub(crate) struct ForwardRequest<M> {
    pub(crate) messages: Vec<ForwardedMessage<M>>,
}

/// A forwarded request as the leader reads it.
pub(crate) type IncomingForward = ForwardRequest<Box<RawValue>>;

/// The leader's answer: one result per message, in the request's order.
#[derive(Serialize, Deserialize)]
pub(crate) struct ForwardResponse {
    pub(crate) results: Vec<ForwardResult>,
}

/// The outcome of one forwarded message: the HTTP status its own request would have had,
/// with the record and the log index that made it visible, or the error.
#[derive(Serialize, Deserialize)]
pub(crate) struct ForwardResult {
    pub(crate) status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) record: Option<Record>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) log_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ForwardError>,
    /// Seconds for `Retry-After`, when the answer had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry_after: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ForwardError {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl ForwardResult {
    pub(crate) fn from_outcome(outcome: Result<Written, ApiError>) -> ForwardResult {
        match outcome {
            Ok(w) => ForwardResult {
                status: if w.created { 201 } else { 200 },
                record: Some(w.record),
                log_index: Some(w.log_index),
                error: None,
                retry_after: None,
            },
            Err(e) => ForwardResult {
                status: e.status.as_u16(),
                record: None,
                log_index: None,
                error: Some(ForwardError {
                    code: e.code.to_string(),
                    message: e.message,
                }),
                retry_after: e.retry_after,
            },
        }
    }

    /// What the follower makes of it.
    fn into_attempt(self) -> Attempt {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        match (status, self.record, self.log_index) {
            (StatusCode::CREATED | StatusCode::OK, Some(record), Some(log_index)) => {
                Attempt::Done(Written {
                    created: status == StatusCode::CREATED,
                    record,
                    log_index,
                })
            }
            (StatusCode::CREATED | StatusCode::OK, _, _) => Attempt::Fail(ApiError::internal(
                "the leader answered a forwarded write without its record and log index",
            )),
            // Not (or no longer) the leader, or no commit yet: the caller tries again.
            (StatusCode::SERVICE_UNAVAILABLE, _, _) => Attempt::Retry,
            (status, _, _) => {
                let (code, message) = self.error.map_or_else(
                    || (String::new(), format!("the leader answered {status}")),
                    |e| (e.code, e.message),
                );
                Attempt::Fail(ApiError {
                    retry_after: self.retry_after,
                    ..ApiError::new(status, known_code(&code), message)
                })
            }
        }
    }
}

/// The leader's error codes a forwarded write can get, as the follower passes them on.
fn known_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "msg_id_conflict",
        "invalid_field",
        "invalid_json",
        "payload_too_large",
        "unsupported_media_type",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "request_timeout",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("internal")
}

/// The most forwarded writes waiting for a request to the leader, over all leaders; more get
/// `503` at once instead of a queue that grows while the leader is slow or gone.
const MAX_QUEUED: usize = 16 * 1024;

struct Pending {
    /// The message as a `POST /api/v1/message` body, with its `msg_id`.
    message: Box<RawValue>,
    server_msg_id: bool,
    /// When the caller stops waiting: the request is bounded by the latest of its messages'.
    deadline: Instant,
    reply: oneshot::Sender<Attempt>,
}

/// A handle to the forwarding lanes; cloning shares them.
#[derive(Clone)]
pub(crate) struct Forwarder {
    shared: Arc<Shared>,
}

struct Shared {
    client: HttpClient,
    /// One lane (a queue and its task) per leader address, so that requests hanging on a
    /// leader that is gone never hold back the writes for the next one.
    lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Pending>>>,
    /// Writes queued in any lane and not yet taken into a request.
    queued: AtomicUsize,
}

impl Forwarder {
    pub(crate) fn new(client: HttpClient) -> Forwarder {
        Forwarder {
            shared: Arc::new(Shared {
                client,
                lanes: Mutex::new(HashMap::new()),
                queued: AtomicUsize::new(0),
            }),
        }
    }

    /// Sends `msg` to the leader at `addr` with whatever else is waiting for it, and returns
    /// its outcome, or gives up at `deadline` (the message is then not sent if it has not been
    /// yet; if it has, it may be stored all the same, as a write whose answer was lost).
    pub(crate) async fn forward(&self, msg: &Validated, addr: &str, deadline: Instant) -> Attempt {
        let message = match serde_json::value::to_raw_value(msg) {
            Ok(j) => j,
            Err(e) => return Attempt::Fail(ApiError::internal(e.to_string())),
        };
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Attempt::Fail(ApiError::unavailable(
                "too many writes are waiting for the leader; retry with the same msg_id",
            ));
        }
        let (reply, outcome) = oneshot::channel();
        let pending = Pending {
            message,
            server_msg_id: !msg.client_msg_id,
            deadline,
            reply,
        };
        if let Err(mpsc::error::SendError(p)) = self.lane(addr).send(pending) {
            // The lane's task is gone (only at shutdown).
            drop(p);
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Attempt::Fail(ApiError::unavailable("the node is shutting down"));
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(attempt)) => attempt,
            Ok(Err(_)) => Attempt::Fail(ApiError::unavailable("the node is shutting down")),
            // Dropping `outcome` closes the reply: a lane skips a message nobody waits for.
            Err(_) => Attempt::Fail(ApiError::unavailable(
                "the leader did not answer the write in time (api.write_timeout_ms); retry with the same msg_id",
            )),
        }
    }

    fn lane(&self, addr: &str) -> mpsc::UnboundedSender<Pending> {
        let mut lanes = match self.shared.lanes.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(tx) = lanes.get(addr).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // The task holds only a weak handle, so that it ends with the last Forwarder.
        tokio::spawn(lane(Arc::downgrade(&self.shared), addr.to_string(), rx));
        lanes.insert(addr.to_string(), tx.clone());
        tx
    }
}

/// One leader address's lane: takes what waits (up to [`MAX_MESSAGES`] / [`MAX_BYTES`]) into
/// one request while up to [`IN_FLIGHT`] are on their way.
async fn lane(shared: Weak<Shared>, addr: String, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut taken = 1;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(p) = next.take() {
            // A caller that gave up is not sent: it was answered 503 and may retry.
            if !p.reply.is_closed() {
                bytes += p.message.get().len() + 32;
                batch.push(p);
            }
            if batch.len() >= MAX_MESSAGES || bytes >= MAX_BYTES {
                break;
            }
            if let Ok(p) = rx.try_recv() {
                taken += 1;
                next = Some(p);
            }
        }
        shared.queued.fetch_sub(taken, Ordering::AcqRel);
        if batch.is_empty() {
            continue;
        }
        let addr = addr.clone();
        tokio::spawn(async move {
            send(&shared.client, &addr, batch).await;
            drop(slot);
        });
    }
}

async fn send(client: &HttpClient, addr: &str, batch: Vec<Pending>) {
    let deadline = batch
        .iter()
        .map(|p| p.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let timeout = deadline.saturating_duration_since(Instant::now());
    let body = ForwardRequest {
        messages: batch
            .iter()
            .map(|p| ForwardedMessage {
                message: &*p.message,
                server_msg_id: p.server_msg_id,
            })
            .collect(),
    };
    let outcomes = match request(client, addr, timeout, &body).await {
        Ok(results) if results.len() == batch.len() => results
            .into_iter()
            .map(ForwardResult::into_attempt)
            .collect(),
        Ok(results) => {
            let why = format!(
                "the leader answered {} results for {} forwarded writes",
                results.len(),
                batch.len()
            );
            tracing::error!("{why}");
            (0..batch.len())
                .map(|_| Attempt::Fail(ApiError::internal(why.clone())))
                .collect()
        }
        Err(BatchFailure::NoRoute) => {
            // A leader from before this route: each message as a request of its own.
            let each = batch.iter().map(|p| single(client, addr, p, timeout));
            futures_util::future::join_all(each).await
        }
        Err(failure) => (0..batch.len()).map(|_| failure.attempt()).collect(),
    };
    for (p, outcome) in batch.into_iter().zip(outcomes) {
        // A caller that gave up is gone; its message may be stored all the same.
        let _ = p.reply.send(outcome);
    }
}

/// Why a whole forwarded request failed, for each of its messages.
enum BatchFailure {
    Retry,
    /// The leader does not know the route (it runs an older version).
    NoRoute,
    Fail(ApiError),
}

impl BatchFailure {
    fn attempt(&self) -> Attempt {
        match self {
            BatchFailure::Retry | BatchFailure::NoRoute => Attempt::Retry,
            BatchFailure::Fail(e) => Attempt::Fail(e.clone()),
        }
    }
}

async fn request(
    client: &HttpClient,
    addr: &str,
    timeout: Duration,
    body: &ForwardRequest<&RawValue>,
) -> Result<Vec<ForwardResult>, BatchFailure> {
    let body = serde_json::to_vec(body)
        .map_err(|e| BatchFailure::Fail(ApiError::internal(e.to_string())))?;
    let resp = client
        .request(
            hyper::Method::POST,
            addr,
            FORWARD_PATH,
            &[
                ("content-type", "application/json"),
                (FORWARDED_HEADER, "1"),
            ],
            Bytes::from(body),
            timeout,
        )
        .await
        .map_err(|e| {
            tracing::debug!(%addr, error = %e, "forwarding writes failed; they will be retried");
            BatchFailure::Retry
        })?;
    match resp.status {
        StatusCode::OK => serde_json::from_slice::<ForwardResponse>(&resp.body)
            .map(|r| r.results)
            .map_err(|e| {
                BatchFailure::Fail(ApiError::internal(format!(
                    "the leader's answer to forwarded writes did not decode: {e}"
                )))
            }),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Err(BatchFailure::NoRoute),
        StatusCode::SERVICE_UNAVAILABLE => Err(BatchFailure::Retry),
        status => Err(BatchFailure::Fail(ApiError::internal(format!(
            "the leader answered forwarded writes with {status}: {}",
            String::from_utf8_lossy(&resp.body)
        )))),
    }
}

/// One message forwarded alone, as `POST /api/v1/message`.
async fn single(client: &HttpClient, addr: &str, p: &Pending, timeout: Duration) -> Attempt {
    let resp = client
        .request(
            hyper::Method::POST,
            addr,
            "/api/v1/message",
            &[
                ("content-type", "application/json"),
                (FORWARDED_HEADER, "1"),
            ],
            Bytes::copy_from_slice(p.message.get().as_bytes()),
            timeout,
        )
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "forwarding a write failed; will retry");
            return Attempt::Retry;
        }
    };
    let ok = resp.status == StatusCode::CREATED || resp.status == StatusCode::OK;
    let error = (!ok)
        .then(|| serde_json::from_slice::<ErrorBody>(&resp.body).ok())
        .flatten()
        .map(|b| b.error);
    ForwardResult {
        status: resp.status.as_u16(),
        record: ok
            .then(|| serde_json::from_slice::<Record>(&resp.body).ok())
            .flatten(),
        log_index: resp
            .headers
            .get(LOG_INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        retry_after: resp
            .headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        error,
    }
    .into_attempt()
}

/// The API's error shape.
#[derive(Deserialize)]
struct ErrorBody {
    error: ForwardError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_what_the_caller_does_next() {
        let retry = ForwardResult {
            status: 503,
            record: None,
            log_index: None,
            error: Some(ForwardError {
                code: "not_leader".into(),
                message: "node 2 is not the leader".into(),
            }),
            retry_after: Some(1),
        };
        assert!(matches!(retry.into_attempt(), Attempt::Retry));
        let conflict = ForwardResult {
            status: 409,
            record: None,
            log_index: None,
            error: Some(ForwardError {
                code: "msg_id_conflict".into(),
                message: "msg_id x is already stored with other content".into(),
            }),
            retry_after: None,
        };
        match conflict.into_attempt() {
            Attempt::Fail(e) => {
                assert_eq!(e.status, StatusCode::CONFLICT);
                assert_eq!(e.code, "msg_id_conflict");
                assert!(e.message.contains("other content"));
            }
            _ => panic!("a conflict is not retried"),
        }
        let odd = ForwardResult {
            status: 201,
            record: None,
            log_index: Some(3),
            error: None,
            retry_after: None,
        };
        assert!(matches!(odd.into_attempt(), Attempt::Fail(e) if e.status == 500));
        let unknown = ForwardResult {
            status: 418,
            record: None,
            log_index: None,
            error: Some(ForwardError {
                code: "teapot".into(),
                message: "no".into(),
            }),
            retry_after: None,
        };
        assert!(matches!(unknown.into_attempt(), Attempt::Fail(e) if e.code == "internal"));
        let limited = ForwardResult {
            status: 429,
            record: None,
            log_index: None,
            error: Some(ForwardError {
                code: "rate_limited".into(),
                message: "too many writes from this address".into(),
            }),
            retry_after: Some(3),
        };
        assert!(matches!(
            limited.into_attempt(),
            Attempt::Fail(e) if e.code == "rate_limited" && e.retry_after == Some(3)
        ));
    }
}
