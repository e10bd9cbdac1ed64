//! One stream's state: its send half (buffer, credit, seq, FIN) and receive half (window
//! accounting, seq, FIN) — wire-protocol.md §4.

use std::collections::VecDeque;

use core::time::Duration;

use crate::event::Event;
use crate::frame::extend_payload;
use crate::time::Instant;

/// A chunk this small is copied into the queue's tail instead of being kept as its own chunk,
/// so many tiny sends cannot each hold an allocation (memory stays near the bytes queued).
const COALESCE_BELOW: usize = 4096;
/// Capacity of a chunk started for copied bytes: small sends coalesce into it.
const COPY_CHUNK: usize = 16 * 1024;

/// Emptied send chunks a session keeps for [`Session::take_spare_buffer`](crate::Session).
pub(crate) const SPARE_BUFFERS: usize = 16;

/// A stream's unsent bytes: owned chunks, in order, the front one consumed from `head`.
///
/// Bulk data handed over as a `Vec` is queued as is (no copy until it is framed); small pieces
/// are copied into a tail chunk. Chunks are freed as they are framed, so an idle stream holds
/// no send memory.
#[derive(Debug, Default)]
pub(crate) struct TxQueue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already framed.
    head: usize,
    len: usize,
}

impl TxQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a copy of `data`.
    pub fn push_slice(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if let Some(tail) = self.chunks.back_mut() {
            if tail.capacity() - tail.len() >= data.len() {
                extend_payload(tail, data);
                return;
            }
        }
        let mut chunk = Vec::with_capacity(data.len().max(COPY_CHUNK));
        extend_payload(&mut chunk, data);
        self.chunks.push_back(chunk);
    }

    /// Appends `data`, without a copy unless it is small.
    pub fn push_vec(&mut self, mut data: Vec<u8>) {
        if data.len() < COALESCE_BELOW {
            return self.push_slice(&data);
        }
        if data.capacity() > 2 * data.len() {
            // A short read into a big buffer: keep memory near the bytes queued.
            data.shrink_to_fit();
        }
        self.len += data.len();
        self.chunks.push_back(data);
    }

    /// Moves up to `n` bytes from the front to `out`; chunks emptied go to `spare` (cleared)
    /// while it holds fewer than [`SPARE_BUFFERS`], for the driver to read into again.
    pub fn take_into(&mut self, out: &mut Vec<u8>, mut n: usize, spare: &mut Vec<Vec<u8>>) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let piece = (front.len() - self.head).min(n);
            extend_payload(out, &front[self.head..self.head + piece]);
            self.head += piece;
            n -= piece;
            if self.head == front.len() {
                if let Some(mut chunk) = self.chunks.pop_front() {
                    if spare.len() < SPARE_BUFFERS {
                        chunk.clear();
                        spare.push(chunk);
                    }
                }
                self.head = 0;
            }
        }
    }
}

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
    pub buf: TxQueue,
    /// Bytes the peer still lets us send (granted − sent), ≤ `MAX_CREDIT`.
    pub credit: u64,
    pub seq: u32,
    /// `finish` was called: FIN goes out after `buf` drains.
    pub fin_queued: bool,
    pub fin_sent: bool,
    /// The driver saw zero capacity; tell it when credit returns or the queue drains.
    pub blocked: bool,
    /// Most bytes `buf` may hold (`Config::max_unsent`).
    pub limit: u64,
}

impl SendHalf {
    /// Bytes `send` may still accept.
    pub fn capacity(&self) -> usize {
        if self.fin_queued {
            return 0;
        }
        let free = self
            .credit
            .min(self.limit)
            .saturating_sub(self.buf.len() as u64);
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
    /// Agent: pipelined DATA held while the driver connects the target.
    pub held_data: Vec<u8>,
    /// Agent: other events held meanwhile (after `held_data`: Writable, FIN).
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
        max_unsent: u32,
        idle: Option<Duration>,
    ) -> Self {
        Stream {
            phase,
            opened_at: now,
            last_activity: now,
            idle_timeout: idle,
            tx: SendHalf {
                buf: TxQueue::default(),
                credit: u64::from(send_credit),
                seq: 0,
                fin_queued: false,
                fin_sent: false,
                blocked: false,
                limit: u64::from(max_unsent.max(1)),
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
            held_data: Vec::new(),
            held: Vec::new(),
            queued: false,
        }
    }

    /// Both FINs exchanged and nothing left to send: the stream is done (§4).
    pub fn is_finished(&self) -> bool {
        self.tx.fin_sent && self.rx.fin && self.tx.buf.is_empty()
    }
}
