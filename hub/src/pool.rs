//! Connector pools (wire-protocol.md §6): every session serving a connector is a member; a new
//! stream goes to a healthy, non-draining member with the fewest active streams, ties broken
//! round-robin.

use std::collections::BTreeMap;
use std::sync::Mutex;

use nowconnect_core::HealthReport;

/// What the pool needs to know of a session.
pub trait Member: Clone {
    /// Active streams right now.
    fn active_streams(&self) -> usize;
}

#[derive(Debug)]
struct Entry<M> {
    member: M,
    agent_id: String,
    /// Accepted connector → healthy per the last HEALTH (true from HELLO_ACK on, §10).
    connectors: BTreeMap<String, bool>,
    draining: bool,
}

#[derive(Debug)]
struct State<M> {
    entries: BTreeMap<u64, Entry<M>>,
    rr: usize,
}

/// One view of a member, for status pages and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Session id (hub-local).
    pub id: u64,
    /// The agent behind it.
    pub agent_id: String,
    /// Connector → healthy.
    pub connectors: BTreeMap<String, bool>,
    /// Whether it takes no new streams.
    pub draining: bool,
    /// Active streams.
    pub active_streams: usize,
}

/// All pools of one hub.
#[derive(Debug)]
pub struct Pools<M> {
    state: Mutex<State<M>>,
}

impl<M: Member> Default for Pools<M> {
    fn default() -> Self {
        Pools {
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                rr: 0,
            }),
        }
    }
}

impl<M: Member> Pools<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<M>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session once HELLO_ACK went out; it serves `accepted`.
    pub fn add(&self, id: u64, member: M, agent_id: &str, accepted: &[String]) {
        let entry = Entry {
            member,
            agent_id: agent_id.to_owned(),
            connectors: accepted.iter().map(|c| (c.clone(), true)).collect(),
            draining: false,
        };
        self.lock().entries.insert(id, entry);
    }

    /// Removes a session (lost or closed).
    pub fn remove(&self, id: u64) {
        self.lock().entries.remove(&id);
    }

    /// Applies a HEALTH report; connectors it omits keep their last state (§10).
    pub fn set_health(&self, id: u64, report: &HealthReport) {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            for (name, h) in &report.connectors {
                if let Some(v) = e.connectors.get_mut(name) {
                    *v = h.healthy;
                }
            }
        }
    }

    /// Narrows the connectors a session serves (RENEW with fewer scopes).
    pub fn retain_connectors(&self, id: u64, allowed: &[String]) {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            e.connectors.retain(|c, _| allowed.contains(c));
        }
    }

    /// Marks a session as taking no new streams (GOAWAY either way).
    pub fn set_draining(&self, id: u64) {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            e.draining = true;
        }
    }

    /// Picks the session for a new stream on `connector`.
    pub fn pick(&self, connector: &str) -> Option<(u64, M)> {
        let mut st = self.lock();
        let mut best: Vec<(u64, usize)> = Vec::new();
        let mut min = usize::MAX;
        for (id, e) in &st.entries {
            if e.draining || e.connectors.get(connector) != Some(&true) {
                continue;
            }
            let n = e.member.active_streams();
            if n < min {
                min = n;
                best.clear();
            }
            if n == min {
                best.push((*id, n));
            }
        }
        if best.is_empty() {
            return None;
        }
        let i = st.rr % best.len();
        st.rr = st.rr.wrapping_add(1);
        let id = best[i].0;
        st.entries.get(&id).map(|e| (id, e.member.clone()))
    }

    /// Whether a healthy session serves `connector`.
    pub fn available(&self, connector: &str) -> bool {
        self.lock()
            .entries
            .values()
            .any(|e| !e.draining && e.connectors.get(connector) == Some(&true))
    }

    /// Every member, for status and metrics.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.lock()
            .entries
            .iter()
            .map(|(id, e)| MemberInfo {
                id: *id,
                agent_id: e.agent_id.clone(),
                connectors: e.connectors.clone(),
                draining: e.draining,
                active_streams: e.member.active_streams(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nowconnect_core::ConnectorHealth;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Clone)]
    struct Fake(Arc<AtomicUsize>);
    impl Member for Fake {
        fn active_streams(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn fake(n: usize) -> Fake {
        Fake(Arc::new(AtomicUsize::new(n)))
    }

    #[test]
    fn fewest_streams_wins_ties_rotate() {
        let p = Pools::default();
        let c = vec!["ldap".to_owned()];
        p.add(1, fake(5), "a", &c);
        p.add(2, fake(1), "b", &c);
        p.add(3, fake(1), "c", &c);
        let picks: Vec<u64> = (0..4).filter_map(|_| p.pick("ldap").map(|x| x.0)).collect();
        assert_eq!(picks, vec![2, 3, 2, 3]);
        assert!(p.pick("ssh").is_none());
    }

    #[test]
    fn unhealthy_and_draining_get_no_streams() {
        let p = Pools::default();
        let c = vec!["ldap".to_owned(), "ssh".to_owned()];
        p.add(1, fake(0), "a", &c);
        p.add(2, fake(9), "b", &c);
        let mut r = HealthReport::default();
        r.connectors.insert(
            "ldap".into(),
            ConnectorHealth {
                healthy: false,
                backends: vec![],
            },
        );
        p.set_health(1, &r);
        assert_eq!(p.pick("ldap").map(|x| x.0), Some(2));
        // ssh was not in the report: keeps its last (healthy) state.
        assert_eq!(p.pick("ssh").map(|x| x.0), Some(1));
        p.set_draining(2);
        assert!(p.pick("ldap").is_none());
        assert!(!p.available("ldap"));
        p.remove(1);
        assert!(!p.available("ssh"));
    }
}
