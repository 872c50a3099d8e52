//! The HTTP/1.1 server both listeners run: an accept loop of our own around hyper, so a node
//! controls what warp's built-in server does not: TLS, the request head's size, how long a
//! client may take to send it (which also ends idle kept-alive connections), how long a
//! request may take to be answered, and the client's address as the routes see it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use warp::reply::Response;
use warp::Filter;

use crate::api::ApiError;

mod events;

/// What a listener serves: warp's routes made into a service (`warp::service`), for the
/// requests hyper reads and for the event-stream requests read by [`events`].
pub trait Routes: Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send + 'static>
    + Service<Request<Empty<Bytes>>, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<T> Routes for T where
    T: Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send + 'static>
        + Service<
            Request<Empty<Bytes>>,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// How one listener treats its connections.
#[derive(Clone)]
pub struct ServeOptions {
    /// TLS on every connection; `None` for plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// A request head must arrive within this time (also: the TLS handshake, and the idle
    /// time allowed between requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// A request must be answered (its head sent) within this time: 408 after it.
    pub request_timeout: Option<Duration>,
    /// The largest request head; 431 above it: in the API's error shape for a connection's
    /// first head where its first head is read here ([`events::refuse_large_head`]), from
    /// hyper (no body) otherwise.
    pub max_header_bytes: usize,
    /// Names the listener in logs.
    pub name: &'static str,
    /// Connections whose first request is a `GET` on this path are answered without hyper
    /// (see [`events`]): the client API's event stream.
    pub event_stream_path: Option<&'static str>,
    /// After `stop`, how long open connections may take to finish their requests before
    /// they are closed (an event stream to a client that stopped reading never finishes).
    pub drain: Duration,
    /// The most connections open at once (the client API's `api.max_connections`, counted in
    /// [`crate::metrics::API_CONNECTIONS`]); `None`: no cap. Above it a plain-HTTP
    /// connection is answered `503 too_many_connections` and closed, a TLS one is closed.
    pub max_connections: Option<usize>,
}

/// Over-cap connections being answered at once; beyond this they are closed unanswered, so
/// that refusing a flood costs a bounded number of descriptors too.
const MAX_REFUSING: usize = 256;
/// How long an over-cap connection may take to send its request before it is closed
/// unanswered (at most the header read timeout).
const REFUSE_WAIT: Duration = Duration::from_secs(2);

/// A connection's place under the listener's cap, given back when the connection ends.
struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Place {
    fn take(slots: &Arc<Semaphore>) -> Option<Place> {
        let permit = slots.clone().try_acquire_owned().ok()?;
        crate::metrics::API_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Some(Place { _permit: permit })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        crate::metrics::API_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The address of the client at the other end of the connection, in every request's
/// extensions: read it with [`client_addr`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The client's address as the listener saw it.
pub fn client_addr() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Copy {
    warp::ext::optional::<ClientAddr>().map(|a: Option<ClientAddr>| a.map(|a| a.0))
}

/// Serves `service` (a filter made into one with `warp::service`) on `listener` until `stop`
/// resolves, then stops accepting, lets the open connections finish their requests for up to
/// `options.drain`, and closes whatever is still open.
pub async fn serve<S: Routes>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    // Every connection's task, so that none outlives the listener.
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_header_size(options.max_header_bytes);
    let slots = options.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    tokio::pin!(stop);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = options.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Reap the tasks of connections that have ended.
        while connections.try_join_next().is_some() {}
        let _ = tcp.set_nodelay(true);
        let place = match &slots {
            None => None,
            Some(slots) => match Place::take(slots) {
                Some(place) => Some(place),
                None => {
                    refuse_over_cap(tcp, remote, &options, &refusing, &mut connections);
                    continue;
                }
            },
        };
        let conn = Connection {
            service: service.clone(),
            http: http.clone(),
            options: options.clone(),
            remote,
            stopping: stopping_rx.clone(),
        };
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let _place = place;
            match conn.options.tls.clone() {
                None => conn.run(tcp, watcher).await,
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        conn.options.header_read_timeout,
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(listener = conn.options.name, %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(listener = conn.options.name, %remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    conn.run(stream, watcher).await
                }
            }
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(options.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = options.name,
            open = connections.len(),
            "connections still open after {:?}; closing them",
            options.drain
        );
    }
    connections.shutdown().await;
}

/// Answers a connection above the cap with `503 too_many_connections` once its request
/// begins (plain HTTP, while fewer than [`MAX_REFUSING`] are being answered), or closes it
/// (TLS, too many being answered, or no request within [`REFUSE_WAIT`]).
fn refuse_over_cap(
    tcp: TcpStream,
    remote: SocketAddr,
    options: &ServeOptions,
    refusing: &Arc<Semaphore>,
    connections: &mut tokio::task::JoinSet<()>,
) {
    let cap = options.max_connections.unwrap_or(0);
    // A client that reads before it writes (hyper's does) takes bytes that arrive before its
    // request has gone out for a broken connection, not for an answer: answer once it spoke.
    let wait = options.header_read_timeout.min(REFUSE_WAIT);
    tracing::debug!(listener = options.name, %remote, cap, "connection above the cap refused");
    let turn = match options.tls {
        None => refusing.clone().try_acquire_owned().ok(),
        Some(_) => None,
    };
    let Some(turn) = turn else {
        // Closed unanswered: counted here, as an answer is counted where it is made.
        crate::metrics::count_rejected(TOO_MANY_CONNECTIONS);
        return;
    };
    connections.spawn(async move {
        let _turn = turn;
        // `peek`, not `readable`: a fresh socket may be reported readable before any byte came.
        let mut first = [0u8; 1];
        if !matches!(
            tokio::time::timeout(wait, tcp.peek(&mut first)).await,
            Ok(Ok(1))
        ) {
            return;
        }
        let answer = ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                TOO_MANY_CONNECTIONS,
                format!("this node holds {cap} connections, its most (api.max_connections)"),
            )
        };
        if let Err(e) = events::refuse(tcp, answer).await {
            tracing::debug!(%remote, error = %e, "answering a connection above the cap failed");
        }
    });
}

/// The error code of a connection refused above `api.max_connections`.
const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

/// One accepted connection and what serving it needs.
struct Connection<S> {
    service: S,
    http: hyper::server::conn::http1::Builder,
    options: ServeOptions,
    remote: SocketAddr,
    /// Becomes true when the listener stops.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl<S: Routes> Connection<S> {
    /// Serves the connection until it closes: its first request decides whether it is an
    /// event stream (answered by [`events`]) or goes to hyper.
    async fn run<IO>(self, mut io: IO, watcher: hyper_util::server::graceful::Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = self.options.name;
        let remote = self.remote;
        let first = match self.options.event_stream_path {
            None => events::FirstHead::Other(Bytes::new()),
            Some(path) => {
                let head = events::read_first_head(&mut io, path, self.options.max_header_bytes);
                let head = tokio::time::timeout(self.options.header_read_timeout, head);
                // A connection still waiting for its first request is closed at once on stop,
                // as hyper closes an idle one.
                let mut stopping = self.stopping.clone();
                let read = tokio::select! {
                    read = head => read,
                    _ = stopping.wait_for(|s| *s) => return,
                };
                match read {
                    Ok(Ok(first)) => first,
                    Ok(Err(e)) => {
                        tracing::debug!(listener = name, %remote, error = %e, "reading the first request failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, %remote, "no request head within the header timeout");
                        return;
                    }
                }
            }
        };
        // Each way is boxed so that a connection's task holds only the state of the one
        // it takes: an idle event stream should cost its subscriber as little as possible.
        let served = match first {
            events::FirstHead::Closed => return,
            events::FirstHead::TooLarge => {
                // Answered and closed here: a stop need not wait for its drain.
                drop(watcher);
                Box::pin(events::refuse_large_head(io, self.options.max_header_bytes))
                    .await
                    .map_err(|e| e.to_string())
            }
            events::FirstHead::Stream(req) => {
                let mut req = *req;
                req.extensions_mut().insert(ClientAddr(remote));
                let timeout = self.options.request_timeout;
                Box::pin(events::serve_stream(io, req, self.service, timeout))
                    .await
                    .map_err(|e| e.to_string())
            }
            events::FirstHead::Other(prefix) => {
                Box::pin(self.serve_http(events::Rewind::new(prefix, io), watcher))
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = served {
            tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error");
        }
    }

    /// Serves the connection's requests with hyper.
    async fn serve_http<IO>(
        self,
        io: IO,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> Result<(), hyper::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            service,
            http,
            options,
            remote,
            ..
        } = self;
        let request_timeout = options.request_timeout;
        let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(remote));
            let answer = service.clone().call(req);
            async move {
                match request_timeout {
                    None => answer.await,
                    Some(limit) => match tokio::time::timeout(limit, answer).await {
                        Ok(r) => r,
                        Err(_) => Ok(timed_out(limit)),
                    },
                }
            }
        });
        watcher
            .watch(http.serve_connection(TokioIo::new(io), hyper_service))
            .await
    }
}

/// The answer to a request not answered within `api.request_timeout_ms`.
fn timed_out(limit: Duration) -> Response {
    warp::Reply::into_response(ApiError::new(
        hyper::StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request was not read and answered within {} ms",
            limit.as_millis()
        ),
    ))
}
