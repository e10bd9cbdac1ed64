//! End to end, corporate networks and high availability (issue 5): the real hub and agent
//! binaries through a real HTTP CONNECT proxy (tinyproxy), with a private CA, `NO_PROXY` from the
//! environment, LDAPS failover between two real slapd servers, two agents in one pool, one
//! agent serving two hubs, and a backend that stops answering (connects time out).
//!
//! The tests use short health intervals (500 ms; the time-out test deliberately 60 s, so no
//! check can hide what it measures) and reconnect backoffs, so the whole file takes seconds; they
//! are independent and run in parallel.

use nowconnect_tests::echo_server;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nowconnect_tests::tunnel::{http_get, metric, Transport, Tunnel, READY_TIMEOUT, TUNNEL_PATH};
use nowconnect_tests::*;

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Health checks in every test config: a failed backend is noticed within this.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
const HEALTH_YAML: &str = "health_check:\n      interval: 500ms\n      timeout: 300ms";

/// Slack on top of a protocol bound, for a loaded 2-core machine (process spawns, TLS
/// handshakes and the test's own polling all compete for the CPU).
const MARGIN: Duration = Duration::from_secs(4);

/// The agents' (default) per-target `connect_timeout`: no client may wait longer than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An echo server on a fixed address that can be stopped (its port then refuses connections)
/// and started again.
struct StoppableEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoppableEcho {
    fn start(addr: SocketAddr) -> StoppableEcho {
        let listener = TcpListener::bind(addr).expect("bind stoppable echo");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let Ok(mut r) = s.try_clone() else { return };
                            let _ = std::io::copy(&mut r, &mut s);
                            let _ = s.shutdown(Shutdown::Write);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        StoppableEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listener (new connections are refused) and waits for that.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("echo accept thread");
        }
    }
}

impl Drop for StoppableEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

/// A fresh connection to `addr`, one echo round trip of `msg`, close. `Err` says what failed.
fn echo_once(addr: SocketAddr, msg: &[u8], timeout: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err("echo answered other bytes".into());
    }
    Ok(())
}

fn round_trip(addr: SocketAddr, msg: &[u8]) {
    if let Err(e) = echo_once(addr, msg, IO_TIMEOUT) {
        panic!("echo through {addr}: {e}");
    }
}

/// Deterministic payload: byte `i` is `(i + seed) % 251`.
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i + seed) % 251) as u8).collect()
}

/// `GET /metrics` at `addr`, or the error as text (a process may be gone).
fn metrics_at(addr: SocketAddr) -> String {
    match http_get(addr, "/metrics") {
        Ok((200, body)) => body,
        other => format!("<GET /metrics at {addr}: {other:?}>"),
    }
}

/// `nowconnect_connector_available{connector}` on the hub whose admin listener is `admin`.
fn available(admin: SocketAddr, connector: &str) -> Option<f64> {
    metric(
        &metrics_at(admin),
        "nowconnect_connector_available",
        &[("connector", connector)],
    )
}

/// Successful stream connects an agent made for `connector` (its backend connect histogram).
fn agent_streams(admin: SocketAddr, connector: &str) -> f64 {
    metric(
        &metrics_at(admin),
        "nowconnect_agent_backend_connect_duration_seconds_count",
        &[("connector", connector)],
    )
    .unwrap_or(0.0)
}

/// A complete agent.yaml for [`Tunnel::custom_agent`]: `hub` is the lines under `hub:`
/// (2-space indented), one connector `echo` → `target`, short backoff and health checks.
fn agent_yaml(
    agent_id: &str,
    token_file: &str,
    hub: &str,
    admin: SocketAddr,
    target: SocketAddr,
    extra: &str,
) -> String {
    format!(
        "agent_id: {agent_id}\nhub:\n{hub}token:\n  file: {token_file}\nadmin:\n  listen: {admin}\n\
         reconnect:\n  initial: 100ms\n  max: 500ms\nconnectors:\n  - name: echo\n    \
         targets: [\"{target}\"]\n    {HEALTH_YAML}\nlimits:\n  shutdown_grace: 1s\n{extra}"
    )
}

/// The agent at `admin` counts exactly one successful connect (the supervisor counts it just
/// after the tunnel comes up, so poll briefly) and no failed one.
fn assert_one_connect(admin: SocketAddr) {
    let mut m = String::new();
    let ok = wait_until(Duration::from_secs(5), || {
        m = metrics_at(admin);
        metric(&m, "nowconnect_agent_connects_total", &[("result", "ok")]) == Some(1.0)
    });
    assert!(ok, "no successful connect counted\n{m}");
    let all = metric(&m, "nowconnect_agent_connects_total", &[]);
    assert_eq!(all, Some(1.0), "failed connects counted\n{m}");
}

/// Lines of tinyproxy's log naming a CONNECT request (`Request (fd N): CONNECT host:port`).
fn proxy_connects(tinyproxy: &Tinyproxy) -> Vec<String> {
    tinyproxy
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("Request (file descriptor"))
        .map(str::to_owned)
        .collect()
}

/// Clients tinyproxy accepted at all (`Connect (file descriptor N): <ip>`).
fn proxy_clients(tinyproxy: &Tinyproxy) -> usize {
    tinyproxy
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("Connect (file descriptor"))
        .count()
}

// ---------------------------------------------------------------------------------------------
// 1. Proxy + private CA
// ---------------------------------------------------------------------------------------------

/// The hub's certificate comes from a private CA that the agent trusts only through
/// `hub.ca_file`, and the agent reaches the hub through tinyproxy. Streams work; tinyproxy only
/// saw a CONNECT to the hub (no HTTP request: the WebSocket upgrade and everything after it
/// travelled inside TLS that the agent verified against the hub's own certificate). Without
/// `ca_file` the same agent through the same proxy fails with a TLS verification error, counted
/// as `tls_error`, and never comes up.
#[test]
fn proxy_with_private_ca() {
    let dir = temp_dir("ha-proxy-ca");
    let tinyproxy = Tinyproxy::start(dir.path(), None);
    let echo = echo_server();
    let tunnel = Tunnel::builder(Transport::Wss)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    let hub_hostport = format!("127.0.0.1:{}", tunnel.hub_listen.port());
    let proxy_yaml = format!("proxy:\n  url: {}\n", tinyproxy.url());

    // The system roots do not know the test CA: ca_file is the only way to trust the hub.
    let admin = free_addr();
    let hub = format!("  url: {}\n  ca_file: server-ca.pem\n", tunnel.hub_url);
    let yaml = agent_yaml("agent-ca", "agent-ca.jwt", &hub, admin, echo, &proxy_yaml);
    let mut agent = tunnel.custom_agent("agent-ca", "agent-ca", &yaml, admin, &["echo"], &[]);
    agent.wait_ready(READY_TIMEOUT);
    round_trip(
        tunnel.connector("echo"),
        b"through the proxy, TLS end to end",
    );

    let connects = proxy_connects(&tinyproxy);
    assert!(
        !connects.is_empty()
            && connects
                .iter()
                .all(|l| l.contains(&format!("CONNECT {hub_hostport} HTTP/1.1"))),
        "tinyproxy should have seen only CONNECT {hub_hostport}:\n{}",
        tinyproxy.proc.log()
    );
    assert_one_connect(agent.admin);
    drop(agent);

    // Same proxy, no ca_file: the hub's certificate does not verify.
    let before = connects.len();
    let admin = free_addr();
    let hub = format!("  url: {}\n", tunnel.hub_url);
    let yaml = agent_yaml(
        "agent-noca",
        "agent-noca.jwt",
        &hub,
        admin,
        echo,
        &proxy_yaml,
    );
    let mut agent = tunnel.custom_agent("agent-noca", "agent-noca", &yaml, admin, &["echo"], &[]);
    let mut last = String::new();
    let failed = wait_until(Duration::from_secs(15), || {
        last = metrics_at(admin);
        metric(
            &last,
            "nowconnect_agent_connects_total",
            &[("result", "tls_error")],
        )
        .is_some_and(|n| n >= 2.0)
    });
    assert!(
        failed,
        "no tls_error counted (retries included)\n{last}\n{}",
        agent.log_tail()
    );
    assert_eq!(
        metric(
            &last,
            "nowconnect_agent_connects_total",
            &[("result", "ok")]
        )
        .unwrap_or(0.0),
        0.0,
        "an agent without ca_file got through\n{last}"
    );
    assert!(
        agent.proc().is_running(),
        "TLS failures must be retried\n{}",
        agent.log_tail()
    );
    let log = agent.log();
    assert!(
        log.contains("TLS")
            && log.contains("invalid peer certificate")
            && log.contains("UnknownIssuer"),
        "agent log does not say why TLS failed\n{log}"
    );
    // It went through the proxy each time (the TLS error is the hub's certificate, not the
    // proxy's answer).
    assert!(
        proxy_connects(&tinyproxy).len() > before,
        "no CONNECT from the agent without ca_file\n{}",
        tinyproxy.proc.log()
    );
    assert!(
        !matches!(http_get(admin, "/readyz"), Ok((200, _))),
        "/readyz must not be ready without a tunnel"
    );
    drop(agent);

    // hub.server_name is the name verified (and sent as SNI): one the hub's certificate does
    // not carry fails, although the CA is trusted; the CONNECT still names the URL's host.
    let admin = free_addr();
    let hub = format!(
        "  url: {}\n  ca_file: server-ca.pem\n  server_name: hub.other.example\n",
        tunnel.hub_url
    );
    let yaml = agent_yaml("agent-sni", "agent-sni.jwt", &hub, admin, echo, &proxy_yaml);
    let agent = tunnel.custom_agent("agent-sni", "agent-sni", &yaml, admin, &["echo"], &[]);
    let failed = wait_until(Duration::from_secs(15), || {
        last = metrics_at(admin);
        metric(
            &last,
            "nowconnect_agent_connects_total",
            &[("result", "tls_error")],
        )
        .is_some_and(|n| n >= 1.0)
    });
    assert!(
        failed,
        "no tls_error with a foreign server_name\n{last}\n{}",
        agent.log_tail()
    );
    assert!(
        agent.log().contains("certificate not valid for name")
            && agent.log().contains("hub.other.example"),
        "agent log does not name the mismatch\n{}",
        agent.log_tail()
    );
    let connects = proxy_connects(&tinyproxy);
    assert!(
        connects
            .iter()
            .all(|l| l.contains(&format!("CONNECT {hub_hostport} HTTP/1.1"))),
        "server_name must not change the CONNECT target\n{}",
        tinyproxy.proc.log()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Proxy from the environment, NO_PROXY
// ---------------------------------------------------------------------------------------------

/// `HTTPS_PROXY` names a tinyproxy; `NO_PROXY` covering the hub by host name (`localhost`, the
/// hub URL's host) or by CIDR (`127.0.0.0/8`, lowercase variables) makes the agent connect
/// directly: that proxy never sees a client. Without `NO_PROXY` the agent goes through the proxy
/// named by `HTTPS_PROXY`. The three agents run at once against one hub.
#[test]
fn no_proxy_from_the_environment() {
    let dir = temp_dir("ha-noproxy");
    let bypassed = Tinyproxy::start(&mkdir(dir.path(), "bypassed"), None);
    let used = Tinyproxy::start(&mkdir(dir.path(), "used"), None);
    let echo = echo_server();
    let tunnel = Tunnel::builder(Transport::Wss)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    let port = tunnel.hub_listen.port();
    let by_name = format!("  url: wss://localhost:{port}{TUNNEL_PATH}\n  ca_file: server-ca.pem\n");
    let by_ip = format!("  url: {}\n  ca_file: server-ca.pem\n", tunnel.hub_url);

    // (agent_id, lines under `hub:`, environment)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let cases: [Case<'_>; 3] = [
        (
            "agent-noproxy-name",
            &by_name,
            vec![
                ("HTTPS_PROXY", bypassed.url()),
                ("NO_PROXY", "corp.example,localhost".to_owned()),
            ],
        ),
        (
            "agent-noproxy-cidr",
            &by_ip,
            vec![
                ("https_proxy", bypassed.url()),
                ("no_proxy", "10.0.0.0/8, 127.0.0.0/8".to_owned()),
            ],
        ),
        ("agent-env-proxy", &by_ip, vec![("HTTPS_PROXY", used.url())]),
    ];
    // The fixture's own start-up probe is a client too: count from here.
    let probes = proxy_clients(&bypassed);
    let mut agents = Vec::new();
    for (id, hub, env) in &cases {
        let admin = free_addr();
        let yaml = agent_yaml(id, &format!("{id}.jwt"), hub, admin, echo, "");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        agents.push(tunnel.custom_agent(id, id, &yaml, admin, &["echo"], &env));
    }
    for a in &mut agents {
        a.wait_ready(READY_TIMEOUT);
        assert_one_connect(a.admin);
    }
    round_trip(tunnel.connector("echo"), b"three agents, one pool");

    assert_eq!(
        proxy_clients(&bypassed),
        probes,
        "NO_PROXY matched the hub, yet the proxy saw a client\n{}",
        bypassed.proc.log()
    );
    let connects = proxy_connects(&used);
    assert!(
        connects.len() == 1 && connects[0].contains(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1")),
        "without NO_PROXY the agent must CONNECT through HTTPS_PROXY once\n{}",
        used.proc.log()
    );
}

fn mkdir(parent: &Path, name: &str) -> std::path::PathBuf {
    let d = parent.join(name);
    std::fs::create_dir_all(&d).expect("create dir");
    d
}

// ---------------------------------------------------------------------------------------------
// 3. LDAPS, two slapd backends, failover
// ---------------------------------------------------------------------------------------------

/// Which directory answered: each holds its own `cn=backend-<x>` entry.
fn served_by(url: &str, ca: &Path) -> Result<char, String> {
    let out = ldapsearch(url, Some(ca), "(cn=backend-*)");
    if !out.success() {
        return Err(out.to_string());
    }
    match (
        out.stdout.contains("cn: backend-a"),
        out.stdout.contains("cn: backend-b"),
    ) {
        (true, false) => Ok('a'),
        (false, true) => Ok('b'),
        _ => Err(format!("no single backend marker in\n{out}")),
    }
}

/// slapd A and slapd B serve LDAPS (their own certificate; the client trusts its CA through
/// `LDAPTLS_CACERT` and checks the name `localhost`) behind one connector with
/// `balance: failover`. Binds go to A; stop A → the very next bind, and every one after, is
/// served by B within one health interval (+ margin); restart A → binds return to A within one
/// health interval (+ margin).
#[test]
fn ldaps_failover_between_two_slapd() {
    let dir = temp_dir("ha-ldaps");
    let tls = TlsFiles::localhost(dir.path());
    let mut a = Slapd::start(&mkdir(dir.path(), "a"), Some(&tls));
    let b = Slapd::start(&mkdir(dir.path(), "b"), Some(&tls));
    for (s, x) in [(&a, 'a'), (&b, 'b')] {
        let ldif = format!(
            "dn: cn=backend-{x},dc=example,dc=com\nobjectClass: organizationalRole\ncn: backend-{x}\n"
        );
        ldapadd(&s.ldap_url(), None, &ldif).assert_success();
    }
    let a_ldaps = a.ldaps.expect("ldaps on a");
    let b_ldaps = b.ldaps.expect("ldaps on b");
    let tunnel = Tunnel::builder(Transport::Wss)
        .connector_with(
            "ldaps",
            free_addr(),
            &[a_ldaps, b_ldaps],
            &[],
            &["balance: failover", HEALTH_YAML],
        )
        .start();
    let url = format!("ldaps://localhost:{}", tunnel.connector("ldaps").port());
    let ca = tls.ca.clone();
    for _ in 0..3 {
        assert_eq!(
            served_by(&url, &ca),
            Ok('a'),
            "failover must prefer the first target"
        );
    }

    let backend_up = |addr: SocketAddr| {
        metric(
            &metrics_at(tunnel.agent_admin),
            "nowconnect_agent_backend_up",
            &[("connector", "ldaps"), ("backend", &addr.to_string())],
        )
    };

    // Stop A: new binds land on B at once (connect refused → fall-through), and the health
    // check marks A down within an interval.
    a.stop();
    let stopped = Instant::now();
    let first = served_by(&url, &ca);
    let first_took = stopped.elapsed();
    assert_eq!(
        first,
        Ok('b'),
        "the first bind after A stopped\n{}",
        tunnel.logs()
    );
    assert!(
        first_took < HEALTH_INTERVAL + MARGIN,
        "first bind on B took {first_took:?}"
    );
    assert!(
        wait_until(HEALTH_INTERVAL + MARGIN, || backend_up(a_ldaps)
            == Some(0.0)),
        "A not marked down\n{}",
        tunnel.logs()
    );
    for _ in 0..3 {
        assert_eq!(served_by(&url, &ca), Ok('b'), "with A down");
    }
    eprintln!("[ldaps] first bind after stopping A served by B in {first_took:?}");

    // Restart A on the same port: failover returns to it after its next passing check.
    a.restart();
    let restarted = Instant::now();
    let mut last = Err(String::new());
    let back = wait_until(HEALTH_INTERVAL + MARGIN, || {
        last = served_by(&url, &ca);
        assert!(last.is_ok(), "a bind failed while A came back: {last:?}");
        last == Ok('a')
    });
    let took = restarted.elapsed();
    assert!(
        back,
        "binds did not return to A within {:?} ({last:?})\n{}",
        HEALTH_INTERVAL + MARGIN,
        tunnel.logs()
    );
    eprintln!("[ldaps] binds back on A {took:?} after it restarted");
    assert_eq!(backend_up(a_ldaps), Some(1.0));
    for _ in 0..3 {
        assert_eq!(served_by(&url, &ca), Ok('a'), "A is back");
    }
    // slapd's own log agrees: the restarted A accepted binds (stats level logs BIND).
    assert!(
        a.proc
            .log()
            .contains("BIND dn=\"cn=admin,dc=example,dc=com\""),
        "restarted slapd A logged no bind\n{}",
        a.proc.log_tail()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Two agents, one connector
// ---------------------------------------------------------------------------------------------

/// `n` fresh connections with an echo round trip each, from `threads` threads; every one must
/// succeed within `CONNECT_TIMEOUT`. Returns the slowest.
fn burst(addr: SocketAddr, n: usize, threads: usize) -> Duration {
    let slowest = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for t in 0..threads {
            let slowest = slowest.clone();
            let failures = failures.clone();
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let msg = format!("connection {i}");
                    let start = Instant::now();
                    let r = echo_once(addr, msg.as_bytes(), CONNECT_TIMEOUT);
                    let took = start.elapsed();
                    slowest.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                    if let Err(e) = r {
                        failures
                            .lock()
                            .expect("failures lock")
                            .push(format!("#{i} after {took:?}: {e}"));
                    }
                }
            });
        }
    });
    let failures = failures.lock().expect("failures lock");
    assert!(
        failures.is_empty(),
        "{} of {n} connections failed: {failures:?}",
        failures.len()
    );
    Duration::from_micros(slowest.load(Ordering::Relaxed))
}

/// Two agents with distinct `agent_id`s (each with its own valid token) serve connector `echo`
/// (each its own echo server). 100 connections spread over both (each takes a fair share: the
/// hub picks the session with the fewest active streams). Agent-2's backend goes down → its
/// HEALTH takes it out of the pool: every new connection succeeds on agent-1; the backend comes
/// back → agent-2 takes streams again. SIGKILL agent-2 → every new connection succeeds on
/// agent-1, none waits longer than `connect_timeout`, and `nowconnect_connector_available` stays
/// 1 throughout; once both agents are gone it is 0.
#[test]
fn two_agents_one_pool() {
    let echo = echo_server();
    let mut echo2 = StoppableEcho::start(free_addr());
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .health_check("500ms", "300ms")
        .reconnect("100ms", "500ms")
        .connector("echo", &[echo])
        .start();
    let addr = tunnel.connector("echo");
    let mut second = tunnel.extra_agent("agent-2", &[("echo", &[echo2.addr.to_string()])], "");
    second.wait_ready(READY_TIMEOUT);
    let (first_admin, second_admin) = (tunnel.agent_admin, second.admin);
    let hub_admin = tunnel.hub_admin;

    let slowest = burst(addr, 100, 4);
    let (n1, n2) = (
        agent_streams(first_admin, "echo"),
        agent_streams(second_admin, "echo"),
    );
    eprintln!("[two agents] 100 connections: agent-1 {n1}, agent-2 {n2}; slowest {slowest:?}");
    assert_eq!(n1 + n2, 100.0, "streams counted by the agents");
    assert!(
        n1 >= 30.0 && n2 >= 30.0,
        "unfair split: agent-1 {n1}, agent-2 {n2}"
    );
    assert!(slowest < CONNECT_TIMEOUT);

    // Agent-2's only backend goes down: once its health check notices, HEALTH tells the hub,
    // which routes nothing more to it.
    echo2.stop();
    let echo2_up = || {
        metric(
            &metrics_at(second_admin),
            "nowconnect_agent_backend_up",
            &[("connector", "echo")],
        )
    };
    assert!(
        wait_until(HEALTH_INTERVAL + MARGIN, || echo2_up() == Some(0.0)),
        "agent-2 did not notice its backend is down\n{}",
        second.log_tail()
    );
    // The HEALTH frame follows the check at once; allow it a moment to reach the hub.
    let settled = wait_until(Duration::from_secs(3), || {
        let before = agent_streams(second_admin, "echo");
        (0..10).all(|i| echo_once(addr, format!("settle {i}").as_bytes(), CONNECT_TIMEOUT).is_ok())
            && agent_streams(second_admin, "echo") == before
    });
    assert!(
        settled,
        "the hub kept routing to the unhealthy agent\n{}",
        tunnel.logs()
    );
    let (n1, n2) = (
        agent_streams(first_admin, "echo"),
        agent_streams(second_admin, "echo"),
    );
    burst(addr, 40, 4);
    assert_eq!(
        agent_streams(first_admin, "echo"),
        n1 + 40.0,
        "all on agent-1"
    );
    assert_eq!(
        agent_streams(second_admin, "echo"),
        n2,
        "none on unhealthy agent-2"
    );
    assert_eq!(available(hub_admin, "echo"), Some(1.0));

    // The backend returns: agent-2 becomes routable again.
    let echo2 = StoppableEcho::start(echo2.addr);
    assert!(
        wait_until(HEALTH_INTERVAL + MARGIN, || echo2_up() == Some(1.0)),
        "agent-2 did not notice its backend is back\n{}",
        second.log_tail()
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            let before = agent_streams(second_admin, "echo");
            burst(addr, 10, 2);
            agent_streams(second_admin, "echo") > before
        }),
        "agent-2 got no streams after its backend came back\n{}",
        tunnel.logs()
    );
    let n1 = agent_streams(first_admin, "echo");

    // Watch availability from the kill on.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let watcher = {
        let stop = stop.clone();
        let hub_admin = tunnel.hub_admin;
        std::thread::spawn(move || {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let v = available(hub_admin, "echo");
                if v != Some(1.0) {
                    let _ = tx.send(format!("sample {samples}: available {v:?}"));
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        })
    };
    second.kill();
    let killed = Instant::now();
    // Streams the hub had already handed to agent-2 end with it (reset, §6); "new" connections
    // are those after the hub saw the session go, which takes one read of the closed socket.
    let gone = wait_until(Duration::from_secs(5), || {
        metric(
            &metrics_at(hub_admin),
            "nowconnect_agents_connected",
            &[("agent_id", "agent-2")],
        )
        .unwrap_or(0.0)
            == 0.0
    });
    let noticed = killed.elapsed();
    assert!(
        gone,
        "the hub still counts agent-2 5 s after SIGKILL\n{}",
        tunnel.logs()
    );
    eprintln!("[two agents] hub dropped the SIGKILLed agent's session after {noticed:?}");
    let slowest = burst(addr, 60, 3);
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.join().expect("watcher thread");
    let dips: Vec<String> = rx.try_iter().collect();
    assert!(samples > 0);
    assert!(
        dips.is_empty(),
        "connector not available after one agent died: {dips:?}"
    );
    assert_eq!(
        agent_streams(first_admin, "echo"),
        n1 + 60.0,
        "after the kill every stream goes to agent-1"
    );
    assert!(slowest < CONNECT_TIMEOUT, "slowest connection {slowest:?}");
    eprintln!(
        "[two agents] 60 connections after SIGKILL of agent-2: all on agent-1, slowest {slowest:?}"
    );

    tunnel.kill_agent();
    assert!(
        wait_until(Duration::from_secs(10), || available(hub_admin, "echo")
            == Some(0.0)),
        "connector still available with both agents gone\n{}",
        tunnel.logs()
    );
    assert!(
        echo_once(addr, b"nobody home", Duration::from_secs(5)).is_err(),
        "a connection succeeded without any agent"
    );
    drop(echo2);
}

// ---------------------------------------------------------------------------------------------
// 5. Two hubs
// ---------------------------------------------------------------------------------------------

/// One agent with `hub.urls: [a, b]` serves the clients of both hubs. An 8 MiB echo transfer
/// through hub b is half done when hub a is SIGKILLed; it completes intact, hub b's session is
/// the same one (no new handshake), and new clients of b work while a is down. Hub a comes back
/// and gets its tunnel again; a graceful stop of hub a (GOAWAY SHUTDOWN) leaves b alone too.
#[test]
fn one_agent_two_hubs() {
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(Transport::Wss)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    let hub_b = tunnel.second_hub("hub-b");
    let admin = free_addr();
    let hub = format!(
        "  urls: [\"{}\", \"{}\"]\n  ca_file: server-ca.pem\n",
        tunnel.hub_url, hub_b.url
    );
    let yaml = agent_yaml("agent-ab", "agent-ab.jwt", &hub, admin, echo, "");
    let mut agent = tunnel.custom_agent("agent-ab", "agent-ab", &yaml, admin, &["echo"], &[]);
    agent.wait_ready(READY_TIMEOUT);
    assert!(
        wait_until(READY_TIMEOUT, || available(hub_b.admin, "echo")
            == Some(1.0)),
        "hub b never saw the agent\n{}\n{}",
        hub_b.log_tail(),
        agent.log_tail()
    );
    let (a_addr, b_addr) = (tunnel.connector("echo"), hub_b.connector("echo"));
    round_trip(a_addr, b"client of hub a");
    round_trip(b_addr, b"client of hub b");
    let handshakes_b = || {
        metric(
            &hub_b.metrics(),
            "nowconnect_tunnel_handshakes_total",
            &[("result", "ok")],
        )
    };
    assert_eq!(handshakes_b(), Some(1.0));

    // An echo transfer through b, paused halfway until hub a is dead.
    const HALF: usize = 4 << 20;
    let (halfway_tx, halfway) = mpsc::channel::<()>();
    let (go_tx, go) = mpsc::channel::<()>();
    let transfer = std::thread::spawn(move || {
        let mut s = connect(b_addr);
        let mut reader = s.try_clone().expect("clone stream");
        let read = std::thread::spawn(move || {
            let mut got = vec![0u8; 2 * HALF];
            reader.read_exact(&mut got).map(|()| got)
        });
        s.write_all(&pattern(HALF, 0)).expect("first half");
        halfway_tx.send(()).expect("halfway");
        go.recv().expect("go");
        s.write_all(&pattern(HALF, HALF)).expect("second half");
        s.shutdown(Shutdown::Write).expect("shutdown write");
        let got = read.join().expect("reader thread").expect("read echo");
        // The echo server closes after our FIN: nothing more.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read EOF");
        (got, rest.len())
    });
    halfway.recv().expect("transfer thread died before halfway");
    tunnel.kill_hub();
    let killed = Instant::now();
    go_tx.send(()).expect("transfer thread gone");
    let (got, extra) = transfer.join().expect("transfer through hub b failed");
    let mut want = pattern(HALF, 0);
    want.extend_from_slice(&pattern(HALF, HALF));
    assert!(
        got == want && extra == 0,
        "transfer through hub b corrupted"
    );
    eprintln!(
        "[two hubs] 8 MiB through b completed {:?} after hub a died",
        killed.elapsed()
    );

    // b: new clients work, same session, and the agent stays up with one tunnel.
    for i in 0..10 {
        round_trip(b_addr, format!("new client {i} of b").as_bytes());
    }
    assert_eq!(handshakes_b(), Some(1.0), "hub b's session was disturbed");
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(&metrics_at(admin), "nowconnect_agent_tunnels_up", &[]) == Some(1.0)
        }),
        "agent should have exactly the tunnel to b up\n{}",
        agent.log_tail()
    );
    assert!(agent.proc().is_running());

    // Hub a returns: the agent's tunnel to it comes back on its own.
    tunnel.start_hub();
    let hub_a_admin = tunnel.hub_admin;
    assert!(
        wait_until(READY_TIMEOUT, || available(hub_a_admin, "echo")
            == Some(1.0)),
        "agent did not reconnect to hub a\n{}",
        agent.log_tail()
    );
    round_trip(a_addr, b"hub a is back");
    round_trip(b_addr, b"hub b still fine");
    assert_eq!(handshakes_b(), Some(1.0));

    // A graceful stop of hub a (drain, GOAWAY SHUTDOWN to the agent) concerns only a's tunnel.
    let status = tunnel.stop_hub().expect("hub a was running");
    assert!(status.success(), "hub a exited with {status}");
    for i in 0..5 {
        round_trip(b_addr, format!("b after a drained {i}").as_bytes());
    }
    assert_eq!(
        handshakes_b(),
        Some(1.0),
        "hub b's session was disturbed by a's drain"
    );
    assert!(agent.proc().is_running(), "{}", agent.log_tail());
}

// ---------------------------------------------------------------------------------------------
// 6. A backend that stops answering (no RST: connects time out)
// ---------------------------------------------------------------------------------------------

/// A backend that answers each connection with its tag byte, then echoes. [`Self::blackhole`]
/// makes it stop accepting and fills its accept queue (backlog 0): from then on the kernel drops
/// new SYNs, so connects time out, like a host that died or a firewall that drops.
struct TaggedBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<TcpListener>>,
    listener: Option<TcpListener>,
    queued: Vec<TcpStream>,
}

impl TaggedBackend {
    fn start(tag: u8) -> TaggedBackend {
        use socket2::{Domain, Socket, Type};
        let addr = free_addr();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(&addr.into()).expect("bind tagged backend");
        socket.listen(0).expect("listen");
        let listener: TcpListener = socket.into();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            if s.write_all(&[tag]).is_err() {
                                return;
                            }
                            let Ok(mut r) = s.try_clone() else { return };
                            let _ = std::io::copy(&mut r, &mut s);
                            let _ = s.shutdown(Shutdown::Write);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            listener
        });
        TaggedBackend {
            addr,
            stop,
            thread: Some(thread),
            listener: None,
            queued: Vec::new(),
        }
    }

    fn blackhole(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            self.listener = Some(t.join().expect("accept thread"));
        }
        // Fill the accept queue; the connect that times out proves new SYNs are dropped.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)) {
                Ok(s) => self.queued.push(s),
                Err(_) => return,
            }
        }
        panic!("accept queue of {} never filled", self.addr);
    }
}

/// Which backend served a fresh connection through `addr` (its tag), after an echo check.
fn served_tag(addr: SocketAddr) -> Result<u8, String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"x").map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 2];
    s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    if b[1] != b'x' {
        return Err(format!("bad echo {b:?}"));
    }
    Ok(b[0])
}

/// `failover` over [A, B], health checks far apart (60 s, so none runs during the test). A
/// stops answering (connects time out): the first stream waits `connect_timeout` on A, falls
/// through to B, and marks A down; the following streams go straight to B without waiting on A
/// again, long before the next health check.
#[test]
fn a_backend_that_times_out_costs_one_connect_timeout() {
    let mut a = TaggedBackend::start(b'A');
    let b = TaggedBackend::start(b'B');
    let connect_timeout = Duration::from_secs(2);
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector_with(
            "svc",
            free_addr(),
            &[a.addr, b.addr],
            &[],
            &[
                "balance: failover",
                "connect_timeout: 2s",
                "health_check:\n      interval: 60s\n      timeout: 1s",
            ],
        )
        .start();
    let addr = tunnel.connector("svc");
    for _ in 0..3 {
        assert_eq!(served_tag(addr), Ok(b'A'), "failover prefers A");
    }

    a.blackhole();
    let start = Instant::now();
    assert_eq!(served_tag(addr), Ok(b'B'), "{}", tunnel.logs());
    let first = start.elapsed();
    assert!(
        first >= connect_timeout - Duration::from_millis(100),
        "the first stream should have waited on A ({first:?})"
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        assert_eq!(served_tag(addr), Ok(b'B'), "{}", tunnel.logs());
        slowest = slowest.max(start.elapsed());
    }
    eprintln!(
        "[blackhole] first stream {first:?} (connect_timeout 2s), next five at most {slowest:?}"
    );
    assert!(
        slowest < connect_timeout / 2,
        "later streams still waited on the dead backend ({slowest:?})\n{}",
        tunnel.logs()
    );
    let a_up = metric(
        &tunnel.agent_metrics(),
        "nowconnect_agent_backend_up",
        &[("connector", "svc"), ("backend", &a.addr.to_string())],
    );
    assert_eq!(a_up, Some(0.0));
    assert!(
        tunnel
            .agent_log()
            .contains("backend down: a stream could not connect"),
        "{}",
        tunnel.logs()
    );
    drop(b);
}
