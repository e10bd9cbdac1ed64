//! One agent tunnel on the hub: [`HubTunnel`], the runtime's handler for its session events
//! (HELLO policy, HEALTH, GOAWAY, RENEW, stream ends), and [`TunnelEntry`], what the rest of
//! the hub sees of it.
//!
//! Handler callbacks run on the tunnel thread and never block: RENEW validation (which may
//! fetch the JWKS) runs on a short-lived thread of its own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Instant, SystemTime};

use nowconnect_core::{close, Code, HealthReport, Hello, HelloAck, OpenError, Rejected};
use nowconnect_runtime::{sockopt, StreamEnd, TunnelHandle, TunnelHandler};

use crate::auth::{TokenSummary, Verified};
use crate::listener;
use crate::metrics::{self, Handshake, OpenFailure};
use crate::server::HubState;

/// Longest agent id or connector name shown in a log line when it came from the peer unchecked.
const MAX_LOGGED: usize = 64;
/// Longest reason text shown in a log line.
const MAX_REASON_LOGGED: usize = 256;

/// A tunnel as the hub's other threads see it (status page, drain, token expiry).
#[derive(Debug)]
pub(crate) struct TunnelEntry {
    /// `None` until the tunnel thread runs.
    pub handle: Option<TunnelHandle>,
    /// The agent's address (or its proxy's / load balancer's).
    pub remote: SocketAddr,
    pub since: SystemTime,
    /// HELLO_ACK `session`.
    pub session: String,
    /// The token's agent-id claim.
    pub agent_id: String,
    /// Current token expiry (Unix seconds); RENEW moves it.
    pub exp: u64,
    /// GOAWAY(TOKEN_EXPIRED) sent.
    pub token_expired: bool,
    /// HELLO_ACK sent.
    pub established: bool,
    /// Connectors it serves.
    pub accepted: Vec<String>,
    /// HELLO `software`.
    pub software: String,
}

impl TunnelEntry {
    pub fn new(remote: SocketAddr, session: &str, token: &Verified) -> TunnelEntry {
        TunnelEntry {
            handle: None,
            remote,
            since: SystemTime::now(),
            session: session.to_owned(),
            agent_id: token.agent_id.clone(),
            exp: token.exp,
            token_expired: false,
            established: false,
            accepted: Vec::new(),
            software: String::new(),
        }
    }
}

/// A reserved place under `limits.max_tunnels`, given back when dropped.
pub(crate) struct Slot {
    state: Arc<HubState>,
}

impl Slot {
    /// Reserves a place if fewer than `max_tunnels` are taken.
    pub fn take(state: &Arc<HubState>) -> Option<Slot> {
        let max = state.cfg.limits.max_tunnels as usize;
        state
            .tunnel_slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                state: state.clone(),
            })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.tunnel_slots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream of this tunnel, for metrics and its close log line.
#[derive(Debug)]
struct StreamInfo {
    connector: String,
    peer: String,
    started: Instant,
    /// OPEN_OK's backend, once it came.
    backend: Option<String>,
    /// Payload bytes client → agent and agent → client, known when the stream ends.
    bytes: (u64, u64),
}

/// The handler of one tunnel.
pub(crate) struct HubTunnel {
    state: Arc<HubState>,
    id: u64,
    session: String,
    remote: SocketAddr,
    token: Verified,
    /// Set once HELLO_ACK went out (counted in `agents_connected`); taken at the end.
    agent_id: Option<String>,
    /// The handshake result was counted.
    counted: bool,
    up_since: Instant,
    streams: HashMap<u32, StreamInfo>,
    _slot: Slot,
}

impl HubTunnel {
    pub fn new(
        state: Arc<HubState>,
        id: u64,
        session: String,
        remote: SocketAddr,
        token: Verified,
        slot: Slot,
    ) -> HubTunnel {
        HubTunnel {
            state,
            id,
            session,
            remote,
            token,
            agent_id: None,
            counted: false,
            up_since: Instant::now(),
            streams: HashMap::new(),
            _slot: slot,
        }
    }

    fn count(&mut self, result: Handshake) {
        if !self.counted {
            self.counted = true;
            self.state
                .metrics
                .inc(metrics::TUNNEL_HANDSHAKES, &[result.as_str()]);
        }
    }

    /// Refuse the HELLO: count it, log it, close with `code`.
    fn refuse(&mut self, tunnel: &TunnelHandle, result: Handshake, code: u16, reason: &str) {
        self.count(result);
        log::warn!(
            agent_id = self.token.agent_id.as_str(),
            session = self.session.as_str(),
            remote:% = self.remote,
            code = code,
            reason = reason,
            kid = self.token.summary.kid(),
            sub = self.token.summary.sub(),
            jti = self.token.summary.jti();
            "tunnel refused at HELLO"
        );
        tunnel.close(code, reason);
    }

    /// The agent leaves `agents_connected` (once).
    fn agent_gone(&mut self) {
        let Some(agent_id) = self.agent_id.take() else {
            return;
        };
        if let Some(e) = self.state.tunnels().get_mut(&self.id) {
            e.established = false;
        }
        self.state.recount_agent(&agent_id);
    }

    fn open_failed(&self, connector: &str, failure: OpenFailure) {
        self.state.metrics.inc(
            metrics::STREAM_OPEN_FAILURES,
            &[connector, failure.as_str()],
        );
    }
}

/// Splits HELLO's connectors into accepted and rejected (§3): each must be configured on the
/// hub and, when scopes are enforced, in the token's scope.
pub(crate) fn select_connectors(
    configured: &[String],
    scope: Option<&[String]>,
    offered: &[String],
) -> (Vec<String>, Vec<Rejected>) {
    let mut accepted: Vec<String> = Vec::new();
    let mut rejected: Vec<Rejected> = Vec::new();
    for c in offered {
        if accepted.contains(c) || rejected.iter().any(|r| &r.connector == c) {
            continue;
        }
        let reason = if !configured.contains(c) {
            Some("not configured on hub")
        } else if scope.is_some_and(|s| !s.contains(c)) {
            Some("not in token scope")
        } else {
            None
        };
        match reason {
            None => accepted.push(c.clone()),
            Some(r) => rejected.push(Rejected {
                connector: c.clone(),
                reason: r.to_owned(),
            }),
        }
    }
    (accepted, rejected)
}

/// `streams_closed_total{reason}` for a stream that ended after OPEN_OK, or was reset locally
/// before it for another reason than the open timeout.
fn close_reason(end: &StreamEnd) -> &'static str {
    match end {
        StreamEnd::Closed => "normal",
        StreamEnd::Reset { code, remote, .. } => match *code {
            Code::IDLE_TIMEOUT => "idle_timeout",
            Code::SHUTDOWN => "shutdown",
            // The session died under the stream (heartbeat lost, connection lost, 1006/4408).
            Code::INTERNAL if !remote => "tunnel_lost",
            _ => "reset",
        },
    }
}

/// The open failure an agent RST before OPEN_OK stands for (§4, §8).
fn open_failure(code: Code) -> OpenFailure {
    match code {
        Code::CONNECT_REFUSED => OpenFailure::ConnectRefused,
        Code::CONNECT_TIMEOUT => OpenFailure::ConnectTimeout,
        Code::NO_HEALTHY_BACKEND => OpenFailure::NoHealthyBackend,
        Code::REFUSED_STREAM => OpenFailure::RefusedStream,
        Code::FORBIDDEN => OpenFailure::Denied,
        _ => OpenFailure::NoAgent,
    }
}

/// Keeps at most [`MAX_LOGGED`] printable characters of a peer-chosen name for a log line.
fn loggable(s: &str) -> String {
    clip(s, MAX_LOGGED)
}

/// A reason text (≤ 256 bytes on the wire, §2) for a log line, control characters masked.
fn loggable_reason(s: &str) -> String {
    clip(s, MAX_REASON_LOGGED)
}

fn clip(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl TunnelHandler for HubTunnel {
    fn on_hello(&mut self, tunnel: &TunnelHandle, hello: Hello) {
        if self.state.is_draining() {
            return self.refuse(
                tunnel,
                Handshake::Overloaded,
                close::SHUTTING_DOWN,
                "hub shutting down",
            );
        }
        // security.md: HELLO.agent_id must equal the token's agent-id claim.
        if hello.agent_id != self.token.agent_id {
            let reason = format!(
                "agent_id {:?} does not match the token",
                loggable(&hello.agent_id)
            );
            return self.refuse(tunnel, Handshake::Forbidden, close::FORBIDDEN, &reason);
        }
        let configured: Vec<String> = self
            .state
            .cfg
            .connectors
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let (accepted, rejected) = select_connectors(
            &configured,
            self.token.connectors.as_deref(),
            &hello.connectors,
        );
        if accepted.is_empty() {
            return self.refuse(
                tunnel,
                Handshake::Forbidden,
                close::FORBIDDEN,
                "no connector allowed",
            );
        }
        let rejected_log: Vec<String> = rejected
            .iter()
            .map(|r| format!("{} ({})", loggable(&r.connector), r.reason))
            .collect();
        tunnel.accept_hello(HelloAck {
            session: self.session.clone(),
            accepted: accepted.clone(),
            rejected,
            // Filled from the session config by the core.
            window: 0,
            max_frame: 0,
            heartbeat_ms: 0,
            ver: 1,
        });
        self.state
            .pools
            .add(self.id, tunnel.clone(), &hello.agent_id, &accepted);
        if let Some(e) = self.state.tunnels().get_mut(&self.id) {
            e.established = true;
            e.accepted = accepted.clone();
            e.software = loggable(&hello.software);
        }
        self.count(Handshake::Ok);
        self.state.recount_agent(&hello.agent_id);
        self.agent_id = Some(hello.agent_id.clone());
        self.state.update_availability();
        log::info!(
            agent_id = hello.agent_id.as_str(),
            session = self.session.as_str(),
            remote:% = self.remote,
            accepted = accepted.join(",").as_str(),
            rejected = rejected_log.join(", ").as_str(),
            software = loggable(&hello.software).as_str(),
            kid = self.token.summary.kid(),
            sub = self.token.summary.sub(),
            jti = self.token.summary.jti();
            "tunnel up"
        );
    }

    fn on_open_failed(
        &mut self,
        client: TcpStream,
        connector: &str,
        error: OpenError,
        accepted: Instant,
    ) {
        let Some(conn) = self
            .state
            .cfg
            .connectors
            .iter()
            .find(|c| c.name == connector)
        else {
            return sockopt::abort(client);
        };
        match error {
            OpenError::TooManyStreams => {
                log::info!(
                    connector = connector,
                    session = self.session.as_str(),
                    reason = "refused_stream";
                    "client refused"
                );
                self.open_failed(connector, OpenFailure::RefusedStream);
                sockopt::abort(client);
            }
            // The session is draining or gone: this tunnel takes no more streams; try another
            // member once (the pool no longer offers this one).
            _ => {
                self.state.pools.set_draining(self.id);
                self.state.update_availability();
                let peer = client
                    .peer_addr()
                    .map(listener::peer_string)
                    .unwrap_or_default();
                listener::route(&self.state, conn, client, &peer, 1, accepted);
            }
        }
    }

    fn on_stream_opening(&mut self, cid: u32, connector: &str, peer: &str, accepted: Instant) {
        let m = &self.state.metrics;
        m.inc(metrics::STREAMS_OPENED, &[connector]);
        m.add(metrics::STREAMS_ACTIVE, &[connector], 1.0);
        self.streams.insert(
            cid,
            StreamInfo {
                connector: connector.to_owned(),
                peer: peer.to_owned(),
                started: accepted,
                backend: None,
                bytes: (0, 0),
            },
        );
    }

    fn on_stream_opened(&mut self, cid: u32, backend: &str) {
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        let secs = s.started.elapsed().as_secs_f64();
        self.state
            .metrics
            .observe(metrics::OPEN_DURATION, &[&s.connector], secs);
        s.backend = Some(loggable(backend));
        log::debug!(
            agent_id = self.token.agent_id.as_str(),
            session = self.session.as_str(),
            connector = s.connector.as_str(),
            cid = cid,
            client = s.peer.as_str(),
            backend = loggable(backend).as_str(),
            open_ms = secs * 1000.0;
            "stream open"
        );
    }

    fn on_stream_bytes(&mut self, cid: u32, sent: u64, received: u64) {
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        // The hub sends what its client wrote (c2a) and receives what the target wrote (a2c).
        s.bytes = (sent, received);
        let m = &self.state.metrics;
        m.add(metrics::BYTES, &[&s.connector, "c2a"], sent as f64);
        m.add(metrics::BYTES, &[&s.connector, "a2c"], received as f64);
    }

    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        let Some(s) = self.streams.remove(&cid) else {
            return;
        };
        let m = &self.state.metrics;
        m.add(metrics::STREAMS_ACTIVE, &[&s.connector], -1.0);
        let duration_ms = s.started.elapsed().as_millis();
        let (code, detail, remote) = match &end {
            StreamEnd::Closed => (None, String::new(), false),
            StreamEnd::Reset {
                code,
                reason,
                remote,
            } => (Some(*code), loggable_reason(reason), *remote),
        };
        // §10 stream errors by the agent (seq gap, DATA after FIN, DATA beyond credit, WINDOW
        // overflow): the hub resets the stream and the session lives on, but the violation is
        // counted. A session dying of a protocol error also resets its streams with
        // PROTOCOL_ERROR, carrying the session's close reason; the core's stream-level reasons
        // are "DATA seq gap or repeat" and "DATA after FIN".
        let violation = match (&end, remote) {
            (StreamEnd::Reset { code, .. }, false) if *code == Code::FLOW_CONTROL_ERROR => {
                Some("flow_control")
            }
            (StreamEnd::Reset { code, reason, .. }, false)
                if *code == Code::PROTOCOL_ERROR && reason.starts_with("DATA ") =>
            {
                Some("stream_protocol_error")
            }
            _ => None,
        };
        if let Some(kind) = violation {
            m.inc(metrics::PROTOCOL_ERRORS, &[kind]);
        }
        // Never opened: an agent RST is an open failure (§4); so is the hub's open timeout.
        let failure = match code {
            Some(c) if s.backend.is_none() && remote => Some(open_failure(c)),
            Some(Code::CONNECT_TIMEOUT) if s.backend.is_none() => Some(OpenFailure::Timeout),
            _ => None,
        };
        if let Some(f) = failure {
            self.open_failed(&s.connector, f);
            log::info!(
                agent_id = self.token.agent_id.as_str(),
                session = self.session.as_str(),
                connector = s.connector.as_str(),
                cid = cid,
                client = s.peer.as_str(),
                duration_ms = duration_ms,
                reason = f.as_str(),
                detail = detail.as_str();
                "stream open failed"
            );
            return;
        }
        let reason = close_reason(&end);
        m.inc(metrics::STREAMS_CLOSED, &[&s.connector, reason]);
        let by = match (code, remote) {
            (None, _) => None,
            (Some(_), true) => Some("agent"),
            (Some(_), false) => Some("hub"),
        };
        log::info!(
            agent_id = self.token.agent_id.as_str(),
            session = self.session.as_str(),
            connector = s.connector.as_str(),
            cid = cid,
            client = s.peer.as_str(),
            backend = s.backend.as_deref().unwrap_or("-"),
            bytes_c2a = s.bytes.0,
            bytes_a2c = s.bytes.1,
            duration_ms = duration_ms,
            reason = reason,
            code = code.map(|c| c.name()),
            by = by,
            detail = (!detail.is_empty()).then_some(detail.as_str());
            "stream closed"
        );
    }

    fn on_health(&mut self, _tunnel: &TunnelHandle, report: HealthReport) {
        self.state.pools.set_health(self.id, &report);
        self.state.update_availability();
        if log::log_enabled!(log::Level::Debug) {
            let summary: Vec<String> = report
                .connectors
                .iter()
                .map(|(c, h)| format!("{}={}", loggable(c), if h.healthy { "up" } else { "down" }))
                .collect();
            log::debug!(
                agent_id = self.token.agent_id.as_str(),
                session = self.session.as_str(),
                connectors = summary.join(" ").as_str();
                "health"
            );
        }
    }

    fn on_renew(&mut self, tunnel: &TunnelHandle, token: String) {
        let state = self.state.clone();
        let handle = tunnel.clone();
        let id = self.id;
        let agent_id = self.token.agent_id.clone();
        let session = self.session.clone();
        let spawned = thread::Builder::new()
            .name(format!("nc-renew-{id}"))
            .stack_size(256 * 1024)
            .spawn(move || renew(&state, id, &handle, &agent_id, &session, &token));
        if let Err(e) = spawned {
            log::warn!("RENEW: cannot start its thread: {e}; refusing");
            tunnel.goaway(Code::INTERNAL, "renew failed");
            self.state.pools.set_draining(self.id);
        }
    }

    fn on_goaway(&mut self, _tunnel: &TunnelHandle, code: Code, last_cid: u32, reason: &str) {
        self.state.pools.set_draining(self.id);
        self.state.update_availability();
        log::info!(
            agent_id = self.token.agent_id.as_str(),
            session = self.session.as_str(),
            code = code.name(),
            last_cid = last_cid,
            reason = loggable_reason(reason).as_str();
            "agent draining"
        );
    }

    fn on_closed(&mut self, code: u16, reason: &str) {
        self.state.pools.remove(self.id);
        self.state.update_availability();
        let kind = match code {
            close::PROTOCOL_ERROR => Some("protocol_error"),
            close::TIMEOUT => Some("timeout"),
            close::UNSUPPORTED_VERSION => Some("version"),
            _ => None,
        };
        if let Some(kind) = kind {
            self.state.metrics.inc(metrics::PROTOCOL_ERRORS, &[kind]);
        }
        if self.agent_id.is_some() {
            self.agent_gone();
            log::info!(
                agent_id = self.token.agent_id.as_str(),
                session = self.session.as_str(),
                remote:% = self.remote,
                code = code,
                reason = loggable_reason(reason).as_str(),
                duration_ms = self.up_since.elapsed().as_millis();
                "tunnel down"
            );
        } else {
            // A connection that just went away is no handshake result.
            match code {
                close::UNSUPPORTED_VERSION => self.count(Handshake::Version),
                close::PROTOCOL_ERROR | close::TIMEOUT => self.count(Handshake::BadRequest),
                close::SHUTTING_DOWN => self.count(Handshake::Overloaded),
                _ => {}
            }
            log::info!(
                agent_id = self.token.agent_id.as_str(),
                session = self.session.as_str(),
                remote:% = self.remote,
                code = code,
                reason = loggable_reason(reason).as_str();
                "tunnel closed before HELLO_ACK"
            );
        }
    }
}

impl Drop for HubTunnel {
    /// Whatever way the tunnel thread ends (a panic included): out of the pools, the tunnel
    /// list and the gauges.
    fn drop(&mut self) {
        self.state.pools.remove(self.id);
        self.state.remove_tunnel(self.id);
        self.state.update_availability();
        self.agent_gone();
        let m = &self.state.metrics;
        for (_, s) in self.streams.drain() {
            m.add(metrics::STREAMS_ACTIVE, &[&s.connector], -1.0);
        }
    }
}

/// RENEW (§6): validate exactly as on the upgrade, same agent-id claim, re-apply scopes, then
/// RENEW_ACK; anything else is GOAWAY(FORBIDDEN).
fn renew(
    state: &HubState,
    id: u64,
    tunnel: &TunnelHandle,
    agent_id: &str,
    session: &str,
    token: &str,
) {
    let refused = |reason: &str, summary: &TokenSummary, claim: Option<String>| {
        log::warn!(
            agent_id = agent_id,
            session = session,
            reason = reason,
            claim = claim.as_deref(),
            kid = summary.kid(),
            sub = summary.sub(),
            jti = summary.jti();
            "RENEW refused"
        );
        state.pools.set_draining(id);
        state.update_availability();
        tunnel.goaway(Code::FORBIDDEN, "renew refused");
    };
    let v = match state.auth.validate(token) {
        Ok(v) => v,
        Err(e) => {
            let reason = e.reason().map_or("unavailable", |r| r.as_str());
            let none = TokenSummary::default();
            return refused(reason, e.summary().unwrap_or(&none), None);
        }
    };
    if v.agent_id != agent_id {
        return refused("agent_id_changed", &v.summary, Some(loggable(&v.agent_id)));
    }
    if let Some(scope) = &v.connectors {
        state.pools.retain_connectors(id, scope);
        if let Some(e) = state.tunnels().get_mut(&id) {
            e.accepted.retain(|c| scope.contains(c));
        }
        state.update_availability();
    }
    if let Some(e) = state.tunnels().get_mut(&id) {
        e.exp = v.exp;
    }
    tunnel.renew_ack(v.exp);
    log::info!(
        agent_id = agent_id,
        session = session,
        exp = v.exp,
        kid = v.summary.kid(),
        sub = v.summary.sub(),
        jti = v.summary.jti();
        "token renewed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn connectors_are_configured_and_in_scope() {
        let configured = names(&["ldap", "ssh", "pg"]);
        let scope = names(&["ldap", "pg"]);
        let (acc, rej) = select_connectors(
            &configured,
            Some(&scope),
            &names(&["ldap", "ssh", "web", "ldap"]),
        );
        assert_eq!(acc, names(&["ldap"]));
        assert_eq!(
            rej,
            vec![
                Rejected {
                    connector: "ssh".into(),
                    reason: "not in token scope".into()
                },
                Rejected {
                    connector: "web".into(),
                    reason: "not configured on hub".into()
                },
            ]
        );
        let (acc, rej) = select_connectors(&configured, None, &names(&["ssh", "pg"]));
        assert_eq!(acc, names(&["ssh", "pg"]));
        assert!(rej.is_empty());
        let (acc, _) = select_connectors(&configured, Some(&[]), &names(&["ssh"]));
        assert!(acc.is_empty());
    }

    #[test]
    fn stream_end_reasons() {
        let reset = |code, remote| StreamEnd::Reset {
            code,
            reason: String::new(),
            remote,
        };
        assert_eq!(close_reason(&StreamEnd::Closed), "normal");
        assert_eq!(
            close_reason(&reset(Code::IDLE_TIMEOUT, false)),
            "idle_timeout"
        );
        assert_eq!(close_reason(&reset(Code::SHUTDOWN, false)), "shutdown");
        assert_eq!(close_reason(&reset(Code::INTERNAL, false)), "tunnel_lost");
        assert_eq!(close_reason(&reset(Code::RESET_BY_PEER, true)), "reset");
        assert_eq!(
            open_failure(Code::NO_HEALTHY_BACKEND),
            OpenFailure::NoHealthyBackend
        );
        assert_eq!(open_failure(Code::UNKNOWN_CONNECTOR), OpenFailure::NoAgent);
    }
}
