//! `hub.yaml` (configuration.md "Hub"): every key with its default, and the validations that make
//! a bad file an exit-2 error naming the key path.
//!
//! [`HubConfig::load`] reads, expands `${VAR}`, deserializes (unknown keys are errors) and
//! validates. [`HubConfig::check_files`] is the `--check` extra: the TLS cert/key, `jwks_file`
//! and `jwks_ca` are read and parsed. Relative file names are taken from the config file's
//! directory.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use nowconnect_runtime::conf::{
    self, de, AdminConfig, Cidr, ConfigError, EnvLookup, LoggingConfig, Source,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Deserializer};

/// Algorithms a hub may be configured to accept (security.md). `none` and HMAC never.
pub const SUPPORTED_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The whole `hub.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The agents' WebSocket endpoint. Default `0.0.0.0:8443`.
    #[serde(default = "default_listen", deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Upgrade path. Default `/v1/tunnel`.
    #[serde(default = "default_path")]
    pub path: String,
    /// Certificate and key; required unless `plaintext: true`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Serve `ws://` (behind a TLS-terminating load balancer, or tests).
    #[serde(default, deserialize_with = "de::boolean")]
    pub plaintext: bool,
    /// Admin listener (/metrics /healthz /readyz); none when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Agent authentication.
    pub auth: AuthConfig,
    /// Optional authorization features.
    #[serde(default, deserialize_with = "de::or_default")]
    pub authz: AuthzConfig,
    /// Connector listeners.
    pub connectors: Vec<ConnectorConfig>,
    /// Logging.
    #[serde(default, deserialize_with = "de::or_default")]
    pub logging: LoggingConfig,
    /// Limits and timers.
    #[serde(default, deserialize_with = "de::or_default")]
    pub limits: Limits,
}

/// `tls:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain.
    #[serde(deserialize_with = "de::path")]
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(deserialize_with = "de::path")]
    pub key: PathBuf,
}

/// `auth:` (security.md "Agent authentication").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// JWKS over HTTPS (exactly one of `jwks_url` / `jwks_file`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS from a file (air-gapped / tests).
    #[serde(default, deserialize_with = "de::opt_path")]
    pub jwks_file: Option<PathBuf>,
    /// Extra CA roots for the JWKS fetch.
    #[serde(default, deserialize_with = "de::opt_path")]
    pub jwks_ca: Option<PathBuf>,
    /// Periodic JWKS refresh; `0` disables it (refresh on unknown kid still happens).
    /// Default 10m.
    #[serde(
        default = "default_jwks_refresh",
        deserialize_with = "de::duration_or_off"
    )]
    pub jwks_refresh: Option<Duration>,
    /// Accepted signature algorithms. Default `[RS256, ES256]`.
    #[serde(default = "default_algorithms", deserialize_with = "algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Claim that must equal HELLO.agent_id. Default `sub`.
    #[serde(default = "default_agent_id_claim")]
    pub agent_id_claim: String,
    /// Claim listing the connectors the agent may serve; scopes are enforced when set.
    #[serde(default)]
    pub connectors_claim: Option<String>,
    /// Clock skew allowed on exp/nbf/iat. Default 30s.
    #[serde(default = "default_leeway", deserialize_with = "de::duration")]
    pub leeway: Duration,
}

/// `authz:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// When present every OPEN is authorized by this PDP.
    #[serde(default)]
    pub pdp: Option<PdpConfig>,
}

/// `authz.pdp:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdpConfig {
    /// POST endpoint.
    pub url: String,
    /// Per-request timeout. Default 500ms.
    #[serde(default = "default_pdp_timeout", deserialize_with = "de::duration")]
    pub timeout: Duration,
    /// Decision cache lifetime; `0` disables the cache. Default 30s.
    #[serde(default = "default_cache_ttl", deserialize_with = "de::duration")]
    pub cache_ttl: Duration,
    /// What a PDP error or timeout means. Default `deny`.
    #[serde(default)]
    pub on_error: OnError,
}

/// `authz.pdp.on_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse the connection.
    #[default]
    Deny,
    /// Let it through.
    Allow,
}

/// One entry of `connectors:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// `[A-Za-z0-9._-]`, 1–64, unique.
    #[serde(deserialize_with = "de::connector_name")]
    pub name: String,
    /// Client-facing listen address.
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Optional client allow-list; others are refused.
    #[serde(default)]
    pub allow_clients: Option<Vec<Cidr>>,
    /// Idle stream timeout; `None` (written `0`) disables. Default 1h.
    #[serde(default = "default_idle", deserialize_with = "de::duration_or_off")]
    pub idle_timeout: Option<Duration>,
}

impl ConnectorConfig {
    /// True if a client from `ip` may use this connector.
    pub fn allows(&self, ip: IpAddr) -> bool {
        match &self.allow_clients {
            None => true,
            Some(list) => list.iter().any(|c| c.contains(ip)),
        }
    }
}

/// `limits:` (wire-protocol.md §9 defaults).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent tunnels. Default 1000.
    #[serde(deserialize_with = "de::count_u32")]
    pub max_tunnels: u32,
    /// Concurrent streams per tunnel. Default 10000.
    #[serde(deserialize_with = "de::count_u32")]
    pub max_streams_per_tunnel: u32,
    /// Initial per-stream window. Default 256KiB.
    #[serde(deserialize_with = "de::size_u32")]
    pub window: u32,
    /// Auto-tuning ceiling per stream. Default 16MiB.
    #[serde(deserialize_with = "de::size_u32")]
    pub max_window: u32,
    /// Per-session budget for all granted windows. Default 256MiB.
    #[serde(deserialize_with = "de::size_u64")]
    pub max_buffered: u64,
    /// Largest DATA payload. Default 64KiB.
    #[serde(deserialize_with = "de::size_u32")]
    pub max_frame: u32,
    /// Largest WebSocket message. Default 1MiB.
    #[serde(deserialize_with = "de::size_usize")]
    pub max_message: usize,
    /// HELLO deadline. Default 10s.
    #[serde(deserialize_with = "de::duration")]
    pub hello_timeout: Duration,
    /// OPEN without OPEN_OK/RST deadline. Default 15s.
    #[serde(deserialize_with = "de::duration")]
    pub open_timeout: Duration,
    /// Heartbeat. Default 20s.
    #[serde(deserialize_with = "de::duration")]
    pub heartbeat: Duration,
    /// Drain grace on shutdown and after GOAWAY. Default 30s.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let core = nowconnect_core::Config::default();
        Limits {
            max_tunnels: 1000,
            max_streams_per_tunnel: core.max_streams,
            window: core.window,
            max_window: core.max_window,
            max_buffered: core.max_buffered,
            max_frame: core.max_frame,
            max_message: core.max_message,
            hello_timeout: core.hello_timeout,
            open_timeout: core.open_timeout,
            heartbeat: core.heartbeat,
            shutdown_grace: core.shutdown_grace,
        }
    }
}

impl Limits {
    /// The core session config for the hub side. `idle_timeout` is the connectors' default
    /// (per-stream overrides come from each connector).
    pub fn session_config(&self) -> nowconnect_core::Config {
        nowconnect_core::Config {
            window: self.window,
            max_window: self.max_window,
            max_buffered: self.max_buffered,
            max_frame: self.max_frame,
            max_message: self.max_message,
            max_streams: self.max_streams_per_tunnel,
            hello_timeout: self.hello_timeout,
            open_timeout: self.open_timeout,
            heartbeat: self.heartbeat,
            shutdown_grace: self.shutdown_grace,
            idle_timeout: Some(Duration::from_secs(3600)),
            ..nowconnect_core::Config::default()
        }
    }

    /// Checks the limits against each other and the protocol's bounds.
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        conf::validate_limits(
            at,
            &[
                ("max_tunnels", u64::from(self.max_tunnels)),
                (
                    "max_streams_per_tunnel",
                    u64::from(self.max_streams_per_tunnel),
                ),
            ],
            self.window,
            self.max_window,
            self.max_buffered,
            Some((self.max_frame, self.max_message)),
        )?;
        for (key, d) in [
            ("hello_timeout", self.hello_timeout),
            ("open_timeout", self.open_timeout),
            ("heartbeat", self.heartbeat),
        ] {
            if d.is_zero() {
                return Err(ConfigError::at(
                    format!("{at}.{key}"),
                    "must be greater than 0",
                ));
            }
        }
        Ok(())
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_path() -> String {
    "/v1/tunnel".to_owned()
}
fn default_jwks_refresh() -> Option<Duration> {
    Some(Duration::from_secs(600))
}
fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256]
}
fn default_agent_id_claim() -> String {
    "sub".to_owned()
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_pdp_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}

/// Parses one `auth.algorithms` entry, refusing `none` and HMAC outright (security.md).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let t = name.trim();
    if t.eq_ignore_ascii_case("none") {
        return Err("algorithm \"none\" is refused: unsigned tokens are never accepted".to_owned());
    }
    if t.len() >= 2 && t[..2].eq_ignore_ascii_case("HS") {
        return Err(format!(
            "algorithm \"{}\" is refused: HMAC algorithms are never accepted (a public key must never act as a shared secret)",
            t.escape_default()
        ));
    }
    SUPPORTED_ALGORITHMS
        .iter()
        .copied()
        .find(|a| format!("{a:?}") == t)
        .ok_or_else(|| {
            format!(
                "unknown algorithm \"{}\" (expected one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)",
                t.escape_default()
            )
        })
}

struct AlgName(Algorithm);

impl<'de> Deserialize<'de> for AlgName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_algorithm(&s)
            .map(AlgName)
            .map_err(serde::de::Error::custom)
    }
}

fn algorithms<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Algorithm>, D::Error> {
    let names: Vec<AlgName> = Vec::deserialize(d)?;
    Ok(names.into_iter().map(|a| a.0).collect())
}

impl HubConfig {
    /// Reads and validates `path` with the process environment.
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        Self::load_with_env(path, &conf::process_env)
    }

    /// Reads and validates `path`; `${VAR}` from `env`.
    pub fn load_with_env(path: &Path, env: EnvLookup<'_>) -> Result<HubConfig, ConfigError> {
        let src = Source::read(path)?;
        Self::from_source(&src, env)
    }

    /// Parses and validates YAML text; `name` is shown in errors. Relative file names stay
    /// relative (to the working directory).
    pub fn from_yaml(name: &str, text: &str, env: EnvLookup<'_>) -> Result<HubConfig, ConfigError> {
        Self::from_source(&Source::new(name, text), env)
    }

    /// Parses and validates a [`Source`], resolving relative file names against its directory.
    pub fn from_source(src: &Source, env: EnvLookup<'_>) -> Result<HubConfig, ConfigError> {
        let mut cfg: HubConfig = src.parse(env)?;
        cfg.validate().map_err(|e| src.locate(e))?;
        if let Some(tls) = &mut cfg.tls {
            tls.cert = src.resolve(&tls.cert);
            tls.key = src.resolve(&tls.key);
        }
        if let Some(f) = &mut cfg.auth.jwks_file {
            *f = src.resolve(f);
        }
        if let Some(f) = &mut cfg.auth.jwks_ca {
            *f = src.resolve(f);
        }
        Ok(cfg)
    }

    /// Every rule that needs no file system access. Errors name the key path (no file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.starts_with('/')
            || self.path.len() > 256
            || self
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(ConfigError::at(
                "path",
                format!(
                    "invalid path \"{}\" (must start with / and have no query)",
                    self.path.escape_default()
                ),
            ));
        }
        match (&self.tls, self.plaintext) {
            (None, false) => {
                return Err(ConfigError::at(
                    "tls",
                    "required (cert and key) unless plaintext: true",
                ))
            }
            (Some(_), true) => {
                return Err(ConfigError::at(
                    "plaintext",
                    "plaintext: true and tls are both set; keep one",
                ))
            }
            _ => {}
        }
        self.auth.validate()?;
        if let Some(pdp) = &self.authz.pdp {
            conf::parse_url(&pdp.url, &["http", "https"])
                .map_err(|e| ConfigError::at("authz.pdp.url", e))?;
            if pdp.timeout.is_zero() {
                return Err(ConfigError::at(
                    "authz.pdp.timeout",
                    "must be greater than 0",
                ));
            }
        }
        self.validate_connectors()?;
        self.logging.validate()?;
        self.limits.validate("limits")
    }

    fn validate_connectors(&self) -> Result<(), ConfigError> {
        let mut names = conf::ConnectorNames::new(self.connectors.len())?;
        let mut listens: Vec<(SocketAddr, String)> = vec![(self.listen, "listen".to_owned())];
        if let Some(admin) = &self.admin {
            if admin.listen.port() != 0 && admin.listen == self.listen {
                return Err(ConfigError::at(
                    "admin.listen",
                    format!("address {} is already used by listen", admin.listen),
                ));
            }
            listens.push((admin.listen, "admin.listen".to_owned()));
        }
        for (i, c) in self.connectors.iter().enumerate() {
            let at = |k: &str| format!("connectors[{i}].{k}");
            names.add(i, &c.name)?;
            // Port 0 (ephemeral, tests) never clashes.
            if c.listen.port() != 0 {
                if let Some((_, other)) = listens.iter().find(|(a, _)| *a == c.listen) {
                    return Err(ConfigError::at(
                        at("listen"),
                        format!("address {} is already used by {other}", c.listen),
                    ));
                }
            }
            listens.push((c.listen, at("listen")));
            if c.allow_clients.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::at(
                    at("allow_clients"),
                    "empty list would refuse every client (omit the key to allow all)",
                ));
            }
        }
        Ok(())
    }

    /// The `--check` extra: the TLS cert and key parse (and match), `jwks_file` parses as a
    /// JWKS, `jwks_ca` holds CA certificates. Errors name the key path.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            tls.server_config()?;
        }
        if let Some(file) = &self.auth.jwks_file {
            crate::auth::load_jwks_file(file)
                .map_err(|e| ConfigError::at("auth.jwks_file", e.to_string()))?;
        }
        if let Some(ca) = &self.auth.jwks_ca {
            conf::load_ca_certs(ca).map_err(|e| ConfigError::at("auth.jwks_ca", e))?;
        }
        Ok(())
    }

    /// The core session config (hub side).
    pub fn session_config(&self) -> nowconnect_core::Config {
        self.limits.session_config()
    }
}

impl AuthConfig {
    /// `auth` rules: issuer/audience set, exactly one JWKS source, an allowed algorithm list.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::at("auth.issuer", "must not be empty"));
        }
        if self.audience.trim().is_empty() {
            return Err(ConfigError::at("auth.audience", "must not be empty"));
        }
        match (&self.jwks_url, &self.jwks_file) {
            (None, None) => {
                return Err(ConfigError::at(
                    "auth",
                    "one of jwks_url or jwks_file is required",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    "auth.jwks_file",
                    "jwks_url and jwks_file are both set; keep exactly one",
                ))
            }
            (Some(url), None) => {
                let u = conf::parse_url(url, &["https", "http"])
                    .map_err(|e| ConfigError::at("auth.jwks_url", e))?;
                // security.md: the JWKS is fetched over HTTPS; plain http only on loopback (tests).
                if u.scheme == "http" && !u.is_loopback() {
                    return Err(ConfigError::at(
                        "auth.jwks_url",
                        "must be https:// (http:// is only allowed for a loopback host)",
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        if self.algorithms.is_empty() {
            return Err(ConfigError::at(
                "auth.algorithms",
                "at least one algorithm is required",
            ));
        }
        if self.agent_id_claim.trim().is_empty() {
            return Err(ConfigError::at("auth.agent_id_claim", "must not be empty"));
        }
        if self
            .connectors_claim
            .as_ref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(ConfigError::at(
                "auth.connectors_claim",
                "must not be empty (use null to disable connector scopes)",
            ));
        }
        if self.leeway > Duration::from_secs(600) {
            return Err(ConfigError::at("auth.leeway", "must be at most 10m"));
        }
        if self
            .jwks_refresh
            .is_some_and(|d| d < Duration::from_secs(10))
        {
            return Err(ConfigError::at(
                "auth.jwks_refresh",
                "must be at least 10s (or 0 to disable periodic refresh)",
            ));
        }
        Ok(())
    }
}

impl TlsFiles {
    /// Reads the certificate chain and private key.
    pub fn load(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
        let certs = conf::load_certs(&self.cert).map_err(|e| ConfigError::at("tls.cert", e))?;
        let key = conf::load_private_key(&self.key).map_err(|e| ConfigError::at("tls.key", e))?;
        Ok((certs, key))
    }

    /// A rustls server config from these files (process-default crypto provider, else ring;
    /// TLS 1.2 and 1.3; no client auth). Fails if the key does not match the certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
        let (certs, key) = self.load()?;
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::at("tls", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                ConfigError::at(
                    "tls.key",
                    format!("{}: unusable with the certificate: {e}", self.key.display()),
                )
            })?;
        Ok(Arc::new(config))
    }
}
