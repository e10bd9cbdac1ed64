//! agent.yaml parsing and validation, `--check`, the command line, and the token source.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nowconnect_agent::backend::Balance;
use nowconnect_agent::cli::{self, Start};
use nowconnect_agent::config::{AgentConfig, HubUrl};
use nowconnect_agent::token::{Token, TokenError, TokenSource, TokenTimes};
use nowconnect_runtime::conf::{ConfigError, LogFormat};

/// configuration.md "Agent (`agent.yaml`)", verbatim.
const EXAMPLE_AGENT: &str = r#"
agent_id: dc1-agent-01
hub:
  url: wss://hub.example.com:8443/v1/tunnel   # or urls: [..] for several hubs; one tunnel to each
  tunnels: 1                      # tunnels per hub URL (>1 for resilience and throughput)
  ca_file: /etc/nowconnect/corp-ca.pem        # extra roots, e.g. a TLS-inspecting proxy's CA
  server_name: null               # override SNI/verification name
proxy:                            # optional; else HTTPS_PROXY/NO_PROXY from the environment
  url: http://proxy.corp:3128
  username: svc-nowconnect
  password: ${PROXY_PASSWORD}
token:                            # exactly one source; else NOWCONNECT_TOKEN
  file: /var/run/nowconnect/token # re-read before every connect
  # client_credentials:           # OAuth2 client-credentials grant, refreshed before expiry
  #   token_url: https://idp.example.com/oauth2/token
  #   client_id: nowconnect-agent-dc1
  #   client_secret: ${NOWCONNECT_CLIENT_SECRET}
  #   scope: nowconnect
  renew_at: 80%                   # in-band RENEW once this share of the token's lifetime has passed
admin:
  listen: 127.0.0.1:9091          # GET /metrics /healthz /readyz
reconnect:
  initial: 1s
  max: 60s                        # exponential backoff with full jitter
connectors:
  - name: ldap
    targets: [dc1.corp.local:389, dc2.corp.local:389]
    balance: failover             # failover (first healthy, in order) | round_robin
    connect_timeout: 5s
    health_check:
      interval: 10s
      timeout: 2s
    idle_timeout: 1h
logging:
  level: info
  format: auto
limits:
  window: 256KiB
  max_window: 16MiB
  max_buffered: 256MiB
  max_streams: 10000
  heartbeat: 20s
  shutdown_grace: 30s
"#;

const MINIMAL: &str = "\
agent_id: a1
hub:
  url: wss://hub.example.com/v1/tunnel
connectors:
  - name: ldap
    targets: [dc1.corp.local:389]
";

const PASSWORD: &str = "hunter2-s3cret";

fn env(name: &str) -> Option<String> {
    match name {
        "PROXY_PASSWORD" => Some(PASSWORD.to_owned()),
        _ => None,
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_yaml("agent.yaml", yaml, &env)
}

fn parse_err(yaml: &str) -> ConfigError {
    match parse(yaml) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(e) => e,
    }
}

fn minimal_with(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from:?} not in MINIMAL");
    MINIMAL.replacen(from, to, 1)
}

fn key_of(yaml: &str) -> Option<String> {
    parse_err(yaml).key()
}

#[test]
fn full_example_parses_with_every_value() {
    let cfg = parse(EXAMPLE_AGENT).expect("example parses");
    assert_eq!(cfg.agent_id, "dc1-agent-01");
    let urls = cfg.hub.endpoints();
    assert_eq!(urls.len(), 1);
    let u = urls[0];
    assert_eq!(u.url, "wss://hub.example.com:8443/v1/tunnel");
    assert!(u.tls);
    assert_eq!(
        (u.host.as_str(), u.port, u.path.as_str()),
        ("hub.example.com", 8443, "/v1/tunnel")
    );
    assert_eq!(u.authority(), "hub.example.com:8443");
    assert_eq!(cfg.hub.tunnels, 1);
    assert_eq!(
        cfg.hub.ca_file,
        Some(PathBuf::from("/etc/nowconnect/corp-ca.pem"))
    );
    assert_eq!(cfg.hub.server_name, None);
    assert_eq!(cfg.hub.server_name_for(u), "hub.example.com");
    let proxy = cfg.proxy.as_ref().expect("proxy");
    assert_eq!(
        (proxy.url.host.as_str(), proxy.url.port),
        ("proxy.corp", 3128)
    );
    assert_eq!(proxy.username.as_deref(), Some("svc-nowconnect"));
    assert_eq!(
        proxy.password.as_ref().expect("password").expose(),
        PASSWORD
    );
    assert_eq!(
        cfg.token.file,
        Some(PathBuf::from("/var/run/nowconnect/token"))
    );
    assert!(cfg.token.client_credentials.is_none());
    assert!((cfg.token.renew_at - 0.8).abs() < 1e-9);
    assert_eq!(
        cfg.admin_listen(),
        Some("127.0.0.1:9091".parse().expect("addr"))
    );
    assert_eq!(cfg.reconnect.initial, Duration::from_secs(1));
    assert_eq!(cfg.reconnect.max, Duration::from_secs(60));
    let c = &cfg.connectors[0];
    assert_eq!(c.name, "ldap");
    assert_eq!(c.targets, vec!["dc1.corp.local:389", "dc2.corp.local:389"]);
    assert_eq!(c.balance, Balance::Failover);
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.health_check.interval, Duration::from_secs(10));
    assert_eq!(c.health_check.timeout, Duration::from_secs(2));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(cfg.logging.level, "info");
    assert_eq!(cfg.logging.format, LogFormat::Auto);
    let l = &cfg.limits;
    assert_eq!((l.window, l.max_window), (256 * 1024, 16 * 1024 * 1024));
    assert_eq!(l.max_buffered, 256 * 1024 * 1024);
    assert_eq!(l.max_streams, 10000);
    assert_eq!(
        (l.heartbeat, l.shutdown_grace),
        (Duration::from_secs(20), Duration::from_secs(30))
    );
    let core = cfg.session_config();
    assert_eq!((core.window, core.max_streams), (256 * 1024, 10000));
    assert_eq!(core.hello_timeout, Duration::from_secs(10));
    // The password never shows in Debug.
    assert!(!format!("{cfg:?}").contains(PASSWORD));
}

#[test]
fn defaults_of_a_minimal_file() {
    let cfg = parse(MINIMAL).expect("parses");
    assert_eq!(cfg.hub.tunnels, 1);
    assert_eq!(cfg.hub.endpoints()[0].port, 443);
    assert!(cfg.proxy.is_none() && cfg.admin.is_none() && cfg.hub.ca_file.is_none());
    assert!(cfg.token.file.is_none() && cfg.token.client_credentials.is_none());
    assert!((cfg.token.renew_at - 0.8).abs() < 1e-9);
    assert_eq!(cfg.reconnect.initial, Duration::from_secs(1));
    assert_eq!(cfg.reconnect.max, Duration::from_secs(60));
    let c = &cfg.connectors[0];
    assert_eq!(c.balance, Balance::Failover);
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.health_check.interval, Duration::from_secs(10));
    assert_eq!(c.health_check.timeout, Duration::from_secs(2));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(cfg.limits, nowconnect_agent::config::Limits::default());
    assert_eq!(cfg.limits.max_streams, 10000);
}

#[test]
fn several_hubs_and_tunnels() {
    let yaml = minimal_with(
        "  url: wss://hub.example.com/v1/tunnel\n",
        "  urls: [\"wss://hub-a.example.com/v1/tunnel\", \"ws://[::1]:8080/t?x=1\"]\n  tunnels: 3\n  server_name: hub.internal\n",
    );
    let cfg = parse(&yaml).expect("parses");
    let urls = cfg.hub.endpoints();
    assert_eq!(urls.len(), 2);
    assert!(!urls[1].tls);
    assert_eq!((urls[1].host.as_str(), urls[1].port), ("::1", 8080));
    assert_eq!(urls[1].path, "/t?x=1");
    assert_eq!(urls[1].authority(), "[::1]:8080");
    assert_eq!(cfg.hub.tunnels, 3);
    assert_eq!(cfg.hub.server_name_for(urls[0]), "hub.internal");
}

#[test]
fn hub_rules_name_their_key() {
    let url = "  url: wss://hub.example.com/v1/tunnel\n";
    assert_eq!(key_of(&minimal_with(url, "")).as_deref(), Some("hub"));
    assert_eq!(
        key_of(&minimal_with(url, &format!("{url}  urls: [wss://b/]\n"))).as_deref(),
        Some("hub.urls")
    );
    assert_eq!(
        key_of(&minimal_with(url, "  urls: []\n")).as_deref(),
        Some("hub.urls")
    );
    assert_eq!(
        key_of(&minimal_with(url, "  urls: [wss://a/, wss://a/]\n")).as_deref(),
        Some("hub.urls[1]")
    );
    for bad in [
        "https://hub/",
        "hub.example.com:443",
        "wss://",
        "wss://h:0/",
        "wss://user:pw@hub/",
    ] {
        let e = parse_err(&minimal_with(url, &format!("  url: \"{bad}\"\n")));
        assert_eq!(e.key().as_deref(), Some("hub.url"), "{bad}: {e}");
        assert!(!e.to_string().contains("user:pw"), "{e}");
    }
    let e = parse_err(&minimal_with(url, "  urls: [wss://a/, ftp://b/]\n"));
    assert_eq!(e.key().as_deref(), Some("hub.urls[1]"));
    assert_eq!(e.line(), Some(3));
    assert_eq!(
        key_of(&minimal_with(url, &format!("{url}  tunnels: 0\n"))).as_deref(),
        Some("hub.tunnels")
    );
    assert_eq!(
        key_of(&minimal_with(
            url,
            &format!("{url}  server_name: \"bad name\"\n")
        ))
        .as_deref(),
        Some("hub.server_name")
    );
}

#[test]
fn proxy_rules_and_secrets() {
    let with_proxy = |p: &str| format!("{MINIMAL}proxy:\n{p}");
    let e = parse_err(&with_proxy(&format!(
        "  url: http://svc:{PASSWORD}@proxy.corp:3128\n"
    )));
    assert_eq!(e.key().as_deref(), Some("proxy.url"));
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    let e = parse_err(&with_proxy("  url: https://proxy.corp:3128\n"));
    assert_eq!(e.key().as_deref(), Some("proxy.url"));
    let e = parse_err(&with_proxy("  url: http://proxy:3128\n  password: x\n"));
    assert_eq!(e.key().as_deref(), Some("proxy.username"));
    // A secret of the wrong type: the error names the key but never the value.
    let e = parse_err(&with_proxy(&format!(
        "  url: http://proxy:3128\n  username: u\n  password: [{PASSWORD}]\n"
    )));
    assert_eq!(e.key().as_deref(), Some("proxy.password"));
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    // A raw token pasted where the token section goes.
    let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl";
    let e = parse_err(&format!("{MINIMAL}token: {jwt}\n"));
    assert_eq!(e.key().as_deref(), Some("token"));
    assert!(!e.to_string().contains(jwt), "{e}");
    let e = parse_err(&format!(
        "{MINIMAL}token:\n  client_credentials:\n    token_url: https://idp/t\n    client_id: c\n    client_secret: {{v: {PASSWORD}}}\n"
    ));
    assert_eq!(
        e.key().as_deref(),
        Some("token.client_credentials.client_secret")
    );
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    // A missing variable names the variable, not any value.
    let yaml =
        with_proxy("  url: http://proxy:3128\n  username: u\n  password: ${PROXY_PASSWORD}\n");
    let e = AgentConfig::from_yaml("agent.yaml", &yaml, &no_env).expect_err("missing var");
    assert_eq!(
        e.to_string(),
        "agent.yaml: proxy.password: environment variable PROXY_PASSWORD is not set (line 10)"
    );
}

#[test]
fn token_section_rules() {
    let both = format!(
        "{MINIMAL}token:\n  file: /run/t\n  client_credentials:\n    token_url: https://idp/t\n    client_id: c\n    client_secret: s\n"
    );
    assert_eq!(key_of(&both).as_deref(), Some("token.client_credentials"));
    let cc = format!(
        "{MINIMAL}token:\n  client_credentials:\n    token_url: https://idp/t\n    client_id: c\n    client_secret: ${{SECRET}}\n    scope: nowconnect\n"
    );
    let cfg = AgentConfig::from_yaml("agent.yaml", &cc, &|k: &str| {
        (k == "SECRET").then(|| "shh".to_owned())
    })
    .expect("client_credentials parses");
    let c = cfg.token.client_credentials.as_ref().expect("cc");
    assert_eq!(
        (c.client_id.as_str(), c.client_secret.expose()),
        ("c", "shh")
    );
    assert_eq!(c.scope.as_deref(), Some("nowconnect"));
    assert!(!format!("{c:?}").contains("shh"));
    let http = cc.replace("https://idp/t", "http://idp.example.com/t");
    let e = AgentConfig::from_yaml("agent.yaml", &http, &|_: &str| Some("x".to_owned()))
        .expect_err("http token_url");
    assert_eq!(
        e.key().as_deref(),
        Some("token.client_credentials.token_url")
    );
    let e = parse_err(&format!("{MINIMAL}token:\n  renew_at: 80\n"));
    assert_eq!(e.key().as_deref(), Some("token.renew_at"));
    let e = parse_err(&format!("{MINIMAL}token:\n  renew_at: 100%\n"));
    assert_eq!(e.key().as_deref(), Some("token.renew_at"));
    let cfg = parse(&format!("{MINIMAL}token:\n  renew_at: 75%\n")).expect("75%");
    assert!((cfg.token.renew_at - 0.75).abs() < 1e-9);
    // An empty section is the default (NOWCONNECT_TOKEN).
    assert!(parse(&format!("{MINIMAL}token:\n"))
        .expect("empty")
        .token
        .file
        .is_none());
}

#[test]
fn connector_rules_name_their_key() {
    let e = parse_err(&minimal_with("  - name: ldap\n", "  - name: \"ld ap\"\n"));
    assert_eq!(e.key().as_deref(), Some("connectors[0].name"));
    let dup = format!("{MINIMAL}  - name: ldap\n    targets: [x:1]\n");
    assert_eq!(key_of(&dup).as_deref(), Some("connectors[1].name"));
    let targets = "    targets: [dc1.corp.local:389]\n";
    for (bad, at) in [
        ("[dc1:389, dc2]", "connectors[0].targets[1]"),
        ("[\"dc1:0\"]", "connectors[0].targets[0]"),
        ("[\"dc 1:389\"]", "connectors[0].targets[0]"),
        ("[\"::1:389\"]", "connectors[0].targets[0]"),
        ("[]", "connectors[0].targets"),
    ] {
        let e = parse_err(&minimal_with(targets, &format!("    targets: {bad}\n")));
        assert_eq!(e.key().as_deref(), Some(at), "{bad}: {e}");
    }
    let ok = minimal_with(
        targets,
        "    targets: [\"[fd00::5]:443\", 10.0.0.5:22, dc_1.corp:1]\n",
    );
    assert_eq!(parse(&ok).expect("targets").connectors[0].targets.len(), 3);
    let extra = |s: &str| minimal_with(targets, &format!("{targets}{s}"));
    let e = parse_err(&extra("    balance: random\n"));
    assert_eq!(e.key().as_deref(), Some("connectors[0].balance"));
    assert_eq!(
        parse(&extra("    balance: round_robin\n"))
            .expect("rr")
            .connectors[0]
            .balance,
        Balance::RoundRobin
    );
    let e = parse_err(&extra("    connect_timeout: 5\n"));
    assert_eq!(e.key().as_deref(), Some("connectors[0].connect_timeout"));
    let e = parse_err(&extra("    connect_timeout: 0\n"));
    assert_eq!(e.key().as_deref(), Some("connectors[0].connect_timeout"));
    let e = parse_err(&extra(
        "    health_check:\n      interval: 1s\n      timeout: 2s\n",
    ));
    assert_eq!(
        e.key().as_deref(),
        Some("connectors[0].health_check.timeout")
    );
    let off = parse(&extra("    idle_timeout: 0\n")).expect("off");
    assert_eq!(off.connectors[0].idle_timeout, None);
    let none = "agent_id: a\nhub:\n  url: wss://h/\nconnectors: []\n";
    assert_eq!(key_of(none).as_deref(), Some("connectors"));
}

#[test]
fn other_rules_name_their_key() {
    assert_eq!(
        key_of(&minimal_with("agent_id: a1\n", "agent_id: \"\"\n")).as_deref(),
        Some("agent_id")
    );
    assert_eq!(
        key_of(&minimal_with("agent_id: a1\n", "")).as_deref(),
        Some("agent_id")
    );
    let e = parse_err(&format!("{MINIMAL}reconnect:\n  initial: 10s\n  max: 1s\n"));
    assert_eq!(e.key().as_deref(), Some("reconnect.max"));
    let e = parse_err(&format!("{MINIMAL}reconnect:\n  initial: 0\n"));
    assert_eq!(e.key().as_deref(), Some("reconnect.initial"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  window: 32MiB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.window"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  max_streams: 0\n"));
    assert_eq!(e.key().as_deref(), Some("limits.max_streams"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  max_window: 1TiB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.max_window"));
    let e = parse_err(&format!("{MINIMAL}admin:\n  listen: 9091\n"));
    assert_eq!(e.key().as_deref(), Some("admin.listen"));
    let e = parse_err(&format!("{MINIMAL}logging:\n  format: pretty\n"));
    assert_eq!(e.key().as_deref(), Some("logging.format"));
}

#[test]
fn unknown_keys_are_named() {
    let e = parse_err(&minimal_with(
        "  url: wss://hub.example.com/v1/tunnel\n",
        "  url: wss://hub.example.com/v1/tunnel\n  urll: wss://x/\n",
    ));
    assert_eq!(e.key().as_deref(), Some("hub.urll"));
    assert_eq!(e.line(), Some(4));
    assert!(e.message().starts_with("unknown key"), "{e}");
    let e = parse_err(&format!("{MINIMAL}token:\n  fle: /run/t\n"));
    assert_eq!(e.key().as_deref(), Some("token.fle"));
    let e = parse_err(&format!(
        "{MINIMAL}    health_check:\n      intervall: 5s\n"
    ));
    assert_eq!(
        e.key().as_deref(),
        Some("connectors[0].health_check.intervall")
    );
    assert_eq!(e.line(), Some(8));
    let e = parse_err(&format!(
        "{MINIMAL}proxy:\n  url: http://p:1\n  pasword: x\n"
    ));
    assert_eq!(e.key().as_deref(), Some("proxy.pasword"));
    let e = parse_err(&format!("agnet_id: x\n{MINIMAL}"));
    assert_eq!(e.key().as_deref(), Some("agnet_id"));
}

#[test]
fn env_vars_expand_everywhere() {
    let yaml = "\
agent_id: ${HOSTNAME}-agent
hub:
  url: wss://${HUB}/v1/tunnel
  tunnels: ${TUNNELS}
connectors:
  - name: ldap
    targets: [\"${DC}:389\"]
    connect_timeout: ${TIMEOUT}
";
    let env = |k: &str| {
        Some(
            match k {
                "HOSTNAME" => "dc1",
                "HUB" => "hub.example.com:9443",
                "TUNNELS" => "2",
                "DC" => "dc9.corp.local",
                "TIMEOUT" => "750ms",
                _ => return None,
            }
            .to_owned(),
        )
    };
    let cfg = AgentConfig::from_yaml("agent.yaml", yaml, &env).expect("expands");
    assert_eq!(cfg.agent_id, "dc1-agent");
    assert_eq!(cfg.hub.endpoints()[0].port, 9443);
    assert_eq!(cfg.hub.tunnels, 2);
    assert_eq!(cfg.connectors[0].targets, vec!["dc9.corp.local:389"]);
    assert_eq!(
        cfg.connectors[0].connect_timeout,
        Duration::from_millis(750)
    );
    let e = AgentConfig::from_yaml("agent.yaml", yaml, &|k: &str| {
        if k == "DC" {
            None
        } else {
            env(k)
        }
    })
    .expect_err("missing");
    assert_eq!(e.key().as_deref(), Some("connectors[0].targets[0]"));
    assert_eq!(e.line(), Some(7));
    assert!(e.message().contains("DC"));
}

// ---------------------------------------------------------------------------------------------
// --check and command line
// ---------------------------------------------------------------------------------------------

fn run_cli(args: &[&str], env: &dyn Fn(&str) -> Option<String>) -> (u8, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let start = cli::start_with(
        args.iter().map(OsString::from),
        None,
        env,
        &mut out,
        &mut err,
    );
    let code = match start {
        Start::Exit(c) => c,
        Start::Run(_) => 0,
    };
    (
        code,
        String::from_utf8(out).expect("utf8"),
        String::from_utf8(err).expect("utf8"),
    )
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

fn ca_pem(is_ca: bool) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["corp.example".to_owned()]).expect("params");
    if is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.self_signed(&key).expect("cert").pem()
}

#[test]
fn check_validates_ca_file_and_only_warns_about_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "ca.pem", &ca_pem(true));
    let yaml = minimal_with(
        "  url: wss://hub.example.com/v1/tunnel\n",
        "  url: wss://hub.example.com/v1/tunnel\n  ca_file: ca.pem\n",
    ) + "token:\n  file: token.jwt\n";
    let cfg = write(dir.path(), "agent.yaml", &yaml);
    let p = cfg.to_str().expect("utf8");

    // token.file does not exist yet: ok, with a warning.
    let (code, out, err) = run_cli(&["--config", p, "--check"], &no_env);
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    assert!(
        err.contains("warning") && err.contains("token.file"),
        "{err}"
    );
    write(
        dir.path(),
        "token.jwt",
        &jwt(&serde_json::json!({"exp": 2})),
    );
    let (code, out, err) = run_cli(&["--config", p, "--check"], &no_env);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ok\n", ""));

    // A server certificate is not a CA.
    write(dir.path(), "ca.pem", &ca_pem(false));
    let (code, out, err) = run_cli(&["--config", p, "--check"], &no_env);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.starts_with(&format!("{p}: hub.ca_file: ")), "{err}");
    assert!(err.contains("not a CA"), "{err}");
    std::fs::remove_file(dir.path().join("ca.pem")).expect("rm");
    let (code, _, err) = run_cli(&["--config", p, "--check"], &no_env);
    assert_eq!(code, 2);
    assert!(err.contains("hub.ca_file: "), "{err}");
    // Plain load does not read it, and resolves relative names against the config directory.
    let loaded = AgentConfig::load(&cfg).expect("loads");
    assert_eq!(loaded.hub.ca_file, Some(dir.path().join("ca.pem")));
    assert_eq!(loaded.token.file, Some(dir.path().join("token.jwt")));

    // No token source at all: a warning unless NOWCONNECT_TOKEN is set.
    write(dir.path(), "agent.yaml", MINIMAL);
    let (code, out, err) = run_cli(&["--config", p, "--check"], &no_env);
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    assert!(err.contains("NOWCONNECT_TOKEN"), "{err}");
    let with_token = |k: &str| (k == "NOWCONNECT_TOKEN").then(|| "a.b.c".to_owned());
    let (code, _, err) = run_cli(&["--config", p, "--check"], &with_token);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn command_line() {
    let (code, out, _) = run_cli(&["--version"], &no_env);
    assert_eq!(code, 0);
    assert!(out.starts_with("nowconnect-agent "), "{out}");
    let (code, out, _) = run_cli(&["-h"], &no_env);
    assert_eq!(code, 0);
    assert!(
        out.contains("--config FILE") && out.contains("NOWCONNECT_TOKEN"),
        "{out}"
    );
    let (code, out, err) = run_cli(&["--config"], &no_env);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("--config"), "{err}");
    let (code, _, err) = run_cli(&[], &no_env);
    assert_eq!(code, 2);
    assert!(err.contains("NOWCONNECT_CONFIG"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        "agent.yaml",
        &minimal_with("agent_id: a1\n", "agent_id: a1\nbogus: 1\n"),
    );
    let (code, out, err) = run_cli(&["--config", cfg.to_str().expect("utf8")], &no_env);
    assert_eq!((code, out.as_str()), (2, ""));
    assert_eq!(
        err.trim_end(),
        format!("{}: bogus: unknown key (expected one of agent_id, hub, proxy, token, admin, reconnect, connectors, logging, limits) (line 2)", cfg.display())
    );
}

// ---------------------------------------------------------------------------------------------
// Token source
// ---------------------------------------------------------------------------------------------

/// An unsigned JWT-shaped token with these claims (the agent never verifies).
fn jwt(claims: &serde_json::Value) -> String {
    let enc = |v: &str| URL_SAFE_NO_PAD.encode(v.as_bytes());
    format!(
        "{}.{}.{}",
        enc(r#"{"alg":"ES256","kid":"k1"}"#),
        enc(&claims.to_string()),
        enc("signature")
    )
}

#[test]
fn token_file_is_reread_on_every_fetch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    let first = jwt(&serde_json::json!({"iat": 1000, "exp": 2000}));
    std::fs::write(&path, format!("{first}\n")).expect("write");
    let cfg = AgentConfig::from_yaml(
        "agent.yaml",
        &format!("{MINIMAL}token:\n  file: {}\n", path.display()),
        &no_env,
    )
    .expect("parses");
    let source = TokenSource::from_config(&cfg.token, &no_env).expect("source");
    let t = source.fetch().expect("first");
    assert_eq!(t.expose(), first, "trailing newline trimmed");
    assert_eq!(
        t.times(),
        TokenTimes {
            iat: Some(1000),
            nbf: None,
            exp: Some(2000)
        }
    );
    let second = jwt(&serde_json::json!({"iat": 5000, "exp": 9000}));
    std::fs::write(&path, &second).expect("rewrite");
    let t = source.fetch().expect("second");
    assert_eq!(t.expose(), second);
    assert_eq!(t.times().exp, Some(9000));
    // A file that vanished is an I/O error naming the file.
    std::fs::remove_file(&path).expect("rm");
    assert!(matches!(source.fetch(), Err(TokenError::Io { .. })));
    assert!(source.describe().contains("token"));
}

#[test]
fn token_from_environment_and_unsupported_sources() {
    let token = jwt(&serde_json::json!({"exp": 100}));
    let t2 = token.clone();
    let env = move |k: &str| (k == "NOWCONNECT_TOKEN").then(|| t2.clone());
    let cfg = parse(MINIMAL).expect("parses");
    let source = TokenSource::from_config(&cfg.token, &env).expect("env");
    assert_eq!(source.fetch().expect("fetch").expose(), token);
    assert_eq!(source.describe(), "NOWCONNECT_TOKEN");
    assert!(!format!("{source:?}").contains(&token));
    assert_eq!(
        TokenSource::from_config(&cfg.token, &no_env).map(|_| ()),
        Err(TokenError::NotConfigured)
    );
    let cc = format!(
        "{MINIMAL}token:\n  client_credentials:\n    token_url: https://idp/t\n    client_id: c\n    client_secret: s\n"
    );
    let cfg = parse(&cc).expect("parses");
    // client_credentials wins over the environment (its fetch is tested in token.rs and
    // tests/tests/renew_e2e.rs).
    let source = TokenSource::from_config(&cfg.token, &env).expect("cc");
    assert!(matches!(source, TokenSource::ClientCredentials(_)));
    assert_eq!(source.describe(), "client_credentials https://idp/t");
}

#[test]
fn malformed_tokens_refused_without_echo() {
    let good = jwt(&serde_json::json!({"exp": 100}));
    let cases = [
        String::new(),
        "   \n".to_owned(),
        "only.two".to_owned(),
        format!("{good}\r\nX-Injected: 1"),
        format!("{good} extra"),
        "a.%%%.c".to_owned(),
        format!("a.{}.c", URL_SAFE_NO_PAD.encode("not json")),
        format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1]")),
        format!("a.{}.c", URL_SAFE_NO_PAD.encode(r#"{"exp":"soon"}"#)),
        format!("{}.{}.c", "a".repeat(17_000), "b"),
    ];
    for bad in &cases {
        let e = Token::parse(bad).expect_err(bad);
        let shown = format!("{e} {e:?}");
        assert!(bad.len() < 6 || !shown.contains(bad.as_str()), "{shown}");
    }
    let t = Token::parse(&good).expect("good");
    assert!(!format!("{t:?}").contains(&good));
}

#[test]
fn renew_schedule() {
    let times = TokenTimes {
        iat: Some(1000),
        nbf: Some(1500),
        exp: Some(2000),
    };
    // renew_at is measured over iat (or nbf) → exp.
    assert_eq!(times.renew_at(0.8, 0), Some(1800));
    let nbf_only = TokenTimes { iat: None, ..times };
    assert_eq!(nbf_only.renew_at(0.8, 0), Some(1900));
    let neither = TokenTimes {
        iat: None,
        nbf: None,
        exp: Some(2000),
    };
    assert_eq!(neither.renew_at(0.5, 1000), Some(1500), "from fetch time");
    assert_eq!(TokenTimes::default().renew_at(0.8, 0), None, "no exp");
    assert_eq!(times.seconds_until_expiry(1900), Some(100));
    assert_eq!(times.seconds_until_expiry(2100), Some(-100));
    let t = Token::parse(&jwt(&serde_json::json!({"iat": 100, "exp": 200.0}))).expect("float exp");
    assert_eq!(t.times().renew_at(0.8, 0), Some(180));
    let u = HubUrl::parse("wss://h.example/x").expect("url");
    assert_eq!((u.port, u.path.as_str()), (443, "/x"));
}
