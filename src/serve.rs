//! The HTTP/1.1 server both listeners run: an accept loop of our own around hyper, so a node
//! controls what warp's built-in server does not: TLS, the request head's size, how long a
//! client may take to send it (which also ends idle kept-alive connections), how long a
//! request may take to be answered, and the client's address as the routes see it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use warp::Filter;

use crate::api::ApiError;

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
    /// The largest request head; hyper answers 431 above it.
    pub max_header_bytes: usize,
    /// Names the listener in logs.
    pub name: &'static str,
    /// After `stop`, how long open connections may take to finish their requests before
    /// they are closed (an event stream to a client that stopped reading never finishes).
    pub drain: Duration,
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
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    stop: impl Future<Output = ()>,
) where
    S: Service<hyper::Request<Incoming>, Response = warp::reply::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that none outlives the listener.
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_header_size(options.max_header_bytes);
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
        let service = service.clone();
        let request_timeout = options.request_timeout;
        let hyper_service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(remote));
            let answer = service.clone().call(req);
            async move {
                match request_timeout {
                    None => answer.await,
                    Some(limit) => match tokio::time::timeout(limit, answer).await {
                        Ok(r) => r,
                        Err(_) => Ok(warp::Reply::into_response(ApiError::new(
                            hyper::StatusCode::REQUEST_TIMEOUT,
                            "request_timeout",
                            format!(
                                "the request was not read and answered within {} ms",
                                limit.as_millis()
                            ),
                        ))),
                    },
                }
            }
        });
        let watcher = graceful.watcher();
        let http = http.clone();
        let tls = options.tls.clone();
        let handshake_timeout = options.header_read_timeout;
        let name = options.name;
        connections.spawn(async move {
            let served = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(tcp), hyper_service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(listener = name, %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(listener = name, %remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), hyper_service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
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
