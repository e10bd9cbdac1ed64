//! The agent's [`TunnelHandler`]: session events of one tunnel, on its tunnel thread. Opens
//! streams (target connect on a stream thread), sends HEALTH at HELLO_ACK, and tells the
//! supervisor about HELLO_ACK, GOAWAY and the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use nowconnect_core::{Code, HelloAck};
use nowconnect_runtime::{
    spawn_stream_thread, OpenRequest, StreamEnd, TunnelHandle, TunnelHandler,
};

use crate::connector::{self, Connector};
use crate::metrics;
use crate::run::{unix_now, Shared};

/// What a tunnel tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEvent {
    /// HELLO_ACK arrived.
    Established {
        /// Tunnel id.
        id: String,
    },
    /// The hub sent GOAWAY: dial a replacement now.
    GoAway {
        /// Tunnel id.
        id: String,
        /// GOAWAY code.
        code: Code,
    },
    /// The session ended (the tunnel thread is finishing).
    Closed {
        /// Tunnel id.
        id: String,
    },
}

/// State a tunnel shares with its supervisor.
#[derive(Debug, Default)]
pub struct LiveState {
    /// HELLO_ACK arrived at some point.
    pub established: AtomicBool,
}

struct OpenStream {
    connector: Arc<Connector>,
    opened: Instant,
    /// Payload bytes client → target (c2a) and target → client (a2c), known at the end.
    bytes: (u64, u64),
}

/// The handler of one agent tunnel.
pub struct AgentTunnel {
    shared: Arc<Shared>,
    id: String,
    hub: String,
    state: Arc<LiveState>,
    supervisor: Sender<SlotEvent>,
    session: String,
    streams: HashMap<u32, OpenStream>,
}

impl AgentTunnel {
    /// A handler for tunnel `id` to `hub`.
    pub fn new(
        shared: Arc<Shared>,
        id: String,
        hub: String,
        state: Arc<LiveState>,
        supervisor: Sender<SlotEvent>,
    ) -> AgentTunnel {
        AgentTunnel {
            shared,
            id,
            hub,
            state,
            supervisor,
            session: String::new(),
            streams: HashMap::new(),
        }
    }

    fn stream_gone(&mut self, cid: u32) -> Option<OpenStream> {
        let s = self.streams.remove(&cid)?;
        self.shared
            .metrics
            .add(metrics::STREAMS_ACTIVE, &[s.connector.name()], -1.0);
        Some(s)
    }
}

impl TunnelHandler for AgentTunnel {
    fn on_established(&mut self, tunnel: &TunnelHandle, ack: &HelloAck) {
        self.session = ack.session.clone();
        self.state.established.store(true, Ordering::Release);
        self.shared.registry.established(&self.id, tunnel, ack);
        self.shared.update_tunnels_up();
        for r in &ack.rejected {
            log::warn!(
                agent_id = self.shared.cfg.agent_id.as_str(),
                hub = self.hub.as_str(),
                session = ack.session.as_str(),
                connector = r.connector.as_str(),
                reason = r.reason.as_str();
                "hub rejected connector"
            );
        }
        log::info!(
            agent_id = self.shared.cfg.agent_id.as_str(),
            hub = self.hub.as_str(),
            session = ack.session.as_str(),
            tunnel = self.id.as_str(),
            accepted = ack.accepted.join(",").as_str();
            "tunnel up"
        );
        let report = connector::health_report(&self.shared.connectors, &ack.accepted);
        if !report.connectors.is_empty() {
            tunnel.send_health(report);
        }
        if self.shared.is_draining() {
            tunnel.goaway(Code::SHUTDOWN, "agent shutting down");
        }
        let _ = self.supervisor.send(SlotEvent::Established {
            id: self.id.clone(),
        });
    }

    fn on_open_request(&mut self, mut request: OpenRequest) {
        let cid = request.cid;
        let Some(connector) = self.shared.connector(&request.connector) else {
            log::warn!(
                session = self.session.as_str(),
                connector = request.connector.as_str(),
                cid = cid,
                code = Code::UNKNOWN_CONNECTOR.name();
                "stream open failed: connector not configured on this agent"
            );
            return request.refuse(Code::UNKNOWN_CONNECTOR, "unknown connector");
        };
        request.set_idle_timeout(connector.cfg.idle_timeout);
        self.shared
            .metrics
            .add(metrics::STREAMS_ACTIVE, &[connector.name()], 1.0);
        self.streams.insert(
            cid,
            OpenStream {
                connector: connector.clone(),
                opened: Instant::now(),
                bytes: (0, 0),
            },
        );
        let shared = self.shared.clone();
        let name = format!("nc-stream-{cid}");
        // On failure the closure, and with it the request, is dropped: that refuses it with
        // INTERNAL, and `on_stream_closed` follows.
        if let Err(e) = spawn_stream_thread(name, move || {
            connector::connect_stream(shared, connector, request)
        }) {
            log::warn!(session = self.session.as_str(), cid = cid; "cannot start a stream thread: {e}");
        }
    }

    fn on_stream_bytes(&mut self, cid: u32, sent: u64, received: u64) {
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        // The agent receives what the client wrote (c2a) and sends what the target wrote (a2c).
        s.bytes = (received, sent);
        let m = &self.shared.metrics;
        m.add(
            metrics::BYTES,
            &[s.connector.name(), "c2a"],
            received as f64,
        );
        m.add(metrics::BYTES, &[s.connector.name(), "a2c"], sent as f64);
    }

    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        let Some(s) = self.stream_gone(cid) else {
            return;
        };
        let (bytes_c2a, bytes_a2c) = s.bytes;
        let connector = s.connector.name();
        let duration_ms = s.opened.elapsed().as_millis() as u64;
        let session = self.session.as_str();
        match end {
            StreamEnd::Closed => {
                log::info!(
                    session = session,
                    connector = connector,
                    cid = cid,
                    bytes_c2a = bytes_c2a,
                    bytes_a2c = bytes_a2c,
                    duration_ms = duration_ms;
                    "stream closed"
                );
            }
            StreamEnd::Reset {
                code,
                reason,
                remote,
            } => {
                let by = if remote { "hub" } else { "agent" };
                log::info!(
                    session = session,
                    connector = connector,
                    cid = cid,
                    bytes_c2a = bytes_c2a,
                    bytes_a2c = bytes_a2c,
                    duration_ms = duration_ms,
                    code = code.name(),
                    reason = reason.as_str(),
                    by = by;
                    "stream reset"
                );
            }
        }
    }

    fn on_renew_ack(&mut self, _tunnel: &TunnelHandle, exp: u64) {
        let fraction = self.shared.cfg.token.renew_at;
        self.shared
            .registry
            .renewed(&self.id, exp, fraction, unix_now());
        log::info!(hub = self.hub.as_str(), session = self.session.as_str(), exp = exp; "token renewed");
    }

    fn on_goaway(&mut self, _tunnel: &TunnelHandle, code: Code, last_cid: u32, reason: &str) {
        log::info!(
            hub = self.hub.as_str(),
            session = self.session.as_str(),
            code = code.name(),
            last_cid = last_cid,
            reason = reason;
            "hub sent GOAWAY: no new streams on this tunnel; its streams drain"
        );
        let _ = self.supervisor.send(SlotEvent::GoAway {
            id: self.id.clone(),
            code,
        });
    }

    fn on_closed(&mut self, _code: u16, _reason: &str) {
        // Every stream ended before this call; this is a backstop for the gauges.
        let cids: Vec<u32> = self.streams.keys().copied().collect();
        for cid in cids {
            self.stream_gone(cid);
        }
        let _ = self.supervisor.send(SlotEvent::Closed {
            id: self.id.clone(),
        });
    }
}
