//! [`HttpStub`]: a tiny in-process HTTP/1.1 server (plain or TLS) with canned responses, for a
//! JWKS endpoint, a PDP, or a target behind a proxy. One thread per connection,
//! `Connection: close` on every response.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsFiles;

/// Largest request head + body the stub reads.
const MAX_REQUEST: usize = 1 << 20;

/// A canned response for one path (any method).
#[derive(Clone, Debug)]
pub struct StubResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Sleep this long before answering (PDP / JWKS timeout tests).
    pub delay: Duration,
}

/// One request as the stub received it.
#[derive(Clone, Debug)]
pub struct StubRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StubRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, StubResponse>,
    requests: Vec<StubRequest>,
}

/// An HTTP server on 127.0.0.1:<free port>; unknown paths get 404. Stops on drop.
pub struct HttpStub {
    pub addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl HttpStub {
    /// Plain HTTP.
    pub fn start() -> HttpStub {
        HttpStub::start_inner(None)
    }

    /// HTTPS with `tls.cert`/`tls.key` (clients trust `tls.ca`; the URL host is `localhost`).
    pub fn start_tls(tls: &TlsFiles) -> HttpStub {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("parse stub certificate");
        let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).expect("parse stub key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("stub server config");
        HttpStub::start_inner(Some(Arc::new(config)))
    }

    fn start_inner(tls: Option<Arc<rustls::ServerConfig>>) -> HttpStub {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, crate::free_port())).expect("bind stub");
        let addr = listener.local_addr().expect("stub addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let is_tls = tls.is_some();
        let accept = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let tls = tls.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
                        match tls {
                            Some(cfg) => {
                                let Ok(server) = rustls::ServerConnection::new(cfg) else {
                                    return;
                                };
                                let mut s = rustls::StreamOwned::new(server, conn);
                                serve(&mut s, &state);
                                s.conn.send_close_notify();
                                let _ = s.flush();
                            }
                            None => {
                                let mut conn = conn;
                                serve(&mut conn, &state);
                            }
                        }
                    });
                }
            })
        };
        HttpStub {
            addr,
            tls: is_tls,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port><path>`, or `https://localhost:<port><path>` for TLS.
    pub fn url(&self, path: &str) -> String {
        if self.tls {
            format!("https://localhost:{}{path}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}{path}", self.addr.port())
        }
    }

    /// Serve `body` at `path` (replacing what was there).
    pub fn set(&self, path: &str, status: u16, content_type: &str, body: impl Into<Vec<u8>>) {
        self.set_response(
            path,
            StubResponse {
                status,
                content_type: content_type.into(),
                body: body.into(),
                delay: Duration::ZERO,
            },
        );
    }

    /// Serve `value` as `200 application/json` at `path`.
    pub fn set_json(&self, path: &str, value: &serde_json::Value) {
        self.set(path, 200, "application/json", value.to_string());
    }

    pub fn set_response(&self, path: &str, response: StubResponse) {
        self.lock().routes.insert(path.to_string(), response);
    }

    pub fn remove(&self, path: &str) {
        self.lock().routes.remove(path);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<StubRequest> {
        self.lock().requests.clone()
    }

    /// How many requests asked for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: &mut impl ReadWrite, state: &Mutex<State>) {
    let Some(req) = read_request(conn, MAX_REQUEST) else {
        return;
    };
    let response = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let path = req.path.split('?').next().unwrap_or_default().to_string();
        st.requests.push(req);
        st.routes.get(&path).cloned()
    };
    let response = response.unwrap_or_else(|| StubResponse {
        status: 404,
        content_type: "text/plain".into(),
        body: b"not found\n".to_vec(),
        delay: Duration::ZERO,
    });
    if !response.delay.is_zero() {
        std::thread::sleep(response.delay);
    }
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&response.body);
    let _ = conn.flush();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one HTTP/1.1 request: head up to `\r\n\r\n`, then a `Content-Length` body; head
/// and body each bounded by `max` bytes. `None` on EOF, a read error or an oversized head.
pub fn read_request(conn: &mut impl Read, max: usize) -> Option<StubRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > max {
            return None;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
        .min(max);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Some(StubRequest {
        method,
        path,
        headers,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
