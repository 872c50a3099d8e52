//! chatraftd: a replicated, totally ordered chat-message log on Raft and SQLite.
//!
//! # Layout
//! - [`config`]: the TOML file and `CHATRAFTD_*` overrides, validated into a typed `Config`.
//! - [`types`]: the openraft type configuration and what travels through the Raft log.
//! - [`store`]: SQLite storage: the Raft log, the state machine (the message table, the only
//!   writer of it), snapshots, and the read pool the API uses.
//! - [`fanout`]: the live tail of each watched conversation: records serialised once into
//!   their SSE event bytes after each apply, shared by every subscriber of that conversation.
//! - [`network`]: Raft RPC over HTTP, client and server side, and the shared HTTP client.
//! - [`api`]: the client HTTP API: messages, stream, history, join, status, health, the
//!   cluster overview, and the web page (`api/web/`, compiled into the binary).
//! - [`security`]: the cluster secret, client tokens, and who may use which route.
//! - [`serve`]: the HTTP server loop both listeners run: TLS, header and request limits.
//! - [`server`]: wiring of one node, bootstrap and join, ordered shutdown.
//! - [`handoff`]: a stopping leader hands leadership to an up-to-date voter.
//! - [`sys`]: logging and signals.
//! - [`tls`]: rustls: HTTPS for the API, mutual TLS between peers, the client connector.
//! - [`metrics`]: process-wide counters and histograms, and the Prometheus text format.
//! - [`local_cluster`]: the `local-cluster` subcommand.
//! - [`chaos`]: the fault-injection harness and history checker behind `chatraftd-chaos`.
//! - [`backup`]: backup and restore of the message store.
//! - [`cli`]: the operator's client subcommands (`status`, `members`, `send`, `tail`,
//!   `backup`, `restore`).
//! - [`fuzzing`]: entry points for the fuzz targets in `fuzz/`: the decoders of untrusted
//!   bytes (message bodies, Raft RPC bodies), called as the listeners call them.

pub mod api;
pub mod backup;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod fanout;
pub mod fuzzing;
pub mod handoff;
pub mod local_cluster;
pub mod metrics;
pub mod network;
pub mod security;
pub mod serve;
pub mod server;
pub mod store;
pub mod sys;
pub mod tls;
pub mod types;
