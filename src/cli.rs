//! The operator's client subcommands: `status`, `members`, `send`, `tail`, and `backup` and
//! `restore` (which work on a data dir, see [`crate::backup`]).
//!
//! Each talks to one node's API (`--node host:port`) with the daemon's own HTTP client, prints
//! one human-readable line per item, or JSON with `--json`. Exit codes: 0 done, 1 failed,
//! 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{self, Config};
use crate::network::{HttpClient, HttpError};

/// The node asked when `--node` is not given: the packaged config's API address.
const DEFAULT_NODE: &str = "127.0.0.1:8081";
/// The bound on one request of `status`, `members` and each attempt of `send`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times `send` tries in all, on 503 and connection errors.
const SEND_ATTEMPTS: u32 = 8;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node's API address, or its URL (https://HOST:PORT for a node with tls.api)
    #[arg(long, default_value = DEFAULT_NODE, value_name = "HOST:PORT|URL")]
    node: String,
    /// The CA to check an HTTPS node's certificate against (PEM); implies https://
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

impl NodeArgs {
    /// The client for `--node`: HTTPS checked against `--ca-file` when one is given.
    fn client(&self) -> Result<HttpClient, Failure> {
        match &self.ca_file {
            None if self.node.starts_with("https://") => Err(Failure {
                code: 2,
                message: format!(
                    "{} is an https:// address: name the CA that signed its certificate with --ca-file",
                    self.node
                ),
            }),
            None => Ok(HttpClient::new()),
            Some(ca) => {
                let tls = crate::tls::client_trusting(ca).map_err(|m| Failure {
                    code: 2,
                    message: format!("--ca-file: {m}"),
                })?;
                Ok(HttpClient::with_tls(Some(tls), true))
            }
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Conversation
    #[arg(long, default_value = "general")]
    conv: String,
    /// Sender name
    #[arg(long)]
    sender: String,
    /// The msg_id to use (a UUID); a fresh one by default. Retries reuse it.
    #[arg(long)]
    msg_id: Option<uuid::Uuid>,
    /// The message text
    text: String,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Conversation
    #[arg(long, default_value = "general")]
    conv: String,
    /// First seq to print; without it, the messages committed from now on
    #[arg(long)]
    from: Option<u64>,
    /// Exit after this many messages (default: follow until interrupted)
    #[arg(long)]
    count: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The backup file to write (must not exist)
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The backup file to restore from
    #[arg(long, value_name = "FILE")]
    backup: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

/// A failure of a client subcommand, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn run_async<F>(f: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), Failure>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatraftd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("chatraftd: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn print_json(v: &impl serde::Serialize) {
    // Values built from parsed JSON or plain structs always serialise.
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

/// GET a JSON document; a non-2xx answer is a failure carrying the API's error message.
async fn get_json(client: &HttpClient, node: &str, path: &str) -> Result<Value, Failure> {
    let r = client
        .request(
            hyper::Method::GET,
            node,
            path,
            &[],
            Bytes::new(),
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| {
        fail(format!(
            "{node}{path} answered {} with no JSON: {e}",
            r.status
        ))
    })?;
    if !r.status.is_success() {
        return Err(fail(format!(
            "{node}{path}: {} {}",
            r.status,
            api_error(&v)
        )));
    }
    Ok(v)
}

fn api_error(v: &Value) -> String {
    format!(
        "{}: {}",
        v["error"]["code"].as_str().unwrap_or("?"),
        v["error"]["message"].as_str().unwrap_or("")
    )
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

pub fn status(args: NodeArgs) -> ExitCode {
    run_async(async move {
        let s = get_json(&args.client()?, &args.node, "/api/v1/status").await?;
        if args.json {
            print_json(&s);
            return Ok(());
        }
        let leader = match s["leader"]["node_id"].as_u64() {
            Some(id) => format!("{id} ({})", s["leader"]["api_addr"].as_str().unwrap_or("?")),
            None => "none".into(),
        };
        println!(
            "node {}: {}, term {}, leader {leader}, last log {}, commit {}, applied {}, {} members",
            num(&s, "node_id"),
            s["role"].as_str().unwrap_or("?"),
            num(&s, "term"),
            num(&s, "last_log_index"),
            num(&s, "commit_index"),
            num(&s, "last_applied"),
            s["members"].as_array().map_or(0, Vec::len),
        );
        Ok(())
    })
}

pub fn members(args: NodeArgs) -> ExitCode {
    run_async(async move {
        let s = get_json(&args.client()?, &args.node, "/api/v1/status").await?;
        let leader = s["leader"]["node_id"].as_u64();
        let members = s["members"].as_array().cloned().unwrap_or_default();
        if args.json {
            print_json(&serde_json::json!({ "leader": leader, "members": members }));
            return Ok(());
        }
        for m in &members {
            let id = num(m, "node_id");
            let kind = if m["voter"].as_bool() == Some(true) {
                "voter"
            } else {
                "learner"
            };
            let mark = if leader == Some(id) { " leader" } else { "" };
            println!(
                "{id}\t{kind}{mark}\tapi {}\traft {}",
                m["api_addr"].as_str().unwrap_or("?"),
                m["raft_addr"].as_str().unwrap_or("?"),
            );
        }
        Ok(())
    })
}

pub fn send(args: SendArgs) -> ExitCode {
    run_async(async move {
        let client = args.node.client()?;
        let msg_id = args.msg_id.unwrap_or_else(uuid::Uuid::now_v7);
        let body = serde_json::json!({
            "conv_id": args.conv,
            "sender": args.sender,
            "payload": args.text,
            "msg_id": msg_id,
        });
        let body = Bytes::from(body.to_string());
        let mut pause = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=SEND_ATTEMPTS {
            let r = client
                .request(
                    hyper::Method::POST,
                    &args.node.node,
                    "/api/v1/message",
                    &[("content-type", "application/json")],
                    body.clone(),
                    REQUEST_TIMEOUT,
                )
                .await;
            match r {
                Ok(r) if r.status.is_success() => {
                    let rec: Value = serde_json::from_slice(&r.body)
                        .map_err(|e| fail(format!("the answer is not a record: {e}")))?;
                    if args.node.json {
                        print_json(&rec);
                    } else {
                        let how = if r.status == hyper::StatusCode::CREATED {
                            "stored"
                        } else {
                            "already stored"
                        };
                        println!(
                            "{how}: conv {} seq {} index {} msg_id {}",
                            rec["conv_id"].as_str().unwrap_or("?"),
                            num(&rec, "seq"),
                            num(&rec, "index"),
                            rec["msg_id"].as_str().unwrap_or("?"),
                        );
                    }
                    return Ok(());
                }
                // The cluster may take it on a later try: same msg_id, so no duplicate.
                Ok(r) if r.status == hyper::StatusCode::SERVICE_UNAVAILABLE => {
                    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                    last = format!("503 {}", api_error(&v));
                }
                Ok(r) => {
                    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                    return Err(fail(format!("{} {}", r.status, api_error(&v))));
                }
                Err(e @ (HttpError::Unreachable { .. } | HttpError::Timeout { .. })) => {
                    last = e.to_string()
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            if attempt < SEND_ATTEMPTS {
                eprintln!(
                    "chatraftd: attempt {attempt} failed ({last}); retrying with msg_id {msg_id}"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
        Err(fail(format!(
            "not stored after {SEND_ATTEMPTS} attempts (last: {last}); msg_id {msg_id} may be retried"
        )))
    })
}

/// One parsed event of the stream.
struct Event {
    id: Option<String>,
    data: String,
}

/// Splits complete events off the front of `buf` (LF or CRLF line ends).
fn take_events(buf: &mut BytesMut, out: &mut Vec<Event>) {
    loop {
        let text = String::from_utf8_lossy(buf);
        let Some(end) = text.find("\n\n").or_else(|| text.find("\r\n\r\n")) else {
            return;
        };
        let sep = if text[end..].starts_with("\r\n\r\n") {
            4
        } else {
            2
        };
        let block = text[..end].to_string();
        let _ = buf.split_to(end + sep);
        let mut id = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim_start().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !data.is_empty() {
            out.push(Event {
                id,
                data: data.join("\n"),
            });
        }
    }
}

pub fn tail(args: TailArgs) -> ExitCode {
    run_async(async move {
        let client = args.node.client()?;
        let node = args.node.node.clone();
        let mut last_id: Option<String> = None;
        let mut printed = 0u64;
        let mut pause = Duration::from_millis(200);
        let conv = percent_encode(&args.conv);
        // Without --from, start after the conversation's current last seq, asked once: a
        // reconnect before the first message then still resumes at the same place.
        let from = match args.from {
            Some(f) => f,
            None => {
                let page = get_json(
                    &client,
                    &node,
                    &format!("/api/v1/messages?conv_id={conv}&limit=1"),
                )
                .await?;
                num(&page, "last_seq") + 1
            }
        };
        let path = format!("/api/v1/stream?conv_id={conv}&from={from}");
        loop {
            let mut headers = vec![("accept", "text/event-stream")];
            // After a reconnect, resume after the last message printed (Last-Event-ID wins
            // over `from`): no gap, no duplicate.
            if let Some(id) = last_id.as_deref() {
                headers.push(("last-event-id", id));
            }
            let resp = client
                .get_streaming(&node, &path, &headers, REQUEST_TIMEOUT)
                .await;
            let ended = match resp {
                Ok(resp) if resp.status().is_success() => {
                    pause = Duration::from_millis(200);
                    let mut body = resp.into_body();
                    let mut buf = BytesMut::new();
                    loop {
                        match body.frame().await {
                            Some(Ok(frame)) => {
                                if let Some(data) = frame.data_ref() {
                                    buf.extend_from_slice(data);
                                }
                                let mut events = Vec::new();
                                take_events(&mut buf, &mut events);
                                for e in events {
                                    print_event(&e.data, args.node.json);
                                    if let Some(id) = e.id {
                                        last_id = Some(id);
                                    }
                                    printed += 1;
                                    if args.count.is_some_and(|c| printed >= c) {
                                        return Ok(());
                                    }
                                }
                            }
                            Some(Err(e)) => break format!("the stream broke: {e}"),
                            None => break "the node ended the stream".to_string(),
                        }
                    }
                }
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if status.is_client_error() {
                        return Err(Failure {
                            code: 2,
                            message: format!("{status} {}", api_error(&v)),
                        });
                    }
                    format!("{status} {}", api_error(&v))
                }
                Err(e) => e.to_string(),
            };
            eprintln!(
                "chatraftd: {ended}; reconnecting in {} ms",
                pause.as_millis()
            );
            let wake = Instant::now() + pause;
            tokio::time::sleep_until(wake).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    })
}

fn print_event(data: &str, json: bool) {
    if json {
        println!("{data}");
        return;
    }
    match serde_json::from_str::<Value>(data) {
        Ok(r) => println!(
            "{} #{} {}: {}",
            r["committed_at"].as_str().unwrap_or("?"),
            num(&r, "seq"),
            r["sender"].as_str().unwrap_or("?"),
            r["payload"].as_str().unwrap_or(""),
        ),
        Err(_) => println!("{data}"),
    }
}

/// Conversation ids are `[A-Za-z0-9._-]`; anything else is encoded so the node can name it.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn load_config(cli_path: Option<&std::path::Path>) -> Result<Config, Failure> {
    let path = config::resolve_path(cli_path);
    Config::load(&path).map_err(|e| Failure {
        code: 2,
        message: e.to_string(),
    })
}

pub fn backup(config_path: Option<PathBuf>, args: BackupArgs) -> ExitCode {
    run_async(async move {
        let config = load_config(config_path.as_deref())?;
        let out = args.out.clone();
        let info = tokio::task::spawn_blocking(move || crate::backup::backup(&config, &out))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        if args.json {
            print_json(&info);
        } else {
            println!(
                "backup written to {}: {} messages in {} conversations, up to log index {} (term {}), {} bytes",
                info.file.display(),
                info.messages,
                info.conversations,
                info.last_applied_index,
                info.last_applied_term,
                info.bytes
            );
        }
        Ok(())
    })
}

pub fn restore(config_path: Option<PathBuf>, args: RestoreArgs) -> ExitCode {
    run_async(async move {
        let config = load_config(config_path.as_deref())?;
        let info = crate::backup::restore(&config, &args.backup)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if args.json {
            print_json(&info);
        } else {
            println!(
                "restored {} messages in {} conversations (up to log index {}) into {}; node {} now starts a one-node cluster",
                info.messages,
                info.conversations,
                info.last_applied_index,
                config.data_dir.display(),
                config.node_id
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_and_keep_partial_ones() {
        let mut buf = BytesMut::from(
            &b": keep-alive\n\nevent: message\nid: 3\ndata: {\"a\":1}\n\nevent: message\nid: 4\nda"
                [..],
        );
        let mut out = Vec::new();
        take_events(&mut buf, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id.as_deref(), Some("3"));
        assert_eq!(out[0].data, "{\"a\":1}");
        assert_eq!(&buf[..], b"event: message\nid: 4\nda");
    }
}
