//! What other threads hand the tunnel thread. Two queues, both drained on every wake-up:
//!
//! - **stream commands** (bounded): from socket threads — data, FIN, RST, release, accept. A
//!   socket thread may block briefly on a full queue; the tunnel thread never waits on a stream
//!   thread, so that cannot deadlock, and credit bounds what is queued anyway.
//! - **control** (unbounded): session-level commands from the application, including from
//!   handler callbacks that run *on* the tunnel thread (which must never block on its own
//!   queue). They are rare and small.

use std::net::TcpStream;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{SendError, Sender};
use nowconnect_core::{Code, HealthReport, HelloAck};

use crate::stream::{BufPool, StreamLink};
use crate::tunnel::TunnelThread;
use crate::waker::Waker;

/// Capacity of the stream-command queue. Big enough that socket threads rarely wait; small
/// enough to be a real bound.
pub(crate) const STREAM_QUEUE: usize = 4096;

/// From a socket thread about its own stream.
#[derive(Debug)]
pub(crate) enum StreamCommand {
    /// Bytes read from the local socket, within the credit the tunnel thread published.
    Data { cid: u32, data: Vec<u8> },
    /// Local EOF: send FIN after the data.
    Finish { cid: u32 },
    /// The local socket failed (ECONNRESET, EPIPE…): RST the stream.
    Reset {
        cid: u32,
        code: Code,
        reason: &'static str,
    },
    /// `n` bytes of received DATA reached the local socket: return the credit.
    Release { cid: u32, n: usize },
    /// Agent: the target is connected; this thread now runs the stream. Sent on the same queue
    /// as the stream's first DATA so the tunnel thread registers the stream before it.
    Accept {
        cid: u32,
        link: Arc<StreamLink>,
        backend: String,
        idle_timeout: Option<Option<Duration>>,
    },
}

/// Session-level commands from the application (see [`TunnelHandle`](crate::TunnelHandle)).
#[derive(Debug)]
pub(crate) enum Control {
    /// Hub: open a stream for an accepted client.
    Open {
        client: TcpStream,
        connector: String,
        peer: String,
        idle_timeout: Option<Duration>,
        /// When the hub accepted the client (the open latency runs from here).
        accepted: Instant,
    },
    /// Agent: refuse an OPEN (RST).
    Refuse {
        cid: u32,
        code: Code,
        reason: String,
    },
    AcceptHello(HelloAck),
    RenewAck(u64),
    Renew(String),
    Health(HealthReport),
    GoAway(Code, String),
    Close(u16, String),
}

/// The sending end a socket thread holds: the stream-command queue plus the tunnel's waker.
#[derive(Debug, Clone)]
pub(crate) struct TunnelPort {
    pub tx: Sender<StreamCommand>,
    pub waker: Arc<Waker>,
    /// Read buffers shared by the tunnel's socket threads.
    pub pool: Arc<BufPool>,
    /// The tunnel's state, for direct turns (gone once the tunnel thread has ended).
    pub direct: Weak<Mutex<TunnelThread>>,
}

impl TunnelPort {
    /// Queue `cmd` (waiting while the queue is full) and wake the tunnel thread.
    /// `Err` means the tunnel has ended.
    pub fn send(&self, cmd: StreamCommand) -> Result<(), SendError<StreamCommand>> {
        let Err(cmd) = self.try_direct(cmd) else {
            return Ok(());
        };
        // Wake first when the queue is full so the tunnel drains it while we wait.
        if self.tx.is_full() {
            self.waker.wake();
        }
        self.tx.send(cmd)?;
        self.waker.wake();
        Ok(())
    }

    /// When nobody holds the tunnel's state, run the command there on this thread (framing
    /// and writing what it makes) instead of waking the tunnel thread: one hand-off less on
    /// the way out. Commands still queued go first, so a stream's order holds.
    fn try_direct(&self, cmd: StreamCommand) -> Result<(), StreamCommand> {
        let Some(shared) = self.direct.upgrade() else {
            return Err(cmd);
        };
        let Ok(mut t) = shared.try_lock() else {
            return Err(cmd);
        };
        if !t.accepts_direct() {
            return Err(cmd);
        }
        t.direct_turn(cmd);
        Ok(())
    }
}
