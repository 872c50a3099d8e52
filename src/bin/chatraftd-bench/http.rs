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
