//! The policy decision point on OPEN (security.md "Authorization" 2, `authz.pdp`).
//!
//! Before a client gets a stream the hub POSTs
//! `{"agent_id","connector","client_addr","session","listener"}` to the PDP and needs
//! `{"allow": true}`. [`DecisionCache`] keeps answers per (agent_id, connector, client ip) for
//! `cache_ttl`; [`Pdp::ask`] is the HTTP call. An error (transport, timeout, non-2xx, a body
//! that is not `{"allow": bool}`) is the caller's `on_error` case; errors are never cached.
//!
//! The calls block for up to `timeout`, so they never run on a connector's accept thread or a
//! tunnel thread: the listener hands a client whose decision is not cached to a short-lived
//! `nc-pdp` thread, holding a [`Permit`] that bounds the clients waiting for a decision per
//! connector and in all (a slow PDP for one connector cannot starve the others).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{OnError, PdpConfig};

/// Largest PDP answer read (the answer is `{"allow": true}`; anything bigger is an error).
pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024;
/// Most decisions cached; when full, expired ones go first, then those expiring soonest.
pub const MAX_CACHE_ENTRIES: usize = 16 * 1024;
/// Most clients of one connector waiting for a PDP answer at once (each holds an `nc-pdp`
/// thread and its socket); beyond it a client is counted as a PDP error and refused, whatever
/// `on_error` says.
pub const MAX_PENDING_PER_CONNECTOR: usize = 64;
/// Most clients waiting for a PDP answer across all connectors.
pub const MAX_PENDING_TOTAL: usize = 256;

/// What the hub tells the PDP about one OPEN.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PdpRequest<'a> {
    /// The agent whose session would carry the stream.
    pub agent_id: &'a str,
    /// The connector the client dialled.
    pub connector: &'a str,
    /// The client, `a.b.c.d:port` or `[v6]:port`.
    pub client_addr: &'a str,
    /// That session's id (HELLO_ACK `session`).
    pub session: &'a str,
    /// The connector listener's bound address.
    pub listener: &'a str,
}

/// Why the PDP gave no decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PdpError {
    /// Connect, TLS, timeout or I/O failure.
    Transport(String),
    /// A status other than 2xx.
    Status(u16),
    /// A body that is not `{"allow": <bool>, ...}` or larger than [`MAX_RESPONSE_BYTES`].
    BadAnswer(String),
    /// Too many clients already wait for a decision (or no thread could be started).
    Overloaded,
}

impl fmt::Display for PdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PdpError::Transport(e) => write!(f, "PDP unreachable: {e}"),
            PdpError::Status(s) => write!(f, "PDP answered HTTP {s}"),
            PdpError::BadAnswer(e) => write!(f, "PDP answer unusable: {e}"),
            PdpError::Overloaded => write!(f, "too many clients waiting for the PDP"),
        }
    }
}

impl std::error::Error for PdpError {}

/// Reads `{"allow": <bool>}` (an object; other fields are ignored).
pub fn parse_answer(body: &[u8]) -> Result<bool, PdpError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| PdpError::BadAnswer(e.to_string()))?;
    match v.as_object().map(|o| o.get("allow")) {
        Some(Some(serde_json::Value::Bool(allow))) => Ok(*allow),
        Some(_) => Err(PdpError::BadAnswer("\"allow\" is not a boolean".into())),
        None => Err(PdpError::BadAnswer("not a JSON object".into())),
    }
}

/// Cache key: security.md caches per (agent_id, connector, client ip).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub agent_id: String,
    pub connector: String,
    pub client_ip: IpAddr,
}

/// Allow/deny answers of the PDP, each valid for `ttl`. Pure: time is passed in. A zero `ttl`
/// caches nothing.
#[derive(Debug)]
pub struct DecisionCache {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<CacheKey, (bool, Instant)>,
}

impl DecisionCache {
    /// An empty cache holding at most `capacity` decisions.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        DecisionCache {
            ttl,
            capacity,
            entries: HashMap::new(),
        }
    }

    /// The cached decision for `key` at `now`, if one has not expired (an expired one is
    /// removed).
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<bool> {
        let (allow, expires) = *self.entries.get(key)?;
        if now < expires {
            return Some(allow);
        }
        self.entries.remove(key);
        None
    }

    /// Records the PDP's answer for `key`, made at `now`.
    pub fn insert(&mut self, key: CacheKey, allow: bool, now: Instant) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        let Some(expires) = now.checked_add(self.ttl) else {
            return;
        };
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, e)| now < *e);
            if self.entries.len() >= self.capacity {
                // Still full of live entries: drop the one that expires first.
                let first = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(k, _)| k.clone());
                if let Some(k) = first {
                    self.entries.remove(&k);
                }
            }
        }
        self.entries.insert(key, (allow, expires));
    }

    /// Decisions held (expired ones included until they are evicted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The configured PDP: HTTP client, decision cache and the bounds on waiting clients.
pub struct Pdp {
    url: String,
    /// Per-request deadline (`authz.pdp.timeout`).
    pub timeout: Duration,
    /// `authz.pdp.on_error`.
    pub on_error: OnError,
    agent: ureq::Agent,
    cache: Mutex<DecisionCache>,
    pending: Arc<Pending>,
}

impl fmt::Debug for Pdp {
    // Not the URL: it may carry credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pdp")
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

#[derive(Debug)]
struct Pending {
    total: AtomicUsize,
    per_connector: Vec<AtomicUsize>,
}

/// One client's place among those waiting for a PDP answer; released on drop.
#[derive(Debug)]
pub struct Permit {
    pending: Arc<Pending>,
    connector: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pending.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(c) = self.pending.per_connector.get(self.connector) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Takes one unit of `counter` unless it is at `max`.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Pdp {
    /// The PDP of `cfg` for a hub with `connectors` connector listeners. HTTPS trusts the
    /// system store and Mozilla's roots (webpki-root-certs); plain `http://` is allowed (a PDP
    /// sidecar on loopback).
    pub fn new(cfg: &PdpConfig, connectors: usize) -> Pdp {
        Pdp {
            url: cfg.url.clone(),
            timeout: cfg.timeout,
            on_error: cfg.on_error,
            agent: http_agent(cfg.timeout),
            cache: Mutex::new(DecisionCache::new(cfg.cache_ttl, MAX_CACHE_ENTRIES)),
            pending: Arc::new(Pending {
                total: AtomicUsize::new(0),
                per_connector: (0..connectors).map(|_| AtomicUsize::new(0)).collect(),
            }),
        }
    }

    fn cache(&self) -> MutexGuard<'_, DecisionCache> {
        // Plain data: a panic while holding the lock leaves nothing half-updated.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached decision for `key`.
    pub fn cached(&self, key: &CacheKey, now: Instant) -> Option<bool> {
        self.cache().get(key, now)
    }

    /// Remembers a decision the PDP made at `now`.
    pub fn remember(&self, key: CacheKey, allow: bool, now: Instant) {
        self.cache().insert(key, allow, now);
    }

    /// A place for one more client of connector `index` waiting for the PDP, or `None` when
    /// that connector or the hub already has as many as allowed.
    pub fn permit(&self, index: usize) -> Option<Permit> {
        let per = self.pending.per_connector.get(index)?;
        if !take(&self.pending.total, MAX_PENDING_TOTAL) {
            return None;
        }
        if !take(per, MAX_PENDING_PER_CONNECTOR) {
            self.pending.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit {
            pending: self.pending.clone(),
            connector: index,
        })
    }

    /// Asks the PDP (blocking, at most `timeout`): `Ok(allow)` or why there is no decision.
    pub fn ask(&self, req: &PdpRequest<'_>) -> Result<bool, PdpError> {
        let body = serde_json::to_vec(req).map_err(|e| PdpError::BadAnswer(e.to_string()))?;
        let mut resp = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .send(&body[..])
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(PdpError::Status(status));
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    PdpError::BadAnswer(format!("larger than {MAX_RESPONSE_BYTES} bytes"))
                }
                e => self.transport_error(e),
            })?;
        parse_answer(&bytes)
    }

    /// A ureq error as something fit for a log line: never the URL (it may carry credentials).
    fn transport_error(&self, e: ureq::Error) -> PdpError {
        PdpError::Transport(match e {
            ureq::Error::Timeout(_) => format!("no answer within {:?}", self.timeout),
            ureq::Error::BadUri(_) => "bad URL".to_owned(),
            e => e.to_string(),
        })
    }
}

/// A ureq agent for the PDP: process rustls provider, system + webpki roots, `timeout` for the
/// whole call, no redirects (a POST must not silently turn into a GET elsewhere), statuses
/// checked by the caller.
fn http_agent(timeout: Duration) -> ureq::Agent {
    let tls = crate::auth::https_tls_config(&[]);
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .new_agent()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(agent: &str, ip: &str) -> CacheKey {
        CacheKey {
            agent_id: agent.into(),
            connector: "ldap".into(),
            client_ip: ip.parse().expect("ip"),
        }
    }

    #[test]
    fn answers_parse_strictly() {
        assert_eq!(parse_answer(br#"{"allow": true}"#), Ok(true));
        assert_eq!(parse_answer(br#"{"allow": false, "why": "x"}"#), Ok(false));
        for bad in [
            &br#"{"allow": "yes"}"#[..],
            br#"{}"#,
            br#"[true]"#,
            b"allow",
            b"",
        ] {
            assert!(
                matches!(parse_answer(bad), Err(PdpError::BadAnswer(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn request_has_exactly_the_spec_fields() {
        let r = PdpRequest {
            agent_id: "a",
            connector: "ldap",
            client_addr: "10.0.0.1:5000",
            session: "s-1",
            listener: "0.0.0.0:389",
        };
        let v = serde_json::to_value(r).expect("json");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "agent_id",
                "client_addr",
                "connector",
                "listener",
                "session"
            ]
        );
    }

    #[test]
    fn cache_expires_and_is_keyed_per_agent_connector_ip() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut c = DecisionCache::new(ttl, 100);
        c.insert(key("a", "10.0.0.1"), true, t0);
        c.insert(key("b", "10.0.0.1"), false, t0);
        assert_eq!(c.get(&key("a", "10.0.0.1"), t0 + ttl / 2), Some(true));
        assert_eq!(c.get(&key("b", "10.0.0.1"), t0 + ttl / 2), Some(false));
        assert_eq!(c.get(&key("a", "10.0.0.2"), t0), None);
        let mut other = key("a", "10.0.0.1");
        other.connector = "ssh".into();
        assert_eq!(c.get(&other, t0), None);
        assert_eq!(c.get(&key("a", "10.0.0.1"), t0 + ttl), None);
        assert_eq!(c.len(), 1, "the expired entry was evicted on lookup");
    }

    #[test]
    fn cache_is_bounded_and_zero_ttl_caches_nothing() {
        let t0 = Instant::now();
        let mut c = DecisionCache::new(Duration::from_secs(10), 3);
        for (i, ip) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
            c.insert(key("a", ip), true, t0 + Duration::from_secs(i as u64));
        }
        // Full of live entries: the one expiring first (10.0.0.1) goes.
        c.insert(key("a", "10.0.0.4"), true, t0 + Duration::from_secs(3));
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.get(&key("a", "10.0.0.1"), t0 + Duration::from_secs(3)),
            None
        );
        assert_eq!(
            c.get(&key("a", "10.0.0.4"), t0 + Duration::from_secs(3)),
            Some(true)
        );
        // Later, every old entry has expired: they are all evicted by the next insert.
        let late = t0 + Duration::from_secs(12);
        c.insert(key("a", "10.0.0.5"), false, late);
        c.insert(key("a", "10.0.0.6"), false, late);
        assert_eq!(c.len(), 3, "10.0.0.4 is still live");
        c.insert(key("a", "10.0.0.7"), false, t0 + Duration::from_secs(14));
        assert_eq!(c.len(), 3);

        let mut off = DecisionCache::new(Duration::ZERO, 10);
        off.insert(key("a", "10.0.0.1"), true, t0);
        assert!(off.is_empty());
    }

    #[test]
    fn permits_are_bounded_per_connector_and_released() {
        let cfg = PdpConfig {
            url: "http://127.0.0.1:9/".into(),
            timeout: Duration::from_millis(100),
            cache_ttl: Duration::ZERO,
            on_error: OnError::Deny,
        };
        let pdp = Pdp::new(&cfg, 2);
        let held: Vec<Permit> = (0..MAX_PENDING_PER_CONNECTOR)
            .map(|_| pdp.permit(0).expect("permit"))
            .collect();
        assert!(pdp.permit(0).is_none(), "connector 0 is full");
        let other = pdp.permit(1).expect("connector 1 is not affected");
        assert!(pdp.permit(2).is_none(), "no such connector");
        drop(held);
        drop(other);
        assert_eq!(pdp.pending.total.load(Ordering::Acquire), 0);
        assert!(pdp.permit(0).is_some());
    }

    #[test]
    fn unreachable_pdp_is_a_transport_error() {
        // A port nothing listens on: connection refused, well within the timeout.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let cfg = PdpConfig {
            url: format!("http://{addr}/v1/authorize"),
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::ZERO,
            on_error: OnError::Deny,
        };
        let pdp = Pdp::new(&cfg, 1);
        let r = pdp.ask(&PdpRequest {
            agent_id: "a",
            connector: "c",
            client_addr: "127.0.0.1:1",
            session: "s",
            listener: "127.0.0.1:2",
        });
        assert!(matches!(r, Err(PdpError::Transport(_))), "{r:?}");
    }
}
