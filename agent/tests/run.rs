//! The agent run in-process against an in-process hub (runtime tunnel + hub session), over
//! loopback wss:// or ws://: handshake, HEALTH, streams, readiness and metrics, rejections,
//! TLS failures, GOAWAY replacement, RENEW and drain.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use crossbeam_channel::{Receiver, Sender};
use nowconnect_agent::config::AgentConfig;
use nowconnect_agent::Agent;
use nowconnect_core::{Code, Config, HealthReport, Hello, HelloAck, Rejected, Session};
use nowconnect_runtime::ws::{self, Rejection, UpgradeRequest};
use nowconnect_runtime::{
    install_crypto_provider, now, StreamEnd, Transport, Tunnel, TunnelHandle, TunnelHandler,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

const WAIT: Duration = Duration::from_secs(10);

// ----- helpers -----

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A JWT-shaped token (the agent never verifies signatures; the hub here does not either).
fn jwt(iat: u64, exp: u64, tag: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = format!(r#"{{"sub":"{tag}","iat":{iat},"exp":{exp}}}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.as_bytes());
    format!("{header}.{payload}.c2lnbmF0dXJl")
}

fn until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Echo until EOF, then half-close.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            thread::spawn(move || {
                let mut reader = conn.try_clone().expect("clone");
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// `GET path` on the admin listener: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("admin connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

// ----- TLS -----

struct Pki {
    server: Arc<ServerConfig>,
    ca_pem: String,
}

fn pki() -> Pki {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(install_crypto_provider);
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("server params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let chain = vec![server_cert.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    Pki {
        server: Arc::new(server),
        ca_pem: ca.pem(),
    }
}

// ----- the hub -----

#[derive(Debug, Clone, PartialEq)]
enum HubEvent {
    Upgrade { token: String },
    Hello(Hello),
    Health(HealthReport),
    Renew(String),
    GoAway(Code),
    StreamClosed(u32, StreamEnd),
    Closed(u16, String),
}

#[derive(Default)]
struct Policy {
    /// Answer upgrades with this HTTP status instead of 101.
    reject: Option<u16>,
    /// Connectors to reject in HELLO_ACK.
    reject_connectors: Vec<String>,
    /// Write this token to the agent's token file during the next upgrade.
    rotate: Option<(PathBuf, String)>,
}

struct HubSide {
    events: Sender<HubEvent>,
    policy: Arc<Mutex<Policy>>,
}

impl TunnelHandler for HubSide {
    fn on_hello(&mut self, tunnel: &TunnelHandle, hello: Hello) {
        let policy = self.policy.lock().expect("policy");
        let (rejected, accepted): (Vec<String>, Vec<String>) = hello
            .connectors
            .iter()
            .cloned()
            .partition(|c| policy.reject_connectors.contains(c));
        // The event goes out after HELLO_ACK is queued, so a test that opens a stream on seeing
        // HELLO cannot get its OPEN ahead of the HELLO_ACK.
        let event = HubEvent::Hello(hello);
        tunnel.accept_hello(HelloAck {
            session: "sess-1".into(),
            accepted,
            rejected: rejected
                .into_iter()
                .map(|connector| Rejected {
                    connector,
                    reason: "not in token scope".into(),
                })
                .collect(),
            window: 0,
            max_frame: 0,
            heartbeat_ms: 0,
            ver: 1,
        });
        let _ = self.events.send(event);
    }

    fn on_health(&mut self, _tunnel: &TunnelHandle, report: HealthReport) {
        let _ = self.events.send(HubEvent::Health(report));
    }

    fn on_renew(&mut self, tunnel: &TunnelHandle, token: String) {
        tunnel.renew_ack(unix_now() + 3600);
        let _ = self.events.send(HubEvent::Renew(token));
    }

    fn on_goaway(&mut self, _tunnel: &TunnelHandle, code: Code, _last_cid: u32, _reason: &str) {
        let _ = self.events.send(HubEvent::GoAway(code));
    }

    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        let _ = self.events.send(HubEvent::StreamClosed(cid, end));
    }

    fn on_closed(&mut self, code: u16, reason: &str) {
        let _ = self.events.send(HubEvent::Closed(code, reason.to_owned()));
    }
}

struct TestHub {
    addr: SocketAddr,
    events: Receiver<HubEvent>,
    tunnels: Arc<Mutex<Vec<TunnelHandle>>>,
    policy: Arc<Mutex<Policy>>,
    clients: TcpListener,
}

impl TestHub {
    fn start(tls: Option<Arc<ServerConfig>>) -> TestHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        let addr = listener.local_addr().expect("addr");
        let (tx, events) = crossbeam_channel::unbounded();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let policy = Arc::new(Mutex::new(Policy::default()));
        let (t, p) = (tunnels.clone(), policy.clone());
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let (tx, t, p, tls) = (tx.clone(), t.clone(), p.clone(), tls.clone());
                thread::spawn(move || serve(tcp, tls, tx, t, p));
            }
        });
        TestHub {
            addr,
            events,
            tunnels,
            policy,
            clients: TcpListener::bind("127.0.0.1:0").expect("bind clients"),
        }
    }

    fn url(&self, tls: bool) -> String {
        if tls {
            format!("wss://localhost:{}/v1/tunnel", self.addr.port())
        } else {
            format!("ws://127.0.0.1:{}/v1/tunnel", self.addr.port())
        }
    }

    /// The next event matching `f`, skipping others.
    fn expect<T>(&self, what: &str, mut f: impl FnMut(&HubEvent) -> Option<T>) -> T {
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => {
                    if let Some(t) = f(&ev) {
                        return t;
                    }
                }
                Err(_) => panic!("hub: no {what} within {WAIT:?}"),
            }
        }
    }

    fn tunnel(&self, i: usize) -> TunnelHandle {
        assert!(
            until(WAIT, || self.tunnels.lock().expect("t").len() > i),
            "no hub tunnel #{i}"
        );
        self.tunnels.lock().expect("t")[i].clone()
    }

    /// A client of `connector` carried over hub tunnel `i`.
    fn connect(&self, i: usize, connector: &str) -> TcpStream {
        let client = TcpStream::connect(self.clients.local_addr().expect("a")).expect("client");
        let (accepted, peer) = self.clients.accept().expect("accept");
        self.tunnel(i)
            .open_stream(
                accepted,
                connector,
                &peer.to_string(),
                None,
                std::time::Instant::now(),
            )
            .expect("tunnel alive");
        client
    }
}

fn serve(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    events: Sender<HubEvent>,
    tunnels: Arc<Mutex<Vec<TunnelHandle>>>,
    policy: Arc<Mutex<Policy>>,
) {
    let deadline = Instant::now() + ws::HANDSHAKE_TIMEOUT;
    let transport = match tls {
        Some(cfg) => match Transport::tls_server(cfg, tcp, deadline) {
            Ok(t) => t,
            Err(_) => return, // e.g. the agent did not trust us
        },
        None => Transport::plain(tcp, deadline).expect("plain"),
    };
    let decide = |req: &UpgradeRequest<'_>| -> Result<String, Rejection> {
        let token = req.bearer_token().unwrap_or("").to_owned();
        let _ = events.send(HubEvent::Upgrade {
            token: token.clone(),
        });
        let mut p = policy.lock().expect("policy");
        if let Some((path, token)) = p.rotate.take() {
            std::fs::write(path, token).expect("rotate token");
        }
        match p.reject {
            Some(status) => Err(Rejection::new(status, "rejected by test")),
            None => Ok(token),
        }
    };
    let Ok((ws, _token)) = ws::accept(transport, Config::default().max_message, decide) else {
        return;
    };
    let handler = HubSide {
        events,
        policy: policy.clone(),
    };
    let session = Session::new_hub(Config::default(), now());
    let tunnel = Tunnel::spawn("hub", ws, session, Box::new(handler)).expect("hub tunnel");
    tunnels.lock().expect("t").push(tunnel.handle().clone());
    let _ = tunnel.join();
}

// ----- the agent -----

struct Setup {
    /// Holds the files below until the test ends.
    _dir: tempfile::TempDir,
    token_path: PathBuf,
    ca_path: Option<PathBuf>,
}

impl Setup {
    fn new(pki: Option<&Pki>, token: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, token).expect("token");
        let ca_path = pki.map(|p| {
            let path = dir.path().join("ca.pem");
            std::fs::write(&path, &p.ca_pem).expect("ca");
            path
        });
        Setup {
            _dir: dir,
            token_path,
            ca_path,
        }
    }

    fn config(&self, url: &str, targets: &[(&str, SocketAddr)], extra: &str) -> AgentConfig {
        let mut yaml = format!(
            "agent_id: test-agent\nhub:\n  url: {url}\n  server_name: localhost\n{}token:\n  file: {}\nreconnect:\n  initial: 50ms\n  max: 200ms\nadmin:\n  listen: 127.0.0.1:0\nlimits:\n  shutdown_grace: 3s\nconnectors:\n",
            self.ca_path
                .as_ref()
                .map(|p| format!("  ca_file: {}\n", p.display()))
                .unwrap_or_default(),
            self.token_path.display()
        );
        for (name, addr) in targets {
            yaml.push_str(&format!(
                "  - name: {name}\n    targets: [\"{addr}\"]\n    health_check:\n      interval: 200ms\n      timeout: 200ms\n"
            ));
        }
        yaml.push_str(extra);
        AgentConfig::from_yaml("agent.yaml", &yaml, &|_| None).expect("agent config")
    }
}

fn start(cfg: AgentConfig) -> Agent {
    nowconnect_agent::start_with(cfg, &|_| None).expect("agent start")
}

fn connects(agent: &Agent, result: &str) -> f64 {
    agent
        .metrics()
        .value("nowconnect_agent_connects_total", &[result])
}

/// Drain and wait with a deadline; returns the exit status.
fn stop(agent: Agent) -> u8 {
    agent.drain();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(agent.wait());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("agent stopped in time")
}

fn roundtrip(client: &mut TcpStream, msg: &[u8]) {
    client.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.read_exact(&mut buf).expect("echo");
    assert_eq!(buf, msg);
}

// ----- tests -----

#[test]
fn tunnel_carries_streams_reports_health_and_drains() {
    let pki = pki();
    let hub = TestHub::start(Some(pki.server.clone()));
    let echo = echo_server();
    let token = jwt(unix_now(), unix_now() + 3600, "a");
    let setup = Setup::new(Some(&pki), &token);
    let agent = start(setup.config(&hub.url(true), &[("echo", echo)], ""));
    let admin = agent.admin_addr().expect("admin");

    let seen = hub.expect("upgrade", |e| match e {
        HubEvent::Upgrade { token } => Some(token.clone()),
        _ => None,
    });
    assert_eq!(seen, token);
    let hello = hub.expect("HELLO", |e| match e {
        HubEvent::Hello(h) => Some(h.clone()),
        _ => None,
    });
    assert_eq!(hello.agent_id, "test-agent");
    assert_eq!(hello.connectors, vec!["echo".to_owned()]);
    assert!(hello.software.starts_with("nowconnect-agent/"), "{hello:?}");
    let health = hub.expect("healthy HEALTH", |e| match e {
        HubEvent::Health(r) if r.connectors.get("echo").is_some_and(|c| c.healthy) => {
            Some(r.clone())
        }
        _ => None,
    });
    assert_eq!(health.connectors["echo"].backends[0].addr, echo.to_string());

    assert!(
        until(WAIT, || agent.readiness().0),
        "{:?}",
        agent.readiness()
    );
    let (status, body) = http_get(admin, "/readyz");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["ready"], true);
    assert_eq!(json["tunnels"], 1);
    assert_eq!(json["connectors"]["echo"]["healthy"], true);
    assert_eq!(http_get(admin, "/healthz"), (200, "ok".to_owned()));

    // A stream, both directions, half-close.
    let mut client = hub.connect(0, "echo");
    roundtrip(&mut client, b"hello through the tunnel");
    client.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
    let end = hub.expect("stream end", |e| match e {
        HubEvent::StreamClosed(_, end) => Some(end.clone()),
        _ => None,
    });
    assert_eq!(end, StreamEnd::Closed);

    // A connector the agent does not have.
    let _client = hub.connect(0, "nope");
    let end = hub.expect("refusal", |e| match e {
        HubEvent::StreamClosed(_, end) => Some(end.clone()),
        _ => None,
    });
    assert!(
        matches!(
            end,
            StreamEnd::Reset {
                code: Code::UNKNOWN_CONNECTOR,
                remote: true,
                ..
            }
        ),
        "{end:?}"
    );

    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    for want in [
        "nowconnect_agent_tunnels_up 1\n",
        "nowconnect_agent_connects_total{result=\"ok\"} 1\n",
        &format!("nowconnect_agent_backend_up{{connector=\"echo\",backend=\"{echo}\"}} 1\n"),
        "nowconnect_agent_backend_connect_duration_seconds_count{connector=\"echo\"} 1\n",
        "nowconnect_agent_streams_active{connector=\"echo\"} 0\n",
        "nowconnect_agent_token_expiry_seconds ",
        "nowconnect_build_info{version=",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
    let (status, page) = http_get(admin, "/");
    assert_eq!(status, 200);
    assert!(
        page.contains("sess-1") && page.contains("echo") && page.contains("healthy"),
        "{page}"
    );
    assert!(!page.contains(&token), "the token must never be shown");

    // Drain: readiness first, then GOAWAY(SHUTDOWN) and a normal close.
    agent.drain();
    assert_eq!(http_get(admin, "/readyz").0, 503);
    let code = hub.expect("GOAWAY", |e| match e {
        HubEvent::GoAway(c) => Some(*c),
        _ => None,
    });
    assert_eq!(code, Code::SHUTDOWN);
    let closed = hub.expect("close", |e| match e {
        HubEvent::Closed(c, _) => Some(*c),
        _ => None,
    });
    assert_eq!(closed, 1000);
    assert_eq!(stop(agent), 0);
}

#[test]
fn rejections_are_counted_and_retried_until_accepted() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    hub.policy.lock().expect("p").reject = Some(401);
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let agent = start(setup.config(&hub.url(false), &[("echo", echo)], ""));
    assert!(until(WAIT, || connects(&agent, "unauthorized") >= 2.0));
    hub.policy.lock().expect("p").reject = Some(403);
    assert!(until(WAIT, || connects(&agent, "forbidden") >= 1.0));
    assert_eq!(agent.tunnels_up(), 0);
    assert!(!agent.readiness().0);
    hub.policy.lock().expect("p").reject = None;
    assert!(until(WAIT, || agent.tunnels_up() == 1));
    // The tunnel gauge and the connect counter move on different threads: wait for the counter.
    assert!(until(WAIT, || connects(&agent, "ok") >= 1.0));
    assert_eq!(connects(&agent, "ok"), 1.0);
    assert_eq!(stop(agent), 0);
}

#[test]
fn rejected_connectors_do_not_block_readiness() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    hub.policy.lock().expect("p").reject_connectors = vec!["dead".into()];
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let agent = start(setup.config(&hub.url(false), &[("echo", echo), ("dead", dead)], ""));
    assert!(
        until(WAIT, || agent.readiness().0),
        "{:?}",
        agent.readiness()
    );
    let (_, body) = agent.readiness();
    assert_eq!(body["connectors"]["dead"]["healthy"], false);
    assert_eq!(body["connectors"]["dead"]["accepted"], false);
    // HEALTH only names accepted connectors.
    let report = hub.expect("HEALTH", |e| match e {
        HubEvent::Health(r) => Some(r.clone()),
        _ => None,
    });
    assert!(!report.connectors.contains_key("dead"), "{report:?}");
    assert_eq!(stop(agent), 0);
}

#[test]
fn untrusted_hub_certificate_is_a_tls_error() {
    let pki = pki();
    let hub = TestHub::start(Some(pki.server.clone()));
    let echo = echo_server();
    // No ca_file: the test CA is in no trust store.
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let agent = start(setup.config(&hub.url(true), &[("echo", echo)], ""));
    assert!(until(WAIT, || connects(&agent, "tls_error") >= 2.0));
    assert_eq!(agent.tunnels_up(), 0);
    assert_eq!(stop(agent), 0);
}

#[test]
fn configured_proxy_is_a_proxy_error_for_now() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let extra = "proxy:\n  url: http://127.0.0.1:9\n";
    let agent = start(setup.config(&hub.url(false), &[("echo", echo)], extra));
    assert!(until(WAIT, || connects(&agent, "proxy_error") >= 1.0));
    assert_eq!(stop(agent), 0);
}

#[test]
fn missing_token_file_is_retried_not_fatal() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let setup = Setup::new(None, "");
    std::fs::remove_file(&setup.token_path).expect("rm");
    let agent = start(setup.config(&hub.url(false), &[("echo", echo)], ""));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.tunnels_up(), 0);
    std::fs::write(
        &setup.token_path,
        jwt(unix_now(), unix_now() + 3600, "late"),
    )
    .expect("w");
    assert!(until(WAIT, || agent.tunnels_up() == 1));
    assert_eq!(stop(agent), 0);
}

#[test]
fn hub_goaway_opens_a_replacement_before_the_old_tunnel_goes() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let agent = start(setup.config(&hub.url(false), &[("echo", echo)], ""));
    assert!(until(WAIT, || agent.tunnels_up() == 1));
    let old = hub.tunnel(0);
    let mut client = hub.connect(0, "echo");
    roundtrip(&mut client, b"before");

    old.goaway(Code::TOKEN_EXPIRED, "token expired");
    let fresh = hub.tunnel(1);
    assert!(until(WAIT, || fresh.is_established()));
    assert!(!old.is_closed(), "the old tunnel drains its streams");
    roundtrip(&mut client, b"old stream still flows");
    let mut second = hub.connect(1, "echo");
    roundtrip(&mut second, b"new tunnel");
    drop(client);
    let code = hub.expect("old tunnel close", |e| match e {
        HubEvent::Closed(c, _) => Some(*c),
        _ => None,
    });
    assert_eq!(code, nowconnect_core::close::TOKEN_EXPIRED);
    assert!(until(WAIT, || agent.tunnels_up() == 1));
    drop(second);
    assert_eq!(stop(agent), 0);
}

#[test]
fn renew_sends_the_rotated_token_in_band() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let t0 = unix_now();
    // 80 % of iat → exp is already behind us: RENEW is due as soon as the tunnel is up.
    let first = jwt(t0 - 1000, t0 + 60, "first");
    let second = jwt(t0, t0 + 3600, "second");
    let setup = Setup::new(None, &first);
    hub.policy.lock().expect("p").rotate = Some((setup.token_path.clone(), second.clone()));
    let agent = start(setup.config(&hub.url(false), &[("echo", echo)], ""));
    let used = hub.expect("upgrade", |e| match e {
        HubEvent::Upgrade { token } => Some(token.clone()),
        _ => None,
    });
    assert_eq!(used, first);
    let renewed = hub.expect("RENEW", |e| match e {
        HubEvent::Renew(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(renewed, second);
    // Acknowledged: the next RENEW is due at 80 % of the new token's life, not now.
    thread::sleep(Duration::from_millis(2500));
    while let Ok(ev) = hub.events.try_recv() {
        assert!(!matches!(ev, HubEvent::Renew(_)), "renewed twice");
    }
    assert!(
        agent
            .metrics()
            .value("nowconnect_agent_token_expiry_seconds", &[])
            > 3000.0
    );
    assert_eq!(stop(agent), 0);
}

#[test]
fn no_token_source_is_a_config_error() {
    let echo = echo_server();
    let yaml = format!(
        "agent_id: a\nhub:\n  url: ws://127.0.0.1:9/v1/tunnel\nconnectors:\n  - name: echo\n    targets: [\"{echo}\"]\n"
    );
    let cfg = AgentConfig::from_yaml("agent.yaml", &yaml, &|_| None).expect("config");
    let err = nowconnect_agent::start_with(cfg, &|_| None).expect_err("no token");
    assert_eq!(err.exit_code(), 2);
}

// ----- the binary -----

fn spawn_binary(hub: &TestHub, setup: &Setup, echo: SocketAddr) -> std::process::Child {
    let cfg = format!(
        "agent_id: test-agent\nhub:\n  url: {}\ntoken:\n  file: {}\nreconnect:\n  initial: 50ms\n  max: 200ms\nlimits:\n  shutdown_grace: 20s\nlogging:\n  format: json\nconnectors:\n  - name: echo\n    targets: [\"{echo}\"]\n",
        hub.url(false),
        setup.token_path.display()
    );
    let path = setup.token_path.with_file_name("agent.yaml");
    std::fs::write(&path, cfg).expect("config");
    std::process::Command::new(env!("CARGO_BIN_EXE_nowconnect-agent"))
        .arg("--config")
        .arg(&path)
        .env_remove("NOWCONNECT_LOG")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent")
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

fn exit_status(child: &mut std::process::Child, within: Duration) -> i32 {
    let end = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st.code().expect("exit code");
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("agent did not exit within {within:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_drains_on_sigterm_and_exits_0() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let mut child = spawn_binary(&hub, &setup, echo);
    hub.expect("HELLO", |e| matches!(e, HubEvent::Hello(_)).then_some(()));
    let mut client = hub.connect(0, "echo");
    roundtrip(&mut client, b"ping");
    signal(&child, "-TERM");
    let code = hub.expect("GOAWAY", |e| match e {
        HubEvent::GoAway(c) => Some(*c),
        _ => None,
    });
    assert_eq!(code, Code::SHUTDOWN);
    // The open stream keeps working during the drain, and its end ends the drain.
    roundtrip(&mut client, b"still here");
    drop(client);
    assert_eq!(exit_status(&mut child, Duration::from_secs(10)), 0);
}

#[test]
fn binary_second_signal_exits_at_once() {
    let hub = TestHub::start(None);
    let echo = echo_server();
    let setup = Setup::new(None, &jwt(unix_now(), unix_now() + 3600, "a"));
    let mut child = spawn_binary(&hub, &setup, echo);
    hub.expect("HELLO", |e| matches!(e, HubEvent::Hello(_)).then_some(()));
    let mut client = hub.connect(0, "echo");
    roundtrip(&mut client, b"ping");
    signal(&child, "-INT");
    hub.expect("GOAWAY", |e| matches!(e, HubEvent::GoAway(_)).then_some(()));
    // The stream would hold the drain for shutdown_grace (20 s); a second signal ends it.
    signal(&child, "-INT");
    assert_eq!(exit_status(&mut child, Duration::from_secs(5)), 1);
}
