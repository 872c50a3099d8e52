//! `GET /api/v1/stream`: Server-Sent Events of applied messages, in commit order.
//!
//! A subscriber holds no queue of its own: it reads pages from SQLite after its last seq and,
//! when it has caught up, waits for the applied index to move. A slow reader therefore never
//! loses a message and never makes the node buffer for it; the history and the live tail are
//! the same query, so they join with no gap and no duplicate.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use futures_util::stream::{self, Stream, StreamExt};
use warp::http::HeaderMap;
use warp::sse::Event;
use warp::{Filter, Reply};

use super::error::reply_json;
use super::messages::{check_conv_id, form_pairs, DEFAULT_CONV};
use super::{with_state, ApiError, AppState};
use crate::types::Record;

/// Records read from SQLite per query.
const PAGE: usize = 256;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("api" / "v1" / "stream")
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("last-event-id"))
        .and(warp::header::headers_cloned())
        .and(crate::serve::client_addr())
        .then(
            |state: Arc<AppState>,
             query: String,
             last_event_id: Option<String>,
             headers: HeaderMap,
             client: Option<std::net::SocketAddr>| async move {
                let started = start(&state, &query, last_event_id.as_deref(), &headers).await;
                let slot = started.and_then(|(conv_id, from)| {
                    let slot = state.subscribers.acquire(client.map(|a| a.ip()))?;
                    Ok((conv_id, from, slot))
                });
                match slot {
                    Ok((conv_id, from, slot)) => {
                        tracing::debug!(%conv_id, from, "stream subscriber");
                        let keep_alive = warp::sse::keep_alive()
                            .interval(state.sse_keepalive)
                            .text("keep-alive");
                        // The stream holds its slot until it ends or the client leaves.
                        let events = events(state, conv_id, from).inspect(move |_| {
                            let _held = &slot;
                        });
                        warp::sse::reply(keep_alive.stream(events)).into_response()
                    }
                    Err(e) => reply_json::<()>(Err(e)),
                }
            },
        )
}

/// Works out the conversation and the first seq to send.
async fn start(
    state: &AppState,
    raw_query: &str,
    last_event_id: Option<&str>,
    headers: &HeaderMap,
) -> Result<(String, u64), ApiError> {
    let mut conv_id = DEFAULT_CONV.to_string();
    let mut from: Option<u64> = None;
    for (key, value) in form_pairs(raw_query)? {
        match key.as_str() {
            "conv_id" => conv_id = value,
            "from" => {
                from =
                    Some(value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        ApiError::invalid_field("from", "must be a number from 1 up")
                    })?)
            }
            other => {
                return Err(ApiError::invalid_field(
                    other,
                    "is not a parameter of this path",
                ))
            }
        }
    }
    check_conv_id(&conv_id)?;
    state.security.access(headers, None)?.check_read(&conv_id)?;
    // A reconnecting EventSource repeats the original URL: Last-Event-ID wins over `from`.
    if let Some(id) = last_event_id {
        let last: u64 = id
            .trim()
            .parse()
            .map_err(|_| ApiError::invalid_field("Last-Event-ID", "must be the seq of an event"))?;
        return Ok((conv_id, last + 1));
    }
    match from {
        Some(f) => Ok((conv_id, f)),
        None => {
            let last = state
                .reader
                .last_seq(&conv_id)
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((conv_id, last + 1))
        }
    }
}

struct Cursor {
    state: Arc<AppState>,
    conv_id: String,
    next_seq: u64,
    buffered: VecDeque<Record>,
    applied: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Counts this subscription in the SSE gauge of `/metrics` for as long as it lives.
    _subscriber: crate::metrics::SubscriberGuard,
}

fn events(
    state: Arc<AppState>,
    conv_id: String,
    from: u64,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let cursor = Cursor {
        applied: state.reader.applied(),
        shutdown: state.shutdown.clone(),
        state,
        conv_id,
        next_seq: from,
        buffered: VecDeque::new(),
        _subscriber: crate::metrics::SubscriberGuard::new(),
    };
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(record) = c.buffered.pop_front() {
                let event = to_event(&record);
                return Some((Ok(event), c));
            }
            if *c.shutdown.borrow() {
                return None;
            }
            // Mark the applied index seen before reading, so an apply that lands after the
            // read wakes us and nothing slips between the query and the wait.
            c.applied.borrow_and_update();
            match c.state.reader.page(&c.conv_id, c.next_seq, PAGE).await {
                Ok(page) if !page.is_empty() => {
                    c.next_seq = page.last().map_or(c.next_seq, |r| r.seq + 1);
                    c.buffered.extend(page);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(conv_id = %c.conv_id, error = %e, "ending a stream: the store could not be read");
                    return None;
                }
            }
            tokio::select! {
                changed = c.applied.changed() => if changed.is_err() { return None },
                _ = c.shutdown.changed() => return None,
            }
        }
    })
}

fn to_event(record: &Record) -> Event {
    // A Record always serialises: every field is a string, a number or a string map.
    let data = serde_json::to_string(record).unwrap_or_default();
    Event::default()
        .event("message")
        .id(record.seq.to_string())
        .data(data)
}
