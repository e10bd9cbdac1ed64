//! The WebSocket upgrade, both sides (wire-protocol.md §1), blocking with a deadline; the
//! returned socket is switched to nonblocking for the tunnel thread.
//!
//! Header sizes are bounded by tungstenite's handshake reader (at most 64 KiB and 124 headers,
//! else `AttackAttempt`), and time by the transport's deadline.

use std::io::{self, Write};
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{self, HeaderMap, HeaderValue, StatusCode};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::WebSocket;

use crate::tls::Transport;

/// The only subprotocol this version speaks (§1).
pub const SUBPROTOCOL: &str = "nowconnect.v1";

/// Budget for TCP + TLS + upgrade together; callers make the transport's deadline from it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel's WebSocket after the upgrade.
pub type TunnelSocket = WebSocket<Transport>;

/// tungstenite limits for a tunnel. `max_message` is the session's (`Config::max_message`):
/// a bigger message is a protocol error (4400, §10), which the tunnel thread reports as such.
pub fn websocket_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Room a message buffer keeps in front of its payload for the WebSocket frame header
/// (2 + 8 length bytes + 4 mask bytes, RFC 6455 §5.2).
pub const FRAME_HEADER_ROOM: usize = 14;

/// Masking keys for a client's frames (RFC 6455 §5.3: unpredictable), drawn from the crypto
/// provider's secure random in blocks.
pub struct Masker {
    rng: &'static dyn rustls::crypto::SecureRandom,
    pool: [u8; 256],
    pos: usize,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Masker")
    }
}

impl Masker {
    /// Keys from the process's rustls provider (ring).
    pub fn new() -> Masker {
        Masker {
            rng: rustls::crypto::ring::default_provider().secure_random,
            pool: [0; 256],
            pos: 256,
        }
    }

    fn key(&mut self) -> [u8; 4] {
        if self.pos + 4 > self.pool.len() {
            // On failure the previous block is reused, still unknown to the network.
            let _ = self.rng.fill(&mut self.pool);
            self.pos = 0;
        }
        let mut k = [0u8; 4];
        k.copy_from_slice(&self.pool[self.pos..self.pos + 4]);
        self.pos += 4;
        k
    }
}

impl Default for Masker {
    fn default() -> Self {
        Masker::new()
    }
}

/// XOR `data` with the repeated 4-byte `key` (RFC 6455 §5.3), 8 bytes at a time.
fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Turn `msg` — [`FRAME_HEADER_ROOM`] bytes of room, then the payload — into one final binary
/// WebSocket frame (masked when `masker` is given, i.e. on the client side). Returns where the
/// frame starts in `msg`.
pub fn finish_binary_frame(msg: &mut [u8], masker: Option<&mut Masker>) -> usize {
    let len = msg.len() - FRAME_HEADER_ROOM;
    let mut h = [0u8; FRAME_HEADER_ROOM];
    h[0] = 0x82; // FIN, binary
    let mask_bit = if masker.is_some() { 0x80 } else { 0 };
    let mut n = 2;
    if len < 126 {
        h[1] = mask_bit | len as u8;
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = mask_bit | 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        n = 4;
    } else {
        h[1] = mask_bit | 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        n = 10;
    }
    if let Some(m) = masker {
        let key = m.key();
        h[n..n + 4].copy_from_slice(&key);
        n += 4;
        apply_mask(&mut msg[FRAME_HEADER_ROOM..], key);
    }
    let start = FRAME_HEADER_ROOM - n;
    msg[start..FRAME_HEADER_ROOM].copy_from_slice(&h[..n]);
    start
}

/// Why the agent's upgrade failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The hub answered with this HTTP status (401, 403, 503…) instead of 101.
    Rejected {
        /// HTTP status code.
        status: u16,
    },
    /// Not a valid WebSocket answer (e.g. no `nowconnect.v1` subprotocol).
    Protocol(String),
    /// Socket or TLS failure, including the deadline passing (`TimedOut`).
    Io(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Rejected { status } => write!(f, "upgrade rejected with HTTP {status}"),
            ConnectError::Protocol(e) => write!(f, "bad upgrade response: {e}"),
            ConnectError::Io(e) => write!(f, "upgrade I/O: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

fn connect_error(e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(resp) => ConnectError::Rejected {
            status: resp.status().as_u16(),
        },
        tungstenite::Error::Io(e) => ConnectError::Io(e),
        e => ConnectError::Protocol(e.to_string()),
    }
}

/// Agent: upgrade `transport` to the tunnel WebSocket at `url` (`wss://host/v1/tunnel`), with
/// `Authorization: Bearer <token>` and `Sec-WebSocket-Protocol: nowconnect.v1`.
pub fn connect(
    transport: Transport,
    url: &str,
    bearer_token: &str,
    max_message: usize,
) -> Result<TunnelSocket, ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Protocol(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {bearer_token}"))
        .map_err(|_| ConnectError::Protocol("token is not a valid header value".into()))?;
    let headers = request.headers_mut();
    headers.insert(http::header::AUTHORIZATION, auth);
    headers.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let config = Some(websocket_config(max_message));
    let mut ws = match tungstenite::client::client_with_config(request, transport, config) {
        Ok((ws, _response)) => ws,
        Err(HandshakeError::Failure(e)) => return Err(connect_error(e)),
        // Blocking transport: a would-block can only be the deadline.
        Err(HandshakeError::Interrupted(_)) => {
            return Err(ConnectError::Io(io::ErrorKind::TimedOut.into()))
        }
    };
    ws.get_mut().set_nonblocking().map_err(ConnectError::Io)?;
    Ok(ws)
}

/// The parts of an upgrade request the hub decides on.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    /// Request path, e.g. `/v1/tunnel`.
    pub path: &'a str,
    /// All request headers.
    pub headers: &'a HeaderMap,
}

impl UpgradeRequest<'_> {
    /// A header's value as text (`None` if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The token of `Authorization: Bearer <token>`, if that is the header's form.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }
}

/// An HTTP error answer to an upgrade (§1): status and a one-line plain-text reason, which
/// must never echo the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 400, 401, 403, 503…
    pub status: u16,
    /// One line of plain text.
    pub reason: String,
    /// `WWW-Authenticate` value for 401s (e.g. `Bearer error="invalid_token"`).
    pub www_authenticate: Option<String>,
}

impl Rejection {
    /// A rejection without `WWW-Authenticate`.
    pub fn new(status: u16, reason: impl Into<String>) -> Rejection {
        Rejection {
            status,
            reason: reason.into(),
            www_authenticate: None,
        }
    }

    fn response(&self) -> ErrorResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let line: String = self.reason.lines().next().unwrap_or("").to_owned();
        let body = format!("{line}\n");
        let mut builder = http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(http::header::CONNECTION, "close");
        if let Some(v) = &self.www_authenticate {
            builder = builder.header(http::header::WWW_AUTHENTICATE, v.as_str());
        }
        builder.body(Some(body.clone())).unwrap_or_else(|_| {
            // Only a header value with control characters gets here; answer without it.
            let mut r = http::Response::new(Some(body));
            *r.status_mut() = status;
            r
        })
    }
}

/// Why the hub's side of an upgrade did not produce a tunnel.
#[derive(Debug)]
pub enum AcceptError {
    /// We answered with this rejection (from the decision, or 400 for a missing subprotocol).
    Rejected(Rejection),
    /// Not a valid WebSocket upgrade; answered 400 when the socket allowed it.
    Malformed(String),
    /// Socket or TLS failure, including the deadline passing (`TimedOut`).
    Io(io::Error),
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::Rejected(r) => write!(f, "upgrade rejected: {} {}", r.status, r.reason),
            AcceptError::Malformed(e) => write!(f, "malformed upgrade: {e}"),
            AcceptError::Io(e) => write!(f, "upgrade I/O: {e}"),
        }
    }
}

impl std::error::Error for AcceptError {}

/// Whether the client offered `nowconnect.v1` (the header is a comma-separated list).
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// Hub: answer the upgrade on an accepted `transport`. A request without the `nowconnect.v1`
/// subprotocol is answered 400 (§10); otherwise `decide` sees the path and headers and returns
/// either what the caller wants to keep (e.g. the validated token's claims) — answered 101
/// with the subprotocol — or a [`Rejection`].
pub fn accept<T>(
    mut transport: Transport,
    max_message: usize,
    decide: impl FnOnce(&UpgradeRequest<'_>) -> Result<T, Rejection>,
) -> Result<(TunnelSocket, T), AcceptError> {
    let mut decided: Option<Result<T, Rejection>> = None;
    // The signature is tungstenite's `Callback`; the large `Err` is its `ErrorResponse`.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let outcome = if offers_subprotocol(req.headers()) {
            decide(&UpgradeRequest {
                path: req.uri().path(),
                headers: req.headers(),
            })
        } else {
            Err(Rejection::new(400, "subprotocol nowconnect.v1 required"))
        };
        let answer = match &outcome {
            Ok(_) => {
                resp.headers_mut().insert(
                    http::header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(SUBPROTOCOL),
                );
                Ok(resp)
            }
            Err(rejection) => Err(rejection.response()),
        };
        decided = Some(outcome);
        answer
    };
    let config = websocket_config(max_message);
    // Handshake over `&mut transport` so the socket is still ours to answer 400 on failure.
    let handshake =
        match tungstenite::accept_hdr_with_config(&mut transport, callback, Some(config)) {
            Ok(_) => Ok(()),
            Err(HandshakeError::Failure(e)) => Err(e),
            // Blocking transport: a would-block can only be the deadline.
            Err(HandshakeError::Interrupted(_)) => {
                Err(tungstenite::Error::Io(io::ErrorKind::TimedOut.into()))
            }
        };
    match (handshake, decided) {
        (Ok(()), Some(Ok(value))) => {
            // Server handshakes leave no unread bytes (tungstenite refuses a request followed by
            // data), so a fresh WebSocket over the same transport continues exactly where it was.
            let mut ws = WebSocket::from_raw_socket(transport, Role::Server, Some(config));
            ws.get_mut().set_nonblocking().map_err(AcceptError::Io)?;
            Ok((ws, value))
        }
        (_, Some(Err(rejection))) => {
            close_quietly(&mut transport);
            Err(AcceptError::Rejected(rejection))
        }
        (Err(tungstenite::Error::Io(e)), _) => Err(AcceptError::Io(e)),
        (Err(e), None) => {
            let rejection = Rejection::new(400, "malformed websocket upgrade");
            let mut raw = Vec::new();
            let resp = rejection.response();
            if tungstenite::handshake::server::write_response(&mut raw, &resp).is_ok() {
                raw.extend_from_slice(resp.body().as_deref().unwrap_or("").as_bytes());
                let _ = transport.write_all(&raw).and_then(|()| transport.flush());
            }
            close_quietly(&mut transport);
            Err(AcceptError::Malformed(e.to_string()))
        }
        (_, None) => Err(AcceptError::Malformed(
            "handshake ended without a decision".into(),
        )),
        (Err(e), Some(Ok(_))) => Err(AcceptError::Malformed(e.to_string())),
    }
}

/// After an HTTP error answer: TLS close_notify, then close (best effort, still under the
/// handshake deadline).
fn close_quietly(transport: &mut Transport) {
    let _ = transport.close_notify();
    transport.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn bearer_token_forms() {
        let cases = [
            ("Bearer abc.def", Some("abc.def")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearer", None),
        ];
        for (value, want) in cases {
            let h = headers(&[("authorization", value)]);
            let req = UpgradeRequest {
                path: "/",
                headers: &h,
            };
            assert_eq!(req.bearer_token(), want, "{value}");
        }
        let h = headers(&[]);
        assert_eq!(
            UpgradeRequest {
                path: "/",
                headers: &h
            }
            .bearer_token(),
            None
        );
    }

    #[test]
    fn subprotocol_offers() {
        assert!(offers_subprotocol(&headers(&[(
            "sec-websocket-protocol",
            "nowconnect.v1"
        )])));
        assert!(offers_subprotocol(&headers(&[(
            "sec-websocket-protocol",
            "other, nowconnect.v1"
        )])));
        assert!(offers_subprotocol(&headers(&[
            ("sec-websocket-protocol", "other"),
            ("sec-websocket-protocol", "nowconnect.v1"),
        ])));
        assert!(!offers_subprotocol(&headers(&[(
            "sec-websocket-protocol",
            "nowconnect.v2"
        )])));
        assert!(!offers_subprotocol(&headers(&[])));
    }

    /// Our own frames read back by tungstenite, both roles, all three length forms.
    #[test]
    fn own_frames_parse_as_tungstenite_frames() {
        use tungstenite::protocol::frame::FrameSocket;
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 200_000] {
            for client in [false, true] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut msg = vec![0u8; FRAME_HEADER_ROOM];
                msg.extend_from_slice(&payload);
                let mut masker = Masker::new();
                let start = finish_binary_frame(&mut msg, client.then_some(&mut masker));
                let mut sock = FrameSocket::new(std::io::Cursor::new(msg[start..].to_vec()));
                let frame = sock.read(None).expect("frame").expect("one frame");
                let header = frame.header().clone();
                assert!(header.is_final);
                assert_eq!(header.mask.is_some(), client, "len {len}");
                let mut got = frame.into_payload().to_vec();
                if let Some(key) = header.mask {
                    apply_mask(&mut got, key);
                }
                assert_eq!(got, payload, "len {len} client {client}");
            }
        }
    }

    #[test]
    fn rejection_is_one_plain_line() {
        let mut r = Rejection::new(401, "bad token\nsecond line");
        r.www_authenticate = Some("Bearer error=\"invalid_token\"".into());
        let resp = r.response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.body().as_deref(), Some("bad token\n"));
        assert_eq!(
            resp.headers()[http::header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "10");
    }
}
