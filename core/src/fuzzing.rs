//! Fuzz drivers (STYLE.md habits 8, 9), shared by the `cargo fuzz` targets in `fuzz/` and the
//! corpus replay test (`core/tests/protocol/corpus.rs`), so every committed input also runs on
//! stable under `cargo test`.
//!
//! Each driver takes the fuzzer's raw bytes, derives a scenario from them (with `arbitrary` for
//! the op sequences), runs it, and panics on the first broken invariant. Inputs that run out of
//! bytes simply stop: every prefix of an input is a valid, shorter scenario.
//!
//! - [`frame_decode`]: one message through the codec; whatever decodes re-encodes to the same
//!   bytes (JSON bodies: to an equivalent value) and decodes again to the same frames.
//! - [`session`]: one [`Session`] (hub or agent) fed raw messages, frames built from fields,
//!   commands and time steps; after every step its invariants hold and everything it transmits
//!   is valid protocol that respects sequence numbers, credit and FIN.
//! - [`pair`]: a hub and an agent joined by [`Pair`]; the bytes delivered on each stream are
//!   always a prefix of the bytes sent, and all of them once the pair is driven without stalls.

use std::collections::{BTreeMap, BTreeSet};

use core::time::Duration;

use arbitrary::{Arbitrary, Unstructured};

use crate::codes::{close, Code, Side};
use crate::config::Config;
use crate::event::Event;
use crate::frame::{
    decode_message, decode_one, DecodeError, FinDir, Frame, FrameType, DEFAULT_MAX_FRAME,
    HEADER_LEN, MAX_JSON_BODY,
};
use crate::json::{BackendHealth, ConnectorHealth, HealthReport, Hello, HelloAck, RenewAck};
use crate::session::Session;
use crate::testing::Pair;
use crate::time::Instant;

/// Most ops one input runs, so that every input stays fast.
const MAX_OPS: usize = 256;

/// DATA payload limits the codec driver decodes with (selected by the input's first byte).
const MAX_FRAMES: [u32; 4] = [DEFAULT_MAX_FRAME, 1, 300, u32::MAX];

/// `NOWCONNECT_FUZZ_TRACE=1` prints every op as it runs (to read a crashing input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("NOWCONNECT_FUZZ_TRACE").is_some())
}

/// The side whose frames a message carries: bit 0 of a selector byte.
fn side_of(sel: u8) -> Side {
    if sel & 1 == 0 {
        Side::Hub
    } else {
        Side::Agent
    }
}

// ---------------------------------------------------------------------------------------------
// frame_decode

/// Codec round trip. Input: one selector byte (bit 0: sender, 0 = hub, 1 = agent; bits 1–2: the
/// `max_frame` to decode with, from 64 KiB, 1, 300, `u32::MAX`), then one WebSocket message.
///
/// Never panics on any input; panics only when a decoded frame does not re-encode faithfully,
/// or when [`decode_message`] and frame-by-frame [`decode_one`] disagree.
pub fn frame_decode(data: &[u8]) {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let max_frame = MAX_FRAMES[usize::from(sel >> 1) & 3];
    check_message(msg, side_of(sel), max_frame);
}

fn check_message(msg: &[u8], sender: Side, max_frame: u32) {
    let whole = decode_message(msg, sender, max_frame);
    let mut frames = Vec::new();
    let mut rest = msg;
    let walked = loop {
        if rest.is_empty() {
            break Ok(());
        }
        match decode_one(rest, sender, max_frame) {
            Ok((frame, used)) => {
                assert!(
                    (HEADER_LEN..=rest.len()).contains(&used),
                    "decode_one used {used} of {} bytes",
                    rest.len()
                );
                check_frame(msg, &frame, &rest[..used], sender, max_frame);
                frames.push(frame);
                rest = &rest[used..];
            }
            Err(e) => break Err(e),
        }
    };
    match (whole, walked) {
        (Err(DecodeError::EmptyMessage), _) => assert!(msg.is_empty(), "EmptyMessage for bytes"),
        (Ok(all), Ok(())) => assert_eq!(all, frames, "decode_message vs decode_one"),
        (Err(a), Err(b)) => assert_eq!(a, b, "decode_message vs decode_one error"),
        (a, b) => panic!("decode_message gave {a:?}, decode_one walk gave {b:?}"),
    }
}

fn is_json(ty: FrameType) -> bool {
    matches!(
        ty,
        FrameType::Hello | FrameType::HelloAck | FrameType::Health | FrameType::RenewAck
    )
}

/// One decoded frame against the bytes it came from.
fn check_frame(msg: &[u8], frame: &Frame<'_>, raw: &[u8], sender: Side, max_frame: u32) {
    let ty = frame.frame_type();
    assert_eq!(ty as u8, raw[0], "type byte");
    assert_eq!(frame.cid().to_be_bytes(), raw[1..5], "cid");
    if let Frame::Data { payload, .. } = frame {
        // Habit 5: DATA payloads are borrowed from the message, not copied.
        assert!(
            msg.as_ptr_range().contains(&payload.as_ptr()),
            "DATA payload not borrowed from the message"
        );
    }
    let mut out = Vec::new();
    frame.encode(&mut out);
    assert_eq!(frame.encoded_len(), out.len(), "encoded_len of {ty:?}");
    if !is_json(ty) {
        assert_eq!(out, raw, "{ty:?} did not re-encode byte-identically");
        return;
    }
    // JSON bodies re-encode to an equivalent value, not the same bytes (whitespace, field
    // order, unknown fields, defaults made explicit). Explicit defaults can push a body that was
    // just under the limit over it: the codec must then refuse its own output, not accept it.
    match decode_one(&out, sender, max_frame) {
        Ok((again, used)) => {
            assert_eq!(used, out.len(), "re-encoded {ty:?} length");
            assert_eq!(&again, frame, "re-encoded {ty:?} decodes differently");
        }
        Err(DecodeError::BodyTooLong) if out.len() - HEADER_LEN > MAX_JSON_BODY => {}
        Err(e) => panic!("re-encoded {ty:?} does not decode: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// shared helpers

/// The limits a selector bit picks: the §9 defaults, or tiny ones that make every limit, timer
/// and window boundary reachable within a few ops. `max_message` is not negotiated (§1): two
/// sessions only agree when it is the same on both, so a pair shrinks it only on both sides.
fn config(tight: bool) -> Config {
    if !tight {
        return Config::default();
    }
    Config {
        window: 64,
        max_window: 256,
        max_buffered: 512,
        max_unsent: 48,
        max_frame: 16,
        max_message: 1024,
        max_streams: 4,
        hello_timeout: Duration::from_secs(1),
        open_timeout: Duration::from_secs(2),
        heartbeat: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(3),
        idle_timeout: Some(Duration::from_secs(5)),
    }
}

const CONNECTORS: [&str; 4] = ["ldap", "ssh", "a.b-c_D9", "x"];

/// Reasons: short ASCII, or multi-byte text longer than the 256-byte wire limit (truncation).
fn reason(long: bool) -> String {
    if long {
        "é".repeat(200)
    } else {
        "fuzz".to_owned()
    }
}

fn token(len: u8) -> String {
    "eyJ0"
        .chars()
        .cycle()
        .take(usize::from(len).max(1))
        .collect()
}

fn health(healthy: bool) -> HealthReport {
    let mut r = HealthReport::default();
    r.connectors.insert(
        "ldap".into(),
        ConnectorHealth {
            healthy,
            backends: vec![BackendHealth {
                addr: "dc1:389".into(),
                ok: healthy,
                rtt_ms: healthy.then_some(2),
                error: (!healthy).then(|| "connection refused".into()),
            }],
        },
    );
    r
}

fn test_hello(window: u32, max_streams: u32) -> Hello {
    Hello {
        agent_id: "agent-1".into(),
        connectors: vec!["ldap".into(), "ssh".into()],
        ver: 1,
        software: "fuzz".into(),
        window,
        max_streams,
    }
}

fn test_ack(window: u32, max_frame: u32, heartbeat_ms: u64) -> HelloAck {
    HelloAck {
        session: "s-1".into(),
        accepted: vec!["ldap".into()],
        rejected: Vec::new(),
        window,
        max_frame,
        heartbeat_ms,
        ver: 1,
    }
}

// ---------------------------------------------------------------------------------------------
// session

/// A frame the fuzzer asks the (simulated) peer to send, built from fields so that it is mostly
/// well formed and names streams the session knows.
#[derive(Arbitrary, Debug)]
enum PeerFrame {
    Hello {
        window: u32,
        max_streams: u16,
        bad_ver: bool,
    },
    HelloAck {
        window: u32,
        max_frame: u32,
        heartbeat_ms: u32,
        bad_ver: bool,
    },
    /// `cid: None` is the next cid (strictly increasing, as the hub must).
    Open {
        cid: Option<u8>,
        connector: u8,
        v6: bool,
    },
    OpenOk {
        cid: u8,
        backend_len: u8,
    },
    /// `seq: None` is the next expected one.
    Data {
        cid: u8,
        seq: Option<u32>,
        len: u16,
    },
    Window {
        cid: u8,
        increment: u32,
    },
    Fin {
        cid: u8,
        wrong_dir: bool,
    },
    Rst {
        cid: u8,
        code: u16,
        long: bool,
    },
    Ping {
        opaque: u64,
    },
    /// `opaque: None` echoes the session's last PING.
    Pong {
        opaque: Option<u64>,
    },
    Health {
        healthy: bool,
    },
    GoAway {
        code: u16,
        last_cid: u32,
        long: bool,
    },
    Renew {
        len: u8,
    },
    RenewAck {
        exp: u64,
    },
}

/// The simulated peer's HELLO (hub session) or HELLO_ACK (agent session) limits when the
/// driver does the handshake; `None` keeps the config's.
#[derive(Arbitrary, Debug, Default)]
struct PeerLimits {
    window: Option<u32>,
    max_frame: Option<u32>,
    max_streams: Option<u16>,
    heartbeat_ms: Option<u32>,
}

#[derive(Arbitrary, Debug)]
enum SessionOp {
    /// First, so that an input running out of bytes (all zeros) does something harmless.
    Send {
        cid: u8,
        len: u16,
    },
    /// Any bytes as one binary message.
    Raw(Vec<u8>),
    /// One frame built from fields, as a message of its own.
    Frame(PeerFrame),
    /// Frames built from fields, concatenated into one message.
    Frames(Vec<PeerFrame>),
    Text,
    AcceptHello {
        accept: bool,
    },
    Open {
        connector: u8,
        idle_ms: Option<u16>,
    },
    Accept {
        cid: u8,
    },
    Finish {
        cid: u8,
    },
    Reset {
        cid: u8,
        code: u16,
        long: bool,
    },
    Release {
        cid: u8,
        n: u32,
    },
    GoAway {
        code: u16,
        long: bool,
    },
    Close {
        code: u16,
    },
    Renew {
        len: u8,
    },
    RenewAck {
        exp: u64,
    },
    Health {
        healthy: bool,
    },
    SetIdle {
        cid: u8,
        ms: Option<u16>,
    },
    Advance {
        ms: u16,
    },
    /// Jump to `poll_timeout()` and run the timers due then.
    FireTimer,
}

/// What the session has been told and has sent, per stream: enough to check its output.
#[derive(Debug, Default)]
struct OutStream {
    /// Credit the peer granted: initial window + WINDOW increments delivered.
    credit: u64,
    sent: u64,
    seq: u32,
    fin: bool,
    /// Agent: OPEN_OK sent (nothing else may go out on the stream before it).
    open_ok: bool,
}

struct SessionDriver {
    s: Session,
    side: Side,
    now: Instant,
    /// The peer's advertised window: the send credit of each new stream.
    peer_window: u64,
    streams: BTreeMap<u32, OutStream>,
    /// Every cid seen, oldest first (for picking stream frames' cids).
    known: Vec<u32>,
    /// Highest cid opened (in either direction, by role).
    highest: u32,
    /// Next seq of the DATA frames the simulated peer sends, per stream.
    peer_seq: BTreeMap<u32, u32>,
    last_ping: Option<u64>,
    closed: bool,
    /// The session's `max_message`: what it transmits must fit (a lone frame excepted).
    max_message: usize,
    out: Vec<u8>,
}

impl SessionDriver {
    fn pick_cid(&self, v: u8) -> u32 {
        // Mostly a stream it knows; sometimes cid 0, a stale one or one never opened.
        if v < 0xE0 && !self.known.is_empty() {
            self.known[usize::from(v) % self.known.len()]
        } else {
            u32::from(v & 0x1f)
        }
    }

    fn build(&mut self, f: &PeerFrame, msg: &mut Vec<u8>) {
        let peer = self.side.peer();
        match *f {
            PeerFrame::Hello {
                window,
                max_streams,
                bad_ver,
            } => {
                let mut h = test_hello(window, u32::from(max_streams));
                h.ver = if bad_ver { 2 } else { 1 };
                Frame::Hello(h).encode(msg);
            }
            PeerFrame::HelloAck {
                window,
                max_frame,
                heartbeat_ms,
                bad_ver,
            } => {
                let mut a = test_ack(window, max_frame, u64::from(heartbeat_ms));
                a.ver = if bad_ver { 0 } else { 1 };
                Frame::HelloAck(a).encode(msg);
            }
            PeerFrame::Open { cid, connector, v6 } => {
                let cid = match cid {
                    None => self.highest.wrapping_add(1),
                    Some(255) => u32::MAX,
                    Some(c) => u32::from(c),
                };
                let peer = if v6 { "[::1]:40000" } else { "10.1.2.3:51234" };
                Frame::Open {
                    cid,
                    connector: CONNECTORS[usize::from(connector) % CONNECTORS.len()],
                    peer,
                }
                .encode(msg);
            }
            PeerFrame::OpenOk { cid, backend_len } => {
                let backend = "b".repeat(usize::from(backend_len));
                Frame::OpenOk {
                    cid: self.pick_cid(cid),
                    backend: &backend,
                }
                .encode(msg);
            }
            PeerFrame::Data { cid, seq, len } => {
                let cid = self.pick_cid(cid);
                let next = self.peer_seq.entry(cid).or_default();
                let seq = seq.unwrap_or(*next);
                *next = seq.wrapping_add(1);
                let payload = vec![0xA5; usize::from(len).max(1)];
                Frame::Data {
                    cid,
                    seq,
                    payload: &payload,
                }
                .encode(msg);
            }
            PeerFrame::Window { cid, increment } => Frame::Window {
                cid: self.pick_cid(cid),
                increment,
            }
            .encode(msg),
            PeerFrame::Fin { cid, wrong_dir } => {
                let dir = FinDir::of_sender(if wrong_dir { self.side } else { peer });
                Frame::Fin {
                    cid: self.pick_cid(cid),
                    dir,
                }
                .encode(msg);
            }
            PeerFrame::Rst { cid, code, long } => Frame::Rst {
                cid: self.pick_cid(cid),
                code,
                reason: &reason(long),
            }
            .encode(msg),
            PeerFrame::Ping { opaque } => Frame::Ping { opaque }.encode(msg),
            PeerFrame::Pong { opaque } => Frame::Pong {
                opaque: opaque.or(self.last_ping).unwrap_or(0),
            }
            .encode(msg),
            PeerFrame::Health { healthy } => Frame::Health(health(healthy)).encode(msg),
            PeerFrame::GoAway {
                code,
                last_cid,
                long,
            } => Frame::GoAway {
                code,
                last_cid,
                reason: &reason(long),
            }
            .encode(msg),
            PeerFrame::Renew { len } => Frame::Renew { token: &token(len) }.encode(msg),
            PeerFrame::RenewAck { exp } => Frame::RenewAck(RenewAck { exp }).encode(msg),
        }
    }

    /// Feeds one message and updates the model from the frames the session will have seen
    /// (decoded the way it does: frame by frame, a HELLO_ACK's `max_frame` applying to the DATA
    /// after it).
    fn feed(&mut self, msg: &[u8]) {
        let mut max_frame = self.s.max_frame();
        let mut rest = msg;
        while let Ok((frame, used)) = decode_one(rest, self.side.peer(), max_frame) {
            rest = &rest[used..];
            match frame {
                Frame::Hello(h) if self.side == Side::Hub => self.peer_window = u64::from(h.window),
                Frame::HelloAck(a) if self.side == Side::Agent => {
                    self.peer_window = u64::from(a.window);
                    if a.max_frame != 0 {
                        max_frame = a.max_frame;
                    }
                }
                Frame::Open { cid, .. } if self.side == Side::Agent && cid > self.highest => {
                    self.highest = cid;
                    self.known.push(cid);
                    self.streams.insert(
                        cid,
                        OutStream {
                            credit: self.peer_window,
                            ..OutStream::default()
                        },
                    );
                }
                Frame::Window { cid, increment } => {
                    if let Some(st) = self.streams.get_mut(&cid) {
                        st.credit += u64::from(increment);
                    }
                }
                _ => {}
            }
        }
        self.s.handle_message(self.now, msg);
    }

    /// Drains every output after an input (the driving contract) and checks it.
    fn drain(&mut self) {
        let was_closed = self.closed;
        let mut out = std::mem::take(&mut self.out);
        loop {
            out.clear();
            if !self.s.poll_transmit(self.now, &mut out) {
                break;
            }
            assert!(!was_closed, "transmit after the session closed");
            self.check_transmit(&out);
        }
        self.out = out;
        while let Some(ev) = self.s.poll_event() {
            assert!(!self.closed, "event after SessionClosed: {ev:?}");
            match ev {
                Event::SessionClosed { code, .. } => {
                    self.closed = true;
                    assert_eq!(self.s.close_reason().map(|(c, _)| c), Some(code));
                }
                Event::Data { cid, data } => {
                    assert!(!data.is_empty(), "empty Data event");
                    assert!(
                        self.streams.contains_key(&cid),
                        "Data for unknown cid {cid}"
                    );
                }
                Event::OpenRequest { cid, .. } => {
                    assert_eq!(self.side, Side::Agent);
                    assert!(
                        self.streams.contains_key(&cid),
                        "OpenRequest for unknown {cid}"
                    );
                }
                _ => {}
            }
        }
        if let Err(e) = self.s.check_invariants() {
            panic!("{:?} invariant: {e}", self.side);
        }
        if let Some(t) = self.s.poll_timeout() {
            assert!(t >= self.now, "poll_timeout in the past");
        }
        if self.closed {
            assert!(self.s.close_reason().is_some(), "closed without a reason");
            assert_eq!(self.s.poll_timeout(), None, "timer armed after close");
            assert_eq!(self.s.active_streams(), 0, "streams after close");
        }
    }

    /// One message the session sent: valid protocol, within seq, credit and FIN rules.
    fn check_transmit(&mut self, msg: &[u8]) {
        let max_frame = self.s.max_frame();
        let frames = match decode_message(msg, self.side, max_frame) {
            Ok(f) => f,
            Err(e) => panic!(
                "{:?} sent an undecodable message ({e:?}): {msg:02x?}",
                self.side
            ),
        };
        assert!(
            msg.len() <= self.max_message || frames.len() == 1,
            "message of {} bytes above max_message",
            msg.len()
        );
        let agent = self.side == Side::Agent;
        for f in frames {
            match f {
                Frame::Open { cid, .. } => {
                    assert_eq!(cid, self.highest.wrapping_add(1), "OPEN cid not next");
                    self.highest = cid;
                    self.known.push(cid);
                    self.streams.insert(
                        cid,
                        OutStream {
                            credit: self.peer_window,
                            ..OutStream::default()
                        },
                    );
                }
                Frame::OpenOk { cid, .. } => {
                    let st = self.streams.get_mut(&cid);
                    let st = st.unwrap_or_else(|| panic!("OPEN_OK for unknown cid {cid}"));
                    assert!(!st.open_ok, "second OPEN_OK on {cid}");
                    st.open_ok = true;
                }
                Frame::Data { cid, seq, payload } => {
                    let st = self.streams.get_mut(&cid);
                    let st = st.unwrap_or_else(|| panic!("DATA for unknown cid {cid}"));
                    assert!(!agent || st.open_ok, "agent DATA before OPEN_OK on {cid}");
                    assert!(!st.fin, "DATA after FIN on {cid}");
                    assert_eq!(seq, st.seq, "DATA seq on {cid}");
                    st.seq = st.seq.wrapping_add(1);
                    st.sent += payload.len() as u64;
                    assert!(
                        st.sent <= st.credit,
                        "DATA beyond credit on {cid}: {} > {}",
                        st.sent,
                        st.credit
                    );
                }
                Frame::Fin { cid, .. } => {
                    let st = self.streams.get_mut(&cid);
                    let st = st.unwrap_or_else(|| panic!("FIN for unknown cid {cid}"));
                    assert!(!agent || st.open_ok, "agent FIN before OPEN_OK on {cid}");
                    assert!(!st.fin, "second FIN on {cid}");
                    st.fin = true;
                }
                Frame::Window { cid, .. } | Frame::Rst { cid, .. } => {
                    assert!(cid <= self.highest, "{:?} for cid {cid} never opened", f);
                }
                Frame::Ping { opaque } => self.last_ping = Some(opaque),
                Frame::GoAway { last_cid, .. } => {
                    assert!(last_cid <= self.highest, "GOAWAY last_cid above highest");
                }
                _ => {}
            }
        }
    }

    fn op(&mut self, op: SessionOp) {
        let now = self.now;
        match op {
            SessionOp::Raw(msg) => self.feed(&msg),
            SessionOp::Frame(f) => {
                let mut msg = Vec::new();
                self.build(&f, &mut msg);
                self.feed(&msg);
            }
            SessionOp::Frames(frames) => {
                let mut msg = Vec::new();
                for f in &frames {
                    self.build(f, &mut msg);
                }
                self.feed(&msg);
            }
            SessionOp::Text => self.s.handle_text_message(now),
            SessionOp::AcceptHello { accept } => {
                let mut ack = test_ack(0, 0, 0);
                if !accept {
                    ack.accepted.clear();
                }
                self.s.accept_hello(now, ack);
            }
            SessionOp::Open { connector, idle_ms } => {
                let c = CONNECTORS[usize::from(connector) % CONNECTORS.len()];
                let idle = idle_ms.map(|ms| Duration::from_millis(u64::from(ms)));
                let _ = self.s.open(now, c, "127.0.0.1:40000", idle);
            }
            SessionOp::Accept { cid } => {
                let cid = self.pick_cid(cid);
                self.s.accept_stream(now, cid, "target:389");
            }
            SessionOp::Send { cid, len } => {
                let cid = self.pick_cid(cid);
                let cap = self.s.send_capacity(cid);
                let data = vec![0x5A; usize::from(len)];
                // Both send paths: owned (queued as is when it fits) and copied.
                let n = if len % 2 == 0 {
                    self.s.send_vec(now, cid, data)
                } else {
                    self.s.send(now, cid, &data)
                };
                assert!(
                    n <= usize::from(len) && n <= cap,
                    "send accepted beyond capacity"
                );
            }
            SessionOp::Finish { cid } => self.s.finish(now, self.pick_cid(cid)),
            SessionOp::Reset { cid, code, long } => {
                self.s
                    .reset(now, self.pick_cid(cid), Code(code), &reason(long));
            }
            SessionOp::Release { cid, n } => {
                let cid = self.pick_cid(cid);
                self.s.release(now, cid, n as usize);
            }
            SessionOp::GoAway { code, long } => self.s.goaway(now, Code(code), &reason(long)),
            SessionOp::Close { code } => self.s.close(now, code, "fuzz close"),
            SessionOp::Renew { len } => self.s.renew(now, &token(len)),
            SessionOp::RenewAck { exp } => self.s.renew_ack(now, exp),
            SessionOp::Health { healthy } => self.s.send_health(now, &health(healthy)),
            SessionOp::SetIdle { cid, ms } => {
                let cid = self.pick_cid(cid);
                let idle = ms.map(|ms| Duration::from_millis(u64::from(ms)));
                self.s.set_idle_timeout(cid, idle);
            }
            SessionOp::Advance { ms } => {
                self.now = self.now + Duration::from_millis(u64::from(ms));
                self.s.handle_timeout(self.now);
            }
            SessionOp::FireTimer => {
                if let Some(t) = self.s.poll_timeout() {
                    self.now = self.now.max(t);
                    self.s.handle_timeout(self.now);
                    self.drain();
                    // A driver that sleeps until poll_timeout must make progress, not spin.
                    if let Some(next) = self.s.poll_timeout() {
                        assert!(next > self.now, "timer due at {t:?} still due after firing");
                    }
                }
            }
        }
        self.drain();
    }
}

/// One session against a simulated peer. Input: one selector byte (bit 0: the session's side,
/// 0 = hub, 1 = agent; bit 1: do the handshake first; bit 2: tiny limits), then a sequence of
/// ops decoded with `arbitrary`: raw messages, frames built from fields, commands, time steps.
pub fn session(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(sel) = u8::arbitrary(&mut u) else {
        return;
    };
    let side = side_of(sel);
    let handshake = sel & 2 != 0;
    let cfg = config(sel & 4 != 0);
    let now = Instant::from_millis(1_000);
    let window = cfg.window;
    let max_frame = cfg.max_frame;
    let max_message = cfg.max_message;
    let s = match side {
        Side::Hub => Session::new_hub(cfg, now),
        Side::Agent => Session::new_agent(cfg, test_hello(0, 0), now),
    };
    let mut d = SessionDriver {
        s,
        side,
        now,
        peer_window: 0,
        streams: BTreeMap::new(),
        known: Vec::new(),
        highest: 0,
        peer_seq: BTreeMap::new(),
        last_ping: None,
        closed: false,
        max_message,
        out: Vec::new(),
    };
    d.drain();
    if handshake {
        // The peer's limits come from the input too (out-of-range ones fail the handshake).
        let l = PeerLimits::arbitrary(&mut u).unwrap_or_default();
        let window = l.window.unwrap_or(window);
        let mut msg = Vec::new();
        match side {
            Side::Hub => {
                let max_streams = l.max_streams.map_or(100, u32::from);
                Frame::Hello(test_hello(window, max_streams)).encode(&mut msg);
                d.feed(&msg);
                d.drain();
                d.s.accept_hello(now, test_ack(0, 0, 0));
            }
            Side::Agent => {
                let max_frame = l.max_frame.map_or(max_frame, |f| f.max(1));
                let heartbeat_ms = l.heartbeat_ms.map_or(20_000, u64::from);
                Frame::HelloAck(test_ack(window, max_frame, heartbeat_ms)).encode(&mut msg);
                d.feed(&msg);
            }
        }
        d.drain();
    }
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = SessionOp::arbitrary(&mut u) else {
            break;
        };
        if trace() {
            eprintln!("{:?} @{}: {op:?}", side, d.now.as_millis());
        }
        d.op(op);
    }
    if trace() {
        let sent: u64 = d.streams.values().map(|s| s.sent).sum();
        let fins = d.streams.values().filter(|s| s.fin).count();
        let closed = d.s.close_reason().map(|(c, r)| format!("{c} {r}"));
        eprintln!(
            "session: {} streams, {sent} bytes sent, {fins} FINs sent, closed {closed:?}",
            d.streams.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// pair

#[derive(Arbitrary, Debug)]
enum PairOp {
    Open {
        ssh: bool,
        idle_ms: Option<u16>,
    },
    Send {
        agent: bool,
        cid: u8,
        len: u16,
    },
    Finish {
        agent: bool,
        cid: u8,
    },
    Reset {
        agent: bool,
        cid: u8,
        code: u16,
    },
    Stall {
        agent: bool,
        cid: u8,
    },
    Unstall {
        agent: bool,
        cid: u8,
    },
    Step,
    Drive,
    Advance {
        ms: u16,
    },
    /// Latency: messages towards one side stay in flight (in order) until released, so frames
    /// cross (RST vs DATA, FIN vs FIN, GOAWAY vs OPEN, WINDOW vs RST).
    Hold {
        to_agent: bool,
        on: bool,
    },
    GoAway {
        agent: bool,
        code: u8,
    },
    Renew {
        len: u8,
    },
    RenewAck {
        exp: u64,
    },
    Health {
        healthy: bool,
    },
    SetIdle {
        agent: bool,
        cid: u8,
        ms: Option<u16>,
    },
}

fn pair_side(agent: bool) -> Side {
    if agent {
        Side::Agent
    } else {
        Side::Hub
    }
}

/// The byte at `off` of what `side` sends on `cid`: not periodic over short spans, so lost,
/// repeated or reordered chunks show up.
fn pattern(side: Side, cid: u32, off: usize) -> u8 {
    let x = (off as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(cid) << 1 | u64::from(side == Side::Agent));
    (x >> 29) as u8
}

#[derive(Default)]
struct PairModel {
    /// Streams the hub opened, oldest first.
    cids: Vec<u32>,
    /// Bytes each side's `send` accepted, per (side is agent, cid).
    sent: BTreeMap<(bool, u32), Vec<u8>>,
    /// (side is agent, cid) where `finish` was called on an existing stream.
    fin: BTreeSet<(bool, u32)>,
    /// Streams a command reset.
    reset: BTreeSet<u32>,
    /// Sides that called `goaway`.
    goaway: BTreeSet<bool>,
    /// Sides closed because the other one closed (side is agent).
    closed_by_peer: BTreeSet<bool>,
    /// Time advanced while messages were held: heartbeats may legitimately be lost.
    delayed: bool,
}

impl PairModel {
    fn pick(&self, v: u8) -> u32 {
        // Mostly a stream it knows; sometimes cid 0, a stale one or one never opened.
        if v < 0xE0 && !self.cids.is_empty() {
            self.cids[usize::from(v) % self.cids.len()]
        } else {
            u32::from(v & 0x1f)
        }
    }
}

fn pair_check(p: &mut Pair, m: &PairModel) {
    for agent in [false, true] {
        let side = pair_side(agent);
        let peer_close = p
            .session(side.peer())
            .close_reason()
            .map(|(c, r)| (c, r.to_owned()));
        let peer_closed = peer_close.is_some();
        let end = p.end(side);
        for (&cid, got) in &end.received {
            let sent = m.sent.get(&(!agent, cid)).map_or(&[][..], Vec::as_slice);
            assert!(
                got.len() <= sent.len() && sent[..got.len()] == got[..],
                "{side:?} received on {cid} is not a prefix of what was sent"
            );
        }
        for ev in &end.events {
            match ev {
                Event::SessionClosed { code, reason } => {
                    // Two correct peers never see a protocol error: a session closes only by
                    // its own drain, because its peer closed the WebSocket, or by missing the
                    // peer's heartbeat (the peer closed in the middle of a time advance, or time
                    // advanced while messages were held).
                    let drained = m.goaway.contains(&agent)
                        && matches!(
                            *code,
                            close::NORMAL | close::TOKEN_EXPIRED | close::FORBIDDEN
                        );
                    let by_peer = m.closed_by_peer.contains(&agent)
                        || ((peer_closed || m.delayed) && *code == close::TIMEOUT);
                    assert!(drained || by_peer, "{side:?} closed: {code} {reason}");
                }
                Event::Reset {
                    cid,
                    code,
                    reason,
                    remote: false,
                } => assert!(
                    !matches!(*code, Code::PROTOCOL_ERROR | Code::FLOW_CONTROL_ERROR),
                    "{side:?} reset {cid}: {code} {reason} (peer: {:?})",
                    peer_close
                ),
                _ => {}
            }
        }
    }
}

/// What a runtime does when a session closes: flush it, then close the WebSocket, which the
/// other runtime reports to its session as a close with the same code.
fn propagate_close(p: &mut Pair, m: &mut PairModel) {
    for agent in [false, true] {
        let side = pair_side(agent);
        let Some((code, _)) = p.session(side).close_reason() else {
            continue;
        };
        if p.session(side.peer()).close_reason().is_none() {
            // The close follows everything sent before it.
            match side {
                Side::Hub => p.hold_to_agent = false,
                Side::Agent => p.hold_to_hub = false,
            }
            assert!(p.drive_bounded(10_000), "pair did not go quiet");
            let now = p.now;
            m.closed_by_peer.insert(!agent);
            p.session(side.peer())
                .close(now, code, "peer closed the WebSocket");
            assert!(p.drive_bounded(10_000), "pair did not go quiet");
        }
    }
}

/// For failure messages: both ends' events about `cid` and their session state.
fn stream_events(p: &mut Pair, cid: u32) -> String {
    let mut s = String::new();
    for side in [Side::Hub, Side::Agent] {
        let close = p
            .session(side)
            .close_reason()
            .map(|(c, r)| format!("{c} {r}"));
        let window = p.session(side).recv_window(cid);
        let evs: Vec<&Event> = p
            .end(side)
            .events
            .iter()
            .filter(|e| event_cid(e).is_none_or(|c| c == cid))
            .collect();
        s += &format!("\n  {side:?} (closed {close:?}, window {window:?}): {evs:?}");
    }
    s
}

fn event_cid(e: &Event) -> Option<u32> {
    match *e {
        Event::OpenRequest { cid, .. }
        | Event::Opened { cid, .. }
        | Event::Data { cid, .. }
        | Event::Writable { cid }
        | Event::Finished { cid }
        | Event::Reset { cid, .. }
        | Event::StreamClosed { cid } => Some(cid),
        _ => None,
    }
}

/// A hub and an agent [`Pair`], connected. Input: one selector byte (bit 0: hub gets tiny
/// limits; bit 1: agent gets tiny limits), then ops decoded with `arbitrary` on both sides:
/// open, send, finish, reset, stalls, steps, time advances, GOAWAY, RENEW, HEALTH.
pub fn pair(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(sel) = u8::arbitrary(&mut u) else {
        return;
    };
    let (mut hub, mut agent) = (config(sel & 1 != 0), config(sel & 2 != 0));
    if hub.max_message != agent.max_message {
        hub.max_message = Config::default().max_message;
        agent.max_message = hub.max_message;
    }
    let mut p = Pair::connected_with(hub, agent);
    if trace() {
        eprintln!(
            "pair: tight hub {}, tight agent {}",
            sel & 1 != 0,
            sel & 2 != 0
        );
    }
    let mut m = PairModel::default();
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = PairOp::arbitrary(&mut u) else {
            break;
        };
        if trace() {
            eprintln!("pair @{}: {op:?}", p.now.as_millis());
        }
        let now = p.now;
        match op {
            PairOp::Open { ssh, idle_ms } => {
                let idle = idle_ms.map(|ms| Duration::from_millis(u64::from(ms)));
                let c = if ssh { "ssh" } else { "ldap" };
                if let Ok(cid) = p.hub.open(now, c, "127.0.0.1:40000", idle) {
                    m.cids.push(cid);
                }
            }
            PairOp::Send { agent, cid, len } => {
                let (side, cid) = (pair_side(agent), m.pick(cid));
                let sent = m.sent.entry((agent, cid)).or_default();
                let off = sent.len();
                let data: Vec<u8> = (off..off + usize::from(len))
                    .map(|i| pattern(side, cid, i))
                    .collect();
                let n = p.send(side, cid, &data);
                sent.extend_from_slice(&data[..n]);
            }
            PairOp::Finish { agent, cid } => {
                let (side, cid) = (pair_side(agent), m.pick(cid));
                if p.session(side).recv_window(cid).is_some() {
                    m.fin.insert((agent, cid));
                }
                p.finish(side, cid);
            }
            PairOp::Reset { agent, cid, code } => {
                let (side, cid) = (pair_side(agent), m.pick(cid));
                if p.session(side).recv_window(cid).is_some() {
                    m.reset.insert(cid);
                }
                p.session(side).reset(now, cid, Code(code), "fuzz reset");
            }
            PairOp::Stall { agent, cid } => p.stall(pair_side(agent), m.pick(cid)),
            PairOp::Unstall { agent, cid } => p.unstall(pair_side(agent), m.pick(cid)),
            PairOp::Step => {
                p.step();
            }
            PairOp::Drive => assert!(p.drive_bounded(10_000), "pair did not go quiet"),
            PairOp::Advance { ms } => {
                m.delayed |= p.hold_to_agent || p.hold_to_hub;
                p.advance(Duration::from_millis(u64::from(ms)));
            }
            PairOp::Hold { to_agent, on } => {
                if to_agent {
                    p.hold_to_agent = on;
                } else {
                    p.hold_to_hub = on;
                }
            }
            PairOp::GoAway { agent, code } => {
                let code = match code % 3 {
                    0 => Code::SHUTDOWN,
                    1 => Code::TOKEN_EXPIRED,
                    _ => Code::FORBIDDEN,
                };
                let side = pair_side(agent);
                if p.session(side).is_established() {
                    m.goaway.insert(agent);
                }
                p.session(side).goaway(now, code, "fuzz goaway");
            }
            PairOp::Renew { len } => p.agent.renew(now, &token(len)),
            PairOp::RenewAck { exp } => p.hub.renew_ack(now, exp),
            PairOp::Health { healthy } => p.agent.send_health(now, &health(healthy)),
            PairOp::SetIdle { agent, cid, ms } => {
                let idle = ms.map(|ms| Duration::from_millis(u64::from(ms)));
                p.session(pair_side(agent))
                    .set_idle_timeout(m.pick(cid), idle);
            }
        }
        propagate_close(&mut p, &mut m);
        pair_check(&mut p, &m);
    }

    // Final drive with every consumer reading and no latency: all accepted bytes arrive, FINs
    // complete.
    p.hold_to_agent = false;
    p.hold_to_hub = false;
    for side in [Side::Hub, Side::Agent] {
        let stalled: Vec<u32> = p.end(side).stalled.iter().copied().collect();
        for cid in stalled {
            p.unstall(side, cid);
        }
    }
    assert!(p.drive_bounded(10_000), "pair did not go quiet");
    propagate_close(&mut p, &mut m);
    pair_check(&mut p, &m);
    if trace() {
        let sent: usize = m.sent.values().map(Vec::len).sum();
        eprintln!("pair: {} streams, {sent} bytes accepted", m.cids.len());
    }
    let mut reset = m.reset.clone();
    for side in [Side::Hub, Side::Agent] {
        for ev in &p.end(side).events {
            if let Event::Reset { cid, .. } = ev {
                reset.insert(*cid);
            }
        }
    }
    for &cid in &m.cids {
        if reset.contains(&cid) {
            continue;
        }
        for agent in [false, true] {
            let (side, peer) = (pair_side(agent), pair_side(!agent));
            let sent = m.sent.get(&(agent, cid)).map_or(&[][..], Vec::as_slice);
            let got = p.received(peer, cid).len();
            if got != sent.len() {
                panic!(
                    "{side:?} → {peer:?} on {cid}: {got} of {} bytes arrived: {}",
                    sent.len(),
                    stream_events(&mut p, cid)
                );
            }
            if m.fin.contains(&(agent, cid)) {
                assert!(
                    p.end(peer).saw(|e| *e == Event::Finished { cid }),
                    "{peer:?} never saw FIN on {cid}: {}",
                    stream_events(&mut p, cid)
                );
            }
        }
        if m.fin.contains(&(false, cid)) && m.fin.contains(&(true, cid)) {
            for side in [Side::Hub, Side::Agent] {
                assert!(
                    p.end(side).saw(|e| *e == Event::StreamClosed { cid }),
                    "{side:?} never closed {cid} after both FINs: {}",
                    stream_events(&mut p, cid)
                );
            }
        }
    }
}
