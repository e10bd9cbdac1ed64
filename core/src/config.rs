//! Session limits and timers (wire-protocol.md §9).

use core::time::Duration;

use crate::frame::{DEFAULT_MAX_FRAME, DEFAULT_MAX_MESSAGE};

/// Largest credit a stream may hold (§4: a WINDOW raising credit above 2^31−1 is an error).
pub const MAX_CREDIT: u64 = (1 << 31) - 1;

/// Limits and timers of one session. `Default` gives the §9 defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Our initial receive window per stream, advertised in HELLO (agent) or HELLO_ACK (hub).
    pub window: u32,
    /// Auto-tuning ceiling of one stream's receive window.
    pub max_window: u32,
    /// Budget for the sum of all streams' receive windows beyond their initial window.
    pub max_buffered: u64,
    /// Most bytes one stream may hold accepted but not yet framed, whatever its credit. Credit
    /// bounds what is in flight; this bounds what waits in our own memory for the tunnel, so
    /// a stream with a large auto-tuned window does not park megabytes behind a busy tunnel
    /// (the driver reads from its socket again as the queue drains).
    pub max_unsent: u32,
    /// Largest DATA payload. The hub advertises it; the agent adopts HELLO_ACK's value.
    pub max_frame: u32,
    /// Largest WebSocket message accepted and produced.
    pub max_message: usize,
    /// Agent: most concurrent streams it accepts (advertised). Hub: `max_streams_per_tunnel`.
    pub max_streams: u32,
    /// Deadline for HELLO (hub) or HELLO_ACK (agent) after the upgrade.
    pub hello_timeout: Duration,
    /// Hub: an OPEN unanswered this long is reset with CONNECT_TIMEOUT.
    pub open_timeout: Duration,
    /// PING after this long without sending; dead after 3× without receiving (§5).
    pub heartbeat: Duration,
    /// Drain grace after a GOAWAY.
    pub shutdown_grace: Duration,
    /// Default idle timeout of a stream (`None` disables); per-stream overrides exist.
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window: 256 * 1024,
            max_window: 16 * 1024 * 1024,
            max_buffered: 256 * 1024 * 1024,
            max_unsent: 256 * 1024,
            max_frame: DEFAULT_MAX_FRAME,
            max_message: DEFAULT_MAX_MESSAGE,
            max_streams: 10_000,
            hello_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(15),
            heartbeat: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}
