//! What a session tells its driver (`Session::poll_event`).

use bytes::Bytes;

use crate::codes::Code;
use crate::json::{HealthReport, Hello, HelloAck};

/// An event for the driver. Stream events name the stream by `cid`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Event {
    /// Hub: the agent's HELLO. Answer with `accept_hello` or `close`.
    Hello(Hello),
    /// Agent: HELLO_ACK arrived; the session is established.
    Established(HelloAck),
    /// Agent: the hub opened a stream. Connect a target, then `accept_stream` or `reset`.
    OpenRequest {
        /// Stream id.
        cid: u32,
        /// Connector the client connected to.
        connector: String,
        /// Client address, for logs.
        peer: String,
    },
    /// Hub: the agent connected the target (OPEN_OK).
    Opened {
        /// Stream id.
        cid: u32,
        /// Target the agent connected (may be empty).
        backend: String,
    },
    /// Payload from the peer. Write it to the local socket, then `release` the bytes written.
    Data {
        /// Stream id.
        cid: u32,
        /// The bytes, in order (a slice of the received message when it came through
        /// `handle_message_bytes`).
        data: Bytes,
    },
    /// Credit came back for a stream whose send capacity had run out.
    Writable {
        /// Stream id.
        cid: u32,
    },
    /// The peer sent FIN after all its data: shut down the local socket's write half.
    Finished {
        /// Stream id.
        cid: u32,
    },
    /// The stream was aborted: close the local socket abortively.
    Reset {
        /// Stream id.
        cid: u32,
        /// Why (§8).
        code: Code,
        /// Peer's or local reason text.
        reason: String,
        /// True when the peer sent RST; false when this side reset it (error, timeout, death).
        remote: bool,
    },
    /// Both directions finished cleanly; the stream is gone.
    StreamClosed {
        /// Stream id.
        cid: u32,
    },
    /// Hub: the agent's connector health (§6).
    Health(HealthReport),
    /// Hub: the agent sent a fresh token. Validate, then `renew_ack` or `goaway(FORBIDDEN)`.
    Renew {
        /// The JWT (never log it).
        token: String,
    },
    /// Agent: the hub accepted the renewed token.
    RenewAck {
        /// New expiry, Unix seconds.
        exp: u64,
    },
    /// The peer is draining: no new streams above `last_cid`.
    GoAway {
        /// §8 code.
        code: Code,
        /// Highest cid the peer opened or accepted.
        last_cid: u32,
        /// Reason text.
        reason: String,
    },
    /// The session ended; always the last event. Close the WebSocket with `code`.
    SessionClosed {
        /// WebSocket close code (§7).
        code: u16,
        /// Reason, also for the close frame.
        reason: String,
    },
}
