//! Dialing the hub (wire-protocol.md §1): TCP, TLS (rustls, verification always on), the
//! WebSocket upgrade with the bearer token — and the classification of failures for
//! `nowconnect_agent_connects_total{result}`.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nowconnect_runtime::conf;
use nowconnect_runtime::ws::{self, ConnectError, TunnelSocket};
use nowconnect_runtime::Transport;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{HubUrl, ProxyConfig};
use crate::metrics::result;
use crate::proxy::{self, Proxy};
use crate::token::Token;

/// The TLS client config: webpki roots, the system store, and `hub.ca_file`. Certificate and
/// host-name verification are always on (security.md: there is no "skip verify" switch).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    nowconnect_runtime::install_crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        log::debug!("system CA store: {e}");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    log::debug!("system CA store: {added} roots added, {ignored} ignored");
    if let Some(path) = ca_file {
        let certs = conf::load_ca_certs(path).map_err(|e| format!("hub.ca_file: {e}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("hub.ca_file: {}: {e}", path.display()))?;
        }
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Why a dial failed. Messages name hosts and errors, never the token.
#[derive(Debug)]
pub enum DialError {
    /// The configured proxy could not be used.
    Proxy(String),
    /// DNS, TCP connect, a timeout, or the connection dropping during the handshakes.
    Network(String),
    /// TLS handshake or certificate verification.
    Tls(String),
    /// The hub answered the upgrade with this HTTP status.
    Rejected {
        /// 401, 403, 503…
        status: u16,
    },
    /// Not a valid WebSocket answer (e.g. no `nowconnect.v1` subprotocol).
    Upgrade(String),
}

impl DialError {
    /// The `result` label of `nowconnect_agent_connects_total`.
    pub fn result(&self) -> &'static str {
        match self {
            DialError::Proxy(_) => result::PROXY_ERROR,
            DialError::Tls(_) => result::TLS_ERROR,
            DialError::Rejected { status: 401 } => result::UNAUTHORIZED,
            DialError::Rejected { status: 403 } => result::FORBIDDEN,
            DialError::Rejected { .. } | DialError::Network(_) | DialError::Upgrade(_) => {
                result::NETWORK_ERROR
            }
        }
    }
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Proxy(e) => write!(f, "proxy: {e}"),
            DialError::Network(e) => write!(f, "network: {e}"),
            DialError::Tls(e) => write!(f, "TLS: {e}"),
            DialError::Rejected { status: 401 } => {
                f.write_str("hub refused the token (HTTP 401 unauthorized)")
            }
            DialError::Rejected { status: 403 } => {
                f.write_str("hub refused this agent (HTTP 403 forbidden)")
            }
            DialError::Rejected { status: 503 } => {
                f.write_str("hub is draining or at its tunnel limit (HTTP 503)")
            }
            DialError::Rejected { status } => write!(f, "hub answered HTTP {status}"),
            DialError::Upgrade(e) => write!(f, "upgrade: {e}"),
        }
    }
}

impl std::error::Error for DialError {}

impl DialError {
    /// The message without its category prefix.
    fn detail(&self) -> String {
        match self {
            DialError::Proxy(e)
            | DialError::Network(e)
            | DialError::Tls(e)
            | DialError::Upgrade(e) => e.clone(),
            other => other.to_string(),
        }
    }
}

/// Dials hub URLs: everything needed besides the token.
#[derive(Debug, Clone)]
pub struct Dialer {
    tls: Option<Arc<ClientConfig>>,
    proxy: Option<ProxyConfig>,
    /// The proxy variables of the environment, captured at start.
    proxy_env: HashMap<String, String>,
    server_name: Option<String>,
    max_message: usize,
}

impl Dialer {
    /// `tls` is required for `wss://` URLs; `server_name` overrides SNI and verification.
    pub fn new(
        tls: Option<Arc<ClientConfig>>,
        proxy: Option<ProxyConfig>,
        server_name: Option<String>,
        max_message: usize,
    ) -> Dialer {
        Dialer {
            tls,
            proxy,
            proxy_env: HashMap::new(),
            server_name,
            max_message,
        }
    }

    /// Uses the proxy variables (`HTTPS_PROXY`, `NO_PROXY`…) from `env` when `proxy:` is not
    /// configured.
    pub fn with_proxy_env(mut self, env: conf::EnvLookup<'_>) -> Dialer {
        self.proxy_env = proxy::ENV_VARS
            .iter()
            .filter_map(|k| env(k).map(|v| ((*k).to_owned(), v)))
            .collect();
        self
    }

    /// The proxy `url` is dialed through, if any.
    pub fn proxy_for(&self, url: &HubUrl) -> Result<Option<Proxy>, DialError> {
        let env = |k: &str| self.proxy_env.get(k).cloned();
        proxy::select(self.proxy.as_ref(), url, &env).map_err(DialError::Proxy)
    }

    /// TCP (+ TLS) + WebSocket upgrade with `Authorization: Bearer`, all within
    /// [`ws::HANDSHAKE_TIMEOUT`]. The socket is ready for `Tunnel::spawn`.
    pub fn dial(&self, url: &HubUrl, token: &Token) -> Result<TunnelSocket, DialError> {
        let deadline = Instant::now() + ws::HANDSHAKE_TIMEOUT;
        let tcp = match self.proxy_for(url)? {
            Some(p) => connect_via(&p, url, deadline)?,
            None => connect_tcp(&url.host, url.port, deadline)?,
        };
        let transport = if url.tls {
            let Some(config) = &self.tls else {
                return Err(DialError::Tls("no TLS client configuration".into()));
            };
            let name = self.server_name.as_deref().unwrap_or(&url.host);
            let server_name = ServerName::try_from(name.to_owned())
                .map_err(|e| DialError::Tls(format!("invalid server name \"{name}\": {e}")))?;
            Transport::tls_client(config.clone(), server_name, tcp, deadline)
                .map_err(|e| io_failure(&format!("TLS handshake with {}", url.authority()), e))?
        } else {
            Transport::plain(tcp, deadline).map_err(|e| DialError::Network(e.to_string()))?
        };
        ws::connect(transport, &url.url, token.expose(), self.max_message).map_err(|e| match e {
            ConnectError::Rejected { status } => DialError::Rejected { status },
            ConnectError::Protocol(e) => DialError::Upgrade(e),
            ConnectError::Io(e) => io_failure("WebSocket upgrade", e),
        })
    }
}

/// An I/O error during a handshake: TLS if rustls raised it, network otherwise.
fn io_failure(what: &str, e: io::Error) -> DialError {
    let tls = e.kind() == io::ErrorKind::InvalidData
        || e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
    if tls {
        DialError::Tls(format!("{what}: {e}"))
    } else {
        DialError::Network(format!("{what}: {e}"))
    }
}

/// TCP to the proxy and `CONNECT` to the hub's name; the stream is then a tunnel to the hub.
/// Messages name the proxy (without credentials) and its status, never the password.
fn connect_via(p: &Proxy, url: &HubUrl, deadline: Instant) -> Result<TcpStream, DialError> {
    let shown = &p.shown;
    let mut tcp = connect_tcp(&p.host, p.port, deadline)
        .map_err(|e| DialError::Proxy(format!("{shown}: {}", e.detail())))?;
    let fail = |what: &str, e: io::Error| DialError::Proxy(format!("{shown}: {what}: {e}"));
    let left = |tcp: &TcpStream| -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))
    };
    left(&tcp).map_err(|e| fail("CONNECT", e))?;
    let req = proxy::connect_request(&url.host, url.port, p.auth.as_ref());
    tcp.write_all(req.as_bytes())
        .map_err(|e| fail("sending CONNECT", e))?;
    // Byte by byte so nothing past the header (the hub's first TLS bytes) is consumed.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= proxy::MAX_RESPONSE_HEADERS {
            return Err(DialError::Proxy(format!(
                "{shown}: CONNECT response headers exceed {} bytes",
                proxy::MAX_RESPONSE_HEADERS
            )));
        }
        left(&tcp).map_err(|e| fail("reading the CONNECT response", e))?;
        match tcp.read(&mut byte) {
            Ok(0) => {
                return Err(DialError::Proxy(format!(
                    "{shown}: connection closed during CONNECT"
                )))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail("reading the CONNECT response", e)),
        }
    }
    let status =
        proxy::parse_status(&head).map_err(|e| DialError::Proxy(format!("{shown}: {e}")))?;
    if !(200..300).contains(&status) {
        let line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default())
            .into_owned();
        let reason = line
            .trim_end()
            .splitn(3, ' ')
            .nth(2)
            .unwrap_or("")
            .to_owned();
        return Err(DialError::Proxy(format!(
            "{shown}: {} for CONNECT {}",
            proxy::status_error(status, &reason),
            url.authority()
        )));
    }
    tcp.set_read_timeout(None)
        .and_then(|()| tcp.set_write_timeout(None))
        .map_err(|e| fail("CONNECT", e))?;
    log::debug!("connected to {} through proxy {shown}", url.authority());
    Ok(tcp)
}

/// Resolves `host` and connects to the first address that answers before `deadline`.
fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, DialError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| DialError::Network(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = format!("connect to {addr}: timed out");
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(DialError::Network(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_follow_operations_md() {
        let cases = [
            (DialError::Rejected { status: 401 }, "unauthorized"),
            (DialError::Rejected { status: 403 }, "forbidden"),
            (DialError::Rejected { status: 503 }, "network_error"),
            (DialError::Tls("x".into()), "tls_error"),
            (DialError::Proxy("x".into()), "proxy_error"),
            (DialError::Network("x".into()), "network_error"),
            (DialError::Upgrade("x".into()), "network_error"),
        ];
        for (e, want) in cases {
            assert_eq!(e.result(), want, "{e}");
        }
    }

    #[test]
    fn rustls_errors_are_tls_failures() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(io_failure("x", e), DialError::Tls(_)));
        let e = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(matches!(io_failure("x", e), DialError::Network(_)));
    }
}
