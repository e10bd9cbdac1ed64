//! Micro-benchmark of the core's data path (plain `main`, no criterion):
//!
//! - **pair**: DATA frames of one payload size through a [`Pair`]: the hub `send`s one frame's
//!   worth, `poll_transmit` encodes it, the agent decodes and handles it, the Pair releases the
//!   bytes (WINDOW goes back). One frame per step, so every size really is one DATA frame.
//! - **codec**: `encode_data` + `decode_one` of the same frame, nothing else.
//!
//! Run: `cargo bench -p nowconnect-core --features testing --bench core`
//! (`NOWCONNECT_BENCH_MS=<ms>` sets the time spent per row, default 600).

use std::hint::black_box;
use std::time::{Duration, Instant as WallClock};

use nowconnect_core::frame::{decode_one, encode_data, Frame};
use nowconnect_core::testing::Pair;
use nowconnect_core::Side;

const SIZES: [(usize, &str); 4] = [
    (1, "1 B"),
    (1024, "1 KiB"),
    (16 * 1024, "16 KiB"),
    (64 * 1024, "64 KiB"),
];

/// Runs `f` (which does `batch` frames) repeatedly for about `budget`; returns frames and time.
fn measure(budget: Duration, batch: u64, mut f: impl FnMut()) -> (u64, Duration) {
    // Warm-up: caches, allocator, window auto-tuning.
    let warm = WallClock::now();
    while warm.elapsed() < budget / 5 {
        f();
    }
    let start = WallClock::now();
    let mut frames = 0u64;
    loop {
        for _ in 0..16 {
            f();
        }
        frames += 16 * batch;
        let t = start.elapsed();
        if t >= budget {
            return (frames, t);
        }
    }
}

/// DATA of `size` bytes, hub → agent through a Pair.
fn pair(size: usize, budget: Duration) -> (u64, Duration) {
    let mut p = Pair::connected();
    p.record = false;
    p.check = false;
    let cid = p.open("ldap");
    p.drive();
    let payload = vec![0xA5u8; size];
    measure(budget, 1, || {
        let now = p.now;
        let n = p.hub.send(now, cid, &payload);
        // Credit always comes back within the same step (the agent releases at once).
        assert_eq!(n, size, "send blocked on credit");
        p.step();
    })
}

/// `encode_data` + `decode_one` of one DATA frame of `size` bytes.
fn codec(size: usize, budget: Duration) -> (u64, Duration) {
    let payload = vec![0x5Au8; size];
    let mut buf = Vec::with_capacity(size + 64);
    let mut seq = 0u32;
    measure(budget, 1, || {
        buf.clear();
        encode_data(&mut buf, 1, seq, black_box(&payload));
        seq = seq.wrapping_add(1);
        match decode_one(black_box(&buf), Side::Hub, 64 * 1024) {
            Ok((Frame::Data { payload, .. }, used)) => {
                black_box((payload.len(), used));
            }
            other => panic!("decode failed: {other:?}"),
        }
    })
}

fn row(what: &str, label: &str, size: usize, (frames, t): (u64, Duration)) {
    let ns = t.as_nanos() as f64 / frames as f64;
    let gbs = (size as f64 * frames as f64) / t.as_secs_f64() / 1e9;
    println!("{what:<6} {label:>7} {frames:>11} {ns:>11.1} {gbs:>9.3}");
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters rows by name ("pair"/"codec").
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let ms = std::env::var("NOWCONNECT_BENCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let budget = Duration::from_millis(ms);

    println!(
        "{:<6} {:>7} {:>11} {:>11} {:>9}",
        "bench", "payload", "frames", "ns/frame", "GB/s"
    );
    if wanted("pair") {
        for (size, label) in SIZES {
            row("pair", label, size, pair(size, budget));
        }
    }
    if wanted("codec") {
        for (size, label) in SIZES {
            row("codec", label, size, codec(size, budget));
        }
    }
}
