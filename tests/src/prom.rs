//! A strict parser for the Prometheus text exposition format 0.0.4 (what `/metrics` serves),
//! and a reader for the metric table of `operations.md`, so tests check the exported metrics
//! against the spec rather than against a copy of it.
//!
//! [`parse`] rejects what a Prometheus server would reject or mis-read: bad metric or label
//! names, bad escapes, unparsable values, a `# TYPE` after its family's samples, families
//! split in two, duplicate series, histogram series without `le`, unsorted buckets, a missing
//! `le="+Inf"` bucket, non-cumulative bucket counts, `_count` different from the `+Inf` bucket,
//! a missing `_sum`/`_count`, negative counters.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket` for a histogram `x`).
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Label names, `le` excluded.
    pub fn label_names(&self) -> BTreeSet<String> {
        self.labels
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k != "le")
            .collect()
    }
}

/// A metric family: `# HELP`, `# TYPE` and its samples.
#[derive(Debug, Clone, Default)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped` (`None` without a `# TYPE`).
    pub kind: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// Sum of the samples named `name` (a family name, or `x_bucket`/`x_sum`/`x_count`) whose
    /// labels include all of `labels`; 0 when none matches (a labelled series may first appear
    /// when it first moves).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }

    /// Whether at least one sample named `name` has all of `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples(name, labels).next().is_some()
    }

    /// Samples named `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| s.name == name)
            .filter(move |s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// Every sample of every family.
    pub fn all_samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.values().flat_map(|f| f.samples.iter())
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse::<f64>().ok(),
    }
}

/// `{a="x",b="y"}` (without the braces) → pairs; handles `\\`, `\"`, `\n` and a trailing comma.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(out);
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("label without '=': {rest:?}"))?;
        let name = name.trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        if out.iter().any(|(k, _)| k == name) {
            return Err(format!("label {name:?} twice"));
        }
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value not quoted"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value not terminated")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in label {name}: {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((name.to_owned(), value));
        rest = after[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.is_empty() {
            return Err(format!("expected ',' after label {name}, got {rest:?}"));
        }
    }
}

/// One sample line → sample (timestamp, if any, checked and dropped).
fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name, labels, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            // The label block ends at the first '}' outside a quoted value.
            let body = &line[i + 1..];
            let mut in_quotes = false;
            let mut escaped = false;
            let mut close = None;
            for (j, c) in body.char_indices() {
                match (in_quotes, escaped, c) {
                    (true, true, _) => escaped = false,
                    (true, false, '\\') => escaped = true,
                    (_, false, '"') => in_quotes = !in_quotes,
                    (false, _, '}') => {
                        close = Some(j);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.ok_or("label block not closed")?;
            (
                &line[..i],
                parse_labels(&body[..close])?,
                &body[close + 1..],
            )
        }
        Some(i) => (&line[..i], Vec::new(), &line[i..]),
        None => return Err("sample without value".into()),
    };
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or("sample without value")?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The family a sample belongs to, given the families typed so far.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families
                .get(base)
                .is_some_and(|f| matches!(f.kind.as_deref(), Some("histogram" | "summary")))
            {
                return base;
            }
        }
    }
    name
}

/// Parses and validates a text exposition. The error names the line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut seen_series: BTreeSet<String> = BTreeSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("exposition does not end with a newline".into());
    }
    for (no, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", no + 1);
        if line.trim().is_empty() {
            continue;
        }
        // Switching to another family closes the current one.
        let mut enter = |name: &str, exp: &mut Exposition| -> Result<(), String> {
            if current.as_deref() != Some(name) {
                if finished.contains(name) {
                    return Err(format!("family {name} split in two"));
                }
                if let Some(prev) = current.replace(name.to_owned()) {
                    finished.insert(prev);
                }
                exp.families
                    .entry(name.to_owned())
                    .or_insert_with(|| Family {
                        name: name.to_owned(),
                        ..Family::default()
                    });
            }
            Ok(())
        };
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // a plain comment
            }
            let name = words.next().unwrap_or("");
            let arg = words.next().unwrap_or("").to_owned();
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            enter(name, &mut exp).map_err(at)?;
            let fam = exp.families.get_mut(name).ok_or("family vanished")?;
            if keyword == "HELP" {
                if fam.help.replace(arg).is_some() {
                    return Err(at("second HELP".into()));
                }
            } else {
                if !matches!(
                    arg.as_str(),
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ) {
                    return Err(at(format!("unknown type {arg:?}")));
                }
                if !fam.samples.is_empty() {
                    return Err(at("TYPE after the family's samples".into()));
                }
                if fam.kind.replace(arg).is_some() {
                    return Err(at("second TYPE".into()));
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let fam_name = family_of(&sample.name, &exp.families).to_owned();
        enter(&fam_name, &mut exp).map_err(at)?;
        let mut key = sample.labels.clone();
        key.sort();
        let series = format!("{}{key:?}", sample.name);
        if !seen_series.insert(series) {
            return Err(at("duplicate series".into()));
        }
        let fam = exp.families.get_mut(&fam_name).ok_or("family vanished")?;
        match fam.kind.as_deref() {
            Some("counter") if sample.value.is_nan() || sample.value < 0.0 => {
                return Err(at("negative or NaN counter".into()))
            }
            Some("histogram") => {
                let suffix = &sample.name[fam_name.len()..];
                if !matches!(suffix, "_bucket" | "_sum" | "_count") {
                    return Err(at("histogram sample without _bucket/_sum/_count".into()));
                }
                if (suffix == "_bucket") != sample.label("le").is_some() {
                    return Err(at("le belongs on _bucket samples only".into()));
                }
            }
            _ => {}
        }
        fam.samples.push(sample);
    }
    for fam in exp.families.values() {
        if fam.kind.as_deref() == Some("histogram") {
            check_histogram(fam)?;
        }
    }
    Ok(exp)
}

/// Label pairs of one series.
type Labels = Vec<(String, String)>;

/// Buckets sorted, `+Inf` last, counts cumulative, `_count` = `+Inf`, `_sum` present.
fn check_histogram(fam: &Family) -> Result<(), String> {
    let name = &fam.name;
    let bucket = format!("{name}_bucket");
    let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    for s in fam.samples.iter().filter(|s| s.name == bucket) {
        let le = s.label("le").ok_or("bucket without le")?;
        let le = parse_value(le).ok_or_else(|| format!("{name}: bad le {le:?}"))?;
        let key: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        series.entry(key).or_default().push((le, s.value));
    }
    for (labels, buckets) in &series {
        let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
        if bounds
            .windows(2)
            .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(format!("{name}{labels:?}: buckets not sorted: {bounds:?}"));
        }
        let Some(&(last, inf_count)) = buckets.last() else {
            continue;
        };
        if last != f64::INFINITY {
            return Err(format!("{name}{labels:?}: no le=\"+Inf\" bucket"));
        }
        if buckets.windows(2).any(|w| w[0].1 > w[1].1) {
            return Err(format!("{name}{labels:?}: bucket counts not cumulative"));
        }
        let find = |suffix: &str| {
            let n = format!("{name}{suffix}");
            fam.samples
                .iter()
                .find(|s| s.name == n && s.labels == *labels)
                .map(|s| s.value)
        };
        let count = find("_count").ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        find("_sum").ok_or_else(|| format!("{name}{labels:?}: no _sum"))?;
        if count != inf_count {
            return Err(format!(
                "{name}{labels:?}: _count {count} != +Inf bucket {inf_count}"
            ));
        }
    }
    // Every _count/_sum needs its buckets.
    for s in fam.samples.iter().filter(|s| s.name != bucket) {
        if !series.contains_key(&s.labels) {
            return Err(format!("{}{:?} without buckets", s.name, s.labels));
        }
    }
    Ok(())
}

/// Which binary exports a metric of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Hub,
    Agent,
    Both,
}

/// One metric of operations.md: `nowconnect_x_total{connector,reason}` counter — `a`, `b`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecMetric {
    pub side: Side,
    pub name: String,
    pub labels: Vec<String>,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    /// The values the spec enumerates (for the last label), if any.
    pub values: Vec<String>,
}

/// The backticked spans of `line`.
fn backticked(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// `name{a,b}` → (name, [a, b]).
fn split_name(s: &str) -> (String, Vec<String>) {
    match s.split_once('{') {
        Some((n, l)) => (
            n.to_owned(),
            l.trim_end_matches('}')
                .split(',')
                .map(|x| x.trim().to_owned())
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        None => (s.to_owned(), Vec::new()),
    }
}

/// The metrics listed under "## Prometheus metrics" in operations.md: the `Hub:` and `Agent:`
/// lists and the `Both:` line (`nowconnect_build_info` and the process metrics).
pub fn spec_metrics(operations_md: &str) -> Vec<SpecMetric> {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut side = None;
    // The `Both:` paragraph may wrap over several lines.
    let mut both = false;
    for line in operations_md.lines() {
        if line.starts_with("## ") {
            in_section = line.contains("Prometheus metrics");
            continue;
        }
        if !in_section {
            continue;
        }
        let t = line.trim();
        if t.is_empty() {
            both = false;
            continue;
        }
        if t.starts_with("Hub:") {
            (side, both) = (Some(Side::Hub), false);
        } else if t.starts_with("Agent:") {
            (side, both) = (Some(Side::Agent), false);
        } else if t.starts_with("Both:") || (both && !t.starts_with("- ")) {
            (side, both) = (None, true);
            for span in backticked(t) {
                let (name, labels) = split_name(span);
                if !is_metric_name(&name) {
                    continue;
                }
                // `nowconnect_build_info{version}` gauge = 1; process metrics are gauges.
                out.push(SpecMetric {
                    side: Side::Both,
                    name,
                    labels,
                    kind: "gauge".into(),
                    values: Vec::new(),
                });
            }
        } else if let (Some(side), Some(item)) = (side, t.strip_prefix("- `")) {
            let Some((span, rest)) = item.split_once('`') else {
                continue;
            };
            let (name, labels) = split_name(span);
            let kind = rest.split_whitespace().next().unwrap_or("").to_owned();
            let values = rest
                .split_once('—')
                .map(|(_, v)| backticked(v).iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default();
            out.push(SpecMetric {
                side,
                name,
                labels,
                kind,
                values,
            });
        }
    }
    out
}

/// operations.md: from the shared spec when it is next to the repository (or in
/// `NOWCONNECT_SPEC_DIR`), else the copy of its metric section below.
pub fn operations_md() -> String {
    let root = crate::workspace_root();
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("NOWCONNECT_SPEC_DIR") {
        candidates.push(std::path::PathBuf::from(dir).join("operations.md"));
    }
    candidates.push(root.join("spec/operations.md"));
    candidates.push(root.join("docs/spec/operations.md"));
    candidates.push(root.join("../shared/spec/operations.md"));
    for c in &candidates {
        if let Ok(text) = std::fs::read_to_string(c) {
            return text;
        }
    }
    eprintln!("[ops] operations.md not found ({candidates:?}); using the built-in copy");
    OPERATIONS_METRICS.to_owned()
}

/// The "Prometheus metrics" section of operations.md, for checkouts without the spec.
pub const OPERATIONS_METRICS: &str = "\
## Prometheus metrics (`GET /metrics`, text exposition format 0.0.4)

Hub:
- `nowconnect_tunnels_active` gauge
- `nowconnect_tunnel_handshakes_total{result}` counter — `ok`, `unauthorized`, `forbidden`, `bad_request`, `version`, `overloaded`
- `nowconnect_agents_connected{agent_id}` gauge (tunnels per agent)
- `nowconnect_connector_available{connector}` gauge — 1 when a healthy session serves it
- `nowconnect_streams_active{connector}` gauge
- `nowconnect_streams_opened_total{connector}` counter
- `nowconnect_streams_closed_total{connector,reason}` counter — `normal`, `reset`, `idle_timeout`, `tunnel_lost`, `shutdown`
- `nowconnect_stream_open_failures_total{connector,reason}` counter — `no_agent`, `denied`, `client_not_allowed`, `connect_refused`, `connect_timeout`, `no_healthy_backend`, `timeout`, `refused_stream`
- `nowconnect_bytes_total{connector,direction}` counter — `c2a`, `a2c`
- `nowconnect_open_duration_seconds{connector}` histogram — client accept to OPEN_OK
- `nowconnect_pdp_requests_total{result}` counter — `allow`, `deny`, `error`, `cached_allow`, `cached_deny`
- `nowconnect_pdp_duration_seconds` histogram
- `nowconnect_jwks_refresh_total{result}` counter — `ok`, `error`
- `nowconnect_protocol_errors_total{kind}` counter

Agent:
- `nowconnect_agent_tunnels_up` gauge
- `nowconnect_agent_connects_total{result}` counter — `ok`, `unauthorized`, `forbidden`, `proxy_error`, `tls_error`, `network_error`
- `nowconnect_agent_backend_up{connector,backend}` gauge
- `nowconnect_agent_backend_connect_duration_seconds{connector}` histogram
- `nowconnect_agent_streams_active{connector}` gauge
- `nowconnect_agent_bytes_total{connector,direction}` counter
- `nowconnect_agent_token_expiry_seconds` gauge — seconds until the current token expires

Both: `nowconnect_build_info{version}` gauge = 1, and process metrics where cheap
(`process_resident_memory_bytes`, `process_open_fds`, `process_threads`).
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_exposition() {
        let text = "# HELP a_total things\n# TYPE a_total counter\na_total{k=\"x\\\"y\",j=\"2\"} 3\n\
                    # TYPE h histogram\nh_bucket{c=\"l\",le=\"0.1\"} 1\nh_bucket{c=\"l\",le=\"+Inf\"} 2\n\
                    h_sum{c=\"l\"} 0.3\nh_count{c=\"l\"} 2\n# TYPE g gauge\ng 7 1700000000000\n";
        let e = parse(text).expect("valid");
        assert_eq!(e.value("a_total", &[("k", "x\"y")]), 3.0);
        assert_eq!(e.value("h_count", &[("c", "l")]), 2.0);
        assert_eq!(e.value("g", &[]), 7.0);
        assert_eq!(
            e.family("h").and_then(|f| f.kind.as_deref()),
            Some("histogram")
        );
    }

    #[test]
    fn rejects_broken_expositions() {
        let bad = [
            "x{a=\"1\"} 1\nx{a=\"1\"} 2\n",                          // duplicate series
            "# TYPE x counter\nx -1\n",                              // negative counter
            "x 1\n# TYPE x counter\n",                               // TYPE after samples
            "x 1\ny 1\nx{a=\"b\"} 2\n",                              // split family
            "x{a=1} 1\n",                                            // unquoted label
            "x{1a=\"1\"} 1\n",                                       // bad label name
            "x one\n",                                               // bad value
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
            "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // no _sum
            "# TYPE x flubber\n",
            "x 1",                                                   // no final newline
        ];
        for text in bad {
            assert!(parse(text).is_err(), "accepted {text:?}");
        }
    }

    #[test]
    fn reads_the_spec_table() {
        let md = "# Ops\n## Prometheus metrics (x)\n\nHub:\n- `nowconnect_a_total{connector,reason}` counter — `x`, `y`\n- `nowconnect_g` gauge\nAgent:\n- `nowconnect_h_seconds{connector}` histogram\n\nBoth: `nowconnect_build_info{version}` gauge = 1, and\n(`process_threads`).\n\nNot a metric: `x_total`.\n## Logs\n- `nope` counter\n";
        let m = spec_metrics(md);
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[0].name, "nowconnect_a_total");
        assert_eq!(m[0].labels, ["connector", "reason"]);
        assert_eq!(m[0].values, ["x", "y"]);
        assert_eq!(m[0].side, Side::Hub);
        assert_eq!(m[2].kind, "histogram");
        assert_eq!(m[2].side, Side::Agent);
        assert_eq!(m[3].name, "nowconnect_build_info");
        assert_eq!(m[4].name, "process_threads");
        assert_eq!(m[4].side, Side::Both);
    }
}
