//! Fault injection for chatraftd: a Jepsen-style harness that runs real nodes in Linux network
//! namespaces, hurts them on a seeded schedule while clients write, read and stream, and a
//! checker that proves from the recorded history that no acknowledged message was lost,
//! duplicated or reordered.
//!
//! # Layout
//! - [`prng`]: the seeded generator every random choice comes from.
//! - [`history`]: what a run records (operations, stream events, final state).
//! - [`checker`]: the properties checked on a history; pure, tested on hand-made histories.
//! - [`lab`]: network namespaces, the bridge, tmpfs disks, iptables and qdisc faults, cleanup.
//! - [`cluster`]: the node processes: start, kill, pause, stop, restart, crash detection.
//! - [`client`]: writers, linearizable readers, resuming stream subscribers, the recorder.
//! - [`nemesis`]: the fault kinds, the seeded schedule, and healing.
//! - [`run`]: one run from lab setup to report.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod history;
pub mod lab;
pub mod nemesis;
pub mod prng;
pub mod run;
