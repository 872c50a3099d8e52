//! `POST /api/v1/message`, `GET /api/v1/messages`, `GET /api/v1/conversations`, and the
//! leader's read index for linearizable reads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Reply};

use super::batcher::Proposed;
use super::error::reply_json;
use super::forwarder::{self, ForwardResponse, ForwardResult, IncomingForward};
use super::{limited_body, with_state, ApiError, AppState, Leader, FORWARDED_HEADER};
use crate::config::Limits;
use crate::types::{NewMessage, Record, Response, VectorClock};

pub const DEFAULT_CONV: &str = "general";

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let max_body = state.limits.max_body_bytes;
    let post = warp::path!("api" / "v1" / "message")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(warp::header::headers_cloned())
        .and(crate::serve::client_addr())
        .and(limited_body(max_body))
        .then(post_message);
    let history = warp::path!("api" / "v1" / "messages")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .then(
            |state: Arc<AppState>, query: String, headers: HeaderMap| async move {
                reply_json(history(&state, &query, &headers).await)
            },
        );
    let conversations = warp::path!("api" / "v1" / "conversations")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::header::headers_cloned())
        .then(|state: Arc<AppState>, headers: HeaderMap| async move {
            reply_json(conversations(&state, &headers).await)
        });
    let forwarded = warp::path!("api" / "v1" / "internal" / "forward")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(warp::header::headers_cloned())
        .and(crate::serve::client_addr())
        .and(limited_body(forwarder::body_limit(max_body)))
        .then(post_forwarded);
    let read_index = warp::path!("api" / "v1" / "internal" / "read-index")
        .and(warp::get())
        .and(with_state(state))
        .then(|state: Arc<AppState>| async move {
            reply_json(
                leader_read_index(&state)
                    .await
                    .map(|index| (StatusCode::OK, serde_json::json!({ "index": index }))),
            )
        });
    post.or(forwarded)
        .unify()
        .or(history)
        .unify()
        .or(conversations)
        .unify()
        .or(read_index)
        .unify()
}

/// The request body as clients send it. Fields are taken loosely typed so that a wrong type is
/// reported with the field's name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    conv_id: Option<Value>,
    sender: Option<Value>,
    payload: Option<Value>,
    msg_id: Option<Value>,
    /// Kept raw so the client's key order survives into the record.
    vector_clock: Option<Box<RawValue>>,
}

/// A validated message before the leader stamps it; also the body a follower forwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Validated {
    pub(crate) msg_id: Uuid,
    pub(crate) conv_id: String,
    pub(crate) sender: String,
    pub(crate) payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) vector_clock: Option<VectorClock>,
    /// Whether the client chose the msg_id; a fresh server-made one cannot be stored yet.
    #[serde(skip)]
    pub(crate) client_msg_id: bool,
}

/// Checks a conversation name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_conv_id(conv: &str) -> Result<(), ApiError> {
    let ok = !conv.is_empty()
        && conv.len() <= 64
        && conv
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "conv_id",
            "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// Decodes and checks a `POST /api/v1/message` body (also the body a follower forwards).
pub(crate) fn validate(
    headers: &HeaderMap,
    body: &[u8],
    limits: &Limits,
) -> Result<Validated, ApiError> {
    validate_content_type(headers)?;
    validate_json(body, limits)
}

/// 415 unless the body is declared as JSON.
fn validate_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(warp::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the message as Content-Type: application/json",
        ))
    }
}

/// Decodes and checks a message body whose content type is already known to be JSON.
pub(crate) fn validate_json(body: &[u8], limits: &Limits) -> Result<Validated, ApiError> {
    let parsed: PostBody = serde_json::from_slice(body).map_err(ApiError::from_json)?;

    let conv_id = match parsed.conv_id {
        None | Some(Value::Null) => DEFAULT_CONV.to_string(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::invalid_field("conv_id", "must be a string")),
    };
    check_conv_id(&conv_id)?;

    let sender = match parsed.sender {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(ApiError::invalid_field("sender", "is required")),
        Some(_) => return Err(ApiError::invalid_field("sender", "must be a string")),
    };
    if sender.is_empty() || sender.len() > limits.max_sender_bytes {
        return Err(ApiError::invalid_field(
            "sender",
            &format!("must be 1 to {} bytes long", limits.max_sender_bytes),
        ));
    }

    let payload = match parsed.payload {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(ApiError::invalid_field("payload", "is required")),
        Some(_) => return Err(ApiError::invalid_field("payload", "must be a string")),
    };
    if payload.len() > limits.max_payload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "`payload` is {} bytes; the limit is {} (limits.max_payload_bytes)",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }

    let (msg_id, client_msg_id) = match parsed.msg_id {
        // Time-ordered (v7): consecutive ids land next to each other in the msg_id index,
        // where random ones would dirty a different index page for every message.
        None | Some(Value::Null) => (Uuid::now_v7(), false),
        Some(Value::String(s)) => {
            let id = Uuid::parse_str(&s)
                .map_err(|_| ApiError::invalid_field("msg_id", "must be a UUID"))?;
            (id, true)
        }
        Some(_) => return Err(ApiError::invalid_field("msg_id", "must be a UUID string")),
    };

    let vector_clock = match parsed.vector_clock {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => {
            let vc: VectorClock = serde_json::from_str(raw.get()).map_err(|e| {
                ApiError::invalid_field(
                    "vector_clock",
                    &format!("must be an object of names to non-negative integers: {e}"),
                )
            })?;
            if vc.0.len() > limits.max_vector_clock_entries {
                return Err(ApiError::invalid_field(
                    "vector_clock",
                    &format!(
                        "has {} entries; the limit is {}",
                        vc.0.len(),
                        limits.max_vector_clock_entries
                    ),
                ));
            }
            if vc
                .0
                .iter()
                .any(|(k, _)| k.is_empty() || k.len() > limits.max_sender_bytes)
            {
                return Err(ApiError::invalid_field(
                    "vector_clock",
                    &format!("keys must be 1 to {} bytes long", limits.max_sender_bytes),
                ));
            }
            Some(vc)
        }
    };
    Ok(Validated {
        msg_id,
        conv_id,
        sender,
        payload,
        vector_clock,
        client_msg_id,
    })
}

async fn post_message(
    state: Arc<AppState>,
    headers: HeaderMap,
    remote: Option<std::net::SocketAddr>,
    body: Bytes,
) -> warp::reply::Response {
    let forwarded = headers.contains_key(FORWARDED_HEADER);
    if let Err(e) = check_write_rate(&state, &headers, remote) {
        return reply_json::<()>(Err(e));
    }
    let result = match validate(&headers, &body, &state.limits).and_then(|msg| {
        state
            .security
            .access(&headers, None)?
            .check_write(&msg.conv_id, &msg.sender)
            .map(|()| msg)
    }) {
        Ok(msg) => {
            let started = Instant::now();
            let result = write(&state, msg, forwarded).await;
            crate::metrics::WRITE_LATENCY.observe(started.elapsed());
            result
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(w) => {
            let status = if w.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut resp =
                warp::reply::with_status(warp::reply::json(&w.record), status).into_response();
            resp.headers_mut()
                .insert(LOG_INDEX_HEADER, warp::http::HeaderValue::from(w.log_index));
            resp
        }
        Err(e) => reply_json::<()>(Err(e)),
    }
}

/// Counts one write against its client address's rate (`limits.write_rate_per_sec`). Peers
/// holding the cluster secret are not limited: the node the client reached counted the write.
fn check_write_rate(
    state: &AppState,
    headers: &HeaderMap,
    remote: Option<std::net::SocketAddr>,
) -> Result<(), ApiError> {
    let Some(addr) = remote.filter(|_| !state.security.is_secret_holder(headers)) else {
        return Ok(());
    };
    state.write_rate.check(addr.ip()).map_err(|secs| ApiError {
        retry_after: Some(secs),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many writes from this address (limits.write_rate_per_sec)",
        )
    })
}

/// `POST /api/v1/internal/forward`: the writes a follower took, together (see
/// [`forwarder`]). Each message is checked and written exactly as its own
/// `POST /api/v1/message` would be, all at once, and answered in the request's order.
async fn post_forwarded(
    state: Arc<AppState>,
    headers: HeaderMap,
    remote: Option<std::net::SocketAddr>,
    body: Bytes,
) -> warp::reply::Response {
    let request = validate_content_type(&headers)
        .and_then(|()| {
            serde_json::from_slice::<IncomingForward>(&body).map_err(ApiError::from_json)
        })
        .and_then(|req| Ok((req, state.security.access(&headers, None)?)));
    let (request, access) = match request {
        Ok(r) => r,
        Err(e) => return reply_json::<()>(Err(e)),
    };
    let writes = request.messages.into_iter().map(|m| {
        let state = &state;
        let access = &access;
        let headers = &headers;
        async move {
            // Message by message, as if each had come alone.
            check_write_rate(state, headers, remote)?;
            let mut msg = validate_json(m.message.get().as_bytes(), &state.limits)?;
            access.check_write(&msg.conv_id, &msg.sender)?;
            msg.client_msg_id = !m.server_msg_id;
            let started = Instant::now();
            let result = write(state, msg, true).await;
            crate::metrics::WRITE_LATENCY.observe(started.elapsed());
            result
        }
    });
    let results = futures_util::future::join_all(writes)
        .await
        .into_iter()
        .map(ForwardResult::from_outcome)
        .collect();
    reply_json(Ok((StatusCode::OK, ForwardResponse { results })))
}

/// A write's answer carries the Raft log index that made its record visible, so that a
/// follower that forwarded it can wait until it has applied that far itself.
pub(crate) const LOG_INDEX_HEADER: &str = "x-chatraftd-log-index";

/// A stored (or found) record.
pub(crate) struct Written {
    /// Whether this request stored it (201) or found it stored before (200).
    pub(crate) created: bool,
    pub(crate) record: Record,
    /// A Raft log index at or after the entry holding the record.
    pub(crate) log_index: u64,
}

/// Stores `msg` through the leader and returns the record once it is applied on this node.
async fn write(state: &AppState, msg: Validated, forwarded: bool) -> Result<Written, ApiError> {
    let deadline = Instant::now() + state.write_timeout;

    // A retry of something already applied here needs no round through the log. (The log
    // de-duplicates too; this only saves the trip. A server-made id cannot be stored yet.)
    if msg.client_msg_id {
        let existing = state
            .reader
            .by_msg_id(msg.msg_id)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if let Some(existing) = existing {
            // Applied here: whatever this node has applied covers it.
            let log_index = *state.reader.applied().borrow();
            return settle_existing(&msg, existing).map(|(created, record)| Written {
                created,
                record,
                log_index,
            });
        }
    }

    let mut metrics = state.raft.metrics();
    loop {
        let leader = Leader::from_metrics(&metrics.borrow_and_update(), state.node_id);
        let outcome = match leader {
            Leader::Me => propose(state, &msg, deadline).await,
            Leader::Other(_, Some(addr)) if !forwarded => {
                state.forwarder.forward(&msg, &addr, deadline).await
            }
            Leader::Other(leader, Some(_)) => {
                return Err(ApiError {
                    code: "not_leader",
                    ..ApiError::unavailable(format!(
                        "node {} is not the leader; node {leader} is",
                        state.node_id
                    ))
                })
            }
            // A leader without a known address: look again once the metrics move.
            Leader::Other(_, None) | Leader::Unknown => Attempt::Retry,
        };
        match outcome {
            Attempt::Done(w) => {
                wait_applied(state, w.log_index, deadline).await?;
                return Ok(w);
            }
            Attempt::Fail(e) => return Err(e),
            Attempt::Retry => {}
        }
        // No usable leader yet: wait for the metrics to change, or a short back-off after a
        // failed forward, within the deadline.
        let now = Instant::now();
        if now >= deadline {
            return Err(ApiError::unavailable(format!(
                "no leader could take the write within {} ms (api.write_timeout_ms)",
                state.write_timeout.as_millis()
            )));
        }
        let pause = (deadline - now).min(Duration::from_millis(100));
        let _ = tokio::time::timeout(pause, metrics.changed()).await;
        if *state.shutdown.borrow() {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
    }
}

pub(crate) enum Attempt {
    Done(Written),
    Fail(ApiError),
    Retry,
}

fn settle_existing(msg: &Validated, existing: Record) -> Result<(bool, Record), ApiError> {
    let probe = NewMessage {
        msg_id: msg.msg_id,
        conv_id: msg.conv_id.clone(),
        sender: msg.sender.clone(),
        payload: msg.payload.clone(),
        vector_clock: msg.vector_clock.clone(),
        committed_at_ms: 0,
    };
    if probe.same_content(&existing) {
        Ok((false, existing))
    } else {
        Err(conflict(&existing))
    }
}

fn conflict(existing: &Record) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "msg_id_conflict",
        format!(
            "msg_id {} is already stored with other content (conv_id {}, seq {}, index {})",
            existing.msg_id, existing.conv_id, existing.seq, existing.index
        ),
    )
}

async fn propose(state: &AppState, msg: &Validated, deadline: Instant) -> Attempt {
    let msg = NewMessage {
        msg_id: msg.msg_id,
        conv_id: msg.conv_id.clone(),
        sender: msg.sender.clone(),
        payload: msg.payload.clone(),
        vector_clock: msg.vector_clock.clone(),
        // Set by the batcher when the entry is proposed.
        committed_at_ms: 0,
    };
    match tokio::time::timeout_at(deadline, state.batcher.propose(msg)).await {
        Err(_) => Attempt::Fail(ApiError::unavailable(format!(
            "the write was not committed within {} ms (api.write_timeout_ms); retry with the same msg_id",
            state.write_timeout.as_millis()
        ))),
        Ok(Proposed::Applied(Response::Stored(record), log_index)) => Attempt::Done(Written {
            created: true,
            record,
            log_index,
        }),
        Ok(Proposed::Applied(Response::Duplicate(record), log_index)) => Attempt::Done(Written {
            created: false,
            record,
            log_index,
        }),
        Ok(Proposed::Applied(Response::Conflict(r), _)) => Attempt::Fail(conflict(&r)),
        Ok(Proposed::Applied(other, _)) => Attempt::Fail(ApiError::internal(format!(
            "the log entry produced no record: {other:?}"
        ))),
        Ok(Proposed::NotLeader) => Attempt::Retry,
        Ok(Proposed::Failed(e)) => Attempt::Fail(ApiError::unavailable(format!("the write failed: {e}"))),
    }
}

/// Waits until this node has applied the Raft log up to `index`, so a read here right after
/// sees the write.
async fn wait_applied(state: &AppState, index: u64, deadline: Instant) -> Result<(), ApiError> {
    let mut applied = state.reader.applied();
    let reached = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index)).await;
    match reached {
        Ok(Ok(_)) => Ok(()),
        _ => Err(ApiError::unavailable(format!(
            "log index {index} is committed but not yet applied on this node; retry with the same msg_id"
        ))),
    }
}

#[derive(Debug, PartialEq)]
struct HistoryQuery {
    conv_id: String,
    from: u64,
    limit: usize,
    linearizable: bool,
}

fn parse_history_query(raw: &str, max_page: usize) -> Result<HistoryQuery, ApiError> {
    let mut q = HistoryQuery {
        conv_id: DEFAULT_CONV.into(),
        from: 1,
        limit: 100.min(max_page),
        linearizable: false,
    };
    for (key, value) in form_pairs(raw)? {
        match key.as_str() {
            "conv_id" => q.conv_id = value,
            "from" => {
                q.from =
                    value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        ApiError::invalid_field("from", "must be a number from 1 up")
                    })?
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=max_page).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_field(
                            "limit",
                            &format!("must be a number from 1 to {max_page}"),
                        )
                    })?
            }
            "consistency" => {
                q.linearizable = match value.as_str() {
                    "linearizable" => true,
                    "local" => false,
                    _ => {
                        return Err(ApiError::invalid_field(
                            "consistency",
                            "must be `local` or `linearizable`",
                        ))
                    }
                }
            }
            other => {
                return Err(ApiError::invalid_field(
                    other,
                    "is not a parameter of this path",
                ))
            }
        }
    }
    check_conv_id(&q.conv_id)?;
    Ok(q)
}

/// Splits a query string into decoded pairs.
pub fn form_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded_pairs(raw).map_err(|e| ApiError::invalid_field("query", &e))
}

fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("has a bad %-escape")?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8".to_string())
}

#[derive(Serialize)]
struct Page {
    conv_id: String,
    messages: Vec<Record>,
    /// The `from` to ask for the next page.
    next_from: u64,
    /// The conversation's last seq when the page was read.
    last_seq: u64,
}

/// Every conversation, or those a token may read.
async fn conversations(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(StatusCode, Value), ApiError> {
    let access = state.security.access(headers, None)?;
    let all = state
        .reader
        .conversations()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let visible: Vec<_> = all
        .into_iter()
        .filter(|c| access.sees(&c.conv_id))
        .collect();
    Ok((
        StatusCode::OK,
        serde_json::json!({ "conversations": visible }),
    ))
}

async fn history(
    state: &AppState,
    raw_query: &str,
    headers: &HeaderMap,
) -> Result<(StatusCode, Page), ApiError> {
    let q = parse_history_query(raw_query, state.limits.max_page)?;
    state
        .security
        .access(headers, None)?
        .check_read(&q.conv_id)?;
    if q.linearizable {
        linearizable_barrier(state).await?;
    }
    let internal = |e: crate::store::StoreError| ApiError::internal(e.to_string());
    let last_seq = state.reader.last_seq(&q.conv_id).await.map_err(internal)?;
    let messages = state
        .reader
        .page(&q.conv_id, q.from, q.limit)
        .await
        .map_err(internal)?;
    let next_from = messages.last().map_or(q.from, |r| r.seq + 1);
    Ok((
        StatusCode::OK,
        Page {
            conv_id: q.conv_id,
            messages,
            next_from,
            last_seq: last_seq.max(next_from - 1),
        },
    ))
}

/// Waits until this node has applied everything that was committed when the read began.
async fn linearizable_barrier(state: &AppState) -> Result<(), ApiError> {
    let deadline = Instant::now() + state.write_timeout;
    let index = loop {
        let attempt = match state.leader() {
            Leader::Me => leader_read_index(state).await.map(Some),
            Leader::Other(_, Some(addr)) => remote_read_index(state, &addr, deadline).await,
            Leader::Other(_, None) | Leader::Unknown => Ok(None),
        };
        match attempt {
            Ok(Some(index)) => break index,
            Ok(None) => {}
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Err(ApiError::unavailable(
                "no leader confirmed a linearizable read within api.write_timeout_ms",
            ));
        }
        let mut metrics = state.raft.metrics();
        let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
    };
    wait_applied(state, index, deadline).await
}

pub(crate) async fn leader_read_index(state: &AppState) -> Result<u64, ApiError> {
    match tokio::time::timeout(state.write_timeout, state.raft.ensure_linearizable()).await {
        Ok(Ok(log_id)) => {
            // A leader restarted in its own term knows only the commit index it had saved:
            // openraft reads from the first entry of its term or that index, whichever is
            // later, and an entry the cluster committed (and acknowledged) just before the
            // restart may lie above both. Everything committed is in a confirmed leader's log,
            // so reading from its last entry is never too early.
            let last = state.raft.metrics().borrow().last_log_index.unwrap_or(0);
            Ok(log_id.map_or(0, |l| l.index).max(last))
        }
        Ok(Err(e)) => Err(ApiError {
            code: "not_leader",
            ..ApiError::unavailable(format!("cannot confirm leadership: {e}"))
        }),
        Err(_) => Err(ApiError::unavailable(
            "leadership was not confirmed within api.write_timeout_ms",
        )),
    }
}

pub(crate) async fn remote_read_index(
    state: &AppState,
    addr: &str,
    deadline: Instant,
) -> Result<Option<u64>, ApiError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let resp = state
        .client
        .request(
            hyper::Method::GET,
            addr,
            "/api/v1/internal/read-index",
            &[],
            Bytes::new(),
            left,
        )
        .await;
    match resp {
        Ok(r) if r.status == StatusCode::OK => {
            let v: Value =
                serde_json::from_slice(&r.body).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(v["index"].as_u64())
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn headers_json() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        h
    }

    fn check(body: &str) -> Result<Validated, ApiError> {
        validate(&headers_json(), body.as_bytes(), &Config::default().limits)
    }

    #[test]
    fn valid_message_gets_defaults() {
        let v = check(r#"{"sender":"alice","payload":"hi","vector_clock":{"b":2,"a":1}}"#).unwrap();
        assert_eq!(v.conv_id, "general");
        assert_eq!(
            serde_json::to_string(&v.vector_clock).unwrap(),
            r#"{"b":2,"a":1}"#
        );
        // A server-made id is time-ordered: the next one sorts after it, in the index too.
        assert!(!v.client_msg_id);
        assert_eq!(v.msg_id.get_version_num(), 7);
        let next = check(r#"{"sender":"alice","payload":"hi"}"#).unwrap();
        assert!(next.msg_id.to_string() > v.msg_id.to_string());
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, code, field) in [
            (r#"{"sender":"a""#, "invalid_json", ""),
            (r#"{"payload":"x"}"#, "invalid_field", "sender"),
            (r#"{"sender":"a","payload":5}"#, "invalid_field", "payload"),
            (
                r#"{"sender":"a","payload":"x","msg_id":"nope"}"#,
                "invalid_field",
                "msg_id",
            ),
            (
                r#"{"sender":"a","payload":"x","conv_id":"a b"}"#,
                "invalid_field",
                "conv_id",
            ),
            (
                r#"{"sender":"a","payload":"x","vector_clock":{"a":-1}}"#,
                "invalid_field",
                "vector_clock",
            ),
            (
                r#"{"sender":"a","payload":"x","colour":"red"}"#,
                "invalid_field",
                "colour",
            ),
        ] {
            let e = check(body).unwrap_err();
            assert_eq!(e.code, code, "{body}: {e}");
            assert!(e.message.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn wrong_content_type_is_415() {
        let e = validate(&HeaderMap::new(), b"{}", &Config::default().limits).unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn history_query_parses_and_checks() {
        let q = parse_history_query(
            "conv_id=room%2D1&from=3&limit=10&consistency=linearizable",
            1000,
        )
        .unwrap();
        assert_eq!(
            q,
            HistoryQuery {
                conv_id: "room-1".into(),
                from: 3,
                limit: 10,
                linearizable: true
            }
        );
        assert!(parse_history_query("limit=0", 1000).is_err());
        assert!(parse_history_query("from=0", 1000).is_err());
        assert!(parse_history_query("bogus=1", 1000).is_err());
    }
}
