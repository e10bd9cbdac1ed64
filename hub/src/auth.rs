//! Agent authentication: the bearer JWT on the upgrade and in RENEW (security.md "Agent
//! authentication", wire-protocol.md §1 and §10 "Handshake and auth").
//!
//! - [`validate_token`]: pure validation of one token against a [`JwkSet`] at a given time.
//!   The algorithm comes from policy and the JWK, never from the header alone: `none` and every
//!   HMAC algorithm are refused whatever the header says, the header's `alg` must be in
//!   `auth.algorithms`, and the key found by `kid` must agree on kty/crv/alg/use.
//! - [`JwksCache`]: when to refresh (periodic, and rate-limited on an unknown `kid`), with time
//!   passed in; [`Jwks`]: that cache plus its [`JwksSource`] (`jwks_file` or `jwks_url` via ureq).
//! - [`Authenticator`]: both together, as the upgrade and RENEW paths use them.
//!
//! No message or log summary ever contains the token: a [`TokenSummary`] holds `kid`/`sub`/`jti`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, SUPPORTED_ALGORITHMS};

/// Largest token accepted (wire-protocol.md §2: RENEW body ≤ 16 KiB; the same bound on the upgrade).
pub const MAX_TOKEN_LEN: usize = nowconnect_core::frame::MAX_TOKEN;
/// Largest JWKS document accepted, from a file or over HTTPS.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Smallest gap between two refreshes triggered by an unknown `kid` (security.md: rate-limited).
pub const KID_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Retry interval while no JWKS has ever loaded (the hub is not ready meanwhile).
pub const UNLOADED_RETRY: Duration = Duration::from_secs(5);
/// Retry interval after a failed refresh while older keys are still in use.
pub const FAILED_RETRY: Duration = Duration::from_secs(30);
/// Overall timeout of one JWKS fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Overall timeout of the fetch an unknown `kid` triggers: it runs inside an upgrade, whose
/// whole handshake must fit in 10 s.
pub const KID_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Policy and results
// ---------------------------------------------------------------------------------------------

/// What a token must satisfy (from `auth:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// Required `iss`.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Allowed algorithms; `none`/HMAC are refused even if listed here.
    pub algorithms: Vec<Algorithm>,
    /// Claim holding the agent id.
    pub agent_id_claim: String,
    /// Claim holding connector scopes, when enforced.
    pub connectors_claim: Option<String>,
    /// Clock skew allowed on exp/nbf/iat, in seconds.
    pub leeway_secs: u64,
}

impl AuthPolicy {
    /// The policy of an `auth:` section.
    pub fn from_config(cfg: &AuthConfig) -> Self {
        AuthPolicy {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            algorithms: cfg.algorithms.clone(),
            agent_id_claim: cfg.agent_id_claim.clone(),
            connectors_claim: cfg.connectors_claim.clone(),
            leeway_secs: cfg.leeway.as_secs(),
        }
    }
}

/// The log-safe identity of a token: `kid`, `sub`, `jti` only (operations.md "Logs"). Values
/// come from an unverified token when it was refused: sanitized and truncated, never trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSummary {
    /// Header `kid`.
    pub kid: Option<String>,
    /// `sub` claim.
    pub sub: Option<String>,
    /// `jti` claim.
    pub jti: Option<String>,
}

impl TokenSummary {
    /// `kid` for a log field (`-` when absent).
    pub fn kid(&self) -> &str {
        self.kid.as_deref().unwrap_or("-")
    }

    /// `sub` for a log field (`-` when absent).
    pub fn sub(&self) -> &str {
        self.sub.as_deref().unwrap_or("-")
    }

    /// `jti` for a log field (`-` when absent).
    pub fn jti(&self) -> &str {
        self.jti.as_deref().unwrap_or("-")
    }
}

impl fmt::Display for TokenSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        write!(
            f,
            "kid={} sub={} jti={}",
            show(&self.kid),
            show(&self.sub),
            show(&self.jti)
        )
    }
}

/// Keeps at most 64 printable ASCII characters of an untrusted value for logs.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Value of the agent-id claim; HELLO.agent_id must equal it.
    pub agent_id: String,
    /// Connector scopes when `auth.connectors_claim` is set (a missing claim is an empty
    /// scope: every HELLO connector is then rejected); `None` when scopes are not enforced.
    pub connectors: Option<Vec<String>>,
    /// `exp` (unix seconds).
    pub exp: u64,
    /// `iat` (unix seconds), if present.
    pub iat: Option<u64>,
    /// `nbf` (unix seconds), if present.
    pub nbf: Option<u64>,
    /// kid/sub/jti for logs.
    pub summary: TokenSummary,
}

/// Why a token was refused. [`Reason::as_str`] is a stable snake_case name for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Not a compact JWS, bad base64 or JSON.
    Malformed,
    /// Longer than [`MAX_TOKEN_LEN`].
    TooLarge,
    /// Header `alg` is `none`.
    AlgorithmNone,
    /// Header `alg` is HS256/384/512.
    AlgorithmHmac,
    /// Header `alg` unknown or unsupported.
    AlgorithmUnsupported,
    /// Header `alg` supported but not in `auth.algorithms`.
    AlgorithmNotAllowed,
    /// Header has `crit` (no extension is understood).
    CriticalHeader,
    /// Header has no `kid`.
    MissingKid,
    /// `kid` not in the JWKS (after the one allowed refresh).
    UnknownKid,
    /// The JWK's kty/crv/alg/use/key_ops disagree with the token, or the key is unusable.
    KeyMismatch,
    /// The signature does not verify.
    BadSignature,
    /// No `exp`.
    MissingExp,
    /// `exp` passed (beyond leeway).
    Expired,
    /// `nbf` in the future (beyond leeway).
    NotYetValid,
    /// `iat` in the future (beyond leeway).
    IssuedInFuture,
    /// `iss` missing or not `auth.issuer`.
    WrongIssuer,
    /// `aud` missing or without `auth.audience`.
    WrongAudience,
    /// Agent-id claim missing, empty or not a string.
    MissingAgentId,
    /// Connector scopes claim neither a list of strings nor a string.
    BadConnectorsClaim,
    /// A registered claim with the wrong type (e.g. `exp` a string).
    BadClaim,
}

impl Reason {
    /// Stable name: `expired`, `wrong_audience`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too_large",
            Reason::AlgorithmNone => "alg_none",
            Reason::AlgorithmHmac => "alg_hmac",
            Reason::AlgorithmUnsupported => "alg_unsupported",
            Reason::AlgorithmNotAllowed => "alg_not_allowed",
            Reason::CriticalHeader => "crit_header",
            Reason::MissingKid => "missing_kid",
            Reason::UnknownKid => "unknown_kid",
            Reason::KeyMismatch => "key_mismatch",
            Reason::BadSignature => "bad_signature",
            Reason::MissingExp => "missing_exp",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::IssuedInFuture => "issued_in_future",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::MissingAgentId => "missing_agent_id",
            Reason::BadConnectorsClaim => "bad_connectors_claim",
            Reason::BadClaim => "bad_claim",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused token: the reason, a detail built only from enumerated values and policy (never
/// token bytes), and the token's log summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub reason: Reason,
    /// Human detail, e.g. `JWK alg RS256 disagrees with token alg ES256`.
    pub detail: String,
    /// kid/sub/jti as far as they could be read.
    pub summary: TokenSummary,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.reason, self.detail, self.summary)
    }
}

/// Result of authenticating an upgrade or a RENEW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token: 401 with a bare `WWW-Authenticate: Bearer` (RFC 6750 §3.1).
    Missing,
    /// Refused: 401 with `WWW-Authenticate: Bearer error="invalid_token"`.
    Invalid(Rejection),
    /// `kid` not in the JWKS: the caller may refresh the JWKS once (rate-limited) and retry,
    /// else treat it as [`AuthError::Invalid`]. [`Authenticator`] does exactly that.
    UnknownKid(Rejection),
    /// No JWKS has loaded yet: the hub is not ready, 503 (security.md).
    Unavailable,
}

impl AuthError {
    /// The HTTP status for the upgrade response.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Unavailable => 503,
            _ => 401,
        }
    }

    /// The `WWW-Authenticate` header value, if any.
    pub fn www_authenticate(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => Some("Bearer"),
            AuthError::Invalid(_) | AuthError::UnknownKid(_) => {
                Some("Bearer error=\"invalid_token\"")
            }
            AuthError::Unavailable => None,
        }
    }

    /// The refusal reason, for invalid tokens.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            AuthError::Invalid(r) | AuthError::UnknownKid(r) => Some(r.reason),
            _ => None,
        }
    }

    /// The token's log summary, for invalid tokens.
    pub fn summary(&self) -> Option<&TokenSummary> {
        match self {
            AuthError::Invalid(r) | AuthError::UnknownKid(r) => Some(&r.summary),
            _ => None,
        }
    }

    /// One-line plain-text body for the HTTP response (never echoes the token).
    pub fn body(&self) -> String {
        match self {
            AuthError::Missing => "missing bearer token".to_owned(),
            AuthError::Invalid(r) | AuthError::UnknownKid(r) => {
                format!("invalid token: {}", r.reason)
            }
            AuthError::Unavailable => "hub not ready: signing keys not loaded".to_owned(),
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => f.write_str("missing bearer token"),
            AuthError::Invalid(r) | AuthError::UnknownKid(r) => write!(f, "invalid token: {r}"),
            AuthError::Unavailable => f.write_str("JWKS not loaded"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Extracts the token from an `Authorization` header value. No header, or another scheme,
/// is [`AuthError::Missing`]; `Bearer` with nothing after it is invalid.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let Some(h) = authorization else {
        return Err(AuthError::Missing);
    };
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthError::Invalid(Rejection {
            reason: Reason::Malformed,
            detail: "empty bearer token".to_owned(),
            summary: TokenSummary::default(),
        }));
    }
    Ok(token)
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct Refuse<'a> {
    summary: &'a TokenSummary,
}

impl Refuse<'_> {
    fn invalid(&self, reason: Reason, detail: impl Into<String>) -> AuthError {
        AuthError::Invalid(Rejection {
            reason,
            detail: detail.into(),
            summary: self.summary.clone(),
        })
    }
}

fn decode_part(part: &str, max: usize) -> Option<Map<String, Value>> {
    if part.len() > max {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Reads a NumericDate claim: `Ok(None)` if absent, `Err` if not a non-negative number.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, ()> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(()),
                }
            }
        }
        Some(_) => Err(()),
    }
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(sanitize)
}

/// Maps a header `alg` to an allowed [`Algorithm`] or the refusal reason. `none` and HMAC are
/// refused before anything else, whatever the policy says.
fn header_algorithm(alg: &str, policy: &AuthPolicy) -> Result<Algorithm, (Reason, String)> {
    if alg.eq_ignore_ascii_case("none") {
        return Err((
            Reason::AlgorithmNone,
            "alg none is never accepted".to_owned(),
        ));
    }
    if alg.len() >= 2 && alg[..2].eq_ignore_ascii_case("HS") {
        return Err((
            Reason::AlgorithmHmac,
            "HMAC algorithms are never accepted".to_owned(),
        ));
    }
    let Some(a) = SUPPORTED_ALGORITHMS
        .iter()
        .copied()
        .find(|a| format!("{a:?}") == alg)
    else {
        return Err((
            Reason::AlgorithmUnsupported,
            "unsupported algorithm".to_owned(),
        ));
    };
    if !policy.algorithms.contains(&a) {
        return Err((
            Reason::AlgorithmNotAllowed,
            format!("algorithm {a:?} is not in auth.algorithms"),
        ));
    }
    Ok(a)
}

/// The JWK must be a signature key of the token's algorithm (security.md: kty/alg/use agree).
fn check_jwk(jwk: &Jwk, alg: Algorithm) -> Result<(), String> {
    if let Some(u) = &jwk.common.public_key_use {
        if *u != PublicKeyUse::Signature {
            return Err("JWK use is not sig".to_owned());
        }
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("JWK key_ops does not include verify".to_owned());
        }
    }
    if let Some(ka) = jwk.common.key_algorithm {
        if ka == KeyAlgorithm::UNKNOWN_ALGORITHM || format!("{ka:?}") != format!("{alg:?}") {
            return Err(format!("JWK alg {ka:?} disagrees with token alg {alg:?}"));
        }
    }
    let ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            if !matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) {
                false
            } else {
                let n = URL_SAFE_NO_PAD
                    .decode(rsa.n.trim_end_matches('='))
                    .map_err(|_| "JWK n is not base64url".to_owned())?;
                let bits = n
                    .iter()
                    .position(|b| *b != 0)
                    .map_or(0, |i| (n.len() - i) * 8 - n[i].leading_zeros() as usize);
                if bits < MIN_RSA_BITS {
                    return Err(format!(
                        "JWK RSA key has {bits} bits (at least {MIN_RSA_BITS} required)"
                    ));
                }
                true
            }
        }
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(okp) => {
            okp.curve == EllipticCurve::Ed25519 && alg == Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("JWK is a symmetric (oct) key: refused".to_owned())
        }
        _ => return Err("JWK key type is not supported".to_owned()),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("JWK key type/curve does not fit token alg {alg:?}"))
    }
}

/// Validates `token` against `keys` at `now` (unix seconds). Pure: no clock, no I/O.
///
/// Order: size and shape; header `alg` (none/HMAC refused, then the allow-list), `crit`,
/// `kid`; the JWK by kid ([`AuthError::UnknownKid`] if absent) and its agreement with the
/// algorithm; the signature; then `exp` (required), `nbf`, `iat`, `iss`, `aud`, the agent-id
/// claim and the connector scopes.
pub fn validate_token(
    policy: &AuthPolicy,
    keys: &JwkSet,
    token: &str,
    now: u64,
) -> Result<Verified, AuthError> {
    let mut summary = TokenSummary::default();
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refuse { summary: &summary }.invalid(
            Reason::TooLarge,
            format!("token longer than {MAX_TOKEN_LEN} bytes"),
        ));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refuse { summary: &summary }
            .invalid(Reason::Malformed, "not a compact JWS (three parts)"));
    };
    let Some(header) = decode_part(h64, 8 * 1024) else {
        return Err(
            Refuse { summary: &summary }.invalid(Reason::Malformed, "header is not base64url JSON")
        );
    };
    summary.kid = header.get("kid").and_then(Value::as_str).map(sanitize);
    // Claims are read before verification only to fill the log summary.
    let claims = decode_part(p64, MAX_TOKEN_LEN);
    if let Some(c) = &claims {
        summary.sub = string_claim(c, "sub");
        summary.jti = string_claim(c, "jti");
    }
    let refuse = Refuse { summary: &summary };

    let Some(alg_name) = header.get("alg").and_then(Value::as_str) else {
        return Err(refuse.invalid(Reason::Malformed, "header has no alg"));
    };
    let alg = header_algorithm(alg_name, policy).map_err(|(r, d)| refuse.invalid(r, d))?;
    if header.contains_key("crit") {
        return Err(refuse.invalid(
            Reason::CriticalHeader,
            "critical header extensions are not supported",
        ));
    }
    let Some(kid) = header.get("kid").and_then(Value::as_str) else {
        return Err(refuse.invalid(Reason::MissingKid, "header has no kid"));
    };
    // An IdP may publish several keys under one kid (e.g. a `sig` and an `enc` key): the first
    // that fits the token's algorithm is used.
    let mut candidates = keys
        .keys
        .iter()
        .filter(|k| k.common.key_id.as_deref() == Some(kid));
    let Some(first) = candidates.next() else {
        return Err(AuthError::UnknownKid(Rejection {
            reason: Reason::UnknownKid,
            detail: "kid not found in the JWKS".to_owned(),
            summary: summary.clone(),
        }));
    };
    let jwk = match check_jwk(first, alg) {
        Ok(()) => first,
        Err(detail) => candidates
            .find(|k| check_jwk(k, alg).is_ok())
            .ok_or_else(|| refuse.invalid(Reason::KeyMismatch, detail))?,
    };
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|_| refuse.invalid(Reason::KeyMismatch, "JWK is not a usable key"))?;
    // The signed message is the first two parts exactly as sent.
    let message = &token[..h64.len() + 1 + p64.len()];
    match jsonwebtoken::crypto::verify(s64, message.as_bytes(), &key, alg) {
        Ok(true) => {}
        Ok(false) => return Err(refuse.invalid(Reason::BadSignature, "signature does not verify")),
        Err(_) => {
            return Err(refuse.invalid(
                Reason::BadSignature,
                "signature cannot be checked with this key",
            ))
        }
    }

    let Some(claims) = claims else {
        return Err(refuse.invalid(Reason::Malformed, "payload is not base64url JSON"));
    };
    let leeway = policy.leeway_secs;
    let bad_claim =
        |name: &str| refuse.invalid(Reason::BadClaim, format!("{name} is not a number"));
    let exp = numeric_date(&claims, "exp").map_err(|()| bad_claim("exp"))?;
    let nbf = numeric_date(&claims, "nbf").map_err(|()| bad_claim("nbf"))?;
    let iat = numeric_date(&claims, "iat").map_err(|()| bad_claim("iat"))?;
    // wire-protocol.md §10: a token without exp is refused.
    let Some(exp) = exp else {
        return Err(refuse.invalid(Reason::MissingExp, "token has no exp"));
    };
    if now >= exp.saturating_add(leeway) {
        return Err(refuse.invalid(Reason::Expired, "token expired"));
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(refuse.invalid(Reason::NotYetValid, "nbf is in the future"));
    }
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(refuse.invalid(Reason::IssuedInFuture, "iat is in the future"));
    }
    if claims.get("iss").and_then(Value::as_str) != Some(policy.issuer.as_str()) {
        return Err(refuse.invalid(Reason::WrongIssuer, "iss does not match auth.issuer"));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => *a == policy.audience,
        Some(Value::Array(list)) => list
            .iter()
            .any(|a| a.as_str() == Some(policy.audience.as_str())),
        _ => false,
    };
    if !aud_ok {
        return Err(refuse.invalid(Reason::WrongAudience, "aud does not contain auth.audience"));
    }
    let agent_id = match claims.get(&policy.agent_id_claim) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(refuse.invalid(
                Reason::MissingAgentId,
                format!(
                    "claim {} (auth.agent_id_claim) is missing or not a non-empty string",
                    sanitize(&policy.agent_id_claim)
                ),
            ))
        }
    };
    let connectors = match &policy.connectors_claim {
        None => None,
        Some(name) => Some(match claims.get(name) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item.as_str() {
                        Some(s) => out.push(s.to_owned()),
                        None => {
                            return Err(refuse.invalid(
                                Reason::BadConnectorsClaim,
                                "connectors claim has a non-string entry",
                            ))
                        }
                    }
                }
                out
            }
            Some(_) => {
                return Err(refuse.invalid(
                    Reason::BadConnectorsClaim,
                    "connectors claim is neither a list nor a string",
                ))
            }
        }),
    };
    Ok(Verified {
        agent_id,
        connectors,
        exp,
        iat,
        nbf,
        summary,
    })
}

// ---------------------------------------------------------------------------------------------
// JWKS: parsing, source, cache
// ---------------------------------------------------------------------------------------------

/// A JWKS that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    /// File or network read failed.
    Io(String),
    /// HTTP error status or transport failure.
    Http(String),
    /// Not a JWKS document.
    Parse(String),
    /// A JWKS with no key carrying a `kid`.
    NoKeys,
    /// Building the HTTPS client failed (bad `jwks_ca`).
    Setup(String),
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksError::Io(e) => write!(f, "cannot read JWKS: {e}"),
            JwksError::Http(e) => write!(f, "JWKS fetch failed: {e}"),
            JwksError::Parse(e) => write!(f, "not a valid JWKS: {e}"),
            JwksError::NoKeys => f.write_str("JWKS has no key with a kid"),
            JwksError::Setup(e) => write!(f, "JWKS client setup failed: {e}"),
        }
    }
}

impl std::error::Error for JwksError {}

/// Parses a JWKS document; at least one key must have a `kid` (tokens are matched by kid).
///
/// Keys are parsed one by one: a key this hub cannot read (a member of the wrong type, say, in
/// a key meant for something else) is left out rather than failing the whole set, so one odd
/// key published by the IdP does not take every other key (and the hub's readiness) with it.
pub fn parse_jwks(bytes: &[u8]) -> Result<JwkSet, JwksError> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let raw: RawSet = serde_json::from_slice(bytes).map_err(|e| JwksError::Parse(e.to_string()))?;
    let published = raw.keys.len();
    let keys: Vec<Jwk> = raw
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .collect();
    if keys.len() < published {
        log::debug!(
            "JWKS: {} of {published} key(s) left out (not readable as a JWK)",
            published - keys.len()
        );
    }
    if !keys.iter().any(|k| k.common.key_id.is_some()) {
        return Err(JwksError::NoKeys);
    }
    Ok(JwkSet { keys })
}

/// The `kid`s of a key set, sorted, deduplicated and sanitized (for logs).
pub fn kids(set: &JwkSet) -> Vec<String> {
    let mut kids: Vec<String> = set
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.as_deref().map(sanitize))
        .collect();
    kids.sort();
    kids.dedup();
    kids
}

/// Reads and parses a JWKS file (at most [`MAX_JWKS_BYTES`]).
pub fn load_jwks_file(path: &Path) -> Result<JwkSet, JwksError> {
    let file =
        std::fs::File::open(path).map_err(|e| JwksError::Io(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| JwksError::Io(format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_JWKS_BYTES {
        return Err(JwksError::Io(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        )));
    }
    parse_jwks(&bytes)
}

/// Where the keys come from.
pub enum JwksSource {
    /// `auth.jwks_file`, re-read on every refresh.
    File(PathBuf),
    /// `auth.jwks_url`, fetched with ureq.
    Url {
        /// The URL.
        url: String,
        /// HTTPS client: process rustls provider, system + webpki roots + `jwks_ca`, timeout.
        agent: ureq::Agent,
    },
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::File(p) => f.debug_tuple("File").field(p).finish(),
            JwksSource::Url { url, .. } => f.debug_struct("Url").field("url", url).finish(),
        }
    }
}

/// TLS for the hub's HTTPS clients (JWKS, PDP): the system roots, Mozilla's
/// (webpki-root-certs) and `extra`, with the process rustls crypto provider (ring if none is
/// installed).
pub(crate) fn https_tls_config(
    extra: &[rustls::pki_types::CertificateDer<'_>],
) -> ureq::tls::TlsConfig {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let native = rustls_native_certs::load_native_certs().certs;
    let roots: Vec<Certificate<'static>> = native
        .iter()
        .map(|c| c.as_ref())
        .chain(
            webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .map(|c| c.as_ref()),
        )
        .chain(extra.iter().map(|c| c.as_ref()))
        .map(|der| Certificate::from_der(der).to_owned())
        .collect();
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(provider)
        .build()
}

impl JwksSource {
    /// The source an `auth:` section names.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, JwksError> {
        match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(file), _) => Ok(JwksSource::File(file.clone())),
            (None, Some(url)) => Self::url(url, cfg.jwks_ca.as_deref(), FETCH_TIMEOUT),
            (None, None) => Err(JwksError::Setup("no jwks_url or jwks_file".to_owned())),
        }
    }

    /// An HTTPS source. Roots: the system store, Mozilla's (webpki-root-certs) and `extra_ca`.
    /// Uses the process rustls crypto provider (ring if none is installed).
    pub fn url(url: &str, extra_ca: Option<&Path>, timeout: Duration) -> Result<Self, JwksError> {
        let extra = match extra_ca {
            Some(ca) => nowconnect_runtime::conf::load_ca_certs(ca).map_err(JwksError::Setup)?,
            None => Vec::new(),
        };
        let tls = https_tls_config(&extra);
        // An https:// JWKS URL never follows a redirect to plain http.
        let https = url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(timeout))
            .http_status_as_error(true)
            .https_only(https)
            .max_redirects(3)
            .build()
            .new_agent();
        Ok(JwksSource::Url {
            url: url.to_owned(),
            agent,
        })
    }

    /// Loads the key set once (blocking; a URL fetch is bounded by its timeout).
    pub fn fetch(&self) -> Result<JwkSet, JwksError> {
        self.fetch_within(None)
    }

    /// [`JwksSource::fetch`], a URL fetch bounded by `timeout` instead of the source's own.
    pub fn fetch_within(&self, timeout: Option<Duration>) -> Result<JwkSet, JwksError> {
        match self {
            JwksSource::File(path) => load_jwks_file(path),
            JwksSource::Url { url, agent } => {
                let mut req = agent.get(url).header("Accept", "application/json");
                if let Some(t) = timeout {
                    req = req.config().timeout_global(Some(t)).build();
                }
                let mut resp = req.call().map_err(|e| JwksError::Http(e.to_string()))?;
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_JWKS_BYTES)
                    .read_to_vec()
                    .map_err(|e| JwksError::Io(e.to_string()))?;
                parse_jwks(&body)
            }
        }
    }
}

/// When to refresh the keys, and the keys themselves. Pure: every time is passed in.
///
/// - Never loaded: due every [`UNLOADED_RETRY`].
/// - Loaded, last refresh ok: due every `refresh_every` (never if `None`).
/// - Loaded, last refresh failed: due after `min(FAILED_RETRY, refresh_every)`; the last good
///   keys stay in use (security.md).
/// - Unknown kid: one refresh per `kid_refresh_min` at most ([`JwksCache::try_begin_kid_refresh`]).
#[derive(Debug, Clone)]
pub struct JwksCache {
    keys: Option<Arc<JwkSet>>,
    refresh_every: Option<Duration>,
    kid_refresh_min: Duration,
    last_attempt: Option<Instant>,
    last_ok: bool,
    last_kid_refresh: Option<Instant>,
}

impl JwksCache {
    /// An empty cache.
    pub fn new(refresh_every: Option<Duration>, kid_refresh_min: Duration) -> Self {
        JwksCache {
            keys: None,
            refresh_every,
            kid_refresh_min,
            last_attempt: None,
            last_ok: false,
            last_kid_refresh: None,
        }
    }

    /// The current keys, if any ever loaded.
    pub fn keys(&self) -> Option<Arc<JwkSet>> {
        self.keys.clone()
    }

    /// True once a JWKS has loaded (readiness).
    pub fn is_loaded(&self) -> bool {
        self.keys.is_some()
    }

    /// When the next periodic refresh is due (`None`: never); `now` if never attempted.
    pub fn next_refresh(&self, now: Instant) -> Option<Instant> {
        let Some(last) = self.last_attempt else {
            return Some(now);
        };
        let wait = if self.keys.is_none() {
            UNLOADED_RETRY
        } else if !self.last_ok {
            self.refresh_every
                .map_or(FAILED_RETRY, |d| d.min(FAILED_RETRY))
        } else {
            self.refresh_every?
        };
        last.checked_add(wait)
    }

    /// True if a periodic refresh is due at `now`.
    pub fn refresh_due(&self, now: Instant) -> bool {
        self.next_refresh(now).is_some_and(|t| now >= t)
    }

    /// Records the start of a refresh at `now`.
    pub fn begin_refresh(&mut self, now: Instant) {
        self.last_attempt = Some(now);
    }

    /// Claims the rate-limited unknown-kid refresh: true (and recorded) if allowed at `now`.
    pub fn try_begin_kid_refresh(&mut self, now: Instant) -> bool {
        let allowed = self
            .last_kid_refresh
            .is_none_or(|t| now.saturating_duration_since(t) >= self.kid_refresh_min);
        if allowed {
            self.last_kid_refresh = Some(now);
            self.last_attempt = Some(now);
        }
        allowed
    }

    /// Installs a fetch result: new keys replace the old; an error keeps the last good keys.
    /// Returns the number of keys, or the error.
    pub fn finish_refresh(
        &mut self,
        result: Result<JwkSet, JwksError>,
    ) -> Result<usize, JwksError> {
        match result {
            Ok(set) => {
                let n = set.keys.len();
                self.keys = Some(Arc::new(set));
                self.last_ok = true;
                Ok(n)
            }
            Err(e) => {
                self.last_ok = false;
                Err(e)
            }
        }
    }
}

/// What started a JWKS refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshTrigger {
    /// The first load, the periodic `jwks_refresh`, a retry, or an explicit [`Jwks::refresh`].
    Scheduled,
    /// A token with a `kid` not in the JWKS (rate-limited).
    UnknownKid,
}

/// One finished refresh, as the [`Jwks`] observer sees it (metrics and logs).
#[derive(Debug)]
pub struct RefreshEvent<'a> {
    /// What started it.
    pub trigger: RefreshTrigger,
    /// Keys were in use before it.
    pub was_loaded: bool,
    /// The number of keys installed, or why nothing was (the last good keys stay).
    pub result: &'a Result<usize, JwksError>,
    /// The `kid`s now in use, when this refresh changed them (see [`kids`]).
    pub kids_changed: Option<Vec<String>>,
}

type Observer = Box<dyn Fn(&RefreshEvent<'_>) + Send + Sync>;

/// A [`JwksSource`] with its [`JwksCache`], shareable between threads. Fetches run outside the
/// lock, so validations never wait on the network (only the one caller that refreshes does).
/// Every finished refresh, whatever started it, is reported to the observer, if one is set.
pub struct Jwks {
    source: JwksSource,
    cache: Mutex<JwksCache>,
    observer: OnceLock<Observer>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("cache", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Keys from `source`, refreshed every `refresh_every`.
    pub fn new(source: JwksSource, refresh_every: Option<Duration>) -> Self {
        Self::with_cache(
            source,
            JwksCache::new(refresh_every, KID_REFRESH_MIN_INTERVAL),
        )
    }

    /// With a cache built by the caller (custom rate limits, tests).
    pub fn with_cache(source: JwksSource, cache: JwksCache) -> Self {
        Jwks {
            source,
            cache: Mutex::new(cache),
            observer: OnceLock::new(),
        }
    }

    /// From `auth:`; nothing is fetched yet.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, JwksError> {
        Ok(Self::new(JwksSource::from_config(cfg)?, cfg.jwks_refresh))
    }

    /// Calls `f` after every finished refresh (periodic or unknown-kid). Only the first
    /// observer set is kept; returns false if one was already set.
    pub fn set_observer(&self, f: impl Fn(&RefreshEvent<'_>) + Send + Sync + 'static) -> bool {
        self.observer.set(Box::new(f)).is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, JwksCache> {
        // A panic while holding this lock cannot leave the cache inconsistent (plain fields).
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// The current keys, if loaded.
    pub fn keys(&self) -> Option<Arc<JwkSet>> {
        self.lock().keys()
    }

    /// True once a JWKS has loaded.
    pub fn is_loaded(&self) -> bool {
        self.lock().is_loaded()
    }

    /// When the next periodic refresh is due (`None`: never).
    pub fn next_refresh(&self, now: Instant) -> Option<Instant> {
        self.lock().next_refresh(now)
    }

    /// Installs a fetch result and tells the observer.
    fn finish(
        &self,
        trigger: RefreshTrigger,
        fetched: Result<JwkSet, JwksError>,
    ) -> Result<usize, JwksError> {
        let new_kids = fetched.as_ref().ok().map(kids);
        let (was_loaded, old_kids, result) = {
            let mut cache = self.lock();
            let old = cache.keys();
            let result = cache.finish_refresh(fetched);
            (old.is_some(), old.map(|k| kids(&k)), result)
        };
        if let Some(observe) = self.observer.get() {
            let kids_changed = new_kids.filter(|k| old_kids.as_ref() != Some(k));
            observe(&RefreshEvent {
                trigger,
                was_loaded,
                result: &result,
                kids_changed,
            });
        }
        result
    }

    /// Fetches now and installs the result (an error keeps the last good keys).
    pub fn refresh(&self, now: Instant) -> Result<usize, JwksError> {
        self.lock().begin_refresh(now);
        let fetched = self.source.fetch();
        self.finish(RefreshTrigger::Scheduled, fetched)
    }

    /// Refreshes if due at `now`; `None` if not due.
    pub fn refresh_if_due(&self, now: Instant) -> Option<Result<usize, JwksError>> {
        {
            let mut cache = self.lock();
            if !cache.refresh_due(now) {
                return None;
            }
            cache.begin_refresh(now);
        }
        let fetched = self.source.fetch();
        Some(self.finish(RefreshTrigger::Scheduled, fetched))
    }

    /// The unknown-kid refresh: `None` if rate-limited, else the refresh result. The fetch is
    /// bounded by [`KID_FETCH_TIMEOUT`] (it runs inside an upgrade).
    pub fn refresh_for_unknown_kid(&self, now: Instant) -> Option<Result<usize, JwksError>> {
        if !self.lock().try_begin_kid_refresh(now) {
            return None;
        }
        let fetched = self.source.fetch_within(Some(KID_FETCH_TIMEOUT));
        Some(self.finish(RefreshTrigger::UnknownKid, fetched))
    }
}

// ---------------------------------------------------------------------------------------------
// Authenticator
// ---------------------------------------------------------------------------------------------

/// Policy plus keys: what the upgrade handler and RENEW use.
#[derive(Debug)]
pub struct Authenticator {
    policy: AuthPolicy,
    jwks: Jwks,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticator {
    /// From parts.
    pub fn new(policy: AuthPolicy, jwks: Jwks) -> Self {
        Authenticator { policy, jwks }
    }

    /// From `auth:`; the JWKS is not fetched yet (call `jwks().refresh(..)` at start-up).
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, JwksError> {
        Ok(Self::new(
            AuthPolicy::from_config(cfg),
            Jwks::from_config(cfg)?,
        ))
    }

    /// The policy.
    pub fn policy(&self) -> &AuthPolicy {
        &self.policy
    }

    /// The keys.
    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }

    /// Authenticates an upgrade from its `Authorization` header value, with the system clocks.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Verified, AuthError> {
        self.authenticate_at(authorization, unix_now(), Instant::now())
    }

    /// [`Authenticator::authenticate`] at the given times.
    pub fn authenticate_at(
        &self,
        authorization: Option<&str>,
        now_unix: u64,
        now: Instant,
    ) -> Result<Verified, AuthError> {
        if !self.jwks.is_loaded() {
            return Err(AuthError::Unavailable);
        }
        let token = bearer_token(authorization)?;
        self.validate_at(token, now_unix, now)
    }

    /// Validates a bare token (RENEW), with the system clocks.
    pub fn validate(&self, token: &str) -> Result<Verified, AuthError> {
        self.validate_at(token, unix_now(), Instant::now())
    }

    /// Validates a bare token. On an unknown kid the JWKS is refreshed once (rate-limited) and
    /// the token tried again; a kid still unknown is [`AuthError::Invalid`].
    pub fn validate_at(
        &self,
        token: &str,
        now_unix: u64,
        now: Instant,
    ) -> Result<Verified, AuthError> {
        let Some(keys) = self.jwks.keys() else {
            return Err(AuthError::Unavailable);
        };
        match validate_token(&self.policy, &keys, token, now_unix) {
            Err(AuthError::UnknownKid(rejection)) => match self.jwks.refresh_for_unknown_kid(now) {
                Some(Ok(_)) => {
                    let keys = self.jwks.keys().unwrap_or(keys);
                    match validate_token(&self.policy, &keys, token, now_unix) {
                        Err(AuthError::UnknownKid(r)) => Err(AuthError::Invalid(r)),
                        other => other,
                    }
                }
                _ => Err(AuthError::Invalid(rejection)),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    struct Key {
        jwk: Value,
        encoding: EncodingKey,
        alg: Algorithm,
    }

    fn ec(kid: &str, alg: Algorithm) -> Key {
        let (curve, crv, coord) = match alg {
            Algorithm::ES384 => (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384", 48),
            _ => (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256", 32),
        };
        let pair = rcgen::KeyPair::generate_for(curve).expect("EC key");
        let raw = pair.public_key_raw();
        Key {
            jwk: json!({"kty": "EC", "crv": crv, "x": b64(&raw[1..=coord]),
                        "y": b64(&raw[1 + coord..]), "kid": kid, "alg": format!("{alg:?}"),
                        "use": "sig"}),
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("pem"),
            alg,
        }
    }

    fn ed(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        Key {
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key_raw()),
                        "kid": kid, "alg": "EdDSA", "use": "sig"}),
            encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).expect("pem"),
            alg: Algorithm::EdDSA,
        }
    }

    fn policy() -> AuthPolicy {
        AuthPolicy {
            issuer: "https://idp.test/".into(),
            audience: "hub".into(),
            algorithms: vec![Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA],
            agent_id_claim: "sub".into(),
            connectors_claim: None,
            leeway_secs: 30,
        }
    }

    fn token(key: &Key, kid: &str) -> String {
        let mut h = Header::new(key.alg);
        h.kid = Some(kid.into());
        let claims = json!({"iss": "https://idp.test/", "aud": "hub", "sub": "a1",
                            "exp": NOW + 600, "iat": NOW});
        jsonwebtoken::encode(&h, &claims, &key.encoding).expect("sign")
    }

    fn set(jwks: &[&Value]) -> JwkSet {
        parse_jwks(json!({ "keys": jwks }).to_string().as_bytes()).expect("JWKS")
    }

    #[test]
    fn each_configured_curve_algorithm_verifies_and_only_with_its_own_key_type() {
        let keys = [
            ec("p256", Algorithm::ES256),
            ec("p384", Algorithm::ES384),
            ed("ed"),
        ];
        let jwks = set(&keys.iter().map(|k| &k.jwk).collect::<Vec<_>>());
        for (key, kid) in keys.iter().zip(["p256", "p384", "ed"]) {
            let v = validate_token(&policy(), &jwks, &token(key, kid), NOW)
                .unwrap_or_else(|e| panic!("{kid}: {e}"));
            assert_eq!(v.agent_id, "a1");
            // The same signature presented under another key's kid never verifies.
            for other in ["p256", "p384", "ed"].iter().filter(|o| **o != kid) {
                let err = validate_token(&policy(), &jwks, &token(key, other), NOW)
                    .expect_err("another kid");
                assert_eq!(err.reason(), Some(Reason::KeyMismatch), "{kid} as {other}");
            }
        }
        // A JWK without alg/use still has to fit by kty and curve.
        let mut bare = ec("bare", Algorithm::ES384).jwk;
        bare.as_object_mut().expect("object").remove("alg");
        bare.as_object_mut().expect("object").remove("use");
        let jwks = set(&[&bare]);
        let p256 = ec("x", Algorithm::ES256);
        let err = validate_token(&policy(), &jwks, &token(&p256, "bare"), NOW).expect_err("P-256");
        assert_eq!(err.reason(), Some(Reason::KeyMismatch));
    }

    #[test]
    fn one_unreadable_key_does_not_sink_the_set() {
        let good = ec("good", Algorithm::ES256);
        let bad = json!({"kty": "EC", "crv": "P-256", "x": 1, "y": [], "kid": "bad", "use": 7});
        let jwks = parse_jwks(json!({"keys": [bad, good.jwk]}).to_string().as_bytes())
            .expect("the readable key is kept");
        assert_eq!(kids(&jwks), vec!["good".to_owned()]);
        assert!(validate_token(&policy(), &jwks, &token(&good, "good"), NOW).is_ok());
        // Nothing readable: no keys.
        let only_bad = json!({"keys": [{"kid": "x", "use": 7}]});
        assert_eq!(
            parse_jwks(only_bad.to_string().as_bytes()),
            Err(JwksError::NoKeys)
        );
    }

    #[test]
    fn a_kid_shared_by_an_encryption_key_and_a_signing_key_uses_the_signing_key() {
        let sig = ec("shared", Algorithm::ES256);
        let mut enc = ec("shared", Algorithm::ES256).jwk;
        enc["use"] = json!("enc");
        enc["alg"] = json!("ECDH-ES");
        let jwks = set(&[&enc, &sig.jwk]);
        assert!(validate_token(&policy(), &jwks, &token(&sig, "shared"), NOW).is_ok());
        // Only the encryption key: refused with the mismatch.
        let jwks = set(&[&enc]);
        let err = validate_token(&policy(), &jwks, &token(&sig, "shared"), NOW).expect_err("enc");
        assert_eq!(err.reason(), Some(Reason::KeyMismatch));
    }

    #[test]
    fn every_refresh_is_reported_to_the_observer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jwks.json");
        let a = ec("a", Algorithm::ES256);
        let b = ed("b");
        let write = |keys: &[&Value]| {
            std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write JWKS")
        };
        write(&[&a.jwk]);
        let jwks = Jwks::with_cache(
            JwksSource::File(path.clone()),
            JwksCache::new(None, Duration::from_secs(30)),
        );
        type Seen = (
            RefreshTrigger,
            bool,
            Result<usize, JwksError>,
            Option<Vec<String>>,
        );
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        assert!(jwks.set_observer({
            let seen = seen.clone();
            move |ev: &RefreshEvent<'_>| {
                seen.lock().expect("lock").push((
                    ev.trigger,
                    ev.was_loaded,
                    ev.result.clone(),
                    ev.kids_changed.clone(),
                ));
            }
        }));
        assert!(
            !jwks.set_observer(|_: &RefreshEvent<'_>| {}),
            "only one observer"
        );
        let t0 = Instant::now();
        let take = || std::mem::take(&mut *seen.lock().expect("lock"));

        assert_eq!(jwks.refresh(t0), Ok(1));
        assert_eq!(
            take(),
            vec![(
                RefreshTrigger::Scheduled,
                false,
                Ok(1),
                Some(vec!["a".into()])
            )]
        );
        assert_eq!(jwks.refresh(t0), Ok(1));
        assert_eq!(take(), vec![(RefreshTrigger::Scheduled, true, Ok(1), None)]);

        write(&[&a.jwk, &b.jwk]);
        assert_eq!(jwks.refresh_for_unknown_kid(t0), Some(Ok(2)));
        assert_eq!(
            take(),
            vec![(
                RefreshTrigger::UnknownKid,
                true,
                Ok(2),
                Some(vec!["a".into(), "b".into()])
            )]
        );
        // Rate-limited: no fetch, nothing reported.
        assert_eq!(
            jwks.refresh_for_unknown_kid(t0 + Duration::from_secs(29)),
            None
        );
        assert!(take().is_empty());

        // A failed refresh is reported and keeps the keys.
        std::fs::remove_file(&path).expect("remove JWKS");
        assert!(matches!(jwks.refresh(t0), Err(JwksError::Io(_))));
        let events = take();
        assert_eq!(events.len(), 1);
        assert!(matches!(
            &events[0],
            (RefreshTrigger::Scheduled, true, Err(JwksError::Io(_)), None)
        ));
        assert_eq!(
            jwks.keys().map(|k| kids(&k)),
            Some(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn an_https_source_never_follows_a_redirect_to_plain_http() {
        // An https URL gets an https_only agent (ureq then refuses any http:// hop).
        let https = JwksSource::url("https://127.0.0.1:1/jwks", None, Duration::from_secs(1))
            .expect("source");
        let JwksSource::Url { agent, .. } = &https else {
            panic!("not a URL source");
        };
        assert!(agent.config().https_only());
        let http = JwksSource::url("http://127.0.0.1:1/jwks", None, Duration::from_secs(1))
            .expect("source");
        let JwksSource::Url { agent, .. } = &http else {
            panic!("not a URL source");
        };
        assert!(!agent.config().https_only());
    }
}
