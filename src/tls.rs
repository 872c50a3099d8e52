//! TLS with rustls: HTTPS on the client API, mutual TLS between peers on the Raft listener,
//! and the client side of both for the node's one HTTP client.
//!
//! One cluster CA signs every node's certificate. The Raft listener asks every caller for a
//! certificate chaining to that CA, and a node checks every peer it calls against the same
//! CA, so a stranger, a plaintext peer, a certificate from another CA or an expired one fails
//! the handshake before a byte of HTTP is read.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ConfigError, TlsConfig};

/// What a node's TLS settings load into.
#[derive(Clone)]
pub struct Tls {
    /// Accepts HTTPS on the client API; `None` with `tls.api = false`.
    pub api: Option<TlsAcceptor>,
    /// Accepts mutual TLS on the Raft listener; `None` with `tls.raft = false`.
    pub raft: Option<TlsAcceptor>,
    /// Calls peers: trusts the cluster CA and presents this node's certificate.
    pub client: Option<Arc<ClientConfig>>,
}

impl Tls {
    /// No TLS anywhere.
    pub fn off() -> Tls {
        Tls {
            api: None,
            raft: None,
            client: None,
        }
    }

    /// Loads what `config` names. Errors name the config file (`source`), the key and the
    /// file the key names.
    pub fn load(config: &TlsConfig, source: &str) -> Result<Tls, ConfigError> {
        if !config.raft && !config.api {
            return Ok(Tls::off());
        }
        let key_error = |key: &str, message: String| ConfigError {
            source: source.into(),
            key: key.into(),
            message,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(
            load_roots(Path::new(&config.ca_file)).map_err(|m| key_error("tls.ca_file", m))?,
        );
        let certs =
            load_certs(Path::new(&config.cert_file)).map_err(|m| key_error("tls.cert_file", m))?;
        let key =
            load_key(Path::new(&config.key_file)).map_err(|m| key_error("tls.key_file", m))?;
        // The node's key does not belong to its certificate.
        let misfit = |e: rustls::Error| {
            key_error(
                "tls.key_file",
                format!("{} does not fit {}: {e}", config.key_file, config.cert_file),
            )
        };

        let raft = if config.raft {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| key_error("tls.ca_file", format!("{}: {e}", config.ca_file)))?;
            let server = server_builder(&provider)
                .map_err(|m| key_error("tls.raft", m))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())
                .map_err(misfit)?;
            Some(TlsAcceptor::from(Arc::new(server)))
        } else {
            None
        };

        let api = if config.api {
            let (api_certs, api_key, key_name) = if config.api_cert_file.is_empty() {
                (certs.clone(), key.clone_key(), "tls.key_file")
            } else {
                let c = load_certs(Path::new(&config.api_cert_file))
                    .map_err(|m| key_error("tls.api_cert_file", m))?;
                let k = load_key(Path::new(&config.api_key_file))
                    .map_err(|m| key_error("tls.api_key_file", m))?;
                (c, k, "tls.api_key_file")
            };
            let server = server_builder(&provider)
                .map_err(|m| key_error("tls.api", m))?
                .with_no_client_auth()
                .with_single_cert(api_certs, api_key)
                .map_err(|e| key_error(key_name, format!("does not fit its certificate: {e}")))?;
            Some(TlsAcceptor::from(Arc::new(server)))
        } else {
            None
        };

        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| key_error("tls.raft", e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(misfit)?;
        Ok(Tls {
            api,
            raft,
            client: Some(Arc::new(client)),
        })
    }
}

fn server_builder(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, String> {
    ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
}

/// The CA certificates in a PEM file; at least one.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The certificates in a PEM file, in file order; at least one.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A client-side TLS configuration that trusts the CAs in `ca_file` and presents no
/// certificate: for the operator's commands talking to an HTTPS API.
pub fn client_trusting(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let roots = load_roots(ca_file)?;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens TCP connections for the HTTP client and, for `https://` URIs, runs the TLS
/// handshake on them, checking the server's name against the URI's host.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl Connector {
    pub fn new(mut http: HttpConnector, tls: Option<Arc<ClientConfig>>) -> Self {
        http.enforce_http(false);
        Connector {
            http,
            tls: tls.map(TlsConnector::from),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let tls = self.tls.clone();
        let connecting = self.http.call(uri.clone());
        Box::pin(async move {
            let tcp = connecting.await?;
            if !https {
                return Ok(Conn::Plain(tcp));
            }
            let tls = tls.ok_or("an https:// address needs TLS settings (a CA to trust)")?;
            let host = uri
                .host()
                .ok_or("the address has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp.into_inner()).await?;
            Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// A client connection, with or without TLS.
pub enum Conn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(s) => s.connected(),
            Conn::Tls(_) => Connected::new(),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}
