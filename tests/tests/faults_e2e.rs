//! Reliability under faults, load and hostile input, against the real `nowconnect-hub` and
//! `nowconnect-agent` binaries (issue 8):
//!
//! - faults: an agent SIGKILLed or SIGSTOPped mid-stream, the hub killed and restarted, a
//!   backend dying mid-stream;
//! - load: 10 000 concurrent streams through one pair (`NOWCONNECT_LOAD_STREAMS` overrides the
//!   count), a flood of idle and slow-drip connections on the hub's tunnel port;
//! - abuse: a rogue agent with a valid token and a rogue hub, both built from raw frames
//!   ([`nowconnect_tests::rogue`]).
//!
//! Heartbeats are 1 s here so "within 3 × heartbeat" is a few seconds; deadlines add generous
//! slack for a loaded 2-core machine and are polled, never slept.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nowconnect_core::frame::Frame;
use nowconnect_core::Hello;
use nowconnect_tests::rogue::{hello_ack, read_hello, RawPeer, Received, RogueHub};
use nowconnect_tests::tunnel::{
    fd_count, http_get, log_records, log_ts_millis, metric, thread_count, vm_rss_kib, Transport,
    Tunnel, TUNNEL_PATH,
};
use nowconnect_tests::*;

const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// `limits.heartbeat` of both sides in these tests.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// What "within 3 × heartbeat" may take on a loaded 2-core machine.
const DEAD_WITHIN: Duration = Duration::from_millis(3 * 1000 + 2500);
const READY: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Test servers
// ---------------------------------------------------------------------------------------------

/// A loopback server handling each connection on its own thread.
fn serve(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind(free_addr()).expect("bind test server");
    let addr = listener.local_addr().expect("test server addr");
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handler = handler.clone();
            thread::spawn(move || handler(conn));
        }
    });
    addr
}

/// Counts of an [`echo_counting`] server: connections that carried data (the agent's health
/// checks connect and close without sending, and are not counted).
#[derive(Default)]
struct EchoCounts {
    live: AtomicUsize,
    total: AtomicUsize,
}

/// Echoes everything; counts the connections that sent at least one byte.
fn echo_counting() -> (SocketAddr, Arc<EchoCounts>) {
    let counts = Arc::new(EchoCounts::default());
    let c = counts.clone();
    let addr = serve(move |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match s.read(&mut buf) {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        c.live.fetch_add(1, Ordering::SeqCst);
        c.total.fetch_add(1, Ordering::SeqCst);
        let mut n = n;
        loop {
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
            n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
        }
        let _ = s.shutdown(Shutdown::Write);
        c.live.fetch_sub(1, Ordering::SeqCst);
    });
    (addr, counts)
}

fn echo_server() -> SocketAddr {
    echo_counting().0
}

/// Streams the pattern (byte i = i % 251) after reading one byte: `limit` bytes then FIN, or
/// forever when `None`.
fn pattern_source(limit: Option<u64>) -> SocketAddr {
    const CHUNK: usize = 251 * 256;
    serve(move |mut s| {
        let mut go = [0u8; 1];
        if s.read_exact(&mut go).is_err() {
            return;
        }
        let chunk = pattern(CHUNK);
        let mut sent = 0u64;
        while limit.is_none_or(|l| sent < l) {
            let n = limit.map_or(CHUNK, |l| (l - sent).min(CHUNK as u64) as usize);
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Reads exactly `buf.len()` bytes that must continue the pattern at `offset`.
fn read_pattern(s: &mut TcpStream, offset: u64, len: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    for (i, b) in buf.iter().enumerate() {
        let want = ((offset + i as u64) % 251) as u8;
        assert_eq!(*b, want, "pattern corrupted at byte {}", offset + i as u64);
    }
    Ok(())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("echo write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo read");
    assert_eq!(back, msg, "echo answered other bytes");
}

/// One echo round trip on a fresh connection; `Err` with what went wrong.
fn try_echo(addr: SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err("echo answered other bytes".into());
    }
    Ok(())
}

/// Reads until the stream ends; how it ended and when. Data is discarded.
fn read_until_end(s: &mut TcpStream) -> (std::io::Result<()>, Instant) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (Ok(()), Instant::now()),
            Ok(_) => {}
            Err(e) => return (Err(e), Instant::now()),
        }
    }
}

fn is_reset(r: &std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

fn hub_metric(tunnel: &Tunnel, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&tunnel.hub_metrics(), name, labels).unwrap_or(0.0)
}

fn agents_connected(tunnel: &Tunnel, agent_id: &str) -> f64 {
    hub_metric(
        tunnel,
        "nowconnect_agents_connected",
        &[("agent_id", agent_id)],
    )
}

fn ws_tunnel_1s_heartbeat() -> nowconnect_tests::tunnel::TunnelBuilder {
    Tunnel::builder(Transport::Ws)
        .hub_limit("heartbeat: 1s")
        .agent_limit("heartbeat: 1s")
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// An agent SIGKILLed while three streams pull data through it: each client sees a TCP reset
/// within 3 × heartbeat (no hang), the hub stays up, a transfer through another agent is not
/// disturbed (every byte, in order, then EOF), and the restarted agent serves again.
#[test]
fn agent_sigkill_mid_transfer() {
    const OTHER_TOTAL: u64 = 16 << 20;
    let forever = pattern_source(None);
    let finite = pattern_source(Some(OTHER_TOTAL));
    let mut tunnel = ws_tunnel_1s_heartbeat()
        .connector("bulk", &[forever])
        .connector("other", &[finite])
        .without_agent()
        .start();
    let mut victim = tunnel.extra_agent("agent-victim", &[("bulk", &[forever.to_string()])], "");
    let mut bystander = tunnel.extra_agent("agent-other", &[("other", &[finite.to_string()])], "");
    victim.wait_ready(READY);
    bystander.wait_ready(READY);

    let mut bulk: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = connect(tunnel.connector("bulk"));
            c.write_all(b"g").expect("write go");
            read_pattern(&mut c, 0, 1 << 20).expect("first MiB through the victim");
            c
        })
        .collect();
    let mut other = connect(tunnel.connector("other"));
    other.write_all(b"g").expect("write go");
    read_pattern(&mut other, 0, 1 << 20).expect("first MiB through the bystander");

    let killed = Instant::now();
    victim.kill();
    let readers: Vec<_> = bulk
        .drain(..)
        .map(|mut c| thread::spawn(move || read_until_end(&mut c)))
        .collect();
    for r in readers {
        let (end, at) = r.join().expect("reader thread");
        let took = at.duration_since(killed);
        assert!(
            is_reset(&end),
            "client of the killed agent: expected ECONNRESET, got {end:?} after {took:?}\n{}",
            tunnel.logs()
        );
        assert!(
            took <= DEAD_WITHIN,
            "client reset only {took:?} after the agent was killed (heartbeat {HEARTBEAT:?})"
        );
        eprintln!("[sigkill] client reset {took:?} after SIGKILL");
    }
    tunnel.assert_running();
    assert!(matches!(
        http_get(tunnel.hub_admin, "/healthz"),
        Ok((200, _))
    ));

    // The other agent's transfer goes on to the end, intact.
    read_pattern(&mut other, 1 << 20, (OTHER_TOTAL - (1 << 20)) as usize)
        .unwrap_or_else(|e| panic!("bystander transfer broken: {e}\n{}", tunnel.logs()));
    let mut rest = [0u8; 1];
    assert_eq!(other.read(&mut rest).expect("EOF after the transfer"), 0);
    assert!(
        !bystander.log().contains("tunnel down"),
        "the other agent lost its tunnel\n{}",
        bystander.log_tail()
    );

    // The restarted agent serves again.
    victim.start();
    victim.wait_ready(READY);
    let mut c = connect(tunnel.connector("bulk"));
    c.write_all(b"g").expect("write go");
    read_pattern(&mut c, 0, 1 << 20).expect("stream through the restarted agent");
}

/// The hub SIGKILLed and restarted on the same ports: the agent's four tunnels
/// (`hub.tunnels: 4`) reconnect on their own with backoff — few attempts during the outage,
/// and at spread-out times (full jitter: no thundering herd) — and readiness returns.
#[test]
fn hub_restart_reconnects_with_jittered_backoff() {
    const TUNNELS: usize = 4;
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo])
        .hub_tunnels(TUNNELS as u32)
        .reconnect("500ms", "4s")
        .start();
    assert!(
        wait_until(READY, || agents_connected(&tunnel, "agent-1")
            == TUNNELS as f64),
        "not all {TUNNELS} tunnels up\n{}",
        tunnel.logs()
    );
    let before_failures = tunnel.agent_log().matches("tunnel connect failed").count();

    let killed = Instant::now();
    tunnel.kill_hub();
    let agent_admin = tunnel.agent_admin;
    let down = wait_until(Duration::from_secs(10), || {
        matches!(http_get(agent_admin, "/metrics"),
            Ok((200, m)) if metric(&m, "nowconnect_agent_tunnels_up", &[]) == Some(0.0))
    });
    assert!(down, "agent did not notice the hub died\n{}", tunnel.logs());
    // The outage: long enough for the backoff to reach its cap (4 s).
    thread::sleep(Duration::from_secs(6));
    tunnel.start_hub();
    let outage = killed.elapsed();
    let restarted = Instant::now();
    assert!(
        wait_until(READY, || agents_connected(&tunnel, "agent-1")
            == TUNNELS as f64),
        "tunnels did not all come back\n{}",
        tunnel.logs()
    );
    eprintln!(
        "[hub restart] {TUNNELS} tunnels back {:?} after the hub restarted",
        restarted.elapsed()
    );
    tunnel.wait_ready();
    let mut c = connect(tunnel.connector("echo"));
    round_trip(&mut c, b"after the hub restart");

    // Reconnect times, from the restarted hub's log: spread out, not one burst. Two
    // tunnels can still come up in the same millisecond (seen once in CI, e.g. two retries
    // queued in the listen backlog while the hub was starting), so the check is that no
    // three coincide, not that all four differ.
    let mut times: Vec<u64> = log_records(&tunnel.hub_log())
        .iter()
        .filter(|r| r["msg"] == "tunnel up")
        .filter_map(log_ts_millis)
        .collect();
    times.sort_unstable();
    assert_eq!(times.len(), TUNNELS, "tunnel up lines: {times:?}");
    let spread = times[TUNNELS - 1] - times[0];
    eprintln!("[hub restart] reconnect times (ms of day) {times:?}, spread {spread} ms");
    assert!(
        times.windows(3).all(|w| w[2] > w[0]) && spread >= 100,
        "tunnels reconnected together (no jitter): {times:?}"
    );
    // Backoff: reconnect.initial 500ms doubling to 4s with full jitter averages ≤ 2 s per
    // attempt once capped, after ~4 quicker ones: per tunnel about 4 + outage/2 attempts. A
    // retry without growth (≤ 500 ms) would make 2–4 per second.
    let log = tunnel.agent_log();
    let records = log_records(&log);
    let failed: Vec<u64> = records
        .iter()
        .filter(|r| r["msg"] == "tunnel connect failed")
        .skip(before_failures)
        .filter_map(|r| r["retry_in_ms"].as_u64())
        .collect();
    let allowed = TUNNELS * (5 + (outage.as_secs_f64() * 0.75) as usize);
    let longest = failed.iter().copied().max().unwrap_or(0);
    eprintln!(
        "[hub restart] outage {outage:?}: {} failed connect attempts (allowed {allowed}), \
         longest wait {longest} ms",
        failed.len()
    );
    assert!(
        failed.len() <= allowed,
        "{} connect attempts in a {outage:?} outage: no backoff?\n{log}",
        failed.len()
    );
    assert!(
        longest > 500,
        "no wait beyond reconnect.initial (500ms): the backoff does not grow: {failed:?}"
    );
}

/// SIGSTOP of an agent (a stalled network path): the hub declares its session dead within
/// 3 × heartbeat (counted as a `timeout` protocol error), resets its client, and routes new
/// streams to the other agent; after SIGCONT the stalled agent's old stream stays dead (its
/// target connection is closed) and the agent comes back with a new session.
#[test]
fn stalled_agent_is_declared_dead_and_not_resurrected() {
    let (echo_a, count_a) = echo_counting();
    let (echo_b, count_b) = echo_counting();
    let tunnel = ws_tunnel_1s_heartbeat()
        .connector("echo", &[echo_a])
        .without_agent()
        .start();
    let mut stalled = tunnel.extra_agent("agent-a", &[("echo", &[echo_a.to_string()])], "");
    let mut healthy = tunnel.extra_agent("agent-b", &[("echo", &[echo_b.to_string()])], "");
    stalled.wait_ready(READY);
    healthy.wait_ready(READY);

    // Two streams: fewest-active routing puts one on each agent.
    let mut c1 = connect(tunnel.connector("echo"));
    round_trip(&mut c1, b"one");
    let mut c2 = connect(tunnel.connector("echo"));
    round_trip(&mut c2, b"two");
    assert_eq!(
        (
            count_a.live.load(Ordering::SeqCst),
            count_b.live.load(Ordering::SeqCst)
        ),
        (1, 1),
        "expected one stream per agent"
    );
    // Which client rides the agent we stop: send on c1 and see whose total moves? Both are
    // open; tell them apart by the backend each echo server saw first — simpler: close nothing
    // and judge by which one gets reset.
    let timeouts_before = hub_metric(
        &tunnel,
        "nowconnect_protocol_errors_total",
        &[("kind", "timeout")],
    );

    stalled.proc().signal("STOP").expect("SIGSTOP");
    let stopped = Instant::now();
    let declared = wait_until(Duration::from_secs(20), || {
        hub_metric(
            &tunnel,
            "nowconnect_protocol_errors_total",
            &[("kind", "timeout")],
        ) > timeouts_before
    });
    let took = stopped.elapsed();
    if !declared {
        let _ = stalled.proc().signal("CONT");
        panic!(
            "hub never declared the stalled session dead\n{}",
            tunnel.logs()
        );
    }
    eprintln!("[stall] hub declared the session dead {took:?} after SIGSTOP");
    assert!(
        took <= DEAD_WITHIN,
        "session declared dead after {took:?} (heartbeat {HEARTBEAT:?})"
    );
    assert!(
        wait_until(Duration::from_secs(5), || agents_connected(
            &tunnel, "agent-a"
        ) == 0.0),
        "hub still counts the stalled agent"
    );

    // Exactly one client was on the stalled agent: it is reset, the other still echoes.
    let mut survivors = 0;
    for c in [&mut c1, &mut c2] {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = c.write_all(b"ping");
        let mut back = [0u8; 4];
        match c.read_exact(&mut back) {
            Ok(()) => {
                assert_eq!(&back, b"ping");
                survivors += 1;
            }
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                ),
                "client of the dead session: {e}"
            ),
        }
    }
    assert_eq!(survivors, 1, "expected exactly one surviving stream");

    // New streams all go to the live agent.
    let total_b = count_b.total.load(Ordering::SeqCst);
    for i in 0..5 {
        try_echo(tunnel.connector("echo"), format!("new {i}").as_bytes())
            .unwrap_or_else(|e| panic!("new stream {i} while agent-a is stalled: {e}"));
    }
    assert_eq!(count_b.total.load(Ordering::SeqCst), total_b + 5);
    assert_eq!(count_a.total.load(Ordering::SeqCst), 1);

    // SIGCONT: the stalled agent finds its session dead; the old stream's target connection
    // is closed, never carried on.
    stalled.proc().signal("CONT").expect("SIGCONT");
    assert!(
        wait_until(Duration::from_secs(10), || count_a
            .live
            .load(Ordering::SeqCst)
            == 0),
        "the dead session's target connection is still open after SIGCONT\n{}",
        stalled.log_tail()
    );
    stalled.wait_ready(READY);
    let sessions: Vec<String> = log_records(&tunnel.hub_log())
        .iter()
        .filter(|r| r["msg"] == "tunnel up" && r["agent_id"] == "agent-a")
        .filter_map(|r| r["session"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(sessions.len(), 2, "agent-a sessions: {sessions:?}");
    assert_ne!(sessions[0], sessions[1], "the dead session came back");
    assert_eq!(count_a.total.load(Ordering::SeqCst), 1);
}

/// A backend that dies mid-stream (its sockets reset): the client sees a reset; while it is
/// down clients are closed promptly; once it is back, new streams work.
#[test]
fn backend_dies_mid_stream() {
    let backend = KillableEcho::start(free_addr());
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[backend.addr])
        .health_check("500ms", "500ms")
        .start();
    let mut c = connect(tunnel.connector("echo"));
    for i in 0..10 {
        round_trip(&mut c, &pattern(10_000 + i));
    }
    // The client keeps sending while the backend dies. The echo server shuts down its write
    // half before its sockets are reset (FIN, then RST), and the tunnel forwards both in
    // order: the client may read EOF first; the reset must follow.
    let addr = backend.addr;
    backend.kill();
    let killed = Instant::now();
    let mut eof = false;
    let end: std::io::Result<()> = loop {
        if let Err(e) = c.write_all(&pattern(4096)) {
            break Err(e);
        }
        if eof {
            thread::sleep(Duration::from_millis(5));
        } else {
            let mut buf = [0u8; 65536];
            match c.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        }
        assert!(
            killed.elapsed() < IO_TIMEOUT,
            "client never saw the backend die (eof: {eof})"
        );
    };
    assert!(
        matches!(&end, Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "client after its backend died: expected a reset, got {end:?}\n{}",
        tunnel.logs()
    );
    eprintln!(
        "[backend] client reset {:?} after the backend died",
        killed.elapsed()
    );

    // Backend down: a new client is closed at once (reset or EOF), never left hanging.
    let t = Instant::now();
    let r = (|| -> std::io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&tunnel.connector("echo"), IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let _ = s.write_all(b"x");
        s.read(&mut [0u8; 1])
    })();
    assert!(
        matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client while the backend is down: {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );

    let _backend = KillableEcho::start(addr);
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(15), || {
        match try_echo(tunnel.connector("echo"), b"back again") {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(
        ok,
        "no stream after the backend returned ({last})\n{}",
        tunnel.logs()
    );
    let mut tunnel = tunnel;
    tunnel.assert_running();
}

/// An echo server that can die: [`KillableEcho::kill`] closes its listener and resets every
/// connection (SO_LINGER 0), as a crashing server's kernel does with unread data.
struct KillableEcho {
    addr: SocketAddr,
    dead: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl KillableEcho {
    fn start(addr: SocketAddr) -> KillableEcho {
        let listener = TcpListener::bind(addr).expect("bind killable echo");
        listener.set_nonblocking(true).expect("nonblocking");
        let dead = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let dead = dead.clone();
            let conns = conns.clone();
            thread::spawn(move || {
                while !dead.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            if let Ok(c) = s.try_clone() {
                                conns.lock().expect("lock").push(c);
                            }
                            thread::spawn(move || {
                                let mut r = match s.try_clone() {
                                    Ok(r) => r,
                                    Err(_) => return,
                                };
                                let mut w = s;
                                let _ = std::io::copy(&mut r, &mut w);
                                let _ = w.shutdown(Shutdown::Write);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        KillableEcho {
            addr,
            dead,
            conns,
            acceptor: Some(acceptor),
        }
    }

    fn kill(mut self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join(); // drops the listener
        }
        for c in self.conns.lock().expect("lock").drain(..) {
            let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
            let _ = c.shutdown(Shutdown::Read);
            drop(c);
        }
    }
}

impl Drop for KillableEcho {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Raises RLIMIT_NOFILE of this process (and so of the binaries it spawns, which raise their
/// soft limit to the hard one) to at least `want` if allowed (root may raise the hard limit);
/// returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let target = Rlimit {
        current: Some(want),
        maximum: Some(hard.max(want)),
    };
    if setrlimit(Resource::Nofile, target).is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: cur.maximum,
                maximum: cur.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A single-threaded epoll echo server (10 000 connections without 10 000 threads here: the
/// hub and agent already take one thread per stream each, and pid_max is often 32 768).
struct EpollEcho {
    addr: SocketAddr,
    live: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpollEcho {
    fn start() -> EpollEcho {
        use rustix::event::epoll;
        let listener = TcpListener::bind(free_addr()).expect("bind epoll echo");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let live = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l2, s2) = (live.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll_create");
            const LISTENER: u64 = u64::MAX;
            epoll::add(
                &ep,
                &listener,
                epoll::EventData::new_u64(LISTENER),
                epoll::EventFlags::IN,
            )
            .expect("epoll add listener");
            let mut conns: HashMap<u64, TcpStream> = HashMap::new();
            let mut next = 0u64;
            let mut events = Vec::with_capacity(1024);
            let mut buf = vec![0u8; 64 * 1024];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            while !s2.load(Ordering::SeqCst) {
                events.clear();
                if epoll::wait(
                    &ep,
                    rustix::buffer::spare_capacity(&mut events),
                    Some(&timeout),
                )
                .is_err()
                {
                    continue;
                }
                for ev in events.drain(..) {
                    let key = ev.data.u64();
                    if key == LISTENER {
                        while let Ok((s, _)) = listener.accept() {
                            let _ = s.set_nonblocking(true);
                            let _ = s.set_nodelay(true);
                            if epoll::add(
                                &ep,
                                &s,
                                epoll::EventData::new_u64(next),
                                epoll::EventFlags::IN,
                            )
                            .is_ok()
                            {
                                conns.insert(next, s);
                                l2.fetch_add(1, Ordering::SeqCst);
                                next += 1;
                            }
                        }
                        continue;
                    }
                    let Some(s) = conns.get_mut(&key) else {
                        continue;
                    };
                    let done = match s.read(&mut buf) {
                        Ok(0) => true,
                        Ok(n) => {
                            // Small echoes: a full send buffer is not expected; block briefly.
                            let _ = s.set_nonblocking(false);
                            let r = s.write_all(&buf[..n]);
                            let _ = s.set_nonblocking(true);
                            r.is_err()
                        }
                        Err(e) => e.kind() != ErrorKind::WouldBlock,
                    };
                    if done {
                        if let Some(s) = conns.remove(&key) {
                            let _ = epoll::delete(&ep, &s);
                            l2.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
        EpollEcho {
            addr,
            live,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpollEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Snapshot of a process's threads, RSS (KiB) and fds.
#[derive(Debug, Clone, Copy)]
struct Usage {
    threads: u64,
    rss_kib: u64,
    fds: u64,
}

fn usage(pid: u32) -> Usage {
    Usage {
        threads: thread_count(pid).expect("Threads"),
        rss_kib: vm_rss_kib(pid).expect("VmRSS"),
        fds: fd_count(pid).expect("fds"),
    }
}

/// 10 000 concurrent streams through one hub/agent pair (`NOWCONNECT_LOAD_STREAMS` overrides
/// the count): all open at once, each verified with its own echo, then closed. Afterwards the
/// hub's and the agent's thread and fd counts return to their baseline and their RSS to near
/// it (no per-stream leak).
#[test]
fn ten_thousand_concurrent_streams() {
    let want: usize = std::env::var("NOWCONNECT_LOAD_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // Per stream: here a client socket and the echo server's socket; in the hub and the agent
    // a socket and an eventfd each.
    let limit = raise_nofile(65_536);
    let n = want.min((limit.saturating_sub(200) / 2) as usize);
    if n < want {
        eprintln!("[load] RLIMIT_NOFILE {limit}: running {n} streams instead of {want}");
    }
    let echo = EpollEcho::start();
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo.addr])
        .hub_limit(&format!("max_streams_per_tunnel: {}", n.max(10_000)))
        .agent_limit(&format!("max_streams: {}", n.max(10_000)))
        .start();
    let (hub, agent) = (tunnel.hub_pid(), tunnel.agent_pid());
    let addr = tunnel.connector("echo");

    let cold = (usage(hub), usage(agent));
    // Round 1 warms up: allocator arenas, stack caches and the like reach their working size
    // (RSS does not drop back to a cold start's). Round 2 must then come back to round 1's level:
    // anything kept per stream would show as growth.
    let settled = |base: (Usage, Usage)| {
        let h = usage(hub);
        let a = usage(agent);
        h.threads <= base.0.threads && a.threads <= base.1.threads
    };
    let start = Instant::now();
    drop(open_all(addr, n, &tunnel));
    let warmed = wait_until(Duration::from_secs(90), || {
        settled(cold)
            && metric(&tunnel.hub_metrics(), "nowconnect_streams_active", &[]) == Some(0.0)
    });
    assert!(warmed, "round 1 did not close\n{}", tunnel.logs());
    let base = (usage(hub), usage(agent));
    eprintln!(
        "[load] round 1 ({n} streams) done in {:?}; cold hub {:?} agent {:?}; after round 1 hub \
         {:?} agent {:?}",
        start.elapsed(),
        cold.0,
        cold.1,
        base.0,
        base.1
    );

    let start = Instant::now();
    let conns = open_all(addr, n, &tunnel);
    let opened = start.elapsed();
    let peak = (usage(hub), usage(agent));
    eprintln!(
        "[load] {n} streams open and verified in {opened:?}; hub {:?} agent {:?}",
        peak.0, peak.1
    );
    let active = metric(&tunnel.hub_metrics(), "nowconnect_streams_active", &[]).unwrap_or(0.0);
    assert_eq!(active, n as f64, "hub streams_active while all are open");
    assert!(
        peak.0.threads >= base.0.threads + n as u64 && peak.1.threads >= base.1.threads + n as u64,
        "one thread per stream expected on each side: {peak:?}"
    );
    // Every stream still echoes with all of them open.
    verify_all(&conns, 1);
    let close_start = Instant::now();
    drop(conns);
    let drained = wait_until(Duration::from_secs(90), || {
        settled(base)
            && metric(&tunnel.hub_metrics(), "nowconnect_streams_active", &[]) == Some(0.0)
            && echo.live.load(Ordering::SeqCst) == 0
    });
    let after = (usage(hub), usage(agent));
    eprintln!(
        "[load] closed in {:?}; hub {:?} agent {:?}",
        close_start.elapsed(),
        after.0,
        after.1
    );
    assert!(
        drained,
        "threads/streams did not return to baseline: base {base:?} now {after:?}\n{}",
        tunnel.logs()
    );
    // fds back to baseline (a little slack for admin/metrics connections in flight).
    assert!(
        after.0.fds <= base.0.fds + 4 && after.1.fds <= base.1.fds + 4,
        "fd leak: base {base:?} now {after:?}"
    );
    // RSS back to round 1's level: no per-stream share of the peak stays behind.
    for (what, b, p, a) in [
        ("hub", base.0, peak.0, after.0),
        ("agent", base.1, peak.1, after.1),
    ] {
        let allowed = b.rss_kib + (p.rss_kib.saturating_sub(b.rss_kib)) / 5 + 8 * 1024;
        assert!(
            a.rss_kib <= allowed,
            "{what} RSS {} KiB after closing, baseline {} KiB, peak {} KiB (allowed {allowed})",
            a.rss_kib,
            b.rss_kib,
            p.rss_kib
        );
    }
    let mut tunnel = tunnel;
    tunnel.assert_running();
}

/// Opens `n` streams in batches, each verified with an echo of its own index.
fn open_all(addr: SocketAddr, n: usize, tunnel: &Tunnel) -> Vec<TcpStream> {
    const BATCH: usize = 250;
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let first = conns.len();
        let k = BATCH.min(n - first);
        for _ in 0..k {
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| {
                panic!("connect stream {}: {e}\n{}", conns.len(), tunnel.logs())
            });
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            conns.push(s);
        }
        for (i, s) in conns[first..].iter_mut().enumerate() {
            s.write_all(&((first + i) as u64).to_be_bytes())
                .expect("write id");
        }
        for (i, s) in conns[first..].iter_mut().enumerate() {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap_or_else(|e| {
                panic!("stream {} gave no echo: {e}\n{}", first + i, tunnel.logs())
            });
            assert_eq!(u64::from_be_bytes(b), (first + i) as u64, "crossed streams");
        }
    }
    conns
}

/// One more echo on every open stream (index + `round` · 2³²).
fn verify_all(conns: &[TcpStream], round: u64) {
    for chunk in conns.chunks(500).enumerate() {
        let (c, chunk) = chunk;
        for (i, mut s) in chunk.iter().enumerate() {
            let id = ((c * 500 + i) as u64) | (round << 32);
            s.write_all(&id.to_be_bytes()).expect("write id");
        }
        for (i, mut s) in chunk.iter().enumerate() {
            let id = ((c * 500 + i) as u64) | (round << 32);
            let mut b = [0u8; 8];
            s.read_exact(&mut b).expect("echo");
            assert_eq!(u64::from_be_bytes(b), id, "crossed streams");
        }
    }
}

/// A client socket bound to `source` (another loopback address), connected to `to`.
fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// The flood comes from its own address, as an attacker's would.
const FLOOD_SOURCE: [u8; 4] = [127, 0, 0, 2];

/// 200 slow-drip HTTP upgrades and 1 000 idle TCP connections on the hub's tunnel port, from
/// one address: the hub drops each by the handshake deadline (10 s) or at once when that
/// address's share of the handshake places is full (`handshakes_total{result="overloaded"}`),
/// and a real agent connecting meanwhile from another address gets its tunnel up at once,
/// without waiting for the flood's handshakes to time out.
#[test]
fn handshake_flood_is_dropped_and_a_real_agent_gets_in() {
    const SLOW: usize = 200;
    const IDLE: usize = 1_000;
    /// The hub's handshake deadline (hub/src/upgrade.rs, security.md "Hardening").
    const DEADLINE: Duration = Duration::from_secs(10);
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    let hub = tunnel.hub_listen;
    let t0 = Instant::now();
    let mut connect_errors = Vec::new();
    let mut open = |n: usize| -> Vec<(TcpStream, Instant)> {
        (0..n)
            .filter_map(|_| match connect_from(FLOOD_SOURCE, hub) {
                Ok(s) => Some((s, Instant::now())),
                // Over the handshake cap the hub resets at once, which may beat our connect
                // to noticing it succeeded: dropped, as it should be.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
                Err(e) => {
                    connect_errors.push(e.to_string());
                    None
                }
            })
            .collect()
    };
    let slow = open(SLOW);
    let idle = open(IDLE);
    assert!(
        connect_errors.is_empty(),
        "the flood could not connect: {} errors, first {:?}",
        connect_errors.len(),
        connect_errors.first()
    );
    // Slow drip: a request line, then one header byte every 300 ms, never finishing. The thread
    // records when the hub closed each one, and ends when all are closed or well past the
    // deadline.
    let limit = DEADLINE + Duration::from_secs(5);
    let dripper = {
        let mut conns: Vec<(TcpStream, Instant, Option<Instant>)> =
            slow.into_iter().map(|(s, t)| (s, t, None)).collect();
        thread::spawn(move || {
            for (s, _, closed) in conns.iter_mut() {
                let _ = s.set_nonblocking(true);
                if s.write_all(b"GET /v1/tunnel HTTP/1.1\r\nHost: hub\r\n")
                    .is_err()
                {
                    *closed = Some(Instant::now());
                }
            }
            let header = b"X-Slow-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut i = 0;
            while conns.iter().any(|c| c.2.is_none())
                && t0.elapsed() < limit + Duration::from_secs(2)
            {
                for (s, _, closed) in conns.iter_mut().filter(|c| c.2.is_none()) {
                    let mut b = [0u8; 256];
                    let gone = match s.read(&mut b) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != ErrorKind::WouldBlock,
                    } || matches!(
                        s.write(&header[i % header.len()..][..1]),
                        Err(e) if e.kind() != ErrorKind::WouldBlock
                    );
                    if gone {
                        *closed = Some(Instant::now());
                    }
                }
                i += 1;
                thread::sleep(Duration::from_millis(300));
            }
            conns
        })
    };

    // A real agent now: it must get in despite the flood.
    tunnel.start_agent();
    let took = tunnel.wait_ready_for(Duration::from_secs(40));
    eprintln!("[flood] real agent ready {took:?} into the flood");
    assert!(
        took < DEADLINE - Duration::from_secs(3),
        "the agent waited {took:?}: the flood held every handshake place"
    );
    round_trip(&mut connect(tunnel.connector("echo")), b"through the flood");

    // Every idle connection is closed by the hub by the deadline (plus slack).
    for (mut s, opened) in idle {
        let left = (opened + limit).saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .expect("timeout");
        let r = s.read(&mut [0u8; 16]);
        assert!(
            matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "idle connection still open {:?} after it connected: {r:?}",
            opened.elapsed()
        );
    }
    // Every slow drip too, however busily it drips.
    let slow = dripper.join().expect("dripper");
    let mut latest = Duration::ZERO;
    for (_, opened, closed) in &slow {
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "a slow-drip upgrade is still open after {:?}",
                opened.elapsed()
            )
        });
        latest = latest.max(closed.duration_since(*opened));
    }
    eprintln!("[flood] slowest slow-drip connection dropped after {latest:?}");
    assert!(latest <= limit, "a slow drip lasted {latest:?}");
    let overloaded = hub_metric(
        &tunnel,
        "nowconnect_tunnel_handshakes_total",
        &[("result", "overloaded")],
    );
    assert!(
        overloaded >= (IDLE / 2) as f64,
        "hub counted {overloaded} overloaded handshakes"
    );
    round_trip(&mut connect(tunnel.connector("echo")), b"after the flood");
    eprintln!("[flood] done in {:?}", t0.elapsed());
    tunnel.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Abuse: a rogue agent, a rogue hub
// ---------------------------------------------------------------------------------------------

/// RFC 6455 behaviour the hub's own frame reader must keep (it replaced tungstenite's): a
/// WebSocket ping, as a load balancer sends, is answered with its payload; a message split
/// into several frames, as an intermediary may re-fragment it, is one message; neither
/// disturbs the session, which still opens and carries a stream afterwards.
#[test]
fn websocket_pings_and_fragmented_messages_are_handled() {
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("rogue", &["127.0.0.1:9"])
        .without_agent()
        .start();
    let token = tunnel.valid_token("frag-agent");
    let mut p = RawPeer::connect_agent(tunnel.hub_listen, TUNNEL_PATH, &token)
        .unwrap_or_else(|e| panic!("upgrade: {e}"));
    p.hello(&rogue_hello("frag-agent", &["rogue"]))
        .unwrap_or_else(|e| panic!("HELLO: {e}"));

    p.send_ws_ping(b"lb-probe");
    // The protocol's own PING, in three WebSocket frames.
    p.send_fragmented(&[Frame::Ping { opaque: 0xF7A6 }], 3);
    let pong = p.expect_frame(IO_TIMEOUT, |f| match f {
        Frame::Pong { opaque } => Some(*opaque),
        _ => None,
    });
    assert_eq!(
        pong,
        Ok(0xF7A6),
        "fragmented PING not answered\n{}",
        tunnel.logs()
    );
    assert_eq!(
        p.ws_pongs,
        [b"lb-probe".to_vec()],
        "WebSocket ping not answered"
    );

    // Still a working session: a client's stream opens over it and carries bytes.
    let mut client = connect(tunnel.connector("rogue"));
    let cid = expect_open(&mut p);
    p.send_fragmented(
        &[
            Frame::OpenOk { cid, backend: "" },
            Frame::Data {
                cid,
                seq: 0,
                payload: b"in pieces",
            },
        ],
        4,
    );
    let mut back = [0u8; 9];
    client
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    client.read_exact(&mut back).expect("stream data");
    assert_eq!(&back, b"in pieces");
    assert!(!p.is_closed(), "the hub closed the session");
    let log = tunnel.hub_log();
    assert!(!log.contains("protocol error"), "{log}");
}

fn rogue_hello(agent_id: &str, connectors: &[&str]) -> Hello {
    Hello {
        agent_id: agent_id.into(),
        connectors: connectors.iter().map(|c| c.to_string()).collect(),
        ver: 1,
        software: "rogue/0".into(),
        window: 262_144,
        max_streams: 1000,
    }
}

/// The next OPEN's cid.
fn expect_open(peer: &mut RawPeer) -> u32 {
    peer.expect_frame(IO_TIMEOUT, |f| match f {
        Frame::Open { cid, .. } => Some(*cid),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("no OPEN: {e:?}"))
}

/// The next RST on `cid`: its code.
fn expect_rst(peer: &mut RawPeer, want_cid: u32) -> u16 {
    peer.expect_frame(IO_TIMEOUT, |f| match f {
        Frame::Rst { cid, code, .. } if *cid == want_cid => Some(*code),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("no RST on cid {want_cid}: {e:?}"))
}

/// The session is alive: a PING is answered with its PONG.
fn assert_alive(peer: &mut RawPeer, opaque: u64) {
    peer.send_frames(&[Frame::Ping { opaque }]);
    let got = peer.expect_frame(IO_TIMEOUT, |f| match f {
        Frame::Pong { opaque: o } if *o == opaque => Some(()),
        _ => None,
    });
    assert!(
        got.is_ok(),
        "session not alive after a stream error: {got:?}"
    );
}

fn client_is_reset(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
    }
}

/// A rogue agent with a valid token misbehaves in every way wire-protocol.md §10 lists; each
/// session error ends its session with 4400 (counted in `nowconnect_protocol_errors_total`),
/// each stream error resets only that stream (RST with the right code; the session answers
/// PINGs after), and a well-behaved agent on the same hub carries traffic throughout without
/// a single error.
#[test]
fn rogue_agent_is_closed_and_a_good_agent_is_undisturbed() {
    let echo = echo_server();
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo])
        .connector("rogue", &["127.0.0.1:9"])
        .without_agent()
        .start();
    let mut good = tunnel.extra_agent("good-agent", &[("echo", &[echo.to_string()])], "");
    good.wait_ready(READY);

    // Traffic through the good agent all along: one long stream plus fresh ones.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let addr = tunnel.connector("echo");
        thread::spawn(move || -> (usize, Vec<String>) {
            let mut errors = Vec::new();
            let mut ok = 0;
            let mut long = connect(addr);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let msg = format!("round {i}");
                long.write_all(msg.as_bytes()).expect("write");
                let mut back = vec![0u8; msg.len()];
                match long.read_exact(&mut back) {
                    Ok(()) if back == msg.as_bytes() => ok += 1,
                    other => errors.push(format!("long stream round {i}: {other:?}")),
                }
                if i % 5 == 0 {
                    match try_echo(addr, msg.as_bytes()) {
                        Ok(()) => ok += 1,
                        Err(e) => errors.push(format!("fresh stream {i}: {e}")),
                    }
                }
                i += 1;
                thread::sleep(Duration::from_millis(5));
            }
            (ok, errors)
        })
    };

    let hub = tunnel.hub_listen;
    let token = tunnel.valid_token("rogue-agent");
    let rogue_addr = tunnel.connector("rogue");
    let session = || {
        let mut p = RawPeer::connect_agent(hub, TUNNEL_PATH, &token)
            .unwrap_or_else(|e| panic!("rogue upgrade: {e}"));
        let ack = p
            .hello(&rogue_hello("rogue-agent", &["rogue"]))
            .unwrap_or_else(|e| panic!("rogue HELLO: {e}"));
        assert_eq!(ack.accepted, vec!["rogue".to_string()]);
        (p, ack)
    };
    // A client on the rogue connector and the OPEN the hub sends for it, answered OK.
    let opened = |p: &mut RawPeer| -> (TcpStream, u32) {
        let c = connect(rogue_addr);
        let cid = expect_open(p);
        p.send_frames(&[Frame::OpenOk { cid, backend: "" }]);
        (c, cid)
    };
    let errors_before = hub_metric(
        &tunnel,
        "nowconnect_protocol_errors_total",
        &[("kind", "protocol_error")],
    );
    let stream_errors = |tunnel: &Tunnel| {
        let m = tunnel.hub_metrics();
        (
            metric(
                &m,
                "nowconnect_protocol_errors_total",
                &[("kind", "flow_control")],
            )
            .unwrap_or(0.0),
            metric(
                &m,
                "nowconnect_protocol_errors_total",
                &[("kind", "stream_protocol_error")],
            )
            .unwrap_or(0.0),
        )
    };
    let stream_errors_before = stream_errors(&tunnel);
    let mut session_errors = 0;
    let mut closed_4400 = |what: &str, p: &mut RawPeer| {
        let end = p.expect_close(IO_TIMEOUT);
        assert!(
            matches!(&end, Ok((4400, _))),
            "{what}: expected close 4400, got {end:?}\n{}",
            tunnel.hub_log()
        );
        eprintln!("[rogue agent] {what}: closed {end:?}");
        session_errors += 1;
    };

    // Session errors (close 4400).
    let (mut p, _) = session();
    p.send_raw(vec![0x7F, 0, 0, 0, 0, 0, 0, 0, 0]);
    closed_4400("unknown frame type", &mut p);

    let (mut p, _) = session();
    let clients: Vec<TcpStream> = (0..20).map(|_| connect(rogue_addr)).collect();
    let _ = expect_open(&mut p);
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    p.send_raw(garbage);
    closed_4400("OPEN flood answered with garbage", &mut p);
    for mut c in clients {
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let r = c.read(&mut [0u8; 1]);
        assert!(
            matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "client of the rogue session: {r:?}"
        );
    }

    let (mut p, _) = session();
    p.send_frames(&[Frame::Open {
        cid: 1,
        connector: "echo",
        peer: "1.2.3.4:5",
    }]);
    closed_4400("OPEN sent by an agent (wrong direction)", &mut p);

    let (mut p, _) = session();
    p.send_raw(vec![0u8; 1024 * 1024 + 1]);
    closed_4400("message over max_message", &mut p);

    let (mut p, _) = session();
    p.send_text("hello?");
    closed_4400("text message", &mut p);

    let (mut p, _) = session();
    p.send_raw(vec![0x05, 0, 0, 0, 1, 0, 0, 0, 10, 0, 0]);
    closed_4400("partial frame", &mut p);

    let (mut p, _) = session();
    p.send_frames(&[Frame::Data {
        cid: 1000,
        seq: 0,
        payload: b"x",
    }]);
    closed_4400("DATA for a cid above the highest opened", &mut p);

    // Stream errors: RST on that stream, the session lives on.
    let (mut p, ack) = session();
    let (mut c, cid) = opened(&mut p);
    p.send_frames(&[Frame::Window {
        cid,
        increment: 0x7FFF_FFFF,
    }]);
    assert_eq!(
        expect_rst(&mut p, cid),
        2,
        "WINDOW overflow: FLOW_CONTROL_ERROR"
    );
    assert!(client_is_reset(&mut c), "client of the overflowed stream");
    assert_alive(&mut p, 1);

    let (mut c, cid) = opened(&mut p);
    let chunk = vec![7u8; 65536];
    let frames: Vec<Frame<'_>> = (0..(ack.window as usize / chunk.len() + 1) as u32)
        .map(|seq| Frame::Data {
            cid,
            seq,
            payload: &chunk,
        })
        .collect();
    p.send_frames(&frames);
    assert_eq!(
        expect_rst(&mut p, cid),
        2,
        "DATA beyond credit: FLOW_CONTROL_ERROR"
    );
    assert!(client_is_reset(&mut c), "client of the over-credit stream");
    assert_alive(&mut p, 2);

    let (mut c, cid) = opened(&mut p);
    p.send_frames(&[
        Frame::Data {
            cid,
            seq: 0,
            payload: b"a",
        },
        Frame::Data {
            cid,
            seq: 2,
            payload: b"b",
        },
    ]);
    assert_eq!(expect_rst(&mut p, cid), 1, "seq gap: PROTOCOL_ERROR");
    assert!(client_is_reset(&mut c), "client of the seq-gap stream");
    assert_alive(&mut p, 3);
    p.close(1000, "done");

    let counted = wait_until(Duration::from_secs(5), || {
        hub_metric(
            &tunnel,
            "nowconnect_protocol_errors_total",
            &[("kind", "protocol_error")],
        ) >= errors_before + session_errors as f64
    });
    let metrics = tunnel.hub_metrics();
    assert!(
        counted,
        "expected {session_errors} protocol errors counted\n{metrics}"
    );
    // The stream errors are counted too: two FLOW_CONTROL_ERROR, one PROTOCOL_ERROR.
    let (flow, proto) = stream_errors(&tunnel);
    assert_eq!(
        (
            flow - stream_errors_before.0,
            proto - stream_errors_before.1
        ),
        (2.0, 1.0),
        "stream-level protocol errors counted (flow_control, stream_protocol_error)\n{metrics}"
    );

    stop.store(true, Ordering::SeqCst);
    let (ok, errors) = traffic.join().expect("traffic thread");
    eprintln!("[rogue agent] good agent carried {ok} round trips meanwhile");
    assert!(errors.is_empty(), "the good agent saw errors: {errors:?}");
    assert!(ok >= 3, "too little traffic to prove anything ({ok})");
    let glog = good.log();
    assert!(
        !glog.contains("tunnel down") && !glog.contains("stream reset"),
        "the good agent was disturbed\n{glog}"
    );
    assert_eq!(agents_connected(&tunnel, "good-agent"), 1.0);
    // No hub thread panicked on any of it (the oversized message included).
    let hlog = tunnel.hub_log();
    assert!(!hlog.contains("panicked"), "{hlog}");
    let mut tunnel = tunnel;
    tunnel.assert_running();
}

/// A hub that misbehaves toward a real agent: OPEN for connectors the agent does not have
/// (refused with UNKNOWN_CONNECTOR, nothing dialed), a WINDOW overflowing credit and DATA
/// beyond credit (stream RST FLOW_CONTROL_ERROR), bad frames, garbage before HELLO_ACK, DATA
/// for a never-opened cid, a huge initial window. The agent closes the bad sessions with
/// 4400, stays up, reconnects every time, and never connects anywhere but its one target.
#[test]
fn rogue_hub_cannot_steer_or_crash_the_agent() {
    let (target, counts) = echo_counting();
    // Something listening that the agent is not configured for: it must never be dialed.
    let decoy = TcpListener::bind(free_addr()).expect("bind decoy");
    let decoy_addr = decoy.local_addr().expect("decoy addr");
    decoy.set_nonblocking(true).expect("nonblocking");
    let mut hub = RogueHub::bind(TUNNEL_PATH);
    let dir = temp_dir("rogue-hub");
    let admin = free_addr();
    let config = dir.path().join("agent.yaml");
    write_file(
        &config,
        format!(
            "agent_id: agent-1\nhub:\n  url: {}\ntoken:\n  file: token.jwt\nadmin:\n  listen: {admin}\n\
             reconnect:\n  initial: 100ms\n  max: 500ms\nconnectors:\n  - name: echo\n    \
             targets: [\"{target}\"]\nlimits:\n  shutdown_grace: 1s\n",
            hub.url
        ),
        0o644,
    );
    // The rogue hub accepts anything; the agent only wants a well-formed, unexpired JWT.
    let token = JwtKeys::generate().es256.sign(&JwtKeys::agent_claims(
        "https://idp.test/",
        "nowconnect-hub",
        "agent-1",
        3600,
    ));
    write_file(&dir.path().join("token.jwt"), token, 0o600);
    let mut cmd = std::process::Command::new(bin_path("nowconnect-agent"));
    cmd.arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env("NOWCONNECT_LOG", "info")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    let mut agent = Proc::spawn("agent", cmd, dir.path());
    let echo = vec!["echo".to_string()];
    let accept = |hub: &mut RogueHub| {
        let mut p = hub
            .accept(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("agent did not (re)connect: {e}"));
        let hello = read_hello(&mut p, IO_TIMEOUT).unwrap_or_else(|e| panic!("no HELLO: {e:?}"));
        assert_eq!(hello.agent_id, "agent-1");
        assert_eq!(hello.connectors, echo);
        p
    };

    // Session 1: steering attempts, credit overflows, then a bad frame.
    let mut p = accept(&mut hub);
    p.send_frames(&[Frame::HelloAck(hello_ack(&echo, 262_144, 20_000))]);
    for (cid, connector) in [(1, "decoy"), (2, "127.0.0.1"), (3, "ldap")] {
        p.send_frames(&[Frame::Open {
            cid,
            connector,
            peer: "203.0.113.9:4444",
        }]);
        assert_eq!(
            expect_rst(&mut p, cid),
            5,
            "OPEN for {connector:?}: UNKNOWN_CONNECTOR"
        );
    }
    p.send_frames(&[
        Frame::Open {
            cid: 4,
            connector: "echo",
            peer: "203.0.113.9:4444",
        },
        Frame::Data {
            cid: 4,
            seq: 0,
            payload: b"hello target",
        },
    ]);
    let echoed = p
        .expect_frame(IO_TIMEOUT, |f| match f {
            Frame::Data {
                cid: 4, payload, ..
            } => Some(payload.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no echo through the agent: {e:?}"));
    assert_eq!(echoed, b"hello target");
    p.send_frames(&[Frame::Window {
        cid: 4,
        increment: 0x7FFF_FFFF,
    }]);
    assert_eq!(
        expect_rst(&mut p, 4),
        2,
        "WINDOW overflow: FLOW_CONTROL_ERROR"
    );
    assert_alive(&mut p, 11);
    // DATA beyond the agent's window on a fresh stream.
    p.send_frames(&[Frame::Open {
        cid: 5,
        connector: "echo",
        peer: "203.0.113.9:4444",
    }]);
    let chunk = vec![1u8; 65536];
    let frames: Vec<Frame<'_>> = (0..5)
        .map(|seq| Frame::Data {
            cid: 5,
            seq,
            payload: &chunk,
        })
        .collect();
    p.send_frames(&frames);
    assert_eq!(
        expect_rst(&mut p, 5),
        2,
        "DATA beyond credit: FLOW_CONTROL_ERROR"
    );
    assert_alive(&mut p, 12);
    p.send_raw(vec![0x7F, 0, 0, 0, 0, 0, 0, 0, 0]);
    let end = p.expect_close(IO_TIMEOUT);
    assert!(matches!(end, Ok((4400, _))), "bad frame: {end:?}");

    // Session 2: garbage instead of HELLO_ACK.
    let mut p = accept(&mut hub);
    p.send_raw(b"GARBAGE GARBAGE GARBAGE".to_vec());
    let end = p.expect_close(IO_TIMEOUT);
    assert!(
        matches!(end, Ok((4400, _))),
        "garbage before HELLO_ACK: {end:?}"
    );

    // Session 3: DATA for a stream never opened.
    let mut p = accept(&mut hub);
    p.send_frames(&[Frame::HelloAck(hello_ack(&echo, 262_144, 20_000))]);
    p.send_frames(&[Frame::Data {
        cid: 77,
        seq: 0,
        payload: b"x",
    }]);
    let end = p.expect_close(IO_TIMEOUT);
    assert!(matches!(end, Ok((4400, _))), "DATA for cid 77: {end:?}");

    // Session 4: a huge initial window; the agent must not fall over, and a stream still works
    // (or the session is refused with 4400).
    let mut p = accept(&mut hub);
    p.send_frames(&[Frame::HelloAck(hello_ack(&echo, u32::MAX, 20_000))]);
    p.send_frames(&[
        Frame::Open {
            cid: 1,
            connector: "echo",
            peer: "203.0.113.9:4444",
        },
        Frame::Data {
            cid: 1,
            seq: 0,
            payload: b"big window",
        },
    ]);
    match p.expect_frame(IO_TIMEOUT, |f| match f {
        Frame::Data {
            cid: 1, payload, ..
        } => Some(payload.to_vec()),
        _ => None,
    }) {
        Ok(b) => {
            assert_eq!(b, b"big window");
            eprintln!("[rogue hub] huge initial window: stream works");
        }
        Err(Received::Closed(4400, r)) => eprintln!("[rogue hub] huge initial window: 4400 {r}"),
        Err(e) => panic!("huge window: {e:?}"),
    }

    // Session 5: a message over max_message (4400, not 1009), then the agent still reconnects.
    let mut p = accept(&mut hub);
    p.send_frames(&[Frame::HelloAck(hello_ack(&echo, 262_144, 20_000))]);
    p.send_raw(vec![0u8; 1024 * 1024 + 1]);
    let end = p.expect_close(IO_TIMEOUT);
    assert!(matches!(end, Ok((4400, _))), "oversized message: {end:?}");
    let mut p = accept(&mut hub);
    p.send_frames(&[Frame::HelloAck(hello_ack(&echo, 262_144, 20_000))]);
    assert_alive(&mut p, 13);

    // No thread of the agent panicked on any of the above (the close after an oversized
    // message used to read the WebSocket again and trip a tungstenite debug assertion).
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(agent.is_running(), "agent died\n{}", agent.log_tail());
    assert!(matches!(http_get(admin, "/healthz"), Ok((200, _))));
    assert!(hub.accepted >= 6);
    // Only the configured target was dialed for streams, and only for the echo streams (cid 4
    // of session 1; cid 5 may be reset before or after its connect; cid 1 of session 4 if the
    // huge window was accepted).
    let total = counts.total.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&total),
        "target saw {total} data connections"
    );
    assert!(
        matches!(decoy.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the agent dialed an address not in its config ({decoy_addr})"
    );
}
