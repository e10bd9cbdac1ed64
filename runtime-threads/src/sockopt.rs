//! Socket options the protocol relies on (wire-protocol.md §4) and the process fd limit.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource};
use socket2::{SockRef, TcpKeepalive};

/// First keepalive probe after this much silence; then every [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Interval between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel declares the peer gone (≈ 2 min to notice in total).
pub const KEEPALIVE_RETRIES: u32 = 6;

/// Options for a client or target socket carried by a stream: no Nagle delay (interactive
/// protocols, and our own batching happens above), and keepalive so a peer that vanished
/// without a FIN is noticed even with the idle timeout off (§4 "Half-close and reset").
pub fn tune_stream_socket(tcp: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(tcp);
    sock.set_tcp_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    sock.set_tcp_keepalive(&keepalive)
}

/// Options for the tunnel's own socket: no Nagle (frames are already batched into one message
/// per write) and keepalive as a backstop under the protocol's PING/PONG.
pub fn tune_tunnel_socket(tcp: &TcpStream) -> io::Result<()> {
    tune_stream_socket(tcp)
}

/// Arrange for the next close of `tcp` to send a TCP RST instead of a FIN (SO_LINGER 0), so
/// the far peer sees a reset, not a clean EOF (§4: a side that receives RST closes abortively).
pub fn set_abortive_close(tcp: &TcpStream) {
    // Failing only means the socket is already dead, which is the outcome we want anyway.
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Close `tcp` abortively (RST).
pub fn abort(tcp: TcpStream) {
    set_abortive_close(&tcp);
    drop(tcp);
}

/// Raise the soft RLIMIT_NOFILE to the hard limit: every stream costs a socket and an eventfd,
/// and the usual soft limit of 1024 would cap a hub near 500 streams. Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current.unwrap_or(u64::MAX));
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum.unwrap_or(u64::MAX))
}
