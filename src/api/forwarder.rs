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

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Semaphore};
use warp::http::StatusCode;

use super::messages::{Attempt, Validated, Written};
use super::{ApiError, FORWARDED_HEADER};
use crate::network::HttpClient;
use crate::types::Record;

/// The path of the leader's route.
pub(crate) const FORWARD_PATH: &str = "/api/v1/internal/forward";
/// The most messages in one request (the leader proposes up to 256 per Raft entry).
const MAX_MESSAGES: usize = 256;
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

/// A forwarded request's body as the leader reads it: each message kept raw, to be checked
/// exactly like a body of its own. (The follower writes the same shape element by element.)
#[derive(Deserialize)]
pub(crate) struct IncomingForward {
    pub(crate) messages: Vec<ForwardedMessage<Box<RawValue>>>,
}

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
            },
            Err(e) => ForwardResult {
                status: e.status.as_u16(),
                record: None,
                log_index: None,
                error: Some(ForwardError {
                    code: e.code.to_string(),
                    message: e.message,
                }),
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
                Attempt::Fail(ApiError::new(status, known_code(&code), message))
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

struct Pending {
    /// The message as one element of [`IncomingForward::messages`], serialised by the caller.
    json: Vec<u8>,
    addr: String,
    reply: oneshot::Sender<Attempt>,
}

/// A handle to the forwarding task; cloning shares it.
#[derive(Clone)]
pub(crate) struct Forwarder {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Forwarder {
    /// Starts the forwarding task; it ends when the last handle is dropped. `timeout` bounds
    /// one request to the leader.
    pub(crate) fn start(client: HttpClient, timeout: Duration) -> Forwarder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, timeout, rx));
        Forwarder { tx }
    }

    /// Sends `msg` to the leader at `addr` with whatever else is waiting, and returns its
    /// outcome. The caller bounds the wait.
    pub(crate) async fn forward(&self, msg: &Validated, addr: &str) -> Attempt {
        let element = ForwardedMessage {
            message: msg,
            server_msg_id: !msg.client_msg_id,
        };
        let json = match serde_json::to_vec(&element) {
            Ok(j) => j,
            Err(e) => return Attempt::Fail(ApiError::internal(e.to_string())),
        };
        let (reply, outcome) = oneshot::channel();
        let pending = Pending {
            json,
            addr: addr.to_string(),
            reply,
        };
        if self.tx.send(pending).is_err() {
            return Attempt::Fail(ApiError::unavailable("the node is shutting down"));
        }
        outcome
            .await
            .unwrap_or_else(|_| Attempt::Fail(ApiError::unavailable("the node is shutting down")))
    }
}

async fn run(client: HttpClient, timeout: Duration, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    // A message for another leader address than the batch being filled waits for the next.
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.json.len();
        let mut batch = vec![first];
        while batch.len() < MAX_MESSAGES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) if p.addr == batch[0].addr => {
                    bytes += p.json.len();
                    batch.push(p);
                }
                Ok(p) => {
                    carried = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            send(&client, timeout, batch).await;
            drop(slot);
        });
    }
}

async fn send(client: &HttpClient, timeout: Duration, batch: Vec<Pending>) {
    let addr = batch[0].addr.clone();
    let mut body = Vec::with_capacity(batch.iter().map(|p| p.json.len() + 1).sum::<usize>() + 16);
    body.extend_from_slice(b"{\"messages\":[");
    let mut replies = Vec::with_capacity(batch.len());
    for (i, p) in batch.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&p.json);
        replies.push(p.reply);
    }
    body.extend_from_slice(b"]}");
    let outcomes = match request(client, &addr, timeout, Bytes::from(body)).await {
        Ok(results) if results.len() == replies.len() => results
            .into_iter()
            .map(ForwardResult::into_attempt)
            .collect(),
        Ok(results) => {
            let why = format!(
                "the leader answered {} results for {} forwarded writes",
                results.len(),
                replies.len()
            );
            tracing::error!("{why}");
            (0..replies.len())
                .map(|_| Attempt::Fail(ApiError::internal(why.clone())))
                .collect()
        }
        Err(outcome) => {
            let n = replies.len();
            std::iter::repeat_with(|| outcome.clone_for_batch())
                .take(n)
                .collect::<Vec<_>>()
        }
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // A caller that gave up is gone; its message may be stored all the same.
        let _ = reply.send(outcome);
    }
}

/// Why a whole forwarded request failed, for each of its messages.
enum BatchFailure {
    Retry,
    Fail(ApiError),
}

impl BatchFailure {
    fn clone_for_batch(&self) -> Attempt {
        match self {
            BatchFailure::Retry => Attempt::Retry,
            BatchFailure::Fail(e) => Attempt::Fail(e.clone()),
        }
    }
}

async fn request(
    client: &HttpClient,
    addr: &str,
    timeout: Duration,
    body: Bytes,
) -> Result<Vec<ForwardResult>, BatchFailure> {
    let resp = client
        .request(
            hyper::Method::POST,
            addr,
            FORWARD_PATH,
            &[
                ("content-type", "application/json"),
                (FORWARDED_HEADER, "1"),
            ],
            body,
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
        StatusCode::SERVICE_UNAVAILABLE => Err(BatchFailure::Retry),
        status => Err(BatchFailure::Fail(ApiError::internal(format!(
            "the leader answered forwarded writes with {status}: {}",
            String::from_utf8_lossy(&resp.body)
        )))),
    }
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
        };
        assert!(matches!(unknown.into_attempt(), Attempt::Fail(e) if e.code == "internal"));
    }
}
