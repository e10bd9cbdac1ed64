//! [`Tunnel`]: the real `nowconnect-hub` and `nowconnect-agent` wired together for one test.
//!
//! [`Tunnel::builder`] writes `hub.yaml`, `agent.yaml`, the JWKS, the agent's token and (for
//! `wss://`) a test CA + localhost certificate into one directory, using relative file names so
//! the binaries' "relative to the config file" rule is exercised too. [`TunnelBuilder::start`]
//! starts the hub, waits for its `/readyz`, starts the agent and waits until the agent's `/readyz`
//! is 200 and the hub reports every connector available, so a test can dial
//! [`Tunnel::connector`] at once.
//!
//! ```no_run
//! use nowconnect_tests::tunnel::{Transport, Tunnel};
//! let tunnel = Tunnel::builder(Transport::Wss)
//!     .connector("ldap", &["127.0.0.1:389"])
//!     .start();
//! let addr = tunnel.connector("ldap");
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin_path, free_addr, JwtKeys, Proc, TlsFiles, START_TIMEOUT};

/// `auth.issuer` of every test hub.
pub const ISSUER: &str = "https://idp.test/";
/// `auth.audience` of every test hub.
pub const AUDIENCE: &str = "nowconnect-hub";
/// The default `agent_id` (and token `sub`).
pub const AGENT_ID: &str = "agent-1";
/// The hub's upgrade path.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// Lifetime of the tokens the fixture mints.
pub const TOKEN_TTL_SECS: u64 = 3600;
/// How long [`TunnelBuilder::start`] waits for readiness (hub and agent each).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables the binaries must not inherit from the test run: a proxy variable would
/// send the agent through it (configuration.md: no implicit loopback bypass).
const SCRUBBED_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "NOWCONNECT_TOKEN",
    "NOWCONNECT_CONFIG",
    "RUST_LOG",
];

/// How the agent reaches the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `ws://` to a `plaintext: true` hub.
    Ws,
    /// `wss://` to a hub with a certificate from [`TlsFiles::localhost`]; the agent trusts the
    /// test CA through `hub.ca_file`.
    Wss,
}

impl Transport {
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

struct ConnectorSpec {
    name: String,
    listen: SocketAddr,
    targets: Vec<String>,
    hub_extra: Vec<String>,
    agent_extra: Vec<String>,
}

/// Options for a [`Tunnel`]; see [`Tunnel::builder`].
pub struct TunnelBuilder {
    transport: Transport,
    dir: Option<PathBuf>,
    hub_listen: Option<SocketAddr>,
    hub_admin: Option<SocketAddr>,
    agent_admin: Option<SocketAddr>,
    connectors: Vec<ConnectorSpec>,
    hub_yaml: String,
    agent_yaml: String,
    hub_limits: Vec<String>,
    agent_limits: Vec<String>,
    reconnect: (String, String),
    health_check: (String, String),
    agent_id: String,
    token: Option<String>,
    with_agent: bool,
    wait_ready: bool,
    log_filter: String,
    hub_tunnels: Option<u32>,
    env: Vec<(String, String)>,
    /// `auth:` keys replacing (or, with `None`, removing) the fixture's defaults, in order.
    hub_auth: Vec<(String, Option<String>)>,
    hub_no_wait: bool,
    /// Lines under the agent's `token:` instead of `file: token.jwt`.
    agent_token: Option<Vec<String>>,
}

impl TunnelBuilder {
    /// Serves connector `name` on a free loopback port; the agent dials `targets` in order.
    pub fn connector(self, name: &str, targets: &[impl ToString]) -> Self {
        self.connector_with(name, free_addr(), targets, &[], &[])
    }

    /// [`Self::connector`] with a fixed hub listener and extra YAML lines for the hub's and the
    /// agent's connector entry (`"idle_timeout: 2s"`, `"balance: round_robin"`, ...). An agent
    /// `health_check` line replaces the fixture's default health check.
    pub fn connector_with(
        mut self,
        name: &str,
        listen: SocketAddr,
        targets: &[impl ToString],
        hub_extra: &[&str],
        agent_extra: &[&str],
    ) -> Self {
        self.connectors.push(ConnectorSpec {
            name: name.into(),
            listen,
            targets: targets.iter().map(ToString::to_string).collect(),
            hub_extra: hub_extra.iter().map(|s| s.to_string()).collect(),
            agent_extra: agent_extra.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// Writes the files into `dir` instead of a fresh temporary directory (the caller keeps it).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Fixed addresses for the hub's tunnel listener, the hub's admin and the agent's admin
    /// listener (default: free loopback ports).
    pub fn addrs(
        mut self,
        hub: SocketAddr,
        hub_admin: SocketAddr,
        agent_admin: SocketAddr,
    ) -> Self {
        self.hub_listen = Some(hub);
        self.hub_admin = Some(hub_admin);
        self.agent_admin = Some(agent_admin);
        self
    }

    /// Top-level YAML appended to `hub.yaml` (keys the fixture does not write: `authz`,
    /// `logging`, ...).
    pub fn hub_yaml(mut self, yaml: &str) -> Self {
        self.hub_yaml.push_str(yaml);
        self.hub_yaml.push('\n');
        self
    }

    /// Top-level YAML appended to `agent.yaml` (`proxy`, `logging`, ...).
    pub fn agent_yaml(mut self, yaml: &str) -> Self {
        self.agent_yaml.push_str(yaml);
        self.agent_yaml.push('\n');
        self
    }

    /// One `key: value` line under the hub's `limits:` (e.g. `"window: 64KiB"`).
    pub fn hub_limit(mut self, line: &str) -> Self {
        self.hub_limits.push(line.into());
        self
    }

    /// One `key: value` line under the agent's `limits:`.
    pub fn agent_limit(mut self, line: &str) -> Self {
        self.agent_limits.push(line.into());
        self
    }

    /// The agent's `reconnect: {initial, max}` (default 100ms / 2s).
    pub fn reconnect(mut self, initial: &str, max: &str) -> Self {
        self.reconnect = (initial.into(), max.into());
        self
    }

    /// The agent connectors' default `health_check: {interval, timeout}` (default 2s / 1s).
    pub fn health_check(mut self, interval: &str, timeout: &str) -> Self {
        self.health_check = (interval.into(), timeout.into());
        self
    }

    /// The agent's `agent_id` (default [`AGENT_ID`]); the default token's `sub` follows it.
    pub fn agent_id(mut self, id: &str) -> Self {
        self.agent_id = id.into();
        self
    }

    /// The token file's content instead of a fresh valid token for `agent_id`.
    pub fn token(mut self, jwt: String) -> Self {
        self.token = Some(jwt);
        self
    }

    /// Start only the hub (auth tests that speak to it directly); [`Tunnel::start_agent`] can
    /// still start the agent later.
    pub fn without_agent(mut self) -> Self {
        self.with_agent = false;
        self
    }

    /// Do not wait for the agent to be ready (it is expected to fail, or the test waits itself).
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// The agent's `hub.tunnels` (tunnels per hub URL; default: not written, i.e. 1). Extra
    /// agents ([`Tunnel::extra_agent`]) use it too.
    pub fn hub_tunnels(mut self, n: u32) -> Self {
        self.hub_tunnels = Some(n);
        self
    }

    /// Sets `key: value` under the hub's `auth:` (replacing the fixture's value of that key:
    /// `algorithms`, `jwks_refresh`, `connectors_claim`, ...).
    pub fn hub_auth(mut self, key: &str, value: &str) -> Self {
        self.hub_auth.push((key.into(), Some(value.into())));
        self
    }

    /// Leaves `key` out of the hub's `auth:` section.
    pub fn hub_auth_remove(mut self, key: &str) -> Self {
        self.hub_auth.push((key.into(), None));
        self
    }

    /// The hub fetches its JWKS from `url` (`auth.jwks_url`, e.g. [`crate::idp::Idp::url`])
    /// trusting the CA certificates in `ca` (`auth.jwks_ca`) instead of reading `jwks.json`.
    /// Tokens must then be signed by keys that IdP publishes (see [`Self::token`]).
    pub fn jwks_url(self, url: &str, ca: &Path) -> Self {
        self.hub_auth_remove("jwks_file")
            .hub_auth("jwks_url", url)
            .hub_auth("jwks_ca", &ca.display().to_string())
    }

    /// Do not wait for the hub's `/readyz` to be 200 when starting it (only for its admin and
    /// tunnel listeners): for a hub that is expected not to be ready (JWKS not loadable yet).
    pub fn hub_no_wait(mut self) -> Self {
        self.hub_no_wait = true;
        self
    }

    /// The lines of the agent's `token:` section (e.g. `"renew_at: 50%"`, or a
    /// `client_credentials:` block, indented below `token:`), replacing `file: token.jwt`.
    /// Without a `file:` line the token file is still written but not used.
    pub fn agent_token(mut self, lines: &[&str]) -> Self {
        self.agent_token = Some(lines.iter().map(|l| l.to_string()).collect());
        self
    }

    /// An environment variable for both binaries (and [`Tunnel::extra_agent`]s), e.g.
    /// `MALLOC_ARENA_MAX`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `NOWCONNECT_LOG` for both binaries (default `info`).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Writes the files and starts the hub (then the agent). Panics with the logs on failure.
    pub fn start(self) -> Tunnel {
        // Both binaries refuse a config without connectors.
        assert!(
            !self.connectors.is_empty(),
            "a tunnel needs at least one connector"
        );
        let (temp, dir) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).expect("create tunnel dir");
                (None, d.clone())
            }
            None => {
                let t = crate::temp_dir("tunnel");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let keys = JwtKeys::generate();
        keys.write_jwks(&dir.join("jwks.json"));
        let tls = match self.transport {
            Transport::Wss => Some(TlsFiles::localhost(&dir)),
            Transport::Ws => None,
        };
        let hub_listen = self.hub_listen.unwrap_or_else(free_addr);
        let hub_admin = self.hub_admin.unwrap_or_else(free_addr);
        let agent_admin = self.agent_admin.unwrap_or_else(free_addr);
        let hub_url = format!(
            "{}://127.0.0.1:{}{TUNNEL_PATH}",
            self.transport.scheme(),
            hub_listen.port()
        );

        let hub_config = dir.join("hub.yaml");
        crate::write_file(
            &hub_config,
            self.hub_config_yaml(hub_listen, hub_admin),
            0o644,
        );
        let agent_config = dir.join("agent.yaml");
        crate::write_file(
            &agent_config,
            self.agent_config_yaml(&hub_url, agent_admin),
            0o644,
        );
        let token_path = dir.join("token.jwt");
        let token = self.token.clone().unwrap_or_else(|| {
            keys.es256.sign(&JwtKeys::agent_claims(
                ISSUER,
                AUDIENCE,
                &self.agent_id,
                TOKEN_TTL_SECS,
            ))
        });
        crate::write_file(&token_path, &token, 0o600);

        let mut tunnel = Tunnel {
            agent: None,
            hub: None,
            transport: self.transport,
            keys,
            tls,
            hub_listen,
            hub_admin,
            agent_admin,
            hub_url,
            agent_id: self.agent_id.clone(),
            connectors: self
                .connectors
                .iter()
                .map(|c| (c.name.clone(), c.listen))
                .collect(),
            hub_config,
            agent_config,
            token_path,
            log_filter: self.log_filter.clone(),
            dir: dir.clone(),
            hub_starts: 0,
            agent_starts: 0,
            hub_no_wait: self.hub_no_wait,
            env: self.env.clone(),
            agent_template: AgentTemplate {
                reconnect: self.reconnect.clone(),
                health_check: self.health_check.clone(),
                limits: self.agent_limits.clone(),
                yaml: self.agent_yaml.clone(),
                tunnels: self.hub_tunnels,
            },
            _temp: temp,
        };
        tunnel.start_hub();
        if self.with_agent {
            tunnel.start_agent();
            if self.wait_ready {
                tunnel.wait_ready();
            }
        }
        tunnel
    }

    fn hub_config_yaml(&self, listen: SocketAddr, admin: SocketAddr) -> String {
        let mut y = format!("listen: {listen}\npath: {TUNNEL_PATH}\n");
        match self.transport {
            Transport::Wss => y += "tls:\n  cert: server.pem\n  key: server.key\n",
            Transport::Ws => y += "plaintext: true\n",
        }
        let mut auth: Vec<(String, String)> = [
            ("issuer", ISSUER),
            ("audience", AUDIENCE),
            ("jwks_file", "jwks.json"),
            ("algorithms", "[ES256, EdDSA]"),
            ("agent_id_claim", "sub"),
            ("leeway", "30s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in &self.hub_auth {
            auth.retain(|(k, _)| k != key);
            if let Some(v) = value {
                auth.push((key.clone(), v.clone()));
            }
        }
        y += &format!("admin:\n  listen: {admin}\nauth:\n");
        for (k, v) in &auth {
            y += &format!("  {k}: {v}\n");
        }
        y += "connectors:\n";
        for c in &self.connectors {
            y += &format!("  - name: {}\n    listen: \"{}\"\n", c.name, c.listen);
            for line in &c.hub_extra {
                y += &format!("    {line}\n");
            }
        }
        y += &limits_yaml(&self.hub_limits);
        y += &self.hub_yaml;
        y
    }

    fn agent_config_yaml(&self, hub_url: &str, admin: SocketAddr) -> String {
        let mut y = format!("agent_id: {}\nhub:\n  url: {hub_url}\n", self.agent_id);
        if self.transport == Transport::Wss {
            y += "  ca_file: server-ca.pem\n";
        }
        if let Some(n) = self.hub_tunnels {
            y += &format!("  tunnels: {n}\n");
        }
        y += "token:\n";
        match &self.agent_token {
            Some(lines) => {
                for line in lines {
                    y += &format!("  {line}\n");
                }
            }
            None => y += "  file: token.jwt\n",
        }
        y += &format!(
            "admin:\n  listen: {admin}\n\
             reconnect:\n  initial: {}\n  max: {}\nconnectors:\n",
            self.reconnect.0, self.reconnect.1
        );
        for c in &self.connectors {
            let targets: Vec<String> = c.targets.iter().map(|t| format!("\"{t}\"")).collect();
            y += &format!(
                "  - name: {}\n    targets: [{}]\n",
                c.name,
                targets.join(", ")
            );
            if !c.agent_extra.iter().any(|l| l.starts_with("health_check")) {
                y += &format!(
                    "    health_check:\n      interval: {}\n      timeout: {}\n",
                    self.health_check.0, self.health_check.1
                );
            }
            for line in &c.agent_extra {
                y += &format!("    {line}\n");
            }
        }
        y += &limits_yaml(&self.agent_limits);
        y += &self.agent_yaml;
        y
    }
}

/// `limits:` with the given lines; a short `shutdown_grace` unless set, so a test's teardown
/// (SIGTERM → drain) does not wait for the 30 s default.
fn limits_yaml(lines: &[String]) -> String {
    let mut y = String::from("limits:\n");
    if !lines
        .iter()
        .any(|l| l.trim_start().starts_with("shutdown_grace"))
    {
        y += "  shutdown_grace: 1s\n";
    }
    for line in lines {
        y += &format!("  {line}\n");
    }
    y
}

/// A hub and (usually) an agent, running as child processes. Dropping it stops the agent, then
/// the hub (SIGTERM, then SIGKILL after 5 s), and removes the directory unless it was given.
pub struct Tunnel {
    // Drop order: processes before the directory their files live in.
    agent: Option<Proc>,
    hub: Option<Proc>,
    pub transport: Transport,
    /// The signing keys whose public halves are in the hub's JWKS (`es256-1`, `ed25519-1`).
    pub keys: JwtKeys,
    /// The hub's certificate and its CA (`wss` only).
    pub tls: Option<TlsFiles>,
    /// The hub's tunnel listener.
    pub hub_listen: SocketAddr,
    pub hub_admin: SocketAddr,
    pub agent_admin: SocketAddr,
    /// `ws://127.0.0.1:<port>/v1/tunnel` or `wss://...`.
    pub hub_url: String,
    pub agent_id: String,
    connectors: Vec<(String, SocketAddr)>,
    hub_config: PathBuf,
    agent_config: PathBuf,
    token_path: PathBuf,
    log_filter: String,
    dir: PathBuf,
    hub_starts: u32,
    agent_starts: u32,
    /// [`TunnelBuilder::hub_no_wait`].
    hub_no_wait: bool,
    agent_template: AgentTemplate,
    env: Vec<(String, String)>,
    _temp: Option<tempfile::TempDir>,
}

impl Tunnel {
    /// Options for a tunnel over `transport`: no connectors yet, agent started and waited for.
    pub fn builder(transport: Transport) -> TunnelBuilder {
        TunnelBuilder {
            transport,
            dir: None,
            hub_listen: None,
            hub_admin: None,
            agent_admin: None,
            connectors: Vec::new(),
            hub_yaml: String::new(),
            agent_yaml: String::new(),
            hub_limits: Vec::new(),
            agent_limits: Vec::new(),
            reconnect: ("100ms".into(), "2s".into()),
            health_check: ("2s".into(), "1s".into()),
            agent_id: AGENT_ID.into(),
            token: None,
            with_agent: true,
            wait_ready: true,
            log_filter: "info".into(),
            hub_tunnels: None,
            env: Vec::new(),
            hub_auth: Vec::new(),
            hub_no_wait: false,
            agent_token: None,
        }
    }

    /// The hub's listener for connector `name`. Panics on an unknown name.
    pub fn connector(&self, name: &str) -> SocketAddr {
        self.connectors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no connector {name:?} in this tunnel"))
    }

    /// The directory holding the configs, keys, token and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hub_config(&self) -> &Path {
        &self.hub_config
    }

    pub fn agent_config(&self) -> &Path {
        &self.agent_config
    }

    /// The hub process. Panics when it is not running under this fixture.
    pub fn hub(&mut self) -> &mut Proc {
        self.hub.as_mut().expect("hub not started")
    }

    /// The agent process. Panics when it is not running under this fixture.
    pub fn agent(&mut self) -> &mut Proc {
        self.agent.as_mut().expect("agent not started")
    }

    pub fn hub_pid(&self) -> u32 {
        self.hub.as_ref().expect("hub not started").pid()
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent not started").pid()
    }

    /// The current hub's log (empty when none runs).
    pub fn hub_log(&self) -> String {
        self.hub.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The current agent's log (empty when none runs).
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Both logs' tails, for assertion messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in [&self.hub, &self.agent].into_iter().flatten() {
            s += &p.log_tail();
            s.push('\n');
        }
        s
    }

    /// Signs `claims` with the ES256 test key (kid `es256-1`).
    pub fn mint(&self, claims: &Value) -> String {
        self.keys.es256.sign(claims)
    }

    /// A fresh valid token for `agent_id`.
    pub fn valid_token(&self, agent_id: &str) -> String {
        self.mint(&JwtKeys::agent_claims(
            ISSUER,
            AUDIENCE,
            agent_id,
            TOKEN_TTL_SECS,
        ))
    }

    /// Replaces the agent's token file (the agent re-reads it before every connect).
    pub fn write_token(&self, jwt: &str) {
        crate::write_file(&self.token_path, jwt, 0o600);
    }

    fn command(&self, bin: &str, config: &Path) -> Command {
        let mut cmd = Command::new(bin_path(bin));
        cmd.arg("--config")
            .arg(config)
            .current_dir(&self.dir)
            .env("NOWCONNECT_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Starts the hub (again, after [`Self::kill_hub`] / [`Self::stop_hub`]) with the same config
    /// and ports, and waits for its `/readyz`. The log of start `n > 1` is `hub-<n>.log`.
    pub fn start_hub(&mut self) {
        assert!(self.hub.is_none(), "hub already running");
        self.hub_starts += 1;
        let name = numbered("hub", self.hub_starts);
        let cmd = self.command("nowconnect-hub", &self.hub_config);
        let mut hub = Proc::spawn(&name, cmd, &self.dir);
        hub.wait_for_port(self.hub_admin, START_TIMEOUT);
        let admin = self.hub_admin;
        if !self.hub_no_wait {
            let ready = crate::wait_until(READY_TIMEOUT, || {
                matches!(http_get(admin, "/readyz"), Ok((200, _))) || !hub.is_running()
            });
            let readyz = http_get(admin, "/readyz");
            assert!(
                ready && matches!(readyz, Ok((200, _))),
                "hub not ready: /readyz {readyz:?}\n{}",
                hub.log_tail()
            );
        }
        // Not Proc::wait_for_port: a bare connect would count as a bad upgrade in the metrics.
        let listen = self.hub_listen;
        assert!(
            crate::wait_until(START_TIMEOUT, || is_listening(listen)),
            "hub not listening on {listen}\n{}",
            hub.log_tail()
        );
        self.hub = Some(hub);
    }

    /// SIGKILLs the hub (no drain, no GOAWAY: the agent sees the connection drop).
    pub fn kill_hub(&mut self) {
        if let Some(mut hub) = self.hub.take() {
            hub.kill();
        }
    }

    /// SIGTERM to the hub (graceful drain), waits for its exit and returns the status.
    pub fn stop_hub(&mut self) -> Option<std::process::ExitStatus> {
        self.hub.take().map(|mut h| h.stop())
    }

    /// [`Self::kill_hub`] then [`Self::start_hub`] on the same ports.
    pub fn restart_hub(&mut self) {
        self.kill_hub();
        self.start_hub();
    }

    /// Starts the agent (again). Does not wait; see [`Self::wait_ready`].
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        self.agent_starts += 1;
        let name = numbered("agent", self.agent_starts);
        let cmd = self.command("nowconnect-agent", &self.agent_config);
        self.agent = Some(Proc::spawn(&name, cmd, &self.dir));
    }

    /// SIGTERM to the agent (graceful), waits for its exit and returns the status.
    pub fn stop_agent(&mut self) -> Option<std::process::ExitStatus> {
        self.agent.take().map(|mut a| a.stop())
    }

    /// SIGKILLs the agent.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Waits until the agent's `/readyz` is 200 and the hub reports every connector available
    /// (`nowconnect_connector_available{connector} 1`), so an OPEN is routed. Panics with both
    /// logs after [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        self.wait_ready_for(READY_TIMEOUT);
    }

    /// [`Self::wait_ready`] with a deadline; returns how long it took.
    pub fn wait_ready_for(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut last = String::new();
        let ok = crate::wait_until(timeout, || {
            if let Some(a) = self.agent.as_mut() {
                if !a.is_running() {
                    last = "agent exited".into();
                    return true;
                }
            }
            match http_get(self.agent_admin, "/readyz") {
                Ok((200, _)) => {}
                other => {
                    last = format!("agent /readyz {other:?}");
                    return false;
                }
            }
            match http_get(self.hub_admin, "/metrics") {
                Ok((200, text)) => {
                    let missing: Vec<&str> = self
                        .connectors
                        .iter()
                        .filter(|(name, _)| {
                            metric(
                                &text,
                                "nowconnect_connector_available",
                                &[("connector", name)],
                            ) != Some(1.0)
                        })
                        .map(|(name, _)| name.as_str())
                        .collect();
                    last = format!("hub connectors not available: {missing:?}");
                    missing.is_empty()
                }
                other => {
                    last = format!("hub /metrics {other:?}");
                    false
                }
            }
        });
        let agent_alive = self.agent.as_mut().is_some_and(Proc::is_running);
        assert!(
            ok && agent_alive,
            "tunnel not ready after {timeout:?} ({last})\n{}",
            self.logs()
        );
        start.elapsed()
    }

    /// `GET /metrics` of the hub's admin listener.
    pub fn hub_metrics(&self) -> String {
        get_ok(self.hub_admin, "/metrics")
    }

    /// `GET /metrics` of the agent's admin listener.
    pub fn agent_metrics(&self) -> String {
        get_ok(self.agent_admin, "/metrics")
    }

    /// Panics with the log tail of any process that has exited.
    pub fn assert_running(&mut self) {
        let mut dead = String::new();
        for p in [&mut self.hub, &mut self.agent].into_iter().flatten() {
            if let Some(status) = p.try_status() {
                dead += &format!("{} exited ({status})\n{}\n", p.name(), p.log_tail());
            }
        }
        assert!(dead.is_empty(), "{dead}");
    }

    /// A message naming the process that exited, if one did (for loops that must not panic).
    pub fn exited(&mut self) -> Option<String> {
        for p in [&mut self.hub, &mut self.agent].into_iter().flatten() {
            if let Some(status) = p.try_status() {
                return Some(format!("{} exited ({status})\n{}", p.name(), p.log_tail()));
            }
        }
        None
    }
}

impl Tunnel {
    /// Another agent against this tunnel's hub, with its own `agent_id` (and a fresh valid
    /// token for it), admin port, connectors (`(name, targets)`) and `extra_yaml` (top-level
    /// lines appended to its config). It shares the first agent's reconnect, health-check,
    /// limits and `hub.tunnels` settings. Started at once; wait with [`ExtraAgent::wait_ready`].
    /// Its files and log are `<agent_id>.yaml`, `<agent_id>.jwt`, `<agent_id>.log`.
    pub fn extra_agent(
        &self,
        agent_id: &str,
        connectors: &[(&str, &[String])],
        extra_yaml: &str,
    ) -> ExtraAgent {
        let admin = free_addr();
        let t = &self.agent_template;
        let mut y = format!("agent_id: {agent_id}\nhub:\n  url: {}\n", self.hub_url);
        if self.transport == Transport::Wss {
            y += "  ca_file: server-ca.pem\n";
        }
        if let Some(n) = t.tunnels {
            y += &format!("  tunnels: {n}\n");
        }
        y += &format!(
            "token:\n  file: {agent_id}.jwt\nadmin:\n  listen: {admin}\n\
             reconnect:\n  initial: {}\n  max: {}\nconnectors:\n",
            t.reconnect.0, t.reconnect.1
        );
        for (name, targets) in connectors {
            let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            y += &format!(
                "  - name: {name}\n    targets: [{}]\n    health_check:\n      interval: {}\n      \
                 timeout: {}\n",
                targets.join(", "),
                t.health_check.0,
                t.health_check.1
            );
        }
        y += &limits_yaml(&t.limits);
        y += &t.yaml;
        y += extra_yaml;
        let config = self.dir.join(format!("{agent_id}.yaml"));
        crate::write_file(&config, y, 0o644);
        crate::write_file(
            &self.dir.join(format!("{agent_id}.jwt")),
            self.valid_token(agent_id),
            0o600,
        );
        let mut agent = ExtraAgent {
            proc: None,
            agent_id: agent_id.to_owned(),
            admin,
            hub_admin: self.hub_admin,
            connectors: connectors.iter().map(|(n, _)| n.to_string()).collect(),
            command: self.command("nowconnect-agent", &config),
            dir: self.dir.clone(),
            starts: 0,
        };
        agent.start();
        agent
    }
}

/// The agent settings [`Tunnel::extra_agent`] copies from the builder.
struct AgentTemplate {
    reconnect: (String, String),
    health_check: (String, String),
    limits: Vec<String>,
    yaml: String,
    tunnels: Option<u32>,
}

/// An additional agent process (see [`Tunnel::extra_agent`]). Dropping it stops the agent
/// (declare it after its [`Tunnel`], so it is dropped first).
pub struct ExtraAgent {
    proc: Option<Proc>,
    pub agent_id: String,
    /// Its admin listener.
    pub admin: SocketAddr,
    hub_admin: SocketAddr,
    connectors: Vec<String>,
    command: Command,
    dir: PathBuf,
    starts: u32,
}

impl ExtraAgent {
    /// Starts the agent (again); its log is `<agent_id>.log`, then `<agent_id>-2.log`, ...
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "{} already running", self.agent_id);
        self.starts += 1;
        let name = numbered(&self.agent_id, self.starts);
        let mut cmd = Command::new(self.command.get_program());
        cmd.args(self.command.get_args());
        if let Some(d) = self.command.get_current_dir() {
            cmd.current_dir(d);
        }
        for (k, v) in self.command.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        self.proc = Some(Proc::spawn(&name, cmd, &self.dir));
    }

    /// The running process. Panics when it is not running under this fixture.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("extra agent not started")
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("extra agent not started").pid()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM (graceful drain), waits for the exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.take().map(|mut p| p.stop())
    }

    /// The current process's log (empty when none runs).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        self.proc.as_ref().map(Proc::log_tail).unwrap_or_default()
    }

    /// `GET /metrics` of its admin listener.
    pub fn metrics(&self) -> String {
        get_ok(self.admin, "/metrics")
    }

    /// Waits until its `/readyz` is 200 and the hub has at least one session of this agent
    /// (`nowconnect_agents_connected{agent_id}`) with every connector available.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let mut last = String::new();
        let ok = crate::wait_until(timeout, || {
            if !self.proc.as_mut().is_some_and(Proc::is_running) {
                last = "agent not running".into();
                return true;
            }
            if !matches!(http_get(self.admin, "/readyz"), Ok((200, _))) {
                last = "agent /readyz not 200".into();
                return false;
            }
            let Ok((200, m)) = http_get(self.hub_admin, "/metrics") else {
                last = "hub /metrics failed".into();
                return false;
            };
            let connected = metric(
                &m,
                "nowconnect_agents_connected",
                &[("agent_id", &self.agent_id)],
            )
            .is_some_and(|n| n >= 1.0);
            let available = self.connectors.iter().all(|c| {
                metric(&m, "nowconnect_connector_available", &[("connector", c)]) == Some(1.0)
            });
            last = format!("hub: connected {connected}, connectors available {available}");
            connected && available
        });
        let running = self.proc.as_mut().is_some_and(Proc::is_running);
        assert!(
            ok && running,
            "{} not ready after {timeout:?} ({last})\n{}",
            self.agent_id,
            self.log_tail()
        );
    }
}

/// The JSON log lines of a binary's log (other lines are skipped).
pub fn log_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Milliseconds since midnight UTC of a log record's `ts` (`2026-11-29T08:40:01.123Z`).
pub fn log_ts_millis(record: &Value) -> Option<u64> {
    let ts = record.get("ts")?.as_str()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some((h * 3600 + m * 60) * 1000 + (sec * 1000.0).round() as u64)
}

/// A `/proc/<pid>/status` field's first number (`Threads`, `VmRSS` in KiB, ...).
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{field}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Number of threads of process `pid`.
pub fn thread_count(pid: u32) -> Option<u64> {
    proc_status(pid, "Threads")
}

/// Number of open file descriptors of process `pid` (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        drop(self.proc.take());
    }
}

impl Tunnel {
    /// Another agent started from `yaml` (a complete `agent.yaml`, written as `<name>.yaml` in
    /// the tunnel's directory, so relative names such as `server-ca.pem` resolve), with a fresh
    /// valid token for `agent_id` in `<name>.jwt` (point `token.file` at it) and `env` added to
    /// the scrubbed environment (e.g. `HTTPS_PROXY`, `NO_PROXY`). `admin` must be the config's
    /// `admin.listen`; `connectors` are the names [`ExtraAgent::wait_ready`] waits for. Its log
    /// is `<name>.log`.
    pub fn custom_agent(
        &self,
        name: &str,
        agent_id: &str,
        yaml: &str,
        admin: SocketAddr,
        connectors: &[&str],
        env: &[(&str, &str)],
    ) -> ExtraAgent {
        let config = self.dir.join(format!("{name}.yaml"));
        crate::write_file(&config, yaml, 0o644);
        crate::write_file(
            &self.dir.join(format!("{name}.jwt")),
            self.valid_token(agent_id),
            0o600,
        );
        let mut command = self.command("nowconnect-agent", &config);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut agent = ExtraAgent {
            proc: None,
            agent_id: name.to_owned(),
            admin,
            hub_admin: self.hub_admin,
            connectors: connectors.iter().map(|c| c.to_string()).collect(),
            command,
            dir: self.dir.clone(),
            starts: 0,
        };
        agent.start();
        agent.agent_id = agent_id.to_owned();
        agent
    }

    /// A second hub with this hub's configuration (same JWKS, TLS certificate, connectors and
    /// limits) on fresh ports for its tunnel listener, admin listener and connector listeners;
    /// written as `<name>.yaml`, logging to `<name>.log`. Started and waited for (`/readyz`).
    pub fn second_hub(&self, name: &str) -> ExtraHub {
        let mut yaml = std::fs::read_to_string(&self.hub_config).expect("read hub.yaml");
        let listen = free_addr();
        let admin = free_addr();
        // Every address in hub.yaml is a distinct 127.0.0.1:<port> of this fixture.
        yaml = yaml.replace(&self.hub_listen.to_string(), &listen.to_string());
        yaml = yaml.replace(&self.hub_admin.to_string(), &admin.to_string());
        let mut connectors = Vec::new();
        for (c, addr) in &self.connectors {
            let new = free_addr();
            yaml = yaml.replace(&addr.to_string(), &new.to_string());
            connectors.push((c.clone(), new));
        }
        let config = self.dir.join(format!("{name}.yaml"));
        crate::write_file(&config, &yaml, 0o644);
        let url = format!(
            "{}://127.0.0.1:{}{TUNNEL_PATH}",
            self.transport.scheme(),
            listen.port()
        );
        let mut hub = ExtraHub {
            proc: None,
            name: name.to_owned(),
            listen,
            admin,
            url,
            connectors,
            command: self.command("nowconnect-hub", &config),
            dir: self.dir.clone(),
        };
        hub.start();
        hub
    }
}

/// An additional hub process (see [`Tunnel::second_hub`]). Dropping it stops the hub (declare it
/// after its [`Tunnel`] and before the agents using it).
pub struct ExtraHub {
    proc: Option<Proc>,
    name: String,
    /// Its tunnel listener.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// `ws://127.0.0.1:<port>/v1/tunnel` or `wss://...`.
    pub url: String,
    connectors: Vec<(String, SocketAddr)>,
    command: Command,
    dir: PathBuf,
}

impl ExtraHub {
    /// Starts the hub (it must not be running) and waits for its `/readyz` and listener.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "{} already running", self.name);
        let mut hub = Proc::spawn(&self.name, copy_command(&self.command), &self.dir);
        hub.wait_for_port(self.admin, START_TIMEOUT);
        let admin = self.admin;
        let ready = crate::wait_until(READY_TIMEOUT, || {
            matches!(http_get(admin, "/readyz"), Ok((200, _))) || !hub.is_running()
        });
        let listen = self.listen;
        assert!(
            ready && crate::wait_until(START_TIMEOUT, || is_listening(listen)),
            "{} not ready\n{}",
            self.name,
            hub.log_tail()
        );
        self.proc = Some(hub);
    }

    /// Its listener for connector `name`. Panics on an unknown name.
    pub fn connector(&self, name: &str) -> SocketAddr {
        self.connectors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no connector {name:?} on {}", self.name))
    }

    /// The running process. Panics when it is not running under this fixture.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("extra hub not started")
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM (graceful drain), waits for the exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.take().map(|mut p| p.stop())
    }

    /// The current process's log tail (empty when none runs).
    pub fn log_tail(&self) -> String {
        self.proc.as_ref().map(Proc::log_tail).unwrap_or_default()
    }

    /// `GET /metrics` of its admin listener.
    pub fn metrics(&self) -> String {
        get_ok(self.admin, "/metrics")
    }
}

impl Drop for ExtraHub {
    fn drop(&mut self) {
        drop(self.proc.take());
    }
}

/// A copy of `command` (program, arguments, directory, environment changes).
fn copy_command(command: &Command) -> Command {
    let mut cmd = Command::new(command.get_program());
    cmd.args(command.get_args());
    if let Some(d) = command.get_current_dir() {
        cmd.current_dir(d);
    }
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The agent first: its drain ends the streams, so the hub then has nothing to wait for.
        drop(self.agent.take());
        drop(self.hub.take());
    }
}

fn numbered(base: &str, n: u32) -> String {
    if n <= 1 {
        base.to_string()
    } else {
        format!("{base}-{n}")
    }
}

fn get_ok(addr: SocketAddr, path: &str) -> String {
    match http_get(addr, path) {
        Ok((200, body)) => body,
        other => panic!("GET http://{addr}{path}: {other:?}"),
    }
}

/// A minimal HTTP/1.0 `GET` (no chunked answers, connection closed by the server): status code
/// and body. For the admin endpoints; 2 s deadline.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sum of every sample of `name` in a Prometheus text exposition whose labels include all of
/// `labels`; `None` when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer name with this prefix
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if !all {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Resident set size of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// True when a TCP socket listens on `addr`'s port (any local address), read from
/// `/proc/net/tcp{,6}` without connecting to it.
pub fn is_listening(addr: SocketAddr) -> bool {
    let port = format!(":{:04X}", addr.port());
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                // sl local_address rem_address st ...; st 0A = LISTEN
                let mut cols = line.split_whitespace();
                let local = cols.nth(1);
                let state = cols.nth(1);
                local.is_some_and(|l| l.ends_with(&port)) && state == Some("0A")
            })
        })
    })
}
