//! Fault injection for chatraftd: a Jepsen-style harness that runs real nodes in Linux network
//! namespaces, hurts them on a seeded schedule while clients write, read and stream, and a
//! checker that proves from the recorded history that no acknowledged message was lost,
//! duplicated or reordered.
//!
//! # Layout
//! - [`prng`]: the seeded generator every random choice comes from.
//! - [`history`]: what a run records (operations, stream events, final state).
//! - [`checker`]: the properties checked on a history; pure, tested on hand-made histories.

pub mod checker;
pub mod history;
pub mod prng;
