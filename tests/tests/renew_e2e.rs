//! End to end: token lifetimes. The real hub and agent binaries with short-lived tokens:
//!
//! - in-band RENEW keeps one tunnel (and a stream on it) alive across several token lifetimes;
//! - without renewal the agent replaces its tunnel before the token lapses (make before
//!   break): clients see no gap, a stream on the old tunnel finishes while the hub sends it
//!   GOAWAY(TOKEN_EXPIRED);
//! - `token.client_credentials` against an in-process OAuth2 token endpoint
//!   ([`TokenEndpoint`]), including a wrong secret retried with backoff.
//!
//! The tests are independent and run in parallel (~40 s in all).

use nowconnect_tests::echo_server;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::token_endpoint::TokenEndpoint;
use nowconnect_tests::tunnel::{
    log_records, log_ts_millis, metric, Transport, Tunnel, AGENT_ID, AUDIENCE, ISSUER,
};
use nowconnect_tests::*;

const IO_TIMEOUT: Duration = Duration::from_secs(15);
const CLIENT_ID: &str = "nowconnect-agent-dc1";
const SECRET: &str = "cc-secret-7f3a9e1d";

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One echo round trip of `msg`.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo answered other bytes"));
    }
    Ok(())
}

/// A fresh client: connect, one round trip, close.
fn short_client(addr: SocketAddr, n: u64) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    round_trip(&mut s, format!("client {n}").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(())
}

/// Byte `i` of the continuous stream.
fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A stream sending a deterministic byte sequence through the echo connector until `stop`,
/// checking every echoed byte (a running checksum over both). Returns bytes verified.
struct Continuous {
    stop: Arc<AtomicBool>,
    verified: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<std::io::Result<(u64, u64)>>,
    reader: std::thread::JoinHandle<std::io::Result<(u64, u64)>>,
}

impl Continuous {
    fn start(addr: SocketAddr) -> Continuous {
        let s = connect(addr).expect("connect the continuous stream");
        let mut r = s.try_clone().expect("clone");
        let mut w = s;
        let stop = Arc::new(AtomicBool::new(false));
        let verified = Arc::new(AtomicU64::new(0));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
                let mut sent = 0u64;
                let mut sum = 0u64;
                let mut buf = vec![0u8; 8192];
                while !stop.load(Ordering::Relaxed) {
                    for b in buf.iter_mut() {
                        *b = byte_at(sent);
                        sum = sum.wrapping_mul(31).wrapping_add(u64::from(*b));
                        sent += 1;
                    }
                    w.write_all(&buf)?;
                    // ~400 KB/s: continuous, without starving the shared machine.
                    std::thread::sleep(Duration::from_millis(20));
                }
                w.shutdown(Shutdown::Write)?;
                Ok((sent, sum))
            })
        };
        let reader = {
            let verified = verified.clone();
            std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
                let mut got = 0u64;
                let mut sum = 0u64;
                let mut buf = vec![0u8; 16384];
                loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        return Ok((got, sum));
                    }
                    for &b in &buf[..n] {
                        if b != byte_at(got) {
                            return Err(std::io::Error::other(format!(
                                "byte {got} differs after the echo"
                            )));
                        }
                        sum = sum.wrapping_mul(31).wrapping_add(u64::from(b));
                        got += 1;
                    }
                    verified.store(got, Ordering::Relaxed);
                }
            })
        };
        Continuous {
            stop,
            verified,
            writer,
            reader,
        }
    }

    /// Stops sending, waits for the whole echo; panics unless every byte came back intact.
    fn finish(self, logs: impl Fn() -> String) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().expect("writer thread");
        let got = self.reader.join().expect("reader thread");
        match (sent, got) {
            (Ok((n, a)), Ok((m, b))) => {
                assert_eq!((n, a), (m, b), "echo length/checksum differ\n{}", logs());
                n
            }
            (s, g) => panic!(
                "continuous stream broke: sent {s:?}, received {g:?}\n{}",
                logs()
            ),
        }
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn connects_ok(tunnel: &Tunnel) -> f64 {
    metric(
        &tunnel.agent_metrics(),
        "nowconnect_agent_connects_total",
        &[("result", "ok")],
    )
    .unwrap_or(0.0)
}

/// `client_credentials:` lines for the agent's `token:` section.
fn cc_lines(url: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "client_credentials:".to_owned(),
        format!("  token_url: {url}"),
        format!("  client_id: {CLIENT_ID}"),
        format!("  client_secret: {SECRET}"),
        "  scope: nowconnect".to_owned(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Tokens of `ttl` seconds for the default agent, signed by the tunnel's key.
fn mint_short(tunnel: &Tunnel, ttl: u64) -> impl Fn() -> (String, u64) + Send + 'static {
    let key = tunnel.keys.es256.clone();
    move || {
        (
            key.sign(&JwtKeys::agent_claims(ISSUER, AUDIENCE, AGENT_ID, ttl)),
            ttl,
        )
    }
}

/// 20 s tokens from the client-credentials endpoint, `renew_at: 50%`: the agent sends RENEW
/// every ~10 s with a freshly fetched token. One stream transfers continuously across at least
/// two renewals: every byte comes back, one tunnel from start to end (one `ok` connect), the hub
/// logs each renewal and never expires the session (its leeway is 1 s, so a missed renewal
/// would show as GOAWAY(TOKEN_EXPIRED) and a reconnect).
#[test]
fn renewal_keeps_one_tunnel_and_its_stream_across_token_lifetimes() {
    let echo = echo_server();
    let idp = TokenEndpoint::start(CLIENT_ID, SECRET);
    let lines = cc_lines(&idp.url(), &[]);
    let mut token: Vec<&str> = lines.iter().map(String::as_str).collect();
    token.push("renew_at: 50%");
    let mut tunnel = Tunnel::builder(Transport::Wss)
        .hub_auth("leeway", "1s")
        .agent_token(&token)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    idp.set_minter(mint_short(&tunnel, 20));
    tunnel.start_agent();
    tunnel.wait_ready();
    let addr = tunnel.connector("echo");

    let stream = Continuous::start(addr);
    let started = Instant::now();
    let renewed = wait_until(Duration::from_secs(60), || {
        count(&tunnel.hub_log(), "\"token renewed\"") >= 2 && tunnel.exited().is_none()
    });
    assert!(
        renewed,
        "fewer than 2 RENEWs in 60 s ({} bytes verified)\n{}",
        stream.verified.load(Ordering::Relaxed),
        tunnel.logs()
    );
    // A client opened now still works (the renewed session serves new streams).
    short_client(addr, 1)
        .unwrap_or_else(|e| panic!("client after renewals: {e}\n{}", tunnel.logs()));
    let bytes = stream.finish(|| tunnel.logs());
    let took = started.elapsed();

    let hub_log = tunnel.hub_log();
    let agent_log = tunnel.agent_log();
    let renews = count(&hub_log, "\"token renewed\"");
    eprintln!(
        "[renewal] {bytes} bytes over {took:?}, {renews} RENEWs, {} tokens issued",
        idp.issued()
    );
    assert!(bytes > 1_000_000, "the stream moved only {bytes} bytes");
    assert_eq!(
        connects_ok(&tunnel),
        1.0,
        "a reconnect happened\n{}",
        tunnel.logs()
    );
    assert_eq!(count(&hub_log, "TOKEN_EXPIRED"), 0, "{hub_log}");
    assert_eq!(count(&agent_log, "\"tunnel down\""), 0, "{agent_log}");
    assert!(count(&agent_log, "\"RENEW sent\"") >= 2, "{agent_log}");
    for t in idp.tokens() {
        assert!(
            !agent_log.contains(&t) && !hub_log.contains(&t),
            "a token is in a log"
        );
    }
    // Initial token plus one refresh per renewal, each ahead of expiry.
    assert!(
        idp.issued() >= 3,
        "token endpoint issued {} tokens",
        idp.issued()
    );
    assert!(
        metric(&tunnel.hub_metrics(), "nowconnect_tunnels_active", &[]) == Some(1.0),
        "{}",
        tunnel.hub_metrics()
    );
}

/// `renew: false`, a `token.file` the operator rotates, 20 s tokens, hub leeway 1 s. Before the
/// token lapses the agent dials a replacement with the rotated token and moves to it once it
/// has HELLO_ACK; clients connecting all along succeed (no gap); a stream opened on the old
/// tunnel keeps going while the hub sends that session GOAWAY(TOKEN_EXPIRED), and completes.
#[test]
fn without_renewal_the_tunnel_is_replaced_before_the_token_lapses() {
    let echo = echo_server();
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .hub_auth("leeway", "1s")
        .agent_token(&["file: token.jwt", "renew: false"])
        .hub_limit("shutdown_grace: 30s")
        .agent_limit("shutdown_grace: 30s")
        .connector("echo", &[echo])
        .without_agent()
        .start();
    let ttl = 20;
    let first = tunnel.mint(&JwtKeys::agent_claims(ISSUER, AUDIENCE, AGENT_ID, ttl));
    let expires = now_secs() + ttl;
    tunnel.write_token(&first);
    tunnel.start_agent();
    tunnel.wait_ready();
    let addr = tunnel.connector("echo");
    // The operator's rotation: a newer token is in the file long before the first one lapses.
    tunnel.write_token(&tunnel.valid_token(AGENT_ID));

    // A stream on the old tunnel.
    let mut old_stream = connect(addr).expect("connect the long stream");
    round_trip(&mut old_stream, b"on the first tunnel").expect("first round trip");

    // Clients every 100 ms until the hub has expired the first session.
    let mut clients = 0u64;
    let mut failures = Vec::new();
    let mut long_trips = 0u64;
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut expired_seen = false;
    while Instant::now() < deadline {
        clients += 1;
        if let Err(e) = short_client(addr, clients) {
            failures.push(format!(
                "client {clients} at exp{:+}s: {e}",
                now_secs() as i64 - expires as i64
            ));
        }
        if let Err(e) = round_trip(&mut old_stream, b"still on the first tunnel") {
            panic!("the stream on the old tunnel broke: {e}\n{}", tunnel.logs());
        }
        long_trips += 1;
        if !expired_seen && tunnel.hub_log().contains("GOAWAY(TOKEN_EXPIRED)") {
            expired_seen = true;
            // Keep going a little past the hub's GOAWAY.
            let extra = Instant::now() + Duration::from_secs(2);
            while Instant::now() < extra {
                clients += 1;
                if let Err(e) = short_client(addr, clients) {
                    failures.push(format!("client {clients} after GOAWAY: {e}"));
                }
                round_trip(&mut old_stream, b"draining").unwrap_or_else(|e| {
                    panic!("the old stream broke after GOAWAY: {e}\n{}", tunnel.logs())
                });
                std::thread::sleep(Duration::from_millis(100));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        expired_seen,
        "the hub never sent GOAWAY(TOKEN_EXPIRED) to the first session\n{}",
        tunnel.logs()
    );
    // The old stream completes: a clean half-close, everything echoed.
    old_stream.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    old_stream
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("the old stream did not complete: {e}\n{}", tunnel.logs()));
    eprintln!("[replace] {clients} clients, {long_trips} round trips on the old stream, failures {failures:?}");
    assert!(
        failures.is_empty(),
        "clients saw a gap: {failures:?}\n{}",
        tunnel.logs()
    );
    assert!(clients > 50, "only {clients} clients ran");
    let agent_log = tunnel.agent_log();
    assert!(
        agent_log.contains("replacement tunnel up; the old one drains"),
        "{agent_log}"
    );
    // Make before break: the replacement was up before the hub expired the first session.
    let ts_of = |log: &str, msg: &str| -> Vec<u64> {
        log_records(log)
            .iter()
            .filter(|r| r.get("msg").and_then(|m| m.as_str()) == Some(msg))
            .filter_map(log_ts_millis)
            .collect()
    };
    let ups = ts_of(&agent_log, "tunnel up");
    let expired = ts_of(
        &tunnel.hub_log(),
        "token expired without RENEW: GOAWAY(TOKEN_EXPIRED)",
    );
    assert_eq!((ups.len(), expired.len()), (2, 1), "{}", tunnel.logs());
    assert!(
        ups[1] < expired[0],
        "the replacement came up {} ms after the hub's GOAWAY(TOKEN_EXPIRED)",
        ups[1] - expired[0]
    );
    eprintln!(
        "[replace] replacement up {} ms before the hub expired the first session",
        expired[0] - ups[1]
    );
    assert_eq!(
        count(&tunnel.hub_log(), "\"token renewed\""),
        0,
        "renew: false sends no RENEW"
    );
    assert_eq!(count(&agent_log, "\"RENEW sent\""), 0);
    // Exactly one replacement: the first tunnel and its successor.
    assert_eq!(connects_ok(&tunnel), 2.0, "{}", tunnel.logs());
    // The old tunnel goes once its stream has ended.
    let one = wait_until(Duration::from_secs(20), || {
        metric(&tunnel.hub_metrics(), "nowconnect_tunnels_active", &[]) == Some(1.0)
    });
    assert!(one, "the old tunnel did not close\n{}", tunnel.logs());
    short_client(addr, 0)
        .unwrap_or_else(|e| panic!("client on the new tunnel: {e}\n{}", tunnel.logs()));
}

/// `token.client_credentials` over HTTPS (`hub.ca_file` trusted): with a secret the endpoint
/// refuses, the agent logs the status and OAuth2 error (never the secret), and retries with
/// backoff; once the endpoint accepts the secret the agent gets a token and connects. The endpoint saw HTTP Basic client
/// authentication, `grant_type=client_credentials` and the configured scope.
#[test]
fn client_credentials_wrong_secret_is_retried_then_connects() {
    let echo = echo_server();
    // HTTPS with the hub's certificate: the agent trusts its CA through hub.ca_file.
    let idp = TokenEndpoint::start_https(CLIENT_ID, "the-secret-the-idp-expects");
    let lines = cc_lines(&idp.url(), &[]);
    let token: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut tunnel = Tunnel::builder(Transport::Wss)
        .reconnect("300ms", "3s")
        .agent_token(&token)
        .connector("echo", &[echo])
        .without_agent()
        .start();
    idp.set_minter(mint_short(&tunnel, 300));
    idp.set_tls(tunnel.tls.as_ref().expect("wss tunnel has TLS files"));
    tunnel.start_agent();

    // Refused attempts, spaced out by the backoff.
    let refused = wait_until(Duration::from_secs(30), || {
        idp.requests().iter().filter(|r| r.status == 401).count() >= 4
    });
    assert!(
        refused,
        "fewer than 4 attempts in 30 s: {:?}\n{}",
        idp.requests(),
        tunnel.logs()
    );
    let ok_logged = wait_until(Duration::from_secs(10), || {
        let log = tunnel.agent_log();
        log.contains("HTTP 401")
            && log.contains("invalid_client")
            && log.contains("tunnel connect failed")
    });
    assert!(
        ok_logged,
        "no clear error in the agent log\n{}",
        tunnel.agent_log()
    );
    let requests = idp.requests();
    let gaps: Vec<Duration> = requests
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    eprintln!(
        "[client_credentials] refused attempts {} apart: {gaps:?}",
        requests.len()
    );
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(900)),
        "attempts not spaced out: {gaps:?}"
    );
    assert!(
        tunnel.exited().is_none(),
        "the agent gave up\n{}",
        tunnel.logs()
    );
    assert_eq!(
        connects_ok(&tunnel),
        0.0,
        "connected with a refused secret?"
    );

    // The IdP now accepts the agent's secret: the agent connects.
    idp.set_secret(SECRET);
    tunnel.wait_ready();
    short_client(tunnel.connector("echo"), 1).expect("client through the tunnel");

    let requests = idp.requests();
    let issued: Vec<_> = requests.iter().filter(|r| r.status == 200).collect();
    assert_eq!(issued.len(), 1, "one token, cached: {requests:?}");
    let r = issued[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(r.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(r.field("scope"), Some("nowconnect"));
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert!(r.field("client_secret").is_none());
    assert!(requests
        .iter()
        .all(|r| r.client_id.as_deref() == Some(CLIENT_ID)));

    let agent_log = tunnel.agent_log();
    assert!(
        agent_log.contains("token obtained from the token endpoint"),
        "{agent_log}"
    );
    for (name, log) in [("agent", &agent_log), ("hub", &tunnel.hub_log())] {
        assert!(
            !log.contains(SECRET),
            "the client secret is in the {name} log"
        );
        assert!(!log.contains("the-secret-the-idp-expects"));
        for t in idp.tokens() {
            assert!(!log.contains(&t), "an access token is in the {name} log");
        }
    }
}
