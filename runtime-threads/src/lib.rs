//! nowconnect-runtime: drives one core [`Session`](nowconnect_core::Session) per tunnel with
//! blocking std::net I/O, one thread per socket. Shared by the hub and the agent.
//!
//! # Threads
//!
//! ```text
//!  client/target    socket thread "nc-stream-<cid>"            tunnel thread "nc-tunnel-<id>"
//!  TCP socket       (one per socket, both directions)          (one per tunnel: WebSocket + Session)
//!
//!   ◀── write ───── inbox: DATA, FIN, RST ◀──── deliver + wake ──── Session events
//!   ─── read ─────▶ StreamCommand: Data, Finish, ── bounded queue ─▶ Session::send / finish /
//!      (≤ credit)   Reset, Release, Accept            + wake          reset / release / accept_stream
//!                   credit (atomic) ◀──────────── grant + wake ──── Session::send_capacity
//!
//!   poll(2): socket (IN while credit > 0,        poll(2): WS socket (IN always, OUT while
//!            OUT while bytes to write) + waker            unflushed) + waker; timeout =
//!                                                          Session::poll_timeout()
//!
//!  application ── TunnelHandle: unbounded control queue + wake ──▶ tunnel thread
//!  application ◀── TunnelHandler callbacks (run on the tunnel thread) ── tunnel thread
//! ```
//!
//! - One thread per socket, owning both directions; one per tunnel owning the WebSocket
//!   (plain or [`Transport`] TLS whose read never writes and write never reads) and the session.
//! - The tunnel thread never waits on a socket thread: received DATA goes into the stream's
//!   inbox, which never holds more than the window this side granted (credit comes back only
//!   after the bytes reached the socket); send credit is published in an atomic the socket
//!   thread consumes, so `Session::send` always takes a whole hand-off and a stream without
//!   credit simply stops reading its socket.
//! - Wake-ups are eventfds ([`Waker`]); a burst of hand-offs costs one eventfd write.
//! - Budget per stream and side: one thread (~11 KiB RSS when idle, measured in release), its
//!   socket and its eventfd — two fds, so call [`sockopt::raise_fd_limit`] at start and give
//!   the process an `RLIMIT_NOFILE` above twice the streams it should carry.
//!
//! # Use
//!
//! Hub: accept TCP, [`Transport::tls_server`], [`ws::accept`] with a decision on path and
//! headers, `Session::new_hub(config, now())`, [`Tunnel::spawn`] with a [`TunnelHandler`]
//! that answers `on_hello` via [`TunnelHandle::accept_hello`]; then for each client of a
//! connector, [`TunnelHandle::open_stream`].
//!
//! Agent: dial TCP, [`Transport::tls_client`], [`ws::connect`] with the bearer token,
//! `Session::new_agent(config, hello, now())`, [`Tunnel::spawn`] with a handler whose
//! `on_open_request` connects the target on a [`spawn_stream_thread`] thread and calls
//! [`OpenRequest::accept`] there (that thread becomes the stream's socket thread).

pub mod admin;
pub mod cli;
pub mod conf;
pub mod logging;
pub mod metrics;

mod clock;
mod command;
mod handle;
pub mod sockopt;
mod stream;
mod tls;
mod tunnel;
mod waker;
pub mod ws;

pub use clock::{now, until};
pub use handle::{OpenRequest, StreamEnd, TunnelHandle, TunnelHandler};
pub use stream::{spawn_stream_thread, STREAM_STACK_SIZE};
pub use tls::{install_crypto_provider, PlainStream, TlsStream, Transport};
pub use tunnel::{Tunnel, TunnelEnd, CONNECTION_LOST, TUNNEL_STACK_SIZE};
pub use waker::Waker;
