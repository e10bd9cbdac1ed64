//! What the agent knows about its tunnels while they live: one entry per tunnel (registered by
//! its supervisor before the tunnel thread starts, filled in at HELLO_ACK, removed when the
//! supervisor has joined it), and one status line per supervisor slot. Health broadcasts,
//! RENEW, `/readyz` and the status page read it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nowconnect_core::{HelloAck, Rejected};
use nowconnect_runtime::TunnelHandle;

use crate::token::TokenTimes;

/// A RENEW unanswered this long is sent again (with a freshly read token).
pub const RENEW_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// When the token source has nothing newer than the tunnel's token, look again after this.
pub const RENEW_RETRY: Duration = Duration::from_secs(30);

/// One live tunnel.
#[derive(Debug, Clone)]
pub struct LiveTunnel {
    /// Commands into it; `None` until `Tunnel::spawn` returned or HELLO_ACK arrived.
    pub handle: Option<TunnelHandle>,
    /// The supervisor slot (`<hub index>.<tunnel index>`).
    pub slot: String,
    /// Hub URL as configured.
    pub hub: String,
    /// When the upgrade succeeded.
    pub dialed: Instant,
    /// HELLO_ACK's session id.
    pub session: Option<String>,
    /// Connectors the hub accepted.
    pub accepted: Vec<String>,
    /// Connectors the hub rejected, with why.
    pub rejected: Vec<Rejected>,
    /// When HELLO_ACK arrived.
    pub up_since: Option<Instant>,
    /// The token in force on this session (upgrade, then each RENEW_ACK).
    pub token: TokenTimes,
    /// Unix seconds at which to send RENEW (`None`: never, e.g. no `exp`).
    pub renew_at: Option<u64>,
    /// A RENEW sent and not acknowledged: the new token's times and when it went out.
    pub renew_pending: Option<(TokenTimes, Instant)>,
    /// The "token not rotated" warning was logged for this tunnel.
    pub renew_warned: bool,
}

impl LiveTunnel {
    /// Established, not closed, not draining: can take new streams.
    pub fn is_serving(&self) -> bool {
        self.up_since.is_some()
            && self
                .handle
                .as_ref()
                .is_some_and(|h| !h.is_closed() && !h.is_draining())
    }

    /// Established and not closed (draining ones count: their streams still run).
    pub fn is_up(&self) -> bool {
        self.up_since.is_some() && self.handle.as_ref().is_some_and(|h| !h.is_closed())
    }
}

/// A supervisor slot's state, for the status page.
#[derive(Debug, Clone, Default)]
pub struct SlotStatus {
    /// Hub URL.
    pub hub: String,
    /// `connecting`, `up`, `backoff`, `draining`, `stopped`.
    pub state: &'static str,
    /// When the next attempt is due (in `backoff`).
    pub retry_at: Option<Instant>,
    /// Attempts that failed since the last HELLO_ACK.
    pub failures: u32,
    /// The last failure and when.
    pub last_error: Option<(Instant, String)>,
}

/// Live tunnels by id, and slots by name.
#[derive(Debug, Default)]
pub struct Registry {
    tunnels: Mutex<BTreeMap<String, LiveTunnel>>,
    slots: Mutex<BTreeMap<String, SlotStatus>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Adds a tunnel (before its thread starts).
    pub fn insert(&self, id: &str, tunnel: LiveTunnel) {
        lock(&self.tunnels).insert(id.to_owned(), tunnel);
    }

    /// The tunnel thread runs: keep its handle (unless HELLO_ACK already stored it).
    pub fn set_handle(&self, id: &str, handle: &TunnelHandle) {
        if let Some(t) = lock(&self.tunnels).get_mut(id) {
            t.handle.get_or_insert_with(|| handle.clone());
        }
    }

    /// HELLO_ACK arrived (called on the tunnel thread).
    pub fn established(&self, id: &str, handle: &TunnelHandle, ack: &HelloAck) {
        if let Some(t) = lock(&self.tunnels).get_mut(id) {
            t.handle.get_or_insert_with(|| handle.clone());
            t.session = Some(ack.session.clone());
            t.accepted = ack.accepted.clone();
            t.rejected = ack.rejected.clone();
            t.up_since = Some(Instant::now());
        }
    }

    /// The tunnel was joined.
    pub fn remove(&self, id: &str) -> Option<LiveTunnel> {
        lock(&self.tunnels).remove(id)
    }

    /// A copy of every entry (status page, readiness).
    pub fn snapshot(&self) -> Vec<(String, LiveTunnel)> {
        lock(&self.tunnels)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Established tunnels that are not closed (`nowconnect_agent_tunnels_up`).
    pub fn up_count(&self) -> usize {
        lock(&self.tunnels).values().filter(|t| t.is_up()).count()
    }

    /// Tunnels that can take new streams, and the union of their accepted connectors.
    pub fn serving(&self) -> (usize, BTreeSet<String>) {
        let g = lock(&self.tunnels);
        let mut accepted = BTreeSet::new();
        let mut n = 0;
        for t in g.values().filter(|t| t.is_serving()) {
            n += 1;
            accepted.extend(t.accepted.iter().cloned());
        }
        (n, accepted)
    }

    /// Established tunnels with their accepted connectors (for HEALTH).
    pub fn established_handles(&self) -> Vec<(TunnelHandle, Vec<String>)> {
        lock(&self.tunnels)
            .values()
            .filter(|t| t.is_up())
            .filter_map(|t| t.handle.clone().map(|h| (h, t.accepted.clone())))
            .collect()
    }

    /// Tunnels whose token should be renewed at `now_unix` (expired pending RENEWs are
    /// forgotten so they are sent again): id, handle, and the `exp` in force.
    pub fn renew_due(&self, now_unix: u64) -> Vec<(String, TunnelHandle, Option<u64>)> {
        let mut g = lock(&self.tunnels);
        let mut due = Vec::new();
        for (id, t) in g.iter_mut() {
            if !t.is_serving() {
                continue;
            }
            if let Some((_, sent)) = t.renew_pending {
                if sent.elapsed() < RENEW_ACK_TIMEOUT {
                    continue;
                }
                log::warn!(tunnel = id.as_str(), hub = t.hub.as_str(); "RENEW not acknowledged; sending it again");
                t.renew_pending = None;
            }
            if t.renew_at.is_some_and(|at| at <= now_unix) {
                if let Some(h) = &t.handle {
                    due.push((id.clone(), h.clone(), t.token.exp));
                }
            }
        }
        due
    }

    /// RENEW went out with a token of these times.
    pub fn renew_sent(&self, id: &str, times: TokenTimes) {
        if let Some(t) = lock(&self.tunnels).get_mut(id) {
            t.renew_pending = Some((times, Instant::now()));
        }
    }

    /// Nothing newer to renew with: try again at `at` (unix seconds). Returns whether this
    /// tunnel was already warned about it.
    pub fn renew_postponed(&self, id: &str, at: u64) -> bool {
        let mut g = lock(&self.tunnels);
        let Some(t) = g.get_mut(id) else {
            return true;
        };
        t.renew_at = Some(at);
        std::mem::replace(&mut t.renew_warned, true)
    }

    /// RENEW_ACK: the new token is in force; schedule the next RENEW with `fraction`.
    pub fn renewed(&self, id: &str, exp: u64, fraction: f64, now_unix: u64) {
        if let Some(t) = lock(&self.tunnels).get_mut(id) {
            let mut times = t.renew_pending.take().map(|(t, _)| t).unwrap_or_default();
            times.exp = Some(exp);
            t.token = times;
            t.renew_at = times.renew_at(fraction, now_unix);
            t.renew_warned = false;
        }
    }

    /// Updates a slot's line.
    pub fn slot(&self, name: &str, f: impl FnOnce(&mut SlotStatus)) {
        f(lock(&self.slots).entry(name.to_owned()).or_default());
    }

    /// A copy of every slot line.
    pub fn slots(&self) -> Vec<(String, SlotStatus)> {
        lock(&self.slots)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
