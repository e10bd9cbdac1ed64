//! End to end: authorization on the cloud side (security.md "Authorization" 2 and
//! `allow_clients`) with the real `nowconnect-hub` and `nowconnect-agent` binaries and an
//! in-process fake PDP ([`FakePdp`]; a real PDP cannot run here).
//!
//! "No OPEN reached the agent" is read from both ends: the hub's
//! `nowconnect_streams_opened_total{connector}` (OPENs sent) and the agent's
//! `nowconnect_agent_backend_connect_duration_seconds_count{connector}` (target connects made for
//! an OPEN; health checks do not count). Each test also shows the same probes move for an
//! allowed client, so they can see an OPEN when there is one.

use nowconnect_tests::echo_server;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nowconnect_tests::pdp::{Answer, FakePdp, PDP_PATH};
use nowconnect_tests::tunnel::{metric, Transport, Tunnel, AGENT_ID};
use nowconnect_tests::{free_addr, wait_until};
use socket2::{Domain, Socket, Type};

/// Deadline for one client read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline for a metric or a count to reach its value.
const WAIT: Duration = Duration::from_secs(15);
/// Clients of one connector that may wait for the PDP at once (the hub's
/// `pdp::MAX_PENDING_PER_CONNECTOR`).
const PENDING_PER_CONNECTOR: usize = 64;
/// A refused client must see its connection end well before this.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A client socket from `src` (any loopback address: 127.0.0.0/8 is all local on Linux).
fn connect_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .unwrap_or_else(|e| panic!("bind client to {src}: {e}"));
    socket
        .connect_timeout(&dst.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {dst} from {src}: {e}"));
    socket.into()
}

fn connect(dst: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&dst, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {dst}: {e}"))
}

/// Writes `msg` and reads it back through the tunnel.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err(format!("echoed {back:?}, sent {msg:?}"));
    }
    Ok(())
}

fn assert_echo(s: &mut TcpStream, msg: &[u8], t: &Tunnel) {
    if let Err(e) = echo(s, msg) {
        panic!("stream through the tunnel failed: {e}\n{}", t.logs());
    }
}

/// Dials `dst` and waits for the hub to end the connection (EOF or reset, never data);
/// returns how long that took. The reset may even beat `connect` back. Panics if the
/// connection stays open past [`IO_TIMEOUT`].
fn expect_refused(dst: SocketAddr, t: &Tunnel) -> Duration {
    let is_reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
        )
    };
    let start = Instant::now();
    let mut s = match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return start.elapsed(),
        Err(e) => panic!("connect {dst}: {e}"),
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    // The write may already fail (reset): either way the read below tells.
    let _ = s.write_all(b"x");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if is_reset(&e) => {}
        Ok(n) => panic!("a refused client got {n} bytes\n{}", t.logs()),
        Err(e) => panic!("client not closed by the hub: {e}\n{}", t.logs()),
    }
    start.elapsed()
}

/// A hub or agent metric's value (0 when the series has not appeared).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

fn hub_metric(t: &Tunnel, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(&t.hub_metrics(), name, labels)
}

fn pdp_result(t: &Tunnel, result: &str) -> f64 {
    hub_metric(t, "nowconnect_pdp_requests_total", &[("result", result)])
}

fn open_failures(t: &Tunnel, connector: &str, reason: &str) -> f64 {
    hub_metric(
        t,
        "nowconnect_stream_open_failures_total",
        &[("connector", connector), ("reason", reason)],
    )
}

/// OPENs the hub sent for `connector`, and target connects the agent made for one.
fn opens(t: &Tunnel, connector: &str) -> (f64, f64) {
    let hub = hub_metric(
        t,
        "nowconnect_streams_opened_total",
        &[("connector", connector)],
    );
    let agent = value(
        &t.agent_metrics(),
        "nowconnect_agent_backend_connect_duration_seconds_count",
        &[("connector", connector)],
    );
    (hub, agent)
}

/// Polls until `f()` equals `want`; panics with the last value and the logs.
fn wait_eq(t: &Tunnel, what: &str, want: f64, f: impl Fn() -> f64) {
    let ok = wait_until(WAIT, || f() == want);
    assert!(ok, "{what}: {} != {want}\n{}", f(), t.logs());
}

fn localhost2() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
}

// ---------------------------------------------------------------------------------------------
// PDP
// ---------------------------------------------------------------------------------------------

/// PDP allows: the stream works, the PDP got exactly the documented JSON fields, and the
/// decision is cached per (agent, connector, client ip) for `cache_ttl`, then asked again.
#[test]
fn pdp_allow_sends_the_documented_request_and_caches_it() {
    let target = echo_server();
    let pdp = FakePdp::start(Answer::allow());
    let ttl = Duration::from_secs(8);
    let t = Tunnel::builder(Transport::Ws)
        .connector("echo", &[target])
        .hub_yaml(&pdp.authz_yaml("5s", "8s", "deny"))
        .start();
    let addr = t.connector("echo");

    let mut c1 = connect(addr);
    let c1_addr = c1.local_addr().expect("client addr");
    assert_echo(&mut c1, b"allowed by the PDP", &t);
    let calls = pdp.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, PDP_PATH);
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    let mut keys: Vec<&str> = call
        .body
        .as_object()
        .unwrap_or_else(|| panic!("PDP body is not a JSON object: {:?}", call.body))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "agent_id",
            "client_addr",
            "connector",
            "listener",
            "session"
        ],
        "{:?}",
        call.body
    );
    assert_eq!(call.field("agent_id"), AGENT_ID);
    assert_eq!(call.field("connector"), "echo");
    assert_eq!(call.field("client_addr"), c1_addr.to_string());
    assert_eq!(call.field("listener"), addr.to_string());
    // The session the stream went to: the agent logged the same id at HELLO_ACK.
    let session = call.field("session");
    assert!(
        !session.is_empty() && t.agent_log().contains(session),
        "session {session:?} not the agent's\n{}",
        t.agent_log()
    );
    assert_eq!(pdp_result(&t, "allow"), 1.0);
    assert_eq!(
        hub_metric(&t, "nowconnect_pdp_duration_seconds_count", &[]),
        1.0
    );
    drop(c1);

    // Same client ip within the ttl: the cached decision, no PDP call.
    let mut c2 = connect(addr);
    assert_echo(&mut c2, b"cached", &t);
    assert!(
        call.at.elapsed() < ttl,
        "machine too slow: the second client came after cache_ttl ({:?})",
        call.at.elapsed()
    );
    assert_eq!(pdp.count(), 1, "a cached decision called the PDP");
    assert_eq!(pdp_result(&t, "cached_allow"), 1.0);

    // Another client ip is another cache key.
    let mut c3 = connect_from(localhost2(), addr);
    assert_echo(&mut c3, b"other ip", &t);
    assert_eq!(pdp.count(), 2);
    assert!(pdp.calls()[1]
        .field("client_addr")
        .starts_with("127.0.0.2:"));

    // After the ttl the PDP is asked again.
    let expired = call.at + ttl + Duration::from_millis(500);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let mut c4 = connect(addr);
    assert_echo(&mut c4, b"after ttl", &t);
    assert_eq!(pdp.count(), 3, "the expired decision was used");
    assert_eq!(pdp_result(&t, "allow"), 3.0);
    assert_eq!(pdp_result(&t, "cached_allow"), 1.0);
}

/// operations.md: `nowconnect_open_duration_seconds` runs from client accept to OPEN_OK, so
/// the wait for the PDP is part of it (a slow PDP shows up where operators look for open
/// latency).
#[test]
fn open_duration_includes_the_pdp_wait() {
    const PDP_DELAY: Duration = Duration::from_millis(400);
    let target = echo_server();
    let pdp = FakePdp::start(Answer::allow().delayed(PDP_DELAY));
    let t = Tunnel::builder(Transport::Ws)
        .connector("echo", &[target])
        .hub_yaml(&pdp.authz_yaml("5s", "8s", "deny"))
        .start();
    let mut c = connect(t.connector("echo"));
    assert_echo(&mut c, b"after a slow PDP", &t);
    let labels = [("connector", "echo")];
    assert_eq!(
        hub_metric(&t, "nowconnect_open_duration_seconds_count", &labels),
        1.0
    );
    let open = hub_metric(&t, "nowconnect_open_duration_seconds_sum", &labels);
    let pdp_wait = hub_metric(&t, "nowconnect_pdp_duration_seconds_sum", &[]);
    assert!(
        pdp_wait >= PDP_DELAY.as_secs_f64() && open >= pdp_wait,
        "open took {open} s, the PDP {pdp_wait} s: the open latency must include the PDP"
    );
}

/// PDP denies: the client is closed at once, no OPEN reaches the agent, the denial is counted
/// once per client; a cached deny is applied without a call.
#[test]
fn pdp_deny_closes_the_client_without_an_open() {
    let target = echo_server();
    let pdp = FakePdp::start(Answer::deny());
    let t = Tunnel::builder(Transport::Ws)
        .connector("echo", &[target])
        .hub_yaml(&pdp.authz_yaml("5s", "30s", "allow"))
        .start();
    let addr = t.connector("echo");

    let took = expect_refused(addr, &t);
    assert!(took < CLOSED_WITHIN, "denied client closed after {took:?}");
    wait_eq(&t, "denied", 1.0, || open_failures(&t, "echo", "denied"));
    assert_eq!(pdp_result(&t, "deny"), 1.0);
    assert_eq!(pdp.count(), 1);
    assert_eq!(opens(&t, "echo"), (0.0, 0.0), "an OPEN went out");
    let log = t.hub_log();
    assert!(
        log.contains("client refused") && log.contains("denied"),
        "no refusal logged\n{log}"
    );

    // The same ip again: the cached deny, no PDP call.
    let took = expect_refused(addr, &t);
    assert!(took < CLOSED_WITHIN, "{took:?}");
    wait_eq(&t, "denied", 2.0, || open_failures(&t, "echo", "denied"));
    assert_eq!(pdp_result(&t, "cached_deny"), 1.0);
    assert_eq!(pdp.count(), 1);
    assert_eq!(opens(&t, "echo"), (0.0, 0.0), "an OPEN went out");

    // The probes see an OPEN when there is one: another ip, now allowed.
    pdp.set_default(Answer::allow());
    let mut ok = connect_from(localhost2(), addr);
    assert_echo(&mut ok, b"allowed now", &t);
    wait_eq(&t, "agent target connects", 1.0, || opens(&t, "echo").1);
    assert_eq!(opens(&t, "echo").0, 1.0);
    assert_eq!(open_failures(&t, "echo", "denied"), 2.0);
}

/// A slow PDP (past `timeout`), an error status, a bad answer and a dead PDP each follow
/// `on_error`; errors are not cached.
fn pdp_errors(on_error: &str) {
    let deny = on_error == "deny";
    let target = echo_server();
    let pdp = FakePdp::start(Answer::allow());
    let timeout = Duration::from_millis(500);
    let t = Tunnel::builder(Transport::Ws)
        .connector("echo", &[target])
        .hub_yaml(&pdp.authz_yaml("500ms", "30s", on_error))
        .start();
    let addr = t.connector("echo");

    let cases: [(&str, Option<Answer>); 4] = [
        (
            "slow",
            Some(Answer::allow().delayed(Duration::from_secs(10))),
        ),
        ("http 503", Some(Answer::status(503))),
        ("not a boolean", Some(Answer::json(r#"{"allow": "yes"}"#))),
        ("down", None),
    ];
    let mut asked = 0;
    for (i, (case, answer)) in cases.into_iter().enumerate() {
        match &answer {
            Some(a) => pdp.set_default(a.clone()),
            None => pdp.set_down(true),
        }
        if deny {
            let took = expect_refused(addr, &t);
            assert!(took < CLOSED_WITHIN, "{case}: closed after {took:?}");
            if case == "slow" {
                assert!(
                    took >= timeout - Duration::from_millis(50),
                    "{case}: closed after {took:?}, before the PDP timeout"
                );
            }
        } else {
            let start = Instant::now();
            let mut client = connect(addr);
            assert_echo(&mut client, case.as_bytes(), &t);
            let took = start.elapsed();
            if case == "slow" {
                assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
                assert!(took < Duration::from_secs(8), "{case}: waited {took:?}");
            }
        }
        let n = (i + 1) as f64;
        wait_eq(&t, case, n, || pdp_result(&t, "error"));
        if answer.is_some() {
            // Asked every time: the previous error was not cached.
            asked += 1;
            assert_eq!(pdp.count(), asked, "{case}");
        }
        let (failures, opened) = (open_failures(&t, "echo", "denied"), opens(&t, "echo").0);
        if deny {
            assert_eq!((failures, opened), (n, 0.0), "{case}");
        } else {
            assert_eq!((failures, opened), (0.0, n), "{case}");
        }
    }
    assert_eq!(
        hub_metric(&t, "nowconnect_pdp_duration_seconds_count", &[]),
        4.0
    );
    assert!(t.hub_log().contains("no PDP decision"), "{}", t.hub_log());

    // Back up: decisions again.
    pdp.set_down(false);
    pdp.set_default(Answer::allow());
    let mut client = connect(addr);
    assert_echo(&mut client, b"PDP back", &t);
    assert_eq!(pdp_result(&t, "allow"), 1.0);
    assert_eq!(pdp.count(), asked + 1);
}

#[test]
fn pdp_errors_on_error_deny() {
    pdp_errors("deny");
}

#[test]
fn pdp_errors_on_error_allow() {
    pdp_errors("allow");
}

/// Clients of one connector waiting on a PDP that does not answer hold up neither accepts and
/// streams on another connector nor a stream already open, nor accepts on their own connector.
#[test]
fn slow_pdp_on_one_connector_does_not_delay_others() {
    let target = echo_server();
    let pdp = FakePdp::start(Answer::allow());
    pdp.set_for("slow", Answer::allow().held());
    let t = Tunnel::builder(Transport::Ws)
        .connector("slow", &[target])
        .connector("fast", &[target])
        .hub_yaml(&pdp.authz_yaml("60s", "0", "deny"))
        .start();
    let (slow, fast) = (t.connector("slow"), t.connector("fast"));

    let mut open = connect(fast);
    assert_echo(&mut open, b"open before", &t);

    let waiting = |n: usize| -> Vec<JoinHandle<Result<(), String>>> {
        (0..n)
            .map(|i| {
                let mut c = connect(slow);
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(90)))
                        .map_err(|e| e.to_string())?;
                    let msg = format!("slow client {i}");
                    c.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
                    let mut back = vec![0u8; msg.len()];
                    c.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
                    Ok(())
                })
            })
            .collect()
    };
    let mut slow_clients = waiting(4);
    assert!(
        wait_until(WAIT, || pdp.in_flight("slow") == 4),
        "{} slow PDP calls in flight\n{}",
        pdp.in_flight("slow"),
        t.logs()
    );

    // While those wait: the open stream, new streams on `fast`, and accepts on `slow` itself.
    let mut worst = Duration::ZERO;
    for i in 0..3 {
        let start = Instant::now();
        assert_echo(&mut open, format!("still open {i}").as_bytes(), &t);
        let mut c = connect(fast);
        assert_echo(&mut c, format!("fast client {i}").as_bytes(), &t);
        worst = worst.max(start.elapsed());
    }
    eprintln!("fast connector while 4 slow PDP calls hang: worst round trip {worst:?}");
    slow_clients.extend(waiting(1));
    assert!(
        wait_until(WAIT, || pdp.in_flight("slow") == 5),
        "a fifth slow client was not accepted while four wait\n{}",
        t.logs()
    );
    assert_eq!(opens(&t, "slow").0, 0.0, "OPEN before the PDP answered");

    // Waiting clients are bounded per connector: the one past the bound is a PDP error at once
    // (on_error: deny), and the other connector is not affected.
    slow_clients.extend(waiting(PENDING_PER_CONNECTOR - 5));
    assert!(
        wait_until(WAIT, || pdp.in_flight("slow") == PENDING_PER_CONNECTOR),
        "{} slow PDP calls in flight\n{}",
        pdp.in_flight("slow"),
        t.logs()
    );
    let took = expect_refused(slow, &t);
    assert!(
        took < CLOSED_WITHIN,
        "client past the bound closed after {took:?}"
    );
    wait_eq(&t, "PDP errors", 1.0, || pdp_result(&t, "error"));
    assert_eq!(open_failures(&t, "slow", "denied"), 1.0);
    assert_eq!(
        pdp.count(),
        4 + PENDING_PER_CONNECTOR,
        "the refused client was asked"
    );
    let mut c = connect(fast);
    assert_echo(&mut c, b"fast while slow is full", &t);
    assert_echo(&mut open, b"still open at the bound", &t);

    pdp.release();
    for (i, c) in slow_clients.into_iter().enumerate() {
        let r = c.join().expect("slow client thread");
        assert!(r.is_ok(), "slow client {i}: {r:?}\n{}", t.logs());
    }
    assert_eq!(pdp_result(&t, "allow"), (5 + PENDING_PER_CONNECTOR) as f64);
    assert_eq!(opens(&t, "slow").0, PENDING_PER_CONNECTOR as f64);
}

/// With `on_error: allow` a client past the bound on waiting clients is still refused: a burst
/// must not get a denied client in unchecked.
#[test]
fn waiting_clients_past_the_bound_are_refused_even_with_on_error_allow() {
    let target = echo_server();
    let pdp = FakePdp::start(Answer::deny().held());
    let t = Tunnel::builder(Transport::Ws)
        .connector("echo", &[target])
        .hub_yaml(&pdp.authz_yaml("60s", "0", "allow"))
        .start();
    let addr = t.connector("echo");
    let held: Vec<TcpStream> = (0..PENDING_PER_CONNECTOR).map(|_| connect(addr)).collect();
    assert!(
        wait_until(WAIT, || pdp.in_flight("echo") == PENDING_PER_CONNECTOR),
        "{} PDP calls in flight\n{}",
        pdp.in_flight("echo"),
        t.logs()
    );
    let took = expect_refused(addr, &t);
    assert!(took < CLOSED_WITHIN, "{took:?}");
    wait_eq(&t, "PDP errors", 1.0, || pdp_result(&t, "error"));
    assert_eq!(opens(&t, "echo"), (0.0, 0.0), "an OPEN went out");
    assert!(
        t.hub_log().contains("on_error does not apply"),
        "{}",
        t.hub_log()
    );

    // The held ones get their (deny) answers and are closed.
    pdp.release();
    wait_eq(&t, "PDP denies", PENDING_PER_CONNECTOR as f64, || {
        pdp_result(&t, "deny")
    });
    wait_eq(&t, "denied", (PENDING_PER_CONNECTOR + 1) as f64, || {
        open_failures(&t, "echo", "denied")
    });
    drop(held);
    assert_eq!(opens(&t, "echo"), (0.0, 0.0), "an OPEN went out");
}

// ---------------------------------------------------------------------------------------------
// allow_clients
// ---------------------------------------------------------------------------------------------

/// `allow_clients` over IPv4 and IPv6 (`::1`): a client outside the list is closed and causes
/// neither a PDP call nor an OPEN; a client inside works.
#[test]
fn allow_clients_ipv4_and_ipv6() {
    let target = echo_server();
    let pdp = FakePdp::start(Answer::allow());
    let ipv6 = TcpListener::bind("[::1]:0").ok();
    if ipv6.is_none() {
        eprintln!("no IPv6 loopback (::1) on this machine: only the IPv4 half of this test runs");
    }
    // Free ports on ::1 for the v6 connectors (the fixture quotes `listen`, so `[::1]:p` is a
    // string in YAML).
    let v6_free = || -> SocketAddr {
        TcpListener::bind("[::1]:0")
            .and_then(|l| l.local_addr())
            .expect("a free ::1 port")
    };
    let (v6in, v6out) = match &ipv6 {
        Some(_) => (v6_free(), v6_free()),
        None => (free_addr(), free_addr()),
    };
    let mut b = Tunnel::builder(Transport::Ws)
        .connector_with(
            "v4",
            free_addr(),
            &[target],
            &["allow_clients: [127.0.0.2/32]"],
            &[],
        )
        .hub_yaml(&pdp.authz_yaml("5s", "0", "deny"));
    if ipv6.is_some() {
        b = b
            .connector_with(
                "v6in",
                v6in,
                &[target],
                &["allow_clients: [\"::1/128\"]"],
                &[],
            )
            .connector_with(
                "v6out",
                v6out,
                &[target],
                &["allow_clients: [\"fd00::/8\", 127.0.0.1/32]"],
                &[],
            );
    }
    let t = b.start();
    let v4 = t.connector("v4");

    // IPv4: 127.0.0.1 is outside [127.0.0.2/32], 127.0.0.2 inside.
    let took = expect_refused(v4, &t);
    assert!(took < CLOSED_WITHIN, "{took:?}");
    wait_eq(&t, "v4 client_not_allowed", 1.0, || {
        open_failures(&t, "v4", "client_not_allowed")
    });
    assert_eq!(opens(&t, "v4"), (0.0, 0.0), "an OPEN for a refused client");
    assert_eq!(pdp.count(), 0, "a refused client reached the PDP");
    let mut inside = connect_from(localhost2(), v4);
    assert_echo(&mut inside, b"v4 inside", &t);
    wait_eq(&t, "v4 agent connects", 1.0, || opens(&t, "v4").1);
    assert_eq!(pdp.count(), 1);

    if ipv6.is_none() {
        return;
    }

    // IPv6: ::1 is inside ["::1/128"] and outside ["fd00::/8", 127.0.0.1/32].
    let took = expect_refused(v6out, &t);
    assert!(took < CLOSED_WITHIN, "{took:?}");
    wait_eq(&t, "v6out client_not_allowed", 1.0, || {
        open_failures(&t, "v6out", "client_not_allowed")
    });
    let mut inside = connect(v6in);
    let client = inside.local_addr().expect("v6 client addr");
    assert_echo(&mut inside, b"v6 inside", &t);
    wait_eq(&t, "v6in agent connects", 1.0, || opens(&t, "v6in").1);
    assert_eq!(
        opens(&t, "v6out"),
        (0.0, 0.0),
        "an OPEN for a refused client"
    );
    let calls = pdp.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].field("client_addr"), client.to_string());
    assert!(calls[1].field("client_addr").starts_with("[::1]:"));
    assert_eq!(calls[1].field("listener"), v6in.to_string());
    assert_eq!(calls[1].field("connector"), "v6in");
}
