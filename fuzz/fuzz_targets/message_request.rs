//! `POST /api/v1/message`: every body is either refused with a client error the API can
//! answer, or yields a message within the configured limits, holding what the client sent,
//! that the leader takes unchanged when a follower forwards it.
#![no_main]

use chatraftd::api::check_conv_id;
use chatraftd::config::{Config, Limits};
use chatraftd::fuzzing::{message_request, AcceptedMessage};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const JSON: &str = "application/json";

fuzz_target!(|body: &[u8]| {
    let defaults = Config::default().limits;
    // Small limits, so that inputs of a few bytes reach every limit.
    let tight = Limits {
        max_payload_bytes: 16,
        max_sender_bytes: 8,
        max_vector_clock_entries: 2,
        ..defaults.clone()
    };
    let loose = check(body, &defaults);
    if let Some(t) = check(body, &tight) {
        // Narrower limits only refuse more; they never change what is accepted.
        let l = loose.expect("accepted under small limits but refused under the defaults");
        assert_eq!(
            (
                &t.conv_id,
                &t.sender,
                &t.payload,
                &t.vector_clock,
                t.client_msg_id
            ),
            (
                &l.conv_id,
                &l.sender,
                &l.payload,
                &l.vector_clock,
                l.client_msg_id
            )
        );
        if t.client_msg_id {
            assert_eq!(t.msg_id, l.msg_id);
        }
    }
});

fn check(body: &[u8], limits: &Limits) -> Option<AcceptedMessage> {
    let m = match message_request(JSON, body, limits) {
        Ok(m) => m,
        Err(e) => {
            // A client error in the API's error shape, never a server error.
            let expected = match e.code {
                "invalid_json" | "invalid_field" => 400,
                "payload_too_large" => 413,
                other => panic!("unexpected error code {other}: {e}"),
            };
            assert_eq!(e.status.as_u16(), expected, "{e}");
            assert!(!e.message.is_empty());
            return None;
        }
    };

    // Within the limits.
    assert!(check_conv_id(&m.conv_id).is_ok(), "{:?}", m.conv_id);
    assert!(!m.sender.is_empty() && m.sender.len() <= limits.max_sender_bytes);
    assert!(m.payload.len() <= limits.max_payload_bytes);
    if let Some(vc) = &m.vector_clock {
        assert!(vc.0.len() <= limits.max_vector_clock_entries);
        for (i, (key, _)) in vc.0.iter().enumerate() {
            assert!(!key.is_empty() && key.len() <= limits.max_sender_bytes);
            assert!(
                vc.0[..i].iter().all(|(k, _)| k != key),
                "duplicate key {key}"
            );
        }
    }
    if !m.client_msg_id {
        assert_eq!(
            m.msg_id.get_version_num(),
            7,
            "a server-made msg_id is time-ordered (UUIDv7)"
        );
    }

    // What the client sent, unchanged (read here with serde_json's own tree).
    let sent: Value = serde_json::from_slice(body).expect("an accepted body is JSON");
    let field = |name: &str| sent.get(name).filter(|v| !v.is_null());
    assert_eq!(
        field("conv_id").map_or("general", |v| v.as_str().expect("a string")),
        m.conv_id
    );
    assert_eq!(field("sender").and_then(Value::as_str), Some(&*m.sender));
    assert_eq!(field("payload").and_then(Value::as_str), Some(&*m.payload));
    assert_eq!(field("msg_id").is_some(), m.client_msg_id);
    match (field("vector_clock"), &m.vector_clock) {
        (None, None) => {}
        (Some(Value::Object(sent)), Some(vc)) => {
            assert_eq!(sent.len(), vc.0.len());
            for (k, v) in &vc.0 {
                assert_eq!(sent.get(k).and_then(Value::as_u64), Some(*v), "{k}");
            }
        }
        (sent, kept) => panic!("vector_clock {sent:?} was kept as {kept:?}"),
    }

    // The leader validates a forwarded body with the same function and the same limits.
    let again = message_request(JSON, &m.forwarded_body, limits)
        .unwrap_or_else(|e| panic!("the leader refuses a forwarded message: {e}"));
    assert!(again.client_msg_id, "a forwarded message keeps its msg_id");
    assert_eq!(again.msg_id, m.msg_id);
    assert_eq!(
        (
            &again.conv_id,
            &again.sender,
            &again.payload,
            &again.vector_clock
        ),
        (&m.conv_id, &m.sender, &m.payload, &m.vector_clock)
    );
    assert_eq!(again.forwarded_body, m.forwarded_body);
    Some(m)
}
