//! The byte stream under the tunnel's WebSocket: plain TCP (`ws://`) or rustls over TCP
//! (`wss://`), as one [`Transport`] type so tungstenite sees one stream type.
//!
//! Why not `rustls::StreamOwned`: its `write` may *read* the socket, find the send buffer full
//! and return `Ok(0)`, which tungstenite reports as a reset; it breaks under simultaneous
//! two-way load (DEPENDENCIES.md "Traps found"). Here `read` only reads and `write` only
//! writes, returning `WouldBlock` when rustls's send buffer is full, so one tunnel thread can
//! drive both directions from `poll(2)` without either waiting for the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Install the workspace's one rustls crypto provider (ring) as the process default.
/// Call once at start-up; later calls are no-ops. Two providers would make
/// `ClientConfig::builder()` panic (DEPENDENCIES.md).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TCP socket with an optional deadline. While a deadline is set (blocking handshakes)
/// every read and write gets the time left as its socket timeout, so a peer that dribbles
/// bytes cannot stretch the handshake past it.
#[derive(Debug)]
struct Wire {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Wire {
    fn arm(&self, read: bool) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        if read {
            self.tcp.set_read_timeout(Some(left))
        } else {
            self.tcp.set_write_timeout(Some(left))
        }
    }

    /// A blocking socket's timeout surfaces as `WouldBlock`; with a deadline it is a timeout,
    /// not a "try again" (tungstenite would otherwise hand back a half-done handshake).
    fn timed(&self, r: io::Result<usize>) -> io::Result<usize> {
        match r {
            Err(e) if self.deadline.is_some() && e.kind() == io::ErrorKind::WouldBlock => Err(
                io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed"),
            ),
            r => r,
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        let r = self.tcp.read(buf);
        self.timed(r)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        let r = self.tcp.write(buf);
        self.timed(r)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // rustls hands over its queued records as a vector: one syscall for many records.
        self.arm(false)?;
        let r = self.tcp.write_vectored(bufs);
        self.timed(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// rustls (client or server side) over a TCP socket, full duplex without `StreamOwned`.
#[derive(Debug)]
pub struct TlsStream {
    conn: Connection,
    wire: Wire,
    /// The socket is nonblocking (the tunnel's): `read` keeps fetching records until the
    /// socket has none. Blocking (handshake, upgrade), it stops after the first plaintext.
    fill: bool,
}

impl TlsStream {
    /// Client side: run the TLS handshake on `tcp` (blocking, until `deadline`).
    pub fn connect(
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        tcp: TcpStream,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = ClientConnection::new(config, server_name).map_err(io::Error::other)?;
        TlsStream::handshake(Connection::Client(conn), tcp, deadline)
    }

    /// Server side: run the TLS handshake on an accepted `tcp` (blocking, until `deadline`).
    pub fn accept(
        config: Arc<ServerConfig>,
        tcp: TcpStream,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        TlsStream::handshake(Connection::Server(conn), tcp, deadline)
    }

    fn handshake(conn: Connection, tcp: TcpStream, deadline: Instant) -> io::Result<TlsStream> {
        tcp.set_nonblocking(false)?;
        let mut stream = TlsStream {
            conn,
            wire: Wire {
                tcp,
                deadline: Some(deadline),
            },
            fill: false,
        };
        while stream.conn.is_handshaking() {
            let (rd, wr) = stream.conn.complete_io(&mut stream.wire)?;
            if rd == 0 && wr == 0 && stream.conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
        Ok(stream)
    }

    /// The rustls connection (e.g. for the negotiated protocol version or peer certificates).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Write already-encrypted records to the socket until done or it would block.
    fn push_records(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.wire) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsStream {
    /// Plaintext from the peer. Only ever reads the socket; never writes it. `Ok(0)` is a
    /// clean end (close_notify); a TCP EOF without close_notify is `UnexpectedEof`.
    ///
    /// Fills `buf` as far as the socket has records for it, not one record (16 KiB) per call:
    /// the WebSocket reader zeroes its whole read window before each call, so one record per
    /// call cost 8× the plaintext in `memset` (measured: 7 % of wss CPU).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        loop {
            match self.conn.reader().read(&mut buf[filled..]) {
                // Clean end, or `buf` is full.
                Ok(0) => return Ok(filled),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() || !self.fill {
                        return Ok(filled);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The error (EOF without close_notify…) comes back on the next call.
                Err(_) if filled > 0 => return Ok(filled),
                Err(e) => return Err(e),
            }
            // No plaintext buffered: fetch more records (returns WouldBlock when none).
            // A 0-byte read (TCP EOF) is noted by rustls; the reader reports it next round.
            match self.conn.read_tls(&mut self.wire) {
                Ok(_) => {}
                Err(_) if filled > 0 => return Ok(filled),
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                if filled > 0 {
                    // Sticky: the next call reports it.
                    return Ok(filled);
                }
                // rustls queued an alert; the tunnel's next flush sends it.
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl Write for TlsStream {
    /// Encrypt into rustls's send buffer. Only ever writes the socket; never reads it.
    /// `WouldBlock` when the buffer is full and the socket takes nothing more right now.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push_records()?;
        let n = self.conn.writer().write(buf)?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Push every buffered record to the socket; `WouldBlock` if some remain.
    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        self.push_records()?;
        if self.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }
}

/// The stream under a tunnel's WebSocket, plus the tunnel's own outgoing WebSocket frames.
///
/// The tunnel thread frames DATA messages itself ([`queue_frames`](Self::queue_frames)) and
/// hands the whole buffer over without a copy; tungstenite writes only its own frames (Close,
/// pongs). Both go through this type in order: a tungstenite write first drains the queued
/// frames (else `WouldBlock`), and frames are only queued while tungstenite has nothing
/// buffered, so the byte stream always holds whole frames in the order they were made.
#[derive(Debug)]
pub struct Transport {
    io: Io,
    /// Queued outgoing bytes (whole WebSocket frames); `out[out_pos..]` is not written yet.
    out: Vec<u8>,
    out_pos: usize,
}

#[derive(Debug)]
enum Io {
    /// `ws://`: only behind a TLS-terminating load balancer or in tests (wire-protocol.md §1).
    Plain(PlainStream),
    /// `wss://`.
    Tls(Box<TlsStream>),
}

/// Plain TCP with the same deadline handling as the TLS variant.
#[derive(Debug)]
pub struct PlainStream {
    wire: Wire,
}

/// Plaintext rustls may hold encrypted and unsent before `write` says `WouldBlock`: 16
/// records, written with one vectored syscall.
const TLS_BUFFER_LIMIT: usize = 256 * 1024;

impl Transport {
    fn new(io: Io) -> Transport {
        Transport {
            io,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Plain TCP; blocking with `deadline` until [`set_nonblocking`](Self::set_nonblocking).
    pub fn plain(tcp: TcpStream, deadline: Instant) -> io::Result<Transport> {
        tcp.set_nonblocking(false)?;
        Ok(Transport::new(Io::Plain(PlainStream {
            wire: Wire {
                tcp,
                deadline: Some(deadline),
            },
        })))
    }

    /// TLS client handshake on `tcp`, then the transport (still blocking with `deadline`).
    pub fn tls_client(
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        tcp: TcpStream,
        deadline: Instant,
    ) -> io::Result<Transport> {
        TlsStream::connect(config, server_name, tcp, deadline)
            .map(|s| Transport::new(Io::Tls(Box::new(s))))
    }

    /// TLS server handshake on an accepted `tcp`, then the transport (blocking with `deadline`).
    pub fn tls_server(
        config: Arc<ServerConfig>,
        tcp: TcpStream,
        deadline: Instant,
    ) -> io::Result<Transport> {
        TlsStream::accept(config, tcp, deadline).map(|s| Transport::new(Io::Tls(Box::new(s))))
    }

    fn wire(&self) -> &Wire {
        match &self.io {
            Io::Plain(p) => &p.wire,
            Io::Tls(t) => &t.wire,
        }
    }

    fn wire_mut(&mut self) -> &mut Wire {
        match &mut self.io {
            Io::Plain(p) => &mut p.wire,
            Io::Tls(t) => &mut t.wire,
        }
    }

    /// The TCP socket (to poll it or read its addresses).
    pub fn tcp(&self) -> &TcpStream {
        &self.wire().tcp
    }

    /// The TLS session, for `wss://`.
    pub fn tls(&self) -> Option<&TlsStream> {
        match &self.io {
            Io::Plain(_) => None,
            Io::Tls(t) => Some(t),
        }
    }

    /// Leave handshake mode: no deadline, no socket timeouts, nonblocking I/O for the
    /// tunnel thread's poll loop.
    pub fn set_nonblocking(&mut self) -> io::Result<()> {
        if let Io::Tls(t) = &mut self.io {
            t.conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
            t.fill = true;
        }
        let wire = self.wire_mut();
        wire.deadline = None;
        wire.tcp.set_read_timeout(None)?;
        wire.tcp.set_write_timeout(None)?;
        wire.tcp.set_nonblocking(true)
    }

    /// Change (or set) the deadline of blocking I/O, e.g. for the WebSocket handshake.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.wire_mut().deadline = deadline;
    }

    /// Bytes are buffered below the WebSocket (queued frames or encrypted records not yet
    /// written).
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len()
            || match &self.io {
                Io::Plain(_) => false,
                Io::Tls(t) => t.conn.wants_write(),
            }
    }

    /// Queue whole WebSocket frames `frames[start..]` behind anything queued before. When
    /// nothing is queued the buffer is taken as is and `frames` gets the previous (empty)
    /// allocation back, so the caller's buffer is reused without a copy.
    pub fn queue_frames(&mut self, frames: &mut Vec<u8>, start: usize) {
        if self.out_pos >= self.out.len() {
            self.out.clear();
            std::mem::swap(&mut self.out, frames);
            self.out_pos = start;
        } else {
            self.out.extend_from_slice(&frames[start..]);
        }
        frames.clear();
    }

    /// Write queued frames until done (`Ok`) or the socket or rustls is full (`WouldBlock`).
    pub fn push_frames(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            let r = match &mut self.io {
                Io::Plain(p) => p.wire.write(&self.out[self.out_pos..]),
                Io::Tls(t) => t.write(&self.out[self.out_pos..]),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        match &mut self.io {
            Io::Plain(_) => Ok(()),
            // The last records rustls made from them.
            Io::Tls(t) => t.flush(),
        }
    }

    /// Queue TLS close_notify (after the WebSocket Close, so the peer sees a clean end) and
    /// try to send it; `WouldBlock` if it still has to be flushed.
    pub fn close_notify(&mut self) -> io::Result<()> {
        self.push_frames()?;
        match &mut self.io {
            Io::Plain(_) => Ok(()),
            Io::Tls(t) => {
                t.conn.send_close_notify();
                t.flush()
            }
        }
    }

    /// Shut the TCP socket down in both directions (after close_notify was flushed).
    pub fn shutdown(&self) {
        // NotConnected just means the peer beat us to it.
        let _ = self.tcp().shutdown(Shutdown::Both);
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.io {
            Io::Plain(p) => p.wire.read(buf),
            Io::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Transport {
    /// tungstenite's own frames: only after every queued frame is out.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out_pos < self.out.len() {
            self.push_frames()?;
        }
        match &mut self.io {
            Io::Plain(p) => p.wire.write(buf),
            Io::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push_frames()?;
        match &mut self.io {
            Io::Plain(_) => Ok(()),
            Io::Tls(t) => t.flush(),
        }
    }
}
