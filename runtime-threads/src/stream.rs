//! One thread per client (hub) or target (agent) socket, owning both directions of it
//! (DESIGN.md "Threads"). It polls the socket — readable only while its stream has credit,
//! writable only while it has bytes to write — and its own waker.
//!
//! Hand-offs with the tunnel thread:
//! - tunnel → socket: [`StreamLink`]: published credit (an atomic), and an inbox of received
//!   DATA / FIN / RST behind a mutex held for a push or a swap only. The inbox needs no bound of
//!   its own: the session emits DATA only within the receive window this side granted, and
//!   credit comes back only after the bytes left the inbox (release), so it never holds more
//!   than one window.
//! - Fast path: while the socket thread has nothing queued to write, the tunnel thread writes
//!   received DATA to the (nonblocking) socket itself, under the inbox lock, and releases the
//!   credit at once — no wake-up, no hand-off, no release command. Whatever the socket does not
//!   take goes to the inbox as before. The socket thread marks the inbox `writing` while it
//!   holds unwritten bytes, so the two never interleave.
//! - socket → tunnel: [`StreamCommand`]s, run on this thread as a direct turn when the
//!   tunnel's state is free ([`TunnelPort::send`]), else on the bounded queue, plus a wake.

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use nowconnect_core::Code;
use rustix::event::{poll, PollFd, PollFlags};

use crate::command::{StreamCommand, TunnelPort};
use crate::sockopt;
use crate::waker::Waker;

/// Stack of a socket thread. Only touched pages cost memory; the loop below needs a few KiB.
/// 10 000 streams per hub is a design point (DESIGN.md).
pub const STREAM_STACK_SIZE: usize = 128 * 1024;

/// Largest single read from a local socket (one DATA hand-off; the session splits it into
/// `max_frame` chunks).
const MAX_READ: usize = 64 * 1024;
/// Smallest read buffer: interactive streams read a few bytes at a time.
const MIN_READ: usize = 4 * 1024;
/// Reads per loop turn before the thread looks at its inbox and writes again.
const READS_PER_TURN: usize = 16;

/// Socket threads that finished a stream wait this long for the next one before they exit.
const PARKED_FOR: Duration = Duration::from_secs(1);
/// At most this many wait (per process); more exit at once.
const MAX_PARKED: usize = 64;
/// Name of a waiting socket thread (not counted as a stream's).
const PARKED_NAME: &CStr = c"nc-parked";

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Where a parked socket thread finds its next stream: the thread name and what to run.
type Slot = Mutex<Option<(String, Job)>>;

/// A socket thread waiting for its next stream. It is woken with `unpark`, a futex wake: a
/// channel's receive would spin and `sched_yield` first, which under connection churn cost
/// more than the hand-off itself.
struct Parked {
    id: u64,
    thread: thread::Thread,
    slot: Arc<Slot>,
}

/// Socket threads that finished a stream and wait for another.
static PARKED: Mutex<Vec<Parked>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn parked() -> std::sync::MutexGuard<'static, Vec<Parked>> {
    PARKED.lock().unwrap_or_else(PoisonError::into_inner)
}

fn take_job(slot: &Slot) -> Option<(String, Job)> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// Run `f` on a socket thread named `name`, with the small stack socket threads use: one that
/// finished a stream within the last second if there is one, else a new one. Creating and
/// ending a thread per stream on each side was ~18 % of the socket threads' CPU under
/// connection churn. The agent runs its target connect on one and then
/// [`OpenRequest::accept`](crate::OpenRequest::accept)s there, so that thread becomes the
/// stream's socket thread.
pub fn spawn_stream_thread<F>(name: String, f: F) -> io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    // Off the list means it is ours: a parked thread that times out only exits if it can
    // still remove itself, otherwise it waits for the job on its way.
    if let Some(worker) = parked().pop() {
        *worker.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some((name, Box::new(f)));
        worker.thread.unpark();
        return Ok(());
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    thread::Builder::new()
        .name(name)
        .stack_size(STREAM_STACK_SIZE)
        .spawn(move || socket_worker(id, Box::new(f)))
        .map(drop)
}

/// A socket thread: run the job, then wait up to [`PARKED_FOR`] for the next one.
fn socket_worker(id: u64, mut job: Job) {
    let slot: Arc<Slot> = Arc::default();
    loop {
        job();
        {
            let mut parked = parked();
            if parked.len() >= MAX_PARKED {
                return;
            }
            let _ = rustix::thread::set_name(PARKED_NAME);
            parked.push(Parked {
                id,
                thread: thread::current(),
                slot: slot.clone(),
            });
        }
        let deadline = std::time::Instant::now() + PARKED_FOR;
        let mut on_its_way = false;
        let next = loop {
            if let Some(next) = take_job(&slot) {
                break next;
            }
            let now = std::time::Instant::now();
            if on_its_way {
                thread::park();
            } else if now < deadline {
                thread::park_timeout(deadline - now);
            } else {
                let mut parked = parked();
                if let Some(pos) = parked.iter().position(|p| p.id == id) {
                    parked.swap_remove(pos);
                    return;
                }
                // Taken off the list just now: its job is on the way.
                on_its_way = true;
            }
        };
        if let Ok(name) = CString::new(next.0) {
            let _ = rustix::thread::set_name(&name);
        }
        job = next.1;
    }
}

/// Buffers (capacity [`MAX_READ`]) going round between socket threads and tunnel threads:
/// socket reads handed over whole and given back by the session once framed, and DATA
/// remainders a tunnel thread queues for a socket thread, given back once written.
/// Recycling them keeps bulk transfer off the allocator, which otherwise returns freed
/// 64 KiB buffers to the kernel and faults fresh pages in per read.
#[derive(Debug, Default)]
pub(crate) struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

/// Buffers the pool keeps (4 MiB of 64 KiB buffers); more are freed. One pool serves every
/// tunnel of the process, so this is the most it holds after a burst, however many tunnels.
/// Bulk streams keep up to `max_unsent` (256 KiB, 4 buffers) each in flight: 64 buffers
/// cover 16 busy streams without a page fault per read.
const POOL_BUFFERS: usize = 64;

impl BufPool {
    /// The process's pool.
    pub fn shared() -> Arc<BufPool> {
        static POOL: OnceLock<Arc<BufPool>> = OnceLock::new();
        POOL.get_or_init(Arc::default).clone()
    }

    /// An empty buffer with room for a full read.
    fn get(&self) -> Vec<u8> {
        let spare = self
            .bufs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        spare.unwrap_or_else(|| Vec::with_capacity(MAX_READ))
    }

    /// Back into the pool, if it is one of ours and there is room.
    pub fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() != MAX_READ {
            return;
        }
        buf.clear();
        let mut bufs = self.bufs.lock().unwrap_or_else(PoisonError::into_inner);
        if bufs.len() < POOL_BUFFERS {
            bufs.push(buf);
        }
    }
}

/// What the tunnel thread has for a socket thread.
#[derive(Debug, Default)]
struct Inbox {
    data: VecDeque<Vec<u8>>,
    /// Peer FIN, after all of `data`.
    finished: bool,
    /// RST (either side) or session death: close abortively now.
    reset: bool,
    /// The socket, once its thread made it nonblocking and until that thread ends: the tunnel
    /// thread may write to it while holding the lock.
    socket: Option<Arc<TcpStream>>,
    /// The socket thread holds received bytes it has not written yet.
    writing: bool,
}

/// State shared between the tunnel thread and one socket thread.
#[derive(Debug)]
pub(crate) struct StreamLink {
    pub cid: u32,
    pub waker: Waker,
    /// Bytes the socket thread may still read and hand over. The tunnel thread adds what the
    /// session can accept (`send_capacity` minus what is already granted); the socket thread
    /// subtracts what it read. So `Session::send` always accepts a whole hand-off.
    credit: AtomicUsize,
    inbox: Mutex<Inbox>,
}

impl StreamLink {
    pub fn new(cid: u32) -> io::Result<Arc<StreamLink>> {
        Ok(Arc::new(StreamLink {
            cid,
            waker: Waker::new()?,
            credit: AtomicUsize::new(0),
            inbox: Mutex::new(Inbox::default()),
        }))
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // A panic while holding this lock cannot leave the inbox inconsistent (push/swap only).
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tunnel thread: DATA for the local socket. Writes what the socket takes right away if
    /// nothing is queued before it, and returns that many bytes (to release at once); the rest
    /// goes to the socket thread.
    /// The rest is copied into a buffer from `pool` (the socket thread puts it back once
    /// written): `data` may be a slice of a whole received message, which the inbox must not
    /// keep alive, and a fresh allocation freed on another thread faulted pages in on every
    /// bulk delivery (92 % of the tunnel's page faults).
    pub fn deliver(&self, data: &[u8], pool: &BufPool) -> usize {
        let mut inbox = self.inbox();
        let mut written = 0;
        if inbox.data.is_empty() && !inbox.writing && !inbox.reset && !inbox.finished {
            if let Some(socket) = &inbox.socket {
                while written < data.len() {
                    match (&**socket).write(&data[written..]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // WouldBlock, or an error the socket thread reports on its own write.
                        Err(_) => break,
                    }
                }
                if written == data.len() {
                    return written;
                }
            }
        }
        let mut rest = pool.get();
        rest.extend_from_slice(&data[written..]);
        inbox.data.push_back(rest);
        drop(inbox);
        self.waker.wake();
        written
    }

    /// Tunnel thread: peer FIN — shut the socket's write half after the data.
    pub fn finish(&self) {
        self.inbox().finished = true;
        self.waker.wake();
    }

    /// Tunnel thread: abort the socket (SO_LINGER 0).
    pub fn reset(&self) {
        self.inbox().reset = true;
        self.waker.wake();
    }

    /// Tunnel thread: let the socket thread read `n` more bytes.
    pub fn grant(&self, n: usize) {
        // From zero the socket thread has stopped polling for readable: wake it.
        if self.credit.fetch_add(n, Ordering::AcqRel) == 0 {
            self.waker.wake();
        }
    }
}

/// Why a socket thread ended.
enum Exit {
    /// Both directions finished cleanly.
    Done,
    /// Abort the socket (RST to the local peer).
    Abort,
}

/// A socket thread's state.
struct SocketThread {
    link: Arc<StreamLink>,
    socket: Arc<TcpStream>,
    port: TunnelPort,
    /// Received DATA not yet written to the socket; `written` bytes of the front are.
    out: VecDeque<Vec<u8>>,
    written: usize,
    /// Peer FIN received: shut the write half once `out` is empty.
    peer_finished: bool,
    write_closed: bool,
    /// Local EOF seen and FIN requested.
    read_closed: bool,
    read_size: usize,
    /// The socket reported HUP while we wanted neither direction: leave it out of poll until
    /// we do, or poll would return at once forever.
    hung_up: bool,
    /// This thread set the inbox's `writing` flag.
    writing: bool,
    /// The last poll saw the waker readable.
    woken: bool,
}

/// Run a stream's socket thread on the current thread until both directions are done or the
/// stream is reset. Owns `socket`.
pub(crate) fn run(link: Arc<StreamLink>, socket: TcpStream, port: TunnelPort) {
    let cid = link.cid;
    if let Err(e) = socket
        .set_nonblocking(true)
        .and_then(|()| sockopt::tune_stream_socket(&socket))
    {
        log::warn!("stream {cid}: socket setup failed: {e}");
        let _ = port.send(StreamCommand::Reset {
            cid,
            code: Code::INTERNAL,
            reason: "socket setup failed",
        });
        sockopt::abort(socket);
        return;
    }
    let socket = Arc::new(socket);
    link.inbox().socket = Some(socket.clone());
    let mut t = SocketThread {
        link,
        socket,
        port,
        out: VecDeque::new(),
        written: 0,
        peer_finished: false,
        write_closed: false,
        read_closed: false,
        read_size: MIN_READ,
        hung_up: false,
        writing: false,
        woken: true,
    };
    let exit = t.run();
    // The tunnel thread no longer touches the socket; ours is then the last reference, so
    // dropping it closes the socket now.
    t.link.inbox().socket = None;
    let SocketThread { socket, .. } = t;
    match exit {
        Exit::Done => log::trace!("stream {cid}: socket thread done"),
        Exit::Abort => sockopt::set_abortive_close(&socket),
    }
    drop(socket);
}

impl SocketThread {
    fn run(&mut self) -> Exit {
        loop {
            self.link.waker.reset_after_poll(self.woken);
            self.woken = false;
            {
                let mut inbox = self.link.inbox();
                if inbox.reset {
                    return Exit::Abort;
                }
                self.out.append(&mut inbox.data);
                self.peer_finished |= inbox.finished;
                if !self.out.is_empty() {
                    inbox.writing = true;
                    self.writing = true;
                }
            }
            if let Err(exit) = self.write_out() {
                return exit;
            }
            let more = match self.read_in() {
                Ok(more) => more,
                Err(exit) => return exit,
            };
            if self.read_closed && self.write_closed {
                return Exit::Done;
            }
            if !more {
                if let Err(exit) = self.wait() {
                    return exit;
                }
            }
        }
    }

    /// Tell the tunnel thread; if it has ended, the stream is dead.
    fn send(&self, cmd: StreamCommand) -> Result<(), Exit> {
        self.port.send(cmd).map_err(|_| Exit::Abort)
    }

    /// The local peer broke the connection (§4: ECONNRESET → RST RESET_BY_PEER).
    fn local_failure(&self, e: &io::Error) -> Exit {
        let cid = self.link.cid;
        let (code, reason) = match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::TimedOut => (Code::RESET_BY_PEER, "reset by peer"),
            _ => (Code::INTERNAL, "local socket error"),
        };
        log::debug!("stream {cid}: local socket: {e}");
        let _ = self.port.send(StreamCommand::Reset { cid, code, reason });
        Exit::Abort
    }

    /// Write received DATA to the socket until done or it would block; release what was
    /// written (one command per turn, not per write).
    fn write_out(&mut self) -> Result<(), Exit> {
        let mut released = 0;
        let mut failure = None;
        while let Some(front) = self.out.front() {
            match (&*self.socket).write(&front[self.written..]) {
                Ok(n) => {
                    released += n;
                    self.written += n;
                    if self.written == front.len() {
                        if let Some(done) = self.out.pop_front() {
                            self.port.pool.put(done);
                        }
                        self.written = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            return Err(self.local_failure(&e));
        }
        if self.writing && self.out.is_empty() {
            // Caught up: the tunnel thread may write directly again (unless more arrived,
            // which the next turn takes).
            let mut inbox = self.link.inbox();
            if inbox.data.is_empty() {
                inbox.writing = false;
                self.writing = false;
            }
        }
        if released > 0 {
            // No `?`: after a clean close the tunnel may be gone (drained, closed 1000) while
            // this thread still writes the tail; the release no longer matters then. A tunnel
            // that died resets the stream through the inbox instead.
            let _ = self.port.send(StreamCommand::Release {
                cid: self.link.cid,
                n: released,
            });
        }
        if self.out.is_empty() && self.peer_finished && !self.write_closed {
            // §4: peer FIN → shut down our write half; the local peer sees EOF.
            let _ = self.socket.shutdown(Shutdown::Write);
            self.write_closed = true;
        }
        Ok(())
    }

    /// Read within credit and hand the bytes over. `Ok(true)` when the turn budget ran out
    /// with the socket possibly still readable.
    fn read_in(&mut self) -> Result<bool, Exit> {
        let cid = self.link.cid;
        for _ in 0..READS_PER_TURN {
            if self.read_closed {
                return Ok(false);
            }
            let credit = self.link.credit.load(Ordering::Acquire);
            if credit == 0 {
                return Ok(false);
            }
            // Sized to what this stream has been reading lately (an interactive stream does
            // not take 64 KiB per keystroke), within credit. Full-size reads reuse pooled
            // buffers. The read goes into the Vec's spare capacity, so its capacity must be
            // exactly `want`: never more than credit is read.
            let want = credit.min(self.read_size);
            let mut buf = if want == MAX_READ {
                self.port.pool.get()
            } else {
                Vec::with_capacity(want)
            };
            let read = if buf.capacity() == want {
                rustix::io::read(&*self.socket, rustix::buffer::spare_capacity(&mut buf))
                    .map_err(io::Error::from)
            } else {
                // Vec does not promise an exact capacity (it has always been exact): then read
                // into initialized memory of exactly `want` bytes.
                buf = vec![0; want];
                let read = (&*self.socket).read(&mut buf);
                buf.truncate(*read.as_ref().unwrap_or(&0));
                read
            };
            match read {
                Ok(0) => {
                    self.read_closed = true;
                    self.send(StreamCommand::Finish { cid })?;
                    return Ok(false);
                }
                Ok(n) => {
                    self.link.credit.fetch_sub(n, Ordering::AcqRel);
                    if n == self.read_size {
                        self.read_size = (self.read_size * 2).min(MAX_READ);
                    } else if n < self.read_size / 4 {
                        self.read_size = (self.read_size / 2).max(MIN_READ);
                    }
                    self.send(StreamCommand::Data { cid, data: buf })?;
                    if n < want {
                        // Most likely drained; poll says for sure.
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.local_failure(&e)),
            }
        }
        Ok(true)
    }

    /// Sleep until the socket is ready for what we want or the tunnel thread wakes us.
    fn wait(&mut self) -> Result<(), Exit> {
        let mut interest = PollFlags::empty();
        if !self.read_closed && self.link.credit.load(Ordering::Acquire) > 0 {
            interest |= PollFlags::IN;
        }
        if !self.out.is_empty() {
            interest |= PollFlags::OUT;
        }
        if !interest.is_empty() {
            self.hung_up = false;
        }
        let waker = PollFd::new(&self.link.waker, PollFlags::IN);
        let mut fds = [waker, PollFd::new(&*self.socket, interest)];
        // Without interest the socket is still polled, for errors: a client that resets while
        // its stream waits for credit is noticed now, not when credit returns.
        let n = if self.hung_up { 1 } else { 2 };
        match poll(&mut fds[..n], None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                log::error!("stream {}: poll: {e}", self.link.cid);
                return Err(self.local_failure(&e.into()));
            }
        }
        self.woken = !fds[0].revents().is_empty();
        if n == 2 {
            let revents = fds[1].revents();
            if revents.contains(PollFlags::ERR) {
                let e = self
                    .socket
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
                return Err(self.local_failure(&e));
            }
            if revents.contains(PollFlags::HUP) && interest.is_empty() {
                self.hung_up = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn comm() -> String {
        std::fs::read_to_string("/proc/thread-self/comm")
            .expect("comm")
            .trim()
            .to_owned()
    }

    /// A socket thread that finished its stream runs the next one (renamed for it), and exits
    /// after waiting [`PARKED_FOR`] for none. (The only test of this binary that uses the
    /// process-wide parking list.)
    #[test]
    fn finished_socket_threads_are_reused_then_exit() {
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        spawn_stream_thread("nc-stream-a".into(), move || {
            t.send((thread::current().id(), comm())).expect("send");
        })
        .expect("spawn");
        let (first, name) = rx.recv().expect("first job");
        assert_eq!(name, "nc-stream-a");
        wait_for("the thread to park", || parked().len() == 1);
        let t = tx.clone();
        spawn_stream_thread("nc-stream-b".into(), move || {
            t.send((thread::current().id(), comm())).expect("send");
        })
        .expect("spawn");
        let (second, name) = rx.recv().expect("second job");
        assert_eq!(second, first, "the parked thread ran the next stream");
        assert_eq!(name, "nc-stream-b");
        wait_for("the thread to park again", || parked().len() == 1);
        thread::sleep(PARKED_FOR + Duration::from_millis(300));
        assert!(
            parked().is_empty(),
            "an idle socket thread outlived PARKED_FOR"
        );
        spawn_stream_thread("nc-stream-c".into(), move || {
            tx.send((thread::current().id(), comm())).expect("send");
        })
        .expect("spawn");
        let (third, _) = rx.recv().expect("third job");
        assert_ne!(third, first, "a new thread after the parked one exited");
    }
}
