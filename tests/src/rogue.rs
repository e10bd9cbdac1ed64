//! Rogue peers for hostile-input tests: a raw WebSocket agent ([`RawPeer::connect_agent`]) or
//! hub ([`RogueHub`]) that speaks frames by hand with the core's codec, so a test can send
//! exactly the malformed, out-of-order or oversized input it wants to the real binaries and
//! watch what comes back (frames, or the WebSocket close code of wire-protocol.md §7).
//!
//! Plaintext `ws://` only (tests run the hub with `plaintext: true`): the misbehaviour under
//! test is above TLS.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nowconnect_core::frame::{decode_message, Frame};
use nowconnect_core::{Hello, HelloAck, Side};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::HeaderValue;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame as WsFrame;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// The subprotocol of wire-protocol.md §1.
pub const SUBPROTOCOL: &str = "nowconnect.v1";

/// What [`RawPeer::recv`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// One binary message (one or more frames; decode with [`RawPeer::frames`]).
    Binary(Vec<u8>),
    /// A text message (never valid in this protocol).
    Text(String),
    /// The peer's WebSocket Close: code and reason (code 1005 when it sent none).
    Closed(u16, String),
    /// The connection ended without a Close frame (EOF or reset).
    Gone(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// One side of a tunnel WebSocket driven by hand: blocking, with per-call deadlines.
pub struct RawPeer {
    ws: WebSocket<TcpStream>,
    /// Who is at the other end (whose frames we decode).
    far: Side,
    /// Answer the far side's PING frames with PONG while receiving (default on).
    pub auto_pong: bool,
    /// Payloads of the WebSocket pongs received so far.
    pub ws_pongs: Vec<Vec<u8>>,
    closed: bool,
}

fn config() -> WebSocketConfig {
    // No size limit on what we read: we want to see whatever the real binary sends.
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

impl RawPeer {
    /// Upgrades to a plaintext hub at `addr` + `path` with `Authorization: Bearer token` and the
    /// `nowconnect.v1` subprotocol, like an agent. Err with the reason on any refusal.
    pub fn connect_agent(addr: SocketAddr, path: &str, token: &str) -> Result<RawPeer, String> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut req = format!("ws://{addr}{path}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (ws, _) = tungstenite::client::client_with_config(req, tcp, Some(config()))
            .map_err(|e| format!("upgrade: {e}"))?;
        Ok(RawPeer {
            ws,
            far: Side::Hub,
            auto_pong: true,
            ws_pongs: Vec::new(),
            closed: false,
        })
    }

    /// Sends HELLO and waits for HELLO_ACK (answering PINGs meanwhile).
    pub fn hello(&mut self, hello: &Hello) -> Result<HelloAck, String> {
        self.send_frames(&[Frame::Hello(hello.clone())]);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.recv_until(deadline) {
                Received::Binary(msg) => {
                    let frames = decode_message(&msg, self.far, u32::MAX)
                        .map_err(|e| format!("undecodable answer to HELLO: {e}"))?;
                    for f in frames {
                        if let Frame::HelloAck(ack) = f {
                            return Ok(ack);
                        }
                    }
                }
                other => return Err(format!("no HELLO_ACK: {other:?}")),
            }
        }
    }

    /// Encodes `frames` into one binary message and sends it. Send errors are ignored (the
    /// peer may already have closed; [`Self::recv`] tells).
    pub fn send_frames(&mut self, frames: &[Frame<'_>]) {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.send_raw(out);
    }

    /// Sends `bytes` as one binary message, as is.
    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.ws.send(Message::binary(bytes));
    }

    /// Encodes `frames` into one binary message and sends it as `pieces` WebSocket frames
    /// (a first frame and continuations), as an intermediary may re-fragment it.
    pub fn send_fragmented(&mut self, frames: &[Frame<'_>], pieces: usize) {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        let size = out.len().div_ceil(pieces.max(1));
        let chunks: Vec<&[u8]> = out.chunks(size.max(1)).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Binary)
            } else {
                OpCode::Data(Data::Continue)
            };
            let frame = WsFrame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
            let _ = self.ws.send(Message::Frame(frame));
        }
    }

    /// Sends a WebSocket ping (as a load balancer or proxy might).
    pub fn send_ws_ping(&mut self, payload: &[u8]) {
        let _ = self.ws.send(Message::Ping(payload.to_vec().into()));
    }

    /// Sends a text message (a protocol error, §1).
    pub fn send_text(&mut self, text: &str) {
        let _ = self.ws.send(Message::text(text));
    }

    /// The next message or event within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Received {
        self.recv_until(Instant::now() + timeout)
    }

    fn recv_until(&mut self, deadline: Instant) -> Received {
        if self.closed {
            return Received::Gone("already closed".into());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::Timeout;
            }
            let _ = self
                .ws
                .get_mut()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let msg = b.to_vec();
                    if self.auto_pong {
                        self.answer_pings(&msg);
                    }
                    return Received::Binary(msg);
                }
                Ok(Message::Text(t)) => return Received::Text(t.to_string()),
                Ok(Message::Close(frame)) => {
                    self.closed = true;
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    // Complete the closing handshake (best effort) and end the TCP connection,
                    // so the far side need not wait for our FIN.
                    let _ = self.ws.flush();
                    let _ = self.ws.get_mut().shutdown(std::net::Shutdown::Both);
                    return Received::Closed(code, reason);
                }
                Ok(Message::Pong(p)) => self.ws_pongs.push(p.to_vec()),
                Ok(_) => continue, // WebSocket ping: tungstenite answers it itself
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue;
                }
                Err(e) => {
                    self.closed = true;
                    return Received::Gone(e.to_string());
                }
            }
        }
    }

    fn answer_pings(&mut self, msg: &[u8]) {
        let Ok(frames) = decode_message(msg, self.far, u32::MAX) else {
            return;
        };
        let pongs: Vec<Frame<'_>> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Ping { opaque } => Some(Frame::Pong { opaque: *opaque }),
                _ => None,
            })
            .collect();
        if !pongs.is_empty() {
            self.send_frames(&pongs);
        }
    }

    /// Decodes a message from the far side (any DATA size accepted).
    pub fn frames<'m>(&self, msg: &'m [u8]) -> Result<Vec<Frame<'m>>, String> {
        decode_message(msg, self.far, u32::MAX).map_err(|e| e.to_string())
    }

    /// Receives until `pick` returns `Some` for a frame, within `timeout`. Err with what came
    /// instead (a close, the connection gone, undecodable bytes, or the deadline).
    pub fn expect_frame<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Frame<'_>) -> Option<T>,
    ) -> Result<T, Received> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_until(deadline) {
                Received::Binary(msg) => {
                    let Ok(frames) = decode_message(&msg, self.far, u32::MAX) else {
                        return Err(Received::Binary(msg));
                    };
                    if let Some(t) = frames.iter().find_map(&mut pick) {
                        return Ok(t);
                    }
                }
                other => return Err(other),
            }
        }
    }

    /// Receives (and drops) messages until the peer closes; its close code, or `Err` with how
    /// it ended otherwise (connection gone without a Close, or the deadline).
    pub fn expect_close(&mut self, timeout: Duration) -> Result<(u16, String), Received> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_until(deadline) {
                Received::Closed(code, reason) => return Ok((code, reason)),
                Received::Binary(_) | Received::Text(_) => continue,
                other => return Err(other),
            }
        }
    }

    /// Sends a WebSocket Close with `code` (best effort).
    pub fn close(&mut self, code: u16, reason: &str) {
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        }));
        let _ = self.ws.flush();
    }

    /// Whether the far side still has the connection open, judged by a read: false after a
    /// Close or EOF.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

/// A hub that is not one: accepts a real agent's upgrade on loopback, then lets the test drive
/// the session by hand ([`RawPeer`] with the far side an agent).
pub struct RogueHub {
    listener: TcpListener,
    /// `ws://127.0.0.1:<port>/v1/tunnel` for the agent's `hub.url`.
    pub url: String,
    pub addr: SocketAddr,
    /// Upgrades accepted so far.
    pub accepted: usize,
}

impl RogueHub {
    /// Binds a free loopback port.
    pub fn bind(path: &str) -> RogueHub {
        let listener = TcpListener::bind(crate::free_addr()).expect("bind rogue hub");
        let addr = listener.local_addr().expect("rogue hub addr");
        listener
            .set_nonblocking(true)
            .expect("rogue hub nonblocking");
        RogueHub {
            listener,
            url: format!("ws://{addr}{path}"),
            addr,
            accepted: 0,
        }
    }

    /// Waits up to `timeout` for the next agent connection and answers its upgrade with 101 and
    /// the subprotocol (whatever its token). `Err` on timeout or a failed upgrade.
    pub fn accept(&mut self, timeout: Duration) -> Result<RawPeer, String> {
        let deadline = Instant::now() + timeout;
        let tcp = loop {
            match self.listener.accept() {
                Ok((tcp, _)) => break tcp,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(format!("no agent connected within {timeout:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        let setup = |tcp: &TcpStream| -> io::Result<()> {
            tcp.set_nonblocking(false)?;
            tcp.set_nodelay(true)?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))
        };
        setup(&tcp).map_err(|e| e.to_string())?;
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let callback = |_req: &Request, mut resp: Response| {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
            Ok::<Response, ErrorResponse>(resp)
        };
        let ws = tungstenite::accept_hdr_with_config(tcp, callback, Some(config()))
            .map_err(|e| format!("upgrade: {e}"))?;
        self.accepted += 1;
        Ok(RawPeer {
            ws,
            far: Side::Agent,
            auto_pong: true,
            ws_pongs: Vec::new(),
            closed: false,
        })
    }
}

/// [`RogueHub`]'s handshake half: waits for the agent's HELLO.
pub fn read_hello(peer: &mut RawPeer, timeout: Duration) -> Result<Hello, Received> {
    peer.expect_frame(timeout, |f| match f {
        Frame::Hello(h) => Some(h.clone()),
        _ => None,
    })
}

/// A HELLO_ACK accepting `connectors` with the given `window` and `heartbeat_ms`.
pub fn hello_ack(connectors: &[String], window: u32, heartbeat_ms: u64) -> HelloAck {
    HelloAck {
        session: "rogue-1".into(),
        accepted: connectors.to_vec(),
        rejected: Vec::new(),
        window,
        max_frame: 65536,
        heartbeat_ms,
        ver: 1,
    }
}
