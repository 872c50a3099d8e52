//! The man page chatraftd.toml(5) documents every config key, under its own table, and says
//! truly whether a key applies on reload or needs a restart.

use chatraftd::config::Config;
use chatraftd::sys::LIVE_KEYS;

/// Every dotted key of the config, from the defaults (`api.listen`, `join`, ...).
fn config_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(Config::default()).unwrap(),
        &mut out,
    );
    out
}

/// `(dotted key, item line)` for every `.It Cm` item of the page, keyed by its section.
fn documented_keys() -> Vec<(String, String)> {
    let page = include_str!("../man/chatraftd.toml.5");
    let mut table = None::<String>;
    let mut out = Vec::new();
    for line in page.lines() {
        if let Some(title) = line.strip_prefix(".Sh ") {
            table = title
                .strip_prefix("THE [")
                .and_then(|t| t.strip_suffix("] TABLE"))
                .map(str::to_string)
                .or_else(|| (title == "TOP-LEVEL KEYS").then(String::new));
        } else if let (Some(t), Some(item)) = (&table, line.strip_prefix(".It Cm ")) {
            let name = item.split_whitespace().next().unwrap();
            let key = if t.is_empty() {
                name.to_string()
            } else {
                format!("{t}.{name}")
            };
            out.push((key, line.to_string()));
        }
    }
    out
}

#[test]
fn every_key_is_documented_once_with_how_it_applies() {
    let documented = documented_keys();
    let mut keys = config_keys();
    keys.sort();
    let mut names: Vec<String> = documented.iter().map(|(k, _)| k.clone()).collect();
    names.sort();
    assert_eq!(names, keys, "chatraftd.toml(5) and Config disagree");
    for (key, line) in &documented {
        let want = if LIVE_KEYS.contains(&key.as_str()) {
            ", live"
        } else {
            ", restart"
        };
        assert!(
            line.ends_with(want),
            "{key}: {line:?} should end with {want:?}"
        );
    }
}

#[test]
fn every_default_is_the_real_one() {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for (key, line) in documented_keys() {
        if key == "node_id" {
            assert!(line.contains("required"), "{line}");
            continue;
        }
        let value = key.split('.').fold(&defaults, |v, part| &v[part]);
        let shown = match value {
            serde_json::Value::String(s) => format!("\\(dq{s}\\(dq"),
            serde_json::Value::Array(a) if a.is_empty() => "[]".to_string(),
            other => other.to_string(),
        };
        assert!(
            line.contains(&format!("default {shown},")),
            "{key}: {line:?} should give the default {shown}"
        );
    }
}
