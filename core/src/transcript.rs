//! Deterministic replay (STYLE.md habit 7): a human-readable transcript of one [`Session`]'s
//! inputs, each followed by the outputs it must produce, checked byte for byte.
//!
//! ```text
//! # Comments and blank lines are kept as they are. Headers come before `new`:
//! # `config` overrides Config fields (durations in ms, `idle_timeout=off`), and for an agent
//! # `hello <json>` sets the HELLO it starts with.
//! config window=16 heartbeat=20000
//! @1000 new hub
//! > timer @11000
//! @1000 recv HELLO {"agent_id":"a1","connectors":["ldap"]}
//! > ev Hello {"agent_id":"a1","connectors":["ldap"],"ver":1,"window":262144,"max_streams":10000}
//! @1000 cmd accept_hello {"session":"s1","accepted":["ldap"]}
//! > tx HELLO_ACK {"session":"s1","accepted":["ldap"],"rejected":[],"window":16,...}
//! > tx+ PING opaque=1
//! > timer @21000
//! @1500 cmd open ldap 10.0.0.1:5000
//! > ret 1
//! > tx OPEN cid=1 connector="ldap" peer="10.0.0.1:5000"
//! > timer @2500
//! @1600 recv OPEN_OK cid=1 backend="dc1:389"
//!     + DATA cid=1 seq=0 "hi"
//! > ev Opened cid=1 backend="dc1:389"
//! > ev Data cid=1 "hi"
//! ```
//!
//! **Inputs** (`@<ms>` is the time passed in; it never goes backwards):
//! `new hub|agent` (first), `recv <FRAME>` with `+ <FRAME>` continuation lines for more frames
//! of the same WebSocket message, `recv hex <bytes>` (any bytes, spaces ignored), `recv text`
//! (a text message), `timeout`, and `cmd <command>` with `+ cmd <command>` continuation lines
//! for more commands before the outputs are drained: `accept_hello <HelloAck json>`,
//! `open <connector> <peer> [idle=<ms>|off]`, `send <cid> <payload>`, `finish <cid>`,
//! `reset <cid> <CODE> <"reason">`, `release <cid> <n>`, `accept_stream <cid> <"backend">`,
//! `goaway <CODE> <"reason">`, `close <code> <"reason">`, `renew <"token">`, `renew_ack <exp>`,
//! `health <json>`, `set_idle_timeout <cid> <ms>|off`.
//!
//! **Outputs** after each input, in this order: `> ret <value>` (commands that return one),
//! `> tx <FRAME>` for each `poll_transmit` message with `> tx+ <FRAME>` for its further frames,
//! `> ev <Event>` for each `poll_event`, `> close <code> <"reason">` when the session closes,
//! `> timer @<ms>|none` when `poll_timeout` changed. Invariants are checked after every input.
//!
//! **Frames** in canonical text: `HELLO|HELLO_ACK|HEALTH|RENEW_ACK <json, verbatim>`,
//! `OPEN cid= connector="" peer=""`, `OPEN_OK cid= backend=""`, `DATA cid= seq= <payload>`,
//! `WINDOW cid= increment=`, `FIN cid= dir=c2a|a2c`, `RST cid= code= reason=""`,
//! `PING opaque=`, `PONG opaque=`, `GOAWAY code= last_cid= reason=""`, `RENEW token=""`, or
//! `hex <bytes>` for a message that does not decode. Codes are §8 names (or numbers). Payloads
//! and strings are `"..."` with `\\ \" \n \r \t \xNN` escapes, or `<n>*"..."` for a repetition.
//!
//! Expected `tx` lines are checked by encoding them with the codec and comparing the bytes with
//! what the session transmitted: the text is a faithful picture of the wire, not a summary.
//! Everything else is compared as text. [`Transcript::render`] writes the actual outputs back
//! in place (the replay test does that under `NOWCONNECT_BLESS=1`).

use core::time::Duration;
use std::fmt::Write as _;

use crate::codes::{Code, Side};
use crate::config::Config;
use crate::event::Event;
use crate::frame::{decode_one, FinDir, Frame, FrameType};
use crate::json::{HealthReport, Hello, HelloAck};
use crate::session::Session;
use crate::time::Instant;

/// Most `poll_transmit` messages taken after one input (a session that never stops is a bug).
const MAX_MESSAGES_PER_INPUT: usize = 10_000;

/// One output of a session, in the order the runner drains them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A command's return value, rendered.
    Ret(String),
    /// One `poll_transmit` message, exact bytes.
    Tx(Vec<u8>),
    /// One `poll_event`.
    Ev(Event),
    /// `close_reason()` became `Some`.
    Close(u16, String),
    /// `poll_timeout()` changed.
    Timer(Option<Instant>),
}

/// A parsed transcript.
#[derive(Debug, Clone)]
pub struct Transcript {
    config: Config,
    hello: Hello,
    lines: Vec<Line>,
}

#[derive(Debug, Clone)]
enum Line {
    /// Comment, blank or header line, kept verbatim.
    Verbatim(String),
    /// An input line (with its `+` continuation lines) and its expected output lines.
    Input {
        lineno: usize,
        text: Vec<String>,
        at: Instant,
        input: Input,
        expected: Vec<(usize, String)>,
    },
}

#[derive(Debug, Clone)]
enum Input {
    New(Side),
    Recv(Vec<u8>),
    RecvText,
    Timeout,
    /// One or more commands applied back to back, outputs drained after the last.
    Cmd(Vec<Command>),
}

#[derive(Debug, Clone)]
enum Command {
    AcceptHello(HelloAck),
    Open {
        connector: String,
        peer: String,
        idle: Option<Duration>,
    },
    Send(u32, Vec<u8>),
    Finish(u32),
    Reset(u32, Code, String),
    Release(u32, usize),
    AcceptStream(u32, String),
    GoAway(Code, String),
    Close(u16, String),
    Renew(String),
    RenewAck(u64),
    Health(HealthReport),
    SetIdleTimeout(u32, Option<Duration>),
}

// ----- text helpers -----

/// A cursor over one line.
struct Cursor<'a> {
    s: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor { s: s.trim() }
    }

    fn is_empty(&self) -> bool {
        self.s.trim().is_empty()
    }

    /// The next whitespace-separated word (may be empty at the end).
    fn word(&mut self) -> &'a str {
        self.s = self.s.trim_start();
        let end = self.s.find(char::is_whitespace).unwrap_or(self.s.len());
        let (w, rest) = self.s.split_at(end);
        self.s = rest;
        w
    }

    fn rest(&mut self) -> &'a str {
        let r = self.s.trim();
        self.s = "";
        r
    }

    fn end(&self) -> Result<(), String> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected `{}`", self.s.trim()))
        }
    }

    /// `key=<value>` where value is a bare word.
    fn field(&mut self, key: &str) -> Result<&'a str, String> {
        self.s = self.s.trim_start();
        let Some(rest) = self.s.strip_prefix(key).and_then(|r| r.strip_prefix('=')) else {
            return Err(format!("expected `{key}=` at `{}`", self.s));
        };
        self.s = rest;
        Ok(self.word())
    }

    fn num<T: core::str::FromStr>(&mut self, key: &str) -> Result<T, String> {
        let w = self.field(key)?;
        w.parse().map_err(|_| format!("bad number `{w}` for {key}"))
    }

    /// `key=<bytes>`: a quoted string or repetition.
    fn bytes_field(&mut self, key: &str) -> Result<Vec<u8>, String> {
        self.s = self.s.trim_start();
        let Some(rest) = self.s.strip_prefix(key).and_then(|r| r.strip_prefix('=')) else {
            return Err(format!("expected `{key}=` at `{}`", self.s));
        };
        self.s = rest;
        self.bytes()
    }

    fn str_field(&mut self, key: &str) -> Result<String, String> {
        let b = self.bytes_field(key)?;
        String::from_utf8(b).map_err(|_| format!("{key} is not UTF-8"))
    }

    /// A quoted string, or `<n>*"..."`.
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        self.s = self.s.trim_start();
        let mut repeat = 1usize;
        if let Some(star) = self.s.find("*\"") {
            let n = &self.s[..star];
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                repeat = n.parse().map_err(|_| format!("bad repeat count `{n}`"))?;
                self.s = &self.s[star + 1..];
            }
        }
        let (unit, rest) = unquote(self.s)?;
        self.s = rest;
        Ok(unit.repeat(repeat))
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "string is not UTF-8".to_owned())
    }
}

/// Parses `"..."` at the front of `s`; returns the bytes and the rest.
fn unquote(s: &str) -> Result<(Vec<u8>, &str), String> {
    let Some(body) = s.strip_prefix('"') else {
        return Err(format!("expected a quoted string at `{s}`"));
    };
    let mut out = Vec::new();
    let mut it = body.char_indices();
    while let Some((i, c)) = it.next() {
        match c {
            '"' => return Ok((out, &body[i + 1..])),
            '\\' => {
                let (_, e) = it.next().ok_or("unterminated escape")?;
                match e {
                    '\\' => out.push(b'\\'),
                    '"' => out.push(b'"'),
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    '0' => out.push(0),
                    'x' => {
                        let hi = it.next().map(|(_, c)| c);
                        let lo = it.next().map(|(_, c)| c);
                        let (Some(hi), Some(lo)) = (hi, lo) else {
                            return Err("short \\x escape".into());
                        };
                        let v = u8::from_str_radix(&format!("{hi}{lo}"), 16)
                            .map_err(|_| format!("bad \\x escape `{hi}{lo}`"))?;
                        out.push(v);
                    }
                    other => return Err(format!("unknown escape `\\{other}`")),
                }
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    Err(format!("unterminated string `{s}`"))
}

fn quote_plain(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    s
}

/// Canonical text of a payload or string: `"..."`, or `<n>*"c"` for 16+ copies of one byte.
pub fn quote(bytes: &[u8]) -> String {
    match bytes.first() {
        Some(&first) if bytes.len() >= 16 && bytes.iter().all(|&b| b == first) => {
            format!("{}*{}", bytes.len(), quote_plain(&bytes[..1]))
        }
        _ => quote_plain(bytes),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|p| {
            let t = core::str::from_utf8(p).map_err(|_| "bad hex")?;
            u8::from_str_radix(t, 16).map_err(|_| format!("bad hex `{t}`"))
        })
        .collect()
}

fn code_name(c: u16) -> String {
    match Code(c).name() {
        "UNKNOWN" => c.to_string(),
        n => n.to_owned(),
    }
}

fn parse_code(w: &str) -> Result<Code, String> {
    if let Ok(n) = w.parse::<u16>() {
        return Ok(Code(n));
    }
    (0..=u16::from(u8::MAX))
        .map(Code)
        .find(|c| c.name() == w)
        .ok_or_else(|| format!("unknown code `{w}`"))
}

fn parse_ms(w: &str) -> Result<Option<Duration>, String> {
    if w == "off" {
        return Ok(None);
    }
    w.parse::<u64>()
        .map(|ms| Some(Duration::from_millis(ms)))
        .map_err(|_| format!("bad duration `{w}` (milliseconds or `off`)"))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Our JSON structs always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_str(s).map_err(|e| format!("bad JSON: {e}"))
}

// ----- frames -----

fn type_name(t: FrameType) -> &'static str {
    match t {
        FrameType::Hello => "HELLO",
        FrameType::HelloAck => "HELLO_ACK",
        FrameType::Open => "OPEN",
        FrameType::OpenOk => "OPEN_OK",
        FrameType::Data => "DATA",
        FrameType::Window => "WINDOW",
        FrameType::Fin => "FIN",
        FrameType::Rst => "RST",
        FrameType::Ping => "PING",
        FrameType::Pong => "PONG",
        FrameType::Health => "HEALTH",
        FrameType::GoAway => "GOAWAY",
        FrameType::Renew => "RENEW",
        FrameType::RenewAck => "RENEW_ACK",
    }
}

/// Canonical text of one frame (the `tx`/`recv` syntax).
pub fn render_frame(f: &Frame<'_>) -> String {
    let name = type_name(f.frame_type());
    match f {
        Frame::Hello(v) => format!("{name} {}", json(v)),
        Frame::HelloAck(v) => format!("{name} {}", json(v)),
        Frame::Health(v) => format!("{name} {}", json(v)),
        Frame::RenewAck(v) => format!("{name} {}", json(v)),
        Frame::Open {
            cid,
            connector,
            peer,
        } => format!(
            "{name} cid={cid} connector={} peer={}",
            quote(connector.as_bytes()),
            quote(peer.as_bytes())
        ),
        Frame::OpenOk { cid, backend } => {
            format!("{name} cid={cid} backend={}", quote(backend.as_bytes()))
        }
        Frame::Data { cid, seq, payload } => {
            format!("{name} cid={cid} seq={seq} {}", quote(payload))
        }
        Frame::Window { cid, increment } => format!("{name} cid={cid} increment={increment}"),
        Frame::Fin { cid, dir } => {
            let d = match dir {
                FinDir::C2a => "c2a",
                FinDir::A2c => "a2c",
            };
            format!("{name} cid={cid} dir={d}")
        }
        Frame::Rst { cid, code, reason } => format!(
            "{name} cid={cid} code={} reason={}",
            code_name(*code),
            quote(reason.as_bytes())
        ),
        Frame::Ping { opaque } | Frame::Pong { opaque } => format!("{name} opaque={opaque}"),
        Frame::GoAway {
            code,
            last_cid,
            reason,
        } => format!(
            "{name} code={} last_cid={last_cid} reason={}",
            code_name(*code),
            quote(reason.as_bytes())
        ),
        Frame::Renew { token } => format!("{name} token={}", quote(token.as_bytes())),
    }
}

/// Encodes one frame written in canonical text (or `hex <bytes>`) and appends it to `out`.
/// JSON bodies are taken verbatim; everything else goes through [`Frame::encode`].
pub fn encode_text_frame(text: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let mut c = Cursor::new(text);
    let name = c.word();
    let json_frame = |ty: FrameType, body: &str, out: &mut Vec<u8>| {
        out.push(ty as u8);
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body.as_bytes());
    };
    match name {
        "hex" => out.extend(unhex(c.rest())?),
        "HELLO" => json_frame(FrameType::Hello, c.rest(), out),
        "HELLO_ACK" => json_frame(FrameType::HelloAck, c.rest(), out),
        "HEALTH" => json_frame(FrameType::Health, c.rest(), out),
        "RENEW_ACK" => json_frame(FrameType::RenewAck, c.rest(), out),
        "OPEN" => {
            let cid = c.num("cid")?;
            let connector = c.str_field("connector")?;
            let peer = c.str_field("peer")?;
            c.end()?;
            Frame::Open {
                cid,
                connector: &connector,
                peer: &peer,
            }
            .encode(out);
        }
        "OPEN_OK" => {
            let cid = c.num("cid")?;
            let backend = c.str_field("backend")?;
            c.end()?;
            Frame::OpenOk {
                cid,
                backend: &backend,
            }
            .encode(out);
        }
        "DATA" => {
            let cid = c.num("cid")?;
            let seq = c.num("seq")?;
            let payload = c.bytes()?;
            c.end()?;
            Frame::Data {
                cid,
                seq,
                payload: &payload,
            }
            .encode(out);
        }
        "WINDOW" => {
            let cid = c.num("cid")?;
            let increment = c.num("increment")?;
            c.end()?;
            Frame::Window { cid, increment }.encode(out);
        }
        "FIN" => {
            let cid = c.num("cid")?;
            let dir = match c.field("dir")? {
                "c2a" => FinDir::C2a,
                "a2c" => FinDir::A2c,
                other => return Err(format!("bad FIN dir `{other}`")),
            };
            c.end()?;
            Frame::Fin { cid, dir }.encode(out);
        }
        "RST" => {
            let cid = c.num("cid")?;
            let code = parse_code(c.field("code")?)?;
            let reason = c.str_field("reason")?;
            c.end()?;
            Frame::Rst {
                cid,
                code: code.0,
                reason: &reason,
            }
            .encode(out);
        }
        "PING" | "PONG" => {
            let opaque = c.num("opaque")?;
            c.end()?;
            if name == "PING" {
                Frame::Ping { opaque }.encode(out);
            } else {
                Frame::Pong { opaque }.encode(out);
            }
        }
        "GOAWAY" => {
            let code = parse_code(c.field("code")?)?;
            let last_cid = c.num("last_cid")?;
            let reason = c.str_field("reason")?;
            c.end()?;
            Frame::GoAway {
                code: code.0,
                last_cid,
                reason: &reason,
            }
            .encode(out);
        }
        "RENEW" => {
            let token = c.str_field("token")?;
            c.end()?;
            Frame::Renew { token: &token }.encode(out);
        }
        other => return Err(format!("unknown frame `{other}`")),
    }
    Ok(())
}

/// Canonical text of one message sent by `sender`: one line per frame, or a single `hex ...`
/// line when it does not decode or its text would not re-encode to the same bytes.
pub fn render_message(msg: &[u8], sender: Side) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest = msg;
    while !rest.is_empty() {
        match decode_one(rest, sender, u32::MAX) {
            Ok((f, used)) => {
                let line = render_frame(&f);
                let mut again = Vec::new();
                if encode_text_frame(&line, &mut again).is_err() || again != rest[..used] {
                    return vec![format!("hex {}", hex(msg))];
                }
                lines.push(line);
                rest = &rest[used..];
            }
            Err(_) => return vec![format!("hex {}", hex(msg))],
        }
    }
    if lines.is_empty() {
        lines.push("hex ".to_owned());
    }
    lines
}

/// Canonical text of one event (the `ev` syntax).
pub fn render_event(ev: &Event) -> String {
    match ev {
        Event::Hello(h) => format!("Hello {}", json(h)),
        Event::Established(a) => format!("Established {}", json(a)),
        Event::OpenRequest {
            cid,
            connector,
            peer,
        } => format!(
            "OpenRequest cid={cid} connector={} peer={}",
            quote(connector.as_bytes()),
            quote(peer.as_bytes())
        ),
        Event::Opened { cid, backend } => {
            format!("Opened cid={cid} backend={}", quote(backend.as_bytes()))
        }
        Event::Data { cid, data } => format!("Data cid={cid} {}", quote(data)),
        Event::Writable { cid } => format!("Writable cid={cid}"),
        Event::Finished { cid } => format!("Finished cid={cid}"),
        Event::Reset {
            cid,
            code,
            reason,
            remote,
        } => format!(
            "Reset cid={cid} code={} reason={} remote={remote}",
            code_name(code.0),
            quote(reason.as_bytes())
        ),
        Event::StreamClosed { cid } => format!("StreamClosed cid={cid}"),
        Event::Health(h) => format!("Health {}", json(h)),
        Event::Renew { token } => format!("Renew token={}", quote(token.as_bytes())),
        Event::RenewAck { exp } => format!("RenewAck exp={exp}"),
        Event::GoAway {
            code,
            last_cid,
            reason,
        } => format!(
            "GoAway code={} last_cid={last_cid} reason={}",
            code_name(code.0),
            quote(reason.as_bytes())
        ),
        Event::SessionClosed { code, reason } => {
            format!(
                "SessionClosed code={code} reason={}",
                quote(reason.as_bytes())
            )
        }
    }
}

/// The text lines (without `> `) of one output; `sender` is the session's side.
fn render_output(o: &Output, sender: Side) -> Vec<String> {
    match o {
        Output::Ret(r) => vec![format!("ret {r}")],
        Output::Tx(msg) => render_message(msg, sender)
            .into_iter()
            .enumerate()
            .map(|(i, l)| format!("{} {l}", if i == 0 { "tx" } else { "tx+" }))
            .collect(),
        Output::Ev(e) => vec![format!("ev {}", render_event(e))],
        Output::Close(c, r) => vec![format!("close {c} {}", quote(r.as_bytes()))],
        Output::Timer(t) => vec![match t {
            Some(t) => format!("timer @{}", t.as_millis()),
            None => "timer none".to_owned(),
        }],
    }
}

// ----- parsing -----

fn parse_config(c: &mut Cursor<'_>, cfg: &mut Config) -> Result<(), String> {
    while !c.is_empty() {
        let kv = c.word();
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got `{kv}`"))?;
        let n = || {
            v.parse::<u64>()
                .map_err(|_| format!("bad value `{v}` for {k}"))
        };
        let dur = || parse_ms(v)?.ok_or_else(|| format!("{k} cannot be off"));
        let narrow = |x: u64| u32::try_from(x).map_err(|_| format!("{k} too large"));
        match k {
            "window" => cfg.window = narrow(n()?)?,
            "max_window" => cfg.max_window = narrow(n()?)?,
            "max_buffered" => cfg.max_buffered = n()?,
            "max_frame" => cfg.max_frame = narrow(n()?)?,
            "max_message" => cfg.max_message = usize::try_from(n()?).map_err(|e| e.to_string())?,
            "max_streams" => cfg.max_streams = narrow(n()?)?,
            "hello_timeout" => cfg.hello_timeout = dur()?,
            "open_timeout" => cfg.open_timeout = dur()?,
            "heartbeat" => cfg.heartbeat = dur()?,
            "shutdown_grace" => cfg.shutdown_grace = dur()?,
            "idle_timeout" => cfg.idle_timeout = parse_ms(v)?,
            other => return Err(format!("unknown config key `{other}`")),
        }
    }
    Ok(())
}

fn parse_command(c: &mut Cursor<'_>) -> Result<Command, String> {
    let cid = |c: &mut Cursor<'_>| -> Result<u32, String> {
        let w = c.word();
        w.parse().map_err(|_| format!("bad cid `{w}`"))
    };
    let cmd = match c.word() {
        "accept_hello" => Command::AcceptHello(from_json(c.rest())?),
        "open" => {
            let connector = c.word().to_owned();
            let peer = c.word().to_owned();
            let mut idle = None;
            if !c.is_empty() {
                idle = parse_ms(c.field("idle")?)?;
            }
            Command::Open {
                connector,
                peer,
                idle,
            }
        }
        "send" => Command::Send(cid(c)?, c.bytes()?),
        "finish" => Command::Finish(cid(c)?),
        "reset" => Command::Reset(cid(c)?, parse_code(c.word())?, c.string()?),
        "release" => {
            let id = cid(c)?;
            let w = c.word();
            Command::Release(id, w.parse().map_err(|_| format!("bad count `{w}`"))?)
        }
        "accept_stream" => Command::AcceptStream(cid(c)?, c.string()?),
        "goaway" => Command::GoAway(parse_code(c.word())?, c.string()?),
        "close" => {
            let w = c.word();
            let code = w.parse().map_err(|_| format!("bad close code `{w}`"))?;
            Command::Close(code, c.string()?)
        }
        "renew" => Command::Renew(c.string()?),
        "renew_ack" => {
            let w = c.word();
            Command::RenewAck(w.parse().map_err(|_| format!("bad exp `{w}`"))?)
        }
        "health" => Command::Health(from_json(c.rest())?),
        "set_idle_timeout" => Command::SetIdleTimeout(cid(c)?, parse_ms(c.word())?),
        other => return Err(format!("unknown command `{other}`")),
    };
    c.end()?;
    Ok(cmd)
}

fn parse_input(c: &mut Cursor<'_>) -> Result<Input, String> {
    Ok(match c.word() {
        "new" => match c.word() {
            "hub" => Input::New(Side::Hub),
            "agent" => Input::New(Side::Agent),
            other => return Err(format!("`new hub` or `new agent`, not `{other}`")),
        },
        "recv" => {
            let rest = c.rest();
            if rest == "text" {
                Input::RecvText
            } else {
                let mut msg = Vec::new();
                encode_text_frame(rest, &mut msg)?;
                Input::Recv(msg)
            }
        }
        "timeout" => Input::Timeout,
        "cmd" => Input::Cmd(vec![parse_command(c)?]),
        other => return Err(format!("unknown input `{other}`")),
    })
}

impl Transcript {
    /// Parses a transcript; errors name the line.
    pub fn parse(text: &str) -> Result<Transcript, String> {
        let mut config = Config::default();
        let mut hello = Hello {
            agent_id: "agent-1".into(),
            connectors: vec!["ldap".into()],
            ver: 1,
            software: String::new(),
            window: 0,
            max_streams: 0,
        };
        let mut lines: Vec<Line> = Vec::new();
        let mut last = Instant::from_millis(0);
        let mut started = false;
        for (i, raw) in text.lines().enumerate() {
            let lineno = i + 1;
            let at_line = |e: String| format!("line {lineno}: {e}");
            let t = raw.trim();
            if let Some(exp) = t.strip_prefix('>') {
                let Some(Line::Input { expected, .. }) = lines.last_mut() else {
                    return Err(at_line("output line before any input".into()));
                };
                expected.push((lineno, exp.trim().to_owned()));
            } else if let Some(more) = t.strip_prefix('+') {
                let Some(Line::Input {
                    text,
                    input,
                    expected,
                    ..
                }) = lines.last_mut()
                else {
                    return Err(at_line("`+` line before any input".into()));
                };
                if !expected.is_empty() {
                    return Err(at_line("`+` lines go before the outputs".into()));
                }
                match input {
                    Input::Recv(msg) => encode_text_frame(more, msg).map_err(at_line)?,
                    Input::Cmd(cmds) => {
                        let mut c = Cursor::new(more);
                        if c.word() != "cmd" {
                            return Err(at_line("`+ cmd <command>` continues a `cmd`".into()));
                        }
                        cmds.push(parse_command(&mut c).map_err(at_line)?);
                    }
                    _ => return Err(at_line("`+` continues `recv` or `cmd` only".into())),
                }
                text.push(raw.to_owned());
            } else if let Some(rest) = t.strip_prefix('@') {
                let mut c = Cursor::new(rest);
                let w = c.word();
                let ms: u64 = w.parse().map_err(|_| at_line(format!("bad time `@{w}`")))?;
                let at = Instant::from_millis(ms);
                if at < last {
                    return Err(at_line("time goes backwards".into()));
                }
                last = at;
                let input = parse_input(&mut c).map_err(at_line)?;
                if matches!(input, Input::New(_)) == started {
                    return Err(at_line("`new` must be the first input, once".into()));
                }
                started = true;
                lines.push(Line::Input {
                    lineno,
                    text: vec![raw.to_owned()],
                    at,
                    input,
                    expected: Vec::new(),
                });
            } else {
                if !t.is_empty() && !t.starts_with('#') {
                    if started {
                        return Err(at_line("headers go before `new`".into()));
                    }
                    let mut c = Cursor::new(t);
                    match c.word() {
                        "config" => parse_config(&mut c, &mut config).map_err(at_line)?,
                        "hello" => hello = from_json(c.rest()).map_err(at_line)?,
                        other => return Err(at_line(format!("unknown header `{other}`"))),
                    }
                }
                lines.push(Line::Verbatim(raw.to_owned()));
            }
        }
        if !started {
            return Err("no `@<ms> new hub|agent` line".into());
        }
        Ok(Transcript {
            config,
            hello,
            lines,
        })
    }

    fn side(&self) -> Side {
        self.lines
            .iter()
            .find_map(|l| match l {
                Line::Input {
                    input: Input::New(side),
                    ..
                } => Some(*side),
                _ => None,
            })
            .unwrap_or(Side::Hub)
    }

    /// Feeds every input to a fresh session and returns the outputs of each, in order.
    /// Errors if an invariant breaks or the session never stops transmitting.
    pub fn run(&self) -> Result<Vec<Vec<Output>>, String> {
        let mut session: Option<Session> = None;
        let mut timer: Option<Option<Instant>> = None;
        let mut closed = false;
        let mut all = Vec::new();
        for line in &self.lines {
            let Line::Input {
                lineno, at, input, ..
            } = line
            else {
                continue;
            };
            let now = *at;
            let mut out = Vec::new();
            let s = match (input, &mut session) {
                (Input::New(side), None) => session.insert(match side {
                    Side::Hub => Session::new_hub(self.config.clone(), now),
                    Side::Agent => Session::new_agent(self.config.clone(), self.hello.clone(), now),
                }),
                (_, Some(s)) => s,
                // `parse` makes `new` the first input and only that.
                (_, None) => return Err(format!("line {lineno}: no session")),
            };
            match input {
                Input::New(_) => {}
                Input::Recv(msg) => s.handle_message(now, msg),
                Input::RecvText => s.handle_text_message(now),
                Input::Timeout => s.handle_timeout(now),
                Input::Cmd(cmds) => {
                    for cmd in cmds {
                        if let Some(r) = apply(s, now, cmd) {
                            out.push(Output::Ret(r));
                        }
                    }
                }
            }
            let mut msg = Vec::new();
            let mut n = 0;
            while s.poll_transmit(now, &mut msg) {
                out.push(Output::Tx(std::mem::take(&mut msg)));
                n += 1;
                if n > MAX_MESSAGES_PER_INPUT {
                    return Err(format!("line {lineno}: poll_transmit never returns false"));
                }
            }
            while let Some(ev) = s.poll_event() {
                out.push(Output::Ev(ev));
            }
            if !closed {
                if let Some((code, reason)) = s.close_reason() {
                    closed = true;
                    out.push(Output::Close(code, reason.to_owned()));
                }
            }
            let t = s.poll_timeout();
            if timer != Some(t) {
                timer = Some(t);
                out.push(Output::Timer(t));
            }
            s.check_invariants()
                .map_err(|e| format!("line {lineno}: invariant broken: {e}"))?;
            all.push(out);
        }
        Ok(all)
    }

    /// Compares `outputs` (from [`run`](Self::run)) with the expected lines: `tx` by bytes
    /// (expected frames re-encoded), the rest by text. Describes the first difference.
    pub fn check(&self, outputs: &[Vec<Output>]) -> Result<(), String> {
        let side = self.side();
        let inputs = self.lines.iter().filter_map(|l| match l {
            Line::Input {
                lineno,
                text,
                expected,
                ..
            } => Some((lineno, text, expected)),
            Line::Verbatim(_) => None,
        });
        for ((lineno, text, expected), actual) in inputs.zip(outputs) {
            let rendered: Vec<String> =
                actual.iter().flat_map(|o| render_output(o, side)).collect();
            let fail = |why: String| {
                let exp: Vec<String> = expected.iter().map(|(_, l)| format!("> {l}")).collect();
                let act: Vec<String> = rendered.iter().map(|l| format!("> {l}")).collect();
                Err(format!(
                    "input at line {lineno}: {why}\ninput:\n{}\nexpected:\n{}\nactual:\n{}",
                    text.join("\n"),
                    exp.join("\n"),
                    act.join("\n")
                ))
            };
            // Group expected lines: a `tx` line and its `tx+` lines form one message.
            let mut exp_items: Vec<(usize, Result<Vec<u8>, String>)> = Vec::new();
            for (ln, l) in expected.iter() {
                if let Some(f) = l.strip_prefix("tx+ ") {
                    match exp_items.last_mut() {
                        Some((_, Ok(msg))) => {
                            if let Err(e) = encode_text_frame(f, msg) {
                                return fail(format!("line {ln}: {e}"));
                            }
                        }
                        _ => return fail(format!("line {ln}: `tx+` without a `tx` before it")),
                    }
                } else if let Some(f) = l.strip_prefix("tx ") {
                    let mut msg = Vec::new();
                    if let Err(e) = encode_text_frame(f, &mut msg) {
                        return fail(format!("line {ln}: {e}"));
                    }
                    exp_items.push((*ln, Ok(msg)));
                } else {
                    exp_items.push((*ln, Err(l.clone())));
                }
            }
            if exp_items.len() != actual.len() {
                return fail(format!(
                    "{} outputs expected, {} produced",
                    exp_items.len(),
                    actual.len()
                ));
            }
            for ((ln, exp), act) in exp_items.iter().zip(actual) {
                match (exp, act) {
                    (Ok(bytes), Output::Tx(msg)) => {
                        if bytes != msg {
                            let at = bytes.iter().zip(msg).take_while(|(a, b)| a == b).count();
                            return fail(format!(
                                "line {ln}: transmitted bytes differ at offset {at}\n\
                                 expected hex {}\nactual   hex {}",
                                hex(bytes),
                                hex(msg)
                            ));
                        }
                    }
                    (Err(text), act) => {
                        let lines = render_output(act, side);
                        if lines.len() != 1 || lines[0] != *text {
                            return fail(format!("line {ln}: output differs"));
                        }
                    }
                    (Ok(_), _) => return fail(format!("line {ln}: expected a message")),
                }
            }
        }
        Ok(())
    }

    /// The transcript text with every expected line replaced by `outputs` (bless).
    pub fn render(&self, outputs: &[Vec<Output>]) -> String {
        let side = self.side();
        let mut outs = outputs.iter();
        let mut s = String::new();
        for line in &self.lines {
            match line {
                Line::Verbatim(l) => {
                    s.push_str(l);
                    s.push('\n');
                }
                Line::Input { text, .. } => {
                    for l in text {
                        s.push_str(l);
                        s.push('\n');
                    }
                    for o in outs.next().into_iter().flatten() {
                        for l in render_output(o, side) {
                            s.push_str("> ");
                            s.push_str(&l);
                            s.push('\n');
                        }
                    }
                }
            }
        }
        s
    }
}

/// Applies one command; returns the rendered return value of those that have one.
fn apply(s: &mut Session, now: Instant, cmd: &Command) -> Option<String> {
    match cmd {
        Command::AcceptHello(ack) => s.accept_hello(now, ack.clone()),
        Command::Open {
            connector,
            peer,
            idle,
        } => {
            return Some(match s.open(now, connector, peer, *idle) {
                Ok(cid) => cid.to_string(),
                Err(e) => format!("err {e:?}"),
            })
        }
        Command::Send(cid, data) => return Some(s.send(now, *cid, data).to_string()),
        Command::Finish(cid) => s.finish(now, *cid),
        Command::Reset(cid, code, reason) => s.reset(now, *cid, *code, reason),
        Command::Release(cid, n) => s.release(now, *cid, *n),
        Command::AcceptStream(cid, backend) => s.accept_stream(now, *cid, backend),
        Command::GoAway(code, reason) => s.goaway(now, *code, reason),
        Command::Close(code, reason) => s.close(now, *code, reason),
        Command::Renew(token) => s.renew(now, token),
        Command::RenewAck(exp) => s.renew_ack(now, *exp),
        Command::Health(h) => s.send_health(now, h),
        Command::SetIdleTimeout(cid, idle) => s.set_idle_timeout(*cid, *idle),
    }
    None
}
