//! Real-socket tests: a hub tunnel and an agent tunnel in one process, joined by a loopback
//! wss:// (or ws://) WebSocket, carrying streams between loopback clients and targets.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use nowconnect_core::{Code, Config, Hello, HelloAck, Session};
use nowconnect_runtime::ws::{self, ConnectError, Rejection, UpgradeRequest};
use nowconnect_runtime::{
    install_crypto_provider, now, spawn_stream_thread, OpenRequest, StreamEnd, Transport, Tunnel,
    TunnelHandle, TunnelHandler,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

const TOKEN: &str = "test-token";
const PATH: &str = "/v1/tunnel";

// ----- TLS material -----

struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn tls() -> Tls {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(install_crypto_provider);
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("server cert");

    let chain = vec![server_cert.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.der().to_vec()))
        .expect("root");
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

// ----- handlers -----

type Ends = Arc<Mutex<Vec<(u32, StreamEnd)>>>;

struct HubSide {
    ends: Ends,
}

impl TunnelHandler for HubSide {
    fn on_hello(&mut self, tunnel: &TunnelHandle, hello: Hello) {
        tunnel.accept_hello(HelloAck {
            session: "test-session".into(),
            accepted: hello.connectors,
            rejected: Vec::new(),
            window: 0,
            max_frame: 0,
            heartbeat_ms: 0,
            ver: 1,
        });
    }

    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        self.ends.lock().expect("ends").push((cid, end));
    }
}

struct AgentSide {
    targets: HashMap<String, SocketAddr>,
    ends: Ends,
}

impl TunnelHandler for AgentSide {
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

    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        self.ends.lock().expect("ends").push((cid, end));
    }
}

// ----- the pair -----

struct Pair {
    hub: Tunnel,
    agent: Tunnel,
    /// Stands in for a connector listener: clients connect here, the accepted side is handed
    /// to the hub tunnel.
    clients: TcpListener,
    hub_ends: Ends,
    agent_ends: Ends,
}

fn hub_decision(req: &UpgradeRequest<'_>) -> Result<String, Rejection> {
    if req.path != PATH {
        return Err(Rejection::new(404, "no such endpoint"));
    }
    match req.bearer_token() {
        Some(TOKEN) => Ok("agent-1".to_owned()),
        Some(_) => Err(Rejection {
            status: 401,
            reason: "invalid token".into(),
            www_authenticate: Some("Bearer error=\"invalid_token\"".into()),
        }),
        None => Err(Rejection {
            status: 401,
            reason: "missing token".into(),
            www_authenticate: Some("Bearer".into()),
        }),
    }
}

fn deadline() -> Instant {
    Instant::now() + ws::HANDSHAKE_TIMEOUT
}

impl Pair {
    fn start(secure: bool, targets: &[(&str, SocketAddr)]) -> Pair {
        let tls = tls();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let max_message = Config::default().max_message;
        let hub_ends = Ends::default();
        let ends = hub_ends.clone();
        let server = tls.server.clone();
        let hub = thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            let transport = if secure {
                Transport::tls_server(server, tcp, deadline()).expect("tls accept")
            } else {
                Transport::plain(tcp, deadline()).expect("plain")
            };
            let (ws, agent_id) = ws::accept(transport, max_message, hub_decision).expect("upgrade");
            assert_eq!(agent_id, "agent-1");
            let session = Session::new_hub(Config::default(), now());
            Tunnel::spawn("hub", ws, session, Box::new(HubSide { ends })).expect("hub tunnel")
        });

        let tcp = TcpStream::connect(addr).expect("connect");
        let (transport, url) = if secure {
            let name = ServerName::try_from("localhost").expect("name");
            let t = Transport::tls_client(tls.client, name, tcp, deadline()).expect("tls");
            (t, format!("wss://localhost:{}{PATH}", addr.port()))
        } else {
            let t = Transport::plain(tcp, deadline()).expect("plain");
            (t, format!("ws://127.0.0.1:{}{PATH}", addr.port()))
        };
        let ws = ws::connect(transport, &url, TOKEN, max_message).expect("ws connect");
        let hello = Hello {
            agent_id: "agent-1".into(),
            connectors: targets.iter().map(|(c, _)| (*c).to_owned()).collect(),
            ver: 1,
            software: "nowconnect-runtime-test".into(),
            window: 0,
            max_streams: 0,
        };
        let session = Session::new_agent(Config::default(), hello, now());
        let agent_ends = Ends::default();
        let handler = AgentSide {
            targets: targets.iter().map(|(c, a)| ((*c).to_owned(), *a)).collect(),
            ends: agent_ends.clone(),
        };
        let agent = Tunnel::spawn("agent", ws, session, Box::new(handler)).expect("agent");
        let hub = hub.join().expect("hub thread");

        let until = Instant::now() + Duration::from_secs(5);
        while !(hub.handle().is_established() && agent.handle().is_established()) {
            assert!(Instant::now() < until, "tunnel not established");
            thread::sleep(Duration::from_millis(5));
        }
        Pair {
            hub,
            agent,
            clients: TcpListener::bind("127.0.0.1:0").expect("bind clients"),
            hub_ends,
            agent_ends,
        }
    }

    /// A client connection to `connector` through the tunnel.
    fn connect(&self, connector: &str) -> TcpStream {
        let client = TcpStream::connect(self.clients.local_addr().expect("addr")).expect("client");
        let (accepted, peer) = self.clients.accept().expect("accept client");
        self.hub
            .handle()
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

    fn shutdown(self) {
        self.hub.handle().close(1000, "test over");
        let hub_end = self.hub.join();
        let agent_end = self.agent.join();
        assert_eq!(hub_end.code, 1000);
        assert_eq!(agent_end.code, 1000, "agent saw {agent_end:?}");
    }
}

// ----- targets -----

/// Serve every connection on `listener` with `f` on its own thread.
fn serve(f: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let f = Arc::new(f);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let f = f.clone();
            thread::spawn(move || f(conn));
        }
    });
    addr
}

/// Echo until EOF, then half-close.
fn echo(conn: TcpStream) {
    let mut reader = conn.try_clone().expect("clone");
    let mut writer = conn;
    let _ = io::copy(&mut reader, &mut writer);
    let _ = writer.shutdown(Shutdown::Write);
}

fn pattern_byte(pos: u64) -> u8 {
    // A prime period, so a misplaced or repeated chunk shows.
    (pos % 251) as u8
}

fn write_pattern(w: &mut impl Write, total: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0;
    while pos < total {
        let n = buf.len().min((total - pos) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern_byte(pos + i as u64);
        }
        w.write_all(&buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}

/// Read to EOF, checking the pattern; returns the byte count.
fn read_pattern(r: &mut impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(pos);
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            if b != pattern_byte(pos + i as u64) {
                return Err(io::Error::other(format!(
                    "corrupt at byte {}",
                    pos + i as u64
                )));
            }
        }
        pos += n as u64;
    }
}

const MIB: u64 = 1024 * 1024;

// ----- tests -----

/// 64 MiB each way at once through one stream over wss (DEPENDENCIES.md: `StreamOwned`
/// stalls here), then a clean FIN both ways.
#[test]
fn full_duplex_echo_over_wss() {
    let pair = Pair::start(true, &[("echo", serve(echo))]);
    let client = pair.connect("echo");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let total = 64 * MIB;
    let started = Instant::now();
    let mut writer = client.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        write_pattern(&mut writer, total).expect("write");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let got = read_pattern(&mut &client).expect("read");
    sender.join().expect("writer");
    assert_eq!(got, total);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "full duplex: {} MiB each way in {secs:.2} s ({:.0} MiB/s per direction)",
        total / MIB,
        (total / MIB) as f64 / secs
    );
    wait_for(&pair.hub_ends, 1);
    assert_eq!(
        pair.hub_ends.lock().expect("ends")[0],
        (1, StreamEnd::Closed)
    );
    wait_for(&pair.agent_ends, 1);
    assert_eq!(
        pair.agent_ends.lock().expect("ends")[0],
        (1, StreamEnd::Closed)
    );
    pair.shutdown();
}

fn wait_for(ends: &Ends, n: usize) {
    let until = Instant::now() + Duration::from_secs(5);
    while ends.lock().expect("ends").len() < n {
        assert!(Instant::now() < until, "stream end not reported");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The client half-closes after its request and still receives the whole response, which the
/// target only starts after seeing EOF (§4 half-close).
#[test]
fn half_close_keeps_the_other_direction() {
    let request = MIB;
    let response = 4 * MIB;
    let target = serve(move |mut conn| {
        let got = read_pattern(&mut conn).expect("target read");
        assert_eq!(got, request);
        write_pattern(&mut conn, response).expect("target write");
    });
    let pair = Pair::start(true, &[("reply", target)]);
    let mut client = pair.connect("reply");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write_pattern(&mut client, request).expect("request");
    client.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(read_pattern(&mut client).expect("response"), response);
    wait_for(&pair.hub_ends, 1);
    assert_eq!(pair.hub_ends.lock().expect("ends")[0].1, StreamEnd::Closed);
    pair.shutdown();
}

/// A TCP reset on either end arrives as a reset at the other end (§4: ECONNRESET →
/// RST RESET_BY_PEER → SO_LINGER 0 close).
#[test]
fn reset_propagates_both_ways() {
    // Client resets; the target must see ECONNRESET.
    let (seen_tx, seen_rx) = mpsc::channel();
    let observer = serve(move |mut conn| {
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).expect("hello");
        seen_tx.send(None).expect("signal");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let outcome = conn.read(&mut [0u8; 16]);
        let _ = seen_tx.send(Some(outcome.map_err(|e| e.kind())));
    });
    // Target resets; the client must see ECONNRESET.
    let resetter = serve(|mut conn| {
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).expect("hello");
        nowconnect_runtime::sockopt::abort(conn);
    });
    let pair = Pair::start(true, &[("observer", observer), ("resetter", resetter)]);

    let mut client = pair.connect("observer");
    client.write_all(b"hello").expect("write");
    assert_eq!(
        seen_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("target"),
        None
    );
    nowconnect_runtime::sockopt::abort(client);
    let outcome = seen_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("outcome");
    assert_eq!(outcome, Some(Err(io::ErrorKind::ConnectionReset)));

    let mut client = pair.connect("resetter");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client.write_all(b"hello").expect("write");
    let err = client.read(&mut [0u8; 16]).expect_err("must be reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

    // A connector the agent does not serve: refused, and the client is reset (§10).
    let mut client = pair.connect("nowhere");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let err = client.read(&mut [0u8; 16]).expect_err("must be reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

    wait_for(&pair.hub_ends, 3);
    wait_for(&pair.agent_ends, 3);
    let hub = pair.hub_ends.lock().expect("ends").clone();
    let agent = pair.agent_ends.lock().expect("ends").clone();
    let code = |ends: &[(u32, StreamEnd)], cid: u32| {
        ends.iter().find(|(c, _)| *c == cid).map(|(_, e)| e.clone())
    };
    // Stream 1: the hub side saw the client's reset, the agent got the RST.
    assert!(matches!(
        code(&hub, 1),
        Some(StreamEnd::Reset {
            code: Code::RESET_BY_PEER,
            remote: false,
            ..
        })
    ));
    assert!(matches!(
        code(&agent, 1),
        Some(StreamEnd::Reset {
            code: Code::RESET_BY_PEER,
            remote: true,
            ..
        })
    ));
    // Stream 2: the other way round.
    assert!(matches!(
        code(&agent, 2),
        Some(StreamEnd::Reset {
            code: Code::RESET_BY_PEER,
            remote: false,
            ..
        })
    ));
    assert!(matches!(
        code(&hub, 2),
        Some(StreamEnd::Reset {
            code: Code::RESET_BY_PEER,
            remote: true,
            ..
        })
    ));
    pair.shutdown();
}

/// A client that stops reading stalls only its own stream; another stream on the same tunnel
/// keeps flowing at full speed (§4 flow control).
#[test]
fn stalled_stream_does_not_block_others() {
    let pair = Pair::start(true, &[("echo", serve(echo))]);
    // Stream 1: pushes into an echo but never reads the echo back.
    let stalled = pair.connect("echo");
    stalled
        .set_write_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let pushed = Arc::new(AtomicU64::new(0));
    let counter = pushed.clone();
    let mut w = stalled.try_clone().expect("clone");
    let pusher = thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        while w.write_all(&chunk).is_ok() {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    // Wait until it is stuck: nothing moved for 300 ms.
    let mut last = 0;
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = pushed.load(Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let stuck_at = last;
    eprintln!("stalled stream stopped after {} KiB", stuck_at / 1024);

    // Stream 2: 16 MiB each way must still go through, quickly.
    let client = pair.connect("echo");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    let mut writer = client.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        write_pattern(&mut writer, 16 * MIB).expect("write");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    assert_eq!(read_pattern(&mut &client).expect("read"), 16 * MIB);
    sender.join().expect("writer");
    assert!(started.elapsed() < Duration::from_secs(8));
    // Still stalled: bounded by socket buffers and the stream windows, not by the tunnel.
    assert_eq!(pushed.load(Ordering::Relaxed), stuck_at);

    drop(client);
    stalled.shutdown(Shutdown::Both).expect("unblock");
    pusher.join().expect("pusher");
    pair.shutdown();
}

/// Small request/response turns: each one needs credit published, DATA woken through and
/// releases returned, with no timer involved.
#[test]
fn interactive_round_trips() {
    let pair = Pair::start(true, &[("echo", serve(echo))]);
    let mut client = pair.connect("echo");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let turns = 500;
    let mut buf = [0u8; 100];
    for turn in 0..turns {
        let msg = [turn as u8; 100];
        client.write_all(&msg).expect("write");
        client.read_exact(&mut buf).expect("read");
        assert_eq!(buf, msg);
    }
    let per_turn = started.elapsed() / turns;
    eprintln!("round trip through the tunnel: {per_turn:?}");
    assert!(per_turn < Duration::from_millis(20));
    // Requests go out from the client's socket thread and answers from the target's in direct
    // turns while the tunnel threads sleep: no hand-off on the way out (measured here: 80-100 %
    // of round trips; a turn the tunnel thread is still finishing makes the rest queue).
    let (hub_turns, hub_direct) = pair.hub.handle().turn_counts();
    let (agent_turns, agent_direct) = pair.agent.handle().turn_counts();
    eprintln!(
        "turns: hub {hub_turns} + {hub_direct} direct, agent {agent_turns} + {agent_direct} direct"
    );
    let turns = u64::from(turns);
    assert!(hub_direct >= turns / 5 && agent_direct >= turns / 5);
    pair.shutdown();
}

/// GOAWAY: no new streams, the open one finishes, then the tunnel closes 1000 by itself.
#[test]
fn goaway_drains_then_closes() {
    let pair = Pair::start(true, &[("echo", serve(echo))]);
    let mut open = pair.connect("echo");
    open.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    open.write_all(b"before").expect("write");
    pair.hub.handle().goaway(Code::SHUTDOWN, "maintenance");
    let until = Instant::now() + Duration::from_secs(5);
    while !(pair.hub.handle().is_draining() && pair.agent.handle().is_draining()) {
        assert!(Instant::now() < until, "GOAWAY not seen");
        thread::sleep(Duration::from_millis(5));
    }
    // Refused while draining: the client is reset at once (§10).
    let mut late = pair.connect("echo");
    late.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let err = late.read(&mut [0u8; 1]).expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The open stream still works to its end.
    open.write_all(b" after").expect("write");
    open.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = Vec::new();
    if let Err(e) = open.read_to_end(&mut echoed) {
        thread::sleep(Duration::from_millis(300));
        panic!(
            "echo: {e}; got {:?}; hub {:?}; agent {:?}",
            String::from_utf8_lossy(&echoed),
            pair.hub_ends.lock().expect("ends"),
            pair.agent_ends.lock().expect("ends")
        );
    }
    assert_eq!(echoed, b"before after");
    let Pair { hub, agent, .. } = pair;
    assert_eq!(hub.join().code, 1000);
    assert_eq!(agent.join().code, 1000);
}

/// ws:// carries streams the same way.
#[test]
fn plain_websocket_echo() {
    let pair = Pair::start(false, &[("echo", serve(echo))]);
    let mut client = pair.connect("echo");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write_pattern(&mut client, 4 * MIB).expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(read_pattern(&mut client).expect("read"), 4 * MIB);
    pair.shutdown();
}

/// Upgrade answers of §1: 401 for a bad token, 400 without the subprotocol.
#[test]
fn upgrade_rejections() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hub = thread::spawn(move || {
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().expect("accept");
            let transport = Transport::plain(tcp, deadline()).expect("plain");
            match ws::accept(transport, 1 << 20, hub_decision) {
                Err(ws::AcceptError::Rejected(r)) => statuses.push(r.status),
                other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
            }
        }
        statuses
    });
    let url = format!("ws://127.0.0.1:{}{PATH}", addr.port());

    let tcp = TcpStream::connect(addr).expect("connect");
    let transport = Transport::plain(tcp, deadline()).expect("plain");
    match ws::connect(transport, &url, "wrong-token", 1 << 20) {
        Err(ConnectError::Rejected { status }) => assert_eq!(status, 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }

    let tcp = TcpStream::connect(addr).expect("connect");
    match tungstenite::client(url.as_str(), tcp) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status().as_u16(), 400);
        }
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    assert_eq!(hub.join().expect("hub"), vec![401, 400]);
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field")
}

/// Idle streams stay small (DESIGN.md: 10 000 per hub is a design point): one small-stack
/// thread per socket, no per-stream buffers while idle. Both ends run in this process, so each
/// stream costs two socket threads here. The bound is loose (the design figure is ~10 KiB);
/// it catches a regression to default 2 MiB-touching stacks or eager buffers. More streams:
/// `NC_IDLE_STREAMS=2500 cargo test -p nowconnect-runtime --test tunnel idle -- --nocapture`
#[test]
fn idle_streams_memory() {
    let n: usize = std::env::var("NC_IDLE_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    nowconnect_runtime::sockopt::raise_fd_limit().expect("fd limit");
    // The target keeps every connection open, reading the one byte each client sends; one
    // thread for all, so only the tunnel's own threads grow with n.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr");
    let (held_tx, held_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let mut conn = conn.expect("accept");
            conn.read_exact(&mut [0u8; 1]).expect("byte");
            held.push(conn);
            held_tx.send(held.len()).expect("count");
        }
    });
    let pair = Pair::start(true, &[("hold", target)]);
    let rss_before = status_field("VmRSS:");
    let threads_before = status_field("Threads:");
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = pair.connect("hold");
        c.write_all(b"x").expect("write");
        clients.push(c);
    }
    let mut held = 0;
    while held < n {
        held = held_rx.recv_timeout(Duration::from_secs(10)).expect("held");
    }
    let opened = started.elapsed();
    thread::sleep(Duration::from_millis(200));
    // Other tests of this binary run in parallel: count this test's effect precisely by the
    // stream threads' names, and report RSS (process-wide, so only indicative here).
    let rss = status_field("VmRSS:").saturating_sub(rss_before);
    let stream_threads = std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        // Hub side: the runtime's `nc-stream-<cid>`; agent side: this harness's connect thread,
        // which becomes the target's socket thread.
        .filter(|name| name.starts_with("nc-stream-") || name.starts_with("nc-connect-"))
        .count();
    let _ = threads_before;
    eprintln!(
        "{n} idle streams opened in {opened:?}: {stream_threads} stream threads, +{} MiB RSS, {:.1} KiB per stream ({:.1} KiB per socket thread)",
        rss / 1024,
        rss as f64 / n as f64,
        rss as f64 / stream_threads.max(1) as f64
    );
    assert_eq!(pair.hub.handle().active_streams(), n);
    // One thread per socket: a client-side and a target-side thread per stream, no more.
    assert!(
        stream_threads >= 2 * n && stream_threads < 2 * n + 64,
        "one thread per socket: {stream_threads} stream threads for {n} streams"
    );
    drop(clients);
    pair.shutdown();
}

/// Once nonblocking (the tunnel's mode), a TLS transport's read returns every record the
/// socket has, not one 16 KiB record per call; during the blocking handshake phase it stops
/// after the first plaintext (it must not wait for data the peer has not sent).
#[test]
fn tls_read_fills_the_buffer_from_several_records() {
    let tls = tls();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tls.server.clone();
    let sender = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut t = Transport::tls_server(server, tcp, deadline()).expect("tls accept");
        // Blocking phase: a short message, answered before more is sent.
        t.write_all(b"hello").expect("write hello");
        t.flush().expect("flush");
        let mut ack = [0u8; 3];
        t.read_exact(&mut ack).expect("ack");
        // Four full records, then nothing until the reader confirms.
        t.write_all(&[7u8; 4 * 16384]).expect("write records");
        t.flush().expect("flush");
        t.read_exact(&mut ack).expect("done");
    });
    let tcp = TcpStream::connect(addr).expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut t = Transport::tls_client(tls.client, name, tcp, deadline()).expect("tls");
    let mut buf = vec![0u8; 128 * 1024];
    let n = t.read(&mut buf).expect("read hello");
    assert_eq!(&buf[..n], b"hello", "a blocking read returns what has come");
    t.write_all(b"ack").expect("ack");
    t.flush().expect("flush");
    t.set_nonblocking().expect("nonblocking");
    let until = Instant::now() + Duration::from_secs(5);
    let mut first = 0;
    while first == 0 {
        assert!(Instant::now() < until, "records never arrived");
        thread::sleep(Duration::from_millis(50));
        match t.read(&mut buf) {
            Ok(n) => first = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(
        first,
        4 * 16384,
        "one read takes every record the socket holds"
    );
    t.write_all(b"end").expect("end");
    while t.flush().is_err() {
        thread::sleep(Duration::from_millis(5));
    }
    sender.join().expect("sender");
}
