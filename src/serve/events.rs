//! Event streams served without hyper's connection state.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for every connection for as
//! long as it is open. An event stream is open for hours and reads nothing after its request,
//! so with thousands of subscribers those buffers were most of a node's memory. A connection
//! whose first request is `GET` on the event-stream path is therefore answered here: its head
//! is read into a buffer that is freed once parsed, the request goes through the same routes
//! (so authentication, parameters and limits are the same), and the response is written
//! straight to the socket, HTTP/1.1 with chunked transfer encoding, one write per chunk. The
//! connection closes when the stream ends (`connection: close` says so up front).
//!
//! Every other connection is handed to hyper with its first head put back in front of the
//! socket ([`Rewind`]), so hyper parses it exactly as if it had read it itself, and the first
//! head is bounded by the same head read timeout as every later one. A first head above the
//! size limit is answered here, with 431 in the API's error shape ([`refuse_large_head`]);
//! hyper answers one on a later request of the connection, with a bare 431.

use std::convert::Infallible;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower_service::Service;
use warp::http::{self, header, HeaderName, HeaderValue, Method, Request, Version};

use super::timed_out;

/// The most header lines read on this path; a request with more goes to hyper, which
/// applies its own limit.
const MAX_HEADERS: usize = 64;
/// The first read's buffer: large enough for the usual request head in one read.
const FIRST_READ: usize = 1024;

/// What the first request on a connection turned out to be.
pub(super) enum FirstHead {
    /// `GET` on the event-stream path, parsed; nothing followed its head.
    Stream(Box<Request<Empty<Bytes>>>),
    /// Anything else: the bytes read so far, for hyper to parse.
    Other(Bytes),
    /// A head larger than the limit (complete or not): refused with 431.
    TooLarge,
    /// The client closed the connection before sending a byte.
    Closed,
}

/// Reads the connection's first request head, whole, and tells whether it opens an event
/// stream on `path`, is too large, or is any other request (handed on complete), so the head
/// read timeout the caller puts around this bounds the client's first head exactly as it
/// bounds the later ones in hyper.
pub(super) async fn read_first_head<IO>(
    io: &mut IO,
    path: &str,
    max_head_bytes: usize,
) -> io::Result<FirstHead>
where
    IO: AsyncRead + Unpin,
{
    let max_head_bytes = max_head_bytes.max(1);
    let mut buf = BytesMut::with_capacity(FIRST_READ.min(max_head_bytes));
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(if buf.is_empty() {
                FirstHead::Closed
            } else {
                FirstHead::Other(buf.freeze())
            });
        }
        match classify(&buf, path, max_head_bytes) {
            Classified::NotStream => return Ok(FirstHead::Other(buf.freeze())),
            Classified::Stream(req) => return Ok(FirstHead::Stream(req)),
            Classified::TooLarge => return Ok(FirstHead::TooLarge),
            Classified::Partial if buf.len() >= max_head_bytes => return Ok(FirstHead::TooLarge),
            Classified::Partial => {
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len().min(max_head_bytes - buf.len()));
                }
            }
        }
    }
}

enum Classified {
    Stream(Box<Request<Empty<Bytes>>>),
    NotStream,
    TooLarge,
    Partial,
}

fn classify(buf: &[u8], path: &str, max_head_bytes: usize) -> Classified {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => Classified::Partial,
        Ok(httparse::Status::Complete(len)) if len > max_head_bytes => Classified::TooLarge,
        // Bytes after the head would be a body or a pipelined request: hyper handles those.
        Ok(httparse::Status::Complete(len)) if len == buf.len() => {
            let is_stream = parsed.method == Some("GET")
                && parsed.path.is_some_and(|p| {
                    p.strip_prefix(path)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
                });
            if is_stream {
                build_request(&parsed)
                    .map_or(Classified::NotStream, |r| Classified::Stream(Box::new(r)))
            } else {
                Classified::NotStream
            }
        }
        // More header lines than parsed here: not a stream request, but the head's size
        // still decides whether it is refused here or handed to hyper.
        Err(httparse::Error::TooManyHeaders) => match find_head_end(buf) {
            Some(len) if len > max_head_bytes => Classified::TooLarge,
            Some(_) => Classified::NotStream,
            None => Classified::Partial,
        },
        Ok(httparse::Status::Complete(_)) | Err(_) => Classified::NotStream,
    }
}

/// The length of the head at the start of `buf` (through its blank line), if it is all there.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The parsed head as a request for the routes; `None` for anything this path does not
/// serve (HTTP/1.0, a body, a header hyper would refuse), which then goes to hyper.
fn build_request(parsed: &httparse::Request<'_, '_>) -> Option<Request<Empty<Bytes>>> {
    if parsed.version != Some(1) {
        return None;
    }
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = parsed.path?.parse().ok()?;
    let headers = req.headers_mut();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    (!has_body).then_some(req)
}

/// Answers an event-stream request on `io` and closes the connection when its body ends or
/// the client goes away.
pub(super) async fn serve_stream<IO, S>(
    mut io: IO,
    req: Request<Empty<Bytes>>,
    mut service: S,
    request_timeout: Option<Duration>,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<Empty<Bytes>>, Response = warp::reply::Response, Error = Infallible>,
{
    let answer = service.call(req);
    let resp = match request_timeout {
        None => answer.await,
        Some(limit) => match tokio::time::timeout(limit, answer).await {
            Ok(r) => r,
            Err(_) => Ok(timed_out(limit)),
        },
    };
    let Ok(resp) = resp;
    let (parts, mut body) = resp.into_parts();
    let length = hyper::body::Body::size_hint(&body).exact();
    io.write_all(&response_head(&parts, length)).await?;
    io.flush().await?;

    // The client sends nothing more on this connection; a read ends only when it closes (or
    // pipelines bytes, which are dropped: this connection answers one request).
    let mut scratch = [0u8; 64];
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            read = io.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if length.is_some() {
                    io.write_all(&data).await?;
                } else {
                    let size = format!("{:x}\r\n", data.len());
                    write_parts(&mut io, [size.as_bytes(), &data, b"\r\n"]).await?;
                }
                io.flush().await?;
            }
            Some(Err(e)) => {
                // The stream broke: end the response without its last chunk, so the client
                // sees an incomplete body rather than a clean end.
                tracing::debug!(error = %e, "an event stream's body failed");
                return Ok(());
            }
            None => {
                if length.is_none() {
                    io.write_all(b"0\r\n\r\n").await?;
                }
                io.flush().await?;
                return io.shutdown().await;
            }
        }
    }
}

/// Answers a first head above `max_head_bytes` with 431 in the API's error shape, then
/// closes the connection. The rest of the head is read and dropped for a moment after the
/// answer, so that closing with unread bytes (a reset) does not destroy the answer before the
/// client has read it.
pub(super) async fn refuse_large_head<IO>(io: IO, max_head_bytes: usize) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    refuse(
        io,
        crate::api::ApiError::new(
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
            format!(
                "the request head is larger than {max_head_bytes} bytes (api.max_header_bytes)"
            ),
        ),
    )
    .await
}

/// Answers with `error` whatever was asked, then closes the connection after reading and
/// dropping what the client sends for a moment (see [`refuse_large_head`]).
pub(super) async fn refuse<IO>(mut io: IO, error: crate::api::ApiError) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    /// Bounds on what is read and dropped after the answer.
    const DRAIN_BYTES: usize = 1 << 20;
    const DRAIN_TIME: Duration = Duration::from_secs(2);
    let resp = warp::Reply::into_response(error);
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    io.write_all(&response_head(&parts, Some(body.len() as u64)))
        .await?;
    io.write_all(&body).await?;
    io.flush().await?;
    io.shutdown().await?;
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut dropped = 0;
        while dropped < DRAIN_BYTES {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    Ok(())
}

/// The response's status line and headers, with what hyper would add: `date`, and
/// `content-length` or `transfer-encoding: chunked`, and `connection: close`.
fn response_head(parts: &http::response::Parts, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
        head.extend_from_slice(format!("date: {date}\r\n").as_bytes());
    }
    match length {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// Writes `parts` in one vectored write when the socket takes it all, as it does unless its
/// send buffer is full.
async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: [&[u8]; 3]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = w.write_vectored(&parts.map(IoSlice::new)).await?;
    if written == 0 && total > 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    // A short write: the rest, one part at a time.
    for part in parts {
        if written >= part.len() {
            written -= part.len();
            continue;
        }
        w.write_all(&part[written..]).await?;
        written = 0;
    }
    Ok(())
}

/// A connection with bytes already read from it put back in front: reads return `prefix`
/// first, then the socket's own bytes. Writes go straight to the socket.
pub(super) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(super) fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Free the head buffer as soon as it is consumed.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/api/v1/stream";

    #[test]
    fn the_head_size_limit_is_exact_and_counts_the_head_alone() {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let len = head.len();
        assert!(matches!(classify(head, PATH, len), Classified::NotStream));
        assert!(matches!(
            classify(head, PATH, len - 1),
            Classified::TooLarge
        ));
        // A body read along with the head does not count toward the limit.
        let with_body = b"POST /api/v1/message HTTP/1.1\r\ncontent-length: 40\r\n\r\n";
        let mut buf = with_body.to_vec();
        buf.extend_from_slice(&[b'x'; 40]);
        assert!(matches!(
            classify(&buf, PATH, with_body.len()),
            Classified::NotStream
        ));
    }

    #[test]
    fn a_head_with_many_header_lines_is_judged_by_its_size() {
        let mut head = String::from("GET /healthz HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS + 6 {
            head.push_str(&format!("X-H{i}: v\r\n"));
        }
        let partial = head.clone();
        head.push_str("\r\n");
        assert!(matches!(
            classify(head.as_bytes(), PATH, 16384),
            Classified::NotStream
        ));
        assert!(matches!(
            classify(head.as_bytes(), PATH, head.len() - 1),
            Classified::TooLarge
        ));
        assert!(matches!(
            classify(partial.as_bytes(), PATH, 16384),
            Classified::Partial
        ));
    }

    #[tokio::test]
    async fn an_unfinished_head_that_reaches_the_limit_is_too_large() {
        let unfinished = format!("GET /healthz HTTP/1.1\r\nX-Big: {}", "x".repeat(200));
        let mut io = unfinished.as_bytes();
        let first = read_first_head(&mut io, PATH, 100).await.expect("reading");
        assert!(matches!(first, FirstHead::TooLarge));
        // Under the limit, the same bytes are simply not a whole head yet: what was read
        // goes to hyper when the client stops sending.
        let mut io = unfinished.as_bytes();
        let first = read_first_head(&mut io, PATH, 16384)
            .await
            .expect("reading");
        assert!(matches!(first, FirstHead::Other(b) if b.len() == unfinished.len()));
    }

    #[test]
    fn a_stream_request_is_recognised_with_its_headers() {
        let head = b"GET /api/v1/stream?conv_id=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n";
        let Classified::Stream(req) = classify(head, PATH, 16384) else {
            panic!("not taken as a stream request");
        };
        assert_eq!(req.uri().path(), PATH);
        assert_eq!(req.uri().query(), Some("conv_id=a"));
        assert_eq!(req.headers()["last-event-id"], "7");
    }

    #[test]
    fn heads_are_read_whole_before_they_are_told_apart() {
        for partial in [
            &b"P"[..],
            b"GET /api/v1/m",
            b"GET /api/v1/stream HTTP/1.1\r\nHost:",
        ] {
            assert!(matches!(
                classify(partial, PATH, 16384),
                Classified::Partial
            ));
        }
        for other in [
            &b"GET /api/v1/streams HTTP/1.1\r\n\r\n"[..],
            b"POST /api/v1/stream HTTP/1.1\r\n\r\n",
            b"GET /api/v1/messages HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01 not http",
        ] {
            assert!(matches!(
                classify(other, PATH, 16384),
                Classified::NotStream
            ));
        }
        // A complete head above the limit is refused, whatever its path.
        let head = format!(
            "GET /api/v1/stream HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "x".repeat(100)
        );
        assert!(matches!(
            classify(head.as_bytes(), PATH, 64),
            Classified::TooLarge
        ));
        let other = head.replace("/api/v1/stream", "/healthz");
        assert!(matches!(
            classify(other.as_bytes(), PATH, 64),
            Classified::TooLarge
        ));
        assert!(matches!(
            classify(head.as_bytes(), PATH, 16384),
            Classified::Stream(_)
        ));
    }

    #[test]
    fn what_this_path_does_not_serve_goes_to_hyper() {
        for head in [
            &b"GET /api/v1/stream HTTP/1.0\r\n\r\n"[..],
            b"GET /api/v1/stream HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            b"GET /api/v1/stream HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET /api/v1/stream HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET /api/v1/stream HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(classify(head, PATH, 16384), Classified::NotStream),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_socket() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
