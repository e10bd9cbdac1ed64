//! The servers the benchmark runs in-process: the target, the plain two-hop relay baseline and
//! the delay relay that stands in for a 50 ms WAN between agent and hub.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Bulk buffer size of the target and the relays.
pub const CHUNK: usize = 256 * 1024;
/// Echo buffer (small: 10 000 idle echo connections each hold one).
const ECHO_BUF: usize = 16 * 1024;
/// Stack of a per-connection server thread (10 000 of them for the idle-stream test).
const STACK: usize = 64 * 1024;

fn spawn_small<F: FnOnce() + Send + 'static>(f: F) {
    // A failed spawn only drops that connection; the measurement then reports the failure.
    let _ = thread::Builder::new().stack_size(STACK).spawn(f);
}

fn accept_loop(l: TcpListener, handler: fn(TcpStream)) {
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            spawn_small(move || handler(c));
        }
    });
}

/// A target that, per connection, reads a 1-byte mode: `s` = sink (read to EOF, then reply
/// with the byte count as 8 bytes), `g` + u64 = generate that many bytes then close, `e` = echo.
pub fn start_target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = l.local_addr().expect("target addr");
    accept_loop(l, serve_target);
    addr
}

fn serve_target(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let mut mode = [0u8; 1];
    if c.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        b's' => {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0u64;
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = c.write_all(&n.to_be_bytes());
        }
        b'g' => {
            let buf = vec![0x5au8; CHUNK];
            let mut len = [0u8; 8];
            if c.read_exact(&mut len).is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(len);
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                if c.write_all(&buf[..k]).is_err() {
                    return;
                }
                left -= k as u64;
            }
            let _ = c.shutdown(Shutdown::Write);
        }
        _ => {
            let mut buf = vec![0u8; ECHO_BUF];
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 || c.write_all(&buf[..k]).is_err() {
                    break;
                }
            }
        }
    }
}

/// Copy `from` → `to` until EOF, then pass the EOF on (half-close).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn relay_conn(client: TcpStream, upstream: SocketAddr) {
    let Ok(up) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) else {
        return;
    };
    spawn_small(move || pump(c2, u2));
    pump(up, client);
}

/// One relay hop: per connection, dial `upstream` and copy bytes both ways with one thread per
/// direction (plain read/write, no framing, no TLS).
pub fn start_relay(upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = l.local_addr().expect("relay addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            spawn_small(move || relay_conn(c, upstream));
        }
    });
    addr
}

/// The two-hop baseline: client → relay → relay → `target`.
pub fn start_two_hop(target: SocketAddr) -> SocketAddr {
    start_relay(start_relay(target))
}

/// Forward `from` → `to`, each chunk `delay` after it was read, with no bandwidth limit (an
/// unbounded queue between a reader and a writer thread).
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if tx
                    .send((Instant::now() + delay, buf[..k].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A relay that delays every chunk by `one_way` in each direction: put between agent and hub
/// it makes a `2 × one_way` round trip (netem is not available on this kernel).
pub fn start_delay_relay(upstream: SocketAddr, one_way: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind delay relay");
    let addr = l.local_addr().expect("delay relay addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            thread::spawn(move || {
                let Ok(up) = TcpStream::connect(upstream) else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) else {
                    return;
                };
                let t = thread::spawn(move || delayed_pump(c2, u2, one_way));
                delayed_pump(up, client, one_way);
                let _ = t.join();
            });
        }
    });
    addr
}

/// Connect with TCP_NODELAY.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    Ok(c)
}
