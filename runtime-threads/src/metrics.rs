//! A small Prometheus registry (text exposition format 0.0.4, operations.md).
//!
//! Counters, gauges and histograms keyed by name + label values. Updates take one mutex briefly;
//! they happen per stream or per tunnel event, never per byte (byte counters are added in
//! batches by the stream threads).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

/// Default histogram buckets in seconds: 1 ms … 30 s (open latency, PDP latency, connects).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    label_names: &'static [&'static str],
    buckets: &'static [f64],
    series: BTreeMap<Vec<String>, Series>,
}

#[derive(Debug, Clone)]
enum Series {
    Value(f64),
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

/// A registry shared by every thread of one process.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, Family>> {
        // A panic while holding this lock leaves plain numbers behind; keep serving them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn declare(
        &self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        label_names: &'static [&'static str],
        buckets: &'static [f64],
    ) {
        self.lock().entry(name).or_insert_with(|| Family {
            kind,
            help,
            label_names,
            buckets,
            series: BTreeMap::new(),
        });
    }

    /// Declares a counter (shown with no series until it first moves, unless unlabelled).
    pub fn counter(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) {
        self.declare(name, Kind::Counter, help, labels, &[]);
        if labels.is_empty() {
            self.add(name, &[], 0.0);
        }
    }

    /// Declares a gauge.
    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) {
        self.declare(name, Kind::Gauge, help, labels, &[]);
        if labels.is_empty() {
            self.add(name, &[], 0.0);
        }
    }

    /// Declares a histogram with the given bucket upper bounds.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) {
        self.declare(name, Kind::Histogram, help, labels, buckets);
    }

    fn with_series(&self, name: &str, labels: &[&str], f: impl FnOnce(&mut Series, &[f64])) {
        let mut g = self.lock();
        let Some(fam) = g.get_mut(name) else {
            debug_assert!(false, "metric {name} not declared");
            return;
        };
        let buckets = fam.buckets;
        let kind = fam.kind;
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        let s = fam.series.entry(key).or_insert_with(|| match kind {
            Kind::Histogram => Series::Histogram {
                counts: vec![0; buckets.len()],
                sum: 0.0,
                count: 0,
            },
            _ => Series::Value(0.0),
        });
        f(s, buckets);
    }

    /// Adds `v` to a counter or gauge series.
    pub fn add(&self, name: &str, labels: &[&str], v: f64) {
        self.with_series(name, labels, |s, _| {
            if let Series::Value(x) = s {
                *x += v;
            }
        });
    }

    /// Increments a counter series by one.
    pub fn inc(&self, name: &str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// Sets a gauge series.
    pub fn set(&self, name: &str, labels: &[&str], v: f64) {
        self.with_series(name, labels, |s, _| {
            if let Series::Value(x) = s {
                *x = v;
            }
        });
    }

    /// Removes one series (e.g. a gauge for an agent that left).
    pub fn remove(&self, name: &str, labels: &[&str]) {
        if let Some(fam) = self.lock().get_mut(name) {
            let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
            fam.series.remove(&key);
        }
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[&str], v: f64) {
        self.with_series(name, labels, |s, buckets| {
            if let Series::Histogram { counts, sum, count } = s {
                for (i, b) in buckets.iter().enumerate() {
                    if v <= *b {
                        counts[i] += 1;
                    }
                }
                *sum += v;
                *count += 1;
            }
        });
    }

    /// Current value of a counter/gauge series (0 when absent). For tests and status pages.
    pub fn value(&self, name: &str, labels: &[&str]) -> f64 {
        let g = self.lock();
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        match g.get(name).and_then(|f| f.series.get(&key)) {
            Some(Series::Value(v)) => *v,
            Some(Series::Histogram { count, .. }) => *count as f64,
            None => 0.0,
        }
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let g = self.lock();
        let mut out = String::with_capacity(4096);
        for (name, fam) in g.iter() {
            let kind = match fam.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (values, s) in &fam.series {
                let labels = render_labels(fam.label_names, values, None);
                match s {
                    Series::Value(v) => {
                        let _ = writeln!(out, "{name}{labels} {}", fmt_f64(*v));
                    }
                    Series::Histogram { counts, sum, count } => {
                        for (b, c) in fam.buckets.iter().zip(counts) {
                            let l = render_labels(fam.label_names, values, Some(&fmt_f64(*b)));
                            let _ = writeln!(out, "{name}_bucket{l} {c}");
                        }
                        let l = render_labels(fam.label_names, values, Some("+Inf"));
                        let _ = writeln!(out, "{name}_bucket{l} {count}");
                        let _ = writeln!(out, "{name}_sum{labels} {}", fmt_f64(*sum));
                        let _ = writeln!(out, "{name}_count{labels} {count}");
                    }
                }
            }
        }
        out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_labels(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Adds the process metrics of operations.md (`process_resident_memory_bytes`,
/// `process_open_fds`, `process_threads`) read from /proc at scrape time.
pub fn render_process() -> String {
    let mut out = String::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    if let Some(kb) = field("VmRSS:") {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory in bytes"
        );
        let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
        let _ = writeln!(out, "process_resident_memory_bytes {}", kb * 1024);
    }
    if let Some(n) = field("Threads:") {
        let _ = writeln!(out, "# HELP process_threads Number of OS threads");
        let _ = writeln!(out, "# TYPE process_threads gauge");
        let _ = writeln!(out, "process_threads {n}");
    }
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# HELP process_open_fds Open file descriptors");
        let _ = writeln!(out, "# TYPE process_open_fds gauge");
        let _ = writeln!(out, "process_open_fds {}", rd.count());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_histograms() {
        let r = Registry::new();
        r.counter("x_total", "things", &["kind"]);
        r.gauge("g", "a gauge", &[]);
        r.histogram("h_seconds", "latency", &["c"], &[0.1, 1.0]);
        r.inc("x_total", &["a\"b"]);
        r.add("x_total", &["a\"b"], 2.0);
        r.set("g", &[], 7.0);
        r.observe("h_seconds", &["ldap"], 0.5);
        let text = r.render();
        assert!(text.contains("x_total{kind=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("g 7\n"), "{text}");
        assert!(
            text.contains("h_seconds_bucket{c=\"ldap\",le=\"0.1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{c=\"ldap\",le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{c=\"ldap\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("h_seconds_count{c=\"ldap\"} 1\n"), "{text}");
        assert_eq!(r.value("x_total", &["a\"b"]), 3.0);
    }
}
