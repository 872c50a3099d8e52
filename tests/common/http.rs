//! A small HTTP/1.1 client for the tests: one shared keep-alive hyper client, every request
//! bounded by a timeout, every answer returned whole as (status, headers, body).

use std::time::Duration;

use bytes::Bytes;
use chatraftd::tls::Connector;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The longest any single request may take before the test calls it a failure. Writes wait
/// at most `api.write_timeout_ms` (a few seconds in the test configs), so this is generous.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A whole HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn code(&self) -> u16 {
        self.status.as_u16()
    }

    /// The body as JSON; panics with the raw body when it is not JSON, since every answer of
    /// the API is documented to be JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `error.code` of an error answer, when the body has one.
    pub fn error_code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v.pointer("/error/code")?.as_str().map(str::to_owned)
    }

    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }
}

/// Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Http {
    client: Client<Connector, Full<Bytes>>,
    /// `http` or `https`.
    scheme: &'static str,
    /// Sent with every request, before the request's own headers.
    default_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self::with_tls(None)
    }

    /// A client that speaks HTTPS with `tls` (plain HTTP with `None`).
    pub fn with_tls(tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = Client::builder(TokioExecutor::new())
            // A killed node leaves dead pooled connections behind; keep the pool short-lived so
            // a restarted node on the same port is reached on a fresh connection. Below the
            // daemon's shortest header read timeout, so an idle connection is never reused
            // just as the node closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(Connector::new(connector, tls));
        Http {
            client,
            scheme,
            default_headers: Vec::new(),
        }
    }

    /// The same client (same pool), sending `name: value` with every request too.
    pub fn with_header(&self, name: &str, value: &str) -> Http {
        let mut h = self.clone();
        h.default_headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(value).expect("a valid header value"),
        ));
        h
    }

    /// Sends one request and reads the whole answer. `Err` means no HTTP answer at all
    /// (refused, reset, timed out), which tests treat as "not acknowledged".
    pub async fn request(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response, String> {
        let uri = format!("{}://{addr}{path}", self.scheme);
        let mut builder = Request::builder().method(method.clone()).uri(&uri);
        for (k, v) in &self.default_headers {
            builder = builder.header(k, v);
        }
        for (k, v) in headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            let value = HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?;
            builder = builder.header(name, value);
        }
        let req = builder
            .body(Full::new(body.into()))
            .map_err(|e| format!("{method} {uri}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{method} {uri}: {e:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{method} {uri}: reading body: {e}"))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{method} {uri}: no answer within {REQUEST_TIMEOUT:?}"
            )),
        }
    }

    pub async fn get(&self, addr: &str, path: &str) -> Result<Response, String> {
        self.request(Method::GET, addr, path, &[], Bytes::new())
            .await
    }

    /// POSTs `value` as `application/json`.
    pub async fn post_json(
        &self,
        addr: &str,
        path: &str,
        value: &Value,
    ) -> Result<Response, String> {
        let body = serde_json::to_vec(value).expect("a serde_json::Value always serializes");
        self.post_raw(addr, path, "application/json", body).await
    }

    /// POSTs bytes as they are, with the given content type.
    pub async fn post_raw(
        &self,
        addr: &str,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response, String> {
        self.request(
            Method::POST,
            addr,
            path,
            &[(CONTENT_TYPE.as_str(), content_type)],
            body,
        )
        .await
    }

    /// Starts a GET and hands back the head and the still-open body; used by the SSE reader.
    pub(crate) async fn open_stream(
        &self,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(hyper::http::response::Parts, hyper::body::Incoming), String> {
        let uri = format!("{}://{addr}{path}", self.scheme);
        let mut builder = Request::builder().method(Method::GET).uri(&uri);
        for (k, v) in &self.default_headers {
            builder = builder.header(k, v);
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("GET {uri}: no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("GET {uri}: {e:?}"))?;
        Ok(resp.into_parts())
    }
}
