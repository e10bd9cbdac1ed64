//! hub.yaml parsing and validation, the command line, and JWT/JWKS authentication.
//!
//! Config: the full example of configuration.md parses with every value; each validation error
//! names its key path (and line); unknown keys are named; `${VAR}` expansion; durations/sizes.
//! Auth: keys are generated here (ES256 and Ed25519 with rcgen, RS256 with rsa), the JWKS JSON is
//! built by hand from the public keys, and each rule has a test that refuses with its reason.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nowconnect_hub::auth::{
    self, bearer_token, validate_token, AuthError, AuthPolicy, Authenticator, Jwks, JwksCache,
    JwksError, JwksSource, Reason,
};
use nowconnect_hub::cli::{self, Command, Start};
use nowconnect_hub::config::{HubConfig, OnError};
use nowconnect_runtime::conf::{
    self, parse_duration, parse_percent, parse_size, Cidr, ConfigError, LogFormat,
};
use serde_json::{json, Value};

// =============================================================================================
// Config
// =============================================================================================

/// configuration.md "Hub (`hub.yaml`)", verbatim.
const EXAMPLE_HUB: &str = r#"
listen: 0.0.0.0:8443            # the agents' WebSocket endpoint
path: /v1/tunnel
tls:                             # omit only with plaintext: true (behind a TLS-terminating LB, or tests)
  cert: /etc/nowconnect/hub.crt  # PEM chain
  key: /etc/nowconnect/hub.key   # PEM private key (PKCS#8, PKCS#1 or SEC1)
plaintext: false
admin:
  listen: 127.0.0.1:9090         # GET /metrics /healthz /readyz
auth:
  issuer: https://idp.example.com/
  audience: nowconnect-hub
  jwks_url: https://idp.example.com/.well-known/jwks.json   # or jwks_file: for air-gapped/test use
  jwks_ca: /etc/nowconnect/idp-ca.pem    # optional extra roots for the JWKS fetch
  jwks_refresh: 10m                      # also refreshed (rate-limited) on an unknown kid
  algorithms: [RS256, ES256]             # never none or HS*
  agent_id_claim: sub                    # claim that must equal HELLO.agent_id
  connectors_claim: null                 # e.g. nowconnect_connectors; when set, connector scopes are enforced
  leeway: 30s
authz:
  pdp:                                   # optional; when present every OPEN is authorized by it
    url: https://pdp.internal/v1/authorize
    timeout: 500ms
    cache_ttl: 30s
    on_error: deny                       # deny | allow
connectors:
  - name: ldap
    listen: 0.0.0.0:389
    allow_clients: [10.0.0.0/8, 127.0.0.1/32]   # optional CIDR allow-list; others are refused
    idle_timeout: 1h
  - name: ldaps
    listen: 0.0.0.0:636
logging:
  level: info                    # overridden by NOWCONNECT_LOG / RUST_LOG
  format: auto                   # auto (json unless stderr is a TTY) | json | text
limits:
  max_tunnels: 1000
  max_streams_per_tunnel: 10000
  window: 256KiB                 # initial per-stream window
  max_window: 16MiB              # auto-tuning ceiling per stream
  max_buffered: 256MiB           # per-session budget for all granted windows
  max_frame: 64KiB
  max_message: 1MiB
  hello_timeout: 10s
  open_timeout: 15s
  heartbeat: 20s
  shutdown_grace: 30s
"#;

/// The smallest valid file: everything else defaults.
const MINIMAL: &str = "\
plaintext: true
auth:
  issuer: https://idp/
  audience: hub
  jwks_file: /etc/jwks.json
connectors:
  - name: ldap
    listen: 0.0.0.0:389
";

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(yaml: &str) -> Result<HubConfig, ConfigError> {
    HubConfig::from_yaml("hub.yaml", yaml, &no_env)
}

fn parse_err(yaml: &str) -> ConfigError {
    match parse(yaml) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(e) => e,
    }
}

/// MINIMAL with `from` replaced by `to` (which must occur).
fn minimal_with(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from:?} not in MINIMAL");
    MINIMAL.replacen(from, to, 1)
}

#[test]
fn full_example_parses_with_every_value() {
    let cfg = parse(EXAMPLE_HUB).expect("example parses");
    assert_eq!(cfg.listen, "0.0.0.0:8443".parse().expect("addr"));
    assert_eq!(cfg.path, "/v1/tunnel");
    let tls = cfg.tls.as_ref().expect("tls");
    assert_eq!(tls.cert, PathBuf::from("/etc/nowconnect/hub.crt"));
    assert_eq!(tls.key, PathBuf::from("/etc/nowconnect/hub.key"));
    assert!(!cfg.plaintext);
    assert_eq!(
        cfg.admin.as_ref().expect("admin").listen,
        "127.0.0.1:9090".parse().expect("addr")
    );
    let a = &cfg.auth;
    assert_eq!(a.issuer, "https://idp.example.com/");
    assert_eq!(a.audience, "nowconnect-hub");
    assert_eq!(
        a.jwks_url.as_deref(),
        Some("https://idp.example.com/.well-known/jwks.json")
    );
    assert_eq!(a.jwks_file, None);
    assert_eq!(a.jwks_ca, Some(PathBuf::from("/etc/nowconnect/idp-ca.pem")));
    assert_eq!(a.jwks_refresh, Some(Duration::from_secs(600)));
    assert_eq!(a.algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
    assert_eq!(a.agent_id_claim, "sub");
    assert_eq!(a.connectors_claim, None);
    assert_eq!(a.leeway, Duration::from_secs(30));
    let pdp = cfg.authz.pdp.as_ref().expect("pdp");
    assert_eq!(pdp.url, "https://pdp.internal/v1/authorize");
    assert_eq!(pdp.timeout, Duration::from_millis(500));
    assert_eq!(pdp.cache_ttl, Duration::from_secs(30));
    assert_eq!(pdp.on_error, OnError::Deny);
    assert_eq!(cfg.connectors.len(), 2);
    let ldap = &cfg.connectors[0];
    assert_eq!(ldap.name, "ldap");
    assert_eq!(ldap.listen, "0.0.0.0:389".parse().expect("addr"));
    let allow = ldap.allow_clients.as_ref().expect("allow_clients");
    assert_eq!(allow.len(), 2);
    assert!(ldap.allows("10.1.2.3".parse().expect("ip")));
    assert!(ldap.allows("127.0.0.1".parse().expect("ip")));
    assert!(!ldap.allows("127.0.0.2".parse().expect("ip")));
    assert!(!ldap.allows("192.168.1.1".parse().expect("ip")));
    assert_eq!(ldap.idle_timeout, Some(Duration::from_secs(3600)));
    let ldaps = &cfg.connectors[1];
    assert_eq!(ldaps.name, "ldaps");
    assert_eq!(ldaps.allow_clients, None);
    assert!(ldaps.allows("192.168.1.1".parse().expect("ip")));
    assert_eq!(cfg.logging.level, "info");
    assert_eq!(cfg.logging.format, LogFormat::Auto);
    let l = &cfg.limits;
    assert_eq!(l.max_tunnels, 1000);
    assert_eq!(l.max_streams_per_tunnel, 10000);
    assert_eq!(l.window, 256 * 1024);
    assert_eq!(l.max_window, 16 * 1024 * 1024);
    assert_eq!(l.max_buffered, 256 * 1024 * 1024);
    assert_eq!(l.max_frame, 64 * 1024);
    assert_eq!(l.max_message, 1024 * 1024);
    assert_eq!(l.hello_timeout, Duration::from_secs(10));
    assert_eq!(l.open_timeout, Duration::from_secs(15));
    assert_eq!(l.heartbeat, Duration::from_secs(20));
    assert_eq!(l.shutdown_grace, Duration::from_secs(30));
    let core = cfg.session_config();
    assert_eq!(core.window, 256 * 1024);
    assert_eq!(core.max_streams, 10000);
}

#[test]
fn defaults_of_a_minimal_file() {
    let cfg = parse(MINIMAL).expect("minimal parses");
    assert_eq!(cfg.listen, "0.0.0.0:8443".parse().expect("addr"));
    assert_eq!(cfg.path, "/v1/tunnel");
    assert!(cfg.tls.is_none() && cfg.plaintext);
    assert!(cfg.admin.is_none());
    assert_eq!(cfg.auth.jwks_refresh, Some(Duration::from_secs(600)));
    assert_eq!(
        cfg.auth.algorithms,
        vec![Algorithm::RS256, Algorithm::ES256]
    );
    assert_eq!(cfg.auth.agent_id_claim, "sub");
    assert_eq!(cfg.auth.leeway, Duration::from_secs(30));
    assert!(cfg.authz.pdp.is_none());
    assert_eq!(
        cfg.connectors[0].idle_timeout,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(cfg.limits, nowconnect_hub::config::Limits::default());
    assert_eq!(cfg.limits.max_tunnels, 1000);
    assert_eq!(cfg.limits.max_frame, 64 * 1024);
    assert_eq!(cfg.logging.format, LogFormat::Auto);
}

#[test]
fn error_renders_file_key_and_line() {
    let yaml = "\
plaintext: true
auth:
  issuer: https://idp/
  audience: hub
  jwks_file: /etc/jwks.json
connectors:
  - name: ldap
    listen: 0.0.0.0:389
  - name: ldaps
    listen: 0.0.0.0:38x9
";
    let e = parse_err(yaml);
    assert_eq!(e.key().as_deref(), Some("connectors[1].listen"));
    assert_eq!(e.line(), Some(10));
    assert_eq!(
        e.to_string(),
        "hub.yaml: connectors[1].listen: invalid socket address \"0.0.0.0:38x9\" (line 10)"
    );
}

#[test]
fn tls_required_unless_plaintext() {
    let e = parse_err(&minimal_with("plaintext: true\n", ""));
    assert_eq!(e.key().as_deref(), Some("tls"));
    assert!(e.message().contains("plaintext"), "{e}");
    // With tls it is fine, and plaintext + tls together is refused.
    let with_tls = minimal_with(
        "plaintext: true\n",
        "tls:\n  cert: /x/hub.crt\n  key: /x/hub.key\n",
    );
    assert!(parse(&with_tls).is_ok());
    let both = minimal_with(
        "plaintext: true\n",
        "plaintext: true\ntls:\n  cert: a\n  key: b\n",
    );
    assert_eq!(parse_err(&both).key().as_deref(), Some("plaintext"));
}

#[test]
fn none_and_hmac_algorithms_refused_in_config() {
    for bad in ["none", "HS256", "HS384", "HS512", "hs256"] {
        let yaml = minimal_with(
            "  jwks_file: /etc/jwks.json\n",
            &format!("  jwks_file: /etc/jwks.json\n  algorithms: [ES256, {bad}]\n"),
        );
        let e = parse_err(&yaml);
        assert_eq!(e.key().as_deref(), Some("auth.algorithms[1]"), "{bad}: {e}");
        assert!(e.message().contains("refused"), "{bad}: {e}");
        assert_eq!(e.line(), Some(6), "{e}");
    }
    let unknown = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_file: /etc/jwks.json\n  algorithms: [XY999]\n",
    );
    assert_eq!(
        parse_err(&unknown).key().as_deref(),
        Some("auth.algorithms[0]")
    );
    let empty = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_file: /etc/jwks.json\n  algorithms: []\n",
    );
    assert_eq!(parse_err(&empty).key().as_deref(), Some("auth.algorithms"));
    let all = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_file: /etc/jwks.json\n  algorithms: [RS256, RS384, RS512, PS256, ES256, ES384, EdDSA]\n",
    );
    assert_eq!(parse(&all).expect("all allowed").auth.algorithms.len(), 7);
}

#[test]
fn exactly_one_jwks_source() {
    let neither = minimal_with("  jwks_file: /etc/jwks.json\n", "");
    let e = parse_err(&neither);
    assert_eq!(e.key().as_deref(), Some("auth"));
    assert!(e.message().contains("jwks_url"), "{e}");
    let both = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_file: /etc/jwks.json\n  jwks_url: https://idp/jwks\n",
    );
    assert_eq!(parse_err(&both).key().as_deref(), Some("auth.jwks_file"));
    let url_only = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_url: https://idp/jwks\n",
    );
    assert!(parse(&url_only).is_ok());
    // security.md: fetched over HTTPS (plain http only on loopback, for tests).
    let http = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_url: http://idp.example.com/jwks\n",
    );
    assert_eq!(parse_err(&http).key().as_deref(), Some("auth.jwks_url"));
    let http_loopback = minimal_with(
        "  jwks_file: /etc/jwks.json\n",
        "  jwks_url: http://127.0.0.1:8080/jwks\n",
    );
    assert!(parse(&http_loopback).is_ok());
}

#[test]
fn connector_names_validated_and_unique() {
    for bad in ["\"\"", "ld ap", "ldap/x", "\"é\"", &"a".repeat(65)] {
        let yaml = minimal_with("  - name: ldap\n", &format!("  - name: {bad}\n"));
        let e = parse_err(&yaml);
        assert_eq!(e.key().as_deref(), Some("connectors[0].name"), "{bad}: {e}");
    }
    let ok = minimal_with(
        "  - name: ldap\n",
        &format!("  - name: A.b_c-9{}\n", "x".repeat(57)),
    );
    assert!(parse(&ok).is_ok());
    let dup = format!("{MINIMAL}  - name: ldap\n    listen: 0.0.0.0:390\n");
    let e = parse_err(&dup);
    assert_eq!(e.key().as_deref(), Some("connectors[1].name"));
    assert!(e.message().contains("duplicate"), "{e}");
    let none = minimal_with("  - name: ldap\n    listen: 0.0.0.0:389\n", "");
    let none = none.replace("connectors:\n", "connectors: []\n");
    assert_eq!(parse_err(&none).key().as_deref(), Some("connectors"));
}

#[test]
fn listen_addresses_validated() {
    let e = parse_err(&format!("listen: 0.0.0.0:99999\n{MINIMAL}"));
    assert_eq!(e.key().as_deref(), Some("listen"));
    let e = parse_err(&format!("{MINIMAL}admin:\n  listen: localhost:9090\n"));
    assert_eq!(e.key().as_deref(), Some("admin.listen"));
    let e = parse_err(&format!("{MINIMAL}admin:\n  listen: 0.0.0.0:8443\n"));
    assert_eq!(e.key().as_deref(), Some("admin.listen"));
    assert!(e.message().contains("already used"), "{e}");
    let e = parse_err(&minimal_with("listen: 0.0.0.0:389", "listen: 389"));
    assert_eq!(e.key().as_deref(), Some("connectors[0].listen"));
    // Same address twice is refused; port 0 (ephemeral) never clashes.
    let clash = format!("{MINIMAL}  - name: other\n    listen: 0.0.0.0:389\n");
    assert_eq!(
        parse_err(&clash).key().as_deref(),
        Some("connectors[1].listen")
    );
    let zeros = minimal_with("listen: 0.0.0.0:389", "listen: 127.0.0.1:0")
        + "  - name: other\n    listen: 127.0.0.1:0\n";
    assert!(parse(&zeros).is_ok());
    let v6 = minimal_with("listen: 0.0.0.0:389", "listen: \"[::]:389\"");
    assert!(parse(&v6).is_ok());
}

#[test]
fn allow_clients_cidrs_parsed() {
    let yaml = minimal_with(
        "    listen: 0.0.0.0:389\n",
        "    listen: 0.0.0.0:389\n    allow_clients: [10.0.0.0/8, \"fd00::/8\", 192.168.1.7]\n",
    );
    let cfg = parse(&yaml).expect("parses");
    let c = &cfg.connectors[0];
    assert!(c.allows("10.255.0.1".parse().expect("ip")));
    assert!(c.allows("fd12:3456::1".parse().expect("ip")));
    assert!(c.allows("192.168.1.7".parse().expect("ip")));
    assert!(!c.allows("192.168.1.8".parse().expect("ip")));
    // IPv4-mapped IPv6 peers from a dual-stack socket match IPv4 networks.
    assert!(c.allows("::ffff:10.1.1.1".parse().expect("ip")));
    for (bad, at) in [
        ("[10.0.0.0/33]", "connectors[0].allow_clients[0]"),
        ("[10.0.0.0/8, 10.0.0.1/8]", "connectors[0].allow_clients[1]"),
        ("[not-an-ip]", "connectors[0].allow_clients[0]"),
        ("[]", "connectors[0].allow_clients"),
    ] {
        let yaml = minimal_with(
            "    listen: 0.0.0.0:389\n",
            &format!("    listen: 0.0.0.0:389\n    allow_clients: {bad}\n"),
        );
        assert_eq!(parse_err(&yaml).key().as_deref(), Some(at), "{bad}");
    }
    let c: Cidr = "fd00::/8".parse().expect("cidr");
    assert!(!c.contains("10.0.0.1".parse().expect("ip")));
}

#[test]
fn authz_is_accepted_and_parsed() {
    let yaml = format!(
        "{MINIMAL}authz:\n  pdp:\n    url: http://pdp.internal:8181/v1/authorize\n    timeout: 2s\n    cache_ttl: 0\n    on_error: allow\n"
    );
    let cfg = parse(&yaml).expect("parses");
    let pdp = cfg.authz.pdp.expect("pdp");
    assert_eq!(pdp.url, "http://pdp.internal:8181/v1/authorize");
    assert_eq!(pdp.timeout, Duration::from_secs(2));
    assert_eq!(pdp.cache_ttl, Duration::ZERO);
    assert_eq!(pdp.on_error, OnError::Allow);
    let bad = format!("{MINIMAL}authz:\n  pdp:\n    url: https://pdp\n    on_error: maybe\n");
    assert_eq!(parse_err(&bad).key().as_deref(), Some("authz.pdp.on_error"));
    let empty = format!("{MINIMAL}authz:\n");
    assert!(parse(&empty).expect("empty authz").authz.pdp.is_none());
}

#[test]
fn unknown_keys_are_named() {
    let e = parse_err(&format!("listn: 0.0.0.0:1\n{MINIMAL}"));
    assert_eq!(e.key().as_deref(), Some("listn"));
    assert!(e.message().starts_with("unknown key"), "{e}");
    assert_eq!(e.line(), Some(1));
    let e = parse_err(&minimal_with(
        "  audience: hub\n",
        "  audience: hub\n  audiance: x\n",
    ));
    assert_eq!(e.key().as_deref(), Some("auth.audiance"));
    assert_eq!(e.line(), Some(5));
    assert!(
        e.message().contains("audience"),
        "lists the valid keys: {e}"
    );
    let e = parse_err(&minimal_with(
        "    listen: 0.0.0.0:389\n",
        "    listen: 0.0.0.0:389\n    idle_timeot: 5m\n",
    ));
    assert_eq!(e.key().as_deref(), Some("connectors[0].idle_timeot"));
    assert_eq!(e.line(), Some(9));
    // A key written twice is an error too (the second would silently win).
    let e = parse_err(&format!("{MINIMAL}plaintext: true\n"));
    assert!(e.message().contains("duplicate"), "{e}");
    let e = parse_err(&format!("{MINIMAL}limits:\n  windw: 1MiB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.windw"));
    let e = parse_err(&format!(
        "{MINIMAL}authz:\n  pdp:\n    url: https://p\n    retries: 3\n"
    ));
    assert_eq!(e.key().as_deref(), Some("authz.pdp.retries"));
}

#[test]
fn missing_required_keys_are_named() {
    let e = parse_err(&minimal_with("  issuer: https://idp/\n", ""));
    assert_eq!(e.key().as_deref(), Some("auth.issuer"));
    assert!(e.message().contains("missing"), "{e}");
    let e = parse_err(&minimal_with("    listen: 0.0.0.0:389\n", ""));
    assert_eq!(e.key().as_deref(), Some("connectors[0].listen"));
    let e = parse_err("plaintext: true\nconnectors: []\n");
    assert_eq!(e.key().as_deref(), Some("auth"));
    let e = parse_err("");
    assert!(e.to_string().starts_with("hub.yaml: "), "{e}");
    let e = parse_err("a: [1, 2\n");
    assert!(e.message().contains("invalid YAML"), "{e}");
}

#[test]
fn env_vars_expand_in_every_string() {
    let yaml = "\
plaintext: ${PLAIN}
auth:
  issuer: ${ISSUER}
  audience: aud-${STAGE}-$${literal}
  jwks_file: ${JWKS}
  leeway: ${LEEWAY}
connectors:
  - name: ${NAME}
    listen: ${ADDR}
limits:
  max_tunnels: ${TUNNELS}
  window: ${WINDOW}
";
    let env = |k: &str| -> Option<String> {
        Some(
            match k {
                "PLAIN" => "true",
                "ISSUER" => "https://idp.example/",
                "STAGE" => "prod",
                "JWKS" => "/run/jwks.json",
                "LEEWAY" => "45s",
                "NAME" => "ldap",
                "ADDR" => "127.0.0.1:1389",
                "TUNNELS" => "12",
                "WINDOW" => "1MiB",
                _ => return None,
            }
            .to_owned(),
        )
    };
    let cfg = HubConfig::from_yaml("hub.yaml", yaml, &env).expect("expands");
    assert!(cfg.plaintext);
    assert_eq!(cfg.auth.issuer, "https://idp.example/");
    assert_eq!(cfg.auth.audience, "aud-prod-${literal}");
    assert_eq!(cfg.auth.jwks_file, Some(PathBuf::from("/run/jwks.json")));
    assert_eq!(cfg.auth.leeway, Duration::from_secs(45));
    assert_eq!(cfg.connectors[0].name, "ldap");
    assert_eq!(
        cfg.connectors[0].listen,
        "127.0.0.1:1389".parse().expect("addr")
    );
    assert_eq!(cfg.limits.max_tunnels, 12);
    assert_eq!(cfg.limits.window, 1024 * 1024);

    // A missing variable is an error naming the key (and the variable), with the line.
    let no_stage = |k: &str| if k == "STAGE" { None } else { env(k) };
    let e = HubConfig::from_yaml("hub.yaml", yaml, &no_stage).expect_err("missing var");
    assert_eq!(e.key().as_deref(), Some("auth.audience"));
    assert!(e.message().contains("STAGE"), "{e}");
    assert_eq!(e.line(), Some(4));
    assert_eq!(
        e.to_string(),
        "hub.yaml: auth.audience: environment variable STAGE is not set (line 4)"
    );
    let e = HubConfig::from_yaml("hub.yaml", yaml, &|k: &str| {
        if k == "ADDR" {
            None
        } else {
            env(k)
        }
    })
    .expect_err("missing var");
    assert_eq!(e.key().as_deref(), Some("connectors[0].listen"));
    // Unterminated reference.
    let e = parse_err(&minimal_with("  audience: hub\n", "  audience: ${HUB\n"));
    assert_eq!(e.key().as_deref(), Some("auth.audience"));
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    for bad in [
        "",
        "10",
        "10x",
        "s",
        "-1s",
        "1.5s",
        "10 s",
        "99999999999999999999h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_size("65536"), Ok(65536));
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("1MiB"), Ok(1 << 20));
    assert_eq!(parse_size("16MiB"), Ok(16 << 20));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    for bad in ["", "64KB", "1M", "MiB", "-1", "1.5MiB", "99999999999999GiB"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_percent("80%"), Ok(0.8));
    for bad in ["80", "0%", "100%", "x%", "-5%"] {
        assert!(parse_percent(bad).is_err(), "{bad:?}");
    }
    // In the file: `0` disables idle_timeout; a bare number is not a duration.
    let off = minimal_with(
        "    listen: 0.0.0.0:389\n",
        "    listen: 0.0.0.0:389\n    idle_timeout: 0\n",
    );
    assert_eq!(
        parse(&off).expect("parses").connectors[0].idle_timeout,
        None
    );
    let e = parse_err(&format!("{MINIMAL}limits:\n  heartbeat: 20\n"));
    assert_eq!(e.key().as_deref(), Some("limits.heartbeat"));
    assert!(e.message().contains("unit"), "{e}");
    let e = parse_err(&format!("{MINIMAL}limits:\n  hello_timeout: 10x\n"));
    assert_eq!(e.key().as_deref(), Some("limits.hello_timeout"));
    assert!(e.message().contains("\"10x\""), "{e}");
    let e = parse_err(&format!("{MINIMAL}limits:\n  window: 64KB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.window"));
    let sized =
        format!("{MINIMAL}limits:\n  window: 65536\n  max_frame: 16KiB\n  max_message: 64KiB\n");
    let cfg = parse(&sized).expect("sizes");
    assert_eq!((cfg.limits.window, cfg.limits.max_frame), (65536, 16384));
    // Cross-checks between limits.
    let e = parse_err(&format!("{MINIMAL}limits:\n  window: 32MiB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.window"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  max_frame: 1MiB\n"));
    assert_eq!(e.key().as_deref(), Some("limits.max_message"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  heartbeat: 0\n"));
    assert_eq!(e.key().as_deref(), Some("limits.heartbeat"));
    let e = parse_err(&format!("{MINIMAL}limits:\n  max_tunnels: 0\n"));
    assert_eq!(e.key().as_deref(), Some("limits.max_tunnels"));
    let e = parse_err(&minimal_with(
        "  audience: hub\n",
        "  audience: hub\n  leeway: 1h\n",
    ));
    assert_eq!(e.key().as_deref(), Some("auth.leeway"));
}

#[test]
fn logging_and_path_validated() {
    let e = parse_err(&format!("{MINIMAL}logging:\n  format: xml\n"));
    assert_eq!(e.key().as_deref(), Some("logging.format"));
    let e = parse_err(&format!("{MINIMAL}logging:\n  level: loud\n"));
    assert_eq!(e.key().as_deref(), Some("logging.level"));
    let ok = format!("{MINIMAL}logging:\n  level: nowconnect_hub=debug,info\n  format: json\n");
    assert_eq!(parse(&ok).expect("ok").logging.format, LogFormat::Json);
    let e = parse_err(&format!("path: v1/tunnel\n{MINIMAL}"));
    assert_eq!(e.key().as_deref(), Some("path"));
}

// ---------------------------------------------------------------------------------------------
// --check and the command line
// ---------------------------------------------------------------------------------------------

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Files {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).expect("write");
        p
    }
}

fn ca_cert_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("ca").pem()
}

/// A self-signed server (leaf) certificate and its key, both PEM.
fn leaf_pem() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["hub.example.com".to_owned()]).expect("params");
    (
        params.self_signed(&key).expect("leaf").pem(),
        key.serialize_pem(),
    )
}

/// Writes a checkable hub.yaml with relative file names (resolved against its directory).
fn checkable(files: &Files, jwks: &str, jwks_ca: &str) -> PathBuf {
    let (cert, key) = leaf_pem();
    files.write("hub.crt", &cert);
    files.write("hub.key", &key);
    files.write("jwks.json", jwks);
    files.write("ca.pem", jwks_ca);
    files.write(
        "hub.yaml",
        "\
tls:
  cert: hub.crt
  key: hub.key
auth:
  issuer: https://idp/
  audience: hub
  jwks_file: jwks.json
  jwks_ca: ca.pem
connectors:
  - name: ldap
    listen: 127.0.0.1:0
",
    )
}

fn run_cli(args: &[&str], env_config: Option<&Path>) -> (u8, String, String, Option<HubConfig>) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let start = cli::start_with(
        args.iter().map(OsString::from),
        env_config.map(|p| p.as_os_str().to_owned()),
        &no_env,
        &mut out,
        &mut err,
    );
    let (code, cfg) = match start {
        Start::Exit(c) => (c, None),
        Start::Run(cfg) => (0, Some(*cfg)),
    };
    (
        code,
        String::from_utf8(out).expect("utf8"),
        String::from_utf8(err).expect("utf8"),
        cfg,
    )
}

#[test]
fn check_reads_and_parses_referenced_files() {
    let files = Files::new();
    let jwks = jwks_json(&[&keys().es]);
    let cfg_path = checkable(&files, &jwks, &ca_cert_pem());
    let p = cfg_path.to_str().expect("utf8 path");
    let (code, out, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!((code, out.as_str()), (0, "ok\n"), "stderr: {err}");

    // Relative names were resolved against the config's directory.
    let (code, _, _, cfg) = run_cli(&["--config", p], None);
    assert_eq!(code, 0);
    let cfg = cfg.expect("runs");
    assert_eq!(cfg.tls.expect("tls").cert, files.dir.path().join("hub.crt"));

    // A server leaf certificate is not a CA.
    let (leaf, _) = leaf_pem();
    files.write("ca.pem", &leaf);
    let (code, out, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("auth.jwks_ca: ") && err.contains("not a CA"),
        "{err}"
    );
    assert!(err.starts_with(p), "{err}");
    files.write("ca.pem", &ca_cert_pem());

    // A JWKS that is not one.
    files.write("jwks.json", "{\"keys\": 5}");
    let (code, _, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!(code, 2);
    assert!(err.contains("auth.jwks_file: "), "{err}");
    files.write("jwks.json", &jwks);

    // A key that does not parse, then one that does not match the certificate.
    files.write(
        "hub.key",
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    );
    let (code, _, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!(code, 2);
    assert!(err.contains("tls.key: "), "{err}");
    assert!(
        !err.contains("not base64"),
        "never quotes a key file: {err}"
    );
    let (_, other_key) = leaf_pem();
    files.write("hub.key", &other_key);
    let (code, _, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!(code, 2);
    assert!(err.contains("tls.key: "), "{err}");
    let (_, key) = leaf_pem();
    files.write("hub.key", &key);

    // An unreadable certificate.
    std::fs::remove_file(files.dir.path().join("hub.crt")).expect("rm");
    let (code, _, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!(code, 2);
    assert!(err.contains("tls.cert: "), "{err}");

    // Plain load does not read the referenced files.
    let (code, _, _, cfg) = run_cli(&["--config", p], None);
    assert_eq!(code, 0);
    assert!(cfg.is_some());
}

#[test]
fn command_line() {
    let files = Files::new();
    files.write("jwks.json", &jwks_json(&[&keys().ed]));
    let cfg = files.write("hub.yaml", &minimal_with("/etc/jwks.json", "jwks.json"));
    let p = cfg.to_str().expect("utf8");
    let parse_args = |args: &[&str], env: Option<&str>| {
        conf::parse_args(args.iter().map(OsString::from), env.map(OsString::from))
    };
    match parse_args(&["--config", p], None) {
        Ok(Command::Run(c)) => assert_eq!((c.config.as_path(), c.check), (cfg.as_path(), false)),
        other => panic!("{other:?}"),
    }
    match parse_args(&[&format!("--config={p}"), "--check"], None) {
        Ok(Command::Run(c)) => assert!(c.check),
        other => panic!("{other:?}"),
    }
    // --config defaults to $NOWCONNECT_CONFIG.
    match parse_args(&["--check"], Some(p)) {
        Ok(Command::Run(c)) => assert_eq!(c.config, cfg),
        other => panic!("{other:?}"),
    }
    assert_eq!(parse_args(&["--help"], None), Ok(Command::Help));
    assert_eq!(
        parse_args(&["--config", p, "-V"], None),
        Ok(Command::Version)
    );
    assert!(parse_args(&[], None).is_err());
    assert!(parse_args(&["--config"], None).is_err());
    assert!(parse_args(&["--config", p, "--frobnicate"], None).is_err());

    let (code, out, _, _) = run_cli(&["--version"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("nowconnect-hub "), "{out}");
    let (code, out, _, _) = run_cli(&["--help"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("--config FILE") && out.contains("--check"),
        "{out}"
    );
    let (code, out, err, _) = run_cli(&["--bogus"], None);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("--bogus"), "{err}");
    let (code, out, err, _) = run_cli(&[], None);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("NOWCONNECT_CONFIG"), "{err}");
    let (code, out, _, _) = run_cli(&["--check"], Some(&cfg));
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    let (code, _, _, loaded) = run_cli(&[], Some(&cfg));
    assert_eq!(code, 0);
    assert!(loaded.is_some());
    // Config errors: stderr, exit 2, file and key named.
    files.write(
        "hub.yaml",
        &minimal_with("listen: 0.0.0.0:389", "listen: 0.0.0.0:38x9"),
    );
    let (code, out, err, _) = run_cli(&["--config", p, "--check"], None);
    assert_eq!((code, out.as_str()), (2, ""));
    assert_eq!(
        err.trim_end(),
        format!("{p}: connectors[0].listen: invalid socket address \"0.0.0.0:38x9\" (line 8)")
    );
    let (code, _, err, _) = run_cli(&["--config", "/nonexistent/hub.yaml"], None);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("/nonexistent/hub.yaml: cannot read"),
        "{err}"
    );
}

// =============================================================================================
// Auth
// =============================================================================================

const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://idp.example.com/";
const AUD: &str = "nowconnect-hub";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One signing key: its JWK (built by hand) and what signs with it.
struct TestKey {
    kid: &'static str,
    alg: Algorithm,
    jwk: Value,
    encoding: EncodingKey,
    /// Public key bytes, for the HMAC-confusion attack.
    public: Vec<u8>,
}

struct Keys {
    es: TestKey,
    ed: TestKey,
    rsa: TestKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let raw = ec.public_key_raw(); // 0x04 || x || y
        assert_eq!(raw.len(), 65);
        let es = TestKey {
            kid: "es-1",
            alg: Algorithm::ES256,
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
                        "kid": "es-1", "alg": "ES256", "use": "sig"}),
            encoding: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("ec pem"),
            public: ec.public_key_pem().into_bytes(),
        };
        let edk = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        let ed = TestKey {
            kid: "ed-1",
            alg: Algorithm::EdDSA,
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(edk.public_key_raw()), "kid": "ed-1"}),
            encoding: EncodingKey::from_ed_pem(edk.serialize_pem().as_bytes()).expect("ed pem"),
            public: edk.public_key_pem().into_bytes(),
        };
        let rsa = {
            use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
            use rsa::traits::PublicKeyParts;
            let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("rsa");
            let n = key.n().as_ref().to_be_bytes_trimmed_vartime();
            let e = key.e().to_be_bytes_trimmed_vartime();
            let der = key.to_pkcs1_der().expect("der");
            let public = key
                .to_public_key()
                .to_pkcs1_der()
                .expect("pub der")
                .as_bytes()
                .to_vec();
            TestKey {
                kid: "rsa-1",
                alg: Algorithm::RS256,
                jwk: json!({"kty": "RSA", "n": b64(&n), "e": b64(&e), "kid": "rsa-1", "alg": "RS256", "use": "sig"}),
                encoding: EncodingKey::from_rsa_der(der.as_bytes()),
                public,
            }
        };
        Keys { es, ed, rsa }
    })
}

fn jwks_json(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn jwk_set(keys: &[&TestKey]) -> jsonwebtoken::jwk::JwkSet {
    auth::parse_jwks(jwks_json(keys).as_bytes()).expect("jwks")
}

fn policy() -> AuthPolicy {
    AuthPolicy {
        issuer: ISS.to_owned(),
        audience: AUD.to_owned(),
        algorithms: vec![
            Algorithm::RS256,
            Algorithm::PS256,
            Algorithm::ES256,
            Algorithm::EdDSA,
        ],
        agent_id_claim: "sub".to_owned(),
        connectors_claim: None,
        leeway_secs: 30,
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "dc1-agent-01", "jti": "j-42",
           "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 3600})
}

fn sign_as(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign")
}

fn sign(key: &TestKey, claims: &Value) -> String {
    sign_as(key, key.alg, Some(key.kid), claims)
}

/// A token with a hand-made header and signature (for algorithms jsonwebtoken won't produce).
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

fn all_keys() -> jsonwebtoken::jwk::JwkSet {
    let k = keys();
    jwk_set(&[&k.es, &k.ed, &k.rsa])
}

fn refused(token: &str, claims_policy: &AuthPolicy) -> Reason {
    match validate_token(claims_policy, &all_keys(), token, NOW) {
        Err(AuthError::Invalid(r)) => {
            // Never the token, nor its signature, in any message.
            let sig = token.rsplit('.').next().unwrap_or_default();
            for shown in [r.to_string(), format!("{r:?}"), r.detail.clone()] {
                assert!(!shown.contains(token), "{shown}");
                assert!(sig.len() < 8 || !shown.contains(sig), "{shown}");
            }
            r.reason
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn valid_tokens_accepted_for_each_key_type() {
    let k = keys();
    for key in [&k.es, &k.ed, &k.rsa] {
        let token = sign(key, &claims());
        let v = validate_token(&policy(), &all_keys(), &token, NOW)
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
        assert_eq!(v.agent_id, "dc1-agent-01");
        assert_eq!(v.exp, NOW + 3600);
        assert_eq!(v.iat, Some(NOW - 60));
        assert_eq!(v.nbf, Some(NOW - 60));
        assert_eq!(v.connectors, None);
        assert_eq!(v.summary.kid.as_deref(), Some(key.kid));
        assert_eq!(
            v.summary.to_string(),
            format!("kid={} sub=dc1-agent-01 jti=j-42", key.kid)
        );
    }
    // aud may be a list containing the audience.
    let mut c = claims();
    c["aud"] = json!(["other", AUD]);
    assert!(validate_token(&policy(), &all_keys(), &sign(&k.es, &c), NOW).is_ok());
}

#[test]
fn expired_refused_with_leeway() {
    let k = keys();
    let mut c = claims();
    c["exp"] = json!(NOW - 31);
    assert_eq!(refused(&sign(&k.es, &c), &policy()), Reason::Expired);
    c["exp"] = json!(NOW - 10); // within the 30 s leeway
    assert!(validate_token(&policy(), &all_keys(), &sign(&k.es, &c), NOW).is_ok());
    let strict = AuthPolicy {
        leeway_secs: 0,
        ..policy()
    };
    assert_eq!(refused(&sign(&k.es, &c), &strict), Reason::Expired);
}

#[test]
fn token_without_exp_refused() {
    let mut c = claims();
    c.as_object_mut().expect("object").remove("exp");
    assert_eq!(
        refused(&sign(&keys().es, &c), &policy()),
        Reason::MissingExp
    );
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    assert_eq!(refused(&sign(&keys().es, &c), &policy()), Reason::BadClaim);
}

#[test]
fn nbf_and_iat_in_the_future_refused() {
    let k = keys();
    let mut c = claims();
    c["nbf"] = json!(NOW + 31);
    assert_eq!(refused(&sign(&k.ed, &c), &policy()), Reason::NotYetValid);
    c["nbf"] = json!(NOW + 20); // within leeway
    assert!(validate_token(&policy(), &all_keys(), &sign(&k.ed, &c), NOW).is_ok());
    let mut c = claims();
    c["iat"] = json!(NOW + 31);
    assert_eq!(refused(&sign(&k.ed, &c), &policy()), Reason::IssuedInFuture);
}

#[test]
fn wrong_audience_refused() {
    let k = keys();
    let mut c = claims();
    c["aud"] = json!("someone-else");
    assert_eq!(refused(&sign(&k.es, &c), &policy()), Reason::WrongAudience);
    c["aud"] = json!(["a", "b"]);
    assert_eq!(refused(&sign(&k.es, &c), &policy()), Reason::WrongAudience);
    c.as_object_mut().expect("object").remove("aud");
    assert_eq!(refused(&sign(&k.es, &c), &policy()), Reason::WrongAudience);
}

#[test]
fn wrong_issuer_refused() {
    let k = keys();
    let mut c = claims();
    c["iss"] = json!("https://evil.example.com/");
    assert_eq!(refused(&sign(&k.rsa, &c), &policy()), Reason::WrongIssuer);
    c.as_object_mut().expect("object").remove("iss");
    assert_eq!(refused(&sign(&k.rsa, &c), &policy()), Reason::WrongIssuer);
}

#[test]
fn unknown_kid_is_reported_as_such() {
    let k = keys();
    let token = sign_as(&k.es, Algorithm::ES256, Some("rotated-key"), &claims());
    match validate_token(&policy(), &all_keys(), &token, NOW) {
        Err(e @ AuthError::UnknownKid(_)) => {
            assert_eq!(e.reason(), Some(Reason::UnknownKid));
            assert_eq!(e.status(), 401);
            assert_eq!(e.www_authenticate(), Some("Bearer error=\"invalid_token\""));
        }
        other => panic!("{other:?}"),
    }
    let no_kid = sign_as(&k.es, Algorithm::ES256, None, &claims());
    assert_eq!(refused(&no_kid, &policy()), Reason::MissingKid);
}

#[test]
fn alg_none_refused() {
    let unsigned = raw_token(&json!({"alg": "none", "kid": "es-1"}), &claims(), b"");
    assert_eq!(refused(&unsigned, &policy()), Reason::AlgorithmNone);
    let upper = raw_token(&json!({"alg": "NONE", "kid": "es-1"}), &claims(), b"");
    assert_eq!(refused(&upper, &policy()), Reason::AlgorithmNone);
}

#[test]
fn hs256_with_public_key_as_secret_refused() {
    // The classic algorithm-confusion attack: HMAC keyed with the server's public key. Refused
    // even with HS256 in the policy (never configurable, but the validator must not trust it).
    let k = keys();
    let lax = AuthPolicy {
        algorithms: vec![Algorithm::HS256, Algorithm::RS256, Algorithm::ES256],
        ..policy()
    };
    for key in [&k.rsa, &k.es] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.to_owned());
        let secret = EncodingKey::from_secret(&key.public).expect("secret");
        let forged = jsonwebtoken::encode(&header, &claims(), &secret).expect("hmac");
        assert_eq!(refused(&forged, &lax), Reason::AlgorithmHmac);
        assert_eq!(refused(&forged, &policy()), Reason::AlgorithmHmac);
    }
}

#[test]
fn jwk_alg_disagreeing_with_token_refused() {
    let k = keys();
    // Same RSA key, signed PS256 (allowed by policy), but the JWK says alg RS256.
    let ps = sign_as(&k.rsa, Algorithm::PS256, Some("rsa-1"), &claims());
    assert_eq!(refused(&ps, &policy()), Reason::KeyMismatch);
    // ...and accepted once the JWK does not pin an alg: the signature itself is fine.
    let mut jwk = k.rsa.jwk.clone();
    jwk.as_object_mut().expect("object").remove("alg");
    let set = auth::parse_jwks(json!({"keys": [jwk]}).to_string().as_bytes()).expect("jwks");
    assert!(validate_token(&policy(), &set, &ps, NOW).is_ok());
    // Header says ES256 but the kid is the Ed25519 key (kty mismatch).
    let cross = sign_as(&k.es, Algorithm::ES256, Some("ed-1"), &claims());
    assert_eq!(refused(&cross, &policy()), Reason::KeyMismatch);
    // A JWK meant for encryption.
    let mut enc = k.es.jwk.clone();
    enc["use"] = json!("enc");
    let set = auth::parse_jwks(json!({"keys": [enc]}).to_string().as_bytes()).expect("jwks");
    match validate_token(&policy(), &set, &sign(&k.es, &claims()), NOW) {
        Err(AuthError::Invalid(r)) => assert_eq!(r.reason, Reason::KeyMismatch),
        other => panic!("{other:?}"),
    }
}

#[test]
fn algorithm_outside_allow_list_refused() {
    let k = keys();
    let es_only = AuthPolicy {
        algorithms: vec![Algorithm::ES256],
        ..policy()
    };
    assert_eq!(
        refused(&sign(&k.rsa, &claims()), &es_only),
        Reason::AlgorithmNotAllowed
    );
    assert!(validate_token(&es_only, &all_keys(), &sign(&k.es, &claims()), NOW).is_ok());
}

#[test]
fn bad_signature_and_malformed_refused() {
    let k = keys();
    let token = sign(&k.es, &claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("someone-else");
    let forged_payload = b64(c.to_string().as_bytes());
    parts[1] = &forged_payload;
    assert_eq!(refused(&parts.join("."), &policy()), Reason::BadSignature);
    // Signed by another key than the kid names.
    let other = sign_as(&k.ed, Algorithm::EdDSA, Some("ed-1"), &claims());
    let sig = other.rsplit('.').next().expect("sig");
    let (msg, _) = sign(&k.ed, &c)
        .rsplit_once('.')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .expect("split");
    assert_eq!(
        refused(&format!("{msg}.{sig}"), &policy()),
        Reason::BadSignature
    );
    assert_eq!(refused("abc", &policy()), Reason::Malformed);
    assert_eq!(refused("a.b.c", &policy()), Reason::Malformed);
    assert_eq!(refused(&"x".repeat(20_000), &policy()), Reason::TooLarge);
    let crit = raw_token(
        &json!({"alg": "ES256", "kid": "es-1", "crit": ["exp"]}),
        &claims(),
        b"x",
    );
    assert_eq!(refused(&crit, &policy()), Reason::CriticalHeader);
}

#[test]
fn agent_id_and_connector_scopes_extracted() {
    let k = keys();
    let p = AuthPolicy {
        agent_id_claim: "agent".to_owned(),
        connectors_claim: Some("nowconnect_connectors".to_owned()),
        ..policy()
    };
    let mut c = claims();
    c["agent"] = json!("dc2-agent");
    c["nowconnect_connectors"] = json!(["ldap", "ldaps"]);
    let v = validate_token(&p, &all_keys(), &sign(&k.es, &c), NOW).expect("valid");
    assert_eq!(v.agent_id, "dc2-agent");
    assert_eq!(
        v.connectors,
        Some(vec!["ldap".to_owned(), "ldaps".to_owned()])
    );
    c["nowconnect_connectors"] = json!("ssh  pg");
    let v = validate_token(&p, &all_keys(), &sign(&k.es, &c), NOW).expect("valid");
    assert_eq!(v.connectors, Some(vec!["ssh".to_owned(), "pg".to_owned()]));
    c.as_object_mut()
        .expect("object")
        .remove("nowconnect_connectors");
    let v = validate_token(&p, &all_keys(), &sign(&k.es, &c), NOW).expect("valid");
    assert_eq!(v.connectors, Some(vec![]), "no claim: empty scope");
    c["nowconnect_connectors"] = json!(5);
    assert_eq!(refused(&sign(&k.es, &c), &p), Reason::BadConnectorsClaim);
    c["nowconnect_connectors"] = json!(["ok", 5]);
    assert_eq!(refused(&sign(&k.es, &c), &p), Reason::BadConnectorsClaim);
    c.as_object_mut().expect("object").remove("agent");
    c["nowconnect_connectors"] = json!([]);
    assert_eq!(refused(&sign(&k.es, &c), &p), Reason::MissingAgentId);
    c["agent"] = json!("");
    assert_eq!(refused(&sign(&k.es, &c), &p), Reason::MissingAgentId);
}

#[test]
fn bearer_header_and_upgrade_answers() {
    assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
    assert_eq!(bearer_token(Some("bearer   abc")), Ok("abc"));
    let missing = bearer_token(None).expect_err("missing");
    assert_eq!(missing, AuthError::Missing);
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.www_authenticate(), Some("Bearer"));
    assert_eq!(
        bearer_token(Some("Basic dXNlcjpwdw==")),
        Err(AuthError::Missing)
    );
    let empty = bearer_token(Some("Bearer ")).expect_err("empty");
    assert_eq!(
        empty.www_authenticate(),
        Some("Bearer error=\"invalid_token\"")
    );
    assert_eq!(AuthError::Unavailable.status(), 503);
    assert_eq!(AuthError::Unavailable.www_authenticate(), None);
}

fn jwks_file_authenticator(files: &Files, keys: &[&TestKey], kid_min: Duration) -> Authenticator {
    let path = files.write("jwks.json", &jwks_json(keys));
    let jwks = Jwks::with_cache(
        JwksSource::File(path),
        JwksCache::new(Some(Duration::from_secs(600)), kid_min),
    );
    Authenticator::new(policy(), jwks)
}

#[test]
fn authenticator_refreshes_once_on_unknown_kid_rate_limited() {
    let k = keys();
    let files = Files::new();
    let authn = jwks_file_authenticator(&files, &[&k.es], Duration::from_secs(30));
    let t0 = Instant::now();
    let header = format!("Bearer {}", sign(&k.es, &claims()));

    // Not loaded yet: 503, not 401.
    assert_eq!(
        authn.authenticate_at(Some(&header), NOW, t0),
        Err(AuthError::Unavailable)
    );
    assert_eq!(authn.jwks().refresh(t0), Ok(1));
    assert!(authn.authenticate_at(Some(&header), NOW, t0).is_ok());
    assert_eq!(
        authn.authenticate_at(None, NOW, t0),
        Err(AuthError::Missing)
    );

    // The IdP rotates in the Ed25519 key: the first token with its kid triggers one refresh.
    files.write("jwks.json", &jwks_json(&[&k.es, &k.ed]));
    let ed_header = format!("Bearer {}", sign(&k.ed, &claims()));
    let v = authn
        .authenticate_at(Some(&ed_header), NOW, t0 + Duration::from_secs(1))
        .expect("refreshed on unknown kid");
    assert_eq!(v.summary.kid.as_deref(), Some("ed-1"));

    // Another new key within 30 s: no refresh (rate limit), refused as unknown kid...
    files.write("jwks.json", &jwks_json(&[&k.es, &k.ed, &k.rsa]));
    let rsa_header = format!("Bearer {}", sign(&k.rsa, &claims()));
    let e = authn
        .authenticate_at(Some(&rsa_header), NOW, t0 + Duration::from_secs(10))
        .expect_err("rate-limited");
    assert_eq!(e.reason(), Some(Reason::UnknownKid));
    assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
    assert_eq!(e.www_authenticate(), Some("Bearer error=\"invalid_token\""));
    // ...and accepted after the interval.
    assert!(authn
        .authenticate_at(Some(&rsa_header), NOW, t0 + Duration::from_secs(32))
        .is_ok());
    // A kid that is still unknown after the refresh is invalid.
    let bogus = format!(
        "Bearer {}",
        sign_as(&k.es, Algorithm::ES256, Some("nope"), &claims())
    );
    let e = authn
        .authenticate_at(Some(&bogus), NOW, t0 + Duration::from_secs(100))
        .expect_err("unknown");
    assert!(
        matches!(&e, AuthError::Invalid(r) if r.reason == Reason::UnknownKid),
        "{e:?}"
    );
    // Messages never carry the token.
    assert!(!e.to_string().contains(&bogus[7..]));
    assert!(!e.body().contains(&bogus[7..]));
}

#[test]
fn jwks_cache_schedule_and_last_good_keys() {
    let k = keys();
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut cache = JwksCache::new(Some(s(600)), s(30));
    assert!(cache.refresh_due(t0) && !cache.is_loaded());
    cache.begin_refresh(t0);
    assert!(cache
        .finish_refresh(Err(JwksError::Http("down".into())))
        .is_err());
    assert!(!cache.refresh_due(t0 + s(4)));
    assert!(
        cache.refresh_due(t0 + auth::UNLOADED_RETRY),
        "unloaded: retry soon"
    );
    cache.begin_refresh(t0 + s(5));
    assert_eq!(cache.finish_refresh(Ok(jwk_set(&[&k.es]))), Ok(1));
    assert!(cache.is_loaded());
    assert!(!cache.refresh_due(t0 + s(5) + s(599)));
    assert!(cache.refresh_due(t0 + s(5) + s(600)));
    // A failed periodic refresh keeps the last good keys and retries sooner.
    cache.begin_refresh(t0 + s(605));
    assert!(cache
        .finish_refresh(Err(JwksError::Http("down".into())))
        .is_err());
    assert_eq!(cache.keys().expect("kept").keys.len(), 1);
    assert!(cache.refresh_due(t0 + s(605) + auth::FAILED_RETRY));
    // Unknown-kid refreshes: at most one per interval.
    assert!(cache.try_begin_kid_refresh(t0 + s(700)));
    assert!(!cache.try_begin_kid_refresh(t0 + s(729)));
    assert!(cache.try_begin_kid_refresh(t0 + s(730)));
    // jwks_refresh: 0 disables the periodic refresh once loaded.
    let mut off = JwksCache::new(None, s(30));
    off.begin_refresh(t0);
    assert!(off.finish_refresh(Ok(jwk_set(&[&k.es]))).is_ok());
    assert!(!off.refresh_due(t0 + s(1_000_000)));
}

#[test]
fn jwks_parsing_rules() {
    assert!(matches!(auth::parse_jwks(b"{}"), Err(JwksError::Parse(_))));
    assert!(matches!(
        auth::parse_jwks(b"not json"),
        Err(JwksError::Parse(_))
    ));
    let no_kid = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]});
    assert_eq!(
        auth::parse_jwks(no_kid.to_string().as_bytes()),
        Err(JwksError::NoKeys)
    );
    // Symmetric keys in the JWKS are never usable.
    let oct = json!({"keys": [{"kty": "oct", "k": b64(b"secret-secret"), "kid": "es-1"}]});
    let set = auth::parse_jwks(oct.to_string().as_bytes()).expect("parses");
    match validate_token(&policy(), &set, &sign(&keys().es, &claims()), NOW) {
        Err(AuthError::Invalid(r)) => assert_eq!(r.reason, Reason::KeyMismatch),
        other => panic!("{other:?}"),
    }
}

#[test]
fn jwks_fetched_from_url() {
    // A loopback HTTP server (http:// is allowed for loopback only, in config).
    let server = tiny_http::Server::http("127.0.0.1:0").expect("server");
    let port = server.server_addr().to_ip().expect("ip").port();
    let body = jwks_json(&[&keys().es]);
    let handle = std::thread::spawn(move || {
        for status in [200, 500] {
            let req = server.recv().expect("request");
            assert_eq!(req.url(), "/jwks.json");
            let resp = tiny_http::Response::from_string(body.clone()).with_status_code(status);
            req.respond(resp).expect("respond");
        }
    });
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let source = JwksSource::url(&url, None, Duration::from_secs(5)).expect("source");
    let jwks = Jwks::new(source, Some(Duration::from_secs(600)));
    let t0 = Instant::now();
    assert_eq!(jwks.refresh(t0), Ok(1));
    assert!(jwks.is_loaded());
    // An HTTP error keeps the last good keys.
    assert!(matches!(jwks.refresh(t0), Err(JwksError::Http(_))));
    assert!(jwks.is_loaded());
    handle.join().expect("server thread");

    // jwks_ca must hold CA certificates.
    let files = Files::new();
    let (leaf, _) = leaf_pem();
    let ca = files.write("leaf.pem", &leaf);
    assert!(matches!(
        JwksSource::url(&url, Some(&ca), Duration::from_secs(1)),
        Err(JwksError::Setup(_))
    ));
    let ca = files.write("ca.pem", &ca_cert_pem());
    assert!(JwksSource::url(&url, Some(&ca), Duration::from_secs(1)).is_ok());
}
