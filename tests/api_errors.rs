//! Bad requests: each gets its documented status and error code, and none changes the log.

mod common;

use common::{conversation_counts, u64_of, Cluster, Options, Response};
use hyper::Method;
use serde_json::{json, Value};

/// Checks `{"error":{"code":CODE,"message":...}}` with the status, and that the message
/// names `field` when one is given.
fn assert_error(what: &str, r: &Response, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(r.code(), status, "{what}: {}", r.text());
    let ctype = r.header("content-type").unwrap_or("");
    assert!(
        ctype.starts_with("application/json"),
        "{what}: content-type {ctype:?}"
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", r.text()));
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error.message: {v}"));
    assert!(!message.is_empty(), "{what}: empty error.message");
    if let Some(field) = field {
        assert!(
            message.contains(field),
            "{what}: the message should name `{field}`: {message:?}"
        );
    }
}

/// What must not change: the log and the stored messages.
async fn snapshot_state(c: &Cluster) -> (u64, Value) {
    let s = c.status(1).await.expect("status");
    let counts = conversation_counts(&c.http, c.api(1))
        .await
        .expect("conversations");
    (u64_of(&s, "last_log_index"), json!(counts))
}

async fn one_node() -> Cluster {
    let c = Cluster::start(Options::nodes(1)).await;
    // One good message, so "unchanged" is checked against a non-empty store.
    let r = c
        .post(1, &json!({"sender": "u1", "payload": "good"}))
        .await
        .expect("an answer");
    assert_eq!(r.code(), 201, "{}", r.text());
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_message_bodies_are_refused_and_store_nothing() {
    let c = one_node().await;
    let before = snapshot_state(&c).await;
    let addr = c.api(1).to_owned();
    let post = |body: String| {
        let (http, addr) = (c.http.clone(), addr.clone());
        async move {
            http.post_raw(&addr, "/api/v1/message", "application/json", body)
                .await
                .expect("an answer")
        }
    };

    let malformed = [
        r#"{"sender": "u1", "payload": "#,
        "not json at all",
        r#"{"sender":"u1","payload":"x"}}"#,
        "",
    ];
    for body in malformed {
        let r = post(body.to_owned()).await;
        assert_error(
            &format!("malformed {body:?}"),
            &r,
            400,
            "invalid_json",
            None,
        );
    }

    let long_conv = "c".repeat(65);
    let long_sender = "s".repeat(257);
    let many_keys: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!(1))).collect();
    let invalid: Vec<(&str, Value, &str)> = vec![
        ("missing sender", json!({"payload": "x"}), "sender"),
        ("missing payload", json!({"sender": "u1"}), "payload"),
        (
            "number payload",
            json!({"sender": "u1", "payload": 5}),
            "payload",
        ),
        (
            "object payload",
            json!({"sender": "u1", "payload": {"a": 1}}),
            "payload",
        ),
        (
            "number sender",
            json!({"sender": 7, "payload": "x"}),
            "sender",
        ),
        (
            "empty sender",
            json!({"sender": "", "payload": "x"}),
            "sender",
        ),
        (
            "sender over 256 bytes",
            json!({"sender": long_sender, "payload": "x"}),
            "sender",
        ),
        (
            "unknown field",
            json!({"sender": "u1", "payload": "x", "colour": "red"}),
            "colour",
        ),
        (
            "bad msg_id",
            json!({"sender": "u1", "payload": "x", "msg_id": "not-a-uuid"}),
            "msg_id",
        ),
        (
            "number msg_id",
            json!({"sender": "u1", "payload": "x", "msg_id": 12}),
            "msg_id",
        ),
        (
            "conv_id with a space",
            json!({"conv_id": "a b", "sender": "u1", "payload": "x"}),
            "conv_id",
        ),
        (
            "conv_id of 65 chars",
            json!({"conv_id": long_conv, "sender": "u1", "payload": "x"}),
            "conv_id",
        ),
        (
            "empty conv_id",
            json!({"conv_id": "", "sender": "u1", "payload": "x"}),
            "conv_id",
        ),
        (
            "conv_id with a slash",
            json!({"conv_id": "a/b", "sender": "u1", "payload": "x"}),
            "conv_id",
        ),
        (
            "negative clock",
            json!({"sender": "u1", "payload": "x", "vector_clock": {"u1": -1}}),
            "vector_clock",
        ),
        (
            "string clock",
            json!({"sender": "u1", "payload": "x", "vector_clock": {"u1": "3"}}),
            "vector_clock",
        ),
        (
            "fractional clock",
            json!({"sender": "u1", "payload": "x", "vector_clock": {"u1": 1.5}}),
            "vector_clock",
        ),
        (
            "array clock",
            json!({"sender": "u1", "payload": "x", "vector_clock": [1, 2]}),
            "vector_clock",
        ),
        (
            "65 clock entries",
            json!({"sender": "u1", "payload": "x", "vector_clock": many_keys}),
            "vector_clock",
        ),
    ];
    for (what, body, field) in &invalid {
        let r = post(body.to_string()).await;
        assert_error(what, &r, 400, "invalid_field", Some(field));
    }

    // 64 KiB + 1 of payload inside a body under max_body_bytes: the payload limit.
    let big = json!({"sender": "u1", "payload": "p".repeat(65_537)});
    assert_error(
        "payload over 64 KiB",
        &post(big.to_string()).await,
        413,
        "payload_too_large",
        None,
    );
    // A body over max_body_bytes (256 KiB).
    let huge = json!({"sender": "u1", "payload": "p".repeat(300_000)});
    assert_error(
        "body over 256 KiB",
        &post(huge.to_string()).await,
        413,
        "payload_too_large",
        None,
    );

    assert_eq!(
        snapshot_state(&c).await,
        before,
        "a refused request changed the log or the store"
    );

    // The boundaries themselves are accepted (and change the store, so they come last).
    let edge = json!({"conv_id": "c".repeat(64), "sender": "s".repeat(256), "payload": "p".repeat(65_536)});
    let r = post(edge.to_string()).await;
    assert_eq!(
        r.code(),
        201,
        "the limits themselves are allowed: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_media_type_method_path_and_page_are_refused() {
    let c = one_node().await;
    let before = snapshot_state(&c).await;
    let addr = c.api(1);
    let good = json!({"sender": "u1", "payload": "x"}).to_string();

    for ctype in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = c
            .http
            .post_raw(addr, "/api/v1/message", ctype, good.clone())
            .await
            .expect("an answer");
        assert_error(
            &format!("content-type {ctype}"),
            &r,
            415,
            "unsupported_media_type",
            None,
        );
    }

    for method in [Method::DELETE, Method::PUT, Method::GET] {
        let r = c
            .http
            .request(method.clone(), addr, "/api/v1/message", &[], good.clone())
            .await
            .expect("an answer");
        assert_error(
            &format!("{method} /api/v1/message"),
            &r,
            405,
            "method_not_allowed",
            None,
        );
    }
    let r = c
        .http
        .request(
            Method::POST,
            addr,
            "/api/v1/messages",
            &[("content-type", "application/json")],
            good.clone(),
        )
        .await
        .expect("an answer");
    assert_error("POST /api/v1/messages", &r, 405, "method_not_allowed", None);

    for path in [
        "/api/v1/nope",
        "/nope",
        "/api/v2/message",
        "/api/v1/message/extra",
    ] {
        let r = c.http.get(addr, path).await.expect("an answer");
        assert_error(&format!("GET {path}"), &r, 404, "not_found", None);
    }

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("from=abc", "from"),
        ("conv_id=a%20b", "conv_id"),
        ("consistency=eventual", "consistency"),
    ] {
        let path = format!("/api/v1/messages?{query}");
        let r = c.http.get(addr, &path).await.expect("an answer");
        assert_error(
            &format!("GET {path}"),
            &r,
            400,
            "invalid_field",
            Some(field),
        );
    }

    // Good reads still work and agree with the store.
    let r = c
        .http
        .get(addr, "/api/v1/messages?limit=1000&consistency=linearizable")
        .await
        .expect("an answer");
    assert_eq!(r.code(), 200, "{}", r.text());
    assert_eq!(r.json()["messages"].as_array().map(Vec::len), Some(1));

    assert_eq!(
        snapshot_state(&c).await,
        before,
        "a refused request changed the log or the store"
    );
}
