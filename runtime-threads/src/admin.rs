//! The admin HTTP listener of both binaries (operations.md): `GET /healthz`, `/readyz`,
//! `/metrics`, and a status page at `/`. Plain HTTP (tiny_http), meant for loopback or a
//! cluster-internal port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::metrics::{render_process, Registry};

/// What the admin endpoints ask the application.
pub trait AdminState: Send + Sync + 'static {
    /// `/readyz`: whether ready, and the JSON body explaining why.
    fn readiness(&self) -> (bool, serde_json::Value);
    /// `/`: the status page (HTML, no external assets).
    fn status_page(&self) -> String;
}

/// A running admin listener.
pub struct Admin {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("addr", &self.addr).finish()
    }
}

impl Admin {
    /// Binds `addr` and serves on a background thread.
    pub fn start(
        addr: SocketAddr,
        metrics: Registry,
        state: Arc<dyn AdminState>,
    ) -> std::io::Result<Admin> {
        let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("admin listener has no IP address"))?;
        let server = Arc::new(server);
        let srv = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("nc-admin".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for req in srv.incoming_requests() {
                    serve(req, &metrics, state.as_ref());
                }
            })?;
        Ok(Admin {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Escapes text for HTML element content and attribute values (status pages).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn content_type(value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(&b"Content-Type"[..], value.as_bytes()).ok()
}

fn serve(req: tiny_http::Request, metrics: &Registry, state: &dyn AdminState) {
    let path = req.url().split('?').next().unwrap_or("").to_owned();
    let (status, ctype, body) = if *req.method() != tiny_http::Method::Get {
        (
            405,
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
        )
    } else {
        match path.as_str() {
            "/healthz" => (200, "text/plain; charset=utf-8", "ok".to_owned()),
            "/readyz" => {
                let (ready, body) = state.readiness();
                let code = if ready { 200 } else { 503 };
                (code, "application/json", body.to_string())
            }
            "/metrics" => {
                let mut text = metrics.render();
                text.push_str(&render_process());
                (200, "text/plain; version=0.0.4", text)
            }
            "/" => (200, "text/html; charset=utf-8", state.status_page()),
            _ => (404, "text/plain; charset=utf-8", "not found\n".to_owned()),
        }
    };
    let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
    if let Some(h) = content_type(ctype) {
        resp = resp.with_header(h);
    }
    let _ = req.respond(resp);
}
