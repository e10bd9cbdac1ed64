//! The deployment files in `deploy/` are what they claim to be: the example configs pass
//! `--check` on the real binaries, the systemd units are hardened and verify, the Kubernetes
//! manifest is consistent with the hub config it carries, and the Grafana dashboard only queries
//! metrics that operations.md names and the code exports.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nowconnect_tests::{bin_path, run_cmd, temp_dir, workspace_root, write_file, TestCa};
use serde_yaml::Value;

const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

fn deploy(file: &str) -> PathBuf {
    workspace_root().join("deploy").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `<bin> --check --config <config>` with exactly `env` added to a clean environment (no
/// NOWCONNECT_*, proxy or CREDENTIALS_DIRECTORY leaking in from the test's own).
fn check(bin: &str, config: &Path, env: &[(&str, &OsStr)]) -> nowconnect_tests::CmdOutput {
    let mut cmd = Command::new(bin_path(bin));
    cmd.arg("--check").arg("--config").arg(config).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_cmd(cmd, None, CHECK_TIMEOUT)
}

/// Parses a duration of the configs' form (`30s`, `5m`, `1h`, `500ms`).
fn duration(s: &str) -> Duration {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("duration {s:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("duration {s:?}: unit {unit:?}"),
    }
}

fn yaml(text: &str, what: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{what} is not YAML: {e}"))
}

/// `value.a.b.c` as a string, panicking with the path when missing.
fn get<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    let mut v = value;
    for key in path {
        v = v
            .get(*key)
            .unwrap_or_else(|| panic!("missing {} in {value:?}", path.join(".")));
    }
    v
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    get(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

/// `shutdown_grace` of a config (default 30s, configuration.md).
fn shutdown_grace(config: &Value) -> Duration {
    config
        .get("limits")
        .and_then(|l| l.get("shutdown_grace"))
        .and_then(Value::as_str)
        .map_or(Duration::from_secs(30), duration)
}

/// A CA and a hub certificate in `dir`: `<cert>` / `<key>`; returns the CA.
fn hub_tls(dir: &Path, cert: &str, key: &str) -> TestCa {
    let ca = TestCa::new("deploy test CA");
    let (cert_pem, key_pem) = ca.issue(&["hub.example.com"], true, false);
    write_file(&dir.join(cert), cert_pem, 0o644);
    write_file(&dir.join(key), key_pem, 0o600);
    ca
}

#[test]
fn example_hub_yaml_passes_check_with_its_credentials() {
    let dir = temp_dir("deploy-hub");
    let config = dir.path().join("hub.yaml");
    std::fs::copy(deploy("hub.yaml"), &config).expect("copy deploy/hub.yaml");
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir credentials");

    // Without the credential files the check must fail: it really reads what the file names.
    let out = check(
        "nowconnect-hub",
        &config,
        &[("CREDENTIALS_DIRECTORY", creds.as_os_str())],
    );
    assert_eq!(out.code(), Some(2), "check without hub.crt/hub.key:\n{out}");
    assert!(out.stderr.contains("tls.cert"), "{out}");

    // What nowconnect-hub.service's LoadCredential= provides.
    hub_tls(&creds, "hub.crt", "hub.key");
    let out = check(
        "nowconnect-hub",
        &config,
        &[("CREDENTIALS_DIRECTORY", creds.as_os_str())],
    )
    .assert_success();
    assert_eq!(out.stdout.trim(), "ok", "{out}");
    assert!(out.stderr.trim().is_empty(), "warnings:\n{out}");
}

#[test]
fn example_agent_yaml_passes_check_with_its_credentials() {
    let dir = temp_dir("deploy-agent");
    let config = dir.path().join("agent.yaml");
    std::fs::copy(deploy("agent.yaml"), &config).expect("copy deploy/agent.yaml");
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir credentials");
    // hub.ca_file (relative: next to agent.yaml) and the token credential.
    TestCa::new("corporate proxy CA").write_cert(&dir.path().join("corp-ca.pem"));
    write_file(&creds.join("token"), "eyJ.placeholder.token\n", 0o600);

    // ${PROXY_PASSWORD} comes from agent.env under systemd; missing, it is a config error.
    let out = check(
        "nowconnect-agent",
        &config,
        &[("CREDENTIALS_DIRECTORY", creds.as_os_str())],
    );
    assert_eq!(out.code(), Some(2), "check without PROXY_PASSWORD:\n{out}");
    assert!(out.stderr.contains("PROXY_PASSWORD"), "{out}");

    let out = check(
        "nowconnect-agent",
        &config,
        &[
            ("CREDENTIALS_DIRECTORY", creds.as_os_str()),
            ("PROXY_PASSWORD", OsStr::new("proxy-secret")),
        ],
    )
    .assert_success();
    assert_eq!(out.stdout.trim(), "ok", "{out}");
    assert!(out.stderr.trim().is_empty(), "warnings:\n{out}");
}

/// The example configs carry the connectors the README's how-tos talk about, on both sides.
#[test]
fn example_configs_pair_up_connectors() {
    let hub = yaml(&read(&deploy("hub.yaml")), "deploy/hub.yaml");
    let agent = yaml(&read(&deploy("agent.yaml")), "deploy/agent.yaml");
    let names = |cfg: &Value| -> BTreeSet<String> {
        get(cfg, &["connectors"])
            .as_sequence()
            .expect("connectors is a list")
            .iter()
            .map(|c| str_at(c, &["name"]).to_owned())
            .collect()
    };
    let hub_names = names(&hub);
    assert_eq!(
        hub_names,
        names(&agent),
        "hub and agent examples serve different connectors"
    );
    let ports: BTreeSet<String> = get(&hub, &["connectors"])
        .as_sequence()
        .expect("connectors is a list")
        .iter()
        .map(|c| {
            let listen = str_at(c, &["listen"]);
            listen.rsplit(':').next().expect("port").to_owned()
        })
        .collect();
    for port in ["389", "636", "5432"] {
        assert!(
            ports.contains(port),
            "deploy/hub.yaml has no :{port} connector"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `Key=value` lines of a unit, every value per key in order.
fn unit_directives(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line:?}"));
        map.entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    map
}

fn one<'a>(unit: &'a BTreeMap<String, Vec<String>>, key: &str, name: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{name}: expected exactly one {key}=, got {other:?}"),
    }
}

fn check_unit(name: &str, binary: &str, config: &str, hub: bool) {
    let text = read(&deploy(name));
    let unit = unit_directives(&text);
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("KillSignal", "SIGTERM"),
        ("ConfigurationDirectory", "nowconnect"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(one(&unit, key, name), want, "{name}: {key}");
    }
    let filters = unit.get("SystemCallFilter").expect("SystemCallFilter");
    assert!(
        filters.iter().any(|f| f == "@system-service"),
        "{name}: SystemCallFilter=@system-service missing"
    );
    // Capabilities: only the hub, only for binding ports below 1024.
    let caps = if hub { "CAP_NET_BIND_SERVICE" } else { "" };
    assert_eq!(one(&unit, "CapabilityBoundingSet", name), caps, "{name}");
    assert_eq!(one(&unit, "AmbientCapabilities", name), caps, "{name}");
    // Neither binary reloads: an ExecReload would kill it with SIGHUP.
    assert!(!unit.contains_key("ExecReload"), "{name}: ExecReload");
    assert_eq!(
        one(&unit, "ExecStart", name),
        format!("/usr/local/bin/{binary} --config /etc/nowconnect/{config}"),
        "{name}: ExecStart"
    );
    // systemd must never cut the drain short.
    let cfg = yaml(&read(&deploy(config)), config);
    let grace = shutdown_grace(&cfg);
    let stop = duration(one(&unit, "TimeoutStopSec", name));
    assert!(
        stop > grace,
        "{name}: TimeoutStopSec {stop:?} <= shutdown_grace {grace:?}"
    );
    // Every ${CREDENTIALS_DIRECTORY}/<id> the example config uses has a LoadCredential=<id>.
    let loaded: BTreeSet<&str> = unit
        .get("LoadCredential")
        .map(|v| v.iter().filter_map(|c| c.split(':').next()).collect())
        .unwrap_or_default();
    let text = read(&deploy(config));
    let mut used = BTreeSet::new();
    for part in text.split("${CREDENTIALS_DIRECTORY}/").skip(1) {
        let id: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .collect();
        used.insert(id);
    }
    assert!(!used.is_empty(), "{config} uses no credential");
    for id in &used {
        assert!(
            loaded.contains(id.as_str()),
            "{config} reads ${{CREDENTIALS_DIRECTORY}}/{id} but {name} has no LoadCredential={id}:..."
        );
    }

    // systemd's own checks, with ExecStart pointing at the real binary: no unknown or
    // unparsable directive (verify only warns on those, so stderr must be empty), and an
    // exposure score of at most 2.0 out of 10 in `systemd-analyze security`.
    let dir = temp_dir("deploy-unit");
    let real = bin_path(binary);
    let local = dir.path().join(name);
    write_file(
        &local,
        read(&deploy(name)).replace(
            &format!("/usr/local/bin/{binary}"),
            real.to_str().expect("utf-8 path"),
        ),
        0o644,
    );
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&local);
    let out = run_cmd(verify, None, CHECK_TIMEOUT);
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify {name} (systemd is in .ci/run's APT_PACKAGES):\n{out}"
    );
    let mut security = Command::new("systemd-analyze");
    security
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&local);
    let out = run_cmd(security, None, CHECK_TIMEOUT);
    assert!(out.success(), "systemd-analyze security {name}:\n{out}");
}

#[test]
fn hub_unit_is_hardened_and_verifies() {
    check_unit("nowconnect-hub.service", "nowconnect-hub", "hub.yaml", true);
}

#[test]
fn agent_unit_is_hardened_and_verifies() {
    check_unit(
        "nowconnect-agent.service",
        "nowconnect-agent",
        "agent.yaml",
        false,
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn k8s_docs() -> Vec<Value> {
    let text = read(&deploy("k8s/hub.yaml"));
    let mut docs = Vec::new();
    // Documents are separated by `---` lines (the manifest has no block scalar holding one).
    for (i, doc) in text.split("\n---\n").enumerate() {
        let v = yaml(doc, &format!("deploy/k8s/hub.yaml document {i}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

fn port_of(listen: &str) -> u64 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("listen {listen:?}"))
}

#[test]
fn k8s_manifest_is_consistent_with_its_hub_config() {
    let docs = k8s_docs();
    for d in &docs {
        for key in ["apiVersion", "kind"] {
            str_at(d, &[key]);
        }
        str_at(d, &["metadata", "name"]);
    }
    let of_kind = |kind: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
            .collect()
    };
    let [config_map] = of_kind("ConfigMap")[..] else {
        panic!("expected one ConfigMap")
    };
    let [deployment] = of_kind("Deployment")[..] else {
        panic!("expected one Deployment")
    };
    assert_eq!(str_at(deployment, &["apiVersion"]), "apps/v1");
    let hub_text = str_at(config_map, &["data", "hub.yaml"]);
    let hub = yaml(hub_text, "the ConfigMap's hub.yaml");

    let pod = get(deployment, &["spec", "template"]);
    let labels = get(pod, &["metadata", "labels"]);
    assert_eq!(
        get(deployment, &["spec", "selector", "matchLabels"]),
        labels,
        "Deployment selector != pod labels"
    );
    let spec = get(pod, &["spec"]);
    let containers = get(spec, &["containers"])
        .as_sequence()
        .expect("containers");
    let [c] = &containers[..] else {
        panic!("expected one container")
    };

    // Named container ports → numbers.
    let ports: BTreeMap<String, u64> = get(c, &["ports"])
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                str_at(p, &["name"]).to_owned(),
                get(p, &["containerPort"]).as_u64().expect("containerPort"),
            )
        })
        .collect();
    let resolve = |port: &Value| -> u64 {
        match port {
            Value::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name:?}")),
            other => other.as_u64().expect("port number"),
        }
    };

    // Probes on the admin listener: /readyz for readiness, /healthz for liveness.
    let admin = port_of(str_at(&hub, &["admin", "listen"]));
    assert!(
        str_at(&hub, &["admin", "listen"]).starts_with("0.0.0.0:"),
        "probes come from the kubelet: admin must listen on the pod IP"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(str_at(c, &[probe, "httpGet", "path"]), path, "{probe}");
        assert_eq!(
            resolve(get(c, &[probe, "httpGet", "port"])),
            admin,
            "{probe} port"
        );
    }

    // preStop, then SIGTERM's drain: the grace period must cover both.
    let pre_stop = get(c, &["lifecycle", "preStop"]);
    let pre_stop_secs = pre_stop
        .get("sleep")
        .and_then(|s| s.get("seconds"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        pre_stop.get("sleep").is_some() || pre_stop.get("exec").is_some(),
        "preStop must wait for the endpoints to drop the pod"
    );
    let grace = get(spec, &["terminationGracePeriodSeconds"])
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop_secs) + shutdown_grace(&hub),
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop_secs}s + shutdown_grace"
    );

    // Non-root, read-only root filesystem, no privilege escalation, no capability.
    assert_eq!(
        get(spec, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    // The image (deploy/Containerfile) runs as the same non-root user, from the static build.
    let uid = get(spec, &["securityContext", "runAsUser"])
        .as_u64()
        .expect("runAsUser");
    assert_ne!(uid, 0);
    let containerfile = read(&deploy("Containerfile"));
    assert!(
        containerfile.contains(&format!("\nUSER {uid}:")),
        "Containerfile USER is not runAsUser {uid}"
    );
    assert!(containerfile.contains("COPY target/static/nowconnect-hub "));
    let sc = get(c, &["securityContext"]);
    assert_eq!(get(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    assert_eq!(
        get(sc, &["allowPrivilegeEscalation"]).as_bool(),
        Some(false)
    );
    assert_eq!(
        get(sc, &["capabilities", "drop"]),
        &yaml("[ALL]", "drop list")
    );
    // A non-root user cannot bind below 1024 without a capability: all listeners are high.
    let mut listens = vec![port_of(str_at(&hub, &["listen"])), admin];
    let connectors = get(&hub, &["connectors"])
        .as_sequence()
        .expect("connectors");
    for conn in connectors {
        listens.push(port_of(str_at(conn, &["listen"])));
    }
    for port in &listens {
        assert!(*port >= 1024, "listener on port {port} needs a capability");
        assert!(
            ports.values().any(|p| p == port),
            "listener port {port} is not a containerPort"
        );
    }

    // The mounts put the config where args point and the TLS files where the config points.
    let args: Vec<&str> = get(c, &["args"])
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args, ["--config", "/etc/nowconnect/hub.yaml"]);
    let mounts: Vec<&str> = get(c, &["volumeMounts"])
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|m| str_at(m, &["mountPath"]))
        .collect();
    assert!(mounts.contains(&"/etc/nowconnect/hub.yaml"), "{mounts:?}");
    for key in ["cert", "key"] {
        let file = str_at(&hub, &["tls", key]);
        assert!(
            mounts.iter().any(|m| file.starts_with(&format!("{m}/"))),
            "tls.{key} {file} is on no mounted volume"
        );
    }

    // Services: each selects the pod; the tunnel Service reaches `listen`; one per connector.
    let services = of_kind("Service");
    let mut service_targets = Vec::new();
    for s in &services {
        let sel = get(s, &["spec", "selector"])
            .as_mapping()
            .expect("selector");
        for (k, v) in sel {
            assert_eq!(
                labels.get(k),
                Some(v),
                "Service selector {k:?} != pod label"
            );
        }
        for p in get(s, &["spec", "ports"]).as_sequence().expect("ports") {
            service_targets.push(resolve(get(p, &["targetPort"])));
        }
    }
    assert!(
        service_targets.contains(&port_of(str_at(&hub, &["listen"]))),
        "no Service for the tunnel listener"
    );
    for conn in connectors {
        let port = port_of(str_at(conn, &["listen"]));
        let n = service_targets.iter().filter(|p| **p == port).count();
        assert_eq!(
            n,
            1,
            "connector {} (:{port}) needs exactly one Service port",
            str_at(conn, &["name"])
        );
    }
    assert!(
        !service_targets.contains(&admin),
        "the admin listener must not be exposed by a Service"
    );

    // And the embedded hub.yaml is a valid hub config: --check it with the Secret's files.
    let dir = temp_dir("deploy-k8s");
    hub_tls(dir.path(), "tls.crt", "tls.key");
    let tls_dir = dir.path().to_str().expect("utf-8 temp path");
    let config = dir.path().join("hub.yaml");
    write_file(
        &config,
        hub_text.replace("/etc/nowconnect/tls", tls_dir),
        0o644,
    );
    let out = check("nowconnect-hub", &config, &[]).assert_success();
    assert_eq!(out.stdout.trim(), "ok", "{out}");
}

// ---------------------------------------------------------------------------------------------
// Grafana

/// Identifiers in a PromQL expression that look like metric names of ours.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    // Label values and matchers sit in quotes: skip them.
    let mut in_quotes = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch == '"' {
            in_quotes = !in_quotes;
        }
        if !in_quotes && (ch.is_ascii_alphanumeric() || ch == '_' || ch == ':') {
            word.push(ch);
            continue;
        }
        if word.starts_with("nowconnect_") || word.starts_with("process_") {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

/// Every metric name operations.md defines (backquoted, optionally followed by `{labels}`).
fn spec_metrics() -> BTreeSet<String> {
    let text = nowconnect_tests::prom::operations_md();
    let mut names = BTreeSet::new();
    for part in text.split('`').skip(1).step_by(2) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.starts_with("nowconnect_") || name.starts_with("process_") {
            names.insert(name);
        }
    }
    assert!(
        names.len() >= 20,
        "parsed too few metrics from operations.md: {names:?}"
    );
    names
}

/// Metric names the code exports: string literals in the metric modules of hub, agent and
/// runtime (the names are spelled once there; the process metrics are written by the runtime).
fn code_metrics() -> BTreeSet<String> {
    let root = workspace_root();
    let mut names = BTreeSet::new();
    for file in [
        "hub/src/metrics.rs",
        "agent/src/metrics.rs",
        "runtime-threads/src/metrics.rs",
    ] {
        for line in read(&root.join(file)).lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for literal in code.split('"').skip(1).step_by(2) {
                names.extend(
                    literal
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .filter(|w| w.starts_with("nowconnect_") || w.starts_with("process_"))
                        .map(str::to_owned),
                );
            }
        }
    }
    names
}

/// A series name as queried → the metric family (`_bucket`, `_sum`, `_count` of histograms).
fn family(name: &str, known: &BTreeSet<String>) -> String {
    if known.contains(name) {
        return name.to_owned();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if known.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

fn dashboard() -> serde_json::Value {
    let text = read(&deploy("grafana-dashboard.json"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("grafana-dashboard.json: {e}"))
}

/// Every panel, rows' nested panels included.
fn all_panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dash["panels"]
        .as_array()
        .expect("panels is an array")
        .iter()
        .collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        out.push(p);
    }
    out
}

/// Every PromQL expression: panel targets and query variables.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for p in all_panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {}: target without expr", p["title"]));
            exprs.push(expr.to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .expect("query variable text");
            exprs.push(q.to_owned());
        }
    }
    exprs
}

#[test]
fn dashboard_is_valid_with_unique_panel_ids_and_a_datasource_variable() {
    let dash = dashboard();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("variable name"));

    let mut ids = BTreeSet::new();
    let panels = all_panels(&dash);
    for p in &panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(p["title"].is_string(), "panel {id} has no title");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id} gridPos.{k}");
        }
        assert!(
            p["gridPos"]["x"].as_u64().unwrap_or(99) + p["gridPos"]["w"].as_u64().unwrap_or(99)
                <= 24
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"],
                ds_ref.as_str(),
                "panel {id} datasource"
            );
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {id} has no query"
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "panel {id} target");
            }
        }
    }
}

#[test]
fn dashboard_queries_only_metrics_the_spec_names_and_the_code_exports() {
    let spec = spec_metrics();
    let code = code_metrics();
    let dash = dashboard();
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs(&dash) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "query names no metric: {expr}");
        for n in names {
            used.insert(family(&n, &spec));
        }
    }
    let not_in_spec: Vec<_> = used.iter().filter(|n| !spec.contains(*n)).collect();
    assert!(
        not_in_spec.is_empty(),
        "dashboard metrics not in operations.md: {not_in_spec:?}"
    );
    let not_exported: Vec<_> = used.iter().filter(|n| !code.contains(*n)).collect();
    assert!(
        not_exported.is_empty(),
        "dashboard metrics no metrics.rs exports: {not_exported:?} (exported: {code:?})"
    );
    // What an operator opens the dashboard for (issue 6).
    for needed in [
        "nowconnect_tunnels_active",
        "nowconnect_connector_available",
        "nowconnect_streams_active",
        "nowconnect_bytes_total",
        "nowconnect_open_duration_seconds",
        "nowconnect_stream_open_failures_total",
        "nowconnect_pdp_duration_seconds",
        "nowconnect_agent_backend_up",
    ] {
        assert!(used.contains(needed), "dashboard does not show {needed}");
    }
}
