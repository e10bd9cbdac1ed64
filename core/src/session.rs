//! The session state machine, both sides (wire-protocol.md §3–§7, §10).

use std::collections::{BTreeMap, VecDeque};

use core::time::Duration;

use crate::codes::{close, Code, Side};
use crate::config::{Config, MAX_CREDIT};
use crate::event::Event;
use bytes::Bytes;

use crate::frame::{
    decode_one, encode_data_header, extend_payload, truncate_utf8, DecodeError, FinDir, Frame,
    DATA_OVERHEAD, HEADER_LEN, MAX_REASON,
};
use crate::json::{HealthReport, Hello, HelloAck, RenewAck, PROTOCOL_VERSION};
use crate::stream::{Phase, Stream, TxQueue};
use crate::time::Instant;

/// Shortest round trip assumed by auto-tuning (a loopback PING can measure 0 ms).
const MIN_RTT: Duration = Duration::from_millis(1);
/// Round trip assumed before the first PONG.
const DEFAULT_RTT: Duration = Duration::from_millis(100);
/// The idle/open sweeper runs this often (§10: reset within one second after the timeout).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An owned copy of a DATA payload (for `Event::Data`).
fn payload_copy(payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(payload.len());
    extend_payload(&mut v, payload);
    Bytes::from(v)
}

/// Why `Session::open` refused to open a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// Only the hub opens streams, and only once HELLO_ACK has been sent.
    NotEstablished,
    /// This side or the peer sent GOAWAY.
    Draining,
    /// `max_streams` (ours or the agent's) reached: REFUSED_STREAM.
    TooManyStreams,
    /// The session is closed.
    Closed,
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OpenError::NotEstablished => "session not established",
            OpenError::Draining => "session draining",
            OpenError::TooManyStreams => "too many streams",
            OpenError::Closed => "session closed",
        })
    }
}

impl std::error::Error for OpenError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hub: waiting for HELLO.
    AwaitHello,
    /// Hub: HELLO delivered to the driver, waiting for `accept_hello` / `close`.
    HelloReceived,
    /// Agent: HELLO sent, waiting for HELLO_ACK.
    AwaitHelloAck,
    Established,
    Closed,
}

#[derive(Debug)]
struct Drain {
    deadline: Instant,
    code: Code,
    /// Agent: the PING sent right behind its GOAWAY, until its PONG. OPENs the hub sent before
    /// it read the GOAWAY arrive ahead of that PONG and are still accepted; the drain cannot
    /// finish before it, so no such OPEN meets a closed session.
    fence: Option<u64>,
}

/// One tunnel's protocol state, for either side. Pure: no I/O, no clock, no randomness.
///
/// # Driving it
///
/// Inputs are `handle_message` (each WebSocket binary message), `handle_timeout` and the
/// commands (`open`, `send`, `finish`, `reset`, `release`, …). **After every input, drain all
/// outputs**: `poll_transmit` until it returns false (each call fills one WebSocket message),
/// `poll_event` until `None`, then sleep until `poll_timeout()` or the next input. Once
/// `close_reason()` is `Some`, flush `poll_transmit` and close the WebSocket with that code.
///
/// ```
/// use nowconnect_core::{Config, Event, Hello, Instant, Session};
/// let hello = Hello { agent_id: "a1".into(), connectors: vec!["ldap".into()], ver: 1,
///     software: String::new(), window: 262_144, max_streams: 100 };
/// let mut agent = Session::new_agent(Config::default(), hello, Instant::from_millis(0));
/// let mut msg = Vec::new();
/// while agent.poll_transmit(Instant::from_millis(0), &mut msg) {
///     // websocket.send(Message::Binary(msg)); msg.clear();
///     msg.clear();
/// }
/// while let Some(ev) = agent.poll_event() { let _ = ev; }
/// assert!(agent.poll_timeout().is_some()); // the HELLO_ACK deadline
/// ```
#[derive(Debug)]
pub struct Session {
    side: Side,
    config: Config,
    state: State,
    created: Instant,
    last_now: Instant,
    last_sent: Instant,
    last_recv: Instant,
    heartbeat: Duration,
    /// Credit each new stream starts with for our sends (the peer's advertised window).
    peer_window: u32,
    /// DATA payload limit in both directions (HELLO_ACK's).
    max_frame: u32,
    /// Agent's `max_streams` from HELLO (hub side); our own limit on the agent.
    peer_max_streams: u32,
    streams: BTreeMap<u32, Stream>,
    /// Hub: last cid allocated. Agent: highest cid the hub opened.
    highest_cid: u32,
    ready: VecDeque<u32>,
    ctrl: Vec<u8>,
    ctrl_lens: VecDeque<usize>,
    events: VecDeque<Event>,
    /// Send chunks already framed, for the driver to reuse (`take_spare_buffer`).
    spare: Vec<Vec<u8>>,
    /// The message `handle_message_bytes` is decoding: DATA events share it instead of copying.
    rx_msg: Option<Bytes>,
    /// Sum of every stream's receive window above its initial size (auto-tuning budget).
    grown: u64,
    rtt: Option<Duration>,
    ping_seq: u64,
    ping_out: Option<(u64, Instant)>,
    drain: Option<Drain>,
    peer_goaway: Option<u32>,
    sweep_at: Option<Instant>,
    close: Option<(u16, String)>,
}

impl Session {
    fn new(side: Side, config: Config, now: Instant, state: State) -> Self {
        let heartbeat = config.heartbeat;
        let max_frame = config.max_frame;
        let peer_max_streams = config.max_streams;
        Session {
            side,
            config,
            state,
            created: now,
            last_now: now,
            last_sent: now,
            last_recv: now,
            heartbeat,
            peer_window: 0,
            max_frame,
            peer_max_streams,
            streams: BTreeMap::new(),
            highest_cid: 0,
            ready: VecDeque::new(),
            ctrl: Vec::new(),
            ctrl_lens: VecDeque::new(),
            events: VecDeque::new(),
            rx_msg: None,
            spare: Vec::new(),
            grown: 0,
            rtt: None,
            ping_seq: 0,
            ping_out: None,
            drain: None,
            peer_goaway: None,
            sweep_at: None,
            close: None,
        }
    }

    /// A hub session, right after the WebSocket upgrade: it waits for HELLO.
    pub fn new_hub(config: Config, now: Instant) -> Self {
        Session::new(Side::Hub, config, now, State::AwaitHello)
    }

    /// An agent session, right after the upgrade: HELLO is queued. `hello.window` and
    /// `hello.max_streams` are taken from `config`.
    pub fn new_agent(config: Config, mut hello: Hello, now: Instant) -> Self {
        hello.window = config.window;
        hello.max_streams = config.max_streams;
        hello.ver = PROTOCOL_VERSION;
        let mut s = Session::new(Side::Agent, config, now, State::AwaitHelloAck);
        s.queue_ctrl(&Frame::Hello(hello));
        s
    }

    // ----- getters -----

    /// Which side this session is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// HELLO/HELLO_ACK done and not closed.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Open streams (including ones still opening).
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// This side sent GOAWAY.
    pub fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// The peer sent GOAWAY.
    pub fn peer_draining(&self) -> bool {
        self.peer_goaway.is_some()
    }

    /// `Some((code, reason))` once the session is closed: close the WebSocket with it.
    pub fn close_reason(&self) -> Option<(u16, &str)> {
        self.close.as_ref().map(|(c, r)| (*c, r.as_str()))
    }

    /// The heartbeat in force (§10: HELLO_ACK's, or the agent's if smaller).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Smoothed round-trip time from PING/PONG, if measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// DATA payload limit in force.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Bytes `send` would accept now on `cid` (0 if unknown, finished or closed).
    pub fn send_capacity(&self, cid: u32) -> usize {
        match self.streams.get(&cid) {
            Some(s) if s.phase == Phase::Open || self.side == Side::Hub => s.tx.capacity(),
            _ => 0,
        }
    }

    /// The credit the peer has granted on `cid` and we have not used (`send_capacity` is this,
    /// capped by `Config::max_unsent`, less what is queued).
    pub fn send_credit(&self, cid: u32) -> Option<u64> {
        self.streams.get(&cid).map(|s| s.tx.credit)
    }

    /// The receive window currently granted on `cid` (grows with auto-tuning).
    pub fn recv_window(&self, cid: u32) -> Option<u64> {
        self.streams.get(&cid).map(|s| s.rx.window)
    }

    /// Highest cid opened (hub) or accepted (agent).
    pub fn highest_cid(&self) -> u32 {
        self.highest_cid
    }

    // ----- time -----

    fn advance(&mut self, now: Instant) {
        debug_assert!(now >= self.last_now, "time went backwards");
        if now > self.last_now {
            self.last_now = now;
        }
    }

    /// When `handle_timeout` must be called next, or `None` when nothing is pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |i: Instant| t = Some(t.map_or(i, |x| x.min(i)));
        match self.state {
            State::Closed => return None,
            State::AwaitHello | State::HelloReceived | State::AwaitHelloAck => {
                at(self.created + self.config.hello_timeout);
            }
            State::Established => {
                at(self.last_sent + self.heartbeat);
                at(self.last_recv + self.heartbeat * 3);
                if let Some(s) = self.sweep_at {
                    at(s);
                }
                if let Some(d) = &self.drain {
                    at(d.deadline);
                }
            }
        }
        t.map(|t| t.max(self.last_now))
    }

    /// Runs the timers due at `now`: handshake deadline, heartbeat, liveness, sweeper, drain.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        match self.state {
            State::Closed => {}
            State::AwaitHello | State::HelloReceived | State::AwaitHelloAck => {
                if now >= self.created + self.config.hello_timeout {
                    let what = if self.side == Side::Hub {
                        "HELLO"
                    } else {
                        "HELLO_ACK"
                    };
                    self.close_session(close::TIMEOUT, &format!("{what} timeout"));
                }
            }
            State::Established => {
                // §5: dead after 3 heartbeats without receiving anything.
                if now >= self.last_recv + self.heartbeat * 3 {
                    self.close_session(close::TIMEOUT, "heartbeat lost");
                    return;
                }
                if let Some(d) = &self.drain {
                    if now >= d.deadline {
                        self.finish_drain(true);
                        return;
                    }
                }
                if self.sweep_at.is_some_and(|s| now >= s) {
                    self.sweep(now);
                }
                if now >= self.last_sent + self.heartbeat {
                    self.send_ping(now);
                }
            }
        }
    }

    fn send_ping(&mut self, now: Instant) {
        self.ping_seq = self.ping_seq.wrapping_add(1);
        let opaque = self.ping_seq;
        self.ping_out = Some((opaque, now));
        self.queue_ctrl(&Frame::Ping { opaque });
        // A queued PING counts as sending: the driver transmits it right after this input.
        self.last_sent = now;
    }

    /// §4 idle sweeper and the hub's `open_timeout`.
    fn sweep(&mut self, now: Instant) {
        let mut expired: Vec<(u32, Code, &'static str)> = Vec::new();
        for (&cid, s) in &self.streams {
            if self.side == Side::Hub
                && s.phase == Phase::Opening
                && now >= s.opened_at + self.config.open_timeout
            {
                expired.push((cid, Code::CONNECT_TIMEOUT, "open timeout"));
            } else if let Some(idle) = s.idle_timeout {
                if !idle.is_zero() && now >= s.last_activity + idle {
                    expired.push((cid, Code::IDLE_TIMEOUT, "idle timeout"));
                }
            }
        }
        for (cid, code, reason) in expired {
            self.reset_stream(cid, code, reason);
        }
        self.sweep_at = (!self.streams.is_empty()).then(|| now + SWEEP_EVERY);
        self.maybe_drained();
    }

    // ----- network input -----

    /// Feeds one WebSocket binary message from the peer. DATA payloads are copied into their
    /// events; [`handle_message_bytes`](Session::handle_message_bytes) avoids that copy.
    pub fn handle_message(&mut self, now: Instant, msg: &[u8]) {
        self.decode_message(now, msg);
    }

    /// Like [`handle_message`](Session::handle_message), for a message the driver holds as
    /// [`Bytes`]: each `Event::Data` is a slice of `msg`, not a copy. The driver should write or
    /// copy the payloads before it reads the next message, or they keep `msg` alive.
    pub fn handle_message_bytes(&mut self, now: Instant, msg: Bytes) {
        self.rx_msg = Some(msg.clone());
        self.decode_message(now, &msg);
        self.rx_msg = None;
    }

    fn decode_message(&mut self, now: Instant, msg: &[u8]) {
        self.advance(now);
        if self.state == State::Closed {
            return;
        }
        if msg.len() > self.config.max_message {
            self.protocol_error("message larger than max_message");
            return;
        }
        if msg.is_empty() {
            self.protocol_error(DecodeError::EmptyMessage.kind());
            return;
        }
        self.last_recv = now;
        let peer = self.side.peer();
        // Frame by frame with the current `max_frame`: a HELLO_ACK changes it for the DATA that
        // follows in the same message (§10: HELLO_ACK's max_frame bounds DATA).
        let mut rest = msg;
        while !rest.is_empty() {
            match decode_one(rest, peer, self.max_frame) {
                Ok((frame, used)) => {
                    rest = &rest[used..];
                    self.handle_frame(now, frame);
                }
                Err(e) => {
                    self.protocol_error(&format!("bad frame: {e}"));
                    return;
                }
            }
            if self.state == State::Closed {
                return;
            }
        }
    }

    /// A WebSocket text message arrived: always a protocol error (§1).
    pub fn handle_text_message(&mut self, now: Instant) {
        self.advance(now);
        if self.state != State::Closed {
            self.protocol_error("text message");
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame<'_>) {
        // §3: nothing may precede HELLO / HELLO_ACK.
        match (self.state, &frame) {
            (State::AwaitHello, Frame::Hello(h)) => {
                if h.ver != PROTOCOL_VERSION {
                    self.close_session(close::UNSUPPORTED_VERSION, "unsupported protocol version");
                    return;
                }
                // §4: credit never exceeds 2^31−1, so neither can the initial window.
                if u64::from(h.window) > MAX_CREDIT {
                    self.protocol_error("HELLO window above 2^31-1");
                    return;
                }
                self.peer_window = h.window;
                self.peer_max_streams = h.max_streams;
                self.state = State::HelloReceived;
                self.events.push_back(Event::Hello(h.clone()));
                return;
            }
            (State::AwaitHelloAck, Frame::HelloAck(a)) => {
                if a.ver != PROTOCOL_VERSION {
                    self.close_session(close::UNSUPPORTED_VERSION, "unsupported protocol version");
                    return;
                }
                if a.max_frame == 0 {
                    self.protocol_error("HELLO_ACK max_frame 0");
                    return;
                }
                if u64::from(a.window) > MAX_CREDIT {
                    self.protocol_error("HELLO_ACK window above 2^31-1");
                    return;
                }
                self.peer_window = a.window;
                self.max_frame = a.max_frame;
                let hb = Duration::from_millis(a.heartbeat_ms.max(1));
                self.heartbeat = hb.min(self.config.heartbeat);
                self.state = State::Established;
                self.send_ping(now);
                self.events.push_back(Event::Established(a.clone()));
                return;
            }
            (State::Established, Frame::Hello(_) | Frame::HelloAck(_)) => {
                self.protocol_error("second HELLO");
                return;
            }
            (State::Established, _) => {}
            _ => {
                self.protocol_error("frame before HELLO/HELLO_ACK");
                return;
            }
        }
        match frame {
            Frame::Hello(_) | Frame::HelloAck(_) => {}
            Frame::Ping { opaque } => self.queue_ctrl(&Frame::Pong { opaque }),
            Frame::Pong { opaque } => {
                if let Some(d) = self.drain.as_mut() {
                    if d.fence == Some(opaque) {
                        d.fence = None;
                        self.maybe_drained();
                    }
                }
                // §10: an unsolicited PONG is ignored.
                if let Some((o, sent)) = self.ping_out {
                    if o == opaque {
                        self.ping_out = None;
                        let sample = now.saturating_since(sent);
                        self.rtt = Some(match self.rtt {
                            None => sample,
                            Some(r) => (r * 7 + sample) / 8,
                        });
                    }
                }
            }
            Frame::Health(h) => self.events.push_back(Event::Health(h)),
            Frame::Renew { token } => self.events.push_back(Event::Renew {
                token: token.to_owned(),
            }),
            Frame::RenewAck(RenewAck { exp }) => self.events.push_back(Event::RenewAck { exp }),
            Frame::GoAway {
                code,
                last_cid,
                reason,
            } => {
                self.peer_goaway = Some(last_cid);
                self.events.push_back(Event::GoAway {
                    code: Code(code),
                    last_cid,
                    reason: reason.to_owned(),
                });
            }
            Frame::Open {
                cid,
                connector,
                peer,
            } => self.on_open(now, cid, connector, peer),
            Frame::OpenOk { cid, backend } => self.on_open_ok(cid, backend),
            Frame::Data { cid, seq, payload } => self.on_data(now, cid, seq, payload),
            Frame::Window { cid, increment } => self.on_window(cid, increment),
            Frame::Fin { cid, .. } => self.on_fin(cid),
            Frame::Rst { cid, code, reason } => self.on_rst(cid, Code(code), reason),
        }
    }

    /// Resolves a stream frame's cid: `Some` for an open stream, `None` when it must be
    /// ignored (recently closed) — or the session was closed for a cid never opened.
    fn known_stream(&mut self, cid: u32) -> bool {
        if self.streams.contains_key(&cid) {
            return true;
        }
        if cid > self.highest_cid {
            // §4/§10: a stream frame for a cid above the highest opened.
            self.protocol_error("frame for a stream never opened");
        }
        // §10: any cid ≤ highest that is not open was closed recently: ignore.
        false
    }

    fn on_open(&mut self, now: Instant, cid: u32, connector: &str, peer: &str) {
        // §4: cids strictly increasing, never reused.
        if cid <= self.highest_cid {
            self.protocol_error("OPEN cid not increasing");
            return;
        }
        self.highest_cid = cid;
        // While draining, only OPENs the hub sent before it read our GOAWAY (those ahead of
        // the fence's PONG) are still served: the hub cannot retry them on another session.
        let drained = self.drain.as_ref().is_some_and(|d| d.fence.is_none());
        if drained || self.streams.len() >= self.config.max_streams as usize {
            self.queue_ctrl(&Frame::Rst {
                cid,
                code: Code::REFUSED_STREAM.0,
                reason: "refused stream",
            });
            return;
        }
        let s = Stream::new(
            now,
            Phase::Opening,
            self.peer_window,
            self.config.window,
            self.config.max_unsent,
            self.config.idle_timeout,
        );
        self.streams.insert(cid, s);
        self.arm_sweep(now);
        self.events.push_back(Event::OpenRequest {
            cid,
            connector: connector.to_owned(),
            peer: peer.to_owned(),
        });
    }

    fn on_open_ok(&mut self, cid: u32, backend: &str) {
        if !self.known_stream(cid) {
            return;
        }
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        if s.phase != Phase::Opening {
            self.reset_stream(cid, Code::PROTOCOL_ERROR, "duplicate OPEN_OK");
            return;
        }
        s.phase = Phase::Open;
        self.events.push_back(Event::Opened {
            cid,
            backend: backend.to_owned(),
        });
    }

    fn on_data(&mut self, now: Instant, cid: u32, seq: u32, payload: &[u8]) {
        if !self.known_stream(cid) {
            return;
        }
        let side = self.side;
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        // The agent must not send before OPEN_OK; the hub may pipeline after OPEN (§4).
        let err = if side == Side::Hub && s.phase == Phase::Opening {
            Some((Code::PROTOCOL_ERROR, "DATA before OPEN_OK"))
        } else if seq != s.rx.seq {
            Some((Code::PROTOCOL_ERROR, "DATA seq gap or repeat"))
        } else if s.rx.fin {
            Some((Code::PROTOCOL_ERROR, "DATA after FIN"))
        } else if payload.len() as u64 > s.rx.credit {
            Some((Code::FLOW_CONTROL_ERROR, "DATA beyond credit"))
        } else {
            None
        };
        if let Some((code, reason)) = err {
            self.reset_stream(cid, code, reason);
            return;
        }
        let n = payload.len() as u64;
        s.rx.seq = s.rx.seq.wrapping_add(1);
        s.rx.credit -= n;
        s.rx.buffered += n;
        s.last_activity = now;
        if s.phase == Phase::Opening {
            // Agent: pipelined DATA waits (copied, coalesced) until the target is connected.
            extend_payload(&mut s.held_data, payload);
            return;
        }
        let data = match &self.rx_msg {
            Some(msg) => msg.slice_ref(payload),
            None => payload_copy(payload),
        };
        self.events.push_back(Event::Data { cid, data });
    }

    fn on_window(&mut self, cid: u32, increment: u32) {
        if !self.known_stream(cid) {
            return;
        }
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        let credit = s.tx.credit + u64::from(increment);
        if credit > MAX_CREDIT {
            self.reset_stream(cid, Code::FLOW_CONTROL_ERROR, "WINDOW overflow");
            return;
        }
        s.tx.credit = credit;
        if s.tx.blocked && s.tx.capacity() > 0 && !s.tx.fin_queued {
            s.tx.blocked = false;
            let ev = Event::Writable { cid };
            if s.phase == Phase::Opening && self.side == Side::Agent {
                s.held.push(ev);
            } else {
                self.events.push_back(ev);
            }
        }
    }

    fn on_fin(&mut self, cid: u32) {
        if !self.known_stream(cid) {
            return;
        }
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        if s.rx.fin {
            self.reset_stream(cid, Code::PROTOCOL_ERROR, "second FIN");
            return;
        }
        s.rx.fin = true;
        if s.phase == Phase::Opening && self.side == Side::Agent {
            s.held.push(Event::Finished { cid });
            return;
        }
        self.events.push_back(Event::Finished { cid });
        self.maybe_stream_closed(cid);
    }

    fn on_rst(&mut self, cid: u32, code: Code, reason: &str) {
        if !self.known_stream(cid) {
            return;
        }
        self.remove_stream(cid);
        self.events.push_back(Event::Reset {
            cid,
            code,
            reason: reason.to_owned(),
            remote: true,
        });
        self.maybe_drained();
    }

    // ----- commands: hub -----

    /// Hub: answers the agent's HELLO. `ack.window`, `max_frame`, `heartbeat_ms` and `ver` are
    /// filled from the config. Closes 4403 if nothing is accepted (§3).
    pub fn accept_hello(&mut self, now: Instant, mut ack: HelloAck) {
        self.advance(now);
        if self.state != State::HelloReceived {
            return;
        }
        if ack.accepted.is_empty() {
            self.close_session(close::FORBIDDEN, "no connector allowed");
            return;
        }
        ack.window = self.config.window;
        ack.max_frame = self.config.max_frame;
        ack.heartbeat_ms = u64::try_from(self.config.heartbeat.as_millis()).unwrap_or(u64::MAX);
        ack.ver = PROTOCOL_VERSION;
        self.queue_ctrl(&Frame::HelloAck(ack));
        self.state = State::Established;
        self.last_recv = now;
        self.send_ping(now);
    }

    /// Hub: opens a stream for a client of `connector` (`peer` = client `ip:port`). DATA may be
    /// sent right away (pipelining, §4).
    pub fn open(
        &mut self,
        now: Instant,
        connector: &str,
        peer: &str,
        idle_timeout: Option<Duration>,
    ) -> Result<u32, OpenError> {
        self.advance(now);
        match self.state {
            State::Closed => return Err(OpenError::Closed),
            State::Established if self.side == Side::Hub => {}
            _ => return Err(OpenError::NotEstablished),
        }
        if self.drain.is_some() || self.peer_goaway.is_some() {
            return Err(OpenError::Draining);
        }
        let limit = self.config.max_streams.min(self.peer_max_streams) as usize;
        if self.streams.len() >= limit {
            return Err(OpenError::TooManyStreams);
        }
        let cid = self
            .highest_cid
            .checked_add(1)
            .ok_or(OpenError::TooManyStreams)?;
        self.highest_cid = cid;
        self.queue_ctrl(&Frame::Open {
            cid,
            connector,
            peer,
        });
        let s = Stream::new(
            now,
            Phase::Opening,
            self.peer_window,
            self.config.window,
            self.config.max_unsent,
            idle_timeout,
        );
        self.streams.insert(cid, s);
        self.arm_sweep(now);
        Ok(cid)
    }

    /// Hub: answers RENEW with the new expiry.
    pub fn renew_ack(&mut self, now: Instant, exp: u64) {
        self.advance(now);
        if self.is_established() && self.side == Side::Hub {
            self.queue_ctrl(&Frame::RenewAck(RenewAck { exp }));
        }
    }

    // ----- commands: agent -----

    /// Agent: the target is connected; sends OPEN_OK and releases held pipelined data.
    pub fn accept_stream(&mut self, now: Instant, cid: u32, backend: &str) {
        self.advance(now);
        if self.side != Side::Agent || self.state != State::Established {
            return;
        }
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        if s.phase != Phase::Opening {
            return;
        }
        s.phase = Phase::Open;
        let held_data = std::mem::take(&mut s.held_data);
        let held = std::mem::take(&mut s.held);
        if s.tx.wants_transmit() && !s.queued {
            s.queued = true;
            self.ready.push_back(cid);
        }
        self.queue_ctrl(&Frame::OpenOk { cid, backend });
        let fin = held.iter().any(|e| matches!(e, Event::Finished { .. }));
        if !held_data.is_empty() {
            self.events.push_back(Event::Data {
                cid,
                data: Bytes::from(held_data),
            });
        }
        self.events.extend(held);
        if fin {
            self.maybe_stream_closed(cid);
        }
    }

    /// Overrides the idle timeout of one stream (agent: per connector).
    pub fn set_idle_timeout(&mut self, cid: u32, idle_timeout: Option<Duration>) {
        if let Some(s) = self.streams.get_mut(&cid) {
            s.idle_timeout = idle_timeout;
        }
    }

    /// Agent: sends HEALTH (§6).
    pub fn send_health(&mut self, now: Instant, report: &HealthReport) {
        self.advance(now);
        if self.side == Side::Agent && self.is_established() {
            self.queue_ctrl(&Frame::Health(report.clone()));
        }
    }

    /// Agent: sends a fresh token in-band (RENEW, §6).
    pub fn renew(&mut self, now: Instant, token: &str) {
        self.advance(now);
        if self.side == Side::Agent && self.is_established() {
            self.queue_ctrl(&Frame::Renew { token });
        }
    }

    // ----- commands: both -----

    /// Queues up to `send_capacity(cid)` bytes of `data` (copied); returns how many were
    /// accepted.
    pub fn send(&mut self, now: Instant, cid: u32, data: &[u8]) -> usize {
        let n = self.accept_send(now, cid, data.len());
        if n > 0 {
            self.queue_send(now, cid, |q| q.push_slice(&data[..n]));
        }
        n
    }

    /// Like [`send`](Session::send) for bytes the driver owns: when all of `data` fits the
    /// stream's capacity it is queued without a copy (the usual case for a driver that reads
    /// only within `send_capacity`).
    pub fn send_vec(&mut self, now: Instant, cid: u32, data: Vec<u8>) -> usize {
        let n = self.accept_send(now, cid, data.len());
        if n == data.len() && n > 0 {
            self.queue_send(now, cid, |q| q.push_vec(data));
        } else if n > 0 {
            self.queue_send(now, cid, |q| q.push_slice(&data[..n]));
        }
        n
    }

    /// How many of `len` bytes `send` takes now; marks the stream blocked when not all.
    fn accept_send(&mut self, now: Instant, cid: u32, len: usize) -> usize {
        self.advance(now);
        if self.state != State::Established {
            return 0;
        }
        let cap = self.send_capacity(cid);
        let Some(s) = self.streams.get_mut(&cid) else {
            return 0;
        };
        let n = cap.min(len);
        // Refused bytes: tell the driver when there is room again. Taken whole: whatever an
        // earlier refusal said is stale.
        s.tx.blocked = n < len;
        n
    }

    fn queue_send(&mut self, now: Instant, cid: u32, push: impl FnOnce(&mut TxQueue)) {
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        push(&mut s.tx.buf);
        s.last_activity = now;
        if !s.queued {
            s.queued = true;
            self.ready.push_back(cid);
        }
    }

    /// Local EOF: FIN goes out after the buffered data (§4).
    pub fn finish(&mut self, now: Instant, cid: u32) {
        self.advance(now);
        if self.state != State::Established {
            return;
        }
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        if s.tx.fin_queued {
            return;
        }
        s.tx.fin_queued = true;
        if !s.queued {
            s.queued = true;
            self.ready.push_back(cid);
        }
    }

    /// Aborts a stream with RST (agent: also refuses an OPEN).
    pub fn reset(&mut self, now: Instant, cid: u32, code: Code, reason: &str) {
        self.advance(now);
        if self.state != State::Established || !self.streams.contains_key(&cid) {
            return;
        }
        self.remove_stream(cid);
        self.queue_ctrl(&Frame::Rst {
            cid,
            code: code.0,
            reason,
        });
        self.maybe_drained();
    }

    /// `n` bytes of `cid` reached the local socket: returns credit to the peer (WINDOW) once half
    /// a window is free, growing the window when the stream is credit-limited (§4 auto-tuning).
    pub fn release(&mut self, now: Instant, cid: u32, n: usize) {
        self.advance(now);
        if self.state != State::Established {
            return;
        }
        let rtt = self.rtt.unwrap_or(DEFAULT_RTT).max(MIN_RTT);
        let budget_left = self.config.max_buffered.saturating_sub(self.grown);
        let max_window = u64::from(self.config.max_window);
        let Some(s) = self.streams.get_mut(&cid) else {
            return;
        };
        let n = (n as u64).min(s.rx.buffered);
        s.rx.buffered -= n;
        s.rx.released += n;
        if s.rx.fin || s.rx.released < s.rx.window / 2 {
            return;
        }
        // Auto-tuning: half a window drained within two round trips means the stream is limited
        // by credit, not by its consumer: double the window, within the session budget.
        let since = s.rx.last_update.unwrap_or(s.opened_at);
        let fast = now.saturating_since(since) < rtt * 2;
        let mut grow = 0;
        if fast && s.rx.window < max_window {
            grow = s.rx.window.min(max_window - s.rx.window).min(budget_left);
        }
        s.rx.last_update = Some(now);
        s.rx.window += grow;
        let increment = s.rx.released + grow;
        s.rx.credit += increment;
        s.rx.released = 0;
        self.grown += grow;
        // increment ≤ window ≤ max_window < 2^32.
        let increment = u32::try_from(increment).unwrap_or(u32::MAX);
        self.queue_ctrl(&Frame::Window { cid, increment });
    }

    /// Starts a graceful drain: GOAWAY, no new streams; the session closes by itself once its
    /// streams end or `shutdown_grace` runs out (1000; 4401 for TOKEN_EXPIRED; 4403 for FORBIDDEN).
    pub fn goaway(&mut self, now: Instant, code: Code, reason: &str) {
        self.advance(now);
        if self.state != State::Established || self.drain.is_some() {
            return;
        }
        self.queue_ctrl(&Frame::GoAway {
            code: code.0,
            last_cid: self.highest_cid,
            reason,
        });
        let fence = (self.side == Side::Agent).then(|| {
            self.send_ping(now);
            self.ping_seq
        });
        self.drain = Some(Drain {
            deadline: now + self.config.shutdown_grace,
            code,
            fence,
        });
        self.maybe_drained();
    }

    /// Closes the session now with a WebSocket close code (e.g. 4403 after HELLO, 4503).
    pub fn close(&mut self, now: Instant, code: u16, reason: &str) {
        self.advance(now);
        if self.state != State::Closed {
            self.close_session(code, reason);
        }
    }

    // ----- output -----

    /// Appends the next frames to `out` (control frames first, then DATA round-robin in chunks
    /// of at most `max_frame`), never beyond `max_message`. Returns whether anything was
    /// appended; send what was appended as one WebSocket binary message.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        self.advance(now);
        let start = out.len();
        let limit = start + self.config.max_message;
        // Control frames: whole frames only.
        let mut taken = 0;
        while let Some(&len) = self.ctrl_lens.front() {
            if out.len() + len > limit && out.len() > start {
                break;
            }
            out.extend_from_slice(&self.ctrl[taken..taken + len]);
            taken += len;
            self.ctrl_lens.pop_front();
        }
        self.ctrl.drain(..taken);
        // DATA and FIN only once every control frame is out: a FIN or DATA small enough to fit
        // behind a partial control flush must not overtake the OPEN or OPEN_OK it depends on.
        if self.state == State::Established && self.ctrl_lens.is_empty() {
            self.schedule_data(out, limit);
        }
        let any = out.len() > start;
        if any {
            self.last_sent = now;
        }
        any
    }

    fn schedule_data(&mut self, out: &mut Vec<u8>, limit: usize) {
        let max_frame = self.max_frame as usize;
        let fin_dir = FinDir::of_sender(self.side);
        let mut closed = Vec::new();
        while out.len() + HEADER_LEN + DATA_OVERHEAD < limit {
            let Some(cid) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&cid) else {
                continue;
            };
            if self.side == Side::Agent && s.phase == Phase::Opening {
                // Nothing may precede OPEN_OK: `accept_stream` requeues it.
                s.queued = false;
                continue;
            }
            let room = limit - out.len() - HEADER_LEN - DATA_OVERHEAD;
            let n = s.tx.buf.len().min(max_frame).min(room);
            if n > 0 {
                encode_data_header(out, cid, s.tx.seq, n);
                s.tx.buf.take_into(out, n, &mut self.spare);
                s.tx.seq = s.tx.seq.wrapping_add(1);
                s.tx.credit -= n as u64;
                // A driver stopped by a full queue (not by credit) may read again once half
                // the queue is out: not after every frame, so its reads stay large.
                if s.tx.blocked
                    && !s.tx.fin_queued
                    && s.tx.capacity() > 0
                    && (s.tx.buf.is_empty() || s.tx.buf.len() as u64 <= s.tx.limit / 2)
                {
                    s.tx.blocked = false;
                    self.events.push_back(Event::Writable { cid });
                }
            }
            if s.tx.buf.is_empty() && s.tx.fin_queued && !s.tx.fin_sent {
                if out.len() + HEADER_LEN + 1 > limit {
                    self.ready.push_front(cid);
                    break;
                }
                Frame::Fin { cid, dir: fin_dir }.encode(out);
                s.tx.fin_sent = true;
            }
            if s.tx.wants_transmit() {
                self.ready.push_back(cid);
            } else {
                s.queued = false;
                if s.is_finished() {
                    closed.push(cid);
                }
            }
        }
        for cid in closed {
            self.maybe_stream_closed(cid);
        }
    }

    /// A send buffer whose bytes are all framed now — one handed over with
    /// [`send_vec`](Session::send_vec), or a chunk `send` copied into — empty, with its
    /// capacity, for the driver to read into again instead of allocating. At most a few are
    /// kept; the rest are freed.
    pub fn take_spare_buffer(&mut self) -> Option<Vec<u8>> {
        self.spare.pop()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- internals -----

    fn queue_ctrl(&mut self, f: &Frame<'_>) {
        let before = self.ctrl.len();
        f.encode(&mut self.ctrl);
        self.ctrl_lens.push_back(self.ctrl.len() - before);
    }

    fn arm_sweep(&mut self, now: Instant) {
        if self.sweep_at.is_none() {
            self.sweep_at = Some(now + SWEEP_EVERY);
        }
    }

    fn remove_stream(&mut self, cid: u32) {
        if let Some(s) = self.streams.remove(&cid) {
            self.grown -= s.rx.window.saturating_sub(u64::from(self.config.window));
            // A queued cid left in `ready` is skipped when popped.
        }
    }

    /// Local stream error or timeout: RST to the peer, Reset event to the driver.
    fn reset_stream(&mut self, cid: u32, code: Code, reason: &str) {
        if !self.streams.contains_key(&cid) {
            return;
        }
        self.remove_stream(cid);
        self.queue_ctrl(&Frame::Rst {
            cid,
            code: code.0,
            reason,
        });
        self.events.push_back(Event::Reset {
            cid,
            code,
            reason: reason.to_owned(),
            remote: false,
        });
        // A draining session whose last stream dies of an error is drained now (§6).
        self.maybe_drained();
    }

    fn maybe_stream_closed(&mut self, cid: u32) {
        if self.streams.get(&cid).is_some_and(Stream::is_finished) {
            self.remove_stream(cid);
            self.events.push_back(Event::StreamClosed { cid });
            self.maybe_drained();
        }
    }

    fn maybe_drained(&mut self) {
        if self.drain.as_ref().is_some_and(|d| d.fence.is_none())
            && self.streams.is_empty()
            && self.state == State::Established
        {
            self.finish_drain(false);
        }
    }

    fn finish_drain(&mut self, expired: bool) {
        let Some(d) = self.drain.take() else {
            return;
        };
        let (code, reason) = match d.code {
            Code::TOKEN_EXPIRED => (close::TOKEN_EXPIRED, "token expired"),
            Code::FORBIDDEN => (close::FORBIDDEN, "forbidden"),
            _ => (close::NORMAL, "drained"),
        };
        if expired {
            let cids: Vec<u32> = self.streams.keys().copied().collect();
            for cid in cids {
                self.reset_stream(cid, Code::SHUTDOWN, "drain grace expired");
            }
        }
        self.close_session(code, reason);
    }

    fn protocol_error(&mut self, reason: &str) {
        self.close_session(close::PROTOCOL_ERROR, &format!("protocol error: {reason}"));
    }

    /// Sticky end: every stream is reset locally, then `SessionClosed`. Control frames already
    /// queued (a GOAWAY, RSTs) may still be flushed; DATA is dropped.
    fn close_session(&mut self, code: u16, reason: &str) {
        let reason = truncate_utf8(reason, MAX_REASON).to_owned();
        let stream_code = match code {
            close::NORMAL | close::TOKEN_EXPIRED | close::FORBIDDEN | close::SHUTTING_DOWN => {
                Code::SHUTDOWN
            }
            close::PROTOCOL_ERROR => Code::PROTOCOL_ERROR,
            _ => Code::INTERNAL,
        };
        for (cid, _) in std::mem::take(&mut self.streams) {
            self.events.push_back(Event::Reset {
                cid,
                code: stream_code,
                reason: reason.clone(),
                remote: false,
            });
        }
        self.ready.clear();
        self.grown = 0;
        self.state = State::Closed;
        self.events.push_back(Event::SessionClosed {
            code,
            reason: reason.clone(),
        });
        self.close = Some((code, reason));
    }

    /// Checks the flow-control and ordering invariants (STYLE.md habit 8). For tests and
    /// fuzzing; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut grown = 0u64;
        for (cid, s) in &self.streams {
            if *cid == 0 || *cid > self.highest_cid {
                return Err(format!("stream {cid} outside 1..={}", self.highest_cid));
            }
            if s.tx.buf.len() as u64 > s.tx.credit {
                return Err(format!("stream {cid}: buffered send beyond credit"));
            }
            if s.tx.credit > MAX_CREDIT {
                return Err(format!("stream {cid}: credit above 2^31-1"));
            }
            if s.tx.fin_sent && !s.tx.buf.is_empty() {
                return Err(format!("stream {cid}: data after FIN"));
            }
            if s.rx.credit + s.rx.buffered + s.rx.released != s.rx.window {
                return Err(format!("stream {cid}: receive accounting broken"));
            }
            let max = u64::from(self.config.max_window.max(self.config.window));
            if s.rx.window > max {
                return Err(format!("stream {cid}: window above max_window"));
            }
            if s.queued != self.ready.contains(cid) && s.queued {
                return Err(format!("stream {cid}: queued flag without ready entry"));
            }
            let held_back = self.side == Side::Agent && s.phase == Phase::Opening;
            if s.tx.wants_transmit() && !s.queued && !held_back && self.state == State::Established
            {
                return Err(format!("stream {cid}: pending output not scheduled"));
            }
            grown += s.rx.window.saturating_sub(u64::from(self.config.window));
        }
        if grown != self.grown {
            return Err("grown-window accounting broken".into());
        }
        if self.grown > self.config.max_buffered {
            return Err("session budget exceeded".into());
        }
        if let Some(t) = self.poll_timeout() {
            if t < self.last_now {
                return Err("poll_timeout in the past".into());
            }
        }
        if self.state == State::Closed && !self.streams.is_empty() {
            return Err("streams left after close".into());
        }
        Ok(())
    }
}
