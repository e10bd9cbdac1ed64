//! Side-by-side benchmark: direct loopback vs. through the tunnel (ws:// and wss://), with the
//! real release binaries. Measures single-stream bulk throughput each way and 1-byte round-trip
//! latency (p50/p99), and reports the tunnel as a ratio of direct in the same run.
//!
//! ```sh
//! cargo run --release -p nowconnect-tests --bin nowconnect-bench            # defaults
//! NC_BENCH_MIB=2048 NC_BENCH_RTTS=20000 cargo run --release -p nowconnect-tests --bin nowconnect-bench
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nowconnect_tests::tunnel::{Transport, Tunnel};

const CHUNK: usize = 256 * 1024;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A target that, per connection, reads a 1-byte mode: `s` = sink (read to EOF, then reply with
/// the byte count as 8 bytes), `g` + u64 = generate that many bytes then close, `e` = echo.
fn start_target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut mode = [0u8; 1];
                if c.read_exact(&mut mode).is_err() {
                    return;
                }
                let mut buf = vec![0u8; CHUNK];
                match mode[0] {
                    b's' => {
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
                        while let Ok(k) = c.read(&mut buf) {
                            if k == 0 || c.write_all(&buf[..k]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Client → target bulk: MB/s measured until the target confirms every byte.
fn upload(addr: SocketAddr, bytes: u64) -> f64 {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    c.write_all(b"s").expect("mode");
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        c.write_all(&buf[..k]).expect("write");
        left -= k as u64;
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut n = [0u8; 8];
    c.read_exact(&mut n).expect("count");
    assert_eq!(u64::from_be_bytes(n), bytes, "target got every byte");
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Target → client bulk.
fn download(addr: SocketAddr, bytes: u64) -> f64 {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let t = Instant::now();
    c.write_all(b"g").expect("mode");
    c.write_all(&bytes.to_be_bytes()).expect("len");
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let k = c.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    assert_eq!(got, bytes, "client got every byte");
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// 1-byte round trips on one connection: (p50, p99) in microseconds.
fn rtt(addr: SocketAddr, n: usize) -> (f64, f64) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    c.write_all(b"e").expect("mode");
    let mut b = [0u8; 1];
    // Warm up.
    for _ in 0..100 {
        c.write_all(b"x").expect("write");
        c.read_exact(&mut b).expect("read");
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            c.write_all(b"x").expect("write");
            c.read_exact(&mut b).expect("read");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[n / 2], v[(n * 99) / 100])
}

struct Row {
    name: &'static str,
    up: f64,
    down: f64,
    p50: f64,
    p99: f64,
}

fn measure(name: &'static str, addr: SocketAddr, bytes: u64, rtts: usize) -> Row {
    // Best of three for throughput: the machine is shared.
    let up = (0..3).map(|_| upload(addr, bytes)).fold(0.0, f64::max);
    let down = (0..3).map(|_| download(addr, bytes)).fold(0.0, f64::max);
    let (p50, p99) = rtt(addr, rtts);
    Row {
        name,
        up,
        down,
        p50,
        p99,
    }
}

fn main() {
    let mib = env_usize("NC_BENCH_MIB", 512) as u64;
    let rtts = env_usize("NC_BENCH_RTTS", 5000);
    let bytes = mib * 1024 * 1024;
    let target = start_target();
    println!(
        "nowconnect-bench: {mib} MiB per bulk transfer (best of 3), {rtts} 1-byte round trips"
    );
    let mut rows = vec![measure("direct", target, bytes, rtts)];
    for (name, transport) in [
        ("tunnel ws://", Transport::Ws),
        ("tunnel wss://", Transport::Wss),
    ] {
        let t = Tunnel::builder(transport)
            .connector("bench", &[target])
            .log_filter("warn")
            .start();
        thread::sleep(Duration::from_millis(200));
        rows.push(measure(name, t.connector("bench"), bytes, rtts));
        drop(t);
    }
    let d = (rows[0].up, rows[0].down, rows[0].p50, rows[0].p99);
    println!(
        "{:<14} {:>10} {:>7} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "path", "c→t MB/s", "ratio", "t→c MB/s", "ratio", "p50 µs", "p99 µs", "p50 ×"
    );
    for r in &rows {
        println!(
            "{:<14} {:>10.0} {:>7.2} {:>10.0} {:>7.2} {:>9.1} {:>9.1} {:>9.2}",
            r.name,
            r.up,
            r.up / d.0,
            r.down,
            r.down / d.1,
            r.p50,
            r.p99,
            r.p50 / d.2
        );
    }
    let _ = d.3;
}
