//! The process and its surroundings: logging (journald or stderr), the systemd notify
//! protocol, signals, and reloading the config on SIGHUP.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::Config;
use crate::security::Security;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    /// `None` when another subscriber was already installed (tests): nothing to change then.
    filter: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogHandle {
    /// Replaces the filter; `level` was validated by the config.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        match &self.filter {
            Some(h) => h.reload(filter).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Installs the global subscriber, filtered by `log.level`. When stderr is connected to the
/// journal (systemd sets `$JOURNAL_STREAM` to its device and inode), events go to journald with
/// their fields as journal fields, plus `NODE_ID` on every entry; otherwise they are written
/// human-readable on stderr.
pub fn init_logging(level: &str, node_id: u64) -> LogHandle {
    // The config validated the filter; fall back to `info` rather than log nothing.
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(l) => Some(
                l.with_syslog_identifier("chatraftd".into())
                    // Our field names (node_id, term, conv_id, ...) do not clash with journald's
                    // own, so they are kept unprefixed: `journalctl NODE_ID=2` works.
                    .with_field_prefix(None)
                    .with_custom_fields([("NODE_ID", node_id.to_string())]),
            ),
            Err(e) => {
                eprintln!("chatraftd: cannot reach journald ({e}); logging to stderr");
                None
            }
        }
    } else {
        None
    };
    let output = match journald {
        Some(j) => j.boxed(),
        None => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .with_target(false)
                .boxed()
        }
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    LogHandle {
        filter: installed.then_some(handle),
    }
}

/// True when systemd connected stderr to the journal: `$JOURNAL_STREAM` is `DEV:INODE` of
/// the stream it passed, which we compare with what fd 2 really is (it may have been redirected).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(2) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager over the
/// socket in `$NOTIFY_SOCKET`. Does nothing when the variable is unset (not run by systemd
/// with `Type=notify`). A name starting with `@` is an abstract socket.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(Path::new(&path), state) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

fn send_notify(path: &Path, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn stop_signal() {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            // Without signal handlers the default action (exit) still applies; wait forever.
            tracing::warn!("cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The only key applied without a restart. Every other key is read once at start.
pub const LIVE_KEYS: &[&str] = &["log.level"];

/// Re-reads the config at `path` on every SIGHUP for the life of the process: applies
/// `log.level`, re-reads the client tokens file, and warns about every other changed key, naming it, since those need a
/// restart. A config that does not load is reported and changes nothing.
///
/// The handler is installed when this is called (inside the runtime), not when the future is
/// first polled, so a SIGHUP can never meet the default action, which ends the process.
pub fn reload_on_sighup(
    path: PathBuf,
    running: Config,
    log: LogHandle,
    security: Arc<Security>,
) -> impl std::future::Future<Output = ()> {
    let hup = signal(SignalKind::hangup());
    async move {
        match hup {
            Ok(hup) => reload_loop(hup, path, running, log, security).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the SIGHUP handler; reload is off")
            }
        }
    }
}

async fn reload_loop(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    running: Config,
    log: LogHandle,
    security: Arc<Security>,
) {
    let mut level = running.log.level.clone();
    while hup.recv().await.is_some() {
        notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        // The tokens file is re-read even when the config no longer loads: revoking a token
        // must not wait for an unrelated edit to be fixed.
        security.reload_tokens();
        match Config::load(&path) {
            Err(e) => tracing::error!(error = %e, "reload: config not applied"),
            Ok(new) => {
                for key in restart_only_changes(&running, &new) {
                    tracing::warn!(
                        key = %key,
                        "reload: {key} changed; it takes effect at the next restart"
                    );
                }
                if new.log.level != level {
                    match log.set_level(&new.log.level) {
                        Ok(()) => {
                            tracing::info!(level = %new.log.level, "reload: log.level applied");
                            level = new.log.level;
                        }
                        Err(e) => tracing::error!(error = %e, "reload: cannot set log.level"),
                    }
                } else {
                    tracing::info!(path = %path.display(), "reload: config re-read");
                }
            }
        }
        notify("READY=1");
    }
}

/// Descriptors kept for everything but client connections: the Raft listener and its peers'
/// connections, SQLite's files, snapshots, logging.
pub const RESERVED_FILES: u64 = 1024;

/// Raises the soft open-file limit to the hard one (as systemd's `LimitNOFILE=` or the
/// shell's `ulimit -Hn` allow), and warns when it still cannot hold `max_connections` client
/// connections besides [`RESERVED_FILES`]: connections beyond it would fail to be accepted
/// rather than be refused with `503 too_many_connections`.
pub fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    let wanted = max_connections as u64 + RESERVED_FILES;
    if soft < wanted {
        tracing::warn!(
            open_file_limit = soft,
            api.max_connections = max_connections,
            "the open-file limit is below api.max_connections + {RESERVED_FILES}: raise it (LimitNOFILE=, ulimit -n) or lower api.max_connections"
        );
    }
}

/// The dotted keys (`api.listen`, `join`, ...) whose values differ between `old` and `new`,
/// leaving out those in [`LIVE_KEYS`].
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // Config is plain data: serializing it to a JSON value cannot fail.
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    a.into_iter()
        .zip(b)
        .filter(|((key, x), (_, y))| x != y && !LIVE_KEYS.contains(&key.as_str()))
        .map(|((key, _), _)| key)
        .collect()
}

/// CLOCK_MONOTONIC in microseconds, which systemd wants next to `RELOADING=1`.
fn monotonic_usec() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::from(t).as_micros())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send_notify(&path, "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("chatraftd-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send_notify(Path::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn restart_only_changes_name_the_keys() {
        let old = Config {
            node_id: 1,
            ..Config::default()
        };
        let mut new = old.clone();
        new.log.level = "debug".into();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.api.listen = "127.0.0.1:9000".into();
        new.join = vec!["127.0.0.1:8081".into()];
        let mut changed = restart_only_changes(&old, &new);
        changed.sort();
        assert_eq!(changed, ["api.listen", "join"]);
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        // Only this test reads or writes JOURNAL_STREAM.
        let st = nix::sys::stat::fstat(2).unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        assert!(stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino + 1));
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
