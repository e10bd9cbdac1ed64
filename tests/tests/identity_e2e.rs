//! Agent identity end to end: the real `nowconnect-hub` fetching its JWKS from an HTTPS identity
//! provider ([`Idp`], rustls on loopback, trusted through `auth.jwks_ca`) and the real
//! `nowconnect-agent` (security.md "Agent authentication", "Authorization" 1).
//!
//! - key rotation without a hub restart (periodic `jwks_refresh`);
//! - an unknown `kid` refreshes the JWKS at most once per rate-limit period;
//! - IdP down at start: not ready, upgrades get 503 (not 401), ready by itself once it is up;
//! - a failed refresh keeps the last good keys;
//! - connector scopes (`auth.connectors_claim`) in HELLO_ACK and on the upgrade (403);
//! - the attack matrix against the real upgrade, with every allowed algorithm as control.
//!
//! Each test runs its own IdP and hub, so the harness runs them in parallel; the slow ones wait
//! for the hub's timers (`jwks_refresh` ≥ 10 s, the 30 s unknown-kid rate limit).

use nowconnect_tests::echo_server;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nowconnect_tests::idp::Idp;
use nowconnect_tests::tunnel::{
    http_get, log_records, metric, Transport, Tunnel, AGENT_ID, AUDIENCE, ISSUER, TUNNEL_PATH,
};
use nowconnect_tests::*;
use serde_json::{json, Value};

const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for one periodic refresh (`jwks_refresh: 10s`) on a loaded machine.
const REFRESH_WAIT: Duration = Duration::from_secs(40);
/// The hub's unknown-kid refresh rate limit (hub/src/auth.rs `KID_REFRESH_MIN_INTERVAL`).
const KID_REFRESH_PERIOD: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// One echo round trip through the hub's connector listener `addr`.
fn echo_through(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let msg = b"identity e2e: hello through the tunnel";
    s.write_all(msg).expect("echo write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo read");
    assert_eq!(&back, msg);
}

/// Standard claims for `agent_id`, valid for an hour.
fn claims(agent_id: &str) -> Value {
    JwtKeys::agent_claims(ISSUER, AUDIENCE, agent_id, 3600)
}

/// `claims` with fields replaced (`null` removes one).
fn claims_with(patch: Value) -> Value {
    let mut c = claims(AGENT_ID);
    for (k, v) in patch.as_object().expect("patch object") {
        if v.is_null() {
            c.as_object_mut().expect("claims object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// Base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
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

/// A JWS with any header, claims and signature bytes (for what jsonwebtoken will not produce).
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(signature)
    )
}

/// Signs `claims` with `key` under header `{alg, kid}` (kid `None`: no kid).
fn sign_as(key: &JwtKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    key.sign_with_header(&h, claims)
}

/// The hub's answer to an upgrade request.
#[derive(Debug)]
struct Answer {
    /// `None`: the connection ended without a status line (reset).
    status: Option<u16>,
    raw: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or("");
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    fn body(&self) -> &str {
        self.raw.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// A raw `GET /v1/tunnel` WebSocket upgrade to a plaintext hub, with `Authorization: Bearer`
/// when `token` is given. Reads the answer to EOF (or the end of a 101 head).
fn upgrade(addr: SocketAddr, token: Option<&str>) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut req = format!(
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: nowconnect.v1\r\n"
    );
    if let Some(tok) = token {
        req += &format!("Authorization: Bearer {tok}\r\n");
    }
    req += "\r\n";
    // An oversized request may be answered (and the socket closed) before it is all written.
    let _ = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                break
            }
            Err(e) => panic!("read upgrade answer: {e}"),
        }
        if raw.starts_with(b"HTTP/1.1 101") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    Answer { status, raw }
}

/// Asserts the upgrade with `token` is accepted (101).
#[track_caller]
fn assert_accepted(tunnel: &Tunnel, what: &str, token: &str) {
    let a = upgrade(tunnel.hub_listen, Some(token));
    assert_eq!(
        a.status,
        Some(101),
        "{what}: valid token refused: {a:?}\n{}",
        tunnel.logs()
    );
}

/// Asserts the upgrade with `token` is refused 401 `invalid_token` for `reason` (the hub's
/// answer body names it), without echoing the token.
#[track_caller]
fn assert_refused(tunnel: &Tunnel, what: &str, token: &str, reason: &str) {
    let a = upgrade(tunnel.hub_listen, Some(token));
    assert_eq!(a.status, Some(401), "{what}: {a:?}\n{}", tunnel.logs());
    assert_eq!(
        a.header("WWW-Authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{what}: {a:?}"
    );
    assert_eq!(
        a.body().trim(),
        format!("invalid token: {reason}"),
        "{what}: refused for another reason"
    );
    assert!(
        !a.raw.contains(token),
        "{what}: the answer echoes the token"
    );
}

/// `nowconnect_jwks_refresh_total{result}` of the hub (0 when absent).
fn refreshes(tunnel: &Tunnel, result: &str) -> f64 {
    metric(
        &tunnel.hub_metrics(),
        "nowconnect_jwks_refresh_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

/// Polls until the hub counted at least `n` refreshes with `result`.
#[track_caller]
fn wait_refreshes(tunnel: &Tunnel, result: &str, n: f64, timeout: Duration) {
    let ok = wait_until(timeout, || refreshes(tunnel, result) >= n);
    assert!(
        ok,
        "hub counted {} JWKS refresh(es) {result}, waited for {n} for {timeout:?}\n{}",
        refreshes(tunnel, result),
        tunnel.logs()
    );
}

/// Polls the hub's log until a refresh by `trigger` installed exactly the key set `kids`
/// (sorted, comma-separated).
#[track_caller]
fn wait_key_set(tunnel: &Tunnel, kids: &str, trigger: &str) {
    let installed = |log: &str| {
        log_records(log).iter().any(|r| {
            r["kids"] == json!(kids)
                && r["trigger"] == json!(trigger)
                && r["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("key set changed"))
        })
    };
    assert!(
        wait_until(REFRESH_WAIT, || installed(&tunnel.hub_log())),
        "the hub never installed the key set [{kids}] by a {trigger} refresh\n{}",
        tunnel.logs()
    );
}

/// How many JWKS refreshes an unknown kid triggered, from the hub's log.
fn unknown_kid_refreshes(tunnel: &Tunnel) -> usize {
    log_records(&tunnel.hub_log())
        .iter()
        .filter(|r| r["trigger"] == json!("unknown_kid"))
        .count()
}

/// The hub's `/readyz`: status and JSON body.
fn hub_readyz(tunnel: &Tunnel) -> (u16, Value) {
    let (status, body) = http_get(tunnel.hub_admin, "/readyz").expect("hub /readyz");
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, body)
}

/// An echo tunnel whose hub gets its keys from `idp`, the agent holding `token`.
fn idp_tunnel(idp: &Idp, token: String) -> nowconnect_tests::tunnel::TunnelBuilder {
    Tunnel::builder(Transport::Ws)
        .connector("echo", &[echo_server()])
        .jwks_url(idp.url(), idp.ca_file())
        .token(token)
}

// ---------------------------------------------------------------------------------------------
// Key rotation, refresh, availability
// ---------------------------------------------------------------------------------------------

/// The IdP rotates from key A to key B: {A} → {A, B} → {B}. After each periodic refresh the hub
/// uses the new set without a restart: B is accepted once published (without an unknown-kid
/// refresh), A is refused 401 once withdrawn, and an agent holding a B token connects.
#[test]
fn jwks_rotation_without_restart() {
    let a = JwtKey::es256("rotation-a");
    let b = JwtKey::es256("rotation-b");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    let a_token = a.sign(&claims(AGENT_ID));
    let b_token = b.sign(&claims(AGENT_ID));
    let mut tunnel = idp_tunnel(&idp, a_token.clone())
        .hub_auth("jwks_refresh", "10s")
        .start();
    let hub_pid = tunnel.hub_pid();
    echo_through(tunnel.connector("echo"));
    assert!(idp.requests() >= 1, "the hub never fetched over HTTPS");
    // Not published yet: refused (after the one unknown-kid refresh, which finds no B either).
    assert_refused(&tunnel, "B before publication", &b_token, "unknown_kid");

    // Publish {A, B}; the next periodic refresh installs it.
    idp.set_jwks(&JwtKeys::jwks_of(&[&a, &b]));
    wait_key_set(&tunnel, "rotation-a,rotation-b", "scheduled");
    let kid_refreshes = unknown_kid_refreshes(&tunnel);
    assert_eq!(
        kid_refreshes, 1,
        "B before publication: one unknown-kid refresh"
    );
    assert_accepted(&tunnel, "B after {A,B}", &b_token);
    assert_accepted(&tunnel, "A after {A,B}", &a_token);
    assert_eq!(
        unknown_kid_refreshes(&tunnel),
        kid_refreshes,
        "both kids were known from the periodic refresh: no unknown-kid refresh expected"
    );

    // Withdraw A; the next periodic refresh installs {B}.
    idp.set_jwks(&JwtKeys::jwks_of(&[&b]));
    wait_key_set(&tunnel, "rotation-b", "scheduled");
    assert_refused(&tunnel, "A after {B}", &a_token, "unknown_kid");
    assert_accepted(&tunnel, "B after {B}", &b_token);

    // The agent reconnects with a B token and carries data.
    tunnel.kill_agent();
    tunnel.write_token(&b_token);
    tunnel.start_agent();
    tunnel.wait_ready();
    echo_through(tunnel.connector("echo"));
    assert_eq!(tunnel.hub_pid(), hub_pid, "the hub was restarted");
    tunnel.assert_running();
}

/// Tokens with a `kid` the hub does not know trigger one JWKS refresh per rate-limit period,
/// however many arrive: the first finds a newly published key at once; a burst of unknown kids
/// right after fetches nothing; the next refresh comes only after the period.
#[test]
fn unknown_kid_refresh_is_rate_limited() {
    let a = JwtKey::es256("kid-a");
    let c = JwtKey::es256("kid-c");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    let tunnel = idp_tunnel(&idp, a.sign(&claims(AGENT_ID)))
        .hub_auth("jwks_refresh", "10m")
        .without_agent()
        .start();
    assert_eq!(idp.requests(), 1, "one fetch at start");

    // C is published after the hub loaded: the first C token refreshes (once) and is accepted.
    idp.set_jwks(&JwtKeys::jwks_of(&[&a, &c]));
    let period_start = Instant::now();
    assert_accepted(&tunnel, "newly published kid", &c.sign(&claims(AGENT_ID)));
    assert_eq!(
        idp.requests(),
        2,
        "the unknown kid caused exactly one refresh"
    );
    wait_refreshes(&tunnel, "ok", 2.0, IO_TIMEOUT);
    wait_key_set(&tunnel, "kid-a,kid-c", "unknown_kid");

    // A burst of unknown kids, 8 connections at a time: all 401, no fetch.
    let tunnel = Arc::new(tunnel);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let tunnel = tunnel.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..4 {
                    let kid = format!("nobody-{t}-{i}");
                    let token = sign_as(&a, Algorithm::ES256, Some(&kid), &claims(AGENT_ID));
                    assert_refused(&tunnel, &kid, &token, "unknown_kid");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("burst thread");
    }
    assert_eq!(
        idp.requests(),
        2,
        "32 unknown-kid upgrades within the rate-limit period fetched the JWKS again"
    );
    assert!(
        period_start.elapsed() < KID_REFRESH_PERIOD,
        "the burst took longer than the rate-limit period: the count proves nothing"
    );
    assert_eq!(
        unknown_kid_refreshes(&tunnel),
        1,
        "the hub logged more than one unknown-kid refresh"
    );

    // After the period, one more unknown kid may refresh again (exactly once).
    let token = sign_as(&a, Algorithm::ES256, Some("nobody-late"), &claims(AGENT_ID));
    let refreshed = wait_until(KID_REFRESH_PERIOD + REFRESH_WAIT, || {
        let a = upgrade(tunnel.hub_listen, Some(&token));
        assert_eq!(a.status, Some(401), "{a:?}");
        idp.requests() >= 3 || {
            std::thread::sleep(Duration::from_millis(500));
            false
        }
    });
    assert!(
        refreshed,
        "no unknown-kid refresh after the rate-limit period"
    );
    assert!(
        period_start.elapsed() >= KID_REFRESH_PERIOD,
        "a second unknown-kid refresh after {:?}, within the rate-limit period",
        period_start.elapsed()
    );
    assert_eq!(idp.requests(), 3);
    let log = tunnel.hub_log();
    assert!(log.contains("unknown_kid"), "hub log names no unknown_kid");
}

/// The IdP is down when the hub starts: `/readyz` is 503 (`jwks_loaded: false`), every upgrade
/// gets 503 — not 401, so agents do not take it for a bad token — and the agent is not ready.
/// Once the IdP is up, the hub becomes ready by itself and the agent connects.
#[test]
fn idp_down_at_start_then_ready_by_itself() {
    let a = JwtKey::es256("down-a");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    idp.down();
    let token = a.sign(&claims(AGENT_ID));
    let mut tunnel = idp_tunnel(&idp, token.clone())
        .hub_no_wait()
        .no_wait()
        .start();

    // The hub tries and fails (the failure is counted), and stays not ready.
    wait_refreshes(&tunnel, "error", 1.0, IO_TIMEOUT);
    let (status, body) = hub_readyz(&tunnel);
    assert_eq!(status, 503, "hub ready without keys: {body}");
    assert_eq!(body["jwks_loaded"], json!(false), "{body}");
    for (what, tok) in [
        ("valid token", Some(token.as_str())),
        ("garbage token", Some("not.a.jwt")),
        ("no token", None),
    ] {
        let a = upgrade(tunnel.hub_listen, tok);
        assert_eq!(a.status, Some(503), "{what} while not ready: {a:?}");
        assert!(a.header("WWW-Authenticate").is_none(), "{what}: {a:?}");
    }
    let log = tunnel.hub_log();
    assert!(
        log.contains("JWKS not loaded"),
        "hub does not warn that the JWKS is not loaded\n{log}"
    );
    // The agent has been refused meanwhile, never as unauthorized.
    let agent_admin = tunnel.agent_admin;
    let tried = wait_until(IO_TIMEOUT, || {
        matches!(http_get(agent_admin, "/metrics"), Ok((200, m))
            if metric(&m, "nowconnect_agent_connects_total", &[]).unwrap_or(0.0) >= 1.0)
    });
    assert!(tried, "the agent never tried\n{}", tunnel.logs());
    let m = tunnel.agent_metrics();
    assert_eq!(
        metric(
            &m,
            "nowconnect_agent_connects_total",
            &[("result", "unauthorized")]
        ),
        None,
        "the agent saw a 401 while the hub had no keys\n{m}"
    );
    assert_eq!(
        http_get(agent_admin, "/readyz").expect("agent /readyz").0,
        503
    );

    // The IdP comes up: ready without a restart, the agent gets in.
    let hub_pid = tunnel.hub_pid();
    idp.up();
    let admin = tunnel.hub_admin;
    assert!(
        wait_until(REFRESH_WAIT, || matches!(
            http_get(admin, "/readyz"),
            Ok((200, _))
        )),
        "hub not ready after the IdP came up\n{}",
        tunnel.logs()
    );
    assert_eq!(hub_readyz(&tunnel).1["jwks_loaded"], json!(true));
    tunnel.wait_ready();
    echo_through(tunnel.connector("echo"));
    assert_eq!(tunnel.hub_pid(), hub_pid);
    assert!(tunnel.hub_log().contains("JWKS loaded"));
}

/// The JWKS fetch verifies the IdP's certificate: with `jwks_ca` naming another CA, or with no
/// `jwks_ca` (the system roots do not know the test CA), the TLS handshake fails, no document
/// is fetched, and the hub stays not ready (503).
#[test]
fn idp_certificate_is_verified() {
    let a = JwtKey::es256("tls-a");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    let dir = temp_dir("identity-tls");
    let other_ca = dir.path().join("other-ca.pem");
    TestCa::new("Some other CA").write_cert(&other_ca);
    let token = a.sign(&claims(AGENT_ID));
    for (what, ca) in [
        ("another CA", Some(other_ca.as_path())),
        ("no jwks_ca", None),
    ] {
        let builder = Tunnel::builder(Transport::Ws)
            .connector("echo", &[echo_server()])
            .hub_auth_remove("jwks_file")
            .hub_auth("jwks_url", idp.url())
            .without_agent()
            .hub_no_wait();
        let builder = match ca {
            Some(ca) => builder.hub_auth("jwks_ca", &ca.display().to_string()),
            None => builder,
        };
        let connections = idp.connections();
        let tunnel = builder.start();
        wait_refreshes(&tunnel, "error", 1.0, IO_TIMEOUT);
        assert!(
            idp.connections() > connections,
            "{what}: the hub never dialed the IdP"
        );
        assert_eq!(
            idp.requests(),
            0,
            "{what}: a JWKS was served over an unverified TLS"
        );
        let (status, body) = hub_readyz(&tunnel);
        assert_eq!(status, 503, "{what}: hub ready: {body}");
        assert_eq!(
            upgrade(tunnel.hub_listen, Some(&token)).status,
            Some(503),
            "{what}"
        );
        let log = tunnel.hub_log();
        assert!(
            log.to_ascii_lowercase().contains("certificate"),
            "{what}: the hub's warning does not name the certificate problem\n{log}"
        );
    }
}

/// The IdP goes down after the hub loaded its keys: refreshes fail (counted, warned), the hub
/// stays ready with the last good keys, agents keep connecting; the next refresh after the IdP
/// is back succeeds.
#[test]
fn failed_refresh_keeps_last_good_keys() {
    let a = JwtKey::es256("keep-a");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    let token = a.sign(&claims(AGENT_ID));
    let mut tunnel = idp_tunnel(&idp, token.clone())
        .hub_auth("jwks_refresh", "10s")
        .start();
    assert_eq!(refreshes(&tunnel, "error"), 0.0);

    idp.down();
    wait_refreshes(&tunnel, "error", 1.0, REFRESH_WAIT);
    let (status, body) = hub_readyz(&tunnel);
    assert_eq!(status, 200, "hub not ready after a failed refresh: {body}");
    let warned = log_records(&tunnel.hub_log()).into_iter().any(|r| {
        r["level"]
            .as_str()
            .is_some_and(|l| l.eq_ignore_ascii_case("warn"))
            && r["msg"]
                .as_str()
                .is_some_and(|m| m.contains("keeping the last good keys"))
    });
    assert!(
        warned,
        "no warning about the failed refresh\n{}",
        tunnel.hub_log()
    );
    // The last good keys still admit agents: a raw upgrade, and the agent reconnecting.
    assert_accepted(&tunnel, "A while the IdP is down", &token);
    echo_through(tunnel.connector("echo"));
    tunnel.kill_agent();
    tunnel.start_agent();
    tunnel.wait_ready();
    echo_through(tunnel.connector("echo"));

    // Back up, but publishing an empty key set: also a failed refresh, the keys stay.
    idp.set_jwks(&json!({"keys": []}));
    idp.up();
    let refused_empty_set = wait_until(REFRESH_WAIT, || {
        tunnel.hub_log().contains("JWKS has no key with a kid")
    });
    assert!(
        refused_empty_set,
        "the hub never tried (or took) the empty key set\n{}",
        tunnel.logs()
    );
    assert_accepted(&tunnel, "A after an empty key set", &token);
    assert_eq!(hub_readyz(&tunnel).0, 200);

    // A good set again: the next refresh (retried within jwks_refresh) succeeds.
    let ok = refreshes(&tunnel, "ok");
    idp.set_jwks(&JwtKeys::jwks_of(&[&a]));
    wait_refreshes(&tunnel, "ok", ok + 1.0, REFRESH_WAIT);
    assert_accepted(&tunnel, "A after recovery", &token);
    tunnel.assert_running();
}

/// A hung IdP (accepts, never answers) holds an unknown-kid upgrade only for the bounded
/// unknown-kid fetch (5 s), so it is still answered 401 inside the 10 s handshake deadline;
/// meanwhile an upgrade with a known kid is answered at once (validation never waits on the
/// network).
#[test]
fn hung_idp_delays_only_the_unknown_kid_upgrade() {
    let a = JwtKey::es256("hung-a");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&a]));
    let tunnel = idp_tunnel(&idp, a.sign(&claims(AGENT_ID)))
        .hub_auth("jwks_refresh", "10m")
        .without_agent()
        .start();
    idp.stall(true);
    let connections = idp.connections();
    let hub = tunnel.hub_listen;
    let unknown = sign_as(
        &a,
        Algorithm::ES256,
        Some("hung-unknown"),
        &claims(AGENT_ID),
    );
    let slow = {
        let unknown = unknown.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            (upgrade(hub, Some(&unknown)), started.elapsed())
        })
    };
    assert!(
        wait_until(IO_TIMEOUT, || idp.connections() > connections),
        "the unknown kid did not make the hub fetch\n{}",
        tunnel.logs()
    );
    assert_accepted(
        &tunnel,
        "known kid during a hung fetch",
        &a.sign(&claims(AGENT_ID)),
    );
    assert!(
        !slow.is_finished(),
        "the unknown-kid upgrade was answered before the known-kid one: the fetch did not hang"
    );
    let (answer, took) = slow.join().expect("unknown-kid upgrade");
    assert_eq!(
        answer.status,
        Some(401),
        "unknown kid with a hung IdP (after {took:?}): {answer:?}\n{}",
        tunnel.logs()
    );
    assert_eq!(answer.body().trim(), "invalid token: unknown_kid");
    assert!(
        took < Duration::from_secs(9),
        "the unknown-kid fetch held the upgrade {took:?}"
    );
    idp.stall(false);
    wait_refreshes(&tunnel, "error", 1.0, IO_TIMEOUT);
    assert_eq!(
        hub_readyz(&tunnel).0,
        200,
        "a hung IdP made the hub not ready"
    );
}

// ---------------------------------------------------------------------------------------------
// Connector scopes
// ---------------------------------------------------------------------------------------------

/// `auth.connectors_claim`: an agent serving `ldap` and `ssh` with a token scoped to `ldap` gets
/// only ldap accepted in HELLO_ACK: LDAP works through the hub, SSH does not (no session serves
/// it), and the agent logs and shows ssh as rejected "not in token scope". A token naming no
/// connector of the hub is refused at the upgrade with 403.
#[test]
fn connector_scopes_from_the_token() {
    let dir = temp_dir("identity-scopes");
    let slapd = Slapd::start(dir.path(), None);
    let sshd = Sshd::start(dir.path());
    let key = JwtKey::es256("scope-a");
    let idp = Idp::start(&JwtKeys::jwks_of(&[&key]));
    let scoped = |scope: Value| {
        let mut c = claims(AGENT_ID);
        c["nowconnect_connectors"] = scope;
        key.sign(&c)
    };
    let tunnel = Tunnel::builder(Transport::Ws)
        .connector("ldap", &[slapd.ldap])
        .connector("ssh", &[sshd.addr])
        .jwks_url(idp.url(), idp.ca_file())
        .hub_auth("connectors_claim", "nowconnect_connectors")
        .token(scoped(json!(["ldap"])))
        .no_wait()
        .start();

    // Ready: the agent has its HELLO_ACK and the hub routes ldap.
    let (agent_admin, hub_admin) = (tunnel.agent_admin, tunnel.hub_admin);
    let available = |m: &str, c: &str| {
        metric(m, "nowconnect_connector_available", &[("connector", c)]) == Some(1.0)
    };
    let ready = wait_until(Duration::from_secs(30), || {
        matches!(http_get(agent_admin, "/readyz"), Ok((200, _)))
            && matches!(http_get(hub_admin, "/metrics"), Ok((200, m)) if available(&m, "ldap"))
    });
    assert!(ready, "ldap never became available\n{}", tunnel.logs());
    let hub_metrics = tunnel.hub_metrics();
    assert!(
        !available(&hub_metrics, "ssh"),
        "ssh available although out of scope\n{hub_metrics}"
    );

    let ldap_url = format!("ldap://127.0.0.1:{}", tunnel.connector("ldap").port());
    let out = ldapsearch(&ldap_url, None, "(uid=alice)").assert_success();
    assert!(
        out.stdout
            .contains("dn: uid=alice,ou=people,dc=example,dc=com"),
        "{out}"
    );
    // Control: sshd itself works; through the hub's ssh listener it does not.
    sshd.ssh(sshd.addr, "echo direct").assert_success();
    sshd.ssh(tunnel.connector("ssh"), "echo hi")
        .assert_failure();

    // The agent says why.
    let rejected = log_records(&tunnel.agent_log()).into_iter().any(|r| {
        r["msg"] == json!("hub rejected connector")
            && r["connector"] == json!("ssh")
            && r["reason"] == json!("not in token scope")
    });
    assert!(
        rejected,
        "agent log does not show ssh rejected\n{}",
        tunnel.agent_log()
    );
    let (_, page) = http_get(agent_admin, "/").expect("agent status page");
    assert!(
        page.contains("ssh (not in token scope)"),
        "agent status page does not show ssh rejected\n{page}"
    );

    // The claim may also be a space-separated string.
    assert_accepted(&tunnel, "string scope", &scoped(json!("ssh ldap")));
    // A scope with nothing this hub serves: 403 at the upgrade.
    for scope in [json!(["pg"]), json!([]), json!("")] {
        let a = upgrade(tunnel.hub_listen, Some(&scoped(scope.clone())));
        assert_eq!(a.status, Some(403), "scope {scope}: {a:?}");
    }
    // A missing claim is an empty scope.
    let a = upgrade(tunnel.hub_listen, Some(&key.sign(&claims(AGENT_ID))));
    assert_eq!(a.status, Some(403), "no scope claim: {a:?}");
}

// ---------------------------------------------------------------------------------------------
// The attack matrix
// ---------------------------------------------------------------------------------------------

/// `key` under another kid and algorithm (same key material; the JWK says `alg`).
fn variant(key: &JwtKey, kid: &str, alg: Algorithm, alg_name: &str) -> JwtKey {
    let mut k = key.clone();
    k.kid = kid.into();
    k.alg = alg;
    k.jwk["kid"] = json!(kid);
    k.jwk["alg"] = json!(alg_name);
    k
}

/// A fresh P-384 key for ES384.
fn es384(kid: &str) -> JwtKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
    let point = key.public_key_raw();
    assert_eq!(point.len(), 97, "uncompressed P-384 point");
    JwtKey {
        kid: kid.into(),
        alg: Algorithm::ES384,
        private_pem: key.serialize_pem(),
        jwk: json!({
            "kty": "EC", "crv": "P-384",
            "x": b64url(&point[1..49]), "y": b64url(&point[49..97]),
            "kid": kid, "alg": "ES384", "use": "sig",
        }),
    }
}

/// One hub with every algorithm of security.md allowed, keys from the HTTPS IdP. Each allowed
/// algorithm is accepted (controls); every attack of the matrix is refused 401 for its own
/// reason; an oversized request head is refused; the hub stays up and keeps accepting.
#[test]
fn attack_matrix_against_the_real_upgrade() {
    let rs256 = JwtKey::rs256("rsa-rs256");
    let keys = [
        JwtKey::es256("ec-es256"),
        es384("ec-es384"),
        JwtKey::ed25519("okp-eddsa"),
        variant(&rs256, "rsa-rs384", Algorithm::RS384, "RS384"),
        variant(&rs256, "rsa-rs512", Algorithm::RS512, "RS512"),
        variant(&rs256, "rsa-ps256", Algorithm::PS256, "PS256"),
        rs256,
    ];
    let idp = Idp::start(&JwtKeys::jwks_of(&keys.iter().collect::<Vec<_>>()));
    let key = |kid: &str| {
        keys.iter()
            .find(|k| k.kid == kid)
            .unwrap_or_else(|| panic!("no key {kid}"))
    };
    let (ec, rsa) = (key("ec-es256"), key("rsa-rs256"));
    let mut tunnel = Tunnel::builder(Transport::Ws)
        .connector("unused", &["127.0.0.1:9"])
        .jwks_url(idp.url(), idp.ca_file())
        .hub_auth(
            "algorithms",
            "[RS256, RS384, RS512, PS256, ES256, ES384, EdDSA]",
        )
        .without_agent()
        .start();
    let hub_pid = tunnel.hub_pid();
    let valid = claims(AGENT_ID);

    // Controls: every configured algorithm, each with its own key.
    for k in &keys {
        assert_accepted(
            &tunnel,
            &format!("{:?} ({})", k.alg, k.kid),
            &k.sign(&valid),
        );
    }

    let now = now_secs();
    let ec_public_pem = rcgen::KeyPair::from_pem(&ec.private_pem)
        .expect("parse EC key")
        .public_key_pem();
    let rsa_public_pem = {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(["pkey", "-pubout"]);
        run_cmd(cmd, Some(rsa.private_pem.as_bytes()), CMD_TIMEOUT)
            .assert_success()
            .stdout
    };
    let hs256 = |kid: &str, secret: &[u8]| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            &valid,
            &EncodingKey::from_secret(secret).expect("HMAC key"),
        )
        .expect("HS256")
    };
    let jws_header = |alg: &str, kid: &str| json!({"alg": alg, "typ": "JWT", "kid": kid});
    // A real ES256 signature over an oversized (9 KiB) protected header.
    let big_header = {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(ec.kid.clone());
        h.x5t = Some("A".repeat(9 * 1024));
        ec.sign_with_header(&h, &valid)
    };
    let big_token = {
        let mut c = valid.clone();
        c["padding"] = json!("x".repeat(17 * 1024));
        ec.sign(&c)
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            raw_token(&jws_header("none", "ec-es256"), &valid, b""),
            "alg_none",
        ),
        (
            "alg NoNe",
            raw_token(&jws_header("NoNe", "ec-es256"), &valid, b""),
            "alg_none",
        ),
        (
            "HS256 keyed with the EC public key PEM",
            hs256("ec-es256", ec_public_pem.as_bytes()),
            "alg_hmac",
        ),
        (
            "HS256 keyed with the RSA public key PEM",
            hs256("rsa-rs256", rsa_public_pem.as_bytes()),
            "alg_hmac",
        ),
        (
            "RS256 header naming an EC key",
            sign_as(rsa, Algorithm::RS256, Some("ec-es256"), &valid),
            "key_mismatch",
        ),
        (
            "ES256 header naming an RSA key",
            raw_token(&jws_header("ES256", "rsa-rs256"), &valid, &[7u8; 64]),
            "key_mismatch",
        ),
        (
            "PS256 against a JWK whose alg is RS256",
            sign_as(rsa, Algorithm::PS256, Some("rsa-rs256"), &valid),
            "key_mismatch",
        ),
        (
            "ES384 header naming the P-256 key",
            sign_as(key("ec-es384"), Algorithm::ES384, Some("ec-es256"), &valid),
            "key_mismatch",
        ),
        (
            "EdDSA header naming an EC key",
            sign_as(key("okp-eddsa"), Algorithm::EdDSA, Some("ec-es256"), &valid),
            "key_mismatch",
        ),
        (
            "known kid, foreign key",
            JwtKey::es256("ec-es256").sign(&valid),
            "bad_signature",
        ),
        (
            "payload swapped after signing",
            {
                let signed = ec.sign(&valid);
                let forged = ec.sign(&claims("agent-admin"));
                let (h, rest) = signed.split_once('.').expect("jws");
                let sig = rest.rsplit('.').next().expect("sig");
                let payload = forged.split('.').nth(1).expect("payload");
                format!("{h}.{payload}.{sig}")
            },
            "bad_signature",
        ),
        (
            "expired",
            ec.sign(&claims_with(
                json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
            )),
            "expired",
        ),
        (
            "nbf in the future",
            ec.sign(&claims_with(json!({"nbf": now + 3600}))),
            "not_yet_valid",
        ),
        (
            "iat in the future",
            ec.sign(&claims_with(json!({"iat": now + 3600}))),
            "issued_in_future",
        ),
        (
            "no exp",
            ec.sign(&claims_with(json!({"exp": null}))),
            "missing_exp",
        ),
        (
            "wrong iss",
            ec.sign(&claims_with(json!({"iss": "https://evil.test/"}))),
            "wrong_issuer",
        ),
        (
            "aud missing",
            ec.sign(&claims_with(json!({"aud": null}))),
            "wrong_audience",
        ),
        (
            "wrong aud",
            ec.sign(&claims_with(json!({"aud": ["other-service"]}))),
            "wrong_audience",
        ),
        (
            "no agent id",
            ec.sign(&claims_with(json!({"sub": null}))),
            "missing_agent_id",
        ),
        (
            "PS384: supported, not in auth.algorithms",
            sign_as(rsa, Algorithm::PS384, Some("rsa-ps256"), &valid),
            "alg_not_allowed",
        ),
        (
            "kid missing",
            sign_as(ec, Algorithm::ES256, None, &valid),
            "missing_kid",
        ),
        (
            "jku pointing at the attacker's keys",
            {
                let evil = JwtKey::es256("evil-1");
                let mut h = Header::new(Algorithm::ES256);
                h.kid = Some("evil-1".into());
                h.jku = Some("https://evil.test/jwks.json".into());
                evil.sign_with_header(&h, &valid)
            },
            "unknown_kid",
        ),
        (
            "crit header",
            {
                let mut h = Header::new(Algorithm::ES256);
                h.kid = Some(ec.kid.clone());
                h.crit = Some(vec!["exp".into()]);
                ec.sign_with_header(&h, &valid)
            },
            "crit_header",
        ),
        ("oversized JWS header", big_header, "malformed"),
        ("oversized token", big_token, "too_large"),
        ("not a JWS", "a.b".to_string(), "malformed"),
    ];
    for (what, token, reason) in &cases {
        assert_refused(&tunnel, what, token, reason);
    }
    // A request head over the upgrade's bound (64 KiB): refused before any token check.
    let huge = "A".repeat(80 * 1024);
    let a = upgrade(tunnel.hub_listen, Some(&huge));
    assert!(
        matches!(a.status, None | Some(400) | Some(431)),
        "oversized request head: {a:?}"
    );

    // Still up, same process, still accepting.
    tunnel.assert_running();
    assert_eq!(tunnel.hub_pid(), hub_pid);
    assert_accepted(&tunnel, "after the attacks", &ec.sign(&valid));
    let log = tunnel.hub_log();
    for (what, token, _) in &cases {
        let sig = token.rsplit('.').next().unwrap_or_default();
        assert!(
            sig.len() < 16 || !log.contains(sig),
            "{what}: hub log holds the token's signature"
        );
    }
    let refused = metric(
        &tunnel.hub_metrics(),
        "nowconnect_tunnel_handshakes_total",
        &[("result", "unauthorized")],
    );
    assert!(
        refused.is_some_and(|n| n >= cases.len() as f64),
        "handshakes_total{{result=\"unauthorized\"}} = {refused:?}"
    );
}
