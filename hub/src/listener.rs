//! Connector listeners: one thread per connector accepts clients, checks `allow_clients`, picks
//! a session from the connector's pool (wire-protocol.md §6) and hands the client to it as a
//! new stream. A client that gets no stream is closed abortively (§10), like a refused
//! connection.
//!
//! With `authz.pdp` (security.md "Authorization" 2) the picked session's agent must be allowed
//! for this client: a cached decision is applied on the accept thread; otherwise the client
//! goes to its own short-lived `nc-pdp` thread (bounded by [`crate::pdp::Permit`]s) that asks
//! the PDP and then opens the stream, so a slow PDP never holds up an accept loop or a tunnel.
//!
//! Accept loops wait in `poll(2)` on the listener and a [`Waker`], so a drain stops them at
//! once.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nowconnect_runtime::{sockopt, Waker};
use rustix::event::{poll, PollFd, PollFlags};

use nowconnect_runtime::TunnelHandle;

use crate::config::{ConnectorConfig, OnError};
use crate::metrics::{self, OpenFailure};
use crate::pdp::{CacheKey, Pdp, PdpError, PdpRequest};
use crate::server::HubState;

/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Attempts per client: the picked session, then one other (the first may have just ended).
const ROUTE_ATTEMPTS: u32 = 2;

/// Starts `nc-conn-<name>` for connector `index` on its bound `listener`.
pub(crate) fn spawn(
    state: Arc<HubState>,
    index: usize,
    listener: TcpListener,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?.to_string();
    let name = format!("nc-conn-{}", state.cfg.connectors[index].name);
    thread::Builder::new()
        .name(name)
        .stack_size(256 * 1024)
        .spawn(move || {
            let conn = &state.cfg.connectors[index];
            accept_loop(
                &listener,
                &state.connectors_waker,
                || state.is_draining() || state.is_stopped(),
                |client, peer| on_client(&state, index, &local, client, peer),
            );
            log::info!(connector = conn.name.as_str(); "connector listener closed");
        })
}

/// Accepts until `stop()` is true; each connection goes to `on_conn` (blocking mode).
pub(crate) fn accept_loop(
    listener: &TcpListener,
    waker: &Waker,
    stop: impl Fn() -> bool,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        if stop() {
            return;
        }
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(waker, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                log::warn!("poll on listener: {e}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
            }
        }
        // Wakes are sticky for everyone sharing this waker: the stop condition decides.
        if stop() {
            return;
        }
        loop {
            match listener.accept() {
                Ok((conn, addr)) => {
                    if let Err(e) = conn.set_nonblocking(false) {
                        log::debug!("accepted socket from {addr}: {e}");
                        continue;
                    }
                    on_conn(conn, addr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: transient; the connection waits in the backlog.
                    log::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    thread::sleep(ACCEPT_ERROR_PAUSE);
                    break;
                }
            }
        }
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack listener's v4 client) as plain IPv4, so
/// `allow_clients` and logs see `a.b.c.d`.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// OPEN's `peer` (§10): `a.b.c.d:port` or `[v6]:port`.
pub(crate) fn peer_string(addr: SocketAddr) -> String {
    canonical(addr).to_string()
}

fn refuse(state: &HubState, conn: &ConnectorConfig, client: TcpStream, peer: &str, f: OpenFailure) {
    state
        .metrics
        .inc(metrics::STREAM_OPEN_FAILURES, &[&conn.name, f.as_str()]);
    log::info!(connector = conn.name.as_str(), client = peer, reason = f.as_str(); "client refused");
    sockopt::abort(client);
}

fn on_client(
    state: &Arc<HubState>,
    index: usize,
    listener: &str,
    client: TcpStream,
    addr: SocketAddr,
) {
    // nowconnect_open_duration_seconds runs from here: routing and the PDP included.
    let accepted = Instant::now();
    let conn = &state.cfg.connectors[index];
    let addr = canonical(addr);
    let peer = addr.to_string();
    if !conn.allows(addr.ip()) {
        return refuse(state, conn, client, &peer, OpenFailure::ClientNotAllowed);
    }
    let Some(pdp) = &state.pdp else {
        return route(state, conn, client, &peer, ROUTE_ATTEMPTS, accepted);
    };
    let open = Opening {
        index,
        ip: addr.ip(),
        peer,
        listener: listener.to_owned(),
        accepted,
    };
    // Cached decisions are applied here; a miss comes back for a PDP call off this thread.
    let Some(wait) = authorize_and_route(state, pdp, &open, client, ROUTE_ATTEMPTS, None, false)
    else {
        return;
    };
    let Some(permit) = pdp.permit(index) else {
        return on_pdp_error(state, &open, wait, &PdpError::Overloaded);
    };
    // The job travels through a slot so a failed spawn can still refuse the client.
    let slot = Arc::new(std::sync::Mutex::new(Some((open, wait, permit))));
    let spawned = thread::Builder::new()
        .name("nc-pdp".to_owned())
        .stack_size(PDP_THREAD_STACK)
        .spawn({
            let state = state.clone();
            let slot = slot.clone();
            move || {
                let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let (Some((open, wait, _permit)), Some(pdp)) = (job, &state.pdp) {
                    let Waiting {
                        client,
                        session,
                        attempts,
                    } = wait;
                    authorize_and_route(&state, pdp, &open, client, attempts, Some(session), true);
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!(connector = conn.name.as_str(); "cannot start a PDP thread: {e}");
        let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((open, wait, permit)) = job {
            drop(permit);
            on_pdp_error(state, &open, wait, &PdpError::Overloaded);
        }
    }
}

/// Stack of an `nc-pdp` thread (an HTTPS call through ureq and rustls).
const PDP_THREAD_STACK: usize = 512 * 1024;

/// One client on its way to a stream under `authz.pdp`.
struct Opening {
    /// Connector index in the config.
    index: usize,
    ip: IpAddr,
    /// `ip:port` as OPEN's `peer` and the PDP's `client_addr`.
    peer: String,
    /// The connector listener's bound address (the PDP's `listener`).
    listener: String,
    /// When the client was accepted.
    accepted: Instant,
}

/// A session picked for a stream, with what the PDP is told about it.
struct Picked {
    id: u64,
    tunnel: TunnelHandle,
    agent_id: String,
    session: String,
}

/// A client whose decision is not cached, with the session it was picked for.
struct Waiting {
    client: TcpStream,
    session: Picked,
    /// Routing attempts left, the picked session's included.
    attempts: u32,
}

/// The pool's pick for `conn`, with its agent and session names; a session that has already
/// left the tunnel table is marked draining and skipped.
fn pick(state: &HubState, conn: &ConnectorConfig) -> Option<Picked> {
    for _ in 0..ROUTE_ATTEMPTS {
        let (id, tunnel) = state.pools.pick(&conn.name)?;
        let names = state
            .tunnels()
            .get(&id)
            .map(|e| (e.agent_id.clone(), e.session.clone()));
        match names {
            Some((agent_id, session)) => {
                return Some(Picked {
                    id,
                    tunnel,
                    agent_id,
                    session,
                })
            }
            None => state.pools.set_draining(id),
        }
    }
    None
}

/// Routes `client` like [`route`], authorizing each picked session's agent first: from the
/// cache, or — when `may_ask` — by asking the PDP (blocking up to its timeout). Without
/// `may_ask` a cache miss hands the client back as [`Waiting`]. `picked` is a session already
/// chosen (by the accept thread).
fn authorize_and_route(
    state: &HubState,
    pdp: &Pdp,
    open: &Opening,
    client: TcpStream,
    attempts: u32,
    mut picked: Option<Picked>,
    may_ask: bool,
) -> Option<Waiting> {
    let conn = &state.cfg.connectors[open.index];
    let mut client = client;
    for left in (1..=attempts).rev() {
        let Some(session) = picked.take().or_else(|| pick(state, conn)) else {
            break;
        };
        let key = CacheKey {
            agent_id: session.agent_id.clone(),
            connector: conn.name.clone(),
            client_ip: open.ip,
        };
        let allow = match pdp.cached(&key, Instant::now()) {
            Some(allow) => {
                let result = if allow { "cached_allow" } else { "cached_deny" };
                state.metrics.inc(metrics::PDP_REQUESTS, &[result]);
                allow
            }
            None if !may_ask => {
                return Some(Waiting {
                    client,
                    session,
                    attempts: left,
                })
            }
            None => match ask(state, pdp, open, &session, key) {
                Ok(allow) => allow,
                Err(e) => {
                    log_pdp_error(conn, open, &session, pdp, &e);
                    pdp.on_error == OnError::Allow
                }
            },
        };
        if !allow {
            refuse(state, conn, client, &open.peer, OpenFailure::Denied);
            return None;
        }
        match session.tunnel.open_stream(
            client,
            &conn.name,
            &open.peer,
            conn.idle_timeout,
            open.accepted,
        ) {
            Ok(()) => return None,
            Err(c) => {
                // That tunnel has ended; its handler removes it from the pool shortly.
                client = c;
                state.pools.set_draining(session.id);
            }
        }
    }
    state.update_availability();
    refuse(state, conn, client, &open.peer, OpenFailure::NoAgent);
    None
}

/// One PDP call for `session`, counted and timed; a decision is cached.
fn ask(
    state: &HubState,
    pdp: &Pdp,
    open: &Opening,
    session: &Picked,
    key: CacheKey,
) -> Result<bool, PdpError> {
    let req = PdpRequest {
        agent_id: &session.agent_id,
        connector: &key.connector,
        client_addr: &open.peer,
        session: &session.session,
        listener: &open.listener,
    };
    let started = Instant::now();
    let answer = pdp.ask(&req);
    state
        .metrics
        .observe(metrics::PDP_DURATION, &[], started.elapsed().as_secs_f64());
    let result = match answer {
        Ok(true) => "allow",
        Ok(false) => "deny",
        Err(_) => "error",
    };
    state.metrics.inc(metrics::PDP_REQUESTS, &[result]);
    if let Ok(allow) = answer {
        pdp.remember(key, allow, Instant::now());
    }
    answer
}

fn log_pdp_error(
    conn: &ConnectorConfig,
    open: &Opening,
    session: &Picked,
    pdp: &Pdp,
    e: &PdpError,
) {
    let on_error = match pdp.on_error {
        OnError::Deny => "deny",
        OnError::Allow => "allow",
    };
    log::warn!(
        connector = conn.name.as_str(),
        client = open.peer.as_str(),
        agent_id = session.agent_id.as_str(),
        session = session.session.as_str(),
        on_error = on_error;
        "no PDP decision: {e}"
    );
}

/// No PDP call could be made for a waiting client (too many wait, or no thread): counted as a
/// PDP error and refused whatever `on_error` says — letting the overflow of a burst through
/// unchecked would let a denied client in by opening many connections at once.
fn on_pdp_error(state: &HubState, open: &Opening, wait: Waiting, e: &PdpError) {
    let conn = &state.cfg.connectors[open.index];
    state.metrics.inc(metrics::PDP_REQUESTS, &["error"]);
    log::warn!(
        connector = conn.name.as_str(),
        client = open.peer.as_str(),
        agent_id = wait.session.agent_id.as_str(),
        session = wait.session.session.as_str();
        "no PDP decision: {e}; refused (on_error does not apply to an overload)"
    );
    refuse(state, conn, wait.client, &open.peer, OpenFailure::Denied);
}

/// Hands `client` to a session serving `conn`, trying up to `attempts` sessions; with none
/// left the client is reset and counted as `no_agent`. Never blocks (the open itself happens on
/// the tunnel thread, which gives the client back through `on_open_failed` if it must).
pub(crate) fn route(
    state: &HubState,
    conn: &ConnectorConfig,
    client: TcpStream,
    peer: &str,
    attempts: u32,
    accepted: Instant,
) {
    let mut client = client;
    for _ in 0..attempts {
        let Some((id, tunnel)) = state.pools.pick(&conn.name) else {
            break;
        };
        match tunnel.open_stream(client, &conn.name, peer, conn.idle_timeout, accepted) {
            Ok(()) => return,
            Err(c) => {
                // That tunnel has ended; its handler removes it from the pool shortly.
                client = c;
                state.pools.set_draining(id);
            }
        }
    }
    state.update_availability();
    refuse(state, conn, client, peer, OpenFailure::NoAgent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_canonical() {
        let v4: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8::1]:22".parse().expect("addr");
        assert_eq!(peer_string(v4), "10.1.2.3:4000");
        assert_eq!(peer_string(mapped), "10.1.2.3:4000");
        assert_eq!(peer_string(v6), "[2001:db8::1]:22");
    }
}
