//! The measurements: bulk transfers, round trips, connection rate, held streams, and the
//! hub's and agent's CPU time and RSS from /proc.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::servers::{connect, CHUNK};

/// `utime + stime` of a process in seconds (all its threads, live and exited).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends at the last ')': state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // rest[0] is field 3, so field n is rest[n - 3].
    (ticks(11) + ticks(12)) as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    use std::sync::OnceLock;
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The processes whose cost is measured (hub and agent); empty for direct and the relay.
#[derive(Clone, Debug, Default)]
pub struct Procs(pub Vec<u32>);

impl Procs {
    pub fn cpu(&self) -> f64 {
        self.0.iter().map(|&p| cpu_secs(p)).sum()
    }
    pub fn rss(&self) -> u64 {
        self.0.iter().map(|&p| rss_kib(p)).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client → target.
    Up,
    /// Target → client.
    Down,
}

/// One bulk run: MiB/s aggregate and hub+agent CPU seconds per GiB (NaN without processes).
pub struct Bulk {
    pub mib_s: f64,
    pub cpu_per_gib: f64,
}

fn upload(mut c: TcpStream, bytes: u64) {
    let buf = vec![0x5au8; CHUNK];
    c.write_all(b"s").expect("mode");
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        c.write_all(&buf[..k]).expect("upload write");
        left -= k as u64;
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut n = [0u8; 8];
    c.read_exact(&mut n).expect("upload count");
    assert_eq!(u64::from_be_bytes(n), bytes, "target got every byte");
}

fn download(mut c: TcpStream, bytes: u64) {
    c.write_all(b"g").expect("mode");
    c.write_all(&bytes.to_be_bytes()).expect("len");
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let k = c.read(&mut buf).expect("download read");
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    assert_eq!(got, bytes, "client got every byte");
}

/// `total` bytes split over `streams` parallel connections in direction `dir`.
pub fn bulk(addr: SocketAddr, procs: &Procs, dir: Dir, streams: usize, total: u64) -> Bulk {
    let per = total / streams as u64;
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| connect(addr).expect("connect"))
        .collect();
    let barrier = Arc::new(Barrier::new(streams + 1));
    let threads: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let b = barrier.clone();
            thread::spawn(move || {
                b.wait();
                match dir {
                    Dir::Up => upload(c, per),
                    Dir::Down => download(c, per),
                }
            })
        })
        .collect();
    let cpu0 = procs.cpu();
    let t = Instant::now();
    barrier.wait();
    for th in threads {
        th.join().expect("bulk stream");
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = procs.cpu() - cpu0;
    let moved = per * streams as u64;
    Bulk {
        mib_s: moved as f64 / secs / (1024.0 * 1024.0),
        cpu_per_gib: if procs.is_empty() {
            f64::NAN
        } else {
            cpu / (moved as f64 / (1u64 << 30) as f64)
        },
    }
}

/// Percentile (0..=100) of sorted samples.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An open echo connection.
pub fn echo_conn(addr: SocketAddr) -> TcpStream {
    let mut c = connect(addr).expect("connect");
    c.write_all(b"e").expect("mode");
    c
}

/// One round trip of `msg` on an echo connection, in µs.
pub fn round_trip(c: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> f64 {
    let t = Instant::now();
    c.write_all(msg).expect("rtt write");
    c.read_exact(back).expect("rtt read");
    t.elapsed().as_secs_f64() * 1e6
}

/// `n` round trips of `size` bytes on one connection: sorted µs samples.
pub fn rtt(addr: SocketAddr, size: usize, n: usize) -> Vec<f64> {
    let mut c = echo_conn(addr);
    let msg = vec![b'x'; size];
    let mut back = vec![0u8; size];
    for _ in 0..200 {
        round_trip(&mut c, &msg, &mut back);
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| round_trip(&mut c, &msg, &mut back))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// New connections per second (connect, 1-byte echo, close) with `concurrency` clients for
/// `dur`; returns (conn/s, p99 setup µs, failures).
pub fn conn_rate(addr: SocketAddr, concurrency: usize, dur: Duration) -> (f64, f64, u64) {
    let start = Instant::now();
    let deadline = start + dur;
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            thread::spawn(move || {
                let mut lat = Vec::new();
                let mut failed = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = (|| -> std::io::Result<()> {
                        let mut c = connect(addr)?;
                        c.write_all(b"ex")?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(_) => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for th in threads {
        let (l, f) = th.join().expect("conn client");
        all.extend(l);
        failed += f;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (all.len() as f64 / secs, pct(&all, 99.0), failed)
}

/// Open echo connections until `held` has `n`, each verified with a 1-byte echo.
pub fn hold_streams(addr: SocketAddr, held: &mut Vec<TcpStream>, n: usize) {
    while held.len() < n {
        let mut c = connect(addr).expect("connect idle stream");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        c.write_all(b"ex").expect("idle stream write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("idle stream {} echo: {e}", held.len()));
        assert_eq!(b[0], b'x', "echo");
        held.push(c);
    }
}

/// Verify every held stream still echoes.
pub fn verify_streams(held: &mut [TcpStream]) {
    for (i, c) in held.iter_mut().enumerate() {
        c.write_all(b"y").expect("verify write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("held stream {i} echo: {e}"));
        assert_eq!(b[0], b'y', "echo");
    }
}

/// Download for `dur` on one stream: (MB/s over the whole run, MB/s over its second half).
pub fn timed_download(addr: SocketAddr, dur: Duration) -> (f64, f64) {
    let mut c = connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"g").expect("mode");
    c.write_all(&(u64::MAX / 2).to_be_bytes()).expect("len");
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let half = dur / 2;
    let mut got = 0u64;
    let mut at_half: Option<(u64, Instant)> = None;
    while t.elapsed() < dur {
        let k = c.read(&mut buf).expect("download read");
        assert!(k > 0, "stream ended early");
        got += k as u64;
        if at_half.is_none() && t.elapsed() >= half {
            at_half = Some((got, Instant::now()));
        }
    }
    let total = got as f64 / t.elapsed().as_secs_f64() / 1e6;
    let second = at_half
        .map(|(g, i)| (got - g) as f64 / i.elapsed().as_secs_f64().max(1e-9) / 1e6)
        .unwrap_or(total);
    // Dropped with unread data: the kernel resets it, the tunnel drops the stream.
    (total, second)
}
