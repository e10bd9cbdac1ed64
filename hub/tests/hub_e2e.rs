//! The hub in-process ([`nowconnect_hub::start`]) against an agent tunnel built from the runtime
//! (ws:// on loopback, ES256 tokens from a JWKS file): upgrade answers, HELLO policy, streams,
//! metrics, RENEW, token expiry and the graceful drain.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nowconnect_core::{Code, Config, Hello, HelloAck, Session};
use nowconnect_hub::config::HubConfig;
use nowconnect_hub::metrics as m;
use nowconnect_hub::{Hub, HubHandle};
use nowconnect_runtime::ws::{self, ConnectError};
use nowconnect_runtime::{
    install_crypto_provider, now, spawn_stream_thread, OpenRequest, Transport, Tunnel,
    TunnelHandle, TunnelHandler,
};
use serde_json::{json, Value};

const ISS: &str = "https://idp.test/";
const AUD: &str = "nowconnect-hub";
const KID: &str = "k1";
const WAIT: Duration = Duration::from_secs(10);

// ----- keys and tokens -----

struct Keys {
    encoding: EncodingKey,
    jwks: String,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let raw = ec.public_key_raw(); // 0x04 || x || y
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
                         "kid": KID, "alg": "ES256", "use": "sig"});
        Keys {
            encoding: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("pem"),
            jwks: json!({ "keys": [jwk] }).to_string(),
        }
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token for `sub` valid for `life` seconds, with extra claims merged in.
fn token(sub: &str, life: u64, extra: Value) -> String {
    let now = unix_now();
    let mut claims = json!({"iss": ISS, "aud": AUD, "sub": sub, "jti": format!("j-{now}"),
                            "iat": now, "exp": now + life});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(KID.to_owned());
    jsonwebtoken::encode(&header, &claims, &keys().encoding).expect("sign")
}

// ----- the hub -----

struct TestHub {
    hub: Option<Hub>,
    handle: HubHandle,
    _dir: tempfile::TempDir,
}

impl TestHub {
    /// A plaintext hub on loopback ports; `extra_auth` is appended to `auth:`, `connectors`
    /// is the whole `connectors:` list.
    fn start(extra_auth: &str, connectors: &str) -> TestHub {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(install_crypto_provider);
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks: PathBuf = dir.path().join("jwks.json");
        std::fs::write(&jwks, &keys().jwks).expect("jwks");
        let yaml = format!(
            "listen: 127.0.0.1:0\nplaintext: true\nadmin:\n  listen: 127.0.0.1:0\nauth:\n  issuer: {ISS}\n  \
             audience: {AUD}\n  jwks_file: {}\n  algorithms: [ES256]\n{extra_auth}connectors:\n{connectors}\
             limits:\n  shutdown_grace: 5s\n",
            jwks.display()
        );
        let cfg = HubConfig::from_yaml("hub.yaml", &yaml, &|_| None).expect("config");
        let hub = nowconnect_hub::start(cfg).expect("start");
        let handle = hub.handle();
        assert!(wait_until(|| handle.is_ready()), "hub not ready");
        TestHub {
            hub: Some(hub),
            handle,
            _dir: dir,
        }
    }

    fn hub(&self) -> &Hub {
        self.hub.as_ref().expect("hub")
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/tunnel", self.hub().listen_addr())
    }

    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.handle.metrics().value(name, labels)
    }

    fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self.hub().admin_addr().expect("admin");
        let mut s = TcpStream::connect(addr).expect("admin connect");
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// Drain and wait; returns the exit status and how long the wait took.
    fn drain_and_wait(mut self) -> (u8, Duration) {
        let hub = self.hub.take().expect("hub");
        let started = Instant::now();
        hub.drain();
        let code = hub.wait();
        (code, started.elapsed())
    }
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + WAIT;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

// ----- the agent -----

#[derive(Debug, Clone, PartialEq)]
enum AgentEvent {
    Established(HelloAck),
    RenewAck(u64),
    GoAway(Code),
    Closed(u16),
}

struct AgentSide {
    targets: HashMap<String, SocketAddr>,
    events: mpsc::Sender<AgentEvent>,
}

impl TunnelHandler for AgentSide {
    fn on_established(&mut self, _tunnel: &TunnelHandle, ack: &HelloAck) {
        let _ = self.events.send(AgentEvent::Established(ack.clone()));
    }

    fn on_open_request(&mut self, request: OpenRequest) {
        let Some(&addr) = self.targets.get(&request.connector) else {
            return request.refuse(Code::UNKNOWN_CONNECTOR, "unknown connector");
        };
        let name = format!("nc-connect-{}", request.cid);
        spawn_stream_thread(name, move || match TcpStream::connect(addr) {
            Ok(target) => request.accept(target, &addr.to_string()),
            Err(_) => request.refuse(Code::CONNECT_REFUSED, "connection refused"),
        })
        .expect("spawn");
    }

    fn on_renew_ack(&mut self, _tunnel: &TunnelHandle, exp: u64) {
        let _ = self.events.send(AgentEvent::RenewAck(exp));
    }

    fn on_goaway(&mut self, _tunnel: &TunnelHandle, code: Code, _last: u32, _reason: &str) {
        let _ = self.events.send(AgentEvent::GoAway(code));
    }

    fn on_closed(&mut self, code: u16, _reason: &str) {
        let _ = self.events.send(AgentEvent::Closed(code));
    }
}

struct Agent {
    tunnel: Tunnel,
    events: mpsc::Receiver<AgentEvent>,
}

impl Agent {
    fn upgrade(url: &str, token: &str) -> Result<ws::TunnelSocket, ConnectError> {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host");
        let tcp = TcpStream::connect(addr).expect("connect hub");
        let transport =
            Transport::plain(tcp, Instant::now() + ws::HANDSHAKE_TIMEOUT).expect("transport");
        ws::connect(transport, url, token, Config::default().max_message)
    }

    fn connect(
        url: &str,
        token: &str,
        agent_id: &str,
        connectors: &[(&str, Option<SocketAddr>)],
    ) -> Agent {
        let socket = Agent::upgrade(url, token).expect("upgrade");
        let hello = Hello {
            agent_id: agent_id.to_owned(),
            connectors: connectors.iter().map(|(c, _)| (*c).to_owned()).collect(),
            ver: 1,
            software: "hub-e2e".into(),
            window: 256 * 1024,
            max_streams: 100,
        };
        let (tx, rx) = mpsc::channel();
        let handler = AgentSide {
            targets: connectors
                .iter()
                .filter_map(|(c, a)| a.map(|a| ((*c).to_owned(), a)))
                .collect(),
            events: tx,
        };
        let session = Session::new_agent(Config::default(), hello, now());
        let tunnel = Tunnel::spawn("agent", socket, session, Box::new(handler)).expect("spawn");
        Agent { tunnel, events: rx }
    }

    fn next(&self) -> AgentEvent {
        self.events.recv_timeout(WAIT).expect("agent event")
    }

    /// Skips events until one matches.
    fn expect(&self, want: impl Fn(&AgentEvent) -> bool) -> AgentEvent {
        loop {
            let ev = self.next();
            if want(&ev) {
                return ev;
            }
        }
    }
}

/// Echo until EOF, then half-close.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            thread::spawn(move || {
                let mut r = conn.try_clone().expect("clone");
                let mut w = conn;
                let _ = io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn assert_reset(addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    match c.read(&mut [0u8; 1]) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

// ----- tests -----

#[test]
fn upgrade_answers() {
    let hub = TestHub::start(
        "  connectors_claim: scopes\n",
        "  - name: echo\n    listen: 127.0.0.1:0\n",
    );
    let status = |r: Result<ws::TunnelSocket, ConnectError>| match r {
        Err(ConnectError::Rejected { status }) => status,
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    let upgraded = Agent::upgrade(
        &hub.url(),
        &token("agent-1", 600, json!({"scopes": ["echo"]})),
    );
    assert!(upgraded.is_ok());
    assert_eq!(status(Agent::upgrade(&hub.url(), "not-a-jwt")), 401);
    let expired = token(
        "agent-1",
        0,
        json!({"exp": unix_now() - 3600, "scopes": ["echo"]}),
    );
    assert_eq!(status(Agent::upgrade(&hub.url(), &expired)), 401);
    // Valid, but the scope names nothing this hub serves.
    let elsewhere = token("agent-1", 600, json!({"scopes": ["ssh"]}));
    assert_eq!(status(Agent::upgrade(&hub.url(), &elsewhere)), 403);
    let wrong_path = hub.url().replace("/v1/tunnel", "/other");
    let good = token("agent-1", 600, json!({"scopes": ["echo"]}));
    assert_eq!(status(Agent::upgrade(&wrong_path, &good)), 404);
    // Counted by the hub after it answered: wait for it.
    for (result, n) in [
        ("unauthorized", 2.0),
        ("forbidden", 1.0),
        ("bad_request", 1.0),
    ] {
        assert!(
            wait_until(|| hub.metric(m::TUNNEL_HANDSHAKES, &[result]) == n),
            "{result}: {}",
            hub.metric(m::TUNNEL_HANDSHAKES, &[result])
        );
    }
    assert_eq!(hub.handle.tunnels(), 1);
    // Upgraded but silent: the hub closes it when the drain starts (4503, no HELLO yet).
    drop(upgraded);
    let (code, took) = hub.drain_and_wait();
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn streams_metrics_and_drain() {
    let hub = TestHub::start(
        "  connectors_claim: scopes\n",
        "  - name: echo\n    listen: 127.0.0.1:0\n  - name: ssh\n    listen: 127.0.0.1:0\n  \
         - name: closed\n    listen: 127.0.0.1:0\n    allow_clients: [10.0.0.0/8]\n",
    );
    let echo = echo_server();
    let tok = token("agent-1", 600, json!({"scopes": ["echo", "closed"]}));
    let agent = Agent::connect(
        &hub.url(),
        &tok,
        "agent-1",
        &[("echo", Some(echo)), ("ssh", None), ("web", None)],
    );
    let AgentEvent::Established(ack) = agent.next() else {
        panic!("not established")
    };
    assert_eq!(ack.accepted, vec!["echo".to_owned()]);
    let rejected: Vec<(String, String)> = ack
        .rejected
        .iter()
        .map(|r| (r.connector.clone(), r.reason.clone()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            ("ssh".into(), "not in token scope".into()),
            ("web".into(), "not configured on hub".into())
        ]
    );
    assert!(wait_until(|| hub.handle.connector_available("echo")));
    assert_eq!(hub.metric(m::AGENTS_CONNECTED, &["agent-1"]), 1.0);
    assert_eq!(hub.metric(m::CONNECTOR_AVAILABLE, &["echo"]), 1.0);
    assert_eq!(hub.metric(m::CONNECTOR_AVAILABLE, &["ssh"]), 0.0);
    assert_eq!(hub.metric(m::TUNNEL_HANDSHAKES, &["ok"]), 1.0);
    let (status, body) = hub.admin_get("/readyz");
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["tunnels"], 1);
    assert_eq!(ready["connectors"]["echo"]["available"], true);
    assert_eq!(ready["connectors"]["ssh"]["available"], false);

    // A client through the tunnel, with a half-close.
    let mut client =
        TcpStream::connect(hub.hub().connector_addr("echo").expect("echo")).expect("client");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"hello through the hub").expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    client.read_to_end(&mut back).expect("read");
    assert_eq!(back, b"hello through the hub");
    assert!(wait_until(|| hub
        .metric(m::STREAMS_CLOSED, &["echo", "normal"])
        == 1.0));
    assert_eq!(hub.metric(m::STREAMS_OPENED, &["echo"]), 1.0);
    assert_eq!(hub.metric(m::STREAMS_ACTIVE, &["echo"]), 0.0);
    assert_eq!(hub.metric(m::OPEN_DURATION, &["echo"]), 1.0);

    // No session serves ssh; `closed` does not allow 127.0.0.1.
    assert_reset(hub.hub().connector_addr("ssh").expect("ssh"));
    assert_reset(hub.hub().connector_addr("closed").expect("closed"));
    assert_eq!(
        hub.metric(m::STREAM_OPEN_FAILURES, &["ssh", "no_agent"]),
        1.0
    );
    assert_eq!(
        hub.metric(m::STREAM_OPEN_FAILURES, &["closed", "client_not_allowed"]),
        1.0
    );

    // The status page names the agent; /metrics has the names of operations.md.
    let (status, page) = hub.admin_get("/");
    assert_eq!(status, 200);
    assert!(page.contains("agent-1") && page.contains("echo"), "{page}");
    let (_, metrics) = hub.admin_get("/metrics");
    for name in [
        "nowconnect_tunnels_active 1",
        "nowconnect_agents_connected{agent_id=\"agent-1\"} 1",
        "nowconnect_build_info{version=",
        "nowconnect_jwks_refresh_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    // An open stream when the drain starts finishes; new clients are refused.
    let mut open =
        TcpStream::connect(hub.hub().connector_addr("echo").expect("echo")).expect("client");
    open.set_read_timeout(Some(WAIT)).expect("timeout");
    open.write_all(b"ping").expect("write");
    let mut four = [0u8; 4];
    open.read_exact(&mut four).expect("echo");
    let handle = hub.handle.clone();
    let echo_addr = hub.hub().connector_addr("echo").expect("echo");
    let waiter = thread::spawn(move || hub.drain_and_wait());
    assert_eq!(
        agent.expect(|e| matches!(e, AgentEvent::GoAway(_))),
        AgentEvent::GoAway(Code::SHUTDOWN)
    );
    assert!(handle.is_draining());
    assert!(
        wait_until(|| TcpStream::connect(echo_addr).is_err()),
        "listener still open"
    );
    open.write_all(b" pong").expect("write after GOAWAY");
    open.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).expect("read");
    assert_eq!(rest, b" pong");
    assert_eq!(
        agent.expect(|e| matches!(e, AgentEvent::Closed(_))),
        AgentEvent::Closed(1000)
    );
    let (code, took) = waiter.join().expect("waiter");
    assert_eq!(code, 0);
    // Well before shutdown_grace (5 s): the drain ended when the last stream did.
    assert!(took < Duration::from_secs(4), "drain took {took:?}");
    assert_eq!(agent.tunnel.join().code, 1000);
}

#[test]
fn agent_id_must_match_the_token() {
    let hub = TestHub::start("", "  - name: echo\n    listen: 127.0.0.1:0\n");
    let tok = token("agent-1", 600, json!({}));
    let agent = Agent::connect(&hub.url(), &tok, "someone-else", &[("echo", None)]);
    assert_eq!(agent.next(), AgentEvent::Closed(4403));
    // Nothing acceptable at all is 4403 too.
    let agent = Agent::connect(&hub.url(), &tok, "agent-1", &[("nope", None)]);
    assert_eq!(agent.next(), AgentEvent::Closed(4403));
    assert!(wait_until(|| hub.handle.tunnels() == 0));
    assert_eq!(hub.metric(m::TUNNEL_HANDSHAKES, &["forbidden"]), 2.0);
    assert_eq!(hub.drain_and_wait().0, 0);
}

#[test]
fn renew_extends_and_a_bad_renew_is_forbidden() {
    let hub = TestHub::start("", "  - name: echo\n    listen: 127.0.0.1:0\n");
    let agent = Agent::connect(
        &hub.url(),
        &token("agent-1", 600, json!({})),
        "agent-1",
        &[("echo", None)],
    );
    assert!(matches!(agent.next(), AgentEvent::Established(_)));
    let fresh = token("agent-1", 7200, json!({}));
    agent.tunnel.handle().renew(&fresh);
    let AgentEvent::RenewAck(exp) = agent.next() else {
        panic!("no RENEW_ACK")
    };
    assert!(exp >= unix_now() + 7000);
    // Another agent's token: GOAWAY(FORBIDDEN), then the drained session closes 4403.
    agent
        .tunnel
        .handle()
        .renew(&token("agent-2", 600, json!({})));
    assert_eq!(agent.next(), AgentEvent::GoAway(Code::FORBIDDEN));
    assert_eq!(agent.next(), AgentEvent::Closed(4403));
    assert_eq!(hub.drain_and_wait().0, 0);
}

#[test]
fn expired_token_gets_goaway() {
    let hub = TestHub::start(
        "  leeway: 0s\n",
        "  - name: echo\n    listen: 127.0.0.1:0\n",
    );
    let agent = Agent::connect(
        &hub.url(),
        &token("agent-1", 2, json!({})),
        "agent-1",
        &[("echo", None)],
    );
    assert!(matches!(agent.next(), AgentEvent::Established(_)));
    assert!(hub.handle.connector_available("echo"));
    assert_eq!(agent.next(), AgentEvent::GoAway(Code::TOKEN_EXPIRED));
    assert_eq!(agent.next(), AgentEvent::Closed(4401));
    assert!(wait_until(|| !hub.handle.connector_available("echo")));
    assert_eq!(hub.drain_and_wait().0, 0);
}

#[test]
fn tunnel_limit_and_not_ready_are_503() {
    // max_tunnels: 1 — the second upgrade is 503.
    static INSTALL: Once = Once::new();
    INSTALL.call_once(install_crypto_provider);
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, &keys().jwks).expect("jwks");
    let yaml = |jwks: &str| {
        format!(
            "listen: 127.0.0.1:0\nplaintext: true\nauth:\n  issuer: {ISS}\n  audience: {AUD}\n  \
             jwks_file: {jwks}\n  algorithms: [ES256]\nconnectors:\n  - name: echo\n    \
             listen: 127.0.0.1:0\nlimits:\n  max_tunnels: 1\n"
        )
    };
    let cfg = HubConfig::from_yaml("hub.yaml", &yaml(&jwks.display().to_string()), &|_| None)
        .expect("config");
    let hub = nowconnect_hub::start(cfg).expect("start");
    let handle = hub.handle();
    assert!(wait_until(|| handle.is_ready()));
    let url = format!("ws://{}/v1/tunnel", hub.listen_addr());
    let tok = token("agent-1", 600, json!({}));
    let first = Agent::connect(&url, &tok, "agent-1", &[("echo", None)]);
    assert!(matches!(first.next(), AgentEvent::Established(_)));
    match Agent::upgrade(&url, &tok) {
        Err(ConnectError::Rejected { status }) => assert_eq!(status, 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    hub.drain();
    assert_eq!(hub.wait(), 0);

    // A JWKS that never loads: not ready, upgrades 503.
    let missing = dir.path().join("missing.json");
    let cfg = HubConfig::from_yaml("hub.yaml", &yaml(&missing.display().to_string()), &|_| None)
        .expect("config");
    let hub = nowconnect_hub::start(cfg).expect("start");
    thread::sleep(Duration::from_millis(200));
    assert!(!hub.handle().is_ready());
    let url = format!("ws://{}/v1/tunnel", hub.listen_addr());
    match Agent::upgrade(&url, &tok) {
        Err(ConnectError::Rejected { status }) => assert_eq!(status, 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    hub.drain();
    assert_eq!(hub.wait(), 0);
}
