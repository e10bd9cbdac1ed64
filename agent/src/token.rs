//! The agent's token source (configuration.md `token:`, wire-protocol.md §6 RENEW and §10).
//!
//! [`TokenSource::fetch`] returns the current JWT: `token.file` is re-read on every call (so a
//! rotated file is picked up before each connect and RENEW); `token.client_credentials` asks the
//! OAuth2 token endpoint (RFC 6749 §4.4) and caches the answer until `renew_at` of its lifetime
//! ([`CcCache`], [`ClientCredentialsSource`]); else `NOWCONNECT_TOKEN`.
//! The token's `iat`/`nbf`/`exp` are read without verifying the signature (the hub verifies),
//! for renew scheduling: [`TokenTimes::renew_at`]. The token itself never appears in an error or
//! in `Debug` output; neither does the client secret.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nowconnect_runtime::conf::EnvLookup;
use serde_json::Value;

use crate::config::{ClientCredentials, ProxyConfig, TokenConfig, TOKEN_ENV};

/// Largest token (wire-protocol.md §2: RENEW body ≤ 16 KiB).
pub const MAX_TOKEN_LEN: usize = nowconnect_core::frame::MAX_TOKEN;

/// Why no token could be had. Never carries token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// No `token.file`, no `client_credentials`, and `NOWCONNECT_TOKEN` unset.
    NotConfigured,
    /// Reading `token.file` failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// The source is empty.
    Empty,
    /// Longer than [`MAX_TOKEN_LEN`].
    TooLarge,
    /// Not a compact JWS (`header.payload.signature` of base64url).
    Malformed(&'static str),
    /// A source this build does not implement yet.
    NotSupported(&'static str),
    /// The token endpoint could not be asked: connect, TLS, timeout (no answer).
    Endpoint {
        /// The token URL (credentials redacted).
        url: String,
        /// What went wrong.
        error: String,
    },
    /// The token endpoint answered with an error status (RFC 6749 §5.2 body when it sent one).
    Refused {
        /// The token URL (credentials redacted).
        url: String,
        /// HTTP status.
        status: u16,
        /// OAuth2 `error` code (`invalid_client`, ...), sanitized.
        error: Option<String>,
        /// `error_description`, sanitized and shortened.
        description: Option<String>,
    },
    /// The token endpoint answered 2xx with something that is not a usable token response.
    BadResponse {
        /// The token URL (credentials redacted).
        url: String,
        /// Why.
        why: String,
    },
    /// The token endpoint client could not be set up (`hub.ca_file`, TLS, proxy).
    Setup(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::NotConfigured => {
                write!(f, "no token: configure token.file or set {TOKEN_ENV}")
            }
            TokenError::Io { path, error } => {
                write!(f, "cannot read token file {}: {error}", path.display())
            }
            TokenError::Empty => f.write_str("the token is empty"),
            TokenError::TooLarge => write!(f, "the token is longer than {MAX_TOKEN_LEN} bytes"),
            TokenError::Malformed(why) => write!(f, "the token is not a JWT: {why}"),
            TokenError::NotSupported(what) => write!(f, "{what} is not supported yet"),
            TokenError::Endpoint { url, error } => {
                write!(f, "token endpoint {url} could not be reached: {error}")
            }
            TokenError::Refused {
                url,
                status,
                error,
                description,
            } => {
                write!(f, "token endpoint {url} answered HTTP {status}")?;
                if let Some(e) = error {
                    write!(f, " {e}")?;
                }
                if let Some(d) = description {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
            TokenError::BadResponse { url, why } => {
                write!(f, "token endpoint {url} sent an unusable answer: {why}")
            }
            TokenError::Setup(e) => write!(f, "token endpoint client: {e}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// The registered time claims of a token (unix seconds), read without verification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenTimes {
    /// `iat`.
    pub iat: Option<u64>,
    /// `nbf`.
    pub nbf: Option<u64>,
    /// `exp`.
    pub exp: Option<u64>,
}

impl TokenTimes {
    /// When to send RENEW: `fraction` (e.g. 0.8 for `renew_at: 80%`) of the lifetime from
    /// `iat` (else `nbf`, else `fetched_at`) to `exp` (wire-protocol.md §10). `None` without
    /// `exp`. Never later than `exp`.
    pub fn renew_at(&self, fraction: f64, fetched_at: u64) -> Option<u64> {
        let exp = self.exp?;
        let start = self.iat.or(self.nbf).unwrap_or(fetched_at).min(exp);
        let life = exp - start;
        let f = fraction.clamp(0.0, 1.0);
        // life ≤ u64::MAX and f ≤ 1, so the product fits; `as` truncates toward zero.
        let offset = (life as f64 * f) as u64;
        Some(start.saturating_add(offset).min(exp))
    }

    /// When a tunnel whose token was not renewed should be replaced by a fresh one (make
    /// before break): `exp` minus a fifth of the lifetime, at least 2 s and at most 30 s before
    /// `exp`, never before the start of the lifetime. `None` without `exp`.
    pub fn replace_at(&self, fetched_at: u64) -> Option<u64> {
        let exp = self.exp?;
        let start = self.iat.or(self.nbf).unwrap_or(fetched_at).min(exp);
        let margin = ((exp - start) / 5).clamp(2, 30);
        Some(exp.saturating_sub(margin).max(start))
    }

    /// Seconds until `exp` (negative once expired); `None` without `exp`.
    pub fn seconds_until_expiry(&self, now: u64) -> Option<i64> {
        let exp = self.exp?;
        Some(if exp >= now {
            i64::try_from(exp - now).unwrap_or(i64::MAX)
        } else {
            -i64::try_from(now - exp).unwrap_or(i64::MAX)
        })
    }
}

/// A JWT ready to send (`Authorization: Bearer`, RENEW body).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    value: String,
    times: TokenTimes,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"[redacted]")
            .field("times", &self.times)
            .finish()
    }
}

impl Token {
    /// Checks the shape (three base64url parts, at most [`MAX_TOKEN_LEN`], so it is safe in
    /// an HTTP header) and reads the time claims without verifying the signature. Surrounding
    /// whitespace (a trailing newline in a file) is removed.
    pub fn parse(raw: &str) -> Result<Token, TokenError> {
        let value = raw.trim();
        if value.is_empty() {
            return Err(TokenError::Empty);
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        // Only base64url and dots: nothing that could break or inject into the upgrade headers.
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(TokenError::Malformed("characters outside base64url"));
        }
        let parts: Vec<&str> = value.split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(TokenError::Malformed("expected header.payload.signature"));
        }
        let payload = URL_SAFE_NO_PAD
            .decode(parts[1])
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let claims: Value = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload is not JSON"))?;
        let Value::Object(claims) = claims else {
            return Err(TokenError::Malformed("payload is not a JSON object"));
        };
        let time = |name: &str| -> Result<Option<u64>, TokenError> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(v) => Ok(Some(v)),
                    None => match n.as_f64() {
                        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                            Ok(Some(f as u64))
                        }
                        _ => Err(TokenError::Malformed("a time claim is not a number")),
                    },
                },
                Some(_) => Err(TokenError::Malformed("a time claim is not a number")),
            }
        };
        let times = TokenTimes {
            iat: time("iat")?,
            nbf: time("nbf")?,
            exp: time("exp")?,
        };
        Ok(Token {
            value: value.to_owned(),
            times,
        })
    }

    /// The JWT itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Its time claims.
    pub fn times(&self) -> TokenTimes {
        self.times
    }

    /// True if its `exp` is later than `other`'s (a token with an `exp` is newer than one
    /// without).
    pub fn is_newer_than(&self, other: &TokenTimes) -> bool {
        match (self.times.exp, other.exp) {
            (Some(new), Some(old)) => new > old,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// Where tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// `token.file`, re-read on every [`TokenSource::fetch`].
    File(PathBuf),
    /// `NOWCONNECT_TOKEN`, read once at start.
    Env(String),
    /// `token.client_credentials`: the OAuth2 token endpoint, cached until `renew_at`.
    ClientCredentials(Arc<ClientCredentialsSource>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Env(_) => f.write_str("Env([redacted])"),
            TokenSource::ClientCredentials(cc) => cc.fmt(f),
        }
    }
}

impl TokenSource {
    /// The source `token:` names, else `NOWCONNECT_TOKEN` from `env`. A client-credentials
    /// source trusts the system roots and uses the proxy of the environment; see
    /// [`TokenSource::from_config_with`] for the agent's `hub.ca_file` and `proxy:`.
    pub fn from_config(cfg: &TokenConfig, env: EnvLookup<'_>) -> Result<Self, TokenError> {
        Self::from_config_with(cfg, None, None, env)
    }

    /// [`TokenSource::from_config`]; the token endpoint also trusts the CA certificates in
    /// `ca_file` (the agent's `hub.ca_file`) and goes through `proxy` when set.
    pub fn from_config_with(
        cfg: &TokenConfig,
        ca_file: Option<&Path>,
        proxy: Option<&ProxyConfig>,
        env: EnvLookup<'_>,
    ) -> Result<Self, TokenError> {
        if let Some(file) = &cfg.file {
            return Ok(TokenSource::File(file.clone()));
        }
        if let Some(cc) = &cfg.client_credentials {
            let source = ClientCredentialsSource::new(cc.clone(), cfg.renew_at, ca_file, proxy)?;
            return Ok(TokenSource::ClientCredentials(Arc::new(source)));
        }
        match env(TOKEN_ENV) {
            Some(t) if !t.trim().is_empty() => Ok(TokenSource::Env(t)),
            _ => Err(TokenError::NotConfigured),
        }
    }

    /// The current token: the file is read anew each time; client credentials come from the
    /// cache until its refresh point, then from the token endpoint.
    pub fn fetch(&self) -> Result<Token, TokenError> {
        match self {
            TokenSource::File(path) => Token::parse(&read_token_file(path)?),
            TokenSource::Env(value) => Token::parse(value),
            TokenSource::ClientCredentials(cc) => cc.fetch(),
        }
    }

    /// For logs: `file /path`, `NOWCONNECT_TOKEN` or `client_credentials <token_url>`.
    pub fn describe(&self) -> String {
        match self {
            TokenSource::File(p) => format!("file {}", p.display()),
            TokenSource::Env(_) => TOKEN_ENV.to_owned(),
            TokenSource::ClientCredentials(cc) => format!("client_credentials {}", cc.url),
        }
    }
}

fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let io = |e: std::io::Error| TokenError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    // A little slack for surrounding whitespace; anything longer is refused.
    file.take(MAX_TOKEN_LEN as u64 + 1024)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() > MAX_TOKEN_LEN + 1023 {
        return Err(TokenError::TooLarge);
    }
    String::from_utf8(buf).map_err(|_| TokenError::Malformed("token file is not UTF-8"))
}

/// Largest token endpoint answer read (bytes); a longer one is refused.
pub const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// Deadline of one token endpoint request: connect, TLS, request and answer.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed request, fetches within this time get the same error without asking the
/// endpoint again (several tunnels failing together make one request, not one each).
pub const MIN_REQUEST_SPACING: Duration = Duration::from_secs(1);
/// A token without `exp` (and no `expires_in`) is asked for again after this many seconds.
const NO_EXPIRY_REFRESH_SECS: u64 = 300;
/// Longest `error` code and `error_description` kept from an error answer.
const MAX_ERROR_CODE: usize = 64;
const MAX_ERROR_DESCRIPTION: usize = 200;

/// The client-credentials cache, pure: every time is an argument.
///
/// A token is served from the cache until its refresh point (`renew_at` of its lifetime, the
/// same point at which tunnels send RENEW, so a RENEW always gets a fresh token), then asked
/// for again. A failed request is remembered for [`MIN_REQUEST_SPACING`]; while the cached
/// token has not expired it stays usable (the caller sees it is not newer).
#[derive(Debug, Default)]
pub struct CcCache {
    token: Option<Token>,
    refresh_at: u64,
    failure: Option<(Instant, TokenError)>,
}

impl CcCache {
    /// The cached token if it is not due for refresh at `now` (unix seconds).
    pub fn fresh(&self, now: u64) -> Option<Token> {
        self.token
            .as_ref()
            .filter(|t| now < self.refresh_at && t.times.exp.is_none_or(|exp| now < exp))
            .cloned()
    }

    /// The cached token if it has not expired at `now` (due for refresh or not).
    pub fn valid(&self, now: u64) -> Option<Token> {
        self.token
            .as_ref()
            .filter(|t| t.times.exp.is_none_or(|exp| now < exp))
            .cloned()
    }

    /// The error of a request that failed less than [`MIN_REQUEST_SPACING`] before `at`.
    pub fn recent_failure(&self, at: Instant) -> Option<TokenError> {
        self.failure
            .as_ref()
            .filter(|(when, _)| at.saturating_duration_since(*when) < MIN_REQUEST_SPACING)
            .map(|(_, e)| e.clone())
    }

    /// When the cached token is due for refresh (unix seconds), if there is one.
    pub fn refresh_at(&self) -> Option<u64> {
        self.token.as_ref().map(|_| self.refresh_at)
    }

    /// A token arrived at `now`; it is refreshed at `fraction` of its lifetime.
    pub fn store(&mut self, token: Token, now: u64, fraction: f64) {
        self.refresh_at = token
            .times
            .renew_at(fraction, now)
            .unwrap_or(now.saturating_add(NO_EXPIRY_REFRESH_SECS));
        self.token = Some(token);
        self.failure = None;
    }

    /// A request failed at `at`.
    pub fn failed(&mut self, error: TokenError, at: Instant) {
        self.failure = Some((at, error));
    }
}

/// `token.client_credentials`: POSTs `grant_type=client_credentials` (with `scope` and
/// `audience` when configured) to `token_url`, authenticating with HTTP Basic
/// (`client_secret_basic`, RFC 6749 §2.3.1), over HTTPS with the system roots plus the
/// agent's `hub.ca_file` (plain `http://` only to a loopback host, see the config rules). The answer's body is read up to [`MAX_TOKEN_RESPONSE`].
pub struct ClientCredentialsSource {
    cfg: ClientCredentials,
    /// `token_url` with any credentials redacted, for messages.
    url: String,
    fraction: f64,
    agent: ureq::Agent,
    cache: Mutex<CcCache>,
}

impl fmt::Debug for ClientCredentialsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.url)
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

impl ClientCredentialsSource {
    /// A source for `cfg`; tokens are refreshed at `fraction` of their lifetime.
    pub fn new(
        cfg: ClientCredentials,
        fraction: f64,
        ca_file: Option<&Path>,
        proxy: Option<&ProxyConfig>,
    ) -> Result<Self, TokenError> {
        Self::with_timeout(cfg, fraction, ca_file, proxy, TOKEN_REQUEST_TIMEOUT)
    }

    fn with_timeout(
        cfg: ClientCredentials,
        fraction: f64,
        ca_file: Option<&Path>,
        proxy: Option<&ProxyConfig>,
        timeout: Duration,
    ) -> Result<Self, TokenError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let mut roots: Vec<Certificate<'static>> = Vec::new();
        for c in rustls_native_certs::load_native_certs().certs {
            roots.push(Certificate::from_der(c.as_ref()).to_owned());
        }
        // (webpki-roots carries trust anchors, not certificates, which ureq cannot take: the
        // roots are the system store and `ca_file`.)
        if let Some(ca) = ca_file {
            let certs = nowconnect_runtime::conf::load_ca_certs(ca)
                .map_err(|e| TokenError::Setup(format!("hub.ca_file: {e}")))?;
            for c in certs {
                roots.push(Certificate::from_der(c.as_ref()).to_owned());
            }
        }
        nowconnect_runtime::install_crypto_provider();
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .ok_or_else(|| TokenError::Setup("no TLS crypto provider".into()))?;
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(provider)
            .build();
        let mut builder = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(crate::supervisor::software());
        if let Some(p) = proxy {
            builder = builder.proxy(Some(ureq_proxy(p)?));
        }
        let url = nowconnect_runtime::conf::redact_url(&cfg.token_url);
        Ok(ClientCredentialsSource {
            cfg,
            url,
            fraction,
            agent: builder.build().new_agent(),
            cache: Mutex::new(CcCache::default()),
        })
    }

    /// The cached token, or a new one from the endpoint once the cached one is due for
    /// refresh. One request at a time; a failure within [`MIN_REQUEST_SPACING`] is returned
    /// again without a request. When a refresh fails but the cached token has not expired,
    /// that token is returned (it is not newer, so RENEW waits and connects still work).
    pub fn fetch(&self) -> Result<Token, TokenError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::run::unix_now();
        if let Some(t) = cache.fresh(now) {
            return Ok(t);
        }
        if let Some(e) = cache.recent_failure(Instant::now()) {
            return cache.valid(now).ok_or(e);
        }
        let started = Instant::now();
        match self.request(now) {
            Ok(token) => {
                log::info!(
                    token_url = self.url.as_str(),
                    client_id = self.cfg.client_id.as_str(),
                    exp = token.times.exp.unwrap_or(0),
                    duration_ms = started.elapsed().as_millis() as u64;
                    "token obtained from the token endpoint"
                );
                cache.store(token.clone(), now, self.fraction);
                Ok(token)
            }
            Err(e) => {
                log::warn!(
                    token_url = self.url.as_str(),
                    client_id = self.cfg.client_id.as_str(),
                    reason = e.to_string().as_str();
                    "token endpoint request failed"
                );
                cache.failed(e.clone(), Instant::now());
                cache.valid(now).ok_or(e)
            }
        }
    }

    fn request(&self, now: u64) -> Result<Token, TokenError> {
        let cc = &self.cfg;
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &cc.scope {
            form.push(("scope", scope));
        }
        if let Some(aud) = &cc.audience {
            form.push(("audience", aud));
        }
        let credentials = format!(
            "{}:{}",
            form_encode(&cc.client_id),
            form_encode(cc.client_secret.expose())
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        let endpoint = |error: String| TokenError::Endpoint {
            url: self.url.clone(),
            error,
        };
        let mut resp = self
            .agent
            .post(&cc.token_url)
            .header("Authorization", &basic)
            .header("Accept", "application/json")
            .send_form(form)
            .map_err(|e| endpoint(redact(&e.to_string(), cc.client_secret.expose())))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_TOKEN_RESPONSE)
            .read_to_vec()
            .map_err(|e| {
                endpoint(format!(
                    "reading the answer (HTTP {status}): {}",
                    redact(&e.to_string(), cc.client_secret.expose())
                ))
            })?;
        parse_token_response(&self.url, status, &body, now, cc.client_secret.expose())
    }
}

/// A ureq proxy from `proxy:` (credentials in the proxy URL are only handed to ureq).
fn ureq_proxy(p: &ProxyConfig) -> Result<ureq::Proxy, TokenError> {
    let authority = format!("{}:{}", p.url.host, p.url.port);
    let url = match (&p.username, &p.password) {
        (Some(u), Some(pw)) => format!(
            "http://{}:{}@{authority}",
            percent_encode(u),
            percent_encode(pw.expose())
        ),
        (Some(u), None) => format!("http://{}@{authority}", percent_encode(u)),
        _ => format!("http://{authority}"),
    };
    ureq::Proxy::new(&url).map_err(|_| {
        TokenError::Setup(format!(
            "proxy.url: cannot use {} for the token endpoint",
            p.url.url
        ))
    })
}

/// Reads a token endpoint answer (RFC 6749 §5.1 / §5.2) received at `now` (unix seconds).
///
/// 2xx: a JSON object with `access_token` (a JWT: the hub needs one), `token_type` `Bearer`
/// when present, `expires_in` used as `exp` when the JWT has none. Otherwise
/// [`TokenError::Refused`] with the sanitized `error` / `error_description`. `secret` never
/// appears in the result (an endpoint echoing it is redacted).
pub fn parse_token_response(
    url: &str,
    status: u16,
    body: &[u8],
    now: u64,
    secret: &str,
) -> Result<Token, TokenError> {
    let json: Option<serde_json::Map<String, Value>> = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    };
    if !(200..300).contains(&status) {
        let text = |k: &str, max: usize| {
            json.as_ref()
                .and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(|s| sanitize(&redact(s, secret), max))
                .filter(|s| !s.is_empty())
        };
        return Err(TokenError::Refused {
            url: url.to_owned(),
            status,
            error: text("error", MAX_ERROR_CODE),
            description: text("error_description", MAX_ERROR_DESCRIPTION),
        });
    }
    let bad = |why: &str| TokenError::BadResponse {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let Some(m) = json else {
        return Err(bad("not a JSON object"));
    };
    if let Some(tt) = m.get("token_type") {
        match tt.as_str() {
            Some(t) if t.eq_ignore_ascii_case("bearer") => {}
            _ => return Err(bad("token_type is not Bearer")),
        }
    }
    let expires_in = match m.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_u64(),
        // Some endpoints send it as a string.
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    let Some(access) = m.get("access_token").and_then(Value::as_str) else {
        return Err(bad("no access_token"));
    };
    let mut token = Token::parse(access).map_err(|e| match e {
        TokenError::Malformed(why) => bad(&format!("access_token is not a JWT: {why}")),
        TokenError::TooLarge => bad(&format!(
            "access_token is longer than {MAX_TOKEN_LEN} bytes"
        )),
        _ => bad("access_token is empty"),
    })?;
    if token.times.exp.is_none() {
        token.times.exp = expires_in.map(|s| now.saturating_add(s));
        if token.times.exp.is_some() && token.times.iat.is_none() && token.times.nbf.is_none() {
            token.times.iat = Some(now);
        }
    }
    Ok(token)
}

/// Printable ASCII only, at most `max` characters.
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `s` with every occurrence of `secret` replaced.
fn redact(s: &str, secret: &str) -> String {
    if secret.is_empty() {
        s.to_owned()
    } else {
        s.replace(secret, "[redacted]")
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 Appendix B).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encoding for URL userinfo.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://idp.example/token";
    const SECRET: &str = "s3cr3t-value";

    fn jwt(claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn ok_body(token: &str, extra: &str) -> Vec<u8> {
        format!(r#"{{"access_token":"{token}","token_type":"Bearer"{extra}}}"#).into_bytes()
    }

    #[test]
    fn success_uses_the_jwt_exp_and_falls_back_to_expires_in() {
        let with_exp = jwt(&serde_json::json!({"iat": 1000, "exp": 1020}));
        let t = parse_token_response(
            URL,
            200,
            &ok_body(&with_exp, r#","expires_in":3600"#),
            1000,
            SECRET,
        )
        .expect("ok");
        assert_eq!(t.expose(), with_exp);
        assert_eq!(
            t.times().exp,
            Some(1020),
            "the JWT's exp is what the hub enforces"
        );

        let no_exp = jwt(&serde_json::json!({"sub": "a"}));
        for expires_in in [r#","expires_in":20"#, r#","expires_in":"20""#] {
            let t = parse_token_response(URL, 200, &ok_body(&no_exp, expires_in), 5000, SECRET)
                .expect("ok");
            assert_eq!(t.times().exp, Some(5020));
            assert_eq!(t.times().iat, Some(5000));
        }
        let t = parse_token_response(URL, 200, &ok_body(&no_exp, ""), 5000, SECRET).expect("ok");
        assert_eq!(t.times().exp, None);
        // token_type is compared without case; missing is fine.
        let body = format!(r#"{{"access_token":"{no_exp}","token_type":"bearer"}}"#);
        assert!(parse_token_response(URL, 201, body.as_bytes(), 0, SECRET).is_ok());
        let body = format!(r#"{{"access_token":"{no_exp}"}}"#);
        assert!(parse_token_response(URL, 200, body.as_bytes(), 0, SECRET).is_ok());
    }

    #[test]
    fn unusable_success_answers_are_refused_without_echo() {
        let good = jwt(&serde_json::json!({"exp": 10}));
        let cases: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"[1,2]".to_vec(),
            br#"{"token_type":"Bearer"}"#.to_vec(),
            br#"{"access_token":"opaque-not-a-jwt","token_type":"Bearer"}"#.to_vec(),
            format!(r#"{{"access_token":"{good}","token_type":"mac"}}"#).into_bytes(),
            br#"{"access_token":"","token_type":"Bearer"}"#.to_vec(),
            br#"{"access_token":7}"#.to_vec(),
        ];
        for body in cases {
            let e = parse_token_response(URL, 200, &body, 0, SECRET).expect_err("refused");
            assert!(matches!(e, TokenError::BadResponse { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(URL), "{msg}");
            assert!(
                !msg.contains("opaque-not-a-jwt") && !msg.contains(&good),
                "{msg}"
            );
        }
    }

    #[test]
    fn error_answers_name_status_and_code_never_the_secret() {
        let body = format!(
            r#"{{"error":"invalid_client","error_description":"bad secret {SECRET}\n\u0007 for client"}}"#
        );
        let e = parse_token_response(URL, 401, body.as_bytes(), 0, SECRET).expect_err("401");
        assert_eq!(
            e,
            TokenError::Refused {
                url: URL.into(),
                status: 401,
                error: Some("invalid_client".into()),
                description: Some("bad secret [redacted] for client".into()),
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("HTTP 401") && msg.contains("invalid_client"),
            "{msg}"
        );
        assert!(!msg.contains(SECRET), "{msg}");
        // No JSON body: the status alone; a huge description is cut.
        let e = parse_token_response(URL, 503, b"<html>down</html>", 0, SECRET).expect_err("503");
        assert_eq!(
            e.to_string(),
            format!("token endpoint {URL} answered HTTP 503")
        );
        let long = format!(
            r#"{{"error":"{}","error_description":"{}"}}"#,
            "e".repeat(500),
            "d".repeat(5000)
        );
        let TokenError::Refused {
            error, description, ..
        } = parse_token_response(URL, 400, long.as_bytes(), 0, SECRET).expect_err("400")
        else {
            panic!("not Refused");
        };
        assert_eq!(error.map(|s| s.len()), Some(MAX_ERROR_CODE));
        assert_eq!(description.map(|s| s.len()), Some(MAX_ERROR_DESCRIPTION));
    }

    fn token(iat: u64, exp: u64) -> Token {
        Token::parse(&jwt(&serde_json::json!({"iat": iat, "exp": exp}))).expect("token")
    }

    #[test]
    fn cache_serves_until_renew_at_then_refreshes_ahead_of_expiry() {
        let mut c = CcCache::default();
        assert!(c.fresh(0).is_none() && c.valid(0).is_none());
        assert_eq!(c.refresh_at(), None);
        // 20 s lifetime, refresh at 50 %: fresh for [1000, 1010), valid until 1020.
        c.store(token(1000, 1020), 1000, 0.5);
        assert_eq!(c.refresh_at(), Some(1010));
        assert_eq!(c.fresh(1000).map(|t| t.times().exp), Some(Some(1020)));
        assert!(c.fresh(1009).is_some());
        assert!(c.fresh(1010).is_none(), "due for refresh at renew_at");
        assert!(
            c.valid(1019).is_some(),
            "still usable while the refresh fails"
        );
        assert!(c.valid(1020).is_none(), "never an expired token");
        // A refreshed token replaces it.
        c.store(token(1010, 1030), 1010, 0.5);
        assert_eq!(c.refresh_at(), Some(1020));
        assert_eq!(c.fresh(1015).and_then(|t| t.times().exp), Some(1030));
        // A token without exp is asked for again after a while.
        let mut c = CcCache::default();
        c.store(
            Token::parse(&jwt(&serde_json::json!({"sub": "a"}))).expect("t"),
            50,
            0.8,
        );
        assert_eq!(c.refresh_at(), Some(50 + NO_EXPIRY_REFRESH_SECS));
    }

    #[test]
    fn cache_spaces_requests_after_a_failure() {
        let mut c = CcCache::default();
        let t0 = Instant::now();
        let e = TokenError::Endpoint {
            url: URL.into(),
            error: "timed out".into(),
        };
        c.failed(e.clone(), t0);
        assert_eq!(c.recent_failure(t0), Some(e.clone()));
        assert_eq!(c.recent_failure(t0 + MIN_REQUEST_SPACING / 2), Some(e));
        assert_eq!(c.recent_failure(t0 + MIN_REQUEST_SPACING), None);
        // A success clears it.
        c.failed(TokenError::Empty, t0);
        c.store(token(0, 100), 0, 0.8);
        assert_eq!(c.recent_failure(t0), None);
    }

    #[test]
    fn replace_and_newer() {
        let t = TokenTimes {
            iat: Some(1000),
            nbf: None,
            exp: Some(1020),
        };
        assert_eq!(t.replace_at(0), Some(1016), "a fifth of 20 s before exp");
        let long = TokenTimes {
            iat: Some(0),
            nbf: None,
            exp: Some(3600),
        };
        assert_eq!(long.replace_at(0), Some(3570), "at most 30 s before");
        let short = TokenTimes {
            iat: Some(100),
            nbf: None,
            exp: Some(101),
        };
        assert_eq!(
            short.replace_at(0),
            Some(100),
            "never before the lifetime starts"
        );
        assert_eq!(TokenTimes::default().replace_at(5), None);
        let newer = token(10, 2000);
        assert!(newer.is_newer_than(&t));
        assert!(!token(0, 1020).is_newer_than(&t));
        assert!(newer.is_newer_than(&TokenTimes::default()));
    }

    #[test]
    fn a_silent_endpoint_times_out_with_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and never answers.
        let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let cc = ClientCredentials {
            token_url: format!("http://{addr}/token"),
            client_id: "agent".into(),
            client_secret: nowconnect_runtime::conf::Secret::new(SECRET),
            scope: Some("nowconnect".into()),
            audience: None,
        };
        let source =
            ClientCredentialsSource::with_timeout(cc, 0.8, None, None, Duration::from_millis(300))
                .expect("source");
        let started = Instant::now();
        let e = source.fetch().expect_err("timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, TokenError::Endpoint { .. }), "{e:?}");
        assert!(e.to_string().to_lowercase().contains("time"), "{e}");
        assert!(!e.to_string().contains(SECRET));
        drop(hold.join());
    }

    #[test]
    fn encodings_and_debug_hide_secrets() {
        assert_eq!(form_encode("a b+c/d:é"), "a+b%2Bc%2Fd%3A%C3%A9");
        assert_eq!(percent_encode("u:p@x y"), "u%3Ap%40x%20y");
        let cc = ClientCredentials {
            token_url: "http://127.0.0.1:9/token".into(),
            client_id: "agent".into(),
            client_secret: nowconnect_runtime::conf::Secret::new(SECRET),
            scope: None,
            audience: None,
        };
        let source = ClientCredentialsSource::new(cc, 0.8, None, None).expect("source");
        let dbg = format!("{source:?}");
        assert!(dbg.contains("agent") && !dbg.contains(SECRET), "{dbg}");
        // Nothing listens on port 9: a clear transport error naming the URL, no secret.
        let e = source.fetch().expect_err("no endpoint");
        assert!(matches!(e, TokenError::Endpoint { .. }), "{e:?}");
        assert!(e.to_string().contains("http://127.0.0.1:9/token"), "{e}");
        assert!(!e.to_string().contains(SECRET));
        // Asked again at once: the remembered failure, no second request.
        assert_eq!(source.fetch().expect_err("again"), e);
    }
}
