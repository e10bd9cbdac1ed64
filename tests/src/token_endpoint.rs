//! [`TokenEndpoint`]: an in-process OAuth2 token endpoint (RFC 6749 §4.4, client credentials)
//! on loopback, plain HTTP (the agent allows `http://` token URLs only for a loopback host) or
//! HTTPS ([`TokenEndpoint::start_https`]), for the agent's `token.client_credentials`. An IdP
//! cannot run here; this is the fake.
//!
//! It checks HTTP Basic client authentication and `grant_type`, records every request, and
//! answers with a token from the minter the test sets ([`TokenEndpoint::set_minter`]) — or
//! 401 `invalid_client`, 400 `unsupported_grant_type`, or 503 while no minter is set.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsFiles;

/// Largest request the endpoint reads.
const MAX_REQUEST: usize = 64 * 1024;
/// The path it serves.
pub const TOKEN_PATH: &str = "/oauth2/token";

/// Mints one access token; returns the JWT and its lifetime in seconds (`expires_in`).
pub type Minter = Box<dyn Fn() -> (String, u64) + Send>;

/// One request as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// When it arrived.
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// `client_id` from HTTP Basic (or the form, if the client sent it there).
    pub client_id: Option<String>,
    /// The secret matched the expected one.
    pub secret_ok: bool,
    /// The form's `grant_type`.
    pub grant_type: Option<String>,
    /// The whole form, decoded (never contains the secret: it comes in the header).
    pub form: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// The status answered.
    pub status: u16,
}

impl TokenRequest {
    /// A form field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    client_id: String,
    secret: String,
    minter: Option<Minter>,
    /// HTTPS endpoints: the server configuration, once set.
    tls: Option<Arc<rustls::ServerConfig>>,
    requests: Vec<TokenRequest>,
    /// Every access token handed out.
    tokens: Vec<String>,
}

/// A token endpoint on `http://127.0.0.1:<free port>/oauth2/token`. Stops on drop.
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    https: bool,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TokenEndpoint {
    /// Plain HTTP. Accepts `client_id` with `secret`; answers 503 until a minter is set.
    pub fn start(client_id: &str, secret: &str) -> TokenEndpoint {
        TokenEndpoint::start_inner(client_id, secret, false)
    }

    /// HTTPS on `https://localhost:<port>`: connections are dropped until
    /// [`TokenEndpoint::set_tls`] gives it a certificate (so the URL can go into a config
    /// before the certificate exists).
    pub fn start_https(client_id: &str, secret: &str) -> TokenEndpoint {
        TokenEndpoint::start_inner(client_id, secret, true)
    }

    /// Serves with `tls.cert` / `tls.key` (clients trust `tls.ca`).
    pub fn set_tls(&self, tls: &TlsFiles) {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("parse endpoint certificate");
        let key =
            PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).expect("parse endpoint key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("endpoint server config");
        self.lock().tls = Some(Arc::new(config));
    }

    fn start_inner(client_id: &str, secret: &str, https: bool) -> TokenEndpoint {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, crate::free_port()))
            .expect("bind token endpoint");
        let addr = listener.local_addr().expect("token endpoint addr");
        let state = Arc::new(Mutex::new(State {
            client_id: client_id.into(),
            secret: secret.into(),
            minter: None,
            tls: None,
            requests: Vec::new(),
            tokens: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
                        if !https {
                            return serve(&mut conn, &state);
                        }
                        let tls = state.lock().unwrap_or_else(|e| e.into_inner()).tls.clone();
                        let Some(Ok(server)) = tls.map(rustls::ServerConnection::new) else {
                            return;
                        };
                        let mut s = rustls::StreamOwned::new(server, conn);
                        serve(&mut s, &state);
                        s.conn.send_close_notify();
                        let _ = s.flush();
                    });
                }
            })
        };
        TokenEndpoint {
            addr,
            https,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// The token URL: `http://127.0.0.1:<port>/oauth2/token`, or `https://localhost:<port>/...`.
    pub fn url(&self) -> String {
        if self.https {
            format!("https://localhost:{}{TOKEN_PATH}", self.addr.port())
        } else {
            format!("http://{}{TOKEN_PATH}", self.addr)
        }
    }

    /// Tokens come from `minter` from now on.
    pub fn set_minter(&self, minter: impl Fn() -> (String, u64) + Send + 'static) {
        self.lock().minter = Some(Box::new(minter));
    }

    /// The secret accepted from now on.
    pub fn set_secret(&self, secret: &str) {
        self.lock().secret = secret.into();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    /// Every access token handed out so far (to check logs for them).
    pub fn tokens(&self) -> Vec<String> {
        self.lock().tokens.clone()
    }

    /// Tokens issued so far (200 answers).
    pub fn issued(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.status == 200)
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: &mut (impl Read + Write), state: &Mutex<State>) {
    let Some(crate::http::StubRequest {
        method,
        path,
        headers,
        body,
    }) = crate::http::read_request(conn, MAX_REQUEST)
    else {
        return;
    };
    let at = Instant::now();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let form = parse_form(&String::from_utf8_lossy(&body));
    let basic = header("authorization").and_then(|v| {
        let b64 = v.strip_prefix("Basic ")?;
        let raw = String::from_utf8(b64_decode(b64.trim())?).ok()?;
        let (id, secret) = raw.split_once(':')?;
        Some((form_decode(id), form_decode(secret)))
    });
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (client_id, secret) = match basic {
        Some((id, s)) => (Some(id), Some(s)),
        None => (field("client_id"), field("client_secret")),
    };
    let grant_type = field("grant_type");
    let (status, json) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let secret_ok = client_id.as_deref() == Some(st.client_id.as_str())
            && secret.as_deref() == Some(st.secret.as_str());
        let (status, json) = if method != "POST" || path != TOKEN_PATH {
            (404, r#"{"error":"not_found"}"#.to_owned())
        } else if !secret_ok {
            (
                401,
                r#"{"error":"invalid_client","error_description":"client authentication failed"}"#
                    .to_owned(),
            )
        } else if grant_type.as_deref() != Some("client_credentials") {
            (400, r#"{"error":"unsupported_grant_type"}"#.to_owned())
        } else if let Some(mint) = &st.minter {
            let (jwt, ttl) = mint();
            st.tokens.push(jwt.clone());
            (
                200,
                serde_json::json!({"access_token": jwt, "token_type": "Bearer", "expires_in": ttl})
                    .to_string(),
            )
        } else {
            (503, r#"{"error":"temporarily_unavailable"}"#.to_owned())
        };
        st.requests.push(TokenRequest {
            at,
            method,
            path,
            client_id,
            secret_ok,
            grant_type,
            // Without client_secret, should a client send it in the form.
            form: form
                .into_iter()
                .filter(|(k, _)| k != "client_secret")
                .collect(),
            content_type: header("content-type"),
            status,
        });
        (status, json)
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        json.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(json.as_bytes());
    let _ = conn.flush();
}

fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (form_decode(k), form_decode(v)),
            None => (form_decode(p), String::new()),
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 (with or without padding).
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let len = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..=len]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders() {
        assert_eq!(
            b64_decode("YWdlbnQ6czNjcjN0").as_deref(),
            Some(&b"agent:s3cr3t"[..])
        );
        assert_eq!(b64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(form_decode("a+b%2Bc%3A"), "a b+c:");
        assert_eq!(form_decode("50%"), "50%");
        assert_eq!(
            parse_form("grant_type=client_credentials&scope=a+b"),
            vec![
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("scope".to_owned(), "a b".to_owned())
            ]
        );
    }
}
