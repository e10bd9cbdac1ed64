//! Operations end to end (operations.md; issue 6 "Observe" and "Run"), against the real
//! `nowconnect-hub` and `nowconnect-agent` binaries:
//!
//! - `/metrics` of both sides parsed strictly ([`nowconnect_tests::prom`]) and held against the
//!   metric table of operations.md; counters move by exactly what happened;
//! - logs: every line JSON with the operations.md fields, one close line per stream, tunnel
//!   up/down, auth failures with reason and kid/sub/jti, and no token, key or payload in them;
//!   `format: text` and `auto` too;
//! - the status pages rendered by headless Chromium (DOM and a screenshot that is checked);
//! - the graceful drain on SIGTERM, hub and agent.

use nowconnect_tests::echo_server;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::prom::{self, Exposition, Side, SpecMetric};
use nowconnect_tests::tunnel::{
    http_get, is_listening, log_records, Transport, Tunnel, AGENT_ID, ISSUER, TUNNEL_PATH,
};
use nowconnect_tests::*;
use serde_json::Value;

const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Test servers and clients
// ---------------------------------------------------------------------------------------------

/// A loopback server handling each connection on its own thread. The agent's health checks
/// connect and close without sending: handlers shrug off empty connections.
fn serve(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind(free_addr()).expect("bind test server");
    let addr = listener.local_addr().expect("test server addr");
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || handler(conn));
        }
    });
    addr
}

/// Deterministic payload: byte `i` is `i % 251`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Waits for one byte, then sends `total` bytes of [`pattern`] and closes its write half.
fn bulk_server(total: usize) -> SocketAddr {
    serve(move |mut s| {
        let mut go = [0u8; 1];
        if s.read_exact(&mut go).is_err() {
            return;
        }
        let chunk = pattern(251 * 256);
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(chunk.len());
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n;
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

/// Writes `msg`, half-closes, reads the echo to EOF and checks it.
fn echo_once(addr: SocketAddr, msg: &[u8]) {
    let mut c = connect(addr);
    c.write_all(msg).expect("write");
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("read echo");
    assert!(back == msg, "echo answered {} other bytes", back.len());
}

/// `GET` on an admin listener: status, headers (lower-case names) and body.
fn admin_get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = connect(addr);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP answer");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// `/metrics`, checked to be a valid exposition served as `text/plain; version=0.0.4`.
fn scrape(addr: SocketAddr) -> Exposition {
    let (status, headers, body) = admin_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics on {addr}: {body}");
    let ctype = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    assert!(
        ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
        "/metrics Content-Type {ctype:?}"
    );
    prom::parse(&body).unwrap_or_else(|e| panic!("invalid exposition from {addr}: {e}\n{body}"))
}

/// A raw WebSocket upgrade to a plaintext hub with `token`; the answer's status code.
fn upgrade_status(hub: SocketAddr, token: &str) -> u16 {
    let mut s = connect(hub);
    write!(
        s,
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {hub}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: nowconnect.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .expect("write upgrade");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// A token signed by the tunnel's trusted ES256 key but for another audience, with a
/// recognizable `jti`.
fn wrong_audience_token(tunnel: &Tunnel, jti: &str) -> String {
    let mut claims = JwtKeys::agent_claims(ISSUER, "someone-else", AGENT_ID, 600);
    claims["jti"] = Value::from(jti);
    tunnel.mint(&claims)
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Every spec metric of `side` (and `Both`) is exported with its type and a HELP line; every
/// series has exactly the spec's label names (plus `le` on buckets), only the values the spec
/// enumerates, and no label value naming a client address; no `nowconnect_*` family outside
/// the spec.
fn check_against_spec(
    what: &str,
    exp: &Exposition,
    spec: &[SpecMetric],
    side: Side,
    clients: &[String],
) {
    let mine: Vec<&SpecMetric> = spec
        .iter()
        .filter(|m| m.side == side || m.side == Side::Both)
        .collect();
    let mut problems = Vec::new();
    for m in &mine {
        let Some(fam) = exp.family(&m.name) else {
            problems.push(format!("{} not exported", m.name));
            continue;
        };
        if fam.kind.as_deref() != Some(m.kind.as_str()) {
            problems.push(format!("{}: TYPE {:?}, spec {}", m.name, fam.kind, m.kind));
        }
        if fam.help.as_deref().is_none_or(|h| h.trim().is_empty()) {
            problems.push(format!("{}: no HELP", m.name));
        }
        let want: BTreeSet<String> = m.labels.iter().cloned().collect();
        for s in &fam.samples {
            if s.label_names() != want {
                problems.push(format!(
                    "{}: series with labels {:?}, spec {want:?}",
                    s.name, s.labels
                ));
            }
            if let (Some(last), false) = (m.labels.last(), m.values.is_empty()) {
                if let Some(v) = s.label(last) {
                    if !m.values.iter().any(|x| x == v) {
                        problems.push(format!(
                            "{}: {last}=\"{v}\" is not one of {:?}",
                            s.name, m.values
                        ));
                    }
                }
            }
        }
    }
    for fam in exp.families.values() {
        if fam.name.starts_with("nowconnect_") && !mine.iter().any(|m| m.name == fam.name) {
            problems.push(format!(
                "{}: exported but not in operations.md for the {side:?}",
                fam.name
            ));
        }
    }
    // Low cardinality: no client address (nor its port) and no per-stream label.
    for s in exp.all_samples() {
        for (k, v) in &s.labels {
            if ["cid", "client", "remote", "peer", "session"].contains(&k.as_str()) {
                problems.push(format!("{}: per-connection label {k}", s.name));
            }
            if clients.iter().any(|c| v.contains(c.as_str())) {
                problems.push(format!(
                    "{}: label {k}=\"{v}\" names a client address",
                    s.name
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{what} /metrics vs operations.md:\n  {}",
        problems.join("\n  ")
    );
}

/// `after - before` of one series.
fn delta(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

/// Both `/metrics` follow operations.md, and counters move by exactly what happened: one
/// stream (1000 bytes up, 2500 down), one open to a backend that went away, one upgrade with a
/// bad token.
#[test]
fn metrics_follow_the_spec_and_count_exactly() {
    const UP: usize = 1000;
    const DOWN: usize = 2500;
    // Reads UP bytes, answers DOWN bytes, closes its write half, waits for the client's EOF.
    let qa = serve(|mut s| {
        let mut req = vec![0u8; UP];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let _ = s.write_all(&pattern(DOWN));
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    });
    // Passes the agent's first (and, with a 1 h interval, only) health check, then goes away.
    let gone_listener = TcpListener::bind(free_addr()).expect("bind");
    let gone = gone_listener.local_addr().expect("addr");
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("qa", &[qa])
        .connector_with(
            "gone",
            free_addr(),
            &[gone],
            &[],
            &["health_check: {interval: 1h, timeout: 2s}"],
        )
        .start();
    let spec = prom::spec_metrics(&prom::operations_md());
    // The built-in copy (for checkouts without the spec) must not drift from the spec.
    assert_eq!(
        prom::spec_metrics(prom::OPERATIONS_METRICS),
        spec,
        "OPERATIONS_METRICS in tests/src/prom.rs differs from operations.md: update the copy"
    );
    assert!(
        spec.len() >= 20,
        "operations.md metric table not found: {spec:?}"
    );

    // Health endpoints (operations.md): `ok`, and a JSON readiness that says why.
    for (side, admin) in [("hub", tunnel.hub_admin), ("agent", tunnel.agent_admin)] {
        let (status, _, body) = admin_get(admin, "/healthz");
        assert_eq!((status, body.trim()), (200, "ok"), "{side} /healthz");
        let (status, headers, body) = admin_get(admin, "/readyz");
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{side} /readyz is not JSON ({e}): {body}"));
        assert_eq!(
            (status, &json["ready"]),
            (200, &Value::Bool(true)),
            "{side} /readyz {body}"
        );
        assert!(
            json["connectors"]["qa"].is_object(),
            "{side} /readyz {body}"
        );
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "content-type" && v.contains("json")),
            "{side} /readyz content type {headers:?}"
        );
    }

    let hub0 = scrape(tunnel.hub_admin);
    let agent0 = scrape(tunnel.agent_admin);

    // One stream, both directions, closed normally.
    let mut clients = Vec::new();
    let mut c = connect(tunnel.connector("qa"));
    clients.push(c.local_addr().expect("local addr").to_string());
    c.write_all(&pattern(UP)).expect("write");
    let mut answer = vec![0u8; DOWN];
    c.read_exact(&mut answer).expect("read answer");
    assert!(answer == pattern(DOWN), "answer corrupted");
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("read EOF");
    assert!(rest.is_empty());
    drop(c);
    let closed = |h: &Exposition| {
        h.value(
            "nowconnect_streams_closed_total",
            &[("connector", "qa"), ("reason", "normal")],
        )
    };
    let mut last = (hub0.clone(), agent0.clone());
    wait_until(Duration::from_secs(10), || {
        last = (scrape(tunnel.hub_admin), scrape(tunnel.agent_admin));
        closed(&last.0) >= closed(&hub0) + 1.0
            && last
                .1
                .value("nowconnect_agent_streams_active", &[("connector", "qa")])
                == 0.0
    });
    let (hub1, agent1) = last;
    let qa_l = [("connector", "qa")];
    let hub_deltas = [
        (
            "nowconnect_streams_opened_total",
            vec![("connector", "qa")],
            1.0,
        ),
        (
            "nowconnect_streams_closed_total",
            vec![("connector", "qa"), ("reason", "normal")],
            1.0,
        ),
        (
            "nowconnect_streams_closed_total",
            vec![("connector", "qa")],
            1.0,
        ),
        (
            "nowconnect_stream_open_failures_total",
            vec![("connector", "qa")],
            0.0,
        ),
        (
            "nowconnect_bytes_total",
            vec![("connector", "qa"), ("direction", "c2a")],
            UP as f64,
        ),
        (
            "nowconnect_bytes_total",
            vec![("connector", "qa"), ("direction", "a2c")],
            DOWN as f64,
        ),
        (
            "nowconnect_open_duration_seconds_count",
            vec![("connector", "qa")],
            1.0,
        ),
        (
            "nowconnect_open_duration_seconds_bucket",
            vec![("connector", "qa"), ("le", "+Inf")],
            1.0,
        ),
        ("nowconnect_tunnel_handshakes_total", vec![], 0.0),
    ];
    let agent_deltas = [
        (
            "nowconnect_agent_bytes_total",
            vec![("connector", "qa"), ("direction", "c2a")],
            UP as f64,
        ),
        (
            "nowconnect_agent_bytes_total",
            vec![("connector", "qa"), ("direction", "a2c")],
            DOWN as f64,
        ),
        (
            "nowconnect_agent_backend_connect_duration_seconds_count",
            vec![("connector", "qa")],
            1.0,
        ),
        ("nowconnect_agent_connects_total", vec![], 0.0),
    ];
    let mut wrong = Vec::new();
    for (what, before, after, deltas) in [
        ("hub", &hub0, &hub1, &hub_deltas[..]),
        ("agent", &agent0, &agent1, &agent_deltas[..]),
    ] {
        for (name, labels, want) in deltas {
            let got = delta(before, after, name, labels);
            if got != *want {
                wrong.push(format!(
                    "{what} {name}{labels:?}: moved by {got}, want {want}"
                ));
            }
        }
    }
    for (what, exp, name) in [
        ("hub", &hub1, "nowconnect_streams_active"),
        ("agent", &agent1, "nowconnect_agent_streams_active"),
    ] {
        if exp.value(name, &qa_l) != 0.0 {
            wrong.push(format!(
                "{what} {name}{{qa}} = {} after the close",
                exp.value(name, &qa_l)
            ));
        }
    }
    let secs = hub1.value("nowconnect_open_duration_seconds_sum", &qa_l)
        - hub0.value("nowconnect_open_duration_seconds_sum", &qa_l);
    if !(secs > 0.0 && secs < 10.0) {
        wrong.push(format!("open duration sum moved by {secs} s"));
    }
    assert!(wrong.is_empty(), "one stream:\n  {}", wrong.join("\n  "));

    // The backend of "gone" passed its health check and is gone now: connect_refused.
    drop(gone_listener);
    let mut c = connect(tunnel.connector("gone"));
    clients.push(c.local_addr().expect("local addr").to_string());
    let _ = c.write_all(b"hello?");
    match c.read(&mut [0u8; 16]) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        other => panic!("client of a dead backend: {other:?}\n{}", tunnel.logs()),
    }
    let failures = |h: &Exposition, reason: &str| {
        h.value(
            "nowconnect_stream_open_failures_total",
            &[("connector", "gone"), ("reason", reason)],
        )
    };
    let mut hub2 = hub1.clone();
    wait_until(Duration::from_secs(10), || {
        hub2 = scrape(tunnel.hub_admin);
        failures(&hub2, "connect_refused") >= 1.0
    });
    let gone_l = [("connector", "gone")];
    let got = [
        delta(
            &hub1,
            &hub2,
            "nowconnect_stream_open_failures_total",
            &[("connector", "gone"), ("reason", "connect_refused")],
        ),
        delta(
            &hub1,
            &hub2,
            "nowconnect_stream_open_failures_total",
            &gone_l,
        ),
        delta(&hub1, &hub2, "nowconnect_streams_closed_total", &gone_l),
        delta(
            &hub1,
            &hub2,
            "nowconnect_open_duration_seconds_count",
            &gone_l,
        ),
        hub2.value("nowconnect_streams_active", &gone_l),
    ];
    assert_eq!(
        got,
        [1.0, 1.0, 0.0, 0.0, 0.0],
        "dead backend: failures{{connect_refused}}, failures (all reasons), closed, open \
         duration count deltas, streams_active\n{}",
        tunnel.logs()
    );

    // A bad token on the upgrade: one `unauthorized` handshake, nothing else.
    let bad = wrong_audience_token(&tunnel, "jti-metrics");
    assert_eq!(upgrade_status(tunnel.hub_listen, &bad), 401);
    let unauthorized = |h: &Exposition| {
        h.value(
            "nowconnect_tunnel_handshakes_total",
            &[("result", "unauthorized")],
        )
    };
    let mut hub3 = hub2.clone();
    wait_until(Duration::from_secs(5), || {
        hub3 = scrape(tunnel.hub_admin);
        unauthorized(&hub3) >= unauthorized(&hub2) + 1.0
    });
    assert_eq!(
        [
            delta(
                &hub2,
                &hub3,
                "nowconnect_tunnel_handshakes_total",
                &[("result", "unauthorized")]
            ),
            delta(&hub2, &hub3, "nowconnect_tunnel_handshakes_total", &[]),
        ],
        [1.0, 1.0],
        "bad token: handshakes_total{{unauthorized}} and all results"
    );

    // The gauges of a steady tunnel.
    let agent3 = scrape(tunnel.agent_admin);
    let version = env!("CARGO_PKG_VERSION");
    let qa_backend = qa.to_string();
    let gauges = [
        hub3.value("nowconnect_tunnels_active", &[]),
        hub3.value("nowconnect_agents_connected", &[("agent_id", AGENT_ID)]),
        hub3.value("nowconnect_connector_available", &qa_l),
        hub3.value("nowconnect_build_info", &[("version", version)]),
        hub3.value("nowconnect_tunnel_handshakes_total", &[("result", "ok")]),
        agent3.value("nowconnect_agent_tunnels_up", &[]),
        agent3.value("nowconnect_agent_connects_total", &[("result", "ok")]),
        agent3.value(
            "nowconnect_agent_backend_up",
            &[("connector", "qa"), ("backend", qa_backend.as_str())],
        ),
        agent3.value("nowconnect_build_info", &[("version", version)]),
    ];
    assert_eq!(
        gauges, [1.0; 9],
        "tunnels, agents, availability, build_info, ok counts, backend_up"
    );
    let expiry = agent3.value("nowconnect_agent_token_expiry_seconds", &[]);
    assert!(
        expiry > 3000.0 && expiry <= 3600.0,
        "token expiry gauge {expiry} for a token of 3600 s"
    );
    for (exp, what) in [(&hub3, "hub"), (&agent3, "agent")] {
        for p in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_threads",
        ] {
            assert!(exp.value(p, &[]) > 0.0, "{what} {p}");
        }
    }

    eprintln!(
        "[metrics] operations.md lists {} metrics; hub exports {} families, agent {}",
        spec.len(),
        hub3.families.len(),
        agent3.families.len()
    );
    check_against_spec("hub", &hub3, &spec, Side::Hub, &clients);
    check_against_spec("agent", &agent3, &spec, Side::Agent, &clients);
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// `2026-11-29T08:40:01.123Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_utc_ms(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

/// Every non-empty line of `log` is a JSON object with `ts`, `level`, `target`, `msg`.
fn json_lines(what: &str, log: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {line}"));
        let ts = v["ts"].as_str().unwrap_or("");
        assert!(is_rfc3339_utc_ms(ts), "{what}: ts {ts:?} in {line}");
        let level = v["level"].as_str().unwrap_or("");
        assert!(
            ["trace", "debug", "info", "warn", "error"].contains(&level),
            "{what}: level {level:?} in {line}"
        );
        assert!(v["target"].is_string(), "{what}: no target in {line}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no msg in {line}"
        );
        out.push(v);
    }
    out
}

fn with_msg<'a>(records: &'a [Value], msg: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["msg"] == msg).collect()
}

/// The base64 body lines of a PEM (what a leaked key would show).
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

/// Panics when `log` contains any of `secrets` (named for the message, not shown).
fn assert_no_secrets(what: &str, log: &str, secrets: &[(&str, String)]) {
    for (name, secret) in secrets {
        assert!(!secret.is_empty(), "empty secret {name}");
        assert!(
            !log.contains(secret.as_str()),
            "{what} log contains the {name}"
        );
    }
}

/// JSON logs (`logging.format: json`, filter `debug` so the chatty lines are checked too):
/// every line of both sides is JSON with the operations.md fields; one close line per stream
/// with bytes and duration; tunnel up and down; the auth failure with its reason and
/// kid/sub/jti; no token, key or payload anywhere.
#[test]
fn json_logs_have_the_fields_and_no_secrets() {
    let echo = echo_server();
    // The agent reaches the hub through an authenticating proxy: its password is a secret too.
    let proxy_dir = temp_dir("ops-proxy");
    let proxy_password = "proxy-pw-5e0b71";
    let tinyproxy = Tinyproxy::start(proxy_dir.path(), Some(("agent", proxy_password)));
    let mut tunnel = Tunnel::builder(Transport::Wss)
        .connector("echo", &[echo])
        .hub_yaml("logging:\n  format: json")
        .agent_yaml(&format!(
            "logging:\n  format: json\nproxy:\n  url: {}\n  username: agent\n  password: {proxy_password}",
            tinyproxy.url()
        ))
        .log_filter("debug")
        .start();
    assert!(
        tinyproxy.proc.log().contains("CONNECT"),
        "the agent did not go through the proxy\n{}",
        tinyproxy.proc.log()
    );
    let marker = b"PAYLOAD-4f1c9e-do-not-log-";
    let payload: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(marker.len() * 40)
        .collect();
    echo_once(tunnel.connector("echo"), &payload);
    echo_once(tunnel.connector("echo"), &payload[..marker.len() * 3]);

    // An auth failure with a token that has kid, sub and jti, over TLS.
    let jti = "jti-ops-log-7731";
    let bad = wrong_audience_token(&tunnel, jti);
    let ca = tunnel.tls.as_ref().expect("wss").ca.clone();
    let url = format!(
        "https://127.0.0.1:{}{TUNNEL_PATH}",
        tunnel.hub_listen.port()
    );
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        &ca.to_string_lossy(),
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-H",
        "Sec-WebSocket-Protocol: nowconnect.v1",
        "-H",
        &format!("Authorization: Bearer {bad}"),
        &url,
    ]);
    assert_eq!(out.stdout.trim(), "401", "{out}");

    // Both stop: tunnel down on both sides.
    let agent_status = tunnel.stop_agent().expect("agent ran");
    assert!(agent_status.success(), "agent exit {agent_status}");
    let agent_log = std::fs::read_to_string(tunnel.dir().join("agent.log")).expect("agent log");
    assert!(
        tunnel
            .hub()
            .wait_for_log("tunnel down", Duration::from_secs(10)),
        "hub logged no tunnel down\n{}",
        tunnel.logs()
    );
    let hub_status = tunnel.stop_hub().expect("hub ran");
    assert!(hub_status.success(), "hub exit {hub_status}");
    let hub_log = std::fs::read_to_string(tunnel.dir().join("hub.log")).expect("hub log");

    let hub = json_lines("hub", &hub_log);
    let agent = json_lines("agent", &agent_log);

    // One close line per stream, with bytes and duration, on each side.
    let lens = [payload.len() as u64, (marker.len() * 3) as u64];
    for (what, records) in [("hub", &hub), ("agent", &agent)] {
        let closes: Vec<&Value> = records
            .iter()
            .filter(|r| r["msg"] == "stream closed" || r["msg"] == "stream reset")
            .collect();
        assert_eq!(closes.len(), 2, "{what}: stream close lines: {closes:#?}");
        let cids: BTreeSet<u64> = closes.iter().filter_map(|r| r["cid"].as_u64()).collect();
        assert_eq!(
            cids.len(),
            2,
            "{what}: close lines without distinct cids: {closes:#?}"
        );
        let mut seen: Vec<u64> = Vec::new();
        for r in &closes {
            assert_eq!(r["level"], "info", "{what}: {r}");
            assert_eq!(r["connector"], "echo", "{what}: {r}");
            assert!(r["session"].is_string(), "{what}: no session: {r}");
            assert!(r["duration_ms"].is_u64(), "{what}: no duration_ms: {r}");
            let (c2a, a2c) = (r["bytes_c2a"].as_u64(), r["bytes_a2c"].as_u64());
            assert_eq!(c2a, a2c, "{what}: echo bytes differ: {r}");
            seen.push(c2a.unwrap_or(u64::MAX));
        }
        seen.sort_unstable();
        let mut want = lens.to_vec();
        want.sort_unstable();
        assert_eq!(seen, want, "{what}: bytes of the close lines");
    }
    // The hub's close lines also name the client (a context field, never a metric label).
    assert!(
        with_msg(&hub, "stream closed")
            .iter()
            .all(|r| r["client"].is_string() && r["agent_id"] == AGENT_ID),
        "hub close lines without client/agent_id"
    );

    // Tunnel up and down, once each per side.
    for (what, records) in [("hub", &hub), ("agent", &agent)] {
        for msg in ["tunnel up", "tunnel down"] {
            let lines = with_msg(records, msg);
            assert_eq!(lines.len(), 1, "{what}: {msg:?} lines: {lines:#?}");
            assert_eq!(lines[0]["level"], "info", "{what}: {}", lines[0]);
            assert_eq!(lines[0]["agent_id"], AGENT_ID, "{what}: {}", lines[0]);
            assert!(lines[0]["session"].is_string(), "{what}: {}", lines[0]);
        }
    }
    let down = with_msg(&hub, "tunnel down")[0];
    assert!(
        down["duration_ms"].is_u64(),
        "hub tunnel down without duration: {down}"
    );

    // The auth failure: warn, reason, kid/sub/jti as fields.
    let refused: Vec<&Value> = hub.iter().filter(|r| r["jti"] == jti).collect();
    assert_eq!(
        refused.len(),
        1,
        "auth failure lines with jti {jti}: {refused:#?}"
    );
    let r = refused[0];
    assert_eq!(r["level"], "warn", "{r}");
    assert_eq!(r["reason"], "wrong_audience", "{r}");
    assert_eq!(r["kid"], "es256-1", "{r}");
    assert_eq!(r["sub"], AGENT_ID, "{r}");

    // No token, key or payload in either log.
    let token = std::fs::read_to_string(tunnel.dir().join("token.jwt")).expect("token");
    let signature = |t: &str| t.rsplit('.').next().unwrap_or("").to_owned();
    let mut secrets: Vec<(&str, String)> = vec![
        ("agent token", token.trim().to_owned()),
        ("agent token signature", signature(token.trim())),
        ("bad token", bad.clone()),
        ("bad token signature", signature(&bad)),
        (
            "payload marker",
            String::from_utf8_lossy(&marker[..20]).into_owned(),
        ),
        ("proxy password", proxy_password.to_owned()),
    ];
    for key in tunnel.keys.keys() {
        for line in pem_body_lines(&key.private_pem) {
            secrets.push(("JWT signing key", line));
        }
    }
    let tls_key = std::fs::read_to_string(&tunnel.tls.as_ref().expect("wss").key).expect("key");
    for line in pem_body_lines(&tls_key) {
        secrets.push(("hub TLS key", line));
    }
    assert_no_secrets("hub", &hub_log, &secrets);
    assert_no_secrets("agent", &agent_log, &secrets);
}

/// `format: text` gives human lines (not JSON) with the same events; `format: auto` gives
/// JSON when stderr is not a terminal (here: a file). Neither logs the token or the payload.
#[test]
fn text_and_auto_log_formats() {
    let echo = echo_server();
    let marker = b"TEXTFORMAT-PAYLOAD-83be";
    for format in ["text", "auto"] {
        let mut tunnel = Tunnel::builder(Transport::Ws)
            .connector("echo", &[echo])
            .hub_yaml(&format!("logging:\n  format: {format}"))
            .agent_yaml(&format!("logging:\n  format: {format}"))
            .start();
        echo_once(tunnel.connector("echo"), marker);
        let token = std::fs::read_to_string(tunnel.dir().join("token.jwt")).expect("token");
        assert!(tunnel.stop_agent().expect("agent").success());
        assert!(
            tunnel
                .hub()
                .wait_for_log("tunnel down", Duration::from_secs(10)),
            "{format}: hub logged no tunnel down\n{}",
            tunnel.logs()
        );
        assert!(tunnel.stop_hub().expect("hub").success());
        for name in ["hub", "agent"] {
            let log =
                std::fs::read_to_string(tunnel.dir().join(format!("{name}.log"))).expect("log");
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(lines.len() >= 3, "{format} {name}: {log}");
            let closes = lines.iter().filter(|l| l.contains("stream closed")).count();
            assert_eq!(closes, 1, "{format} {name}: stream closed lines\n{log}");
            assert!(
                lines.iter().any(|l| l.contains("tunnel up")),
                "{format} {name}\n{log}"
            );
            if format == "text" {
                for l in &lines {
                    assert!(
                        serde_json::from_str::<Value>(l).is_err(),
                        "text {name}: a JSON line: {l}"
                    );
                    assert!(
                        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                            .iter()
                            .any(|lv| l.contains(lv)),
                        "text {name}: no level in {l}"
                    );
                }
            } else {
                let records = json_lines(&format!("auto {name}"), &log);
                assert_eq!(records.len(), lines.len());
                assert_eq!(log_records(&log).len(), lines.len());
            }
            assert_no_secrets(
                &format!("{format} {name}"),
                &log,
                &[
                    ("token", token.trim().to_owned()),
                    ("payload", String::from_utf8_lossy(marker).into_owned()),
                ],
            );
        }
        if format == "auto" {
            // On a terminal `auto` is human text: the same hub again for 3 s, its stderr a
            // pseudo-terminal (script(1)), then SIGTERM.
            let hub_cmd = format!(
                "timeout -s TERM 3 {} --config {}",
                bin_path("nowconnect-hub").display(),
                tunnel.hub_config().display()
            );
            let mut cmd = Command::new("script");
            cmd.args(["-qec", &hub_cmd, "/dev/null"])
                .current_dir(tunnel.dir())
                .env("NOWCONNECT_LOG", "info")
                .env_remove("RUST_LOG");
            let out = run_cmd(cmd, None, Duration::from_secs(30));
            let lines: Vec<&str> = out
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("INFO") && l.contains("admin")),
                "auto on a TTY: no human INFO line\n{out}"
            );
            assert!(
                lines
                    .iter()
                    .all(|l| serde_json::from_str::<Value>(l).is_err()),
                "auto on a TTY: JSON lines\n{out}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Status pages in headless Chromium
// ---------------------------------------------------------------------------------------------

/// Headless Chromium on `url` with `extra` flags (a fresh profile, no proxy, no network
/// chatter). Panics when it fails.
fn chromium(url: &str, extra: &[&str]) -> CmdOutput {
    let profile = temp_dir("chromium");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = run_cmd(cmd, None, Duration::from_secs(90));
    assert!(out.success(), "chromium {url} failed:\n{out}");
    out
}

/// Every `src`/`href`/`action` attribute value of `html`, and whether it has `url(`/`@import`.
fn asset_references(html: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let lower = html.to_ascii_lowercase();
    for attr in [" src=", " href=", " action=", " srcset=", " data="] {
        let mut rest = lower.as_str();
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let value: String = match rest.chars().next() {
                Some(q @ ('"' | '\'')) => rest[1..].chars().take_while(|c| *c != q).collect(),
                _ => rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '>')
                    .collect(),
            };
            refs.push(value);
        }
    }
    for css in ["url(", "@import"] {
        if lower.contains(css) {
            refs.push(css.to_owned());
        }
    }
    refs
}

/// The page loads nothing: no scripts, stylesheets, images or frames from anywhere, and links
/// only to paths of the same admin listener.
fn assert_self_contained(what: &str, html: &str) {
    let lower = html.to_ascii_lowercase();
    for tag in [
        "<script", "<link", "<img", "<iframe", "<object", "<embed", "<video", "<audio",
    ] {
        assert!(!lower.contains(tag), "{what}: has {tag}");
    }
    for r in asset_references(html) {
        assert!(
            r.starts_with('/') && !r.starts_with("//") || r.starts_with('#'),
            "{what}: external reference {r:?}"
        );
    }
}

/// The status pages as an operator sees them: headless Chromium renders both; the DOM has
/// what the issue lists (hub: tunnels with agent_id, uptime, token expiry, streams; connectors
/// with pool and health; agent: tunnels, connectors with each backend's health and last
/// error), nothing external is loaded, and the screenshot is a real 1280×900 render.
#[test]
fn status_pages_render_in_chromium() {
    let echo = echo_server();
    // A second backend that refuses: the agent shows it down with its error.
    let dead = free_addr();
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("ldap", &[echo])
        .connector("pg-primary", &[dead, echo])
        .start();
    // One stream open while the pages render.
    let mut held = connect(tunnel.connector("ldap"));
    held.write_all(b"x").expect("write");
    held.read_exact(&mut [0u8; 1]).expect("echo");
    let session = scrape(tunnel.hub_admin);
    assert_eq!(
        session.value("nowconnect_streams_active", &[("connector", "ldap")]),
        1.0
    );

    let shots = temp_dir("status-shots");
    let keep = std::env::var_os("NOWCONNECT_SHOTS").map(PathBuf::from);
    for (side, admin) in [("hub", tunnel.hub_admin), ("agent", tunnel.agent_admin)] {
        let url = format!("http://{admin}/");
        let (status, headers, raw) = admin_get(admin, "/");
        assert_eq!(status, 200, "{side} /: {raw}");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "content-type" && v.starts_with("text/html")),
            "{side} / content type: {headers:?}"
        );
        assert_self_contained(&format!("{side} raw page"), &raw);

        let dom = chromium(&url, &["--dump-dom"]).stdout;
        assert_self_contained(&format!("{side} rendered DOM"), &dom);
        let text = visible_text(&dom);
        let missing: Vec<&str> = match side {
            "hub" => vec![
                "Tunnels",
                "Connectors",
                AGENT_ID,
                "uptime",
                "token expires",
                "streams",
                "ldap",
                "pg-primary",
                "pool",
                "healthy",
                "ready",
            ],
            _ => vec![
                "Tunnels",
                "Connectors",
                AGENT_ID,
                "ldap",
                "pg-primary",
                "up",
                "down",
                "last error",
                "token expires",
                "streams",
            ],
        }
        .into_iter()
        .filter(|w| !text.contains(w))
        .collect();
        assert!(missing.is_empty(), "{side} page lacks {missing:?}:\n{text}");
        match side {
            "hub" => {
                // The tunnel row: its agent, one stream, a token expiry within the hour.
                let row = table_rows(&dom)
                    .into_iter()
                    .find(|r| r.iter().any(|c| c == AGENT_ID) && r.len() >= 5)
                    .unwrap_or_else(|| panic!("hub: no tunnel row for {AGENT_ID}:\n{text}"));
                assert!(
                    row.iter().any(|c| c.contains("59m") || c.contains("1h")),
                    "hub tunnel row {row:?}: token expiry"
                );
                assert!(
                    row.iter().any(|c| c == "1"),
                    "hub tunnel row {row:?}: 1 stream"
                );
            }
            _ => {
                // Each backend with its health, the dead one with its error (the dead
                // address is a backend of pg-primary only).
                let rows = table_rows(&dom);
                let row_of = |addr: SocketAddr| -> Vec<String> {
                    let addr = addr.to_string();
                    rows.iter()
                        .filter(|r| r.iter().any(|c| c.contains(&addr)))
                        .map(|r| r.join(" | "))
                        .collect()
                };
                let dead_rows = row_of(dead);
                assert!(
                    dead_rows
                        .iter()
                        .any(|r| r.contains("down") && r.to_ascii_lowercase().contains("refused")),
                    "agent: the dead backend {dead} is not shown down with its error: \
                     {dead_rows:?}\n{text}"
                );
                let echo_rows = row_of(echo);
                assert!(
                    echo_rows.len() >= 2 && echo_rows.iter().all(|r| r.contains("up")),
                    "agent: the live backend {echo} is not shown up for both connectors: \
                     {echo_rows:?}\n{text}"
                );
            }
        }

        let png_path = shots.path().join(format!("{side}.png"));
        chromium(&url, &[&format!("--screenshot={}", png_path.display())]);
        let png = std::fs::read(&png_path).expect("screenshot written");
        let img = png::decode(&png).unwrap_or_else(|e| panic!("{side} screenshot: {e}"));
        assert_eq!(
            (img.width, img.height),
            (1280, 900),
            "{side} screenshot size"
        );
        let (colours, dominant) = img.colour_stats();
        eprintln!(
            "[status {side}] screenshot {} bytes, {colours} colours, background {:.1}%",
            png.len(),
            dominant * 100.0
        );
        assert!(
            colours >= 16,
            "{side} screenshot has {colours} colours: blank?"
        );
        assert!(
            dominant < 0.985,
            "{side} screenshot is {:.1}% one colour: blank?",
            dominant * 100.0
        );
        if let Some(dir) = &keep {
            std::fs::create_dir_all(dir).expect("NOWCONNECT_SHOTS dir");
            std::fs::copy(&png_path, dir.join(format!("{side}.png"))).expect("keep screenshot");
        }
    }
    drop(held);
}

/// The text of an HTML document with tags removed and entities for `&`, `<`, `>` decoded.
fn visible_text(html: &str) -> String {
    let body = html.split("<body").nth(1).unwrap_or(html);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
}

/// Rows of every table (`<tr>`), as the trimmed text of their cells.
fn table_rows(html: &str) -> Vec<Vec<String>> {
    html.split("<tr")
        .skip(1)
        .map(|row| {
            let row = row.split("</tr>").next().unwrap_or("");
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let cell = cell.split_once('>').map_or("", |(_, c)| c);
                    let cell = cell.split("</td>").next().unwrap_or("");
                    visible_text(&format!("<body>{cell}"))
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        })
        .collect()
}

/// A small PNG decoder (8-bit RGB/RGBA, not interlaced) with its own inflate, so the test
/// needs no image crate.
mod png {
    pub struct Image {
        pub width: u32,
        pub height: u32,
        /// RGBA pixels, row by row.
        pub pixels: Vec<[u8; 4]>,
    }

    impl Image {
        /// Number of distinct colours, and the share of the most common one.
        pub fn colour_stats(&self) -> (usize, f64) {
            let mut counts = std::collections::HashMap::new();
            for p in &self.pixels {
                *counts.entry(*p).or_insert(0usize) += 1;
            }
            let max = counts.values().copied().max().unwrap_or(0);
            (counts.len(), max as f64 / self.pixels.len().max(1) as f64)
        }
    }

    /// Most pixels a test screenshot may have (bounds the allocation).
    const MAX_PIXELS: u64 = 16 << 20;

    pub fn decode(data: &[u8]) -> Result<Image, String> {
        const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
        let mut rest = data.strip_prefix(SIGNATURE).ok_or("not a PNG")?;
        let mut header = None;
        let mut idat = Vec::new();
        loop {
            if rest.len() < 12 {
                return Err("truncated chunk".into());
            }
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = &rest[4..8];
            let body = rest.get(8..8 + len).ok_or("chunk longer than the file")?;
            match kind {
                b"IHDR" if body.len() == 13 => header = Some(body.to_vec()),
                b"IDAT" => idat.extend_from_slice(body),
                b"IEND" => break,
                _ => {}
            }
            rest = rest.get(12 + len..).ok_or("truncated chunk")?;
        }
        let h = header.ok_or("no IHDR")?;
        let width = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let height = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let (depth, colour, interlace) = (h[8], h[9], h[12]);
        let channels = match colour {
            2 => 3,
            6 => 4,
            _ => return Err(format!("colour type {colour} not supported")),
        };
        if depth != 8 || interlace != 0 {
            return Err(format!(
                "bit depth {depth} / interlace {interlace} not supported"
            ));
        }
        if width == 0 || height == 0 || u64::from(width) * u64::from(height) > MAX_PIXELS {
            return Err(format!("size {width}x{height} out of bounds"));
        }
        if idat.len() < 2
            || idat[0] & 0x0f != 8
            || (u16::from(idat[0]) << 8 | u16::from(idat[1])) % 31 != 0
        {
            return Err("bad zlib header".into());
        }
        let stride = width as usize * channels;
        let raw = inflate(&idat[2..], height as usize * (stride + 1))?;
        if raw.len() != height as usize * (stride + 1) {
            return Err(format!(
                "image data is {} bytes, want {}",
                raw.len(),
                height as usize * (stride + 1)
            ));
        }
        let mut prev = vec![0u8; stride];
        let mut pixels = Vec::with_capacity(width as usize * height as usize);
        for row in raw.chunks(stride + 1) {
            let filter = row[0];
            let mut cur = row[1..].to_vec();
            for i in 0..stride {
                let a = if i >= channels { cur[i - channels] } else { 0 };
                let b = prev[i];
                let c = if i >= channels { prev[i - channels] } else { 0 };
                let pred = match filter {
                    0 => 0,
                    1 => a,
                    2 => b,
                    3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                    4 => paeth(a, b, c),
                    f => return Err(format!("filter {f}")),
                };
                cur[i] = cur[i].wrapping_add(pred);
            }
            for px in cur.chunks(channels) {
                pixels.push([px[0], px[1], px[2], if channels == 4 { px[3] } else { 255 }]);
            }
            prev = cur;
        }
        Ok(Image {
            width,
            height,
            pixels,
        })
    }

    fn paeth(a: u8, b: u8, c: u8) -> u8 {
        let p = i16::from(a) + i16::from(b) - i16::from(c);
        let (pa, pb, pc) = (
            (p - i16::from(a)).abs(),
            (p - i16::from(b)).abs(),
            (p - i16::from(c)).abs(),
        );
        if pa <= pb && pa <= pc {
            a
        } else if pb <= pc {
            b
        } else {
            c
        }
    }

    struct Bits<'a> {
        data: &'a [u8],
        pos: usize,
        buf: u32,
        cnt: u32,
    }

    impl Bits<'_> {
        fn bit(&mut self) -> Result<u32, String> {
            if self.cnt == 0 {
                self.buf = u32::from(*self.data.get(self.pos).ok_or("deflate data ends early")?);
                self.pos += 1;
                self.cnt = 8;
            }
            let b = self.buf & 1;
            self.buf >>= 1;
            self.cnt -= 1;
            Ok(b)
        }

        fn bits(&mut self, n: u32) -> Result<u32, String> {
            let mut v = 0;
            for i in 0..n {
                v |= self.bit()? << i;
            }
            Ok(v)
        }

        /// One symbol of a canonical Huffman code (RFC 1951 §3.2.2).
        fn decode(&mut self, h: &Huffman) -> Result<usize, String> {
            let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
            for len in 1..16 {
                code |= self.bit()? as i32;
                let count = i32::from(h.count[len]);
                if code - count < first {
                    return Ok(usize::from(h.symbol[(index + code - first) as usize]));
                }
                index += count;
                first = (first + count) << 1;
                code <<= 1;
            }
            Err("bad Huffman code".into())
        }
    }

    struct Huffman {
        count: [u16; 16],
        symbol: Vec<u16>,
    }

    fn huffman(lengths: &[u8]) -> Huffman {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        count[0] = 0;
        let mut offs = [0u16; 16];
        for len in 1..15 {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[usize::from(offs[usize::from(l)])] = sym as u16;
                offs[usize::from(l)] += 1;
            }
        }
        Huffman { count, symbol }
    }

    const LBASE: [u16; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEXT: [u8; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    const DBASE: [u16; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DEXT: [u8; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
    ];

    /// Raw DEFLATE (RFC 1951), at most `max` bytes out.
    fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
        let mut s = Bits {
            data,
            pos: 0,
            buf: 0,
            cnt: 0,
        };
        let mut out: Vec<u8> = Vec::with_capacity(max);
        loop {
            let last = s.bit()?;
            match s.bits(2)? {
                0 => {
                    s.cnt = 0; // to the byte boundary
                    let p = s.pos;
                    let hdr = data.get(p..p + 4).ok_or("stored block header")?;
                    let len = usize::from(u16::from_le_bytes([hdr[0], hdr[1]]));
                    let block = data.get(p + 4..p + 4 + len).ok_or("stored block")?;
                    if out.len() + len > max {
                        return Err("inflated data too large".into());
                    }
                    out.extend_from_slice(block);
                    s.pos = p + 4 + len;
                }
                1 => {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    codes(&mut s, &mut out, &huffman(&l), &huffman(&[5u8; 30]), max)?;
                }
                2 => {
                    let nlen = s.bits(5)? as usize + 257;
                    let ndist = s.bits(5)? as usize + 1;
                    let ncode = s.bits(4)? as usize + 4;
                    const ORDER: [usize; 19] = [
                        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
                    ];
                    let mut cl = [0u8; 19];
                    for &i in &ORDER[..ncode] {
                        cl[i] = s.bits(3)? as u8;
                    }
                    let clh = huffman(&cl);
                    let mut lengths = vec![0u8; nlen + ndist];
                    let mut i = 0;
                    while i < nlen + ndist {
                        let sym = s.decode(&clh)?;
                        let (value, repeat) = match sym {
                            0..=15 => (sym as u8, 1),
                            16 => {
                                let prev =
                                    *lengths.get(i.wrapping_sub(1)).ok_or("repeat at start")?;
                                (prev, 3 + s.bits(2)? as usize)
                            }
                            17 => (0, 3 + s.bits(3)? as usize),
                            _ => (0, 11 + s.bits(7)? as usize),
                        };
                        if i + repeat > lengths.len() {
                            return Err("too many code lengths".into());
                        }
                        lengths[i..i + repeat].fill(value);
                        i += repeat;
                    }
                    let lh = huffman(&lengths[..nlen]);
                    let dh = huffman(&lengths[nlen..]);
                    codes(&mut s, &mut out, &lh, &dh, max)?;
                }
                _ => return Err("reserved block type".into()),
            }
            if last == 1 {
                return Ok(out);
            }
        }
    }

    fn codes(
        s: &mut Bits<'_>,
        out: &mut Vec<u8>,
        lens: &Huffman,
        dists: &Huffman,
        max: usize,
    ) -> Result<(), String> {
        loop {
            let sym = s.decode(lens)?;
            match sym {
                0..=255 => {
                    if out.len() >= max {
                        return Err("inflated data too large".into());
                    }
                    out.push(sym as u8);
                }
                256 => return Ok(()),
                _ => {
                    let i = sym - 257;
                    if i >= 29 {
                        return Err("bad length symbol".into());
                    }
                    let len = usize::from(LBASE[i]) + s.bits(u32::from(LEXT[i]))? as usize;
                    let d = s.decode(dists)?;
                    if d >= 30 {
                        return Err("bad distance symbol".into());
                    }
                    let dist = usize::from(DBASE[d]) + s.bits(u32::from(DEXT[d]))? as usize;
                    if dist > out.len() {
                        return Err("distance too far back".into());
                    }
                    if out.len() + len > max {
                        return Err("inflated data too large".into());
                    }
                    let start = out.len() - dist;
                    for k in 0..len {
                        out.push(out[start + k]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Graceful drain on SIGTERM
// ---------------------------------------------------------------------------------------------

/// Size of the bulk transfer that is in flight when the drain starts.
const BULK: usize = 48 << 20;

/// Starts a bulk stream and reads its first MiB, so it is mid-transfer (the target blocked on
/// backpressure) when the test sends SIGTERM.
fn start_bulk(addr: SocketAddr) -> TcpStream {
    let mut c = connect(addr);
    c.write_all(b"g").expect("write go");
    let mut first = vec![0u8; 1 << 20];
    c.read_exact(&mut first).expect("read the first MiB");
    assert!(first == pattern(1 << 20), "first MiB corrupted");
    c
}

/// Reads the rest of a [`start_bulk`] stream: every byte in order (the pattern is its
/// checksum), then EOF.
fn finish_bulk(mut c: TcpStream) {
    let mut offset = 1usize << 20;
    let mut buf = vec![0u8; 1 << 20];
    // Byte i is i % 251: a read at `offset` must equal this slice from `offset % 251` (a
    // memcmp, fast even in a debug build, so the client keeps up with the tunnel).
    let expected = pattern(buf.len() + 251);
    loop {
        let n = c
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("bulk read at {offset}: {e}"));
        if n == 0 {
            break;
        }
        let start = offset % 251;
        if buf[..n] != expected[start..start + n] {
            let bad = (0..n).find(|&i| buf[i] != expected[start + i]).unwrap_or(0);
            panic!("bulk byte {} corrupted", offset + bad);
        }
        offset += n;
    }
    assert_eq!(offset, BULK, "bulk stream ended early");
}

/// After SIGTERM: polls until `/readyz` of `admin` is 503, checking on every round that
/// `stopped_routing` (the work-refusing step of the drain) is never seen before `/readyz` is
/// 503. Returns how long `/readyz` took to turn.
fn readyz_turns_first(
    what: &str,
    admin: SocketAddr,
    mut stopped_routing: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        // Order matters: the refusal is sampled first, so a 200 after it proves it came first.
        let refused = stopped_routing();
        let ready = match http_get(admin, "/readyz") {
            Ok((200, _)) => true,
            Ok((503, body)) => {
                assert!(
                    body.contains("\"ready\":false"),
                    "{what} /readyz body {body}"
                );
                false
            }
            // A loaded machine may make an answer miss http_get's 2 s deadline: ask again.
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("[{what}] /readyz during the drain: {e}; again");
                continue;
            }
            other => panic!("{what} /readyz during the drain: {other:?}"),
        };
        assert!(
            !(refused && ready),
            "{what}: work refused while /readyz still answered 200"
        );
        if !ready {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: /readyz still 200 after 10 s"
        );
    }
}

/// A new client of a hub connector gets no stream: refused at connect (listener closed) or
/// closed at once without data.
fn assert_no_new_stream(addr: SocketAddr) -> &'static str {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => "refused",
        // Accepted and aborted at once, before connect() returned.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
        Err(e) => panic!("connect {addr} during the drain: {e}"),
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = c.write_all(b"hello?");
            match c.read(&mut [0u8; 16]) {
                Ok(0) => "closed",
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    "reset"
                }
                other => panic!("a new client got a stream during the drain: {other:?}"),
            }
        }
    }
}

/// Hub SIGTERM with a bulk stream in flight: `/readyz` turns 503 before the connector listener
/// stops accepting, new clients are refused, the bulk stream completes intact, and the hub
/// exits 0 well within `shutdown_grace` (the drain ends with the last stream).
#[test]
fn hub_drain_completes_streams_and_refuses_new_ones() {
    let grace = Duration::from_secs(20);
    let bulk = bulk_server(BULK);
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("bulk", &[bulk])
        .hub_limit("shutdown_grace: 20s")
        .agent_limit("shutdown_grace: 20s")
        .start();
    let addr = tunnel.connector("bulk");
    let c = start_bulk(addr);

    let sent = Instant::now();
    tunnel.hub().signal("TERM").expect("SIGTERM");
    let took = readyz_turns_first("hub", tunnel.hub_admin, || !is_listening(addr));
    let closed = wait_until(Duration::from_secs(5), || !is_listening(addr));
    assert!(closed, "hub connector still listening during the drain");
    assert_eq!(assert_no_new_stream(addr), "refused");
    // No new tunnel either: a valid upgrade is answered 503.
    let token = tunnel.valid_token("agent-2");
    assert_eq!(
        upgrade_status(tunnel.hub_listen, &token),
        503,
        "upgrade during the drain"
    );

    finish_bulk(c);
    let status = tunnel.hub().wait_timeout(grace).unwrap_or_else(|| {
        panic!(
            "hub still running {grace:?} after SIGTERM\n{}",
            tunnel.logs()
        )
    });
    let exited = sent.elapsed();
    eprintln!("[drain hub] /readyz 503 after {took:?}; exit {status} after {exited:?}");
    assert!(status.success(), "hub exit {status}\n{}", tunnel.logs());
    assert!(exited < grace, "hub took {exited:?}");
    // The bulk stream closed normally, with all its bytes.
    let log = tunnel.hub_log();
    let closes: Vec<Value> = log_records(&log)
        .into_iter()
        .filter(|r| r["msg"] == "stream closed")
        .collect();
    assert_eq!(closes.len(), 1, "hub stream close lines\n{log}");
    assert_eq!(closes[0]["reason"], "normal", "{}", closes[0]);
    assert_eq!(
        closes[0]["bytes_a2c"].as_u64(),
        Some(BULK as u64),
        "{}",
        closes[0]
    );
}

/// Agent SIGTERM with a bulk stream in flight: its `/readyz` turns 503 before the hub stops
/// routing to it, new clients get no stream, the bulk stream completes intact, and the agent
/// exits 0 well within `shutdown_grace`.
#[test]
fn agent_drain_completes_streams_and_refuses_new_ones() {
    let grace = Duration::from_secs(20);
    let bulk = bulk_server(BULK);
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("bulk", &[bulk])
        .hub_limit("shutdown_grace: 20s")
        .agent_limit("shutdown_grace: 20s")
        .start();
    let addr = tunnel.connector("bulk");
    let c = start_bulk(addr);
    let hub_admin = tunnel.hub_admin;
    let available = move || {
        http_get(hub_admin, "/metrics").is_ok_and(|(_, m)| {
            prom::parse(&m).is_ok_and(|e| {
                e.value("nowconnect_connector_available", &[("connector", "bulk")]) == 1.0
            })
        })
    };

    let sent = Instant::now();
    tunnel.agent().signal("TERM").expect("SIGTERM");
    let took = readyz_turns_first("agent", tunnel.agent_admin, || !available());
    assert!(
        wait_until(Duration::from_secs(5), || !available()),
        "hub still routes to the draining agent\n{}",
        tunnel.logs()
    );
    let before = scrape(tunnel.hub_admin);
    let how = assert_no_new_stream(addr);
    let after = scrape(tunnel.hub_admin);
    assert_eq!(
        delta(
            &before,
            &after,
            "nowconnect_stream_open_failures_total",
            &[("connector", "bulk"), ("reason", "no_agent")]
        ),
        1.0,
        "new client during the agent's drain ({how}) not counted as no_agent"
    );

    finish_bulk(c);
    let status = tunnel.agent().wait_timeout(grace).unwrap_or_else(|| {
        panic!(
            "agent still running {grace:?} after SIGTERM\n{}",
            tunnel.logs()
        )
    });
    let exited = sent.elapsed();
    eprintln!("[drain agent] /readyz 503 after {took:?}; exit {status} after {exited:?}");
    assert!(status.success(), "agent exit {status}\n{}", tunnel.logs());
    assert!(exited < grace, "agent took {exited:?}");
    assert!(tunnel.hub().is_running(), "hub exited\n{}", tunnel.logs());
}

/// A stream that outlives `shutdown_grace` is cut, and the process still exits 0 in time
/// (grace plus a small margin for the close handshake), on either side.
#[test]
fn drain_cuts_streams_that_outlive_the_grace() {
    let grace = Duration::from_secs(2);
    // Generous on a loaded machine; the default grace (30 s) would be far beyond it.
    let margin = Duration::from_secs(4);
    let echo = echo_server();
    for side in ["hub", "agent"] {
        let mut tunnel = Tunnel::builder(Transport::Ws)
            .connector("echo", &[echo])
            .hub_limit("shutdown_grace: 2s")
            .agent_limit("shutdown_grace: 2s")
            .start();
        let mut c = connect(tunnel.connector("echo"));
        c.write_all(b"ping").expect("write");
        c.read_exact(&mut [0u8; 4]).expect("echo");
        let sent = Instant::now();
        let proc = if side == "hub" {
            tunnel.hub()
        } else {
            tunnel.agent()
        };
        proc.signal("TERM").expect("SIGTERM");
        // Within the grace the stream still works.
        std::thread::sleep(Duration::from_millis(300));
        c.write_all(b"pong").expect("write during the drain");
        let mut back = [0u8; 4];
        c.read_exact(&mut back).expect("echo during the drain");
        assert_eq!(&back, b"pong");
        // Then it is cut.
        let end = match c.read(&mut [0u8; 16]) {
            Ok(0) => "EOF".to_owned(),
            Ok(n) => panic!("{side}: {n} unexpected bytes"),
            Err(e) => e.kind().to_string(),
        };
        let cut = sent.elapsed();
        let proc = if side == "hub" {
            tunnel.hub()
        } else {
            tunnel.agent()
        };
        let status = proc.wait_timeout(grace + margin + Duration::from_secs(5));
        let exited = sent.elapsed();
        eprintln!("[drain {side}] held stream cut ({end}) after {cut:?}; exit {status:?} after {exited:?}");
        let status = status.unwrap_or_else(|| panic!("{side} still running\n{}", tunnel.logs()));
        assert!(status.success(), "{side} exit {status}\n{}", tunnel.logs());
        assert!(
            cut >= grace - Duration::from_millis(100),
            "{side}: stream cut after {cut:?}, before the grace"
        );
        if side == "agent" {
            // The agent cut it with RST(SHUTDOWN): the hub counts a `shutdown` close.
            let shutdown = |e: &Exposition| {
                e.value(
                    "nowconnect_streams_closed_total",
                    &[("connector", "echo"), ("reason", "shutdown")],
                )
            };
            let mut m = Exposition::default();
            wait_until(Duration::from_secs(5), || {
                m = scrape(tunnel.hub_admin);
                shutdown(&m) >= 1.0
            });
            assert_eq!(
                (
                    shutdown(&m),
                    m.value("nowconnect_streams_closed_total", &[("connector", "echo")])
                ),
                (1.0, 1.0),
                "hub streams_closed_total{{echo}} after the agent cut the stream"
            );
        }
        assert!(
            exited < grace + margin,
            "{side} exited {exited:?} after SIGTERM (grace {grace:?})"
        );
    }
}
