//! The tunnel thread: ONE thread per tunnel owns the WebSocket and the core `Session`.
//!
//! It sleeps in `poll(2)` on the WebSocket's socket (readable always; writable only while it
//! has unflushed output) and its waker, with the session's next timer as timeout — never a
//! read-timeout loop. Each turn: run due timers, drain the command queues, read what the
//! socket has, then drain the session (events to socket threads and the handler; each
//! `poll_transmit` output is one binary WebSocket message) and write until `WouldBlock`.
//! It never waits on a socket thread: DATA goes into that stream's inbox (bounded by the
//! window this side granted), credit into an atomic.
//!
//! The tunnel's state (session, WebSocket, stream table) sits behind a mutex that the tunnel
//! thread holds for a turn and releases while it sleeps. A socket thread with a command (DATA
//! read from its socket, FIN, RST, release) takes the lock if it is free and runs a short turn
//! itself — earlier queued commands first, then its own, then framing and writing — instead of
//! queueing the command and waking the tunnel thread: one wake-up less on every trip out
//! (DESIGN.md: count hand-offs on the round-trip path). If the lock is busy it queues as
//! before. Reading the WebSocket and timers stay with the tunnel thread; a direct turn wakes
//! it when the socket blocked, a timer moved earlier or the session closed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant as StdInstant};

use crossbeam_channel::Receiver;
use nowconnect_core::frame::truncate_utf8;
use nowconnect_core::{close, Event, Instant, Session};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::Message;

use crate::clock;
use crate::command::{Control, StreamCommand, TunnelPort, STREAM_QUEUE};
use crate::handle::{OpenRequest, StreamEnd, TunnelHandle, TunnelHandler, TunnelStatus};
use crate::sockopt;
use crate::stream::{self, BufPool, StreamLink};
use crate::waker::Waker;
use crate::ws::{finish_binary_frame, Masker, TunnelSocket, FRAME_HEADER_ROOM};

/// Stack of a tunnel thread (handler callbacks run on it; there are few tunnels).
pub const TUNNEL_STACK_SIZE: usize = 512 * 1024;

/// Close code recorded (never sent) when the connection itself was lost (RFC 6455 §7.4.1).
pub const CONNECTION_LOST: u16 = 1006;

/// Close code for a tunnel thread that died of a bug (RFC 6455 "internal error").
const INTERNAL_ERROR: u16 = 1011;

/// WebSocket messages read per turn before the thread writes again: reading must not starve
/// writing under two-way load.
const READS_PER_TURN: usize = 64;
/// How long a closing tunnel waits to flush its Close and close_notify and to hear the peer's
/// Close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// RFC 6455 §5.5: a control frame's payload is at most 125 bytes, 2 of them the code.
const MAX_CLOSE_REASON: usize = 123;

/// How a tunnel ended: the WebSocket close code (§7; [`CONNECTION_LOST`] when the connection
/// failed) and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEnd {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// A running tunnel: its handle and its thread.
#[derive(Debug)]
pub struct Tunnel {
    handle: TunnelHandle,
    thread: JoinHandle<TunnelEnd>,
}

impl Tunnel {
    /// Start the tunnel thread `nc-tunnel-<id>` for an upgraded WebSocket and a fresh
    /// session of either side (created with [`clock::now`](crate::now)).
    pub fn spawn(
        id: &str,
        mut ws: TunnelSocket,
        session: Session,
        handler: Box<dyn TunnelHandler>,
    ) -> io::Result<Tunnel> {
        ws.get_mut().set_nonblocking()?;
        sockopt::tune_tunnel_socket(ws.get_ref().tcp())?;
        let waker = Arc::new(Waker::new()?);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (stream_tx, stream_rx) = crossbeam_channel::bounded(STREAM_QUEUE);
        let status = Arc::new(TunnelStatus::default());
        let pool = BufPool::shared();
        // A second descriptor of the WebSocket's socket: the thread polls it without holding
        // the lock on its state.
        let poll_fd = ws.get_ref().tcp().try_clone()?;
        // The agent is the WebSocket client: its frames are masked (RFC 6455 §5.3).
        let masker = (session.side() == nowconnect_core::Side::Agent).then(Masker::new);
        let mut handle = None;
        let shared = Arc::new_cyclic(|direct: &Weak<Mutex<TunnelThread>>| {
            let port = TunnelPort {
                tx: stream_tx,
                waker: waker.clone(),
                pool: pool.clone(),
                direct: direct.clone(),
            };
            let h = TunnelHandle::new(id.to_owned(), control_tx, port, status.clone());
            handle = Some(h.clone());
            Mutex::new(TunnelThread {
                ws,
                session,
                handler,
                handle: h,
                waker: waker.clone(),
                control_rx,
                stream_rx,
                status,
                streams: HashMap::new(),
                pending_opens: HashSet::new(),
                credit_dirty: Vec::new(),
                pool,
                out: Vec::new(),
                held: None,
                masker,
                ws_blocked: false,
                ws_lost: false,
                ws_unreadable: false,
                read_more: false,
                readable: true,
                writable: false,
                woken: true,
                sleep_until: None,
                ended: false,
                end: None,
            })
        });
        let handle = handle.ok_or_else(|| io::Error::other("tunnel handle not created"))?;
        let thread = thread::Builder::new()
            .name(format!("nc-tunnel-{id}"))
            .stack_size(TUNNEL_STACK_SIZE)
            .spawn(move || run(&shared, &poll_fd, &waker))?;
        Ok(Tunnel { handle, thread })
    }

    /// Commands into the tunnel.
    pub fn handle(&self) -> &TunnelHandle {
        &self.handle
    }

    /// Wait for the tunnel to end.
    pub fn join(self) -> TunnelEnd {
        self.thread.join().unwrap_or_else(|_| TunnelEnd {
            code: INTERNAL_ERROR,
            reason: "tunnel thread panicked".into(),
        })
    }
}

/// A stream's socket thread as the tunnel thread sees it.
#[derive(Debug)]
struct Linked {
    link: Arc<StreamLink>,
    /// Credit handed to the socket thread and not yet come back as DATA.
    granted: usize,
    /// In `credit_dirty`.
    dirty: bool,
    /// Payload bytes this side sent to the peer (read from the local socket).
    sent: u64,
    /// Payload bytes the peer sent (handed to the local socket).
    received: u64,
}

/// A tunnel's state, behind a mutex: its thread runs turns on it, and a socket thread with
/// something to send runs a short turn itself when the lock is free ([`TunnelPort::send`]),
/// which saves the hand-off (a wake-up) on the way out.
pub(crate) struct TunnelThread {
    ws: TunnelSocket,
    session: Session,
    handler: Box<dyn TunnelHandler>,
    handle: TunnelHandle,
    waker: Arc<Waker>,
    control_rx: Receiver<Control>,
    stream_rx: Receiver<StreamCommand>,
    status: Arc<TunnelStatus>,
    streams: HashMap<u32, Linked>,
    /// Agent: OPENs handed to the handler and not answered yet.
    pending_opens: HashSet<u32>,
    /// Streams whose send capacity may have changed since credit was last published.
    credit_dirty: Vec<u32>,
    /// Socket threads' read buffers, back from the session once framed.
    pool: Arc<BufPool>,
    /// The next WebSocket message: [`FRAME_HEADER_ROOM`] bytes, then what `poll_transmit`
    /// filled; framed in place and handed to the transport without a copy.
    out: Vec<u8>,
    /// `out` holds a framed message starting at this offset, waiting for tungstenite's own
    /// buffered output (a pong, a Close) to go first.
    held: Option<usize>,
    /// Client side: masking keys.
    masker: Option<Masker>,
    /// The last flush hit `WouldBlock`: wait for writable, make no new messages meanwhile (the
    /// session keeps the data, bounded by credit).
    ws_blocked: bool,
    /// The connection failed: no Close frame or close_notify can be sent.
    ws_lost: bool,
    /// A read failed mid-message (over `max_message`): tungstenite's read state is not to be
    /// resumed (a debug assertion fires), so the close only flushes ours and reads nothing.
    ws_unreadable: bool,
    /// The read budget ran out with messages possibly buffered above the socket (where poll
    /// cannot see them).
    read_more: bool,
    readable: bool,
    writable: bool,
    /// The last poll saw the waker readable.
    woken: bool,
    /// The deadline the tunnel thread sleeps until (`None`: no timeout). A direct turn that
    /// brings the session's next timer before it wakes the thread.
    sleep_until: Option<Instant>,
    /// The tunnel thread has left its loop: no more direct turns.
    ended: bool,
    end: Option<TunnelEnd>,
}

/// What one `poll(2)` of the tunnel thread asks for.
struct PollParams {
    interest: PollFlags,
    timeout: Option<Duration>,
}

/// What it saw.
#[derive(Default)]
struct Polled {
    readable: bool,
    writable: bool,
    woken: bool,
    error: Option<io::Error>,
}

fn lock(shared: &Mutex<TunnelThread>) -> MutexGuard<'_, TunnelThread> {
    match shared.lock() {
        Ok(t) => t,
        Err(poisoned) => {
            // A handler panicked during a socket thread's direct turn: the state may be half
            // updated, so the tunnel ends, as it does when its own thread panics.
            let mut t = poisoned.into_inner();
            if t.session.close_reason().is_none() {
                t.session
                    .close(clock::now(), INTERNAL_ERROR, "internal error");
            }
            t
        }
    }
}

/// The tunnel thread: turns under the lock, `poll(2)` outside it.
fn run(shared: &Mutex<TunnelThread>, poll_fd: &TcpStream, waker: &Waker) -> TunnelEnd {
    let mut polled = Polled {
        readable: true,
        woken: true,
        ..Polled::default()
    };
    loop {
        let params = {
            let mut t = lock(shared);
            t.apply(polled);
            if !t.turn() {
                // Under the same lock: no direct turn runs on a closed session.
                t.ended = true;
                break;
            }
            t.poll_params()
        };
        polled = wait(poll_fd, waker, &params);
    }
    lock(shared).finish()
}

/// Sleep until the socket or the waker is ready, or the timeout.
fn wait(poll_fd: &TcpStream, waker: &Waker, params: &PollParams) -> Polled {
    let timespec = params.timeout.map(|d| Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    let mut fds = [
        PollFd::new(poll_fd, params.interest),
        PollFd::new(waker, PollFlags::IN),
    ];
    let result = poll(&mut fds, timespec.as_ref());
    let revents = fds[0].revents();
    Polled {
        // HUP/ERR: let the read or the flush surface the error.
        readable: revents.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
        writable: revents.intersects(PollFlags::OUT | PollFlags::HUP | PollFlags::ERR),
        woken: !fds[1].revents().is_empty(),
        error: match result {
            Ok(_) | Err(rustix::io::Errno::INTR) => None,
            Err(e) => Some(e.into()),
        },
    }
}

impl TunnelThread {
    /// Take in what the last poll saw.
    fn apply(&mut self, polled: Polled) {
        self.readable = polled.readable;
        self.writable = polled.writable;
        self.woken = polled.woken;
        if let Some(e) = polled.error {
            self.lost(clock::now(), &tungstenite::Error::Io(e));
        }
    }

    /// One turn of the tunnel thread; false once the session is closed.
    fn turn(&mut self) -> bool {
        self.status.turns.fetch_add(1, Ordering::Relaxed);
        let now = clock::now();
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        self.waker.reset_after_poll(self.woken);
        self.woken = false;
        self.drain_control(now);
        self.drain_stream_commands(now);
        if self.writable && self.ws_blocked {
            self.flush_ws(now);
        }
        if self.readable || self.read_more {
            self.read_ws(now);
        }
        self.drive(now);
        self.publish_credit(now);
        self.publish_status();
        self.session.close_reason().is_none()
    }

    /// A socket thread's turn: its command (after any still queued, which came first), then
    /// output. Wakes the tunnel thread if what it sleeps on no longer fits.
    pub(crate) fn direct_turn(&mut self, cmd: StreamCommand) {
        self.status.direct_turns.fetch_add(1, Ordering::Relaxed);
        let now = clock::now();
        self.drain_stream_commands(now);
        self.stream_command(now, cmd);
        self.drive(now);
        self.publish_credit(now);
        self.publish_status();
        let timer_moved = match (self.session.poll_timeout(), self.sleep_until) {
            (Some(t), Some(until)) => t < until,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if timer_moved
            || self.ws_blocked
            || self.ws.get_ref().wants_write()
            || self.session.close_reason().is_some()
            || !self.stream_rx.is_empty()
        {
            self.waker.wake();
        }
    }

    /// Whether socket threads may run turns (the tunnel thread is in its loop).
    pub(crate) fn accepts_direct(&self) -> bool {
        !self.ended
    }

    /// The session closed: close the connection and say how it ended.
    fn finish(&mut self) -> TunnelEnd {
        self.refuse_queued_opens();
        self.close_connection();
        self.refuse_queued_opens();
        self.end.clone().unwrap_or_else(|| {
            let (code, reason) = self.session.close_reason().unwrap_or((CONNECTION_LOST, ""));
            TunnelEnd {
                code,
                reason: reason.to_owned(),
            }
        })
    }

    // ----- inputs -----

    fn drain_control(&mut self, now: Instant) {
        while let Ok(cmd) = self.control_rx.try_recv() {
            match cmd {
                Control::Open {
                    client,
                    connector,
                    peer,
                    idle_timeout,
                    accepted,
                } => self.open_stream(now, client, &connector, &peer, idle_timeout, accepted),
                Control::Refuse { cid, code, reason } => {
                    if self.pending_opens.remove(&cid) {
                        self.session.reset(now, cid, code, &reason);
                        self.handler.on_stream_closed(
                            cid,
                            StreamEnd::Reset {
                                code,
                                reason,
                                remote: false,
                            },
                        );
                    }
                }
                Control::AcceptHello(ack) => self.session.accept_hello(now, ack),
                Control::RenewAck(exp) => self.session.renew_ack(now, exp),
                Control::Renew(token) => self.session.renew(now, &token),
                Control::Health(report) => self.session.send_health(now, &report),
                Control::GoAway(code, reason) => self.session.goaway(now, code, &reason),
                Control::Close(code, reason) => self.session.close(now, code, &reason),
            }
        }
    }

    /// Hub: open a stream for `client` and start its socket thread.
    fn open_stream(
        &mut self,
        now: Instant,
        client: std::net::TcpStream,
        connector: &str,
        peer: &str,
        idle_timeout: Option<Duration>,
        accepted: StdInstant,
    ) {
        let cid = match self.session.open(now, connector, peer, idle_timeout) {
            Ok(cid) => cid,
            Err(e) => return self.handler.on_open_failed(client, connector, e, accepted),
        };
        self.handler
            .on_stream_opening(cid, connector, peer, accepted);
        let link = match StreamLink::new(cid) {
            Ok(link) => link,
            Err(e) => {
                log::warn!("stream {cid}: {e}");
                sockopt::abort(client);
                return self.fail_stream(now, cid, "out of file descriptors");
            }
        };
        // Registered before its thread exists: its first DATA must find it.
        self.streams.insert(
            cid,
            Linked {
                link: link.clone(),
                granted: 0,
                dirty: false,
                sent: 0,
                received: 0,
            },
        );
        self.mark_dirty(cid);
        let port = self.handle.port().clone();
        let name = format!("nc-stream-{cid}");
        if let Err(e) = stream::spawn_stream_thread(name, move || stream::run(link, client, port)) {
            log::warn!("stream {cid}: cannot start its thread: {e}");
            self.streams.remove(&cid);
            self.fail_stream(now, cid, "cannot start stream thread");
        }
    }

    /// A stream this side could not run: RST it and tell the handler.
    fn fail_stream(&mut self, now: Instant, cid: u32, reason: &str) {
        let code = nowconnect_core::Code::INTERNAL;
        self.session.reset(now, cid, code, reason);
        self.handler.on_stream_closed(
            cid,
            StreamEnd::Reset {
                code,
                reason: reason.to_owned(),
                remote: false,
            },
        );
    }

    fn drain_stream_commands(&mut self, now: Instant) {
        // Bounded per turn so a flood of stream input cannot starve the WebSocket; what is
        // left makes the next poll return at once.
        for _ in 0..STREAM_QUEUE {
            let Ok(cmd) = self.stream_rx.try_recv() else {
                break;
            };
            self.stream_command(now, cmd);
        }
    }

    fn stream_command(&mut self, now: Instant, cmd: StreamCommand) {
        match cmd {
            StreamCommand::Data { cid, data } => {
                let Some(s) = self.streams.get_mut(&cid) else {
                    return; // reset meanwhile: the bytes have nowhere to go
                };
                let len = data.len();
                s.granted = s.granted.saturating_sub(len);
                // Within the credit granted, so queued without a copy.
                let accepted = self.session.send_vec(now, cid, data);
                s.sent += accepted as u64;
                if accepted < len {
                    log::debug!("stream {cid}: {} bytes after finish", len - accepted);
                }
                self.mark_dirty(cid);
            }
            StreamCommand::Finish { cid } => {
                if self.streams.contains_key(&cid) {
                    self.session.finish(now, cid);
                }
            }
            StreamCommand::Reset { cid, code, reason } => {
                if let Some(s) = self.streams.remove(&cid) {
                    // A local reset yields no session event: report it here.
                    self.session.reset(now, cid, code, reason);
                    self.handler.on_stream_bytes(cid, s.sent, s.received);
                    self.handler.on_stream_closed(
                        cid,
                        StreamEnd::Reset {
                            code,
                            reason: reason.to_owned(),
                            remote: false,
                        },
                    );
                }
            }
            StreamCommand::Release { cid, n } => self.session.release(now, cid, n),
            StreamCommand::Accept {
                cid,
                link,
                backend,
                idle_timeout,
            } => {
                if !self.pending_opens.remove(&cid) {
                    // Reset (hub RST, open timeout, session end) while connecting.
                    link.reset();
                    return;
                }
                if let Some(t) = idle_timeout {
                    self.session.set_idle_timeout(cid, t);
                }
                self.streams.insert(
                    cid,
                    Linked {
                        link,
                        granted: 0,
                        dirty: false,
                        sent: 0,
                        received: 0,
                    },
                );
                self.session.accept_stream(now, cid, &backend);
                self.mark_dirty(cid);
            }
        }
    }

    fn read_ws(&mut self, now: Instant) {
        self.read_more = false;
        for _ in 0..READS_PER_TURN {
            match self.ws.read() {
                // DATA events share the message's buffer: hand them out (written or copied)
                // before the next read, so tungstenite can reuse its buffer instead of
                // allocating (and faulting in) a fresh one per message.
                Ok(Message::Binary(msg)) => {
                    self.session.handle_message_bytes(now, msg);
                    self.dispatch_events(now);
                }
                Ok(Message::Text(_)) => self.session.handle_text_message(now),
                // tungstenite queues the pong itself; liveness is the protocol's PING (§5).
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    log::debug!("tunnel {}: peer closed: {code} {reason}", self.handle.id());
                    self.session.close(now, code, &reason);
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(tungstenite::Error::Capacity(_)) => {
                    self.ws_unreadable = true;
                    // §10: a message over max_message is 4400, not WebSocket 1009.
                    self.session.close(
                        now,
                        close::PROTOCOL_ERROR,
                        "protocol error: message larger than max_message",
                    );
                }
                Err(e) => self.lost(now, &e),
            }
            if self.session.close_reason().is_some() {
                return;
            }
        }
        self.read_more = true;
    }

    // ----- outputs -----

    /// Drain the session: events, then messages, until neither is left or the socket is full.
    fn drive(&mut self, now: Instant) {
        loop {
            let mut progressed = self.dispatch_events(now);
            if !self.ws_blocked && !self.ws_lost && self.next_message(now) {
                self.send_message(now);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        // Records rustls queued on its own (alerts, key updates) and tungstenite's pongs.
        if !self.ws_blocked && !self.ws_lost {
            self.flush_ws(now);
        }
    }

    /// Hand out every pending session event; whether there was any.
    fn dispatch_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(ev) = self.session.poll_event() {
            self.dispatch(now, ev);
            any = true;
        }
        any
    }

    /// Fill `out` with the session's next message (after room for the frame header).
    fn next_message(&mut self, now: Instant) -> bool {
        self.out.clear();
        self.out.resize(FRAME_HEADER_ROOM, 0);
        let any = self.session.poll_transmit(now, &mut self.out);
        while let Some(buf) = self.session.take_spare_buffer() {
            self.pool.put(buf);
        }
        any
    }

    /// Frame `out` as one binary WebSocket message and send it (one TLS write for the batch).
    fn send_message(&mut self, now: Instant) {
        let start = finish_binary_frame(&mut self.out, self.masker.as_mut());
        self.held = Some(start);
        self.flush_ws(now);
    }

    /// Write tungstenite's buffered output, then the held message, until done or `WouldBlock`.
    fn flush_ws(&mut self, now: Instant) {
        loop {
            match self.ws.flush() {
                Ok(()) => {
                    if let Some(start) = self.held.take() {
                        // tungstenite's buffer is empty: our frame goes next, whole.
                        self.ws.get_mut().queue_frames(&mut self.out, start);
                        continue;
                    }
                    self.ws_blocked = false;
                    return;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ws_blocked = true;
                    return;
                }
                Err(e) => {
                    self.lost(now, &e);
                    return;
                }
            }
        }
    }

    fn lost(&mut self, now: Instant, e: &tungstenite::Error) {
        if !self.ws_lost {
            self.ws_lost = true;
            log::debug!("tunnel {}: connection lost: {e}", self.handle.id());
            self.session
                .close(now, CONNECTION_LOST, &format!("connection lost: {e}"));
        }
    }

    fn dispatch(&mut self, now: Instant, ev: Event) {
        let tunnel = &self.handle;
        match ev {
            Event::Data { cid, data } => {
                if let Some(s) = self.streams.get_mut(&cid) {
                    s.received += data.len() as u64;
                    // Bytes the socket took at once go back as credit now (WINDOW in the next
                    // message), with no round trip through the socket thread.
                    let written = s.link.deliver(&data, &self.pool);
                    if written > 0 {
                        self.session.release(now, cid, written);
                    }
                }
            }
            Event::Writable { cid } => self.mark_dirty(cid),
            Event::Finished { cid } => {
                if let Some(s) = self.streams.get(&cid) {
                    s.link.finish();
                }
            }
            Event::Reset {
                cid,
                code,
                reason,
                remote,
            } => {
                if let Some(s) = self.streams.remove(&cid) {
                    s.link.reset();
                    self.handler.on_stream_bytes(cid, s.sent, s.received);
                } else if !self.pending_opens.remove(&cid) {
                    return;
                }
                let end = StreamEnd::Reset {
                    code,
                    reason,
                    remote,
                };
                self.handler.on_stream_closed(cid, end);
            }
            Event::StreamClosed { cid } => {
                // Its socket thread may still be writing the tail; it ends by itself.
                if let Some(s) = self.streams.remove(&cid) {
                    self.handler.on_stream_bytes(cid, s.sent, s.received);
                }
                self.handler.on_stream_closed(cid, StreamEnd::Closed);
            }
            Event::OpenRequest {
                cid,
                connector,
                peer,
            } => {
                self.pending_opens.insert(cid);
                let request = OpenRequest::new(cid, connector, peer, tunnel.clone());
                self.handler.on_open_request(request);
            }
            Event::Opened { cid, backend } => self.handler.on_stream_opened(cid, &backend),
            Event::Hello(hello) => self.handler.on_hello(tunnel, hello),
            Event::Established(ack) => {
                self.status.established.store(true, Ordering::Relaxed);
                self.handler.on_established(tunnel, &ack);
            }
            Event::Health(report) => self.handler.on_health(tunnel, report),
            Event::Renew { token } => self.handler.on_renew(tunnel, token),
            Event::RenewAck { exp } => self.handler.on_renew_ack(tunnel, exp),
            Event::GoAway {
                code,
                last_cid,
                reason,
            } => self.handler.on_goaway(tunnel, code, last_cid, &reason),
            Event::SessionClosed { code, reason } => {
                self.status.closed.store(true, Ordering::Relaxed);
                self.handler.on_closed(code, &reason);
                self.end = Some(TunnelEnd { code, reason });
            }
        }
    }

    fn mark_dirty(&mut self, cid: u32) {
        if let Some(s) = self.streams.get_mut(&cid) {
            if !s.dirty {
                s.dirty = true;
                self.credit_dirty.push(cid);
            }
        }
    }

    /// Hand socket threads the send capacity the session has beyond what they already hold.
    fn publish_credit(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.credit_dirty);
        for cid in dirty.drain(..) {
            let Some(s) = self.streams.get_mut(&cid) else {
                continue;
            };
            s.dirty = false;
            let capacity = self.session.send_capacity(cid);
            if capacity > s.granted {
                s.link.grant(capacity - s.granted);
                s.granted = capacity;
            } else if capacity == 0 && s.granted == 0 {
                // Out of credit everywhere. A send refused for lack of capacity is what makes
                // the session report `Writable` when WINDOW returns some; the byte is never
                // queued (capacity is 0).
                let _ = self.session.send(now, cid, &[0]);
            }
        }
        self.credit_dirty = dirty;
    }

    fn publish_status(&self) {
        let s = &self.status;
        s.active_streams
            .store(self.session.active_streams(), Ordering::Relaxed);
        s.established
            .store(self.session.is_established(), Ordering::Relaxed);
        s.draining.store(
            self.session.is_draining() || self.session.peer_draining(),
            Ordering::Relaxed,
        );
        if self.session.close_reason().is_some() {
            s.closed.store(true, Ordering::Relaxed);
        }
    }

    /// What the next poll waits for: readable always, writable while output is stuck; the
    /// session's next timer (at once if work is left over).
    fn poll_params(&mut self) -> PollParams {
        self.sleep_until = self.session.poll_timeout();
        let mut timeout = self.sleep_until.map(clock::until);
        if self.read_more || !self.stream_rx.is_empty() {
            timeout = Some(Duration::ZERO);
        }
        let mut interest = PollFlags::IN;
        if self.ws_blocked || self.ws.get_ref().wants_write() {
            interest |= PollFlags::OUT;
        }
        PollParams { interest, timeout }
    }

    // ----- the end -----

    /// Clients queued for a tunnel that is ending go back to the handler (a router may send
    /// them elsewhere); other queued commands no longer matter.
    fn refuse_queued_opens(&mut self) {
        while let Ok(cmd) = self.control_rx.try_recv() {
            if let Control::Open {
                client,
                connector,
                accepted,
                ..
            } = cmd
            {
                self.handler.on_open_failed(
                    client,
                    &connector,
                    nowconnect_core::OpenError::Closed,
                    accepted,
                );
            }
        }
    }

    /// The session is closed: send what it still queued (RST, GOAWAY), the WebSocket Close with
    /// its code, TLS close_notify, and wait a little for the peer's Close.
    fn close_connection(&mut self) {
        if self.ws_lost {
            return;
        }
        let now = clock::now();
        let deadline = StdInstant::now() + CLOSE_LINGER;
        // What the session still queued (RST, GOAWAY), within the linger deadline.
        while !self.ws_lost {
            if self.held.is_none() {
                if !self.next_message(now) {
                    break;
                }
                self.held = Some(finish_binary_frame(&mut self.out, self.masker.as_mut()));
            }
            self.flush_ws(now);
            if self.ws_blocked && !self.wait_socket(PollFlags::OUT, deadline) {
                break;
            }
        }
        if self.ws_lost {
            return;
        }
        let (code, reason) = self.session.close_reason().unwrap_or((close::NORMAL, ""));
        // 1005/1006/1015 describe a missing or failed close; they are never sent.
        let frame = (!matches!(code, 1005 | 1006 | 1015)).then(|| CloseFrame {
            code: code.into(),
            reason: truncate_utf8(reason, MAX_CLOSE_REASON).to_owned().into(),
        });
        // Err: the peer's Close came first and tungstenite already answered it.
        let _ = self.ws.close(frame);
        self.linger_for_close(deadline);
        loop {
            match self.ws.get_mut().close_notify() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_socket(PollFlags::OUT, deadline) {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.ws.get_ref().shutdown();
    }

    /// Flush our Close and read until the peer's Close completes the handshake, or deadline.
    fn linger_for_close(&mut self, deadline: StdInstant) {
        loop {
            let flushed = match self.ws.flush() {
                Ok(()) => true,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(_) => return,
            };
            if self.ws_unreadable {
                // Our Close is out (or the socket is full until the deadline); nothing to read.
                if flushed || !self.wait_socket(PollFlags::OUT, deadline) {
                    return;
                }
                continue;
            }
            loop {
                match self.ws.read() {
                    // Late messages of a closed session are dropped.
                    Ok(_) if StdInstant::now() < deadline => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break
                    }
                    // ConnectionClosed (handshake complete), an error, or out of time.
                    _ => return,
                }
            }
            let interest = if flushed {
                PollFlags::IN
            } else {
                PollFlags::IN | PollFlags::OUT
            };
            if !self.wait_socket(interest, deadline) {
                return;
            }
        }
    }

    /// Poll the WebSocket's socket alone until `deadline`; false when out of time.
    fn wait_socket(&self, interest: PollFlags, deadline: StdInstant) -> bool {
        let left = deadline.saturating_duration_since(StdInstant::now());
        if left.is_zero() {
            return false;
        }
        let timespec = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(self.ws.get_ref().tcp(), interest)];
        match poll(&mut fds, Some(&timespec)) {
            Ok(n) => n > 0,
            Err(rustix::io::Errno::INTR) => true,
            Err(_) => false,
        }
    }
}

impl Drop for TunnelThread {
    /// Whatever way the thread ends (a handler panic included), no socket thread is left
    /// waiting and no queued client is left open.
    fn drop(&mut self) {
        self.status.closed.store(true, Ordering::Relaxed);
        for (_, s) in self.streams.drain() {
            s.link.reset();
        }
        while let Ok(cmd) = self.control_rx.try_recv() {
            if let Control::Open { client, .. } = cmd {
                sockopt::abort(client);
            }
        }
        while let Ok(cmd) = self.stream_rx.try_recv() {
            if let StreamCommand::Accept { link, .. } = cmd {
                link.reset();
            }
        }
    }
}
