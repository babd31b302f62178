//! The daemon's counters and the `stats` record (every `--stats-interval`, and at exit).
//! Pure: the daemon feeds it the records it prints; no IO.
//!
//! Counters are cumulative since fsmon started (a consumer computes rates by difference,
//! as with Prometheus counters). Durations (`freeze_us`, `gated_us`, `arm_us`) go into a
//! log-linear histogram of bounded size, so percentiles over a run of months cost a few
//! hundred bytes; a reported percentile is the upper bound of its bucket, at most 12.5 %
//! above the exact value (and never above the exact maximum, which is kept too).

use std::{collections::BTreeMap, time::SystemTime};

use serde_json::{json, Map, Value};

use crate::{event::FileKind, record};

/// Every record kind a stats record counts (all present, zero or not).
pub const RECORD_KINDS: [&str; 10] = [
    "ready",
    "container_start",
    "container_stop",
    "overflow",
    "create",
    "modify",
    "attrib",
    "delete",
    "rename",
    "stats",
];

/// Every `overflow` reason (all present in a stats record, zero or not).
pub const OVERFLOW_REASONS: [&str; 5] = [
    "queue",
    "watch_limit",
    "fd_limit",
    "arm_failed",
    "lifecycle",
];

/// Values below this are their own bucket; above it, 8 buckets per power of two.
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;

/// A log-linear histogram of microsecond durations.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    buckets: BTreeMap<u32, u64>,
    count: u64,
    max: u64,
}

fn bucket_of(v: u64) -> u32 {
    if v < LINEAR {
        return v as u32;
    }
    let exp = 63 - v.leading_zeros(); // >= 4
    let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as u32 + (exp - 4) * (1 << SUB_BITS) + sub as u32
}

/// The largest value that falls into bucket `b`.
fn bucket_upper(b: u32) -> u64 {
    if u64::from(b) < LINEAR {
        return u64::from(b);
    }
    let i = b - LINEAR as u32;
    let exp = 4 + i / (1 << SUB_BITS);
    let sub = u64::from(i % (1 << SUB_BITS));
    let width = 1u64 << (exp - SUB_BITS);
    (1u64 << exp) - 1 + (sub + 1) * width
}

impl Histogram {
    /// Adds one sample.
    pub fn add(&mut self, v: u64) {
        *self.buckets.entry(bucket_of(v)).or_default() += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    /// The `q` quantile (0 < q <= 1): the upper bound of the bucket holding it, capped at
    /// the maximum seen; `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        // The rank of the sample that is the quantile (nearest-rank method).
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (&b, &n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper(b).min(self.max));
            }
        }
        Some(self.max)
    }

    fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "p50_us": self.quantile(0.5),
            "p99_us": self.quantile(0.99),
            "max_us": (self.count > 0).then_some(self.max),
        })
    }
}

/// What the daemon counted since it started.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    records: BTreeMap<String, u64>,
    overflows: BTreeMap<String, u64>,
    freezes: Histogram,
    gate_holds: Histogram,
    arms: Histogram,
    late_arms: u64,
}

/// What the daemon knows at the moment of a stats record, beyond the counters.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Containers monitored now.
    pub containers_monitored: usize,
    /// Containers that could not be armed yet (retried every second).
    pub containers_unarmed: usize,
    /// inotify watches held now.
    pub watches: usize,
    /// Lifecycle records the eBPF ring buffer had no room for, since start.
    pub lifecycle_lost: u64,
    /// Seconds since fsmon started.
    pub uptime_s: f64,
    /// True for the record printed at exit.
    pub last: bool,
}

impl Stats {
    /// Counts one file record.
    pub fn file_record(&mut self, kind: FileKind) {
        *self.records.entry(kind.as_str().to_owned()).or_default() += 1;
    }

    /// Counts one daemon record (`ready`, `container_*`, `overflow`, `stats`), given as the
    /// line printed, so that what is counted is exactly what the stream carried.
    pub fn daemon_record(&mut self, line: &str) {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let kind = m.get("kind").and_then(Value::as_str).unwrap_or_default();
        *self.records.entry(kind.to_owned()).or_default() += 1;
        match kind {
            "overflow" => {
                let reason = m.get("reason").and_then(Value::as_str).unwrap_or_default();
                *self.overflows.entry(reason.to_owned()).or_default() += 1;
            }
            "container_start" => {
                let us = |k: &str| m.get(k).and_then(Value::as_u64);
                if let Some(v) = us("freeze_us") {
                    self.freezes.add(v);
                }
                if let Some(v) = us("gated_us") {
                    self.gate_holds.add(v);
                }
                if let Some(v) = us("arm_us") {
                    self.arms.add(v);
                }
            }
            _ => {}
        }
    }

    /// Counts a container armed later than its start (after failed attempts, or without
    /// the cgroup it was waiting for).
    pub fn late_arm(&mut self) {
        self.late_arms += 1;
    }

    /// The `stats` record.
    pub fn record(&self, now: SystemTime, g: &Gauges) -> String {
        let count = |m: &BTreeMap<String, u64>, keys: &[&str]| {
            let mut o = Map::new();
            for k in keys {
                o.insert((*k).to_owned(), json!(m.get(*k).copied().unwrap_or(0)));
            }
            for (k, v) in m {
                if !o.contains_key(k) {
                    o.insert(k.clone(), json!(v));
                }
            }
            Value::Object(o)
        };
        let body = json!({
            "final": g.last,
            "uptime_s": (g.uptime_s * 1000.0).round() / 1000.0,
            "containers": {
                "monitored": g.containers_monitored,
                "unarmed": g.containers_unarmed,
            },
            "watches": g.watches,
            "records": count(&self.records, &RECORD_KINDS),
            "overflows": count(&self.overflows, &OVERFLOW_REASONS),
            "lifecycle_lost": g.lifecycle_lost,
            "freezes": self.freezes.to_json(),
            "gate_holds": self.gate_holds.to_json(),
            "arms": self.arms.to_json(),
            "late_arms": self.late_arms,
        });
        record::stats(now, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            last = b;
            let up = bucket_upper(b);
            assert!(up >= v, "{v} above its bucket's bound {up}");
            assert!(up as f64 <= v as f64 * 1.125 + 1.0, "{v} -> {up}");
        }
        assert_eq!(bucket_upper(bucket_of(u64::MAX)), u64::MAX);
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=100 {
            h.add(v);
        }
        let p50 = h.quantile(0.5).expect("samples");
        assert!((50..=56).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).expect("samples");
        assert!((99..=100).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(100));
        let mut one = Histogram::default();
        one.add(412);
        assert_eq!(one.quantile(0.5), Some(412), "capped at the maximum");
    }

    #[test]
    fn counts_what_was_printed() {
        let mut s = Stats::default();
        // Lines as the daemon prints them (written out, so that this test does not depend
        // on the encoders' signatures).
        let c = r#""container":{"id":"aa","name":null,"image":null}"#;
        s.daemon_record(&record::ready(UNIX_EPOCH, &[]));
        s.daemon_record(&format!(
            r#"{{"time":"t","kind":"container_start",{c},"upperdir":"/u","freeze_us":300,"gated_us":null,"arm_us":700}}"#
        ));
        s.daemon_record(&format!(
            r#"{{"time":"t","kind":"container_start",{c},"upperdir":"/u","freeze_us":null,"gated_us":40,"arm_us":null}}"#
        ));
        s.daemon_record(&format!(
            r#"{{"time":"t","kind":"overflow",{c},"reason":"arm_failed"}}"#
        ));
        s.file_record(FileKind::Create);
        s.file_record(FileKind::Create);
        s.late_arm();
        let g = Gauges {
            containers_monitored: 2,
            watches: 9,
            lifecycle_lost: 1,
            last: true,
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&s.record(UNIX_EPOCH, &g)).expect("json");
        assert_eq!(v["kind"], "stats");
        assert_eq!(v["final"], true);
        assert_eq!(v["records"]["ready"], 1);
        assert_eq!(v["records"]["container_start"], 2);
        assert_eq!(v["records"]["create"], 2);
        assert_eq!(v["records"]["delete"], 0);
        assert_eq!(v["overflows"]["arm_failed"], 1);
        assert_eq!(v["overflows"]["queue"], 0);
        assert_eq!(v["freezes"]["count"], 1);
        assert_eq!(v["freezes"]["p50_us"], 300);
        assert_eq!(v["arms"]["max_us"], 700);
        assert_eq!(v["gate_holds"]["count"], 1);
        assert_eq!(v["gate_holds"]["p99_us"], 40);
        assert_eq!(v["arms"]["count"], 1);
        assert_eq!(v["late_arms"], 1);
        assert_eq!(v["watches"], 9);
        assert_eq!(v["lifecycle_lost"], 1);
        assert_eq!(v["containers"]["monitored"], 2);
    }
}
