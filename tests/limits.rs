//! Connection-level limits: an oversized request head, a client that sends its head too
//! slowly (or goes idle), a body that never finishes, and event-stream subscribers above the
//! per-address and per-node caps. Each gets its answer while the node keeps serving others.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Cluster, Options};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Connects to `addr` from the loopback address `from` (127.0.0.x), so one test plays
/// several client addresses.
async fn connect_from(from: &str, addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    socket
        .connect(addr.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr} from {from}: {e}"))
}

/// Reads until the peer closes the connection or `deadline` passes; returns what came and
/// whether the connection was closed.
async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> (String, bool) {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Checks a whole answer read until the server closed: `status_line`, a JSON error body with
/// `code` and its exact length, and `connection: close`.
fn assert_closing_error(answer: &str, closed: bool, status_line: &str, code: &str) {
    assert!(closed, "the connection stayed open: {answer:?}");
    assert!(answer.starts_with(status_line), "{answer:?}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/json\r\n"),
        "{answer:?}"
    );
    assert!(lower.contains("connection: close\r\n"), "{answer:?}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        lower.contains(&format!("content-length: {}\r\n", body.len())),
        "{answer:?}"
    );
    let err: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(err["error"]["code"], code, "{answer:?}");
}

/// Reads one response head (up to the blank line) within `deadline`.
async fn read_head(stream: &mut TcpStream, deadline: Duration) -> String {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Ok(Ok(1)) => got.push(buf[0]),
            other => panic!(
                "no complete response head ({other:?}): {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `GET path` (with `headers`, each ending in CRLF) from `from` on a new connection;
/// returns the connection and the answer's head.
async fn get_on_new_connection(
    from: &str,
    addr: &str,
    path: &str,
    headers: &str,
) -> (TcpStream, String) {
    let mut s = connect_from(from, addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s, Duration::from_secs(10)).await;
    (s, head)
}

async fn open_stream(from: &str, addr: &str) -> (TcpStream, String) {
    let path = "/api/v1/stream?conv_id=caps";
    get_on_new_connection(from, addr, path, "Accept: text/event-stream\r\n").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_idle_and_oversized_requests_are_cut_off() {
    let c = Cluster::start(Options {
        // The shortest header timeout allowed, and a request timeout just above the writes'.
        api_toml:
            "header_read_timeout_ms = 5000\nrequest_timeout_ms = 4000\nmax_header_bytes = 4096"
                .into(),
        ..Options::nodes(1)
    })
    .await;
    let addr = c.api(1).to_string();

    // A head larger than max_header_bytes: 431.
    let mut s = connect_from("127.0.0.1", &addr).await;
    let big = "x".repeat(8192);
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert_closing_error(
        &answer,
        closed,
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "header_too_large",
    );

    // A client that starts a head and stalls, and one that connects and says nothing, and one
    // that finishes a request and then idles: each connection is closed once the header read
    // timeout passes, while the node answers everyone else meanwhile.
    let started = Instant::now();
    let mut slow = connect_from("127.0.0.1", &addr).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut silent = connect_from("127.0.0.1", &addr).await;
    let mut idle = connect_from("127.0.0.1", &addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut idle, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let r = c.outsider().get(&addr, "/healthz").await.unwrap();
    assert_eq!(r.code(), 200);
    for (what, conn) in [
        ("slow", &mut slow),
        ("silent", &mut silent),
        ("idle", &mut idle),
    ] {
        let (_, closed) = read_until_closed(conn, Duration::from_secs(20)).await;
        assert!(closed, "the {what} connection is still open after 20 s");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4500),
        "connections were closed after {took:?}, before the 5 s header timeout"
    );

    // A body that never finishes: 408 in the error shape once request_timeout_ms passes.
    let mut stalled = connect_from("127.0.0.1", &addr).await;
    stalled
        .write_all(
            b"POST /api/v1/message HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sender\":",
        )
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut stalled, Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        answer.contains("\"code\":\"request_timeout\""),
        "{answer:?}"
    );

    // Nothing was stored by any of them; a normal write still works.
    let r = c
        .post(1, &json!({"sender": "ok", "payload": "still serving"}))
        .await
        .unwrap();
    assert_eq!(r.code(), 201, "{}", r.text());
    assert_eq!(c.messages(1, "general").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_stream_caps_per_address_and_per_node() {
    let c = Cluster::start(Options {
        limits_toml: "max_subscribers = 3\nmax_subscribers_per_address = 2".into(),
        ..Options::nodes(1)
    })
    .await;
    let addr = c.api(1).to_string();

    let (a1, head) = open_stream("127.0.0.1", &addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_a2, head) = open_stream("127.0.0.1", &addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The address is at its cap: 503 with Retry-After, in the error shape.
    let (mut a3, head) = open_stream("127.0.0.1", &addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    let (body, _) = read_until_closed(&mut a3, Duration::from_millis(500)).await;
    assert!(body.contains("\"code\":\"too_many_subscribers\""), "{body}");
    // Another address is still served...
    let (_b1, head) = open_stream("127.0.0.2", &addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // ...until the node itself is full.
    let (_, head) = open_stream("127.0.0.3", &addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    // Other requests are not affected by the stream caps.
    let r = c
        .post(
            1,
            &json!({"conv_id": "caps", "sender": "s", "payload": "p"}),
        )
        .await
        .unwrap();
    assert_eq!(r.code(), 201, "{}", r.text());

    // A client that leaves gives its place back.
    drop(a1);
    common::wait_until(
        "the closed stream's place to be given back",
        Duration::from_secs(10),
        || {
            let addr = addr.clone();
            async move {
                let (s, head) = open_stream("127.0.0.1", &addr).await;
                if head.starts_with("HTTP/1.1 200") {
                    Ok(s)
                } else {
                    Err(head)
                }
            }
        },
    )
    .await;
}

/// Reads from `stream` until what came contains `needle`, within `deadline`.
async fn read_until_contains(stream: &mut TcpStream, needle: &str, deadline: Duration) -> String {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "{needle:?} did not arrive ({other:?}): {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_streams_and_other_requests_share_the_listener() {
    let c = Cluster::start(Options::nodes(1)).await;
    let addr = c.api(1).to_string();

    // A stream request with a bad parameter: the error shape with its length, and the
    // connection closes after it.
    let mut s = connect_from("127.0.0.1", &addr).await;
    s.write_all(b"GET /api/v1/stream?from=0 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert_closing_error(
        &answer,
        closed,
        "HTTP/1.1 400 Bad Request\r\n",
        "invalid_field",
    );

    // A stream, its head sent in pieces: chunked events as messages are committed.
    let mut stream = connect_from("127.0.0.1", &addr).await;
    for piece in [
        &b"GET /api/v1/str"[..],
        b"eam?conv_id=wire HTTP/1.1\r\nHo",
        b"st: a\r\nAccept: text/event-stream\r\n\r\n",
    ] {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
    }
    let head = read_head(&mut stream, Duration::from_secs(10)).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        lower.contains("content-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(lower.contains("date: "), "{head}");
    let r = c
        .post(
            1,
            &json!({"conv_id": "wire", "sender": "a", "payload": "over the wire"}),
        )
        .await
        .unwrap();
    assert_eq!(r.code(), 201, "{}", r.text());
    let body = read_until_contains(&mut stream, "over the wire", Duration::from_secs(10)).await;
    // One chunk: its size in hex, then exactly that many bytes holding the event.
    let (size, rest) = body.split_once("\r\n").unwrap();
    let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("{body:?}"));
    assert!(rest.len() >= size + 2, "{body:?}");
    let event = &rest[..size];
    assert!(event.starts_with("event:message\n"), "{event:?}");
    assert!(event.contains("id:1\n"), "{event:?}");
    assert_eq!(&rest[size..size + 2], "\r\n", "{body:?}");

    // Other requests, two on one kept-alive connection, and one that starts like a stream
    // request: all answered as before.
    let mut other = connect_from("127.0.0.1", &addr).await;
    other
        .write_all(
            b"GET /api/v1/messages?conv_id=wire HTTP/1.1\r\nHost: a\r\n\r\nGET /api/v1/streams HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until_contains(
        &mut other,
        "HTTP/1.1 404 Not Found\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.contains("over the wire"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_above_the_cap_are_refused_and_places_come_back() {
    const CAP: usize = 4;
    let c = Cluster::start(Options {
        api_toml: format!("max_connections = {CAP}"),
        limits_toml: "max_subscribers = 1".into(),
        ..Options::nodes(1)
    })
    .await;
    let addr = c.api(1).to_string();

    // Kept-alive connections hold their places (the harness's own pooled ones may hold some
    // too): within CAP + 1 connections one is refused, in the error shape, and closed.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..=CAP {
        let (mut s, head) = get_on_new_connection("127.0.0.1", &addr, "/healthz", "").await;
        if head.starts_with("HTTP/1.1 200") {
            held.push(s);
            continue;
        }
        let (rest, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        refused = Some((format!("{head}{rest}"), closed));
        break;
    }
    let (answer, closed) = refused.expect("no connection was refused above the cap");
    assert!(held.len() <= CAP, "{} connections held", held.len());
    assert_closing_error(
        &answer,
        closed,
        "HTTP/1.1 503 Service Unavailable\r\n",
        "too_many_connections",
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer:?}"
    );

    // A client that reads before it writes (hyper's, as every node's forwarder) gets the
    // answer too, not a broken connection.
    let r = c
        .outsider()
        .get(&addr, "/healthz")
        .await
        .expect("an answer above the cap");
    assert_eq!(r.code(), 503, "{}", r.text());
    assert!(
        r.text().contains("\"code\":\"too_many_connections\""),
        "{}",
        r.text()
    );

    // A client that leaves gives its place back, and the refusal was counted.
    held.clear();
    common::wait_until("a place to come back", Duration::from_secs(10), || {
        let addr = addr.clone();
        async move {
            let (_s, head) = get_on_new_connection("127.0.0.1", &addr, "/healthz", "").await;
            head.starts_with("HTTP/1.1 200").then_some(()).ok_or(head)
        }
    })
    .await;
    let r = c
        .http
        .get(c.api(1), "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(r.code(), 200, "{}", r.text());
    let metrics = r.text();
    assert!(
        metrics.contains("chatraftd_rejected_requests_total{code=\"too_many_connections\"} "),
        "{metrics}"
    );
    let open: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chatraftd_api_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no chatraftd_api_connections gauge: {metrics}"));
    assert!((1..=CAP).contains(&open), "{open} connections open");
}
