//! A reader for `text/event-stream` answers: parses `id`, `event` and `data` fields, counts
//! keep-alive comments, and stops at a deadline instead of hanging on a quiet stream.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use tokio::time::Instant;

use super::http::Http;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// `data` parsed as JSON (the record of a `message` event).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }

    /// The `id:` field as a number (a conversation seq for this API).
    pub fn id_u64(&self) -> u64 {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("SSE event without id: {self:?}"));
        id.parse()
            .unwrap_or_else(|_| panic!("SSE id {id:?} is not a number"))
    }
}

/// Why no event came.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEnd {
    /// The deadline passed with the stream still open.
    Timeout,
    /// The server ended the stream cleanly.
    Closed,
    /// The connection broke (reset, killed server).
    Broken(String),
}

impl fmt::Display for SseEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseEnd::Timeout => write!(f, "timed out"),
            SseEnd::Closed => write!(f, "stream closed by the server"),
            SseEnd::Broken(e) => write!(f, "connection broken: {e}"),
        }
    }
}

pub struct SseStream {
    body: Incoming,
    /// Bytes received but not yet split into lines.
    buf: BytesMut,
    /// The event being assembled from its field lines.
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    /// How many comment (keep-alive) lines were seen.
    pub comments: usize,
    /// Set once the body has ended or failed: every later read returns it again.
    ended: Option<SseEnd>,
}

impl SseStream {
    /// Opens `GET path` with `Accept: text/event-stream`, optionally resuming with
    /// `Last-Event-ID`. Fails unless the answer is 200 with an event-stream content type.
    pub async fn open(
        http: &Http,
        addr: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<Self, String> {
        let mut headers = vec![("accept", "text/event-stream")];
        if let Some(id) = last_event_id {
            headers.push(("last-event-id", id));
        }
        let (parts, body) = http.open_stream(addr, path, &headers).await?;
        let ctype = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if parts.status != 200 || !ctype.starts_with("text/event-stream") {
            let rest = tokio::time::timeout(Duration::from_secs(2), body.collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(format!(
                "GET {addr}{path}: status {} content-type {ctype:?} body {rest:?}",
                parts.status
            ));
        }
        Ok(SseStream {
            body,
            buf: BytesMut::new(),
            id: None,
            event: None,
            data: Vec::new(),
            comments: 0,
            ended: None,
        })
    }

    /// The next event, or why there is none before `deadline`.
    pub async fn next_event(&mut self, deadline: Instant) -> Result<SseEvent, SseEnd> {
        loop {
            while let Some(line) = self.take_line() {
                if let Some(ev) = self.feed_line(&line) {
                    return Ok(ev);
                }
            }
            if let Some(end) = &self.ended {
                return Err(end.clone());
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Err(SseEnd::Timeout),
                Ok(None) => self.ended = Some(SseEnd::Closed),
                Ok(Some(Err(e))) => self.ended = Some(SseEnd::Broken(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Reads until `n` events came, or the deadline passed, or the stream ended. Returns the
    /// events read and, when fewer than `n`, why it stopped.
    pub async fn take(&mut self, n: usize, deadline: Instant) -> (Vec<SseEvent>, Option<SseEnd>) {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_event(deadline).await {
                Ok(ev) => out.push(ev),
                Err(end) => return (out, Some(end)),
            }
        }
        (out, None)
    }

    /// Like [`take`](Self::take) but exactly `n` events or a panic saying what came instead.
    pub async fn expect(&mut self, n: usize, timeout: Duration) -> Vec<SseEvent> {
        let (events, end) = self.take(n, Instant::now() + timeout).await;
        if let Some(end) = end {
            panic!(
                "expected {n} SSE events within {timeout:?}, got {}: {end}; events: {events:?}",
                events.len()
            );
        }
        events
    }

    /// Splits one line off the buffer (LF, CRLF or CR endings).
    fn take_line(&mut self) -> Option<String> {
        let pos = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
        // A CR at the very end may be the first half of CRLF: wait for the next byte.
        if self.buf[pos] == b'\r' && pos + 1 == self.buf.len() && self.ended.is_none() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
        let crlf = self.buf[pos] == b'\r' && self.buf.get(pos + 1) == Some(&b'\n');
        self.buf.advance(pos + if crlf { 2 } else { 1 });
        Some(line)
    }

    /// Applies one line; a blank line dispatches the event assembled so far.
    fn feed_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if self.id.is_none() && self.event.is_none() && self.data.is_empty() {
                return None;
            }
            return Some(SseEvent {
                id: self.id.take(),
                event: self.event.take(),
                data: std::mem::take(&mut self.data).join("\n"),
            });
        }
        if line.starts_with(':') {
            self.comments += 1;
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {} // `retry` and unknown fields are not used by these tests.
        }
        None
    }
}
