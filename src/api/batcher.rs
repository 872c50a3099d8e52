//! Group commit on the leader: writes that arrive while earlier ones are being committed are
//! proposed together as one Raft entry ([`Request::Batch`]).
//!
//! Every entry costs a log transaction with an fsync on each node and a replication round, so
//! one message per entry would cap the cluster near one fsync per message. Batching keeps
//! every message fsynced on a majority before it is acknowledged, and pays that fsync once for
//! every message that queued up meanwhile: the busier the leader, the larger the batches. A
//! lone writer still gets its entry proposed at once.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::types::{NewMessage, Raft, Request, Response};

/// The most messages in one entry. With `raft.max_payload_entries` this bounds one
/// replication request, which openraft 0.9 must finish within the heartbeat interval.
const MAX_MESSAGES: usize = 256;
/// The most payload bytes in one entry (a single larger message still goes alone).
const MAX_BYTES: usize = 256 * 1024;
/// Entries proposed and not yet answered: one being committed while the next one fills.
const IN_FLIGHT: usize = 2;

/// The outcome of one message's proposal.
#[derive(Debug)]
pub enum Proposed {
    /// Stored, duplicate or conflict, as applied on the leader, with the Raft log index of
    /// the entry that carried it.
    Applied(Response, u64),
    /// This node is no longer the leader: route the write again.
    NotLeader,
    /// Raft refused or failed the write.
    Failed(String),
}

struct Pending {
    msg: NewMessage,
    reply: oneshot::Sender<Proposed>,
}

/// A handle to the batching task; cloning shares it.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task; it ends when the last handle is dropped.
    pub fn start(raft: Raft) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    /// Proposes `msg` (its `committed_at_ms` is set when its entry is proposed) and waits for
    /// its outcome. The caller bounds the wait: a message whose caller gave up may still be
    /// committed, exactly as a single write could.
    pub async fn propose(&self, msg: NewMessage) -> Proposed {
        let (reply, outcome) = oneshot::channel();
        if self.tx.send(Pending { msg, reply }).is_err() {
            return Proposed::Failed("the node is shutting down".into());
        }
        outcome
            .await
            .unwrap_or_else(|_| Proposed::Failed("the node is shutting down".into()))
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // Wait for a free slot first: the writes that arrive meanwhile make the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut bytes = first.msg.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_MESSAGES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.msg.payload.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn commit(raft: &Raft, batch: Vec<Pending>) {
    let now = chrono::Utc::now().timestamp_millis();
    let (msgs, replies): (Vec<NewMessage>, Vec<oneshot::Sender<Proposed>>) = batch
        .into_iter()
        .map(|p| {
            let msg = NewMessage {
                committed_at_ms: now,
                ..p.msg
            };
            (msg, p.reply)
        })
        .unzip();
    let count = msgs.len();
    let outcomes: Vec<Proposed> = match raft.client_write(Request::Batch(msgs)).await {
        Ok(resp) => match resp.data {
            Response::Batch(each) if each.len() == count => {
                let log_index = resp.log_id.index;
                each.into_iter()
                    .map(|r| Proposed::Applied(r, log_index))
                    .collect()
            }
            other => {
                let why = format!("a batch of {count} was answered with {other:?}");
                tracing::error!("{why}");
                (0..count).map(|_| Proposed::Failed(why.clone())).collect()
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            (0..count).map(|_| Proposed::NotLeader).collect()
        }
        Err(e) => {
            let why = e.to_string();
            (0..count).map(|_| Proposed::Failed(why.clone())).collect()
        }
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // The caller may have timed out and gone; its message is committed all the same.
        let _ = reply.send(outcome);
    }
}
