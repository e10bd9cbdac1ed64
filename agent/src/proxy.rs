//! HTTP CONNECT proxy selection (configuration.md "Environment"): `proxy:` or else
//! `HTTPS_PROXY`/`HTTP_PROXY` with `NO_PROXY`, and the CONNECT request itself. Pure: the
//! environment comes in as an [`EnvLookup`], so tests never touch the process env.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nowconnect_runtime::conf::{EnvLookup, Secret};

use crate::config::{HubUrl, ProxyConfig, ProxyUrl};

/// Upper bound on the proxy's CONNECT response headers.
pub const MAX_RESPONSE_HEADERS: usize = 8 * 1024;

/// A proxy to dial through. `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP of the proxy (IPv6 without brackets).
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// The URL without credentials, for logs.
    pub shown: String,
    /// Basic auth (user, password).
    pub auth: Option<(String, Secret)>,
}

impl Proxy {
    /// From `proxy:`.
    pub fn from_config(p: &ProxyConfig) -> Proxy {
        let auth = p.username.clone().map(|u| {
            (
                u,
                p.password
                    .clone()
                    .unwrap_or_else(|| Secret::new(String::new())),
            )
        });
        Proxy {
            host: p.url.host.clone(),
            port: p.url.port,
            shown: p.url.url.clone(),
            auth,
        }
    }

    /// Parses a proxy environment value: `http://[user:pass@]host[:port][/]` (a bare
    /// `host:port` is taken as `http://`). Userinfo is percent-decoded.
    pub fn from_env_value(value: &str) -> Result<Proxy, String> {
        let v = value.trim();
        let v = if v.contains("://") {
            v.to_owned()
        } else {
            format!("http://{v}")
        };
        let (scheme, rest) = v.split_once("://").unwrap_or(("http", &v));
        let auth_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(auth_end);
        let (auth, hostport) = match authority.rfind('@') {
            Some(at) => {
                let info = &authority[..at];
                let (u, p) = info.split_once(':').unwrap_or((info, ""));
                let user = percent_decode(u);
                (
                    Some((user, Secret::new(percent_decode(p)))),
                    &authority[at + 1..],
                )
            }
            None => (None, authority),
        };
        let clean = format!("{scheme}://{hostport}{path}");
        let url = ProxyUrl::parse(&clean)?;
        Ok(Proxy {
            host: url.host,
            port: url.port,
            shown: url.url,
            auth,
        })
    }

    /// `host:port` of the proxy, bracketing IPv6.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(x) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every variable [`select`] may read.
pub const ENV_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// The environment variables for a hub URL, in order of preference.
fn env_vars(tls: bool) -> [&'static str; 2] {
    if tls {
        ["HTTPS_PROXY", "https_proxy"]
    } else {
        ["HTTP_PROXY", "http_proxy"]
    }
}

fn lookup(env: EnvLookup<'_>, names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        env(n)
            .filter(|v| !v.trim().is_empty())
            .map(|v| ((*n).to_owned(), v))
    })
}

/// The proxy for `hub`: `proxy:` if configured, else the environment (unless `NO_PROXY`
/// matches the hub host). `Err` names the variable when its value is not a usable URL.
pub fn select(
    configured: Option<&ProxyConfig>,
    hub: &HubUrl,
    env: EnvLookup<'_>,
) -> Result<Option<Proxy>, String> {
    if let Some(p) = configured {
        return Ok(Some(Proxy::from_config(p)));
    }
    let Some((var, value)) = lookup(env, &env_vars(hub.tls)) else {
        return Ok(None);
    };
    if let Some((_, no_proxy)) = lookup(env, &["NO_PROXY", "no_proxy"]) {
        if no_proxy_matches(&no_proxy, &hub.host) {
            return Ok(None);
        }
    }
    Proxy::from_env_value(&value)
        .map(Some)
        .map_err(|e| format!("{var}: {e}"))
}

/// True when `host` is excluded by a `NO_PROXY` list: `*`, exact host names, `.suffix` or
/// `suffix` domains (matching the name and its subdomains), IPs and CIDRs. Ports in entries
/// are ignored. No implicit loopback bypass.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip: Option<IpAddr> = host.parse().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.to_ascii_lowercase();
            if let Some((net, bits)) = entry.split_once('/') {
                return match (net.parse::<IpAddr>(), bits.parse::<u8>(), host_ip) {
                    (Ok(net), Ok(bits), Some(ip)) => cidr_contains(net, bits, ip),
                    _ => false,
                };
            }
            let entry = strip_port(&entry);
            if let Ok(ip) = entry.parse::<IpAddr>() {
                return host_ip == Some(ip);
            }
            if host_ip.is_some() {
                return false;
            }
            let domain = entry.trim_start_matches("*.").trim_start_matches('.');
            let domain = domain.trim_end_matches('.');
            !domain.is_empty()
                && (host == domain
                    || (host.len() > domain.len()
                        && host.ends_with(domain)
                        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'))
        })
}

fn strip_port(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => entry,
    }
}

fn cidr_contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The CONNECT request for `host:port` (the hub's *name*, never resolved here).
pub fn connect_request(host: &str, port: u16, auth: Option<&(String, Secret)>) -> String {
    let target = authority(host, port);
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = auth {
        let cred = STANDARD.encode(format!("{user}:{}", pass.expose()));
        req.push_str(&format!("Proxy-Authorization: Basic {cred}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Parses the status line of a CONNECT response: `Ok(status)`.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| format!("invalid status line \"{}\"", line.trim_end())),
        _ => Err(format!("not an HTTP response: \"{}\"", line.trim_end())),
    }
}

/// The message for a non-2xx CONNECT answer.
pub fn status_error(status: u16, reason: &str) -> String {
    match status {
        401 | 407 => format!("proxy authentication required (HTTP {status})"),
        _ if reason.is_empty() => format!("proxy refused CONNECT (HTTP {status})"),
        _ => format!("proxy refused CONNECT (HTTP {status} {reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn hub(url: &str) -> HubUrl {
        HubUrl::parse(url).expect("hub URL")
    }

    #[test]
    fn no_proxy_matching() {
        let l = "internal.corp, .example.com,example.org, 10.0.0.0/8, 192.168.1.5, ::1, fd00::/8";
        for h in [
            "internal.corp",
            "a.example.com",
            "example.com",
            "example.org",
            "x.y.example.org",
            "10.1.2.3",
            "192.168.1.5",
            "::1",
            "[::1]",
            "fd12::1",
            "INTERNAL.corp",
        ] {
            assert!(no_proxy_matches(l, h), "{h}");
        }
        for h in [
            "a.internal.corp.evil",
            "badexample.com",
            "notexample.org",
            "11.0.0.1",
            "192.168.1.6",
            "localhost",
            "127.0.0.1",
            "fe80::1",
        ] {
            assert!(!no_proxy_matches(l, h), "{h}");
        }
        assert!(no_proxy_matches(" * ", "anything"));
        assert!(no_proxy_matches("hub.corp:443", "hub.corp"));
        assert!(!no_proxy_matches("", "hub.corp"));
        assert!(no_proxy_matches("corp", "hub.corp"));
    }

    #[test]
    fn env_selection() {
        let vars: HashMap<&str, &str> = [
            ("https_proxy", "http://user:p%40ss@proxy.corp:3128"),
            ("HTTP_PROXY", "proxy2:8080"),
            ("no_proxy", ".local"),
        ]
        .into_iter()
        .collect();
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let p = select(None, &hub("wss://hub.example.com/tunnel"), &env)
            .expect("valid")
            .expect("a proxy");
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.shown, "http://proxy.corp:3128");
        let (u, pw) = p.auth.expect("auth");
        assert_eq!((u.as_str(), pw.expose()), ("user", "p@ss"));
        let p = select(None, &hub("ws://hub.example.com/tunnel"), &env)
            .expect("valid")
            .expect("a proxy");
        assert_eq!((p.host.as_str(), p.port, p.auth), ("proxy2", 8080, None));
        assert_eq!(
            select(None, &hub("wss://hub.local/t"), &env).expect("valid"),
            None
        );
        // No implicit loopback bypass.
        assert!(select(None, &hub("wss://127.0.0.1/t"), &env)
            .expect("valid")
            .is_some());
        let none = |_: &str| None;
        assert_eq!(
            select(None, &hub("wss://hub/t"), &none).expect("valid"),
            None
        );
        // Uppercase wins over lowercase.
        let both = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://up:1".to_string()),
            "https_proxy" => Some("http://low:2".to_string()),
            _ => None,
        };
        let p = select(None, &hub("wss://hub/t"), &both)
            .expect("valid")
            .expect("a proxy");
        assert_eq!(p.host, "up");
        // proxy: wins over the environment and ignores NO_PROXY.
        let cfg = ProxyConfig {
            url: ProxyUrl::parse("http://cfg:3128").expect("url"),
            username: Some("u".into()),
            password: Some(Secret::new("pw")),
        };
        let p = select(Some(&cfg), &hub("wss://hub.local/t"), &env)
            .expect("valid")
            .expect("a proxy");
        assert_eq!(p.host, "cfg");
        assert_eq!(p.auth.as_ref().expect("auth").1.expose(), "pw");
        // A bad value is an error that does not leak the password.
        let bad = |k: &str| (k == "HTTPS_PROXY").then(|| "https://u:secret@p:1".to_string());
        let e = select(None, &hub("wss://hub/t"), &bad).expect_err("invalid");
        assert!(e.starts_with("HTTPS_PROXY"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn connect_request_and_status() {
        let auth = ("user".to_string(), Secret::new("pass"));
        assert_eq!(
            connect_request("hub.example.com", 443, Some(&auth)),
            "CONNECT hub.example.com:443 HTTP/1.1\r\nHost: hub.example.com:443\r\n\
             Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n"
        );
        assert_eq!(
            connect_request("::1", 8443, None),
            "CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n"
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 200 Connection established\r\n"),
            Ok(200)
        );
        assert_eq!(parse_status(b"HTTP/1.1 407 Proxy Auth\r\n"), Ok(407));
        assert!(parse_status(b"SSH-2.0\r\n").is_err());
        assert!(status_error(401, "Unauthorized").contains("proxy authentication required"));
        assert!(status_error(407, "").contains("407"));
        assert_eq!(
            status_error(403, "Forbidden"),
            "proxy refused CONNECT (HTTP 403 Forbidden)"
        );
    }

    #[test]
    fn debug_hides_password() {
        let p = Proxy::from_env_value("http://u:topsecret@p:1").expect("valid");
        assert!(!format!("{p:?}").contains("topsecret"));
    }
}
