//! [`Idp`]: an in-process HTTPS identity provider endpoint serving a JWKS on loopback, for the
//! hub's `auth.jwks_url` / `auth.jwks_ca`.
//!
//! - TLS by rustls with a server certificate from its own [`TestCa`] (the hub trusts
//!   [`Idp::ca_file`] through `auth.jwks_ca`); the URL host is `127.0.0.1` (an IP SAN);
//! - the key set can be swapped at runtime ([`Idp::set_jwks`]);
//! - the endpoint can be taken down and brought back on the same port ([`Idp::down`] closes the
//!   listening socket, so a fetch meets "connection refused"; [`Idp::up`] binds it again);
//! - it can serve any bytes instead of a JWKS ([`Idp::set_body`]), or stall: accept connections
//!   and answer nothing until released ([`Idp::stall`]);
//! - every JWKS document served is counted ([`Idp::requests`]).
//!
//! A tiny HTTP/1.1 responder: one request per connection, `Connection: close`, request heads
//! bounded at 16 KiB, one thread per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::{free_addr, TestCa};

/// The path the JWKS is served at.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Largest request head the responder reads.
const MAX_HEAD: usize = 16 * 1024;

/// Read/write deadline of one connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a stalled connection is held.
const MAX_STALL: Duration = Duration::from_secs(60);

struct Shared {
    jwks: Mutex<Vec<u8>>,
    /// Connections are held, unanswered, while set.
    stalled: AtomicBool,
    /// JWKS documents requested (and answered 200) on [`JWKS_PATH`].
    requests: AtomicU64,
    /// Connections accepted (including ones that failed the TLS handshake).
    connections: AtomicU64,
}

struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// An HTTPS JWKS endpoint on `127.0.0.1:<free port>`; stops on drop.
pub struct Idp {
    addr: SocketAddr,
    url: String,
    ca_file: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
    _dir: tempfile::TempDir,
}

impl Idp {
    /// Starts serving `jwks` (a `{"keys": [...]}` document) over HTTPS.
    pub fn start(jwks: &Value) -> Idp {
        let dir = crate::temp_dir("idp");
        let ca = TestCa::new("NowConnect Test IdP CA");
        let files = ca.server_files(dir.path(), "idp", &["127.0.0.1", "localhost"]);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(files.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("parse IdP certificate");
        let key = PrivateKeyDer::from_pem_slice(files.key_pem.as_bytes()).expect("parse IdP key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("IdP server config");
        let addr = free_addr();
        let idp = Idp {
            addr,
            url: format!("https://127.0.0.1:{}{JWKS_PATH}", addr.port()),
            ca_file: files.ca,
            tls: Arc::new(tls),
            shared: Arc::new(Shared {
                jwks: Mutex::new(jwks.to_string().into_bytes()),
                stalled: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                connections: AtomicU64::new(0),
            }),
            server: Mutex::new(None),
            _dir: dir,
        };
        idp.up();
        idp
    }

    /// `https://127.0.0.1:<port>/.well-known/jwks.json`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The listening address (also while down: the port it comes back on).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM file) that issued the endpoint's certificate: `auth.jwks_ca`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Serves `jwks` from now on.
    pub fn set_jwks(&self, jwks: &Value) {
        self.set_body(jwks.to_string());
    }

    /// Serves `body` (200, `application/json`) from now on, JWKS or not.
    pub fn set_body(&self, body: impl Into<Vec<u8>>) {
        *lock(&self.shared.jwks) = body.into();
    }

    /// While `on`, connections are accepted and then held without a byte of answer (a hung
    /// IdP); turning it off lets the held ones proceed. Held at most 60 s.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// How many JWKS documents were requested so far (counted before the answer is sent).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// How many connections were accepted so far (served or not).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Polls until at least `n` JWKS documents were served; false after `timeout`.
    pub fn wait_requests(&self, n: u64, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.requests() >= n)
    }

    /// True while the endpoint listens.
    pub fn is_up(&self) -> bool {
        lock(&self.server).is_some()
    }

    /// Takes the endpoint down: the listening socket is closed (connections are refused).
    /// Connections already accepted finish. Idempotent.
    pub fn down(&self) {
        let Some(server) = lock(&self.server).take() else {
            return;
        };
        server.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = server.thread.join();
    }

    /// Brings the endpoint (back) up on the same port. Idempotent. Panics if the port cannot be
    /// bound again within 10 s.
    pub fn up(&self) {
        let mut server = lock(&self.server);
        if server.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("[idp] bind {} again: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("IdP cannot listen on {} again: {e}", self.addr),
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let shared = self.shared.clone();
            let tls = self.tls.clone();
            std::thread::Builder::new()
                .name("idp-accept".into())
                .spawn(move || accept_loop(&listener, &stop, &shared, &tls))
                .expect("spawn IdP accept thread")
        };
        *server = Some(Server { stop, thread });
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.down();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    tls: &Arc<rustls::ServerConfig>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        let tls = tls.clone();
        let _ = std::thread::Builder::new()
            .name("idp-conn".into())
            .spawn(move || serve(conn, &shared, tls));
    }
}

/// One connection: TLS, one request, one answer, close_notify.
fn serve(conn: TcpStream, shared: &Shared, tls: Arc<rustls::ServerConfig>) {
    let held = Instant::now();
    while shared.stalled.load(Ordering::SeqCst) && held.elapsed() < MAX_STALL {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(server) = rustls::ServerConnection::new(tls) else {
        return;
    };
    let mut s = rustls::StreamOwned::new(server, conn);
    let Some((method, path)) = read_head(&mut s) else {
        return;
    };
    let path = path.split('?').next().unwrap_or_default();
    let (status, body) = if method == "GET" && path == JWKS_PATH {
        // Counted before answering, so a client that has the document always sees it counted.
        shared.requests.fetch_add(1, Ordering::SeqCst);
        (200, lock(&shared.jwks).clone())
    } else {
        (404, b"not found\n".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        if status == 200 { "OK" } else { "Not Found" },
        body.len()
    );
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(&body))
        .and_then(|()| s.flush());
    s.conn.send_close_notify();
    let _ = s.flush();
}

/// Reads a request head (≤ [`MAX_HEAD`]); returns its method and target.
fn read_head(conn: &mut impl Read) -> Option<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut request_line = head.lines().next()?.split(' ');
    Some((
        request_line.next()?.to_owned(),
        request_line.next()?.to_owned(),
    ))
}
