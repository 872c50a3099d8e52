//! chatraftd: a replicated, totally ordered chat-message log on Raft and SQLite.
//!
//! # Layout
//! - [`config`]: the TOML file and `CHATRAFTD_*` overrides, validated into a typed `Config`.
//! - [`types`]: the openraft type configuration and what travels through the Raft log.

pub mod config;
pub mod types;
