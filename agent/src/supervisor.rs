//! One supervisor thread per hub URL × `hub.tunnels`: keeps one tunnel up, forever.
//!
//! Loop: fetch the token (a `token.file` is re-read each time) → dial → session → tunnel; when
//! it ends, back off (exponential, full jitter; reset once a session reached HELLO_ACK) and
//! dial again. Network, TLS and auth failures are logged and retried, never fatal. A hub
//! GOAWAY (TOKEN_EXPIRED, SHUTDOWN…) makes it dial a replacement while the old tunnel drains its
//! streams (wire-protocol.md §6): at once for TOKEN_EXPIRED, after a jittered wait otherwise.
//!
//! Make before break: when the current tunnel's token nears `exp` without a RENEW_ACK (in-band
//! renewal off, refused or unanswered) and the token source has a newer token, a standby tunnel
//! is dialed while the current one keeps serving. Once the standby has HELLO_ACK it becomes
//! the current tunnel and the old one gets GOAWAY(TOKEN_EXPIRED) and drains: new clients never
//! find the agent missing. A hub GOAWAY on the current tunnel promotes a standby in progress.
//! On agent drain: GOAWAY(SHUTDOWN) on its tunnels, no more dialing, and the thread ends once
//! they have closed.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use nowconnect_core::{close, Code, Hello, Session};
use nowconnect_runtime::{now, Tunnel};

use crate::backoff::Backoff;
use crate::config::HubUrl;
use crate::dial::DialError;
use crate::metrics::{self, result};
use crate::registry::LiveTunnel;
use crate::run::{unix_now, Shared};
use crate::token::{Token, TokenError};
use crate::tunnel::{AgentTunnel, LiveState, SlotEvent};

/// How often the supervisor looks at its tunnels even without events (a tunnel thread that
/// died without `on_closed` is noticed within this).
const TICK: Duration = Duration::from_millis(500);

/// After a standby could not be dialed (no newer token yet, or the dial failed), look again
/// after this.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// A replaced tunnel keeps taking new streams this long after its replacement's HELLO_ACK, so
/// the hub has the replacement's HEALTH (sent on another connection) before the GOAWAY.
const SWITCH_OVERLAP: Duration = Duration::from_secs(1);

/// `software` in HELLO.
pub fn software() -> String {
    format!("nowconnect-agent/{}", env!("CARGO_PKG_VERSION"))
}

struct Live {
    id: String,
    tunnel: Tunnel,
    state: Arc<LiveState>,
}

enum AttemptError {
    Token(TokenError),
    Dial(DialError),
    Spawn(std::io::Error),
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Token(e) => write!(f, "token: {e}"),
            AttemptError::Dial(e) => e.fmt(f),
            AttemptError::Spawn(e) => write!(f, "cannot start the tunnel thread: {e}"),
        }
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    slot: String,
    url: HubUrl,
    events_tx: Sender<SlotEvent>,
    events: Receiver<SlotEvent>,
    backoff: Backoff,
    /// The tunnel new streams go to.
    current: Option<Live>,
    /// A replacement dialed before the current tunnel's token expires (make before break).
    standby: Option<Live>,
    /// Not before this, dial a standby.
    standby_next: Option<Instant>,
    /// Tunnels replaced after a hub GOAWAY, or draining: their streams finish.
    old: Vec<Live>,
    /// A tunnel replaced by a standby, and when to send it GOAWAY(TOKEN_EXPIRED).
    retire: Option<(String, Instant)>,
    /// When to dial next (only while there is no current tunnel).
    retry_at: Option<Instant>,
    draining: bool,
    attempts: u64,
}

/// Runs slot `slot` for `url` until the agent drains and its tunnels have closed.
pub fn run(shared: Arc<Shared>, slot: String, url: HubUrl) {
    let (events_tx, events) = crossbeam_channel::unbounded();
    let reconnect = &shared.cfg.reconnect;
    let backoff = Backoff::new(reconnect.initial, reconnect.max);
    let mut s = Supervisor {
        shared,
        slot,
        url,
        events_tx,
        events,
        backoff,
        current: None,
        standby: None,
        standby_next: None,
        old: Vec::new(),
        retire: None,
        retry_at: Some(Instant::now()),
        draining: false,
        attempts: 0,
    };
    s.run();
}

impl Supervisor {
    fn run(&mut self) {
        let hub = self.url.url.clone();
        self.shared.registry.slot(&self.slot, |st| {
            st.hub = hub;
            st.state = "connecting";
        });
        let mut drain = self.shared.drain_signal();
        loop {
            self.reap();
            if self.draining
                && self.current.is_none()
                && self.standby.is_none()
                && self.old.is_empty()
            {
                break;
            }
            if !self.draining {
                self.retire_due();
                self.maybe_standby();
            }
            let now = Instant::now();
            if !self.draining && self.current.is_none() && self.retry_at.is_some_and(|t| t <= now) {
                self.attempt();
                continue;
            }
            let mut timeout = TICK;
            if let Some((_, at)) = &self.retire {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if let (None, Some(at)) = (&self.current, self.retry_at) {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            select! {
                recv(self.events) -> ev => {
                    if let Ok(ev) = ev {
                        self.on_event(ev);
                    }
                }
                recv(drain) -> _ => {
                    // The sender was dropped: drain. Stop listening (it stays ready forever).
                    drain = crossbeam_channel::never();
                    self.start_drain();
                }
                default(timeout) => {}
            }
        }
        self.shared.registry.slot(&self.slot, |st| {
            st.state = "stopped";
            st.retry_at = None;
        });
        log::debug!(hub = self.url.url.as_str(), slot = self.slot.as_str(); "supervisor done");
    }

    /// One connect attempt.
    fn attempt(&mut self) {
        self.attempts += 1;
        self.shared.registry.slot(&self.slot, |st| {
            st.state = "connecting";
            st.retry_at = None;
        });
        match self.connect() {
            Ok(live) => {
                self.current = Some(live);
                self.retry_at = None;
            }
            Err(e) => {
                if let AttemptError::Dial(d) = &e {
                    self.count(d.result());
                } else if let AttemptError::Spawn(_) = &e {
                    self.count(result::NETWORK_ERROR);
                }
                self.failed(&e.to_string());
            }
        }
    }

    /// Schedules the next attempt after a failure and records it.
    fn failed(&mut self, error: &str) {
        let delay = self.backoff.next_delay();
        let at = Instant::now() + delay;
        self.retry_at = Some(at);
        log::warn!(
            agent_id = self.shared.cfg.agent_id.as_str(),
            hub = self.url.url.as_str(),
            slot = self.slot.as_str(),
            reason = error,
            retry_in_ms = delay.as_millis() as u64;
            "tunnel connect failed"
        );
        let error = error.to_owned();
        let draining = self.draining;
        self.shared.registry.slot(&self.slot, |st| {
            st.state = if draining { "draining" } else { "backoff" };
            st.retry_at = Some(at);
            st.failures += 1;
            st.last_error = Some((Instant::now(), error));
        });
    }

    fn count(&self, result: &str) {
        self.shared.metrics.inc(metrics::CONNECTS_TOTAL, &[result]);
    }

    fn connect(&mut self) -> Result<Live, AttemptError> {
        let token = self.shared.token.fetch().map_err(AttemptError::Token)?;
        self.connect_with(token)
    }

    fn connect_with(&mut self, token: Token) -> Result<Live, AttemptError> {
        let shared = &self.shared;
        shared.note_token(token.times());
        log::debug!(hub = self.url.url.as_str(), slot = self.slot.as_str(); "dialing");
        let ws = shared
            .dialer
            .dial(&self.url, &token)
            .map_err(AttemptError::Dial)?;
        let hello = Hello {
            agent_id: shared.cfg.agent_id.clone(),
            connectors: shared
                .connectors
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            ver: nowconnect_core::json::PROTOCOL_VERSION,
            software: software(),
            // Taken from the session config by `Session::new_agent`.
            window: 0,
            max_streams: 0,
        };
        let session = Session::new_agent(shared.cfg.session_config(), hello, now());
        let id = format!("{}.{}", self.slot, self.attempts);
        let times = token.times();
        shared.registry.insert(
            &id,
            LiveTunnel {
                handle: None,
                slot: self.slot.clone(),
                hub: self.url.url.clone(),
                dialed: Instant::now(),
                session: None,
                accepted: Vec::new(),
                rejected: Vec::new(),
                up_since: None,
                token: times,
                renew_at: times.renew_at(shared.cfg.token.renew_at, unix_now()),
                renew_pending: None,
                renew_warned: false,
            },
        );
        let state = Arc::new(LiveState::default());
        let handler = AgentTunnel::new(
            shared.clone(),
            id.clone(),
            self.url.url.clone(),
            state.clone(),
            self.events_tx.clone(),
        );
        match Tunnel::spawn(&id, ws, session, Box::new(handler)) {
            Ok(tunnel) => {
                shared.registry.set_handle(&id, tunnel.handle());
                log::debug!(hub = self.url.url.as_str(), tunnel = id.as_str(); "upgraded; waiting for HELLO_ACK");
                Ok(Live { id, tunnel, state })
            }
            Err(e) => {
                shared.registry.remove(&id);
                Err(AttemptError::Spawn(e))
            }
        }
    }

    fn on_event(&mut self, ev: SlotEvent) {
        match ev {
            SlotEvent::Established { id } => {
                self.count(result::OK);
                self.backoff.reset();
                if self.standby.as_ref().is_some_and(|c| c.id == id) {
                    self.switch_to_standby();
                }
                if self.current.as_ref().is_some_and(|c| c.id == id) {
                    let draining = self.draining;
                    self.shared.registry.slot(&self.slot, |st| {
                        st.state = if draining { "draining" } else { "up" };
                        st.failures = 0;
                    });
                }
            }
            SlotEvent::GoAway { id, code } => {
                if self.current.as_ref().is_some_and(|c| c.id == id) {
                    if let Some(live) = self.current.take() {
                        self.old.push(live);
                    }
                    if let Some(standby) = self.standby.take() {
                        // Already dialed: it takes over (its HELLO_ACK may still be coming).
                        log::info!(tunnel = id.as_str(), code = code.name(), replacement = standby.id.as_str(); "hub sent GOAWAY; the standby tunnel takes over");
                        self.current = Some(standby);
                        self.retry_at = None;
                        return;
                    }
                    // §6: a fresh tunnel with a fresh token before letting the old one go.
                    // TOKEN_EXPIRED concerns this agent alone: dial at once. Otherwise the
                    // backoff (reset at HELLO_ACK) waits at most `reconnect.initial`,
                    // jittered: a hub draining many agents is not hit by all of them at
                    // once, and a hub that GOAWAYs every session cannot make us spin.
                    let delay = if code == Code::TOKEN_EXPIRED {
                        Duration::ZERO
                    } else {
                        self.backoff.next_delay()
                    };
                    self.retry_at = Some(Instant::now() + delay);
                    log::debug!(tunnel = id.as_str(), code = code.name(), retry_in_ms = delay.as_millis() as u64; "replacing tunnel");
                }
            }
            // `reap` joins it (its handle already reads closed).
            SlotEvent::Closed { .. } => {}
        }
    }

    /// Joins tunnels that have ended, logs them, and schedules the next dial if the current
    /// one is gone.
    fn reap(&mut self) {
        if let Some(live) = self.standby.take_if(|l| l.tunnel.handle().is_closed()) {
            self.finish(live);
            self.standby_next = Some(Instant::now() + STANDBY_RETRY);
        }
        if let Some(live) = self.current.take_if(|l| l.tunnel.handle().is_closed()) {
            let established = self.finish(live);
            if let Some(standby) = self.standby.take() {
                self.current = Some(standby);
            } else if !self.draining {
                if established {
                    self.backoff.reset();
                }
                let delay = self.backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                let at = self.retry_at;
                self.shared.registry.slot(&self.slot, |st| {
                    st.state = "backoff";
                    st.retry_at = at;
                });
                log::debug!(hub = self.url.url.as_str(), retry_in_ms = delay.as_millis() as u64; "reconnecting");
            }
        }
        let mut i = 0;
        while i < self.old.len() {
            if self.old[i].tunnel.handle().is_closed() {
                let live = self.old.swap_remove(i);
                self.finish(live);
            } else {
                i += 1;
            }
        }
    }

    /// Joins an ended tunnel; returns whether it had reached HELLO_ACK.
    fn finish(&mut self, live: Live) -> bool {
        let established = live.state.established.load(Ordering::Acquire);
        let entry = self.shared.registry.remove(&live.id);
        let end = live.tunnel.join();
        self.shared.update_tunnels_up();
        let session = entry.and_then(|e| e.session).unwrap_or_default();
        if established {
            log::info!(
                agent_id = self.shared.cfg.agent_id.as_str(),
                hub = self.url.url.as_str(),
                session = session.as_str(),
                tunnel = live.id.as_str(),
                code = end.code,
                reason = end.reason.as_str();
                "tunnel down"
            );
        } else {
            // Closed before HELLO_ACK: this attempt failed (§7: 4403 agent_id / scopes).
            let result = if end.code == close::FORBIDDEN {
                result::FORBIDDEN
            } else {
                result::NETWORK_ERROR
            };
            self.count(result);
            let reason = format!(
                "session closed before HELLO_ACK: {} {}",
                end.code, end.reason
            );
            let error = reason.clone();
            self.shared.registry.slot(&self.slot, |st| {
                st.failures += 1;
                st.last_error = Some((Instant::now(), error));
            });
            log::warn!(
                agent_id = self.shared.cfg.agent_id.as_str(),
                hub = self.url.url.as_str(),
                tunnel = live.id.as_str(),
                code = end.code,
                reason = reason.as_str();
                "tunnel handshake failed"
            );
        }
        established
    }

    /// Dials a standby when the current tunnel's token nears `exp` unrenewed and the token
    /// source has a newer one (see the module documentation).
    fn maybe_standby(&mut self) {
        if self.standby.is_some() || self.standby_next.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let Some(current) = &self.current else {
            return;
        };
        if !current.state.established.load(Ordering::Acquire) {
            return;
        }
        let Some(entry) = self
            .shared
            .registry
            .snapshot()
            .into_iter()
            .find_map(|(id, t)| (id == current.id).then_some(t))
        else {
            return;
        };
        let now = unix_now();
        if !entry.is_serving() || entry.token.replace_at(now).is_none_or(|at| now < at) {
            return;
        }
        let current_id = current.id.clone();
        self.standby_next = Some(Instant::now() + STANDBY_RETRY);
        let token = match self.shared.token.fetch() {
            Ok(t) if t.is_newer_than(&entry.token) => t,
            Ok(_) => {
                log::debug!(tunnel = current_id.as_str(); "token nears expiry unrenewed; no newer token yet for a replacement");
                return;
            }
            Err(e) => {
                log::warn!(tunnel = current_id.as_str(), reason = e.to_string().as_str(); "token nears expiry unrenewed; cannot get a token for a replacement");
                return;
            }
        };
        log::info!(
            hub = self.url.url.as_str(),
            tunnel = current_id.as_str(),
            exp = entry.token.exp.unwrap_or(0);
            "token nears expiry without renewal: opening a replacement tunnel before letting this one go"
        );
        self.attempts += 1;
        match self.connect_with(token) {
            Ok(live) => self.standby = Some(live),
            Err(e) => {
                if let AttemptError::Dial(d) = &e {
                    self.count(d.result());
                }
                log::warn!(
                    hub = self.url.url.as_str(),
                    tunnel = current_id.as_str(),
                    reason = e.to_string().as_str();
                    "replacement tunnel failed; the current one keeps serving"
                );
            }
        }
    }

    /// The standby reached HELLO_ACK: it becomes current; the old current drains.
    fn switch_to_standby(&mut self) {
        if self.draining {
            // Its own handler sent GOAWAY(SHUTDOWN) at HELLO_ACK; it closes like the others.
            return;
        }
        let Some(standby) = self.standby.take() else {
            return;
        };
        if let Some(old) = self.current.take() {
            log::info!(
                hub = self.url.url.as_str(),
                tunnel = old.id.as_str(),
                replacement = standby.id.as_str();
                "replacement tunnel up; the old one drains"
            );
            self.retire = Some((old.id.clone(), Instant::now() + SWITCH_OVERLAP));
            self.old.push(old);
        }
        self.current = Some(standby);
        self.retry_at = None;
    }

    /// GOAWAY(TOKEN_EXPIRED) on the replaced tunnel once [`SWITCH_OVERLAP`] has passed.
    fn retire_due(&mut self) {
        let Some((id, _)) = self.retire.take_if(|(_, at)| *at <= Instant::now()) else {
            return;
        };
        if let Some(old) = self.old.iter().find(|l| l.id == id) {
            old.tunnel.handle().goaway(
                Code::TOKEN_EXPIRED,
                "token expiring; replaced by a fresh tunnel",
            );
        }
    }

    /// Agent drain: GOAWAY(SHUTDOWN) on established tunnels, close the others; dial no more.
    fn start_drain(&mut self) {
        self.draining = true;
        self.retry_at = None;
        for live in self
            .current
            .iter()
            .chain(self.standby.iter())
            .chain(self.old.iter())
        {
            let h = live.tunnel.handle();
            if live.state.established.load(Ordering::Acquire) {
                h.goaway(Code::SHUTDOWN, "agent shutting down");
            } else {
                // Before HELLO_ACK there is nothing to drain. (If HELLO_ACK races this, the
                // handler sees the drain flag and sends GOAWAY itself.)
                h.close(close::NORMAL, "agent shutting down");
            }
        }
        self.shared.registry.slot(&self.slot, |st| {
            st.state = "draining";
            st.retry_at = None;
        });
    }
}
