//! The quick start: `cargo run --release -p nowconnect-tests --bin nowconnect-demo`.
//!
//! Brings up on loopback, with built-in dev defaults, everything a first look needs:
//! - a `wss://` hub (generated CA and certificate) with two connectors,
//! - an agent (generated ES256 key, the hub's JWKS file, a minted token),
//! - two demo targets "on premises": a tiny HTTP server ("hello from on-prem") and an echo server,
//!
//! prints what to try, and stays up until Ctrl-C. The hub and agent are the real binaries, run as
//! child processes (built first if missing or stale); configs, keys, token and logs sit in a
//! temporary directory (kept with `NOWCONNECT_KEEP_TEMP=1`).
//!
//! `NOWCONNECT_DEMO_SELFTEST=1`: use free ports, make one HTTP request and one echo through the
//! tunnel, print the result and exit (0 when both worked).

use std::error::Error;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nowconnect_tests::free_addr;
use nowconnect_tests::tunnel::{Transport, Tunnel};

/// The preferred (well-known) loopback ports; a busy one is replaced by a free port.
const HTTP_CONNECTOR_PORT: u16 = 18080;
const ECHO_CONNECTOR_PORT: u16 = 17007;
const HUB_PORT: u16 = 18443;
const HUB_ADMIN_PORT: u16 = 19090;
const AGENT_ADMIN_PORT: u16 = 19091;

const HELLO: &str = "hello from on-prem: this answer came through the NowConnect tunnel\n";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nowconnect-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let selftest =
        std::env::var("NOWCONNECT_DEMO_SELFTEST").is_ok_and(|v| !v.is_empty() && v != "0");
    let port = |preferred: u16| {
        if selftest {
            free_addr()
        } else {
            loopback_port(preferred)
        }
    };

    let http_target = spawn_server(serve_http)?;
    let echo_target = spawn_server(serve_echo)?;
    let http = port(HTTP_CONNECTOR_PORT);
    let echo = port(ECHO_CONNECTOR_PORT);
    let hub = port(HUB_PORT);
    let hub_admin = port(HUB_ADMIN_PORT);
    let agent_admin = port(AGENT_ADMIN_PORT);

    println!("nowconnect-demo: starting hub and agent (building them first if needed) ...");
    // Panics (with the hub's or agent's log) if either does not come up.
    let mut tunnel = Tunnel::builder(Transport::Wss)
        .agent_id("demo-agent")
        .addrs(hub, hub_admin, agent_admin)
        .connector_with("http", http, &[http_target], &[], &[])
        .connector_with("echo", echo, &[echo_target], &[], &[])
        .start();

    let dir = tunnel.dir().display().to_string();
    let try_http = format!("curl http://{http}/");
    let try_echo = format!("nc {} {}", echo.ip(), echo.port());
    println!(
        "\n\
         NowConnect demo is up: client --TCP--> hub ({hub}) ==wss==> agent \"demo-agent\" --TCP--> targets\n\
         \n\
         Try (each connection goes client -> hub -> tunnel -> agent -> target):\n\
         \x20 {try_http:<30} # HTTP target on premises ({http_target})\n\
         \x20 {try_echo:<30} # echo target ({echo_target}): type a line, get it back\n\
         \n\
         Admin:\n\
         \x20 hub    http://{hub_admin}/metrics  /healthz  /readyz\n\
         \x20 agent  http://{agent_admin}/metrics  /healthz  /readyz\n\
         \n\
         Configs, CA, JWKS, token and logs (hub.log, agent.log): {dir}\n"
    );

    if selftest {
        return Ok(self_test(http, echo));
    }

    println!("Press Ctrl-C to stop.");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    while !stop.load(Ordering::SeqCst) {
        if let Some(why) = tunnel.exited() {
            eprintln!("nowconnect-demo: {why}");
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nnowconnect-demo: stopping agent and hub ...");
    drop(tunnel);
    println!("nowconnect-demo: stopped");
    Ok(ExitCode::SUCCESS)
}

/// One HTTP GET and one echo through the tunnel; prints what came back.
fn self_test(http: SocketAddr, echo: SocketAddr) -> ExitCode {
    let mut ok = true;
    match http_get(http) {
        Ok(answer) => {
            println!("selftest: GET http://{http}/ ->\n{answer}");
            ok &= answer.starts_with("HTTP/1.1 200") && answer.contains(HELLO);
        }
        Err(e) => {
            println!("selftest: GET http://{http}/ failed: {e}");
            ok = false;
        }
    }
    match echo_once(echo, b"ping through the tunnel\n") {
        Ok(back) => {
            println!("selftest: echo {echo} -> {back:?}");
            ok &= back == "ping through the tunnel\n";
        }
        Err(e) => {
            println!("selftest: echo {echo} failed: {e}");
            ok = false;
        }
    }
    if ok {
        println!("selftest ok");
        ExitCode::SUCCESS
    } else {
        println!("selftest FAILED");
        ExitCode::FAILURE
    }
}

fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = connect(addr)?;
    write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn echo_once(addr: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    let mut s = connect(addr)?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = String::new();
    s.read_to_string(&mut back)?;
    Ok(back)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// `127.0.0.1:preferred` if it is free now, else some free loopback port.
fn loopback_port(preferred: u16) -> SocketAddr {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, preferred));
    if TcpListener::bind(addr).is_ok() {
        addr
    } else {
        let other = free_addr();
        eprintln!("nowconnect-demo: port {preferred} is busy, using {other}");
        other
    }
}

/// A target "on premises": a loopback listener (ephemeral port) handing each connection to
/// `handler` on its own thread.
fn spawn_server(handler: fn(TcpStream)) -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || handler(conn));
        }
    });
    Ok(addr)
}

/// Answers any request with [`HELLO`]. The agent's health checks connect and close without a
/// request; they get nothing.
fn serve_http(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if head.is_empty() {
        return;
    }
    let path = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let body = format!("{HELLO}(you asked for {path})\n");
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Echoes every byte back; on EOF half-closes too (so `nc -N` and `echo hi | nc` work).
fn serve_echo(mut s: TcpStream) {
    let Ok(mut r) = s.try_clone() else { return };
    let _ = std::io::copy(&mut r, &mut s);
    let _ = s.shutdown(Shutdown::Write);
}
