//! Loopback ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Ports are handed out from below Linux's ephemeral range (32768–60999), so a port we pick is
/// never taken meanwhile by the kernel as the source port of some outgoing connection.
const PORT_LO: u32 = 20_000;
const PORT_HI: u32 = 32_000;

static NEXT: AtomicU32 = AtomicU32::new(0);
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that is free now and not handed out before in this process.
///
/// Test binaries run one after another, tests within one in parallel: the in-process set keeps
/// parallel tests apart, the pid-derived starting point keeps consecutive binaries apart (a port
/// in TIME_WAIT from the previous binary is still skipped by the bind check).
pub fn free_port() -> u16 {
    let span = PORT_HI - PORT_LO;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(PORT_LO + (start + n) % span).expect("port range fits u16");
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {PORT_LO}..{PORT_HI}");
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Polls until `addr` accepts a TCP connection; false after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    crate::wait_until(timeout, || port_open(addr))
}

pub(crate) fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
