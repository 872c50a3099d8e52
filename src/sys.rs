//! The process and its surroundings: logging and signals.

use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Human-readable logs on stderr, filtered by `log.level` from the config.
pub fn init_logging(level: &str) {
    // The config validated the filter; fall back to `info` rather than log nothing.
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
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
