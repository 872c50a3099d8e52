//! Who may do what: the cluster secret that guards the Raft listener, `/join` and every admin
//! or internal route, and the throttled log of refused attempts.
//!
//! The secret travels in [`SECRET_HEADER`] on every request one node sends another (the
//! shared [`crate::network::HttpClient`] adds it). It is compared through its SHA-256 digest
//! ([`sha256::matches`]), so the comparison takes the same time whatever was presented.

pub mod rate;
pub mod sha256;
pub mod tokens;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use crate::api::ApiError;
use crate::config::{Config, ConfigError};
use crate::tls::Tls;
use tokens::{Token, Tokens};

/// The cookie that may carry a client token, for clients that cannot set headers
/// (a browser's `EventSource`).
pub const TOKEN_COOKIE: &str = "chatraftd_token";

/// The header that carries the cluster secret between nodes.
pub const SECRET_HEADER: &str = "x-chatraftd-cluster-secret";

/// The shortest secret accepted: 16 bytes is already beyond guessing; `openssl rand -hex 32`
/// gives 64 characters.
const MIN_SECRET_LEN: usize = 16;

/// A refused attempt is logged at most this often (per kind); the rest are counted and the
/// count is given in the next line, so a flood cannot fill the journal.
const DENY_LOG_EVERY: Duration = Duration::from_secs(5);

/// The cluster secret as read from its file.
pub struct ClusterSecret {
    /// Sent to peers in [`SECRET_HEADER`]; never logged.
    value: String,
    digest: [u8; 32],
}

impl ClusterSecret {
    /// Reads and checks the secret file: a regular file, mode 0600 or stricter, owned by the
    /// user running the daemon or by root (any owner when root runs it), holding at
    /// least 16 bytes after trimming white space at the ends.
    pub fn load(path: &Path) -> Result<ClusterSecret, String> {
        let shown = path.display();
        let meta =
            std::fs::metadata(path).map_err(|e| format!("{shown}: cannot read the file: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown}: is not a regular file"));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown}: mode {mode:04o} lets other users read the secret; run `chmod 600 {shown}`"
            ));
        }
        let euid = nix::unistd::geteuid().as_raw();
        // Root may check a file owned by the daemon's user (`sudo chatraftd --check-config`);
        // the daemon itself, under its own user, still needs the file to be its own or root's.
        if euid != 0 && meta.uid() != euid && meta.uid() != 0 {
            return Err(format!(
                "{shown}: is owned by uid {}, not by the user running chatraftd (uid {euid})",
                meta.uid()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{shown}: cannot read the file: {e}"))?;
        let value = text.trim();
        if value.len() < MIN_SECRET_LEN {
            return Err(format!(
                "{shown}: the secret must be at least {MIN_SECRET_LEN} characters (try `openssl rand -hex 32`)"
            ));
        }
        if value.chars().any(|c| c.is_control() || c == ' ') || !value.is_ascii() {
            return Err(format!(
                "{shown}: the secret must be printable ASCII without spaces (it travels in an HTTP header)"
            ));
        }
        Ok(ClusterSecret {
            value: value.to_string(),
            digest: sha256::sha256(value.as_bytes()),
        })
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        sha256::matches(presented, &self.digest)
    }
}

/// What a node enforces; shared by both listeners and the outgoing client.
pub struct Security {
    /// `None` only with `security.allow_insecure_cluster = true`.
    secret: Option<ClusterSecret>,
    /// The tokens file; `None` when client tokens are off.
    tokens_path: Option<PathBuf>,
    /// Its current contents, swapped whole by a reload.
    tokens: RwLock<Option<Arc<Tokens>>>,
    deny_log: DenyLog,
    /// Certificates and keys, loaded once at start.
    tls: Tls,
}

/// What a client request may do.
#[derive(Debug, Clone)]
pub enum Access {
    /// Everything: tokens are off, or the request carries the cluster secret (another node
    /// forwarding a client's request it has checked already, or an operator).
    Full,
    Token(Token),
}

impl Access {
    /// 403 unless the token may read `conv_id`.
    pub fn check_read(&self, conv_id: &str) -> Result<(), ApiError> {
        match self {
            Access::Full => Ok(()),
            Access::Token(t) if !t.read => Err(forbidden(&t.name, "may not read")),
            Access::Token(t) if !t.may_use(conv_id) => Err(forbidden(
                &t.name,
                &format!("may not use conversation {conv_id:?}"),
            )),
            Access::Token(_) => Ok(()),
        }
    }

    /// 403 unless the token may write to `conv_id` as `sender`.
    pub fn check_write(&self, conv_id: &str, sender: &str) -> Result<(), ApiError> {
        match self {
            Access::Full => Ok(()),
            Access::Token(t) if !t.write => Err(forbidden(&t.name, "may not write")),
            Access::Token(t) if !t.may_use(conv_id) => Err(forbidden(
                &t.name,
                &format!("may not use conversation {conv_id:?}"),
            )),
            Access::Token(t) => match &t.sender {
                Some(bound) if bound != sender => {
                    Err(forbidden(&t.name, &format!("may only send as {bound:?}")))
                }
                _ => Ok(()),
            },
        }
    }

    /// Whether a listing may show `conv_id`.
    pub fn sees(&self, conv_id: &str) -> bool {
        match self {
            Access::Full => true,
            Access::Token(t) => t.read && t.may_use(conv_id),
        }
    }
}

fn forbidden(name: &str, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("token {name:?} {what}"),
    )
}

impl Security {
    /// Loads what `config` (read from the file `source`) names. Errors name the config
    /// file, the key and the file the key names.
    pub fn load(config: &Config, source: &str) -> Result<Security, ConfigError> {
        let key_error = |key: &str, message: String| ConfigError {
            source: source.into(),
            key: key.into(),
            message,
        };
        let s = &config.security;
        let secret = if s.cluster_secret_file.is_empty() {
            None
        } else {
            Some(
                ClusterSecret::load(Path::new(&s.cluster_secret_file))
                    .map_err(|m| key_error("security.cluster_secret_file", m))?,
            )
        };
        let tokens_path = (!s.tokens_file.is_empty()).then(|| PathBuf::from(&s.tokens_file));
        let tokens = match &tokens_path {
            None => None,
            Some(p) => Some(Arc::new(
                Tokens::load(p).map_err(|m| key_error("security.tokens_file", m))?,
            )),
        };
        let tls = Tls::load(&config.tls, source)?;
        Ok(Security {
            secret,
            tokens_path,
            tokens: RwLock::new(tokens),
            deny_log: DenyLog::default(),
            tls,
        })
    }

    /// No checks at all: for tests of other parts.
    pub fn open() -> Security {
        Security {
            secret: None,
            tokens_path: None,
            tokens: RwLock::new(None),
            deny_log: DenyLog::default(),
            tls: Tls::off(),
        }
    }

    /// The TLS settings of both listeners and of the node's client.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// Re-reads the tokens file (on SIGHUP). A file that does not load is reported and the
    /// tokens in use stay.
    pub fn reload_tokens(&self) {
        let Some(path) = &self.tokens_path else {
            return;
        };
        match Tokens::load(path) {
            Ok(t) => {
                tracing::info!(tokens = t.len(), path = %path.display(), "reload: tokens file applied");
                *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(t));
            }
            Err(e) => {
                tracing::error!(error = %e, "reload: tokens file not applied; the old tokens stay")
            }
        }
    }

    /// What a client request may do: 401 when tokens are on and it presents none that is
    /// known. The token comes from `Authorization: Bearer ...` or the [`TOKEN_COOKIE`] cookie.
    pub fn access(
        &self,
        headers: &HeaderMap,
        remote: Option<SocketAddr>,
    ) -> Result<Access, ApiError> {
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(tokens) = tokens else {
            return Ok(Access::Full);
        };
        if self.secret.is_some() && self.is_peer(headers) {
            return Ok(Access::Full);
        }
        let presented = presented_token(headers);
        let reason = match presented.as_deref().map(|p| tokens.find(p.as_bytes())) {
            Some(Some(t)) => return Ok(Access::Token(t.clone())),
            Some(None) => "unknown client token",
            None => "no client token",
        };
        self.deny_log.note("client API", reason, remote);
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{reason}: send `Authorization: Bearer TOKEN` (or the {TOKEN_COOKIE} cookie)"),
        ))
    }

    /// The secret to send to peers, when there is one.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.secret.as_ref().map(ClusterSecret::value)
    }

    /// True when the request carries the cluster secret, or when no secret is configured.
    pub fn is_peer(&self, headers: &HeaderMap) -> bool {
        match &self.secret {
            None => true,
            Some(s) => headers
                .get(SECRET_HEADER)
                .is_some_and(|v| s.accepts(v.as_bytes())),
        }
    }

    /// True when a cluster secret is configured and the request carries it.
    pub fn is_secret_holder(&self, headers: &HeaderMap) -> bool {
        self.secret.is_some() && self.is_peer(headers)
    }

    /// Refuses a request without the cluster secret with 401, and logs it (throttled).
    pub fn require_peer(
        &self,
        headers: &HeaderMap,
        what: &str,
        remote: Option<SocketAddr>,
    ) -> Result<(), ApiError> {
        if self.is_peer(headers) {
            return Ok(());
        }
        let reason = if headers.contains_key(SECRET_HEADER) {
            "wrong cluster secret"
        } else {
            "no cluster secret"
        };
        self.deny_log.note(what, reason, remote);
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{what} needs the cluster secret in the {SECRET_HEADER} header"),
        ))
    }
}

/// The client a per-address limit counts `ip` as: an IPv4 address alone (also when it comes
/// IPv4-mapped), an IPv6 address by its /64 prefix, the smallest block one subscriber is
/// handed, so that a client cannot escape the limits by changing the low bits of its address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// How a message names the client [`client_key`] made.
pub fn client_label(key: IpAddr) -> String {
    match key {
        IpAddr::V4(_) => key.to_string(),
        IpAddr::V6(_) => format!("{key}/64"),
    }
}

/// Paths only members of the cluster and its operators may use: membership changes, routes
/// between nodes, and anything under the cluster and admin prefixes (routes added there later
/// are covered without being listed).
pub fn is_admin_path(path: &str) -> bool {
    // `/metrics` names conversations and counts their traffic: for the cluster's operators only.
    const EXACT: &[&str] = &["/join", "/leave", "/metrics"];
    const PREFIXES: &[&str] = &["/api/v1/internal/", "/api/v1/cluster/", "/api/v1/admin/"];
    EXACT.contains(&path.trim_end_matches('/')) || PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The token a request presents: `Authorization: Bearer TOKEN`, else the [`TOKEN_COOKIE`]
/// cookie.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(warp::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    headers
        .get_all(warp::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == TOKEN_COOKIE).then(|| v.to_string())
        })
}

/// Client paths that need a token when tokens are on, and whether a POST there writes.
fn is_client_path(path: &str) -> bool {
    const CLIENT: &[&str] = &[
        "/api/v1/message",
        "/api/v1/messages",
        "/api/v1/stream",
        "/api/v1/conversations",
        "/api/v1/status",
        "/api/v1/cluster",
    ];
    CLIENT.contains(&path.trim_end_matches('/'))
}

/// Passes every request, except that an admin path ([`is_admin_path`]) needs the cluster
/// secret, and, when client tokens are on, a client path needs a token with the read scope
/// (GET) or the write scope (other methods): 401 without a known token, 403 without the
/// scope. Conversation and sender limits are checked by the handlers, which know them.
/// Put in front of all API routes.
pub fn guard(
    security: Arc<Security>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::path::full()
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(crate::serve::client_addr())
        .and_then(
            move |path: warp::path::FullPath,
                  method: warp::http::Method,
                  headers: HeaderMap,
                  remote: Option<SocketAddr>| {
                let security = security.clone();
                async move {
                    let path = path.as_str();
                    if is_admin_path(path) {
                        security
                            .require_peer(&headers, path, remote)
                            .map_err(warp::reject::custom)?;
                    } else if is_client_path(path) {
                        let access = security
                            .access(&headers, remote)
                            .map_err(warp::reject::custom)?;
                        if let Access::Token(t) = access {
                            let (ok, what) = if method == warp::http::Method::GET {
                                (t.read, "may not read")
                            } else {
                                (t.write, "may not write")
                            };
                            if !ok {
                                return Err(warp::reject::custom(forbidden(&t.name, what)));
                            }
                        }
                    }
                    Ok::<_, warp::Rejection>(())
                }
            },
        )
        .untuple_one()
}

/// Needs the cluster secret on every request (the Raft listener).
pub fn peer_only(
    security: Arc<Security>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::headers_cloned()
        .and(crate::serve::client_addr())
        .and_then(move |headers: HeaderMap, remote: Option<SocketAddr>| {
            let security = security.clone();
            async move {
                security
                    .require_peer(&headers, "Raft RPC", remote)
                    .map_err(warp::reject::custom)
            }
        })
        .untuple_one()
}

/// Logs refused requests at most once per [`DENY_LOG_EVERY`], with how many were not logged.
#[derive(Default)]
struct DenyLog {
    /// When the last line was written, and how many refusals came since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl DenyLog {
    fn note(&self, what: &str, reason: &str, remote: Option<SocketAddr>) {
        let suppressed = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if st.0.is_some_and(|t| now.duration_since(t) < DENY_LOG_EVERY) {
                st.1 += 1;
                return;
            }
            let n = st.1;
            *st = (Some(now), 0);
            n
        };
        let from = remote.map_or("unknown".to_string(), |a| a.to_string());
        tracing::warn!(
            what,
            reason,
            from = %from,
            suppressed,
            "refused a request: {reason} ({suppressed} more refusals not logged since the last line)"
        );
    }
}

/// Makes `path` hold a fresh random cluster secret (64 hex digits from the kernel's random
/// source), mode 0600, unless it exists already: a restarted local cluster keeps its secret.
/// Used by `local-cluster` and by the test and benchmark tools that start their own clusters.
pub fn ensure_secret_file(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("10.0.0.1"), key("::ffff:10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(client_label(key("2001:db8:1:2:aa::1")), "2001:db8:1:2::/64");
        assert_eq!(client_label(key("::ffff:10.0.0.1")), "10.0.0.1");
    }
    use std::os::unix::fs::PermissionsExt;

    fn secret_file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn secret_file_is_checked() {
        let good = secret_file("0123456789abcdef0123\n", 0o600);
        let s = ClusterSecret::load(good.path()).unwrap();
        assert_eq!(s.value(), "0123456789abcdef0123");
        assert!(s.accepts(b"0123456789abcdef0123"));
        assert!(!s.accepts(b"0123456789abcdef012"));
        let e = ClusterSecret::load(secret_file("0123456789abcdef0123", 0o644).path())
            .err()
            .unwrap();
        assert!(e.contains("chmod 600"), "{e}");
        let e = ClusterSecret::load(secret_file("short", 0o600).path())
            .err()
            .unwrap();
        assert!(e.contains("at least 16"), "{e}");
        let e = ClusterSecret::load(Path::new("/nonexistent/secret"))
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/secret"), "{e}");
    }

    #[test]
    fn admin_paths() {
        for p in [
            "/join",
            "/join/",
            "/leave",
            "/api/v1/internal/read-index",
            "/api/v1/cluster/nodes/3",
            "/api/v1/admin/backup",
        ] {
            assert!(is_admin_path(p), "{p}");
        }
        for p in [
            "/api/v1/cluster",
            "/api/v1/clusterx",
            "/api/v1/message",
            "/api/v1/status",
            "/joined",
            "/",
        ] {
            assert!(!is_admin_path(p), "{p}");
        }
    }

    #[test]
    fn peers_need_the_secret() {
        let f = secret_file("0123456789abcdef0123", 0o600);
        let sec = Security {
            secret: Some(ClusterSecret::load(f.path()).unwrap()),
            ..Security::open()
        };
        let mut h = HeaderMap::new();
        assert_eq!(
            sec.require_peer(&h, "test", None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        h.insert(
            SECRET_HEADER,
            "wrong-secret-of-some-length".parse().unwrap(),
        );
        assert!(sec.require_peer(&h, "test", None).is_err());
        h.insert(SECRET_HEADER, "0123456789abcdef0123".parse().unwrap());
        assert!(sec.require_peer(&h, "test", None).is_ok());
        assert!(Security::open().is_peer(&HeaderMap::new()));
    }
}
