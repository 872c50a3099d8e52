//! The bodies of the Raft listener's RPCs. The first byte picks the RPC: 0 vote, 1 append
//! entries, 2 snapshot chunk (any other value: its remainder by 3). Decoding never panics,
//! and what decodes encodes (as the sending peer encodes it) to a body that decodes to the
//! same request.
#![no_main]

use chatraftd::fuzzing::{encode_raft_snapshot_chunk, raft_append, raft_snapshot_chunk, raft_vote};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => vote(body),
        1 => append(body),
        _ => snapshot_chunk(body),
    }
});

fn vote(body: &[u8]) {
    let Ok(req) = raft_vote(body) else {
        return;
    };
    let sent = serde_json::to_vec(&req).expect("a vote request encodes");
    let back = raft_vote(&sent).expect("an encoded vote request decodes");
    assert_eq!(back, req);
}

fn append(body: &[u8]) {
    let Ok(req) = raft_append(body) else {
        return;
    };
    let sent = serde_json::to_vec(&req).expect("an append-entries request encodes");
    let back = raft_append(&sent).expect("an encoded append-entries request decodes");
    // The request type has no PartialEq; its fields do.
    assert_eq!(back.vote, req.vote);
    assert_eq!(back.prev_log_id, req.prev_log_id);
    assert_eq!(back.entries, req.entries);
    assert_eq!(back.leader_commit, req.leader_commit);
    assert_eq!(serde_json::to_vec(&back).expect("encodes"), sent);
}

fn snapshot_chunk(body: &[u8]) {
    let req = match raft_snapshot_chunk(body) {
        Ok(req) => req,
        Err(reason) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    // The data is what follows the header, byte for byte.
    let header_len = u32::from_be_bytes(body[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(req.data, body[4 + header_len..]);
    let sent = encode_raft_snapshot_chunk(req.clone()).expect("a snapshot chunk encodes");
    let back = raft_snapshot_chunk(&sent).expect("an encoded snapshot chunk decodes");
    assert_eq!(back, req);
}
