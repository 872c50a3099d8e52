//! Latency histograms: log-linear buckets with 128 steps per power of two (under 1% error),
//! cheap to record into from many tasks and to merge.

use serde_json::{json, Value};

const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Values in microseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) as usize; // in [SUB, 2 * SUB)
    ((shift as usize + 1) << SUB_BITS) + (mantissa - SUB)
}

/// The middle of bucket `i`.
fn value_of(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i >> SUB_BITS) - 1;
    let mantissa = (i % SUB + SUB) as u64;
    let low = mantissa << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        self.counts[index(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(i).min(self.max);
            }
        }
        self.max
    }

    /// p50, p99, p99.9 and max in milliseconds, as JSON fields.
    pub fn summary_ms(&self) -> Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "p50_ms": ms(self.quantile(0.50)),
            "p99_ms": ms(self.quantile(0.99)),
            "p999_ms": ms(self.quantile(0.999)),
            "max_ms": ms(self.max),
        })
    }
}

/// Folds the write figures of several rounds into one record per system, mode and
/// concurrency: every numeric figure is its median over the rounds (the mean of the middle two
/// of an even count), except the counts `acked` and `errors`, which are summed. `msgs_per_s_min`
/// and `msgs_per_s_max` keep the spread, and `rounds` says how many there were.
pub fn medians(rounds: &[Value]) -> Vec<Value> {
    let key = |v: &Value| {
        (
            v["system"].as_str().unwrap_or("").to_string(),
            v["mode"].as_str().unwrap_or("").to_string(),
            v["concurrency"].as_u64().unwrap_or(0),
        )
    };
    let mut keys: Vec<_> = Vec::new();
    for v in rounds {
        if !keys.contains(&key(v)) {
            keys.push(key(v));
        }
    }
    keys.into_iter()
        .map(|k| {
            let group: Vec<&Value> = rounds.iter().filter(|v| key(v) == k).collect();
            let mut out = group[0].clone();
            let Value::Object(fields) = &mut out else {
                return out;
            };
            fields.remove("round");
            fields.remove("first_error");
            let names: Vec<String> = fields.keys().cloned().collect();
            for name in names {
                let mut xs: Vec<f64> = group.iter().filter_map(|v| v[&name].as_f64()).collect();
                if xs.len() != group.len() || name == "concurrency" {
                    continue;
                }
                xs.sort_by(f64::total_cmp);
                let value = if name == "acked" || name == "errors" {
                    json!(xs.iter().sum::<f64>() as u64)
                } else {
                    let mid = xs.len() / 2;
                    if xs.len() % 2 == 1 {
                        json!(xs[mid])
                    } else {
                        json!((xs[mid - 1] + xs[mid]) / 2.0)
                    }
                };
                fields.insert(name, value);
            }
            let tput: Vec<f64> = group
                .iter()
                .filter_map(|v| v["msgs_per_s"].as_f64())
                .collect();
            if let (Some(lo), Some(hi)) = (
                tput.iter().copied().reduce(f64::min),
                tput.iter().copied().reduce(f64::max),
            ) {
                fields.insert("msgs_per_s_min".into(), json!(lo));
                fields.insert("msgs_per_s_max".into(), json!(hi));
            }
            if let Some(e) = group.iter().find_map(|v| v.get("first_error")) {
                fields.insert("first_error".into(), e.clone());
            }
            fields.insert("rounds".into(), json!(group.len()));
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_one_percent() {
        for v in [0u64, 1, 127, 128, 129, 1000, 12_345, 999_999, 123_456_789] {
            let got = value_of(index(v));
            let err = (got as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.01, "{v} -> {got}");
        }
    }

    #[test]
    fn quantiles_follow_the_data() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v * 10);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.01, "{p50}");
        assert_eq!(h.quantile(1.0), 10_000);
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn rounds_fold_into_medians_per_system_mode_and_concurrency() {
        let point = |sys: &str, c: u64, round: u64, tput: f64, p99: f64, errors: u64| {
            json!({"system": sys, "mode": "leader", "concurrency": c, "round": round,
                   "msgs_per_s": tput, "p99_ms": p99, "acked": 100, "errors": errors})
        };
        let rounds = vec![
            point("chatraftd", 256, 1, 900.0, 30.0, 0),
            point("etcd", 256, 1, 500.0, 80.0, 1),
            point("chatraftd", 256, 2, 1200.0, 20.0, 2),
            point("etcd", 256, 2, 400.0, 90.0, 0),
            point("chatraftd", 256, 3, 1000.0, 50.0, 0),
            point("chatraftd", 1, 3, 300.0, 2.0, 0),
        ];
        let m = medians(&rounds);
        assert_eq!(
            m.len(),
            3,
            "one record per system, mode and concurrency: {m:?}"
        );
        let ours = &m[0];
        assert_eq!(ours["concurrency"], json!(256));
        assert_eq!(ours["msgs_per_s"], json!(1000.0));
        assert_eq!(ours["p99_ms"], json!(30.0), "each figure's own median");
        assert_eq!(ours["msgs_per_s_min"], json!(900.0));
        assert_eq!(ours["msgs_per_s_max"], json!(1200.0));
        assert_eq!(
            (ours["acked"].clone(), ours["errors"].clone()),
            (json!(300), json!(2))
        );
        assert_eq!(ours["rounds"], json!(3));
        assert!(ours.get("round").is_none());
        let etcd = &m[1];
        assert_eq!(
            etcd["msgs_per_s"],
            json!(450.0),
            "the mean of the middle two"
        );
        assert_eq!(m[2]["rounds"], json!(1));
        assert_eq!(m[2]["msgs_per_s"], json!(300.0));
    }
}
