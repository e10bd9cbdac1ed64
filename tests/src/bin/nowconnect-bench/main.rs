//! Side-by-side benchmark of the real release binaries on 127.0.0.1: "direct" (the loopback
//! limit), a plain two-hop userspace relay (client → relay → relay → target, copying bytes: the
//! practical ceiling of any tunnel), and NowConnect over ws:// and wss://. Every figure is the
//! median of `--reps` repetitions, interleaved across paths so machine noise hits all alike.
//!
//! ```sh
//! cargo run --release -p nowconnect-tests --bin nowconnect-bench                 # everything
//! cargo run --release -p nowconnect-tests --bin nowconnect-bench -- --quick      # small sizes
//! cargo run --release -p nowconnect-tests --bin nowconnect-bench -- --only throughput,rtt \
//!     --paths relay,ws --reps 5
//! ```
//!
//! Groups (`--only`): `throughput` (1/8/64 streams each way, MiB/s, % of direct, hub+agent CPU
//! s/GiB), `rtt` (1 B and 1 KiB round trips), `conn` (connect + 1-byte echo + close, 16
//! clients), `rss` (hub+agent RSS idle and with 1 000 / 10 000 held streams), `hol` (one
//! stream's reader stuck while another pings), `wan` (one stream through a 50 ms round trip
//! injected between agent and hub; auto-tuned vs a fixed 256 KiB window).
//! Writes `bench.md` and `bench.json` to `--out` (default `target/bench/`).

mod probes;
mod servers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use nowconnect_tests::tunnel::{Transport, Tunnel};
use probes::{pct, Dir, Procs};
use serde_json::{json, Value};

const GROUPS: &[&str] = &["throughput", "rtt", "conn", "rss", "hol", "wan"];
const PATHS: &[&str] = &["direct", "relay", "ws", "wss"];
const FD_LIMIT: u64 = 65_536;

struct Opts {
    groups: Vec<String>,
    paths: Vec<String>,
    reps: usize,
    mib: u64,
    rtts: usize,
    streams: Vec<usize>,
    conn_secs: f64,
    idle: Vec<usize>,
    hol_secs: f64,
    wan_secs: f64,
    out: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: nowconnect-bench [--quick] [--reps N] [--only {}] [--paths {}]\n\
         \x20      [--mib N] [--rtts N] [--streams 1,8,64] [--conn-secs S] [--idle 1000,10000]\n\
         \x20      [--hol-secs S] [--wan-secs S] [--out DIR]",
        GROUPS.join(","),
        PATHS.join(",")
    );
    std::process::exit(2)
}

fn list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',')
        .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
        .collect()
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            groups: GROUPS.iter().map(|s| s.to_string()).collect(),
            paths: PATHS.iter().map(|s| s.to_string()).collect(),
            reps: if quick { 1 } else { 3 },
            mib: if quick { 128 } else { 512 },
            rtts: if quick { 2000 } else { 10_000 },
            streams: vec![1, 8, 64],
            conn_secs: if quick { 1.0 } else { 2.0 },
            idle: if quick {
                vec![1000]
            } else {
                vec![1000, 10_000]
            },
            hol_secs: if quick { 3.0 } else { 10.0 },
            wan_secs: if quick { 3.0 } else { 6.0 },
            out: nowconnect_tests::workspace_root().join("target/bench"),
        };
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().unwrap_or_else(|| usage());
            match a.as_str() {
                "--quick" => {}
                "--reps" => o.reps = val().parse().unwrap_or_else(|_| usage()),
                "--only" => o.groups = list(&val()),
                "--paths" => o.paths = list(&val()),
                "--mib" => o.mib = val().parse().unwrap_or_else(|_| usage()),
                "--rtts" => o.rtts = val().parse().unwrap_or_else(|_| usage()),
                "--streams" => o.streams = list(&val()),
                "--conn-secs" => o.conn_secs = val().parse().unwrap_or_else(|_| usage()),
                "--idle" => o.idle = list(&val()),
                "--hol-secs" => o.hol_secs = val().parse().unwrap_or_else(|_| usage()),
                "--wan-secs" => o.wan_secs = val().parse().unwrap_or_else(|_| usage()),
                "--out" => o.out = PathBuf::from(val()),
                _ => usage(),
            }
        }
        for g in &o.groups {
            if !GROUPS.contains(&g.as_str()) {
                usage();
            }
        }
        for p in &o.paths {
            if !PATHS.contains(&p.as_str()) {
                usage();
            }
        }
        o.reps = o.reps.max(1);
        o
    }

    fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    fn tunnels(&self) -> Vec<(&'static str, Transport)> {
        [("ws", Transport::Ws), ("wss", Transport::Wss)]
            .into_iter()
            .filter(|(n, _)| self.paths.iter().any(|p| p == n))
            .collect()
    }
}

/// 10 000 held streams need ~20 000 fds here and in the hub and the agent: re-run under
/// `sh -c 'ulimit -n 65536; exec …'` (children inherit it) when the soft limit is lower.
fn raise_fd_limit(opts: &Opts) {
    if !opts.wants("rss") || std::env::var_os("NC_BENCH_REEXEC").is_some() {
        return;
    }
    if fd_limit() >= FD_LIMIT {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new("sh")
        .arg("-c")
        // Without CAP_SYS_RESOURCE the hard limit stays: then use all of it.
        .arg(format!(
            "ulimit -n {FD_LIMIT} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("NC_BENCH_REEXEC", "1")
        .status()
        .expect("re-run under sh -c 'ulimit -n'");
    std::process::exit(status.code().unwrap_or(1));
}

/// The soft RLIMIT_NOFILE of this process.
fn fd_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
}

/// Streams that fit the fd limit: this process holds two fds per stream (client and target
/// side), and so do the hub (client socket + eventfd) and the agent (target socket + eventfd).
fn max_streams() -> usize {
    usize::try_from(fd_limit().saturating_sub(256) / 2).unwrap_or(usize::MAX)
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Samples per metric key (`throughput/ws/up/8/mib_s`, ...).
#[derive(Default)]
struct Results {
    samples: BTreeMap<String, Vec<f64>>,
}

impl Results {
    fn add(&mut self, key: String, v: f64) {
        self.samples.entry(key).or_default().push(v);
    }
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).map_or(f64::NAN, |v| median(v))
    }
}

fn tunnel(transport: Transport, target: SocketAddr) -> Tunnel {
    let t = Tunnel::builder(transport)
        .connector("bench", &[target])
        .log_filter("warn")
        .start();
    thread::sleep(Duration::from_millis(200));
    t
}

fn procs_of(t: &Tunnel) -> Procs {
    Procs(vec![t.hub_pid(), t.agent_pid()])
}

fn progress(msg: &str) {
    eprintln!("[bench {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    use std::sync::OnceLock;
    static T: OnceLock<Instant> = OnceLock::new();
    *T.get_or_init(Instant::now)
}

fn main() {
    started();
    let opts = Opts::parse();
    raise_fd_limit(&opts);
    let target = servers::start_target();
    let mut r = Results::default();

    // Paths for the throughput / rtt / conn groups, all up at once and measured interleaved.
    let mut endpoints: Vec<(String, SocketAddr, Procs, Option<Tunnel>)> = Vec::new();
    if opts.wants("throughput") || opts.wants("rtt") || opts.wants("conn") {
        for p in &opts.paths {
            match p.as_str() {
                "direct" => endpoints.push((p.clone(), target, Procs::default(), None)),
                "relay" => endpoints.push((
                    p.clone(),
                    servers::start_two_hop(target),
                    Procs::default(),
                    None,
                )),
                _ => {
                    let tr = if p == "ws" {
                        Transport::Ws
                    } else {
                        Transport::Wss
                    };
                    let t = tunnel(tr, target);
                    endpoints.push((p.clone(), t.connector("bench"), procs_of(&t), Some(t)));
                }
            }
        }
    }
    let total = opts.mib << 20;
    for rep in 0..opts.reps {
        if opts.wants("throughput") {
            for &n in &opts.streams {
                for dir in [Dir::Up, Dir::Down] {
                    let d = if dir == Dir::Up { "up" } else { "down" };
                    for (name, addr, procs, _) in &endpoints {
                        let b = probes::bulk(*addr, procs, dir, n, total);
                        progress(&format!(
                            "rep {rep} throughput {name} {d} {n} streams: {:.0} MiB/s, {:.2} CPU s/GiB",
                            b.mib_s, b.cpu_per_gib
                        ));
                        r.add(format!("throughput/{name}/{d}/{n}/mib_s"), b.mib_s);
                        r.add(
                            format!("throughput/{name}/{d}/{n}/cpu_s_per_gib"),
                            b.cpu_per_gib,
                        );
                    }
                }
            }
        }
        if opts.wants("rtt") {
            for size in [1usize, 1024] {
                for (name, addr, _, _) in &endpoints {
                    let v = probes::rtt(*addr, size, opts.rtts);
                    let (p50, p99) = (pct(&v, 50.0), pct(&v, 99.0));
                    progress(&format!(
                        "rep {rep} rtt {name} {size} B: p50 {p50:.1} µs, p99 {p99:.1} µs"
                    ));
                    r.add(format!("rtt/{name}/{size}/p50_us"), p50);
                    r.add(format!("rtt/{name}/{size}/p99_us"), p99);
                }
            }
        }
        if opts.wants("conn") {
            for (name, addr, _, _) in &endpoints {
                let (rate, p99, failed) =
                    probes::conn_rate(*addr, 16, Duration::from_secs_f64(opts.conn_secs));
                progress(&format!(
                    "rep {rep} conn {name}: {rate:.0}/s, p99 setup {p99:.0} µs, {failed} failed"
                ));
                r.add(format!("conn/{name}/per_s"), rate);
                r.add(format!("conn/{name}/p99_us"), p99);
                r.add(format!("conn/{name}/failed"), failed as f64);
            }
        }
    }
    drop(endpoints);

    if opts.wants("rss") {
        for (name, tr) in opts.tunnels() {
            rss_test(&opts, &mut r, name, tr, target);
        }
    }
    if opts.wants("hol") {
        for (name, tr) in opts.tunnels() {
            hol_test(&opts, &mut r, name, tr, target);
        }
    }
    if opts.wants("wan") {
        for (name, tr) in opts.tunnels() {
            wan_test(&opts, &mut r, name, tr, target, false);
            if name == "ws" {
                wan_test(&opts, &mut r, name, tr, target, true);
            }
        }
    }
    report(&opts, &r);
}

fn rss_test(opts: &Opts, r: &mut Results, name: &str, tr: Transport, target: SocketAddr) {
    let t = tunnel(tr, target);
    let procs = procs_of(&t);
    let addr = t.connector("bench");
    // A few streams first so the idle figure includes the warmed-up tunnel, not a cold one.
    let mut warm = Vec::new();
    probes::hold_streams(addr, &mut warm, 8);
    drop(warm);
    thread::sleep(Duration::from_secs(1));
    let idle_hub = probes::rss_kib(t.hub_pid());
    let idle_agent = probes::rss_kib(t.agent_pid());
    let idle = idle_hub + idle_agent;
    r.add(format!("rss/{name}/idle/hub_kib"), idle_hub as f64);
    r.add(format!("rss/{name}/idle/agent_kib"), idle_agent as f64);
    progress(&format!(
        "rss {name} idle: hub {idle_hub} KiB + agent {idle_agent} KiB"
    ));
    let mut held = Vec::new();
    let cap = max_streams();
    for &want in &opts.idle {
        let n = want.min(cap);
        if n < want {
            progress(&format!(
                "rss {name}: RLIMIT_NOFILE {} holds {n} streams, not {want}",
                fd_limit()
            ));
        }
        r.add(format!("rss/{name}/{want}/held"), n as f64);
        let t0 = Instant::now();
        probes::hold_streams(addr, &mut held, n);
        probes::verify_streams(&mut held);
        thread::sleep(Duration::from_secs(1));
        let hub = probes::rss_kib(t.hub_pid());
        let agent = probes::rss_kib(t.agent_pid());
        let per = (hub + agent).saturating_sub(idle) as f64 / n as f64;
        progress(&format!(
            "rss {name} {n} streams (opened+verified in {:.1}s): hub {hub} KiB + agent {agent} \
             KiB → {per:.1} KiB/stream",
            t0.elapsed().as_secs_f64()
        ));
        r.add(format!("rss/{name}/{want}/hub_kib"), hub as f64);
        r.add(format!("rss/{name}/{want}/agent_kib"), agent as f64);
        r.add(format!("rss/{name}/{want}/kib_per_stream"), per);
    }
    let _ = procs;
    drop(held);
}

fn hol_test(opts: &Opts, r: &mut Results, name: &str, tr: Transport, target: SocketAddr) {
    let t = tunnel(tr, target);
    let procs = procs_of(&t);
    let addr = t.connector("bench");
    let dur = Duration::from_secs_f64(opts.hol_secs);
    let pings = |dur: Duration| {
        let mut c = probes::echo_conn(addr);
        let mut b = [0u8; 1];
        for _ in 0..200 {
            probes::round_trip(&mut c, b"p", &mut b);
        }
        let t0 = Instant::now();
        let mut v = Vec::new();
        while t0.elapsed() < dur {
            v.push(probes::round_trip(&mut c, b"p", &mut b));
        }
        v.sort_by(f64::total_cmp);
        v
    };
    let base = pings(dur);
    let rss0 = procs.rss();
    let mut stuck = servers::connect(addr).expect("connect stuck stream");
    std::io::Write::write_all(&mut stuck, b"g").expect("mode");
    std::io::Write::write_all(&mut stuck, &(u64::MAX / 2).to_be_bytes()).expect("len");
    let during = pings(dur);
    let rss1 = procs.rss();
    drop(stuck);
    let (b99, d99) = (pct(&base, 99.0), pct(&during, 99.0));
    let grown = rss1 as f64 - rss0 as f64;
    progress(&format!(
        "hol {name}: p99 {b99:.1} µs alone, {d99:.1} µs beside a stuck stream; RSS +{grown:.0} KiB"
    ));
    r.add(format!("hol/{name}/base_p50_us"), pct(&base, 50.0));
    r.add(format!("hol/{name}/base_p99_us"), b99);
    r.add(format!("hol/{name}/stuck_p50_us"), pct(&during, 50.0));
    r.add(format!("hol/{name}/stuck_p99_us"), d99);
    r.add(format!("hol/{name}/rss_growth_kib"), grown);
}

fn wan_test(
    opts: &Opts,
    r: &mut Results,
    name: &str,
    tr: Transport,
    target: SocketAddr,
    fixed: bool,
) {
    let mut b = Tunnel::builder(tr)
        .connector("bench", &[target])
        .log_filter("warn")
        .without_agent();
    if fixed {
        b = b
            .hub_limit("max_window: 256KiB")
            .agent_limit("max_window: 256KiB");
    }
    let mut t = b.start();
    let delay = servers::start_delay_relay(t.hub_listen, Duration::from_millis(25));
    let yaml = std::fs::read_to_string(t.agent_config()).expect("agent.yaml");
    let url = t
        .hub_url
        .replace(&t.hub_listen.port().to_string(), &delay.port().to_string());
    std::fs::write(t.agent_config(), yaml.replace(&t.hub_url, &url)).expect("agent.yaml");
    t.start_agent();
    t.wait_ready();
    let addr = t.connector("bench");
    let window = if fixed { "fixed256k" } else { "auto" };
    for rep in 0..opts.reps {
        let (all, second) = probes::timed_download(addr, Duration::from_secs_f64(opts.wan_secs));
        progress(&format!(
            "rep {rep} wan {name} {window}: {all:.1} MB/s over the run, {second:.1} MB/s in its \
             second half"
        ));
        r.add(format!("wan/{name}/{window}/mb_s"), all);
        r.add(format!("wan/{name}/{window}/second_half_mb_s"), second);
    }
}

// ----- report -----

fn f0(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.0}")
    }
}

fn f1(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.1}")
    }
}

fn f2(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.2}")
    }
}

fn pc(v: f64, of: f64) -> String {
    if v.is_nan() || of.is_nan() || of == 0.0 {
        "–".into()
    } else {
        format!("{:.0} %", v / of * 100.0)
    }
}

fn report(opts: &Opts, r: &Results) {
    let mut md = String::new();
    let mut checks: Vec<(String, String, Option<bool>)> = Vec::new();
    let paths: Vec<&str> = opts.paths.iter().map(String::as_str).collect();
    let tunnels: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| *p == "ws" || *p == "wss")
        .collect();
    md += &format!(
        "Median of {} repetition(s); {} MiB per bulk run; {} round trips per RTT sample.\n\n",
        opts.reps, opts.mib, opts.rtts
    );
    if opts.wants("throughput") {
        md += "#### Bulk throughput (MiB/s; % of direct; hub+agent CPU s per GiB)\n\n";
        md += "| path | streams | c→t MiB/s | % direct | CPU s/GiB | t→c MiB/s | % direct | CPU s/GiB |\n";
        md += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
        for p in &paths {
            for n in &opts.streams {
                let g = |d: &str, m: &str| r.get(&format!("throughput/{p}/{d}/{n}/{m}"));
                let direct = |d: &str| r.get(&format!("throughput/direct/{d}/{n}/mib_s"));
                md += &format!(
                    "| {p} | {n} | {} | {} | {} | {} | {} | {} |\n",
                    f0(g("up", "mib_s")),
                    pc(g("up", "mib_s"), direct("up")),
                    f2(g("up", "cpu_s_per_gib")),
                    f0(g("down", "mib_s")),
                    pc(g("down", "mib_s"), direct("down")),
                    f2(g("down", "cpu_s_per_gib")),
                );
            }
        }
        md += "\n";
        for (p, limit) in [("ws", 1.5), ("wss", 2.5)] {
            if !tunnels.contains(&p) {
                continue;
            }
            let worst = opts
                .streams
                .iter()
                .flat_map(|n| {
                    ["up", "down"].map(|d| r.get(&format!("throughput/{p}/{d}/{n}/cpu_s_per_gib")))
                })
                .fold(f64::NAN, f64::max);
            checks.push((
                format!("{p}: CPU per GiB (hub+agent) ≤ {limit} s at every stream count"),
                format!("worst {worst:.2} s"),
                (!worst.is_nan()).then_some(worst <= limit),
            ));
        }
        for (p, frac) in [("ws", 0.8), ("wss", 0.5)] {
            if !tunnels.contains(&p) {
                continue;
            }
            for d in ["up", "down"] {
                let v = r.get(&format!("throughput/{p}/{d}/1/mib_s"));
                let relay = r.get(&format!("throughput/relay/{d}/1/mib_s"));
                checks.push((
                    format!(
                        "{p}: 1-stream {d} ≥ {:.0} % of the two-hop relay",
                        frac * 100.0
                    ),
                    format!("{} of {} MiB/s = {}", f0(v), f0(relay), pc(v, relay)),
                    (!(v / relay).is_nan()).then_some(v >= frac * relay),
                ));
            }
            let max_n = opts.streams.iter().copied().max().unwrap_or(1);
            if max_n > 1 && opts.streams.contains(&1) {
                for d in ["up", "down"] {
                    let one = r.get(&format!("throughput/{p}/{d}/1/mib_s"));
                    let many = r.get(&format!("throughput/{p}/{d}/{max_n}/mib_s"));
                    checks.push((
                        format!("{p}: {max_n} streams {d} aggregate ≥ 1 stream"),
                        format!("{} vs {} MiB/s", f0(many), f0(one)),
                        (!(many / one).is_nan()).then_some(many >= one),
                    ));
                }
            }
        }
    }
    if opts.wants("rtt") {
        md += "#### Round trips over an open stream (µs)\n\n";
        md += "| path | 1 B p50 | 1 B p99 | 1 KiB p50 | 1 KiB p99 | 1 B p50 − direct |\n";
        md += "|---|---:|---:|---:|---:|---:|\n";
        let d50 = r.get("rtt/direct/1/p50_us");
        for p in &paths {
            let g = |s: usize, m: &str| r.get(&format!("rtt/{p}/{s}/{m}"));
            md += &format!(
                "| {p} | {} | {} | {} | {} | {} |\n",
                f1(g(1, "p50_us")),
                f1(g(1, "p99_us")),
                f1(g(1024, "p50_us")),
                f1(g(1024, "p99_us")),
                f1(g(1, "p50_us") - d50),
            );
        }
        md += "\n";
        for p in &tunnels {
            let p50 = r.get(&format!("rtt/{p}/1/p50_us"));
            let p99 = r.get(&format!("rtt/{p}/1/p99_us"));
            checks.push((
                format!("{p}: 1-byte RTT p50 ≤ direct + 45 µs"),
                format!(
                    "{} µs vs direct {} µs (+{})",
                    f1(p50),
                    f1(d50),
                    f1(p50 - d50)
                ),
                (!(p50 - d50).is_nan()).then_some(p50 <= d50 + 45.0),
            ));
            checks.push((
                format!("{p}: 1-byte RTT p99 ≤ 1 ms"),
                format!("{} µs", f1(p99)),
                (!p99.is_nan()).then_some(p99 <= 1000.0),
            ));
        }
    }
    if opts.wants("conn") {
        md += "#### New connections (connect, 1-byte echo, close; 16 clients)\n\n";
        md += "| path | conn/s | % direct | p99 setup µs | failed |\n|---|---:|---:|---:|---:|\n";
        let direct = r.get("conn/direct/per_s");
        for p in &paths {
            let g = |m: &str| r.get(&format!("conn/{p}/{m}"));
            md += &format!(
                "| {p} | {} | {} | {} | {} |\n",
                f0(g("per_s")),
                pc(g("per_s"), direct),
                f0(g("p99_us")),
                f0(g("failed"))
            );
        }
        md += "\n";
        for p in &tunnels {
            let v = r.get(&format!("conn/{p}/per_s"));
            checks.push((
                format!("{p}: conn/s ≥ 65 % of direct"),
                format!("{} of {} = {}", f0(v), f0(direct), pc(v, direct)),
                (!(v / direct).is_nan()).then_some(v >= 0.65 * direct),
            ));
        }
    }
    if opts.wants("rss") && !tunnels.is_empty() {
        md += "#### RSS of hub + agent with idle streams (each verified by echo)\n\n";
        md += "| path | idle hub+agent KiB |";
        for n in &opts.idle {
            md += &format!(" {n} streams KiB | KiB/stream |");
        }
        md += "\n|---|---:|";
        for _ in &opts.idle {
            md += "---:|---:|";
        }
        md += "\n";
        for p in &tunnels {
            let idle =
                r.get(&format!("rss/{p}/idle/hub_kib")) + r.get(&format!("rss/{p}/idle/agent_kib"));
            md += &format!("| {p} | {} |", f0(idle));
            for n in &opts.idle {
                let tot = r.get(&format!("rss/{p}/{n}/hub_kib"))
                    + r.get(&format!("rss/{p}/{n}/agent_kib"));
                let per = r.get(&format!("rss/{p}/{n}/kib_per_stream"));
                let held = r.get(&format!("rss/{p}/{n}/held"));
                let note = if held < *n as f64 {
                    format!(" ({} held: fd limit)", f0(held))
                } else {
                    String::new()
                };
                md += &format!(" {}{note} | {} |", f0(tot), f1(per));
                checks.push((
                    format!("{p}: ≤ 32 KiB RSS per idle stream at {n} streams"),
                    format!("{} KiB{note}", f1(per)),
                    (!per.is_nan()).then_some(per <= 32.0),
                ));
            }
            md += "\n";
        }
        md += "\n";
    }
    if opts.wants("hol") && !tunnels.is_empty() {
        md += &format!(
            "#### Head-of-line: 1-byte ping beside a stream whose reader is stuck ({} s each)\n\n",
            opts.hol_secs
        );
        md += "| path | alone p50 µs | alone p99 µs | beside stuck p50 µs | beside stuck p99 µs | \
               × | hub+agent RSS growth KiB |\n|---|---:|---:|---:|---:|---:|---:|\n";
        for p in &tunnels {
            let g = |m: &str| r.get(&format!("hol/{p}/{m}"));
            md += &format!(
                "| {p} | {} | {} | {} | {} | {} | {} |\n",
                f1(g("base_p50_us")),
                f1(g("base_p99_us")),
                f1(g("stuck_p50_us")),
                f1(g("stuck_p99_us")),
                f2(g("stuck_p99_us") / g("base_p99_us")),
                f0(g("rss_growth_kib"))
            );
            let ratio = g("stuck_p99_us") / g("base_p99_us");
            checks.push((
                format!("{p}: head-of-line p99 within 2× baseline"),
                format!("{}×", f2(ratio)),
                (!ratio.is_nan()).then_some(ratio <= 2.0),
            ));
            let grown = g("rss_growth_kib");
            checks.push((
                format!("{p}: RSS growth beside a stuck stream ≤ its windows (16 MiB max_window)"),
                format!("{} KiB", f0(grown)),
                (!grown.is_nan()).then_some(grown <= 16.0 * 1024.0 + 2048.0),
            ));
        }
        md += "\n";
    }
    if opts.wants("wan") && !tunnels.is_empty() {
        md += &format!(
            "#### One stream at 50 ms RTT (25 ms each way injected between agent and hub; {} s \
             download)\n\n",
            opts.wan_secs
        );
        md += "| path | window | MB/s whole run | MB/s second half |\n|---|---|---:|---:|\n";
        for p in &tunnels {
            for w in ["auto", "fixed256k"] {
                let v = r.get(&format!("wan/{p}/{w}/mb_s"));
                if v.is_nan() {
                    continue;
                }
                let label = if w == "auto" {
                    "auto-tuned (256 KiB → 16 MiB)"
                } else {
                    "fixed 256 KiB"
                };
                md += &format!(
                    "| {p} | {label} | {} | {} |\n",
                    f1(v),
                    f1(r.get(&format!("wan/{p}/{w}/second_half_mb_s")))
                );
            }
            let v = r.get(&format!("wan/{p}/auto/mb_s"));
            checks.push((
                format!("{p}: one stream at 50 ms RTT ≥ 50 MB/s"),
                format!("{} MB/s", f1(v)),
                (!v.is_nan()).then_some(v >= 50.0),
            ));
        }
        md += "\n";
    }
    md += "#### Targets (same run)\n\n| target | measured | met |\n|---|---|---|\n";
    for (name, got, ok) in &checks {
        let mark = match ok {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        md += &format!("| {name} | {got} | {mark} |\n");
    }
    println!("\n{md}");
    let json = json!({
        "reps": opts.reps,
        "mib": opts.mib,
        "rtts": opts.rtts,
        "paths": opts.paths,
        "groups": opts.groups,
        "median": r.samples.keys().map(|k| (k.clone(), json!(r.get(k)))).collect::<serde_json::Map<String, Value>>(),
        "samples": r.samples,
        "targets": checks.iter().map(|(n, g, ok)| json!({"target": n, "measured": g, "met": ok})).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&opts.out).expect("create output dir");
    let md_path = opts.out.join("bench.md");
    let json_path = opts.out.join("bench.json");
    std::fs::write(&md_path, &md).expect("write bench.md");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write bench.json");
    eprintln!("wrote {} and {}", md_path.display(), json_path.display());
}
