//! The agent's token source (configuration.md `token:`, wire-protocol.md §6 RENEW and §10).
//!
//! [`TokenSource::fetch`] returns the current JWT: `token.file` is re-read on every call (so a
//! rotated file is picked up before each connect and RENEW), else `NOWCONNECT_TOKEN`.
//! The token's `iat`/`nbf`/`exp` are read without verifying the signature (the hub verifies),
//! for renew scheduling: [`TokenTimes::renew_at`]. The token itself never appears in an error or
//! in `Debug` output.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nowconnect_runtime::conf::EnvLookup;
use serde_json::Value;

use crate::config::{ClientCredentials, TokenConfig, TOKEN_ENV};

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
}

/// Where tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// `token.file`, re-read on every [`TokenSource::fetch`].
    File(PathBuf),
    /// `NOWCONNECT_TOKEN`, read once at start.
    Env(String),
    /// `token.client_credentials` (not implemented yet: fetch fails with `NotSupported`).
    ClientCredentials(ClientCredentials),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Env(_) => f.write_str("Env([redacted])"),
            TokenSource::ClientCredentials(cc) => f
                .debug_struct("ClientCredentials")
                .field("token_url", &cc.token_url)
                .field("client_id", &cc.client_id)
                .finish(),
        }
    }
}

impl TokenSource {
    /// The source `token:` names, else `NOWCONNECT_TOKEN` from `env`.
    pub fn from_config(cfg: &TokenConfig, env: EnvLookup<'_>) -> Result<Self, TokenError> {
        if let Some(file) = &cfg.file {
            return Ok(TokenSource::File(file.clone()));
        }
        if let Some(cc) = &cfg.client_credentials {
            return Ok(TokenSource::ClientCredentials(cc.clone()));
        }
        match env(TOKEN_ENV) {
            Some(t) if !t.trim().is_empty() => Ok(TokenSource::Env(t)),
            _ => Err(TokenError::NotConfigured),
        }
    }

    /// The current token: the file is read anew each time.
    pub fn fetch(&self) -> Result<Token, TokenError> {
        match self {
            TokenSource::File(path) => Token::parse(&read_token_file(path)?),
            TokenSource::Env(value) => Token::parse(value),
            TokenSource::ClientCredentials(_) => Err(TokenError::NotSupported(
                "token.client_credentials (OAuth2 client-credentials grant)",
            )),
        }
    }

    /// For logs: `file /path`, `NOWCONNECT_TOKEN` or `client_credentials`.
    pub fn describe(&self) -> String {
        match self {
            TokenSource::File(p) => format!("file {}", p.display()),
            TokenSource::Env(_) => TOKEN_ENV.to_owned(),
            TokenSource::ClientCredentials(_) => "client_credentials".to_owned(),
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
