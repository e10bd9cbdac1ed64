//! `agent.yaml` (configuration.md "Agent"): every key with its default, and the validations that
//! make a bad file an exit-2 error naming the key path.
//!
//! [`AgentConfig::load`] reads, expands `${VAR}`, deserializes (unknown keys are errors) and
//! validates. [`AgentConfig::check_files`] is the `--check` extra: `hub.ca_file` must hold CA
//! certificates; a missing `token.file` is only a warning (it may be written later).
//! Relative file names are taken from the config file's directory.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nowconnect_runtime::conf::{
    self, de, AdminConfig, ConfigError, EnvLookup, LoggingConfig, Secret, Source,
};
use serde::{Deserialize, Deserializer};

use crate::backend::Balance;

/// Environment variable holding the JWT when `token` names no source.
pub const TOKEN_ENV: &str = "NOWCONNECT_TOKEN";

/// The whole `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's id; HELLO.agent_id, must equal the token's agent-id claim.
    pub agent_id: String,
    /// Where the hub is.
    pub hub: HubSection,
    /// Explicit HTTP CONNECT proxy; else HTTPS_PROXY/NO_PROXY from the environment.
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    /// Token source; else `NOWCONNECT_TOKEN`.
    #[serde(default, deserialize_with = "de::or_default")]
    pub token: TokenConfig,
    /// Admin listener (/metrics /healthz /readyz); none when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Reconnect backoff.
    #[serde(default, deserialize_with = "de::or_default")]
    pub reconnect: Reconnect,
    /// Connectors this agent serves, with their targets.
    pub connectors: Vec<ConnectorConfig>,
    /// Logging.
    #[serde(default, deserialize_with = "de::or_default")]
    pub logging: LoggingConfig,
    /// Limits and timers.
    #[serde(default, deserialize_with = "de::or_default")]
    pub limits: Limits,
}

/// `hub:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// One hub URL (exactly one of `url` / `urls`).
    #[serde(default)]
    pub url: Option<HubUrl>,
    /// Several hubs; one set of tunnels to each.
    #[serde(default)]
    pub urls: Option<Vec<HubUrl>>,
    /// Tunnels per hub URL. Default 1.
    #[serde(default = "one", deserialize_with = "de::count_u32")]
    pub tunnels: u32,
    /// Extra CA roots (PEM), e.g. a TLS-inspecting proxy's CA.
    #[serde(default, deserialize_with = "de::opt_path")]
    pub ca_file: Option<PathBuf>,
    /// Override of the SNI / verification name.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl HubSection {
    /// The hub URLs, whichever key gave them.
    pub fn endpoints(&self) -> Vec<&HubUrl> {
        match (&self.url, &self.urls) {
            (Some(u), _) => vec![u],
            (None, Some(list)) => list.iter().collect(),
            (None, None) => Vec::new(),
        }
    }

    /// The TLS verification / SNI name for `url`: `server_name` if set, else the URL's host.
    pub fn server_name_for<'a>(&'a self, url: &'a HubUrl) -> &'a str {
        self.server_name.as_deref().unwrap_or(&url.host)
    }
}

/// A parsed `wss://` (or `ws://`) hub URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    /// As written.
    pub url: String,
    /// `wss://`.
    pub tls: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (default 443 for wss, 80 for ws).
    pub port: u16,
    /// Path and query (`/v1/tunnel`).
    pub path: String,
}

impl HubUrl {
    /// Parses a hub URL: `wss://` or `ws://`, no credentials.
    pub fn parse(s: &str) -> Result<HubUrl, String> {
        let u = conf::parse_url(s, &["wss", "ws"])?;
        if u.has_userinfo {
            return Err(format!(
                "invalid URL \"{}\": credentials in the hub URL are not allowed",
                conf::redact_url(s)
            ));
        }
        Ok(HubUrl {
            url: s.trim().to_owned(),
            tls: u.scheme == "wss",
            host: u.host,
            port: u.port,
            path: u.path,
        })
    }

    /// `host:port` as sent in `CONNECT` and `Host` (IPv6 in brackets). Never resolved here.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HubUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl<'de> Deserialize<'de> for HubUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HubUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `proxy:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `http://host:port` of an HTTP CONNECT proxy.
    pub url: ProxyUrl,
    /// Basic auth user.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic auth password (write `${VAR}` to keep it out of the file).
    #[serde(default)]
    pub password: Option<Secret>,
}

/// A parsed `http://host:port` proxy URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// As written.
    pub url: String,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (default 80).
    pub port: u16,
}

impl ProxyUrl {
    /// Parses `http://host[:port][/]`; credentials belong in `proxy.username`/`password`.
    pub fn parse(s: &str) -> Result<ProxyUrl, String> {
        let u = conf::parse_url(s, &["http"])?;
        if u.has_userinfo {
            return Err(format!(
                "invalid URL \"{}\": put credentials in proxy.username and proxy.password",
                conf::redact_url(s)
            ));
        }
        if u.path != "/" {
            return Err(format!("invalid URL \"{s}\": a proxy URL has no path"));
        }
        Ok(ProxyUrl {
            url: s.trim().to_owned(),
            host: u.host,
            port: u.port,
        })
    }
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ProxyUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `token:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// A file holding the JWT, re-read before every connect and RENEW.
    #[serde(deserialize_with = "de::opt_path")]
    pub file: Option<PathBuf>,
    /// OAuth2 client-credentials grant.
    pub client_credentials: Option<ClientCredentials>,
    /// Share of the token lifetime (iat or nbf → exp) after which RENEW is sent. Default 0.8.
    /// A client-credentials token is refreshed at the same point.
    #[serde(deserialize_with = "de::percent")]
    pub renew_at: f64,
    /// In-band RENEW (default true). `false` (an agent extension): no RENEW; a tunnel is
    /// replaced by a fresh one (make before break) shortly before its token expires.
    pub renew: bool,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            file: None,
            client_credentials: None,
            renew_at: 0.8,
            renew: true,
        }
    }
}

/// `token.client_credentials:`. The secret is sent with HTTP Basic authentication
/// (`client_secret_basic`); write `client_secret: ${VAR}` to keep it out of the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentials {
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: Secret,
    /// Requested scope.
    #[serde(default)]
    pub scope: Option<String>,
    /// `audience` form parameter (some IdPs need it to issue a JWT for the hub).
    #[serde(default)]
    pub audience: Option<String>,
}

/// `reconnect:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Reconnect {
    /// First backoff ceiling. Default 1s.
    #[serde(deserialize_with = "de::duration")]
    pub initial: Duration,
    /// Largest backoff ceiling. Default 60s.
    #[serde(deserialize_with = "de::duration")]
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// One entry of `connectors:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// `[A-Za-z0-9._-]`, 1–64, unique.
    #[serde(deserialize_with = "de::connector_name")]
    pub name: String,
    /// `host:port` targets, in order.
    #[serde(deserialize_with = "targets")]
    pub targets: Vec<String>,
    /// `failover` (default) or `round_robin`.
    #[serde(default = "failover", deserialize_with = "balance")]
    pub balance: Balance,
    /// Per-target connect timeout. Default 5s.
    #[serde(default = "five_seconds", deserialize_with = "de::duration")]
    pub connect_timeout: Duration,
    /// TCP health check.
    #[serde(default, deserialize_with = "de::or_default")]
    pub health_check: HealthCheck,
    /// Idle stream timeout; `None` (written `0`) disables. Default 1h.
    #[serde(default = "one_hour", deserialize_with = "de::duration_or_off")]
    pub idle_timeout: Option<Duration>,
}

/// `connectors[].health_check:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    /// Check period. Default 10s.
    #[serde(deserialize_with = "de::duration")]
    pub interval: Duration,
    /// Connect timeout of one check. Default 2s.
    #[serde(deserialize_with = "de::duration")]
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `limits:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Initial per-stream receive window (advertised in HELLO). Default 256KiB.
    #[serde(deserialize_with = "de::size_u32")]
    pub window: u32,
    /// Auto-tuning ceiling per stream. Default 16MiB.
    #[serde(deserialize_with = "de::size_u32")]
    pub max_window: u32,
    /// Per-session budget for all granted windows. Default 256MiB.
    #[serde(deserialize_with = "de::size_u64")]
    pub max_buffered: u64,
    /// Most concurrent streams accepted (advertised in HELLO). Default 10000.
    #[serde(deserialize_with = "de::count_u32")]
    pub max_streams: u32,
    /// Heartbeat (the session uses the smaller of this and HELLO_ACK's). Default 20s.
    #[serde(deserialize_with = "de::duration")]
    pub heartbeat: Duration,
    /// Drain grace. Default 30s.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let core = nowconnect_core::Config::default();
        Limits {
            window: core.window,
            max_window: core.max_window,
            max_buffered: core.max_buffered,
            max_streams: core.max_streams,
            heartbeat: core.heartbeat,
            shutdown_grace: core.shutdown_grace,
        }
    }
}

/// The agent waits this long for HELLO_ACK (wire-protocol.md §10).
pub const HELLO_ACK_TIMEOUT: Duration = Duration::from_secs(10);

impl Limits {
    /// The core session config for the agent side (max_frame comes from HELLO_ACK).
    pub fn session_config(&self) -> nowconnect_core::Config {
        nowconnect_core::Config {
            window: self.window,
            max_window: self.max_window,
            max_buffered: self.max_buffered,
            max_streams: self.max_streams,
            heartbeat: self.heartbeat,
            shutdown_grace: self.shutdown_grace,
            hello_timeout: HELLO_ACK_TIMEOUT,
            ..nowconnect_core::Config::default()
        }
    }
}

fn one() -> u32 {
    1
}
fn failover() -> Balance {
    Balance::Failover
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn one_hour() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}

fn balance<'de, D: Deserializer<'de>>(d: D) -> Result<Balance, D::Error> {
    match String::deserialize(d)?.as_str() {
        "failover" => Ok(Balance::Failover),
        "round_robin" => Ok(Balance::RoundRobin),
        other => Err(serde::de::Error::custom(format!(
            "invalid balance \"{}\" (expected failover or round_robin)",
            other.escape_default()
        ))),
    }
}

struct Target(String);

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        conf::parse_host_port(&s).map_err(serde::de::Error::custom)?;
        Ok(Target(s.trim().to_owned()))
    }
}

fn targets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list: Vec<Target> = Vec::deserialize(d)?;
    Ok(list.into_iter().map(|t| t.0).collect())
}

impl AgentConfig {
    /// Reads and validates `path` with the process environment.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::load_with_env(path, &conf::process_env)
    }

    /// Reads and validates `path`; `${VAR}` from `env`.
    pub fn load_with_env(path: &Path, env: EnvLookup<'_>) -> Result<AgentConfig, ConfigError> {
        Self::from_source(&Source::read(path)?, env)
    }

    /// Parses and validates YAML text; `name` is shown in errors.
    pub fn from_yaml(
        name: &str,
        text: &str,
        env: EnvLookup<'_>,
    ) -> Result<AgentConfig, ConfigError> {
        Self::from_source(&Source::new(name, text), env)
    }

    /// Parses and validates a [`Source`], resolving relative file names against its directory.
    pub fn from_source(src: &Source, env: EnvLookup<'_>) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = src.parse(env)?;
        cfg.validate().map_err(|e| src.locate(e))?;
        if let Some(f) = &mut cfg.hub.ca_file {
            *f = src.resolve(f);
        }
        if let Some(f) = &mut cfg.token.file {
            *f = src.resolve(f);
        }
        Ok(cfg)
    }

    /// Every rule that needs no file system access. Errors name the key path (no file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.agent_id;
        if id.is_empty() || id.len() > 256 || id.trim() != id || id.chars().any(char::is_control) {
            return Err(ConfigError::at(
                "agent_id",
                "must be 1 to 256 characters, without control characters or surrounding spaces",
            ));
        }
        self.validate_hub()?;
        if let Some(p) = &self.proxy {
            if p.password.is_some() && p.username.is_none() {
                return Err(ConfigError::at(
                    "proxy.username",
                    "required when proxy.password is set",
                ));
            }
            if p.username
                .as_ref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                return Err(ConfigError::at(
                    "proxy.username",
                    "must be non-empty and contain no ':'",
                ));
            }
        }
        self.validate_token()?;
        if self.reconnect.initial.is_zero() {
            return Err(ConfigError::at(
                "reconnect.initial",
                "must be greater than 0",
            ));
        }
        if self.reconnect.max < self.reconnect.initial {
            return Err(ConfigError::at(
                "reconnect.max",
                "must not be smaller than reconnect.initial",
            ));
        }
        self.validate_connectors()?;
        self.logging.validate()?;
        conf::validate_limits(
            "limits",
            &[("max_streams", u64::from(self.limits.max_streams))],
            self.limits.window,
            self.limits.max_window,
            self.limits.max_buffered,
            None,
        )?;
        if self.limits.heartbeat.is_zero() {
            return Err(ConfigError::at(
                "limits.heartbeat",
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    fn validate_hub(&self) -> Result<(), ConfigError> {
        match (&self.hub.url, &self.hub.urls) {
            (None, None) => return Err(ConfigError::at("hub", "one of url or urls is required")),
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    "hub.urls",
                    "url and urls are both set; keep one",
                ))
            }
            (None, Some(list)) if list.is_empty() => {
                return Err(ConfigError::at("hub.urls", "must list at least one URL"))
            }
            (None, Some(list)) => {
                let mut seen = HashSet::new();
                for (i, u) in list.iter().enumerate() {
                    if !seen.insert(u.url.as_str()) {
                        return Err(ConfigError::at(
                            format!("hub.urls[{i}]"),
                            format!("duplicate URL \"{}\"", u.url),
                        ));
                    }
                }
            }
            (Some(_), None) => {}
        }
        if !(1..=64).contains(&self.hub.tunnels) {
            return Err(ConfigError::at("hub.tunnels", "must be between 1 and 64"));
        }
        if let Some(name) = &self.hub.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(ConfigError::at(
                    "hub.server_name",
                    format!("invalid server name \"{}\"", name.escape_default()),
                ));
            }
        }
        Ok(())
    }

    fn validate_token(&self) -> Result<(), ConfigError> {
        if self.token.file.is_some() && self.token.client_credentials.is_some() {
            return Err(ConfigError::at(
                "token.client_credentials",
                "token.file and token.client_credentials are both set; keep exactly one",
            ));
        }
        if let Some(cc) = &self.token.client_credentials {
            let u = conf::parse_url(&cc.token_url, &["https", "http"])
                .map_err(|e| ConfigError::at("token.client_credentials.token_url", e))?;
            if u.has_userinfo {
                return Err(ConfigError::at(
                    "token.client_credentials.token_url",
                    "credentials in the token URL are not allowed; use client_id and client_secret",
                ));
            }
            if u.scheme == "http" && !u.is_loopback() {
                return Err(ConfigError::at(
                    "token.client_credentials.token_url",
                    "must be https:// (http:// is only allowed for a loopback host)",
                ));
            }
            if cc.client_id.trim().is_empty() {
                return Err(ConfigError::at(
                    "token.client_credentials.client_id",
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    fn validate_connectors(&self) -> Result<(), ConfigError> {
        let mut names = conf::ConnectorNames::new(self.connectors.len())?;
        for (i, c) in self.connectors.iter().enumerate() {
            let at = |k: &str| format!("connectors[{i}].{k}");
            names.add(i, &c.name)?;
            if c.targets.is_empty() {
                return Err(ConfigError::at(
                    at("targets"),
                    "must list at least one host:port",
                ));
            }
            if c.connect_timeout.is_zero() {
                return Err(ConfigError::at(
                    at("connect_timeout"),
                    "must be greater than 0",
                ));
            }
            if c.health_check.interval.is_zero() {
                return Err(ConfigError::at(
                    at("health_check.interval"),
                    "must be greater than 0",
                ));
            }
            if c.health_check.timeout.is_zero() {
                return Err(ConfigError::at(
                    at("health_check.timeout"),
                    "must be greater than 0",
                ));
            }
            if c.health_check.timeout > c.health_check.interval {
                return Err(ConfigError::at(
                    at("health_check.timeout"),
                    "must not exceed health_check.interval",
                ));
            }
        }
        Ok(())
    }

    /// The `--check` extra. `hub.ca_file` must hold CA certificates (an error otherwise).
    /// Returns warnings: `token.file` missing or unreadable (it may be provisioned later), no
    /// token source at all, or a source this build cannot use yet.
    pub fn check_files(&self, env: EnvLookup<'_>) -> Result<Vec<String>, ConfigError> {
        if let Some(ca) = &self.hub.ca_file {
            conf::load_ca_certs(ca).map_err(|e| ConfigError::at("hub.ca_file", e))?;
        }
        let mut warnings = Vec::new();
        if let Some(file) = &self.token.file {
            if let Err(e) = std::fs::metadata(file) {
                warnings.push(format!(
                    "token.file: {} cannot be read yet: {e}",
                    file.display()
                ));
            }
        } else if self.token.client_credentials.is_some() {
            // Asked for at run time (failures are retried, never fatal).
        } else if env(TOKEN_ENV).is_none_or(|t| t.trim().is_empty()) {
            warnings.push(format!(
                "token: no token.file configured and {TOKEN_ENV} is not set"
            ));
        }
        Ok(warnings)
    }

    /// The core session config (agent side).
    pub fn session_config(&self) -> nowconnect_core::Config {
        self.limits.session_config()
    }

    /// The admin listen address, if any.
    pub fn admin_listen(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "agent_id: a1\nhub:\n  url: wss://hub.example.com/v1/tunnel\n\
                           connectors:\n  - name: ldap\n    targets: [dc1.corp.local:389]\n";

    fn parse(token: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_yaml("agent.yaml", &format!("{MINIMAL}{token}"), &|k: &str| {
            (k == "SECRET").then(|| "shh".to_owned())
        })
    }

    #[test]
    fn token_renew_switch_and_client_credentials_keys() {
        let cfg = parse("").expect("minimal");
        assert!(cfg.token.renew, "in-band RENEW is on by default");
        let cfg = parse("token:\n  file: /run/t\n  renew: false\n").expect("renew off");
        assert!(!cfg.token.renew);
        let cc = "token:\n  client_credentials:\n    token_url: https://idp.example.com/t\n    \
                  client_id: c\n    client_secret: ${SECRET}\n    audience: nowconnect-hub\n";
        let cfg = parse(cc).expect("audience");
        let c = cfg.token.client_credentials.expect("cc");
        assert_eq!(c.audience.as_deref(), Some("nowconnect-hub"));
        assert_eq!(c.client_secret.expose(), "shh");
        // Credentials belong in client_id / client_secret, never in the URL.
        let e = parse(&cc.replace("https://idp", "https://u:pw@idp")).expect_err("userinfo");
        assert_eq!(
            e.key().as_deref(),
            Some("token.client_credentials.token_url")
        );
        assert!(!e.to_string().contains("pw@"), "{e}");
        // http:// only to a loopback token endpoint.
        assert!(parse(&cc.replace("https://idp.example.com", "http://127.0.0.1:8080")).is_ok());
        let e = parse(&cc.replace("https://", "http://")).expect_err("http to a remote IdP");
        assert_eq!(
            e.key().as_deref(),
            Some("token.client_credentials.token_url")
        );
    }
}
