//! One stream's state: its send half (buffer, credit, seq, FIN) and receive half (window
//! accounting, seq, FIN) — wire-protocol.md §4.

use std::collections::VecDeque;

use core::time::Duration;

use crate::event::Event;
use crate::time::Instant;

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Hub: OPEN sent, no OPEN_OK yet. Agent: OPEN received, the driver is connecting.
    Opening,
    /// OPEN_OK exchanged.
    Open,
}

/// Send half: bytes accepted from the driver, not yet framed. Every buffered byte already has
/// credit (`send` accepts at most `credit - buffered`), so a stream in the ready queue can
/// always make progress.
#[derive(Debug)]
pub(crate) struct SendHalf {
    pub buf: VecDeque<u8>,
    /// Bytes the peer still lets us send (granted − sent), ≤ `MAX_CREDIT`.
    pub credit: u64,
    pub seq: u32,
    /// `finish` was called: FIN goes out after `buf` drains.
    pub fin_queued: bool,
    pub fin_sent: bool,
    /// The driver saw zero capacity; tell it when credit returns.
    pub blocked: bool,
}

impl SendHalf {
    /// Bytes `send` may still accept.
    pub fn capacity(&self) -> usize {
        if self.fin_queued {
            return 0;
        }
        let free = self.credit.saturating_sub(self.buf.len() as u64);
        usize::try_from(free).unwrap_or(usize::MAX)
    }

    /// Whether the scheduler has something to put on the wire for this stream.
    pub fn wants_transmit(&self) -> bool {
        !self.buf.is_empty() || (self.fin_queued && !self.fin_sent)
    }
}

/// Receive half. Invariant: `credit + buffered + released == window`
/// (`released`: written to the socket by the driver, not yet returned with WINDOW).
#[derive(Debug)]
pub(crate) struct RecvHalf {
    pub seq: u32,
    /// Current receive window (grows with auto-tuning).
    pub window: u64,
    /// Bytes the peer may still send.
    pub credit: u64,
    /// Bytes received and handed to the driver, not yet released.
    pub buffered: u64,
    /// Bytes released by the driver, not yet returned to the peer.
    pub released: u64,
    pub fin: bool,
    /// When the last WINDOW was sent (auto-tuning measures how fast a window drains).
    pub last_update: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub phase: Phase,
    pub opened_at: Instant,
    pub last_activity: Instant,
    pub idle_timeout: Option<Duration>,
    pub tx: SendHalf,
    pub rx: RecvHalf,
    /// Agent: events held while the driver connects the target (pipelined DATA, FIN).
    pub held: Vec<Event>,
    /// In the session's round-robin ready queue.
    pub queued: bool,
}

impl Stream {
    pub fn new(
        now: Instant,
        phase: Phase,
        send_credit: u32,
        recv_window: u32,
        idle: Option<Duration>,
    ) -> Self {
        Stream {
            phase,
            opened_at: now,
            last_activity: now,
            idle_timeout: idle,
            tx: SendHalf {
                buf: VecDeque::new(),
                credit: u64::from(send_credit),
                seq: 0,
                fin_queued: false,
                fin_sent: false,
                blocked: false,
            },
            rx: RecvHalf {
                seq: 0,
                window: u64::from(recv_window),
                credit: u64::from(recv_window),
                buffered: 0,
                released: 0,
                fin: false,
                last_update: None,
            },
            held: Vec::new(),
            queued: false,
        }
    }

    /// Both FINs exchanged and nothing left to send: the stream is done (§4).
    pub fn is_finished(&self) -> bool {
        self.tx.fin_sent && self.rx.fin && self.tx.buf.is_empty()
    }
}
