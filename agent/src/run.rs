//! The agent as a library: [`start`] a configured agent, [`Agent::drain`] it, [`Agent::wait`]
//! for it to stop. `main` is a thin wrapper (signals, logging); tests run it in-process.
//!
//! Threads: one supervisor per hub URL × `hub.tunnels` (`nc-sup-<hub>.<n>`, see
//! [`supervisor`](crate::supervisor)), each owning its tunnels' threads (runtime); one
//! health-check thread per connector (`nc-health-<i>`); one token thread (`nc-token`) for the
//! expiry gauge and in-band RENEW; the admin listener when configured.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nowconnect_runtime::admin::Admin;
use nowconnect_runtime::conf::{self, EnvLookup, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME};
use nowconnect_runtime::metrics::Registry as Metrics;
use nowconnect_runtime::{sockopt, ws};

use crate::config::AgentConfig;
use crate::connector::{self, Connector};
use crate::dial::{self, Dialer};
use crate::metrics;
use crate::registry::{Registry, RENEW_RETRY};
use crate::status::Status;
use crate::supervisor;
use crate::token::{TokenError, TokenSource, TokenTimes};

/// Extra time [`Agent::wait`] allows after `shutdown_grace` before it stops waiting for
/// supervisors (a dial in progress, the WebSocket close handshake).
const DRAIN_SLACK: Duration = Duration::from_secs(15);

/// How often the token thread refreshes the expiry gauge and looks for RENEWs due.
const TOKEN_TICK: Duration = Duration::from_secs(1);

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why the agent could not start.
#[derive(Debug)]
pub enum StartError {
    /// No usable token source (exit 2: configuration).
    Token(TokenError),
    /// A configured feature this build does not have yet (exit 2).
    Unsupported(String),
    /// The TLS client configuration (`hub.ca_file`) could not be built (exit 2).
    Tls(String),
    /// The admin listener could not bind (exit 1).
    Admin(SocketAddr, io::Error),
    /// A thread could not be started (exit 1).
    Thread(io::Error),
}

impl StartError {
    /// The process exit status for this error (configuration.md "Command line").
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Token(_) | StartError::Unsupported(_) | StartError::Tls(_) => EXIT_CONFIG,
            StartError::Admin(..) | StartError::Thread(_) => EXIT_RUNTIME,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Token(e) => e.fmt(f),
            StartError::Unsupported(what) => f.write_str(what),
            StartError::Tls(e) => write!(f, "TLS configuration: {e}"),
            StartError::Admin(addr, e) => write!(f, "admin.listen: cannot listen on {addr}: {e}"),
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// State shared by every thread of one agent.
#[derive(Debug)]
pub struct Shared {
    /// The configuration it runs with.
    pub cfg: AgentConfig,
    /// Connectors, in configuration order.
    pub connectors: Vec<Arc<Connector>>,
    /// Where tokens come from.
    pub token: TokenSource,
    /// Dials hub URLs.
    pub dialer: Dialer,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Live tunnels and supervisor slots.
    pub registry: Registry,
    draining: AtomicBool,
    drain_tx: Mutex<Option<Sender<()>>>,
    drain_rx: Receiver<()>,
    drain_started: Mutex<Option<Instant>>,
    last_token: Mutex<Option<TokenTimes>>,
}

impl Shared {
    /// A connector by name.
    pub fn connector(&self, name: &str) -> Option<Arc<Connector>> {
        self.connectors.iter().find(|c| c.name() == name).cloned()
    }

    /// Drain started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A receiver that becomes ready (disconnected) when the drain starts.
    pub fn drain_signal(&self) -> Receiver<()> {
        self.drain_rx.clone()
    }

    /// Starts the drain (idempotent): `/readyz` turns 503 first, then every supervisor sends
    /// GOAWAY(SHUTDOWN) and stops dialing.
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.drain_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        log::info!(agent_id = self.cfg.agent_id.as_str(); "draining: GOAWAY on every tunnel, no new tunnels");
        // Dropping the sender wakes every holder of a drain signal.
        self.drain_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn drain_started(&self) -> Option<Instant> {
        *self.drain_started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `nowconnect_agent_tunnels_up` from the registry.
    pub fn update_tunnels_up(&self) {
        self.metrics
            .set(metrics::TUNNELS_UP, &[], self.registry.up_count() as f64);
    }

    /// A token was fetched: it is now "the current token" of the expiry gauge.
    pub fn note_token(&self, times: TokenTimes) {
        *self.last_token.lock().unwrap_or_else(|e| e.into_inner()) = Some(times);
        self.update_token_expiry();
    }

    fn update_token_expiry(&self) {
        let times = *self.last_token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = times.and_then(|t| t.seconds_until_expiry(unix_now())) {
            metrics::set_token_expiry(&self.metrics, s);
        }
    }

    /// Sends HEALTH (checked, accepted connectors) on every established tunnel.
    pub fn broadcast_health(&self) {
        for (handle, accepted) in self.registry.established_handles() {
            let report = connector::health_report(&self.connectors, &accepted);
            if !report.connectors.is_empty() {
                handle.send_health(report);
            }
        }
    }

    /// `/readyz`: at least one tunnel serving, every connector it accepted healthy, not
    /// draining (operations.md).
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let (tunnels, accepted) = self.registry.serving();
        let mut connectors = serde_json::Map::new();
        let mut all_healthy = true;
        for c in &self.connectors {
            let healthy = c.is_healthy();
            let is_accepted = accepted.contains(c.name());
            if is_accepted && !healthy {
                all_healthy = false;
            }
            connectors.insert(
                c.name().to_owned(),
                serde_json::json!({ "healthy": healthy, "accepted": is_accepted }),
            );
        }
        let draining = self.is_draining();
        let ready = !draining && tunnels >= 1 && all_healthy;
        let mut body = serde_json::json!({
            "ready": ready,
            "tunnels": tunnels,
            "connectors": connectors,
        });
        if draining {
            body["draining"] = serde_json::Value::Bool(true);
        }
        (ready, body)
    }
}

/// Starts the drain of an agent from another thread (e.g. a signal handler).
#[derive(Debug, Clone)]
pub struct DrainHandle(Arc<Shared>);

impl DrainHandle {
    /// See [`Agent::drain`].
    pub fn drain(&self) {
        self.0.drain();
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    supervisors: Vec<JoinHandle<()>>,
    helpers: Vec<JoinHandle<()>>,
    /// Disconnected once every supervisor has ended.
    supervisors_done: Receiver<()>,
    admin: Option<Admin>,
}

/// Starts an agent with the process environment (`NOWCONNECT_TOKEN`).
pub fn start(cfg: AgentConfig) -> Result<Agent, StartError> {
    start_with(cfg, &conf::process_env)
}

/// Starts an agent; `env` supplies `NOWCONNECT_TOKEN` when `token` names no source, and the
/// proxy variables (`HTTPS_PROXY`, `NO_PROXY`…) when `proxy:` is not configured.
///
/// Returns once every thread runs; the tunnels come up in the background (never fails on
/// network, TLS or auth problems: those are retried).
pub fn start_with(cfg: AgentConfig, env: EnvLookup<'_>) -> Result<Agent, StartError> {
    nowconnect_runtime::install_crypto_provider();
    let token = TokenSource::from_config_with(
        &cfg.token,
        cfg.hub.ca_file.as_deref(),
        cfg.proxy.as_ref(),
        env,
    )
    .map_err(StartError::Token)?;
    let endpoints: Vec<_> = cfg.hub.endpoints().into_iter().cloned().collect();
    let tls = if endpoints.iter().any(|u| u.tls) {
        Some(dial::client_config(cfg.hub.ca_file.as_deref()).map_err(StartError::Tls)?)
    } else {
        None
    };
    for u in endpoints.iter().filter(|u| !u.tls) {
        log::warn!(hub = u.url.as_str(); "plain ws:// hub URL: only behind a TLS-terminating load balancer or in tests");
    }
    match sockopt::raise_fd_limit() {
        Ok(n) => log::debug!("open file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    let dialer = Dialer::new(
        tls,
        cfg.proxy.clone(),
        cfg.hub.server_name.clone(),
        cfg.session_config().max_message,
    )
    .with_proxy_env(env);
    for u in &endpoints {
        match dialer.proxy_for(u) {
            Ok(Some(p)) => {
                log::info!(hub = u.url.as_str(), proxy = p.shown.as_str(); "connecting through an HTTP CONNECT proxy")
            }
            Ok(None) => {}
            Err(e) => log::warn!(hub = u.url.as_str(); "{e}"),
        }
    }
    let registry = Metrics::new();
    metrics::declare(&registry);
    let (drain_tx, drain_rx) = crossbeam_channel::bounded(0);
    let connectors = cfg
        .connectors
        .iter()
        .map(|c| Arc::new(Connector::new(c.clone())))
        .collect();
    let shared = Arc::new(Shared {
        cfg,
        connectors,
        token,
        dialer,
        metrics: registry,
        registry: Registry::default(),
        draining: AtomicBool::new(false),
        drain_tx: Mutex::new(Some(drain_tx)),
        drain_rx,
        drain_started: Mutex::new(None),
        last_token: Mutex::new(None),
    });
    log::info!(
        agent_id = shared.cfg.agent_id.as_str(),
        software = supervisor::software().as_str(),
        token_source = shared.token.describe().as_str();
        "agent starting"
    );

    // From here on a failure must stop what already runs.
    let mut agent = Agent {
        shared: shared.clone(),
        supervisors: Vec::new(),
        helpers: Vec::new(),
        supervisors_done: crossbeam_channel::never(),
        admin: None,
    };
    if let Err(e) = agent.spawn_all(&endpoints) {
        shared.drain();
        return Err(e);
    }
    Ok(agent)
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    thread::Builder::new()
        .name(name)
        .stack_size(256 * 1024)
        .spawn(f)
        .map_err(StartError::Thread)
}

impl Agent {
    fn spawn_all(&mut self, endpoints: &[crate::config::HubUrl]) -> Result<(), StartError> {
        let shared = &self.shared;
        if let Some(addr) = shared.cfg.admin_listen() {
            let state = Arc::new(Status::new(shared.clone()));
            let admin = Admin::start(addr, shared.metrics.clone(), state)
                .map_err(|e| StartError::Admin(addr, e))?;
            log::info!(listen = admin.addr().to_string().as_str(); "admin listening");
            self.admin = Some(admin);
        }
        for (i, c) in shared.connectors.iter().enumerate() {
            let (s, c) = (shared.clone(), c.clone());
            self.helpers.push(spawn(format!("nc-health-{i}"), move || {
                connector::run_health_checks(s, c)
            })?);
        }
        let s = shared.clone();
        self.helpers
            .push(spawn("nc-token".into(), move || run_token_thread(s))?);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        for (h, url) in endpoints.iter().enumerate() {
            for t in 0..shared.cfg.hub.tunnels {
                let slot = format!("{h}.{t}");
                let (s, url, done) = (shared.clone(), url.clone(), done_tx.clone());
                self.supervisors
                    .push(spawn(format!("nc-sup-{slot}"), move || {
                        supervisor::run(s, slot, url);
                        drop(done);
                    })?);
            }
        }
        self.supervisors_done = done_rx;
        Ok(())
    }

    /// The admin listener's address (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::addr)
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// `/readyz`'s answer.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        self.shared.readiness()
    }

    /// Established tunnels that are not closed.
    pub fn tunnels_up(&self) -> usize {
        self.shared.registry.up_count()
    }

    /// Graceful drain: `/readyz` 503, GOAWAY(SHUTDOWN) on every tunnel, no reconnects; open
    /// streams finish within `limits.shutdown_grace`. Returns at once; [`wait`](Self::wait).
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// A handle that can start the drain from another thread.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle(self.shared.clone())
    }

    /// Blocks until the agent has stopped (after [`drain`](Self::drain): its tunnels closed,
    /// or `shutdown_grace` plus some slack passed). Returns the exit status: 0 after a drain,
    /// 1 if a thread died of a bug.
    pub fn wait(mut self) -> u8 {
        let grace = self.shared.cfg.limits.shutdown_grace;
        loop {
            let timeout = match self.shared.drain_started() {
                Some(at) => (at + grace + ws::HANDSHAKE_TIMEOUT + DRAIN_SLACK)
                    .saturating_duration_since(Instant::now()),
                None => Duration::from_millis(500),
            };
            match self.supervisors_done.recv_timeout(timeout) {
                Err(RecvTimeoutError::Disconnected) => break,
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.drain_started().is_some() && timeout.is_zero() {
                        log::warn!("drain took too long; stopping with tunnels still open");
                        self.admin.take();
                        return EXIT_OK;
                    }
                }
            }
        }
        let mut status = EXIT_OK;
        for t in self.supervisors.drain(..).chain(self.helpers.drain(..)) {
            if t.join().is_err() {
                status = EXIT_RUNTIME;
            }
        }
        self.admin.take();
        log::info!(agent_id = self.shared.cfg.agent_id.as_str(); "agent stopped");
        status
    }
}

impl Drop for Agent {
    /// An agent dropped without [`wait`](Agent::wait) drains in the background.
    fn drop(&mut self) {
        self.shared.drain();
    }
}

/// Keeps `nowconnect_agent_token_expiry_seconds` current and sends RENEW on tunnels whose
/// token reached `renew_at` (wire-protocol.md §6, §10: the token source is read anew).
fn run_token_thread(shared: Arc<Shared>) {
    let drain = shared.drain_signal();
    loop {
        shared.update_token_expiry();
        if shared.cfg.token.renew {
            renew_due(&shared);
        }
        match drain.recv_timeout(TOKEN_TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

fn renew_due(shared: &Shared) {
    let now = unix_now();
    let due = shared.registry.renew_due(now);
    if due.is_empty() {
        return;
    }
    let token = match shared.token.fetch() {
        Ok(t) => t,
        Err(e) => {
            for (id, _, exp) in &due {
                if !shared
                    .registry
                    .renew_postponed(id, renew_retry_at(now, *exp))
                {
                    log::warn!(tunnel = id.as_str(); "cannot renew: {e}");
                }
            }
            return;
        }
    };
    shared.note_token(token.times());
    for (id, handle, exp) in due {
        let retry = renew_retry_at(now, exp);
        let in_force = TokenTimes {
            exp,
            ..TokenTimes::default()
        };
        if token.is_newer_than(&in_force) {
            handle.renew(token.expose());
            shared.registry.renew_sent(&id, token.times());
            log::info!(tunnel = id.as_str(), exp = token.times().exp.unwrap_or(0); "RENEW sent");
        } else if !shared.registry.renew_postponed(&id, retry) {
            log::warn!(
                tunnel = id.as_str(),
                source = shared.token.describe().as_str();
                "token due for renewal, but the token source has no newer token yet; retrying (at most every {}s)",
                RENEW_RETRY.as_secs()
            );
        }
    }
}

/// When to look for a fresh token again after a RENEW could not be sent at `now`: a quarter
/// of the time left before `exp`, at least 1 s, at most [`RENEW_RETRY`] (so a short-lived
/// token is not left to expire between two looks).
pub fn renew_retry_at(now: u64, exp: Option<u64>) -> u64 {
    let left = exp.map_or(RENEW_RETRY.as_secs(), |e| e.saturating_sub(now));
    now + (left / 4).clamp(1, RENEW_RETRY.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_retries_tighten_as_expiry_nears() {
        // A quarter of the time left, between 1 s and RENEW_RETRY.
        assert_eq!(
            renew_retry_at(1000, Some(1400)),
            1000 + RENEW_RETRY.as_secs()
        );
        assert_eq!(renew_retry_at(1000, Some(1020)), 1005);
        assert_eq!(renew_retry_at(1000, Some(1002)), 1001);
        assert_eq!(
            renew_retry_at(1000, Some(900)),
            1001,
            "expired: keep looking"
        );
        assert_eq!(renew_retry_at(1000, None), 1000 + RENEW_RETRY.as_secs() / 4);
    }
}
