//! The bench's HTTP/1.1 client: one shared keep-alive pool, every request bounded by a
//! timeout. Streams (SSE, etcd watches) hand back the open body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Http {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            // A restarted server on the same port must be reached on a fresh connection.
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Http { client, timeout }
    }

    /// The time one request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One request, the whole answer. `Err` is no answer at all (refused, reset, timeout).
    pub async fn call(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<(StatusCode, Bytes), String> {
        let uri = format!("http://{addr}{path}");
        let mut b = Request::builder().method(method.clone()).uri(&uri);
        let body = match body {
            Some((ct, bytes)) => {
                b = b.header(hyper::header::CONTENT_TYPE, ct);
                bytes
            }
            None => Bytes::new(),
        };
        let req = b.body(Full::new(body)).map_err(|e| format!("{uri}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{method} {uri}: {e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {uri}: body: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| Err(format!("{method} {uri}: no answer in {:?}", self.timeout)))
    }

    pub async fn get(&self, addr: &str, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.call(Method::GET, addr, path, None).await
    }

    pub async fn post_json(
        &self,
        addr: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        self.call(
            Method::POST,
            addr,
            path,
            Some(("application/json", body.into())),
        )
        .await
    }

    /// Starts a request whose answer is a stream; returns once the head has arrived.
    pub async fn open_stream(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Incoming, String> {
        let uri = format!("http://{addr}{path}");
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("{uri}: {e}"))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| format!("{uri}: no answer in {:?}", self.timeout))?
            .map_err(|e| format!("{uri}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{uri}: status {}", resp.status()));
        }
        Ok(resp.into_body())
    }
}

/// Reads the next chunk of a streaming body; `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, String>> {
    loop {
        match body.frame().await? {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

/// One keep-alive HTTP/1.1 connection owned by one writer, for the write loops.
///
/// The pooled [`Http`] client hands every request to a connection task and the answer back
/// through a channel: two task wake-ups and a pool lock per request, which at 256 writers cost
/// the bench about twice the CPU per message its hand-written NATS client does, on the cores
/// the servers share. A writer has one request in flight at a time, so it drives its own
/// connection: one write, then reads until the answer is complete.
pub struct Conn {
    addr: String,
    host: String,
    timeout: Duration,
    stream: Option<tokio::io::BufReader<tokio::net::TcpStream>>,
    /// The request being written, reused.
    req: Vec<u8>,
}

impl Conn {
    pub fn new(addr: &str, timeout: Duration) -> Self {
        Conn {
            addr: addr.to_string(),
            host: addr.to_string(),
            timeout,
            stream: None,
            req: Vec::new(),
        }
    }

    /// POSTs a JSON body; the whole answer, or `Err` when there was none (refused, reset,
    /// timeout, unreadable). After an `Err` the next call starts a new connection.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        match tokio::time::timeout(self.timeout, self.exchange(path, body)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.stream = None;
                Err(format!("POST http://{}{path}: {e}", self.addr))
            }
            Err(_) => {
                self.stream = None;
                Err(format!(
                    "POST http://{}{path}: no answer in {:?}",
                    self.addr, self.timeout
                ))
            }
        }
    }

    async fn exchange(&mut self, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        use std::io::Write as _;
        use tokio::io::AsyncWriteExt as _;
        self.req.clear();
        write!(
            self.req,
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.req.extend_from_slice(body);
        if self.stream.is_none() {
            let s = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(&self.addr),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
            s.set_nodelay(true)?;
            self.stream = Some(tokio::io::BufReader::with_capacity(16 * 1024, s));
        }
        let stream = self.stream.as_mut().expect("connected just above");
        stream.get_mut().write_all(&self.req).await?;
        let (status, answer, close) = read_response(stream).await?;
        if close {
            self.stream = None;
        }
        Ok((status, answer))
    }
}

/// Reads one line into `line`, without its CRLF.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    line.clear();
    if r.read_until(b'\n', line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(())
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// Reads one HTTP/1.1 response: status, body (by content-length or chunked), and whether the
/// server will close the connection.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u16, Vec<u8>, bool)> {
    use tokio::io::AsyncReadExt as _;
    let mut line = Vec::new();
    // Interim answers (100 Continue, 103 Early Hints) come before the real one: skip them,
    // or the real one would be taken for the next request's.
    let status = loop {
        next_line(r, &mut line).await?;
        let status: u16 = line
            .split(|&b| b == b' ')
            .nth(1)
            .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
            .ok_or_else(|| bad(format!("status line {:?}", String::from_utf8_lossy(&line))))?;
        if !(100..200).contains(&status) || status == 101 {
            break status;
        }
        loop {
            next_line(r, &mut line).await?;
            if line.is_empty() {
                break;
            }
        }
    };
    let (mut length, mut chunked, mut close) = (None, false, false);
    loop {
        next_line(r, &mut line).await?;
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
        let Some((name, value)) = text.split_once(':') else {
            return Err(bad(format!("header {text:?}")));
        };
        let value = value.trim();
        match name {
            "content-length" => {
                length = Some(value.parse::<usize>().map_err(|_| bad("content-length"))?)
            }
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => close = value.contains("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            next_line(r, &mut line).await?;
            let hex = String::from_utf8_lossy(&line);
            let hex = hex.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(hex, 16).map_err(|_| bad("chunk size"))?;
            let at = body.len();
            body.resize(at + n, 0);
            if n == 0 {
                // Trailer fields, if any, up to the empty line that ends the answer.
                loop {
                    next_line(r, &mut line).await?;
                    if line.is_empty() {
                        break;
                    }
                }
                break;
            }
            r.read_exact(&mut body[at..]).await?;
            next_line(r, &mut line).await?; // the CRLF after the chunk
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else if status >= 200 && status != 204 && status != 304 {
        // Neither length nor chunks: the body runs to the end of the connection.
        r.read_to_end(&mut body).await?;
        close = true;
    }
    Ok((status, body, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &str) -> std::io::Result<(u16, Vec<u8>, bool)> {
        read_response(&mut raw.as_bytes()).await
    }

    #[tokio::test]
    async fn responses_are_read_to_their_end_and_no_further() {
        let raw = "HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 ...";
        let mut r = raw.as_bytes();
        let (status, body, close) = read_response(&mut r).await.unwrap();
        assert_eq!(
            (status, body.as_slice(), close),
            (201, &b"hello"[..], false)
        );
        assert_eq!(
            r, b"HTTP/1.1 ...",
            "the next answer is left for the next read"
        );

        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n\
                       3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let (status, body, close) = parse(chunked).await.unwrap();
        assert_eq!((status, body.as_slice(), close), (200, &b"abcde"[..], true));

        let trailers = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                        2\r\nab\r\n0\r\nx-sum: 1\r\n\r\nHTTP/1.1 ...";
        let mut r = trailers.as_bytes();
        let (status, body, _) = read_response(&mut r).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"ab"[..]));
        assert_eq!(r, b"HTTP/1.1 ...", "the trailer is read with its answer");

        let interim =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok";
        let (status, body, _) = parse(interim).await.unwrap();
        assert_eq!((status, body.as_slice()), (201, &b"ok"[..]));

        let to_eof = "HTTP/1.1 400 Bad Request\r\n\r\n{\"error\":1}";
        let (status, body, close) = parse(to_eof).await.unwrap();
        assert_eq!(
            (status, body.as_slice(), close),
            (400, &b"{\"error\":1}"[..], true)
        );
    }

    #[tokio::test]
    async fn a_cut_or_garbled_answer_is_an_error() {
        for raw in [
            "",
            "HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\nhello",
            "HTTP/1.1 abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(parse(raw).await.is_err(), "{raw:?}");
        }
    }
}
