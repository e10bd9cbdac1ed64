//! # nowconnect-core
//!
//! The NowConnect wire protocol (`shared/spec/wire-protocol.md`) as a pure, deterministic state
//! machine: the frame codec ([`frame`]) and the [`Session`] of either side — handshake, streams
//! with credit flow control and window auto-tuning, half-close, reset, liveness, idle sweeper,
//! GOAWAY drain, RENEW and HEALTH.
//!
//! What it does **not** do: sockets, TLS, WebSocket framing, threads, clocks. Time comes in as an
//! [`Instant`] argument; bytes come in as whole WebSocket messages and go out as buffers the
//! caller sends. The same inputs always give the same outputs, which is what the replay tests and
//! fuzz targets rely on. `nowconnect-runtime` drives it with blocking I/O.
//!
//! ## A blocking run loop
//!
//! ```no_run
//! # use nowconnect_core::{Session, Event, Instant};
//! # fn now() -> Instant { Instant::from_millis(0) }
//! # fn recv_message_until(_: Option<Instant>) -> Option<Vec<u8>> { None }
//! # fn send_message(_: &[u8]) {}
//! # fn run(mut session: Session) {
//! let mut out = Vec::new();
//! loop {
//!     // 1. Drain every output after every input.
//!     while session.poll_transmit(now(), &mut out) {
//!         send_message(&out); // one WebSocket binary message
//!         out.clear();
//!     }
//!     while let Some(ev) = session.poll_event() {
//!         match ev {
//!             Event::Data { cid, data } => { /* write to the socket, then: */
//!                 session.release(now(), cid, data.len()); }
//!             Event::SessionClosed { .. } => return,
//!             _ => {}
//!         }
//!     }
//!     // 2. Sleep until the next message or timer.
//!     match recv_message_until(session.poll_timeout()) {
//!         Some(msg) => session.handle_message(now(), &msg),
//!         None => session.handle_timeout(now()),
//!     }
//! }
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codes;
pub mod config;
pub mod event;
pub mod frame;
pub mod json;
mod session;
mod stream;
pub mod time;

#[cfg(any(test, feature = "testing"))]
pub mod fuzzing;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(any(test, feature = "testing"))]
pub mod transcript;

pub use bytes::Bytes;
pub use codes::{close, Code, Side};
pub use config::Config;
pub use core::time::Duration;
pub use event::Event;
pub use frame::{DecodeError, Frame};
pub use json::{BackendHealth, ConnectorHealth, HealthReport, Hello, HelloAck, Rejected, RenewAck};
pub use session::{OpenError, Session};
pub use time::Instant;
