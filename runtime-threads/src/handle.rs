//! What the application holds and implements: [`TunnelHandle`] (commands into a tunnel),
//! [`TunnelHandler`] (session events out of it) and, on the agent, [`OpenRequest`].

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nowconnect_core::{Code, HealthReport, Hello, HelloAck, OpenError};

use crate::command::{Control, StreamCommand, TunnelPort};
use crate::sockopt;
use crate::stream::{self, StreamLink};

/// Tunnel state the tunnel thread publishes for other threads (routing, metrics).
#[derive(Debug, Default)]
pub(crate) struct TunnelStatus {
    pub active_streams: AtomicUsize,
    pub established: AtomicBool,
    pub draining: AtomicBool,
    pub closed: AtomicBool,
    /// Turns of the tunnel thread (each after a wake-up, a readable socket or a timer).
    pub turns: AtomicU64,
    /// Direct turns socket threads ran instead of waking the tunnel thread.
    pub direct_turns: AtomicU64,
}

#[derive(Debug)]
struct HandleShared {
    id: String,
    control: Sender<Control>,
    port: TunnelPort,
    status: Arc<TunnelStatus>,
}

/// Commands into a running tunnel; cheap to clone, usable from any thread (including from
/// [`TunnelHandler`] callbacks, which run on the tunnel thread). Commands issued after the
/// tunnel ended are ignored.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    shared: Arc<HandleShared>,
}

impl TunnelHandle {
    pub(crate) fn new(
        id: String,
        control: Sender<Control>,
        port: TunnelPort,
        status: Arc<TunnelStatus>,
    ) -> TunnelHandle {
        TunnelHandle {
            shared: Arc::new(HandleShared {
                id,
                control,
                port,
                status,
            }),
        }
    }

    pub(crate) fn port(&self) -> &TunnelPort {
        &self.shared.port
    }

    fn control(&self, cmd: Control) -> Result<(), Control> {
        self.shared.control.send(cmd).map_err(|e| e.into_inner())?;
        self.shared.port.waker.wake();
        Ok(())
    }

    /// The id given at spawn (also in the thread name `nc-tunnel-<id>`).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Hub: carry an accepted `client` over a new stream of `connector` (`peer`: the client's
    /// `ip:port`; `accepted`: when the client was accepted, handed back to the handler so the
    /// open latency includes routing and authorization). The tunnel thread opens the stream and starts the client's socket thread;
    /// if the session refuses (draining, too many streams…),
    /// [`TunnelHandler::on_open_failed`] gets the client back. `Err` returns the client at
    /// once when the tunnel has already ended, so the caller can route it elsewhere.
    pub fn open_stream(
        &self,
        client: TcpStream,
        connector: &str,
        peer: &str,
        idle_timeout: Option<Duration>,
        accepted: Instant,
    ) -> Result<(), TcpStream> {
        let cmd = Control::Open {
            client,
            connector: connector.to_owned(),
            peer: peer.to_owned(),
            idle_timeout,
            accepted,
        };
        match self.control(cmd) {
            Ok(()) => Ok(()),
            Err(Control::Open { client, .. }) => Err(client),
            Err(_) => unreachable!("control() hands back the command it was given"),
        }
    }

    /// Hub: answer the agent's HELLO (after [`TunnelHandler::on_hello`]).
    pub fn accept_hello(&self, ack: HelloAck) {
        let _ = self.control(Control::AcceptHello(ack));
    }

    /// Hub: accept a RENEW with the new token's expiry (Unix seconds).
    pub fn renew_ack(&self, exp: u64) {
        let _ = self.control(Control::RenewAck(exp));
    }

    /// Agent: send a fresh token in-band (RENEW).
    pub fn renew(&self, token: &str) {
        let _ = self.control(Control::Renew(token.to_owned()));
    }

    /// Agent: send HEALTH.
    pub fn send_health(&self, report: HealthReport) {
        let _ = self.control(Control::Health(report));
    }

    /// Start a graceful drain (GOAWAY); the tunnel closes by itself when its streams end or the
    /// grace period runs out.
    pub fn goaway(&self, code: Code, reason: &str) {
        let _ = self.control(Control::GoAway(code, reason.to_owned()));
    }

    /// Close the tunnel now with a WebSocket close code (§7), resetting its streams.
    pub fn close(&self, code: u16, reason: &str) {
        let _ = self.control(Control::Close(code, reason.to_owned()));
    }

    /// How many turns the tunnel thread ran, and how many direct turns socket threads ran in
    /// its place (each a hand-off saved): for diagnostics and tests.
    pub fn turn_counts(&self) -> (u64, u64) {
        let s = &self.shared.status;
        (
            s.turns.load(Ordering::Relaxed),
            s.direct_turns.load(Ordering::Relaxed),
        )
    }

    /// Streams open (or opening) on this tunnel, as of the tunnel thread's last turn.
    pub fn active_streams(&self) -> usize {
        self.shared.status.active_streams.load(Ordering::Relaxed)
    }

    /// HELLO / HELLO_ACK done and not closed.
    pub fn is_established(&self) -> bool {
        self.shared.status.established.load(Ordering::Relaxed)
    }

    /// Either side sent GOAWAY: no new streams.
    pub fn is_draining(&self) -> bool {
        self.shared.status.draining.load(Ordering::Relaxed)
    }

    /// The tunnel has ended (or is ending).
    pub fn is_closed(&self) -> bool {
        self.shared.status.closed.load(Ordering::Relaxed)
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Both directions finished cleanly (FIN both ways).
    Closed,
    /// Aborted.
    Reset {
        /// §8 code.
        code: Code,
        /// Reason text.
        reason: String,
        /// The peer sent the RST; `false` when this side reset it (local socket error,
        /// timeout, session death).
        remote: bool,
    },
}

/// Session-level events of one tunnel, called with the tunnel's state locked — on the tunnel
/// thread, or on a socket thread running a direct turn — one call at a time: return quickly and
/// never block (answer later through the [`TunnelHandle`] if a decision needs I/O). Every
/// method has a default, so a side implements what concerns it.
pub trait TunnelHandler: Send + 'static {
    /// Hub: the agent's HELLO. Answer with [`TunnelHandle::accept_hello`] or
    /// [`TunnelHandle::close`] (e.g. 4403). Default: close 4403.
    fn on_hello(&mut self, tunnel: &TunnelHandle, hello: Hello) {
        let _ = hello;
        tunnel.close(nowconnect_core::close::FORBIDDEN, "no HELLO policy");
    }

    /// Agent: HELLO_ACK arrived; the tunnel is established.
    fn on_established(&mut self, tunnel: &TunnelHandle, ack: &HelloAck) {
        let _ = (tunnel, ack);
    }

    /// Agent: the hub opened a stream. Connect the target on another thread (e.g.
    /// [`spawn_stream_thread`](crate::spawn_stream_thread)), then [`OpenRequest::accept`] there
    /// or [`OpenRequest::refuse`]. Default: refuse with UNKNOWN_CONNECTOR.
    fn on_open_request(&mut self, request: OpenRequest) {
        request.refuse(Code::UNKNOWN_CONNECTOR, "unknown connector");
    }

    /// Hub: the session could not open a stream for `client`. Default: close it abortively
    /// (§10); a router may instead try another tunnel.
    fn on_open_failed(
        &mut self,
        client: TcpStream,
        connector: &str,
        error: OpenError,
        accepted: Instant,
    ) {
        let _ = accepted;
        log::debug!("open for connector {connector} refused: {error}");
        sockopt::abort(client);
    }

    /// Hub: a client handed to [`TunnelHandle::open_stream`] got stream `cid` (OPEN queued).
    /// Every such stream later ends in [`on_stream_closed`](Self::on_stream_closed).
    /// `accepted` is the instant given to `open_stream`.
    fn on_stream_opening(&mut self, cid: u32, connector: &str, peer: &str, accepted: Instant) {
        let _ = (cid, connector, peer, accepted);
    }

    /// Hub: the agent connected the target (OPEN_OK).
    fn on_stream_opened(&mut self, cid: u32, backend: &str) {
        let _ = (cid, backend);
    }

    /// Payload bytes a stream carried, reported once right before its
    /// [`on_stream_closed`](Self::on_stream_closed): `sent` went from this side's socket to the
    /// peer, `received` came from the peer for this side's socket.
    fn on_stream_bytes(&mut self, cid: u32, sent: u64, received: u64) {
        let _ = (cid, sent, received);
    }

    /// A stream ended. When the session closes, every stream still open ends here with a
    /// `Reset` before [`on_closed`](Self::on_closed).
    fn on_stream_closed(&mut self, cid: u32, end: StreamEnd) {
        let _ = (cid, end);
    }

    /// Hub: the agent's HEALTH.
    fn on_health(&mut self, tunnel: &TunnelHandle, report: HealthReport) {
        let _ = (tunnel, report);
    }

    /// Hub: RENEW. Validate, then [`TunnelHandle::renew_ack`] or
    /// [`TunnelHandle::goaway`] with FORBIDDEN. Default: FORBIDDEN.
    fn on_renew(&mut self, tunnel: &TunnelHandle, token: String) {
        let _ = token;
        tunnel.goaway(Code::FORBIDDEN, "renew not supported");
    }

    /// Agent: the hub accepted the renewed token.
    fn on_renew_ack(&mut self, tunnel: &TunnelHandle, exp: u64) {
        let _ = (tunnel, exp);
    }

    /// The peer sent GOAWAY: no new streams above `last_cid` (agent: dial a replacement).
    fn on_goaway(&mut self, tunnel: &TunnelHandle, code: Code, last_cid: u32, reason: &str) {
        let _ = (tunnel, code, last_cid, reason);
    }

    /// The session ended with this WebSocket close code (ours or the peer's; 1006 when the
    /// connection was lost). Last call.
    fn on_closed(&mut self, code: u16, reason: &str) {
        let _ = (code, reason);
    }
}

/// Agent: an OPEN to answer. Exactly one of [`accept`](Self::accept) or
/// [`refuse`](Self::refuse); dropping it unanswered refuses with INTERNAL.
#[derive(Debug)]
pub struct OpenRequest {
    /// Stream id.
    pub cid: u32,
    /// Connector the client connected to on the hub.
    pub connector: String,
    /// The client's `ip:port`, for logs and audit.
    pub peer: String,
    idle_timeout: Option<Option<Duration>>,
    tunnel: Option<TunnelHandle>,
}

impl OpenRequest {
    pub(crate) fn new(
        cid: u32,
        connector: String,
        peer: String,
        tunnel: TunnelHandle,
    ) -> OpenRequest {
        OpenRequest {
            cid,
            connector,
            peer,
            idle_timeout: None,
            tunnel: Some(tunnel),
        }
    }

    /// The tunnel this request came from.
    pub fn tunnel(&self) -> Option<&TunnelHandle> {
        self.tunnel.as_ref()
    }

    /// Override this stream's idle timeout (the connector's; `None` disables).
    pub fn set_idle_timeout(&mut self, idle_timeout: Option<Duration>) {
        self.idle_timeout = Some(idle_timeout);
    }

    /// The target is connected: send OPEN_OK (`backend`: the `host:port` connected) and run the
    /// stream's socket thread **on the calling thread** until the stream ends. If the stream
    /// was reset meanwhile, `target` is closed abortively at once.
    pub fn accept(mut self, target: TcpStream, backend: &str) {
        let Some(tunnel) = self.tunnel.take() else {
            return;
        };
        let cid = self.cid;
        let link = match StreamLink::new(cid) {
            Ok(link) => link,
            Err(e) => {
                log::warn!("stream {cid}: {e}");
                sockopt::abort(target);
                refuse(&tunnel, cid, Code::INTERNAL, "out of file descriptors");
                return;
            }
        };
        let port = tunnel.port().clone();
        let accept = StreamCommand::Accept {
            cid,
            link: link.clone(),
            backend: backend.to_owned(),
            idle_timeout: self.idle_timeout,
        };
        if port.send(accept).is_err() {
            sockopt::abort(target);
            return;
        }
        stream::run(link, target, port);
    }

    /// Refuse the stream with RST `code` (CONNECT_REFUSED, CONNECT_TIMEOUT,
    /// UNKNOWN_CONNECTOR, NO_HEALTHY_BACKEND…).
    pub fn refuse(mut self, code: Code, reason: &str) {
        if let Some(tunnel) = self.tunnel.take() {
            refuse(&tunnel, self.cid, code, reason);
        }
    }
}

fn refuse(tunnel: &TunnelHandle, cid: u32, code: Code, reason: &str) {
    let _ = tunnel.control(Control::Refuse {
        cid,
        code,
        reason: reason.to_owned(),
    });
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        if let Some(tunnel) = self.tunnel.take() {
            refuse(&tunnel, self.cid, Code::INTERNAL, "open request dropped");
        }
    }
}
