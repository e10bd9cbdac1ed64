//! End to end: the real `nowconnect-hub` and `nowconnect-agent` binaries, as processes, carrying
//! real protocols over `ws://` and `wss://` (see [`nowconnect_tests::tunnel::Tunnel`]).
//!
//! One test binary on purpose (link time). Tests that make sense on both transports are written
//! once as `fn name(Transport)` and instantiated by `over_both!` as `name::ws` / `name::wss`.

use nowconnect_tests::echo_server;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nowconnect_tests::tunnel::{
    http_get, metric, vm_rss_kib, Transport, Tunnel, AGENT_ID, AUDIENCE, ISSUER, TUNNEL_PATH,
};
use nowconnect_tests::*;
use serde_json::json;

/// `mod name { #[test] fn ws(); #[test] fn wss(); }` for each `fn name(Transport)`.
macro_rules! over_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ws() {
                super::$name(super::Transport::Ws)
            }
            #[test]
            fn wss() {
                super::$name(super::Transport::Wss)
            }
        }
    )*};
}

over_both!(
    ldap,
    ssh,
    postgres,
    half_close,
    reset,
    backpressure,
    reconnect
);

const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Test servers (targets behind the agent)
// ---------------------------------------------------------------------------------------------

/// A loopback server handling each connection on its own thread with `handler`. The agent's
/// health checks connect and close without sending, so handlers must shrug off empty
/// connections. The listener thread lives until the test process ends.
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

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

/// Deterministic payload: byte `i` is `i % 251`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// One echo round trip of `msg` on `s`; returns its duration.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    s.write_all(msg).expect("echo write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo read");
    assert_eq!(back, msg, "echo answered other bytes");
    start.elapsed()
}

fn sha256(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    let out = run_cmd(cmd, None, CMD_TIMEOUT).assert_success();
    out.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Real protocols
// ---------------------------------------------------------------------------------------------

/// slapd behind the agent: ldapsearch over ldap:// and over ldaps://, the latter verifying
/// slapd's own certificate (not the hub's) through the tunnel: TLS stays end to end.
fn ldap(t: Transport) {
    let dir = temp_dir("e2e-ldap");
    let slapd_tls = TlsFiles::localhost(dir.path());
    let slapd = Slapd::start(dir.path(), Some(&slapd_tls));
    let tunnel = Tunnel::builder(t)
        .connector("ldap", &[slapd.ldap])
        .connector("ldaps", &[slapd.ldaps.expect("ldaps on")])
        .start();

    let url = format!("ldap://127.0.0.1:{}", tunnel.connector("ldap").port());
    let out = ldapsearch(&url, None, "(uid=alice)").assert_success();
    assert!(
        out.stdout
            .contains("dn: uid=alice,ou=people,dc=example,dc=com"),
        "{out}"
    );
    assert!(out.stdout.contains("mail: alice@example.com"), "{out}");

    // The connector listens on 127.0.0.1, which slapd's certificate carries as an IP SAN.
    let url = format!("ldaps://127.0.0.1:{}", tunnel.connector("ldaps").port());
    let out = ldapsearch(&url, Some(&slapd_tls.ca), "(cn=engineers)").assert_success();
    assert!(
        out.stdout
            .contains("member: uid=bob,ou=people,dc=example,dc=com"),
        "{out}"
    );
    // The hub's CA (wss) or no CA does not verify slapd's certificate: nothing terminates TLS
    // in between.
    let other = dir.path().join("other-ca.pem");
    TestCa::new("Other CA").write_cert(&other);
    ldapsearch(&url, Some(&other), "(uid=alice)").assert_failure();
}

/// sshd behind the agent: a command, and a 50 MiB random file copied up and back (sha256).
fn ssh(t: Transport) {
    let dir = temp_dir("e2e-ssh");
    let sshd = Sshd::start(dir.path());
    let tunnel = Tunnel::builder(t).connector("ssh", &[sshd.addr]).start();
    let addr = tunnel.connector("ssh");

    let out = sshd.ssh(addr, "echo hi").assert_success();
    assert_eq!(out.stdout.trim(), "hi", "{out}");

    let local = dir.path().join("random.bin");
    let mut random = Vec::with_capacity(50 << 20);
    std::fs::File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .take(50 << 20)
        .read_to_end(&mut random)
        .expect("read /dev/urandom");
    std::fs::write(&local, &random).expect("write random file");
    drop(random);
    let remote = dir.path().join("uploaded.bin");
    let back = dir.path().join("downloaded.bin");
    let up = sshd.scp_to(addr, &local, &remote).assert_success();
    let down = sshd.scp_from(addr, &remote, &back).assert_success();
    eprintln!(
        "[ssh {t:?}] scp 50 MiB up {:?}, down {:?}",
        up.elapsed, down.elapsed
    );
    let want = sha256(&local);
    assert_eq!(sha256(&remote), want, "upload corrupted");
    assert_eq!(sha256(&back), want, "download corrupted");
}

/// PostgreSQL behind the agent: psql `select 1`.
fn postgres(t: Transport) {
    let dir = temp_dir("e2e-pg");
    let pg = Postgres::start(dir.path());
    let tunnel = Tunnel::builder(t).connector("pg", &[pg.addr]).start();
    let out = psql(tunnel.connector("pg"), "select 1").assert_success();
    assert_eq!(out.stdout.trim(), "1", "{out}");
}

// ---------------------------------------------------------------------------------------------
// Stream semantics: half-close, reset, backpressure
// ---------------------------------------------------------------------------------------------

/// FIN in both directions (wire-protocol.md §4 "Half-close and reset"):
/// - client → target: the client writes, shuts down its write half and still gets the whole
///   answer, which the target only sends after reading EOF;
/// - target → client: the target sends, shuts down its write half; the client sees EOF and can
///   still send, and the target receives all of it.
fn half_close(t: Transport) {
    const REQUEST: usize = 300_000;
    const ANSWER: usize = 700_000;
    // Reads to EOF, then answers "<n>\n" + ANSWER bytes of pattern.
    let read_then_answer = serve(|mut s| {
        let mut got = Vec::new();
        if s.read_to_end(&mut got).is_err() || got.is_empty() {
            return;
        }
        let _ = s.write_all(format!("{}\n", got.len()).as_bytes());
        let _ = s.write_all(&pattern(ANSWER));
    });
    // Sends a greeting, shuts down its write half, then reports everything it still receives.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let send_then_read = serve(move |mut s| {
        let _ = s.write_all(b"greeting, and that is all from me\n");
        let _ = s.shutdown(Shutdown::Write);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        if !got.is_empty() {
            let _ = tx.lock().expect("lock").send(got);
        }
    });
    let tunnel = Tunnel::builder(t)
        .connector("rta", &[read_then_answer])
        .connector("str", &[send_then_read])
        .start();

    // Client half-closes first.
    let mut c = connect(tunnel.connector("rta"));
    c.write_all(&pattern(REQUEST)).expect("write request");
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("read answer: {e}\n{}", tunnel.logs()));
    let head = format!("{REQUEST}\n");
    assert!(
        answer.starts_with(head.as_bytes()),
        "target saw a different request length: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(40)])
    );
    assert_eq!(answer.len(), head.len() + ANSWER, "answer truncated");
    assert!(
        answer[head.len()..] == pattern(ANSWER)[..],
        "answer corrupted"
    );

    // Target half-closes first.
    let mut c = connect(tunnel.connector("str"));
    let mut greeting = Vec::new();
    c.read_to_end(&mut greeting)
        .unwrap_or_else(|e| panic!("read greeting: {e}\n{}", tunnel.logs()));
    assert_eq!(greeting, b"greeting, and that is all from me\n");
    let late = pattern(200_000);
    for chunk in late.chunks(10_000) {
        c.write_all(chunk).expect("client still writes after EOF");
    }
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let got = rx
        .recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("target got nothing after its FIN: {e}\n{}", tunnel.logs()));
    assert_eq!(got.len(), late.len(), "target got a different amount");
    assert!(got == late, "target got corrupted bytes");
}

/// Aborts both ways (wire-protocol.md §4): a target's TCP reset reaches the client as
/// ECONNRESET, and a client's reset reaches the target as ECONNRESET, not as a clean EOF.
fn reset(t: Transport) {
    // Reads one byte, then closes with SO_LINGER 0 (RST).
    let resetting = serve(|mut s| {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            abort(s);
        }
    });
    // Reads one byte, says so, then reports how its next read ends.
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (res_tx, res_rx) = mpsc::channel::<std::io::Result<usize>>();
    let chans = std::sync::Mutex::new((ready_tx, res_tx));
    let watching = serve(move |mut s| {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_err() {
            return;
        }
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let _ = chans.lock().expect("lock").0.send(());
        let mut buf = [0u8; 1024];
        let res = s.read(&mut buf);
        let _ = chans.lock().expect("lock").1.send(res);
    });
    let tunnel = Tunnel::builder(t)
        .connector("target_resets", &[resetting])
        .connector("client_resets", &[watching])
        .start();

    // Target resets → client read fails with ECONNRESET.
    let mut c = connect(tunnel.connector("target_resets"));
    c.write_all(b"x").expect("write");
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "client expected ECONNRESET after the target's reset, got {other:?}\n{}",
            tunnel.logs()
        ),
    }

    // Client resets → target read fails with ECONNRESET.
    let mut c = connect(tunnel.connector("client_resets"));
    c.write_all(b"x").expect("write");
    ready_rx
        .recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("target never got the byte: {e}\n{}", tunnel.logs()));
    abort(c);
    match res_rx.recv_timeout(IO_TIMEOUT) {
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "target expected ECONNRESET after the client's reset, got {other:?}\n{}",
            tunnel.logs()
        ),
    }
}

/// Closes `s` with SO_LINGER 0, which sends a TCP RST instead of a FIN.
fn abort(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(s);
}

/// A target sending 1 GiB to a client that stops reading stalls only its own stream
/// (wire-protocol.md §4 "Flow control"): the hub's and agent's RSS stay bounded, the target
/// blocks after a bounded amount, and a second stream's small round trips keep a normal latency.
/// Then the client reads on and gets every byte, in order, and EOF.
///
/// `NOWCONNECT_BP_MIB` overrides the size (default 1024).
fn backpressure(t: Transport) {
    let total: u64 = std::env::var("NOWCONNECT_BP_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        << 20;
    // 251 × 256: every chunk starts the pattern afresh, so byte i of the stream is i % 251.
    const CHUNK: usize = 251 * 256;
    let written = Arc::new(AtomicU64::new(0));
    let bulk = {
        let written = written.clone();
        serve(move |mut s| {
            let mut go = [0u8; 1];
            if s.read_exact(&mut go).is_err() {
                return;
            }
            let chunk = pattern(CHUNK);
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(CHUNK as u64) as usize;
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
                sent += n as u64;
                written.store(sent, Ordering::SeqCst);
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    };
    let echo = echo_server();
    let tunnel = Tunnel::builder(t)
        .connector("bulk", &[bulk])
        .connector("echo", &[echo])
        .start();
    let rss = || {
        (
            vm_rss_kib(tunnel.hub_pid()).expect("hub VmRSS"),
            vm_rss_kib(tunnel.agent_pid()).expect("agent VmRSS"),
        )
    };
    let mut e = connect(tunnel.connector("echo"));
    round_trip(&mut e, b"warm-up");
    let (hub0, agent0) = rss();

    let mut c = connect(tunnel.connector("bulk"));
    c.write_all(b"g").expect("write go");
    let mut first = vec![0u8; 1 << 20];
    c.read_exact(&mut first).expect("read the first MiB");
    assert!(first == pattern(1 << 20), "first MiB corrupted");

    // Stop reading; wait until the target is blocked (its count stops moving).
    let stall_start = Instant::now();
    let mut last = written.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        assert!(
            stall_start.elapsed() < Duration::from_secs(20),
            "target never blocked: {now} bytes written"
        );
        last = now;
    }
    let stalled_at = written.load(Ordering::SeqCst);
    let in_pipe = stalled_at - (1 << 20);
    // Window(s) plus kernel socket buffers on three sockets: a few MiB, far from `total`.
    assert!(
        in_pipe < 96 << 20,
        "{} MiB in flight to a client that does not read: no backpressure",
        in_pipe >> 20
    );

    // The tunnel still carries other streams at interactive latency.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let rt = round_trip(&mut e, format!("ping {i:03} ").repeat(8).as_bytes());
        worst = worst.max(rt);
    }
    let (hub1, agent1) = rss();
    eprintln!(
        "[backpressure {t:?}] target blocked after {} KiB; hub RSS {hub0}→{hub1} KiB, agent \
         {agent0}→{agent1} KiB; worst echo round trip {worst:?}",
        stalled_at >> 10
    );
    assert!(
        worst < Duration::from_millis(200),
        "echo round trip {worst:?} while another stream is stalled"
    );
    let limit = 64 << 10; // KiB
    assert!(
        hub1.saturating_sub(hub0) < limit && agent1.saturating_sub(agent0) < limit,
        "RSS grew while a stream was stalled: hub {hub0}→{hub1} KiB, agent {agent0}→{agent1} KiB"
    );
    assert_eq!(
        written.load(Ordering::SeqCst),
        stalled_at,
        "target kept writing"
    );

    // Read on: everything arrives, in order, then EOF; memory stays bounded meanwhile.
    let drain_start = Instant::now();
    let mut offset: u64 = 1 << 20;
    let mut buf = vec![0u8; 1 << 20];
    let mut peak = (hub1, agent1);
    let mut next_sample = offset + (64 << 20);
    loop {
        let n = c
            .read(&mut buf)
            .unwrap_or_else(|err| panic!("read at {offset}: {err}\n{}", tunnel.logs()));
        if n == 0 {
            break;
        }
        // Spot-check the pattern (a full compare of 1 GiB in a debug build costs seconds).
        for i in [0, n / 2, n - 1] {
            let want = ((offset + i as u64) % 251) as u8;
            assert_eq!(buf[i], want, "byte {} corrupted", offset + i as u64);
        }
        offset += n as u64;
        if offset >= next_sample {
            let (h, a) = rss();
            peak = (peak.0.max(h), peak.1.max(a));
            next_sample += 64 << 20;
        }
    }
    let secs = drain_start.elapsed().as_secs_f64();
    eprintln!(
        "[backpressure {t:?}] drained {} MiB in {secs:.1}s ({:.0} MiB/s); peak RSS hub {} KiB, \
         agent {} KiB",
        (offset - (1 << 20)) >> 20,
        (offset - (1 << 20)) as f64 / (1 << 20) as f64 / secs,
        peak.0,
        peak.1
    );
    assert_eq!(offset, total, "stream ended early");
    assert!(
        peak.0.saturating_sub(hub0) < limit && peak.1.saturating_sub(agent0) < limit,
        "RSS grew during the transfer: hub {hub0}→{} KiB, agent {agent0}→{} KiB",
        peak.0,
        peak.1
    );
    round_trip(&mut e, b"still fine");
}

// ---------------------------------------------------------------------------------------------
// Resilience
// ---------------------------------------------------------------------------------------------

/// The hub dies (SIGKILL) and comes back on the same port: the agent reconnects within its
/// backoff bound (`reconnect.max` 2s) and streams work again.
fn reconnect(t: Transport) {
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(t)
        .reconnect("100ms", "2s")
        .connector("echo", &[echo])
        .start();
    let addr = tunnel.connector("echo");
    round_trip(&mut connect(addr), b"before");

    tunnel.kill_hub();
    // Let the agent notice and back off a few times.
    std::thread::sleep(Duration::from_millis(1500));
    let agent = tunnel.agent();
    assert!(
        agent.is_running(),
        "agent exited while the hub was down\n{}",
        agent.log_tail()
    );
    tunnel.start_hub();
    let back = Instant::now();
    let mut last_err = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let attempt = || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"after")?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b)?;
            if &b != b"after" {
                return Err(std::io::Error::other("wrong echo"));
            }
            Ok(())
        };
        match attempt() {
            Ok(()) => true,
            Err(e) => {
                last_err = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        }
    });
    let took = back.elapsed();
    assert!(
        ok,
        "no stream through the restarted hub after 10s ({last_err})\n{}",
        tunnel.logs()
    );
    eprintln!("[reconnect {t:?}] streams work {took:?} after the hub came back");
    // reconnect.max (2s) plus a handshake and health report.
    assert!(
        took < Duration::from_secs(5),
        "reconnect took {took:?} with reconnect.max 2s"
    );
    tunnel.wait_ready();
}

/// The agent dials the hub over wss through tinyproxy (HTTP CONNECT with Basic auth): streams
/// work. With a wrong password the proxy refuses (tinyproxy answers 401), the agent counts a
/// `proxy_error`, names the status in its log and never logs the password.
#[test]
fn proxy() {
    let dir = temp_dir("e2e-proxy");
    let tinyproxy = Tinyproxy::start(dir.path(), Some(("agent", "s3cret-pw")));
    let echo = echo_server();
    let yaml = |password: &str| {
        format!(
            "proxy:\n  url: {}\n  username: agent\n  password: {password}",
            tinyproxy.url()
        )
    };
    {
        let tunnel = Tunnel::builder(Transport::Wss)
            .connector("echo", &[echo])
            .agent_yaml(&yaml("s3cret-pw"))
            .start();
        round_trip(&mut connect(tunnel.connector("echo")), b"via proxy");
        let log = tinyproxy.proc.log();
        assert!(
            log.contains("CONNECT"),
            "tinyproxy saw no CONNECT\n{log}\n{}",
            tunnel.logs()
        );
    }

    let wrong = "wrong-pw-xyz";
    let agent_admin = free_addr();
    let tunnel = Tunnel::builder(Transport::Wss)
        .addrs(free_addr(), free_addr(), agent_admin)
        .connector("echo", &[echo])
        .reconnect("100ms", "500ms")
        .agent_yaml(&yaml(wrong))
        .no_wait()
        .start();
    let mut last = String::new();
    let counted = wait_until(Duration::from_secs(8), || {
        // The admin listener may not be up yet (no_wait).
        last = match http_get(agent_admin, "/metrics") {
            Ok((200, text)) => text,
            other => format!("{other:?}"),
        };
        metric(
            &last,
            "nowconnect_agent_connects_total",
            &[("result", "proxy_error")],
        )
        .is_some_and(|n| n >= 1.0)
    });
    assert!(counted, "no proxy_error counted\n{last}\n{}", tunnel.logs());
    let log = tunnel.agent_log();
    assert!(
        log.contains("proxy authentication required (HTTP 401") || log.contains("(HTTP 407"),
        "agent log does not name the proxy status\n{log}"
    );
    assert!(
        !log.contains(wrong),
        "agent log leaks the proxy password\n{log}"
    );
    assert!(!log.contains("Proxy-Authorization"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// Status and headers of the hub's answer to a WebSocket upgrade request.
#[derive(Debug)]
struct UpgradeAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    raw: String,
}

impl UpgradeAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw `GET /v1/tunnel` upgrade to a plaintext hub, with `Authorization: Bearer <token>` when
/// given; reads the response head (and body, if the hub closes).
fn upgrade(addr: SocketAddr, token: Option<&str>) -> UpgradeAnswer {
    let mut s = connect(addr);
    let mut req = format!(
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: nowconnect.v1\r\n"
    );
    if let Some(tok) = token {
        req += &format!("Authorization: Bearer {tok}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).expect("write upgrade");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + IO_TIMEOUT;
    // Read to EOF for an error answer; for 101 the connection stays open, stop at the head.
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read upgrade answer: {e}"),
        }
        let text = String::from_utf8_lossy(&raw);
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    UpgradeAnswer {
        status,
        headers,
        raw,
    }
}

/// `base64url(JSON)` without padding.
fn b64url_json(v: &serde_json::Value) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The hub's upgrade answers: a valid token (ES256 and EdDSA) gets 101; no token gets 401 with a
/// bare `WWW-Authenticate: Bearer`; every bad token gets 401 with `error="invalid_token"`, and
/// the answer never echoes the token.
#[test]
fn hub_rejects_bad_tokens_with_401() {
    // Nothing listens on the discard port: the connector only has to exist.
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("unused", &["127.0.0.1:9"])
        .without_agent()
        .start();
    let hub = tunnel.hub_listen;
    let now = now_secs();
    let claims = JwtKeys::agent_claims(ISSUER, AUDIENCE, AGENT_ID, 300);

    // Positive controls: the request is well formed and both key types are accepted.
    for token in [
        tunnel.keys.mint(&claims, "es256-1", Algorithm::ES256),
        tunnel.keys.mint(&claims, "ed25519-1", Algorithm::EdDSA),
    ] {
        let a = upgrade(hub, Some(&token));
        assert_eq!(
            a.status,
            101,
            "valid token refused: {a:?}\n{}",
            tunnel.logs()
        );
        assert_eq!(
            a.header("Sec-WebSocket-Protocol"),
            Some("nowconnect.v1"),
            "{a:?}"
        );
    }

    let a = upgrade(hub, None);
    assert_eq!(a.status, 401, "no token: {a:?}");
    assert_eq!(
        a.header("WWW-Authenticate"),
        Some("Bearer"),
        "no token: RFC 6750 §3.1 wants no error code: {a:?}"
    );

    let with = |patch: serde_json::Value| {
        let mut c = claims.clone();
        for (k, v) in patch.as_object().expect("object") {
            c[k] = v.clone();
        }
        tunnel.mint(&c)
    };
    // The same ES256 public key, as PEM: the secret of the classic RS/ES→HS confusion attack.
    let public_pem = rcgen::KeyPair::from_pem(&tunnel.keys.es256.private_pem)
        .expect("parse test key")
        .public_key_pem();
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("es256-1".into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_secret(public_pem.as_bytes()).expect("HMAC key"),
        )
        .expect("HS256 token")
    };
    let alg_none = format!(
        "{}.{}.",
        b64url_json(&json!({"alg": "none", "typ": "JWT", "kid": "es256-1"})),
        b64url_json(&claims)
    );
    let cases = [
        (
            "expired",
            with(json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600})),
        ),
        ("wrong aud", with(json!({"aud": "some-other-service"}))),
        ("wrong iss", with(json!({"iss": "https://evil.test/"}))),
        (
            "not yet valid",
            with(json!({"nbf": now + 3600, "iat": now + 3600, "exp": now + 7200})),
        ),
        (
            "unknown kid",
            JwtKey::es256("kid-nobody-knows").sign(&claims),
        ),
        (
            "known kid, foreign key",
            JwtKey::es256("es256-1").sign(&claims),
        ),
        ("alg none", alg_none),
        ("HS256 with the public key as secret", hs256),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (what, token) in cases {
        let a = upgrade(hub, Some(&token));
        assert_eq!(a.status, 401, "{what}: {a:?}\n{}", tunnel.logs());
        let www = a.header("WWW-Authenticate").unwrap_or("");
        assert!(
            www.starts_with("Bearer") && www.contains("error=\"invalid_token\""),
            "{what}: WWW-Authenticate {www:?}"
        );
        assert!(!a.raw.contains(&token), "{what}: answer echoes the token");
    }
    // The hub counts a refusal after answering it: give the last one a moment.
    let refused = |m: &str| {
        metric(
            m,
            "nowconnect_tunnel_handshakes_total",
            &[("result", "unauthorized")],
        )
    };
    wait_until(Duration::from_secs(2), || {
        refused(&tunnel.hub_metrics()).is_some_and(|n| n >= 10.0)
    });
    let metrics = tunnel.hub_metrics();
    let refused = refused(&metrics);
    assert!(
        refused.is_some_and(|n| n >= 10.0),
        "handshakes_total{{result=\"unauthorized\"}} = {refused:?}\n{metrics}"
    );
}

/// An agent whose token names another agent (`sub` ≠ `agent_id`) is closed with 4403 after its
/// HELLO; it counts the attempt as `forbidden` and is not ready.
#[test]
fn agent_with_foreign_token_is_closed_4403() {
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    tunnel.write_token(&tunnel.valid_token("some-other-agent"));
    tunnel.start_agent();
    let admin = tunnel.agent_admin;
    let forbidden = |text: &str| {
        metric(
            text,
            "nowconnect_agent_connects_total",
            &[("result", "forbidden")],
        )
        .unwrap_or(0.0)
    };
    let seen = wait_until(
        Duration::from_secs(15),
        || matches!(http_get(admin, "/metrics"), Ok((200, m)) if forbidden(&m) >= 1.0),
    );
    assert!(
        seen,
        "agent never counted a forbidden connect\n{}",
        tunnel.logs()
    );
    let log = tunnel.agent_log();
    assert!(log.contains("4403"), "agent log does not name 4403\n{log}");
    assert!(!log.contains(&tunnel.valid_token("some-other-agent")[..40]));
    let (status, body) = http_get(admin, "/readyz").expect("agent /readyz");
    assert_eq!(status, 503, "agent ready with a forbidden tunnel: {body}");
    let hub = tunnel.hub_metrics();
    assert!(
        metric(
            &hub,
            "nowconnect_tunnel_handshakes_total",
            &[("result", "forbidden")]
        )
        .is_some_and(|n| n >= 1.0),
        "hub did not count a forbidden handshake\n{hub}"
    );
    // The connector has no agent: a client is closed at once (FIN or RST, possibly before
    // connect() even returns).
    let closed = (|| -> std::io::Result<usize> {
        let mut c = TcpStream::connect(tunnel.connector("echo"))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = c.write_all(b"x");
        c.read(&mut [0u8; 1])
    })();
    match closed {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        other => panic!("client of a connector without agent: {other:?}"),
    }
    tunnel.assert_running();
}

// ---------------------------------------------------------------------------------------------
// The quick-start demo
// ---------------------------------------------------------------------------------------------

/// `nowconnect-demo` with `NOWCONNECT_DEMO_SELFTEST=1`: brings everything up, does one HTTP
/// request and one echo through the tunnel, prints them and exits 0.
#[test]
fn demo_selftest() {
    let hub = bin_path("nowconnect-hub");
    let bin_dir = hub.parent().expect("bin dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nowconnect-demo"));
    cmd.env("NOWCONNECT_DEMO_SELFTEST", "1")
        .env("NOWCONNECT_BIN_DIR", bin_dir);
    let out = run_cmd(cmd, None, Duration::from_secs(60));
    assert!(out.success(), "demo selftest failed:\n{out}");
    assert!(out.stdout.contains("hello from on-prem"), "{out}");
    assert!(out.stdout.contains("selftest ok"), "{out}");
}
// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The byte counters of operations.md move with the payload: `nowconnect_bytes_total` on the
/// hub and `nowconnect_agent_bytes_total` on the agent, per connector and direction.
#[test]
fn byte_counters_follow_the_payload() {
    let echo = echo_server();
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo])
        .start();
    let mut c = connect(tunnel.connector("echo"));
    let payload = pattern(100_000);
    c.write_all(&payload).expect("write");
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("read echo");
    assert_eq!(back.len(), payload.len());
    let want = payload.len() as f64;
    let counted = |text: &str, name: &str| {
        ["c2a", "a2c"].map(|dir| {
            metric(text, name, &[("connector", "echo"), ("direction", dir)]).unwrap_or(0.0)
        })
    };
    // Counters may move only when the stream closes: allow a moment.
    wait_until(Duration::from_secs(3), || {
        counted(&tunnel.hub_metrics(), "nowconnect_bytes_total") == [want, want]
            && counted(&tunnel.agent_metrics(), "nowconnect_agent_bytes_total") == [want, want]
    });
    let hub = tunnel.hub_metrics();
    assert_eq!(
        counted(&hub, "nowconnect_bytes_total"),
        [want, want],
        "hub nowconnect_bytes_total{{connector=\"echo\"}} c2a/a2c\n{hub}"
    );
    let agent = tunnel.agent_metrics();
    assert_eq!(
        counted(&agent, "nowconnect_agent_bytes_total"),
        [want, want],
        "agent nowconnect_agent_bytes_total{{connector=\"echo\"}} c2a/a2c\n{agent}"
    );
}
