//! Configuration: a TOML file read with figment, overridden by `CHATRAFTD_*` environment
//! variables, then validated into a typed [`Config`].
//!
//! Every error names the file (or variable) and the key, so an operator knows what to edit.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// The highest `api.max_connections`: far above any open-file limit, and within what a
/// semaphore can count.
pub const MAX_CONNECTIONS: usize = 1 << 24;

/// The shortest `api.header_read_timeout_ms`: above the time nodes keep idle connections to
/// each other, so a node never reuses a connection its peer is closing.
const MIN_HEADER_READ_TIMEOUT_MS: u64 = 5_000;

/// The default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/chatraftd/chatraftd.toml";
/// Environment variables with this prefix override file keys; `__` separates table and key
/// (`CHATRAFTD_API__LISTEN=0.0.0.0:8081`).
pub const ENV_PREFIX: &str = "CHATRAFTD_";
/// Names the config file when `--config` is not given.
pub const ENV_CONFIG_PATH: &str = "CHATRAFTD_CONFIG";

/// The whole configuration of one node, as read from the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id: unique in the cluster, never reused for another data dir.
    pub node_id: NodeId,
    /// Where the Raft log, the message store and snapshots live.
    pub data_dir: PathBuf,
    /// Start a new one-node cluster when the data dir holds no state.
    pub bootstrap: bool,
    /// API addresses (`host:port`) of members to join through when the data dir holds no state.
    pub join: Vec<String>,
    pub api: ApiConfig,
    pub raft: RaftConfig,
    pub limits: Limits,
    pub security: SecurityConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the client API listens on.
    pub listen: String,
    /// Address other nodes and clients use to reach the API; defaults to `listen`.
    pub advertise: String,
    /// How long a write may wait for a leader and a commit before it fails with 503.
    pub write_timeout_ms: u64,
    /// Interval of keep-alive comments on idle event streams.
    pub sse_keepalive_secs: u64,
    /// A client must send a request's whole head (request line and headers) within this time
    /// of starting it, or of the previous answer on a kept-alive connection; else the
    /// connection is closed. Slow or idle clients cannot hold connections forever.
    pub header_read_timeout_ms: u64,
    /// A request's body must be read and its answer begun within this time (408 after it).
    /// Event streams count only until their first byte.
    pub request_timeout_ms: u64,
    /// The largest request head (request line and all headers) accepted (431 above it).
    pub max_header_bytes: usize,
    /// Client connections held open at once (event streams included); a connection above it
    /// is answered `503 too_many_connections` and closed. Keeps a flood of idle connections
    /// from using up the process's file descriptors, which Raft and SQLite need too.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    /// Address the Raft RPC listener binds.
    pub listen: String,
    /// Address peers use to reach this node's Raft listener; defaults to `listen`.
    pub advertise: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log behind it) after this many applied entries.
    pub snapshot_threshold: u64,
    /// Also build a snapshot once this many messages were stored since the last one, or as
    /// many as it holds, whichever is more (0: entries alone decide).
    pub snapshot_threshold_messages: u64,
    /// Keep this many log entries behind the last snapshot, so a briefly lagging follower
    /// catches up from the log instead of a full snapshot.
    pub keep_logs_after_snapshot: u64,
    /// The most entries sent in one append-entries request.
    pub max_payload_entries: u64,
    /// How long the leader waits for each snapshot chunk's answer; the last one's answer
    /// comes after the follower installed the whole snapshot.
    pub install_snapshot_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest request body accepted (413 above it).
    pub max_body_bytes: u64,
    /// The largest `payload` accepted, in bytes of UTF-8 (413 above it).
    pub max_payload_bytes: usize,
    /// The longest `sender`, in bytes.
    pub max_sender_bytes: usize,
    /// The most entries in a `vector_clock`.
    pub max_vector_clock_entries: usize,
    /// The largest page `GET /api/v1/messages` returns.
    pub max_page: usize,
    /// Writes per second each client address may send (429 above it).
    pub write_rate_per_sec: u32,
    /// Writes a client address may send at once after a pause.
    pub write_burst: u32,
    /// `/join` refuses a new node when the cluster has this many members.
    pub max_cluster_size: usize,
    /// Event-stream subscribers this node serves at once (503 above it).
    pub max_subscribers: usize,
    /// Event-stream subscribers one client address may hold at once (503 above it).
    pub max_subscribers_per_address: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// A file holding the shared cluster secret, which every Raft RPC, `/join` and every
    /// admin or internal route must present. Mode 0600 or stricter; checked at start.
    pub cluster_secret_file: String,
    /// Lets a node run without a cluster secret: anyone who reaches its ports can then join
    /// the cluster or forge Raft traffic. Off unless set on purpose.
    pub allow_insecure_cluster: bool,
    /// A TOML file of client tokens (hashed); empty: the client API needs no token.
    /// Re-read on SIGHUP.
    pub tokens_file: String,
}

/// TLS with certificates and keys in PEM files. One cluster CA signs every node's certificate;
/// peers check each other against it in both directions on the Raft listener (mutual TLS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Mutual TLS on the Raft listener and on every Raft RPC this node sends.
    pub raft: bool,
    /// HTTPS on the client API. Nodes then also reach each other's API over HTTPS.
    pub api: bool,
    /// The cluster CA: peers' certificates (and their API certificates) must chain to it.
    pub ca_file: String,
    /// This node's certificate chain, leaf first, valid for its advertised Raft host.
    pub cert_file: String,
    /// The private key of `cert_file`.
    pub key_file: String,
    /// The API's certificate chain; empty: `cert_file`. Must chain to `ca_file` too, since
    /// nodes forward requests to each other's API.
    pub api_cert_file: String,
    /// The private key of `api_cert_file`; empty: `key_file`.
    pub api_key_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `chatraftd=debug,openraft=info`, ...
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            data_dir: PathBuf::from("/var/lib/chatraftd"),
            bootstrap: false,
            join: Vec::new(),
            api: ApiConfig {
                listen: "127.0.0.1:8081".into(),
                advertise: String::new(),
                write_timeout_ms: 5_000,
                sse_keepalive_secs: 15,
                header_read_timeout_ms: 10_000,
                request_timeout_ms: 30_000,
                max_header_bytes: 16 * 1024,
                max_connections: 30_000,
            },
            raft: RaftConfig {
                listen: "127.0.0.1:12001".into(),
                advertise: String::new(),
                heartbeat_interval_ms: 250,
                election_timeout_min_ms: 1_000,
                election_timeout_max_ms: 2_000,
                snapshot_threshold: 50_000,
                snapshot_threshold_messages: 100_000,
                keep_logs_after_snapshot: 1_000,
                max_payload_entries: 64,
                install_snapshot_timeout_ms: 10_000,
            },
            limits: Limits {
                max_body_bytes: 256 * 1024,
                max_payload_bytes: 64 * 1024,
                max_sender_bytes: 256,
                max_vector_clock_entries: 64,
                max_page: 1_000,
                write_rate_per_sec: 100,
                write_burst: 200,
                max_cluster_size: 9,
                max_subscribers: 20_000,
                max_subscribers_per_address: 256,
            },
            security: SecurityConfig {
                cluster_secret_file: "/etc/chatraftd/cluster-secret".into(),
                allow_insecure_cluster: false,
                tokens_file: String::new(),
            },
            tls: TlsConfig {
                raft: false,
                api: false,
                ca_file: String::new(),
                cert_file: String::new(),
                key_file: String::new(),
                api_cert_file: String::new(),
                api_key_file: String::new(),
            },
            log: LogConfig {
                level: "info".into(),
            },
        }
    }
}

/// A configuration problem, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or "environment") the bad value came from.
    pub source: String,
    /// The key as written in TOML (`api.listen`; a part that is not a bare key is quoted);
    /// empty when the problem is the file itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.source, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Resolves which file to read: `--config`, else `$CHATRAFTD_CONFIG`, else the default path.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_CONFIG_PATH) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

impl Config {
    /// Reads `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(file_error(&file, "is not a regular file")),
            Err(e) => return Err(file_error(&file, &format!("cannot read config file: {e}"))),
        }
        // Figment's Toml::file quietly yields nothing for an unreadable file: read it ourselves
        // so a permission problem is reported as one.
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_error(&file, &format!("cannot read config file: {e}")))?;
        Config::from_toml_str(&text, &file)
    }

    /// Parses `text` as the contents of the config file `file` (named in errors), applies
    /// environment overrides and validates the result: [`Config::load`] after the read.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__"));
        let config: Config = figment.extract().map_err(|e| from_figment(file, e))?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            source: file.to_string(),
            key: key.to_string(),
            message,
        };
        if self.node_id == 0 {
            return Err(err(
                "node_id",
                "must be set to a number from 1 up, unique in the cluster".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(err("data_dir", "must not be empty".into()));
        }
        let api_listen = parse_listen(&self.api.listen).map_err(|m| err("api.listen", m))?;
        let raft_listen = parse_listen(&self.raft.listen).map_err(|m| err("raft.listen", m))?;
        if api_listen == raft_listen {
            return Err(err(
                "raft.listen",
                format!("is the same address as api.listen ({api_listen})"),
            ));
        }
        check_advertise(&self.api.advertise, api_listen).map_err(|m| err("api.advertise", m))?;
        check_advertise(&self.raft.advertise, raft_listen).map_err(|m| err("raft.advertise", m))?;
        for (i, addr) in self.join.iter().enumerate() {
            check_host_port(addr).map_err(|m| err(&format!("join[{i}]"), m))?;
        }
        if self.bootstrap && !self.join.is_empty() {
            return Err(err("bootstrap", "a node either bootstraps a new cluster or joins one: set `bootstrap = false` or empty `join`".into()));
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err(err("raft.heartbeat_interval_ms", "must be above 0".into()));
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(err(
                "raft.election_timeout_min_ms",
                format!(
                    "must be above raft.heartbeat_interval_ms ({})",
                    r.heartbeat_interval_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(err(
                "raft.election_timeout_max_ms",
                format!(
                    "must be above raft.election_timeout_min_ms ({})",
                    r.election_timeout_min_ms
                ),
            ));
        }
        if r.snapshot_threshold == 0 {
            return Err(err("raft.snapshot_threshold", "must be above 0".into()));
        }
        if r.max_payload_entries == 0 {
            return Err(err("raft.max_payload_entries", "must be above 0".into()));
        }
        // Below a real install's time the leader would send the whole snapshot again on
        // every timeout and the follower would never catch up: keep it off small values.
        if r.install_snapshot_timeout_ms < r.election_timeout_max_ms {
            return Err(err(
                "raft.install_snapshot_timeout_ms",
                format!(
                    "must be at least raft.election_timeout_max_ms ({})",
                    r.election_timeout_max_ms
                ),
            ));
        }
        if self.api.write_timeout_ms == 0 {
            return Err(err("api.write_timeout_ms", "must be above 0".into()));
        }
        if self.api.sse_keepalive_secs == 0 {
            return Err(err("api.sse_keepalive_secs", "must be above 0".into()));
        }
        let a = &self.api;
        if a.header_read_timeout_ms < MIN_HEADER_READ_TIMEOUT_MS {
            return Err(err(
                "api.header_read_timeout_ms",
                format!("must be at least {MIN_HEADER_READ_TIMEOUT_MS}: nodes keep idle connections to each other for up to {} ms", crate::network::POOL_IDLE_MS),
            ));
        }
        if a.request_timeout_ms <= a.write_timeout_ms {
            return Err(err(
                "api.request_timeout_ms",
                format!(
                    "must be above api.write_timeout_ms ({}): a write may wait that long for its commit",
                    a.write_timeout_ms
                ),
            ));
        }
        if a.max_header_bytes < 1024 {
            return Err(err("api.max_header_bytes", "must be at least 1024".into()));
        }
        let l = &self.limits;
        if l.max_payload_bytes == 0 || l.max_sender_bytes == 0 || l.max_page == 0 {
            return Err(err(
                "limits",
                "max_payload_bytes, max_sender_bytes and max_page must be above 0".into(),
            ));
        }
        if l.write_rate_per_sec == 0 || l.write_burst == 0 || l.max_cluster_size == 0 {
            return Err(err(
                "limits",
                "write_rate_per_sec, write_burst and max_cluster_size must be above 0".into(),
            ));
        }
        if l.max_subscribers == 0 || l.max_subscribers_per_address == 0 {
            return Err(err(
                "limits",
                "max_subscribers and max_subscribers_per_address must be above 0".into(),
            ));
        }
        if self.api.max_connections > MAX_CONNECTIONS {
            return Err(err(
                "api.max_connections",
                format!("must be at most {MAX_CONNECTIONS}"),
            ));
        }
        if self.api.max_connections <= l.max_subscribers {
            return Err(err(
                "api.max_connections",
                format!(
                    "must be above limits.max_subscribers ({}): each event stream holds a connection, and writers need some too",
                    l.max_subscribers
                ),
            ));
        }
        if l.max_body_bytes < l.max_payload_bytes as u64 {
            return Err(err(
                "limits.max_body_bytes",
                "must be at least limits.max_payload_bytes".into(),
            ));
        }
        if self.security.cluster_secret_file.is_empty() && !self.security.allow_insecure_cluster {
            return Err(err(
                "security.cluster_secret_file",
                "is empty: without a cluster secret anyone who reaches this node can join the \
                 cluster or forge Raft traffic; name a secret file, or set \
                 `security.allow_insecure_cluster = true` to run without one on purpose"
                    .into(),
            ));
        }
        let t = &self.tls;
        if t.raft || t.api {
            for (key, value) in [
                ("tls.ca_file", &t.ca_file),
                ("tls.cert_file", &t.cert_file),
                ("tls.key_file", &t.key_file),
            ] {
                if value.is_empty() {
                    return Err(err(
                        key,
                        "must name a PEM file when tls.raft or tls.api is on".into(),
                    ));
                }
            }
        }
        if t.api_cert_file.is_empty() != t.api_key_file.is_empty() {
            return Err(err(
                "tls.api_key_file",
                "tls.api_cert_file and tls.api_key_file are set together or not at all".into(),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(err("log.level", format!("is not a valid filter: {e}")));
        }
        Ok(())
    }

    /// The address peers use for this node's Raft listener.
    pub fn raft_advertise(&self) -> String {
        non_empty_or(&self.raft.advertise, &self.raft.listen)
    }

    /// The address other nodes and clients use for this node's API.
    pub fn api_advertise(&self) -> String {
        non_empty_or(&self.api.advertise, &self.api.listen)
    }

    pub fn api_listen_addr(&self) -> SocketAddr {
        // validate() has parsed it already.
        parse_listen(&self.api.listen).expect("api.listen was validated")
    }

    pub fn raft_listen_addr(&self) -> SocketAddr {
        parse_listen(&self.raft.listen).expect("raft.listen was validated")
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.api.request_timeout_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.api.header_read_timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.api.write_timeout_ms)
    }
}

fn non_empty_or(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        a.to_string()
    }
}

fn file_error(file: &str, message: &str) -> ConfigError {
    ConfigError {
        source: file.to_string(),
        key: String::new(),
        message: message.to_string(),
    }
}

fn from_figment(file: &str, e: figment::Error) -> ConfigError {
    let (source, key) = match &e.metadata {
        Some(m) if m.name.contains("environment") => {
            let key = e.path.join(".");
            let var = if key.is_empty() {
                String::new()
            } else {
                format!(" {}{}", ENV_PREFIX, key.replace('.', "__").to_uppercase())
            };
            (format!("environment{var}"), key)
        }
        _ => (file.to_string(), toml_key(&e.path)),
    };
    // figment's own text repeats the key and source; keep just the reason.
    let message = e.kind.to_string();
    ConfigError {
        source,
        key,
        message,
    }
}

/// A key path as it is written in TOML: `api.listen`, but `""` or `"api.listen"` for a part
/// that is not a bare key, so an error about an odd key still shows which one.
fn toml_key(path: &[String]) -> String {
    let part = |p: &String| {
        let bare = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if bare {
            return p.clone();
        }
        let mut quoted = String::from("\"");
        for c in p.chars() {
            match c {
                '"' => quoted.push_str("\\\""),
                '\\' => quoted.push_str("\\\\"),
                c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
                c => quoted.push(c),
            }
        }
        quoted.push('"');
        quoted
    };
    path.iter().map(part).collect::<Vec<_>>().join(".")
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("`{s}` is not an IP address with a port (like 127.0.0.1:8081 or [::]:8081)")
    })
}

/// `host:port` where host is a name or an address and port is a number.
fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("`{s}` is not host:port (like node1.example.net:8081)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty()
        || host.contains(['/', ' ', '[', ']'])
        || port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    Ok(())
}

fn check_advertise(advertise: &str, listen: SocketAddr) -> Result<(), String> {
    if advertise.is_empty() {
        if listen.ip().is_unspecified() {
            return Err(format!(
                "must be set when the listen address is {listen}: peers cannot reach an unspecified address"
            ));
        }
        return Ok(());
    }
    check_host_port(advertise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Config::load(f.path())
    }

    const MINIMAL: &str = "node_id = 1\ndata_dir = \"/tmp/x\"\nbootstrap = true\n";

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = load_str(MINIMAL).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.api_advertise(), "127.0.0.1:8081");
        assert_eq!(c.raft_advertise(), "127.0.0.1:12001");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str(&format!("{MINIMAL}[api]\nlisten_addr = \"1.2.3.4:5\"\n")).unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        assert_eq!(e.key, "api.listen_addr");
    }

    #[test]
    fn bad_address_is_named() {
        let e = load_str(&format!("{MINIMAL}[raft]\nlisten = \"nonsense\"\n")).unwrap_err();
        assert_eq!(e.key, "raft.listen");
        let e = load_str(&format!("{MINIMAL}[api]\nlisten = \"0.0.0.0:8081\"\n")).unwrap_err();
        assert_eq!(e.key, "api.advertise");
    }

    #[test]
    fn odd_keys_are_named_as_written() {
        // A quoted key holding a dot is not the nested key it looks like; an empty key is
        // still a key.
        let e = load_str(&format!("{MINIMAL}\"api.listen\" = \"1.2.3.4:5\"\n")).unwrap_err();
        assert_eq!(e.key, r#""api.listen""#);
        let e = load_str(&format!("{MINIMAL}\"\" = 1\n")).unwrap_err();
        assert_eq!(e.key, r#""""#);
        assert!(e.to_string().contains(r#"key `""`"#), "{e}");
        let e = load_str(&format!("{MINIMAL}[api]\n\"a\\\"b\\u0001\" = 1\n")).unwrap_err();
        assert_eq!(e.key, r#"api."a\"b\u0001""#);
    }

    #[test]
    fn a_connection_cap_at_or_below_the_subscriber_cap_is_named() {
        let e = load_str(&format!(
            "{MINIMAL}[api]\nmax_connections = 100\n[limits]\nmax_subscribers = 100\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "api.max_connections");
        assert!(
            e.to_string().contains("limits.max_subscribers (100)"),
            "{e}"
        );
        let c = load_str(&format!(
            "{MINIMAL}[api]\nmax_connections = 101\n[limits]\nmax_subscribers = 100\n"
        ))
        .unwrap();
        assert_eq!(c.api.max_connections, 101);
        let e = load_str(&format!(
            "{MINIMAL}[api]\nmax_connections = 3000000000000000000\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "api.max_connections");
        assert!(e.to_string().contains("at most 16777216"), "{e}");
    }

    #[test]
    fn a_snapshot_timeout_below_the_election_timeout_is_named() {
        let e = load_str(&format!(
            "{MINIMAL}[raft]\nelection_timeout_max_ms = 3000\ninstall_snapshot_timeout_ms = 2999\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "raft.install_snapshot_timeout_ms");
        assert!(
            e.to_string().contains("election_timeout_max_ms (3000)"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let e = load_str("node_id = \"one\"\n").unwrap_err();
        assert_eq!(e.key, "node_id");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/chatraftd.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/chatraftd.toml"), "{e}");
    }

    #[test]
    fn reference_file_holds_the_defaults() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/chatraftd.toml"));
        let c = Config::load(path).unwrap();
        assert_eq!(
            c,
            Config {
                node_id: 1,
                ..Config::default()
            }
        );
        for i in 1..=3 {
            let path = PathBuf::from(format!(
                "{}/etc/local/node{i}.toml",
                env!("CARGO_MANIFEST_DIR")
            ));
            let c = Config::load(&path).unwrap();
            assert_eq!(c.node_id, i);
            assert_eq!(c.api_advertise(), format!("127.0.0.1:{}", 8080 + i));
            assert_eq!(c.raft_advertise(), format!("127.0.0.1:{}", 12000 + i));
        }
    }

    #[test]
    fn no_secret_needs_the_explicit_opt_out() {
        let no_secret = format!("{MINIMAL}[security]\ncluster_secret_file = \"\"\n");
        let e = load_str(&no_secret).unwrap_err();
        assert_eq!(e.key, "security.cluster_secret_file");
        assert!(e.to_string().contains("allow_insecure_cluster"), "{e}");
        let c = load_str(&format!("{no_secret}allow_insecure_cluster = true\n")).unwrap();
        assert!(c.security.allow_insecure_cluster);
    }

    #[test]
    fn join_and_bootstrap_exclude_each_other() {
        let e = load_str(&format!("{MINIMAL}join = [\"127.0.0.1:8082\"]\n")).unwrap_err();
        assert_eq!(e.key, "bootstrap");
    }
}
