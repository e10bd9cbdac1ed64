//! Connector listeners: one thread per connector accepts clients, checks `allow_clients`, picks
//! a session from the connector's pool (wire-protocol.md §6) and hands the client to it as a
//! new stream. A client that gets no stream is closed abortively (§10), like a refused
//! connection.
//!
//! Accept loops wait in `poll(2)` on the listener and a [`Waker`], so a drain stops them at
//! once.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nowconnect_runtime::{sockopt, Waker};
use rustix::event::{poll, PollFd, PollFlags};

use crate::config::{ConnectorConfig, OnError};
use crate::metrics::{self, OpenFailure};
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
                |client, peer| on_client(&state, conn, client, peer),
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

fn on_client(state: &HubState, conn: &ConnectorConfig, client: TcpStream, addr: SocketAddr) {
    let addr = canonical(addr);
    let peer = addr.to_string();
    if !conn.allows(addr.ip()) {
        return refuse(state, conn, client, &peer, OpenFailure::ClientNotAllowed);
    }
    if let Some(pdp) = &state.cfg.authz.pdp {
        // Not implemented yet: every decision is a PDP error, which follows `on_error`.
        state.metrics.inc(metrics::PDP_REQUESTS, &["error"]);
        if pdp.on_error == OnError::Deny {
            return refuse(state, conn, client, &peer, OpenFailure::Denied);
        }
    }
    route(state, conn, client, &peer, ROUTE_ATTEMPTS);
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
) {
    let mut client = client;
    for _ in 0..attempts {
        let Some((id, tunnel)) = state.pools.pick(&conn.name) else {
            break;
        };
        match tunnel.open_stream(client, &conn.name, peer, conn.idle_timeout) {
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
