//! `GET /api/v1/stream`: Server-Sent Events of applied messages, in commit order.
//!
//! A subscriber holds no queue of its own. While it is behind its conversation's live window
//! (history, catch-up, a slow reader) it reads pages from SQLite after its last seq, straight
//! into event bytes; once its next seq is in the window ([`crate::fanout`]) it sends the
//! events the state machine serialised once for every subscriber. Both are asked for exactly
//! the next seq, and seq is dense per conversation, so history and live tail join with no gap
//! and no duplicate, and a slow reader never makes the node buffer for it.
//!
//! The body is written here rather than with warp's `sse` module, in the same wire format
//! (`event:message`, `data:`, `id:` lines; `:keep-alive` comments), so that many events go out
//! as one chunk and an event's bytes are shared between subscribers instead of formatted for
//! each.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use warp::http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use warp::http::HeaderMap;
use warp::{Filter, Reply};

use super::error::reply_json;
use super::messages::{check_conv_id, form_pairs, DEFAULT_CONV};
use super::subscribers::SubscriberSlot;
use super::{with_state, ApiError, AppState};
use crate::fanout::{event::KEEP_ALIVE, Next, Subscription};
use crate::store::{EventPage, MessageReader, StoreError};

/// Most events read from SQLite per query.
const PAGE_EVENTS: usize = 4096;
/// About the most bytes sent as one chunk, from SQLite or from the live window.
const CHUNK_BYTES: usize = 256 << 10;

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
                        let events = EventStream::new(&state, conv_id, from, slot);
                        let mut resp = warp::reply::stream(events).into_response();
                        let headers = resp.headers_mut();
                        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                        resp
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

/// The body of one event stream.
struct EventStream {
    /// The conversation's live window.
    sub: Subscription,
    reader: MessageReader,
    conv_id: String,
    /// The seq of the next event to send.
    next_seq: u64,
    /// A store read in flight, with the window version it was started at (for a read that
    /// follows a full page, the version its first read was started at).
    read: Option<(JoinHandle<Result<EventPage, StoreError>>, u64)>,
    /// The window version at which a store read last found nothing new.
    read_empty_at: Option<u64>,
    /// Fires `keep_alive` after the last send; moved on lazily, when it fires.
    keep_alive_timer: Pin<Box<Sleep>>,
    keep_alive: Duration,
    last_sent: Instant,
    done: bool,
    /// This stream's place under the subscriber caps, given back when the stream ends or the
    /// client leaves; the caps' count is also the SSE gauge of `/metrics`.
    _slot: SubscriberSlot,
}

impl EventStream {
    fn new(state: &AppState, conv_id: String, from: u64, slot: SubscriberSlot) -> EventStream {
        let now = Instant::now();
        EventStream {
            sub: state.reader.tail().subscribe(&conv_id),
            reader: state.reader.clone(),
            conv_id,
            next_seq: from,
            read: None,
            read_empty_at: None,
            keep_alive_timer: Box::pin(tokio::time::sleep_until(now + state.sse_keepalive)),
            keep_alive: state.sse_keepalive,
            last_sent: now,
            // A stream opened while the node stops ends at once.
            done: *state.shutdown.borrow(),
            _slot: slot,
        }
    }

    fn sent(&mut self, bytes: Bytes) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.last_sent = Instant::now();
        Poll::Ready(Some(Ok(bytes)))
    }

    /// Starts reading the page of stored events from `next_seq` on.
    fn start_read(&mut self, version: u64) {
        let handle =
            self.reader
                .spawn_event_page(&self.conv_id, self.next_seq, PAGE_EVENTS, CHUNK_BYTES);
        self.read = Some((handle, version));
    }

    fn end(&mut self) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.done = true;
        self.read = None;
        Poll::Ready(None)
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some((handle, version)) = &mut this.read {
                let version = *version;
                let page = match Pin::new(handle).poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(Ok(page))) => page,
                    Poll::Ready(Ok(Err(e))) => {
                        tracing::warn!(conv_id = %this.conv_id, error = %e, "ending a stream: the store could not be read");
                        return this.end();
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(conv_id = %this.conv_id, error = %e, "ending a stream: its store read failed");
                        return this.end();
                    }
                };
                this.read = None;
                if page.count == 0 {
                    this.read_empty_at = Some(version);
                    continue;
                }
                this.next_seq = page.next_seq;
                if page.count >= PAGE_EVENTS || page.bytes.len() >= CHUNK_BYTES {
                    // A full page: more is stored after it. Read the next page while this one
                    // is written to the client, so a catch-up reads and sends at once. The
                    // read starts from the exact next seq, so it cannot skip or repeat an
                    // event whatever the live window holds by the time it is polled.
                    this.start_read(version);
                }
                return this.sent(page.bytes);
            }
            match this
                .sub
                .next(this.next_seq, this.read_empty_at, CHUNK_BYTES, cx.waker())
            {
                Next::Events(bytes, next_seq) => {
                    this.next_seq = next_seq;
                    return this.sent(bytes);
                }
                Next::Behind(version) => this.start_read(version),
                Next::Wait => break,
                Next::Closed => return this.end(),
            }
        }
        // Nothing to send now: a keep-alive comment once nothing was sent for the interval.
        while this.keep_alive_timer.as_mut().poll(cx).is_ready() {
            let due = this.last_sent + this.keep_alive;
            if due <= Instant::now() {
                this.keep_alive_timer
                    .as_mut()
                    .reset(Instant::now() + this.keep_alive);
                return this.sent(Bytes::from_static(KEEP_ALIVE));
            }
            this.keep_alive_timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}
