//! The agents' endpoint (wire-protocol.md §1, security.md): an accept thread, then one
//! short-lived thread per connection for TLS + WebSocket upgrade + JWT under one 10 s deadline
//! (at most [`MAX_HANDSHAKES`] at once, [`MAX_HANDSHAKES_PER_SOURCE`] from one address), then
//! the tunnel thread with a [`HubTunnel`] handler.
//!
//! Upgrade answers: 404 wrong path; 400 no `nowconnect.v1` subprotocol or a malformed
//! request; 503 draining, at `max_tunnels`, or no JWKS loaded yet; 401 no token (bare
//! `WWW-Authenticate: Bearer`) or a bad one (`Bearer error="invalid_token"`); 403 a valid token
//! whose connector scope has nothing this hub serves.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use nowconnect_core::{close, Session};
use nowconnect_runtime::ws::{self, AcceptError, Rejection, UpgradeRequest, HANDSHAKE_TIMEOUT};
use nowconnect_runtime::{now, sockopt, Transport, Tunnel};

use crate::auth::{AuthError, Verified};
use crate::listener::{accept_loop, canonical};
use crate::metrics::{self, Handshake};
use crate::server::HubState;
use crate::tunnel::{HubTunnel, Slot, TunnelEntry};

/// Most handshakes (TLS + upgrade + JWT) in progress at once; more connections are dropped
/// until some finish (security.md "Hardening").
pub const MAX_HANDSHAKES: usize = 256;

/// Most handshakes in progress from one source address, so that one host trickling slow
/// upgrades cannot take every place and lock real agents out for the handshake deadline.
/// Generous for many agents behind one NAT: a real handshake takes milliseconds.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// Handshakes in progress, in all and per source address.
#[derive(Default)]
pub struct Handshakes(Mutex<(usize, HashMap<IpAddr, usize>)>);

impl Handshakes {
    /// Takes a place for `ip`, or says which limit is reached.
    fn take(&self, ip: IpAddr) -> Result<(), &'static str> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (all, per) = &mut *g;
        if *all >= MAX_HANDSHAKES {
            return Err("handshakes in progress at the hub's limit");
        }
        let n = per.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return Err("handshakes in progress from this address at the limit");
        }
        *n += 1;
        *all += 1;
        Ok(())
    }

    fn give_back(&self, ip: IpAddr) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (all, per) = &mut *g;
        *all = all.saturating_sub(1);
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }

    /// Handshakes in progress (all sources).
    #[cfg(test)]
    fn in_progress(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// Stack of a handshake thread: rustls, tungstenite's header parser and the JWT check.
const HANDSHAKE_STACK_SIZE: usize = 512 * 1024;

/// Starts `nc-hub-accept` on the bound agents' listener.
pub(crate) fn spawn(state: Arc<HubState>, listener: TcpListener) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("nc-hub-accept".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            accept_loop(
                &listener,
                &state.ws_waker,
                || state.is_stopped(),
                |tcp, remote| on_connection(&state, tcp, remote),
            );
        })
}

/// Counts a handshake in progress while it lives.
struct InProgress<'a>(&'a HubState, IpAddr);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.handshakes.give_back(self.1);
    }
}

fn on_connection(state: &Arc<HubState>, tcp: TcpStream, remote: SocketAddr) {
    let remote = canonical(remote);
    let ip = remote.ip();
    if let Err(why) = state.handshakes.take(ip) {
        state.metrics.inc(
            metrics::TUNNEL_HANDSHAKES,
            &[Handshake::Overloaded.as_str()],
        );
        log::debug!(remote:% = remote; "connection dropped: {why}");
        sockopt::abort(tcp);
        return;
    }
    let state2 = state.clone();
    let spawned = thread::Builder::new()
        .name("nc-upgrade".into())
        .stack_size(HANDSHAKE_STACK_SIZE)
        .spawn(move || {
            let _in_progress = InProgress(&state2, ip);
            handshake(&state2, tcp, remote);
        });
    if let Err(e) = spawned {
        // The closure (and the socket) is gone; give the place back.
        state.handshakes.give_back(ip);
        log::warn!(remote:% = remote; "connection dropped: cannot start a thread: {e}");
    }
}

/// TLS, upgrade, JWT, then the tunnel thread. Runs on its own thread.
fn handshake(state: &Arc<HubState>, tcp: TcpStream, remote: SocketAddr) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let transport = match &state.tls {
        Some(cfg) => Transport::tls_server(cfg.clone(), tcp, deadline),
        None => Transport::plain(tcp, deadline),
    };
    let transport = match transport {
        Ok(t) => t,
        Err(e) => {
            log::debug!(remote:% = remote; "TLS handshake failed: {e}");
            return;
        }
    };
    let max_message = state.cfg.limits.max_message;
    let (ws, (token, slot)) =
        match ws::accept(transport, max_message, |req| decide(state, req, remote)) {
            Ok(accepted) => accepted,
            Err(AcceptError::Rejected(r)) => {
                let result = Handshake::from_status(r.status);
                state
                    .metrics
                    .inc(metrics::TUNNEL_HANDSHAKES, &[result.as_str()]);
                log::debug!(remote:% = remote, status = r.status; "upgrade answered: {}", r.reason);
                return;
            }
            Err(AcceptError::Malformed(e)) => {
                state.metrics.inc(
                    metrics::TUNNEL_HANDSHAKES,
                    &[Handshake::BadRequest.as_str()],
                );
                log::debug!(remote:% = remote; "malformed upgrade: {e}");
                return;
            }
            Err(AcceptError::Io(e)) => {
                log::debug!(remote:% = remote; "upgrade failed: {e}");
                return;
            }
        };

    let (id, session_name) = state.next_tunnel();
    state.insert_tunnel(id, TunnelEntry::new(remote, &session_name, &token));
    log::debug!(
        session = session_name.as_str(),
        remote:% = remote,
        agent_id = token.agent_id.as_str(),
        kid = token.summary.kid(),
        sub = token.summary.sub(),
        jti = token.summary.jti();
        "tunnel upgraded"
    );
    let session = Session::new_hub(state.cfg.session_config(), now());
    let handler = HubTunnel::new(state.clone(), id, session_name.clone(), remote, token, slot);
    match Tunnel::spawn(&id.to_string(), ws, session, Box::new(handler)) {
        Ok(tunnel) => {
            let handle = tunnel.handle().clone();
            // The thread is detached: its handler cleans up when it ends.
            drop(tunnel);
            if state.attach_handle(id, handle.clone()) && state.is_draining() {
                handle.close(close::SHUTTING_DOWN, "hub shutting down");
            }
        }
        // The handler was dropped with the tunnel: entry and slot are already released.
        Err(e) => log::warn!(
            session = session_name.as_str(), remote:% = remote;
            "tunnel cannot start: {e}"
        ),
    }
}

/// The upgrade decision (§1): path, drain, tunnel limit, JWT.
fn decide(
    state: &Arc<HubState>,
    req: &UpgradeRequest<'_>,
    remote: SocketAddr,
) -> Result<(Verified, Slot), Rejection> {
    if req.path != state.cfg.path {
        return Err(Rejection::new(404, "no such endpoint"));
    }
    if state.is_draining() {
        return Err(Rejection::new(503, "hub draining"));
    }
    let Some(slot) = Slot::take(state) else {
        log::warn!(
            remote:% = remote, status = 503;
            "upgrade refused: limits.max_tunnels ({}) reached",
            state.cfg.limits.max_tunnels
        );
        return Err(Rejection::new(503, "tunnel limit reached"));
    };
    let token = match state.auth.authenticate(req.header("authorization")) {
        Ok(v) => v,
        Err(e) => return Err(auth_rejection(&e, remote)),
    };
    // A valid token whose scope names nothing this hub serves could never get a connector.
    if let Some(scope) = &token.connectors {
        if !state.cfg.connectors.iter().any(|c| scope.contains(&c.name)) {
            log::warn!(
                remote:% = remote,
                status = 403,
                agent_id = token.agent_id.as_str(),
                kid = token.summary.kid(),
                sub = token.summary.sub(),
                jti = token.summary.jti();
                "upgrade refused: token scope has no connector of this hub"
            );
            return Err(Rejection::new(403, "token allows no connector of this hub"));
        }
    }
    Ok((token, slot))
}

/// 401/503 with the right `WWW-Authenticate` (§10), logged with kid/sub/jti, never the token.
fn auth_rejection(e: &AuthError, remote: SocketAddr) -> Rejection {
    match e {
        AuthError::Unavailable => {
            log::warn!(remote:% = remote, status = 503; "upgrade refused: JWKS not loaded yet");
        }
        AuthError::Missing => {
            log::warn!(remote:% = remote, status = 401, reason = "missing_token"; "upgrade refused");
        }
        _ => {
            // Display: reason, a detail built from enumerated values, kid/sub/jti; the same as
            // fields (operations.md "Logs").
            let none = crate::auth::TokenSummary::default();
            let summary = e.summary().unwrap_or(&none);
            log::warn!(
                remote:% = remote,
                status = 401,
                reason = e.reason().map(|r| r.as_str()),
                kid = summary.kid(),
                sub = summary.sub(),
                jti = summary.jti();
                "upgrade refused: {e}"
            );
        }
    }
    Rejection {
        status: e.status(),
        reason: e.body(),
        www_authenticate: e.www_authenticate().map(str::to_owned),
    }
}

#[cfg(test)]
mod handshake_limits {
    use super::*;

    #[test]
    fn one_source_cannot_take_every_place() {
        let h = Handshakes::default();
        let noisy: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            h.take(noisy).expect("a place");
        }
        assert!(h.take(noisy).is_err(), "per-source limit");
        // Another address still gets in; places come back when handshakes end.
        let agent: IpAddr = "198.51.100.7".parse().expect("ip");
        h.take(agent).expect("another source");
        h.give_back(noisy);
        h.take(noisy).expect("a freed place");
        assert_eq!(h.in_progress(), MAX_HANDSHAKES_PER_SOURCE + 1);
    }

    #[test]
    fn the_total_is_capped_across_sources() {
        let h = Handshakes::default();
        for i in 0..MAX_HANDSHAKES {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            h.take(ip).expect("a place");
        }
        assert!(h.take(IpAddr::from([10, 9, 9, 9])).is_err(), "total limit");
        h.give_back(IpAddr::from([10, 0, 0, 0]));
        h.take(IpAddr::from([10, 9, 9, 9])).expect("a freed place");
    }
}
