//! The hub as a library: [`start`] binds every listener and starts the threads, [`Hub::drain`]
//! begins a graceful drain, [`Hub::wait`] returns the exit status once it is done. `main` is a
//! thin wrapper (config, logging, signals); tests can run a hub in-process the same way.
//!
//! # Threads
//!
//! ```text
//!  nc-hub-accept      the agents' listener (wss:// or ws://) ──▶ nc-upgrade (one per handshake,
//!                     ≤ 64 at once, 10 s deadline): TLS, upgrade, JWT ──▶ nc-tunnel-<id>
//!  nc-conn-<name>     one per connector listener: allow_clients, pick a session, open a stream
//!  nc-pdp             short-lived, one per client waiting for a PDP decision (bounded)
//!  nc-jwks            periodic JWKS refresh (the first success makes the hub ready)
//!  nc-hub-tick        1 s ticker: GOAWAY(TOKEN_EXPIRED) to sessions whose token lapsed
//!  nc-admin           /healthz /readyz /metrics and the status page
//!  nc-renew-<id>      short-lived: validates one RENEW off the tunnel thread
//! ```
//!
//! Session-level work happens in `tunnel::HubTunnel`, the runtime's handler for one tunnel;
//! the pools ([`crate::pool::Pools`]) are the only routing state.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nowconnect_core::{close, Code};
use nowconnect_runtime::admin::Admin;
use nowconnect_runtime::conf::{ConfigError, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME};
use nowconnect_runtime::metrics::Registry;
use nowconnect_runtime::{TunnelHandle, Waker};

use crate::auth::{unix_now, Authenticator, RefreshEvent, RefreshTrigger};
use crate::config::HubConfig;
use crate::metrics;
use crate::pdp::Pdp;
use crate::pool::{Member, Pools};
use crate::tunnel::TunnelEntry;
use crate::{listener, status, upgrade};

/// Extra time after `shutdown_grace` for tunnels to send their Close and hear the answer (the
/// runtime lingers up to 2 s).
const CLOSE_MARGIN: Duration = Duration::from_secs(3);
/// How often the ticker looks for expired tokens (security.md: GOAWAY(TOKEN_EXPIRED)).
const TICK: Duration = Duration::from_secs(1);
/// Longest sleep of the JWKS thread (it also wakes on shutdown).
const JWKS_MAX_SLEEP: Duration = Duration::from_secs(60);

impl Member for TunnelHandle {
    fn active_streams(&self) -> usize {
        TunnelHandle::active_streams(self)
    }
}

/// Why the hub could not start.
#[derive(Debug)]
pub enum StartError {
    /// A configured file or value is unusable (TLS cert/key, `jwks_ca`): exit status 2.
    Config(ConfigError),
    /// A listener could not be bound: exit status 1.
    Bind {
        /// Which listener (`listen`, `connectors[0].listen`, `admin.listen`).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        error: io::Error,
    },
    /// Another resource (threads, eventfds) could not be created: exit status 1.
    Io(io::Error),
}

impl StartError {
    /// The process exit status for this error (configuration.md "Command line").
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => EXIT_CONFIG,
            StartError::Bind { .. } | StartError::Io(_) => EXIT_RUNTIME,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Bind { what, addr, error } => {
                write!(f, "{what}: cannot listen on {addr}: {error}")
            }
            StartError::Io(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Io(e)
    }
}

/// A running hub. Dropping it without [`wait`](Hub::wait) drains it and stops its listeners,
/// without waiting for tunnels.
pub struct Hub {
    state: Arc<HubState>,
    listen_addr: SocketAddr,
    connector_addrs: Vec<(String, SocketAddr)>,
    admin: Option<Admin>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("listen", &self.listen_addr)
            .field("connectors", &self.connector_addrs)
            .field("admin", &self.admin.as_ref().map(Admin::addr))
            .finish()
    }
}

/// A cheap, cloneable remote control of a running hub (e.g. for a signal thread while another
/// thread sits in [`Hub::wait`]).
#[derive(Clone)]
pub struct HubHandle {
    state: Arc<HubState>,
}

impl fmt::Debug for HubHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubHandle")
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl HubHandle {
    /// Starts a graceful drain (idempotent): `/readyz` turns 503, connector listeners stop
    /// accepting, every tunnel gets GOAWAY(SHUTDOWN), new upgrades get 503.
    pub fn drain(&self) {
        self.state.drain();
    }

    /// A drain has started.
    pub fn is_draining(&self) -> bool {
        self.state.is_draining()
    }

    /// What `/readyz` answers: listeners bound, JWKS loaded, not draining.
    pub fn is_ready(&self) -> bool {
        self.state.readiness().0
    }

    /// Tunnels upgraded and not yet ended.
    pub fn tunnels(&self) -> usize {
        self.state.tunnels().len()
    }

    /// Tunnels that completed HELLO / HELLO_ACK and are still up.
    pub fn established_tunnels(&self) -> usize {
        self.state
            .tunnels()
            .values()
            .filter(|t| t.established)
            .count()
    }

    /// Whether a healthy, non-draining session serves `connector`.
    pub fn connector_available(&self, connector: &str) -> bool {
        self.state.pools.available(connector)
    }

    /// The metrics registry (tests read values from it).
    pub fn metrics(&self) -> &Registry {
        &self.state.metrics
    }
}

impl Hub {
    /// The agents' endpoint as bound (useful with port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// A connector listener's bound address.
    pub fn connector_addr(&self, name: &str) -> Option<SocketAddr> {
        self.connector_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The admin listener's bound address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::addr)
    }

    /// A remote control for other threads.
    pub fn handle(&self) -> HubHandle {
        HubHandle {
            state: self.state.clone(),
        }
    }

    /// Starts a graceful drain; see [`HubHandle::drain`].
    pub fn drain(&self) {
        self.state.drain();
    }

    /// Waits for a drain to be requested ([`drain`](Hub::drain) from any thread or handle),
    /// then for every tunnel to end — at most `shutdown_grace` plus a few seconds, after which
    /// the rest are closed 4503 — stops every thread and returns the exit status (0).
    pub fn wait(mut self) -> u8 {
        let started = self.state.wait_for_drain();
        let grace = self.state.cfg.limits.shutdown_grace;
        if !self.state.wait_tunnels_gone(started + grace + CLOSE_MARGIN) {
            let left = self.state.tunnels().len();
            log::warn!("drain: {left} tunnel(s) still open after shutdown_grace; closing them");
            for entry in self.state.tunnels().values() {
                if let Some(h) = &entry.handle {
                    h.close(close::SHUTTING_DOWN, "hub shutting down");
                }
            }
            self.state.wait_tunnels_gone(Instant::now() + CLOSE_MARGIN);
        }
        self.stop();
        log::info!("hub stopped");
        EXIT_OK
    }

    fn stop(&mut self) {
        self.state.drain();
        self.state.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Dropping the admin listener unblocks and joins its thread.
        self.admin.take();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the agents' endpoint, every connector listener and the admin listener, and starts the
/// hub's threads. The JWKS is fetched in the background: until it loads, `/readyz` is 503 and
/// upgrades get 503. Call [`install_crypto_provider`](nowconnect_runtime::install_crypto_provider)
/// first.
pub fn start(cfg: HubConfig) -> Result<Hub, StartError> {
    let tls = match (&cfg.tls, cfg.plaintext) {
        (Some(files), false) => Some(files.server_config().map_err(StartError::Config)?),
        _ => None,
    };
    let auth = Authenticator::from_config(&cfg.auth)
        .map_err(|e| StartError::Config(ConfigError::at("auth", e.to_string())))?;
    match nowconnect_runtime::sockopt::raise_fd_limit() {
        Ok(n) => log::debug!("open file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }

    let bind = |what: String, addr: SocketAddr| {
        TcpListener::bind(addr).map_err(|error| StartError::Bind { what, addr, error })
    };
    let ws_listener = bind("listen".to_owned(), cfg.listen)?;
    let listen_addr = ws_listener.local_addr()?;
    let mut connector_listeners = Vec::with_capacity(cfg.connectors.len());
    for (i, c) in cfg.connectors.iter().enumerate() {
        let l = bind(format!("connectors[{i}].listen"), c.listen)?;
        connector_listeners.push((i, l.local_addr()?, l));
    }

    let state = Arc::new(HubState::new(cfg, tls, auth)?);
    let admin = match &state.cfg.admin {
        Some(a) => {
            let status: Arc<dyn nowconnect_runtime::admin::AdminState> =
                Arc::new(status::Status::new(state.clone()));
            let admin = Admin::start(a.listen, state.metrics.clone(), status).map_err(|error| {
                StartError::Bind {
                    what: "admin.listen".to_owned(),
                    addr: a.listen,
                    error,
                }
            })?;
            Some(admin)
        }
        None => None,
    };

    let mut hub = Hub {
        state: state.clone(),
        listen_addr,
        connector_addrs: Vec::new(),
        admin,
        threads: Vec::new(),
    };
    for (i, addr, l) in connector_listeners {
        let name = state.cfg.connectors[i].name.clone();
        hub.threads.push(listener::spawn(state.clone(), i, l)?);
        log::info!(connector = name.as_str(), listen:% = addr; "connector listening");
        hub.connector_addrs.push((name, addr));
    }
    state.listeners_bound.store(true, Ordering::Release);
    state.update_availability();
    hub.threads
        .push(upgrade::spawn(state.clone(), ws_listener)?);
    // Detached: a fetch in progress (≤ FETCH_TIMEOUT) must not delay the exit.
    drop(spawn_named("nc-jwks", {
        let state = state.clone();
        move || jwks_loop(&state)
    })?);
    hub.threads.push(spawn_named("nc-hub-tick", {
        let state = state.clone();
        move || tick_loop(&state)
    })?);
    if let Some(pdp) = &state.pdp {
        log::info!(
            "authz.pdp: every OPEN is authorized (timeout {:?}, on_error {:?})",
            pdp.timeout,
            pdp.on_error
        );
    }
    log::info!(
        "nowconnect-hub {} listening on {} ({}{}), admin {}",
        env!("CARGO_PKG_VERSION"),
        listen_addr,
        if state.tls.is_some() {
            "wss://"
        } else {
            "ws://"
        },
        state.cfg.path,
        hub.admin_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
    );
    Ok(hub)
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_owned())
        .stack_size(256 * 1024)
        .spawn(f)
}

/// Everything the hub's threads share.
pub(crate) struct HubState {
    pub cfg: HubConfig,
    /// `None` with `plaintext: true`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Authenticator,
    /// `authz.pdp`: every OPEN is authorized by it (see `listener`).
    pub pdp: Option<Pdp>,
    pub pools: Pools<TunnelHandle>,
    pub metrics: Registry,
    tunnels: Mutex<BTreeMap<u64, TunnelEntry>>,
    tunnels_changed: Condvar,
    draining: AtomicBool,
    drain_started: Mutex<Option<Instant>>,
    drain_requested: Condvar,
    pub listeners_bound: AtomicBool,
    /// Tunnels counted against `max_tunnels` (reserved at the upgrade decision).
    pub tunnel_slots: AtomicUsize,
    /// Handshakes in progress (capped in all and per source address).
    pub handshakes: crate::upgrade::Handshakes,
    /// Wakes the connector listeners (drain) and the agents' listener (stop).
    pub connectors_waker: Waker,
    pub ws_waker: Waker,
    stopped: Mutex<bool>,
    stop_changed: Condvar,
    next_id: AtomicU64,
    session_prefix: String,
}

impl HubState {
    fn new(
        cfg: HubConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        auth: Authenticator,
    ) -> io::Result<HubState> {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(unix_now());
        h.write_u32(std::process::id());
        let pdp = cfg
            .authz
            .pdp
            .as_ref()
            .map(|p| Pdp::new(p, cfg.connectors.len()));
        Ok(HubState {
            cfg,
            tls,
            auth,
            pdp,
            pools: Pools::default(),
            metrics: metrics::registry(),
            tunnels: Mutex::new(BTreeMap::new()),
            tunnels_changed: Condvar::new(),
            draining: AtomicBool::new(false),
            drain_started: Mutex::new(None),
            drain_requested: Condvar::new(),
            listeners_bound: AtomicBool::new(false),
            tunnel_slots: AtomicUsize::new(0),
            handshakes: crate::upgrade::Handshakes::default(),
            connectors_waker: Waker::new()?,
            ws_waker: Waker::new()?,
            stopped: Mutex::new(false),
            stop_changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            session_prefix: format!("{:08x}", h.finish() as u32),
        })
    }

    /// A new hub-local tunnel id and its opaque session name (HELLO_ACK `session`).
    pub fn next_tunnel(&self) -> (u64, String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}-{id}", self.session_prefix))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn tunnels(&self) -> MutexGuard<'_, BTreeMap<u64, TunnelEntry>> {
        // Plain data: a panic while holding the lock leaves nothing half-updated that matters.
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a tunnel before its thread starts (its handler removes it when it ends).
    pub fn insert_tunnel(&self, id: u64, entry: TunnelEntry) {
        let mut t = self.tunnels();
        t.insert(id, entry);
        self.metrics
            .set(metrics::TUNNELS_ACTIVE, &[], t.len() as f64);
    }

    /// The tunnel thread runs: record its handle. False if it already ended.
    pub fn attach_handle(&self, id: u64, handle: TunnelHandle) -> bool {
        match self.tunnels().get_mut(&id) {
            Some(e) => {
                e.handle = Some(handle);
                true
            }
            None => false,
        }
    }

    pub fn remove_tunnel(&self, id: u64) {
        let mut t = self.tunnels();
        if t.remove(&id).is_some() {
            self.metrics
                .set(metrics::TUNNELS_ACTIVE, &[], t.len() as f64);
            self.tunnels_changed.notify_all();
        }
    }

    /// `agents_connected{agent_id}`: established tunnels of that agent (the series goes away
    /// at zero).
    pub fn recount_agent(&self, agent_id: &str) {
        let t = self.tunnels();
        let n = t
            .values()
            .filter(|e| e.established && e.agent_id == agent_id)
            .count();
        if n > 0 {
            self.metrics
                .set(metrics::AGENTS_CONNECTED, &[agent_id], n as f64);
        } else {
            self.metrics.remove(metrics::AGENTS_CONNECTED, &[agent_id]);
        }
    }

    /// `connector_available{connector}` from the pools.
    pub fn update_availability(&self) {
        for c in &self.cfg.connectors {
            let v = if self.pools.available(&c.name) {
                1.0
            } else {
                0.0
            };
            self.metrics
                .set(metrics::CONNECTOR_AVAILABLE, &[&c.name], v);
        }
    }

    /// `/readyz`: ready and why.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let bound = self.listeners_bound.load(Ordering::Acquire);
        let jwks = self.auth.jwks().is_loaded();
        let draining = self.is_draining();
        let ready = bound && jwks && !draining;
        let connectors: serde_json::Map<String, serde_json::Value> = self
            .cfg
            .connectors
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    serde_json::json!({ "available": self.pools.available(&c.name) }),
                )
            })
            .collect();
        let body = serde_json::json!({
            "ready": ready,
            "tunnels": self.tunnels().len(),
            "connectors": connectors,
            "listeners_bound": bound,
            "jwks_loaded": jwks,
            "draining": draining,
        });
        (ready, body)
    }

    /// Starts the drain once; see [`HubHandle::drain`].
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        log::info!(
            "draining: connector listeners closed, GOAWAY(SHUTDOWN) to every tunnel (grace {:?})",
            self.cfg.limits.shutdown_grace
        );
        {
            let mut started = self.drain_started.lock().unwrap_or_else(|e| e.into_inner());
            started.get_or_insert_with(Instant::now);
            self.drain_requested.notify_all();
        }
        self.connectors_waker.wake();
        for (id, entry) in self.tunnels().iter() {
            self.pools.set_draining(*id);
            let Some(h) = &entry.handle else {
                continue; // its upgrade thread sees `draining` and closes it
            };
            if entry.established {
                h.goaway(Code::SHUTDOWN, "hub shutting down");
            } else {
                h.close(close::SHUTTING_DOWN, "hub shutting down");
            }
        }
        self.update_availability();
    }

    /// Blocks until a drain starts; returns when it started.
    fn wait_for_drain(&self) -> Instant {
        let mut started = self.drain_started.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = *started {
                return t;
            }
            started = self
                .drain_requested
                .wait(started)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until no tunnel is left or `deadline`; true when none is left.
    fn wait_tunnels_gone(&self, deadline: Instant) -> bool {
        let mut t = self.tunnels();
        loop {
            if t.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            t = self
                .tunnels_changed
                .wait_timeout(t, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Stops the background threads (listeners, JWKS, ticker).
    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop_changed.notify_all();
        self.connectors_waker.wake();
        self.ws_waker.wake();
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`; true if the hub is stopping.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *stopped {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            stopped = self
                .stop_changed
                .wait_timeout(stopped, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Keeps the JWKS fresh (security.md): the first success makes the hub ready; a failed refresh
/// keeps the last good keys. Every refresh — this loop's and the unknown-kid ones the upgrades
/// trigger — is counted and logged by [`observe_jwks`].
fn jwks_loop(state: &HubState) {
    let jwks = state.auth.jwks();
    jwks.set_observer(observe_jwks(state.metrics.clone()));
    loop {
        // The observer has counted and logged the outcome.
        let _ = jwks.refresh_if_due(Instant::now());
        let now = Instant::now();
        let wait = jwks
            .next_refresh(now)
            .map_or(JWKS_MAX_SLEEP, |t| t.saturating_duration_since(now))
            .clamp(Duration::from_millis(100), JWKS_MAX_SLEEP);
        if state.sleep(wait) {
            return;
        }
    }
}

/// `nowconnect_jwks_refresh_total{result}` and the log line of one finished JWKS refresh.
fn observe_jwks(registry: Registry) -> impl Fn(&RefreshEvent<'_>) + Send + Sync + 'static {
    move |ev| {
        let trigger = match ev.trigger {
            RefreshTrigger::Scheduled => "scheduled",
            RefreshTrigger::UnknownKid => "unknown_kid",
        };
        match ev.result {
            Ok(n) => {
                registry.inc(metrics::JWKS_REFRESH, &["ok"]);
                match (&ev.kids_changed, ev.was_loaded) {
                    (Some(kids), false) => log::info!(
                        kids = kid_list(kids).as_str(), trigger = trigger;
                        "JWKS loaded: {n} key(s)"
                    ),
                    (Some(kids), true) => log::info!(
                        kids = kid_list(kids).as_str(), trigger = trigger;
                        "JWKS refreshed: {n} key(s), key set changed"
                    ),
                    (None, _) if ev.trigger == RefreshTrigger::UnknownKid => log::info!(
                        trigger = trigger;
                        "JWKS refreshed for an unknown kid: key set unchanged"
                    ),
                    (None, _) => {
                        log::debug!(trigger = trigger; "JWKS refreshed: {n} key(s), unchanged")
                    }
                }
            }
            Err(e) => {
                registry.inc(metrics::JWKS_REFRESH, &["error"]);
                if ev.was_loaded {
                    log::warn!(
                        trigger = trigger;
                        "JWKS refresh failed, keeping the last good keys: {e}"
                    );
                } else {
                    log::warn!(
                        trigger = trigger;
                        "JWKS not loaded, hub not ready (upgrades get 503): {e}"
                    );
                }
            }
        }
    }
}

/// At most 16 kids, comma-separated, for a log field.
fn kid_list(kids: &[String]) -> String {
    const SHOWN: usize = 16;
    let mut s = kids
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",");
    if kids.len() > SHOWN {
        s += &format!(",... ({} more)", kids.len() - SHOWN);
    }
    s
}

/// Every second: GOAWAY(TOKEN_EXPIRED) to established sessions whose token passed
/// `exp + leeway` without a successful RENEW (security.md "Token lifetime").
fn tick_loop(state: &HubState) {
    let leeway = state.cfg.auth.leeway.as_secs();
    while !state.sleep(TICK) {
        let now = unix_now();
        let mut expired = Vec::new();
        for (id, entry) in state.tunnels().iter_mut() {
            if entry.established && !entry.token_expired && now > entry.exp.saturating_add(leeway) {
                entry.token_expired = true;
                if let Some(h) = &entry.handle {
                    h.goaway(Code::TOKEN_EXPIRED, "token expired");
                }
                expired.push((*id, entry.agent_id.clone(), entry.session.clone()));
            }
        }
        for (id, agent_id, session) in expired {
            state.pools.set_draining(id);
            log::info!(
                agent_id = agent_id.as_str(), session = session.as_str();
                "token expired without RENEW: GOAWAY(TOKEN_EXPIRED)"
            );
        }
        if !state.is_draining() {
            state.update_availability();
        }
    }
}
