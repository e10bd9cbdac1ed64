//! A connector's targets on the agent: balance order, TCP health checks, and connecting a stream
//! with fall-through (wire-protocol.md §6, §10 "Routing, GOAWAY, RENEW, backends").

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nowconnect_core::{BackendHealth, Code, ConnectorHealth};

/// How a connector spreads streams over its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// First healthy target, in configured order.
    Failover,
    /// Rotate the starting target per stream.
    RoundRobin,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Health {
    /// `None` until the first check.
    ok: Option<bool>,
    rtt_ms: Option<u64>,
    error: Option<String>,
}

/// One connector's targets and their health.
#[derive(Debug)]
pub struct Backends {
    targets: Vec<String>,
    health: Mutex<Vec<Health>>,
    balance: Balance,
    rr: AtomicUsize,
    connect_timeout: Duration,
}

/// A failed stream connect: the RST code to answer with, and the last error for logs.
#[derive(Debug)]
pub struct ConnectFailure {
    /// CONNECT_REFUSED, CONNECT_TIMEOUT or NO_HEALTHY_BACKEND.
    pub code: Code,
    /// Human-readable last error (no secrets: addresses only).
    pub detail: String,
    /// Targets this attempt marked down (see [`Connected::marked_down`]).
    pub marked_down: Vec<(String, String)>,
}

/// A stream's target connection.
#[derive(Debug)]
pub struct Connected {
    /// The connected socket.
    pub stream: TcpStream,
    /// The target as configured.
    pub backend: String,
    /// Healthy targets that failed this connect and are now skipped until their next passing
    /// check (`(target, error)`), so later streams do not wait on them too.
    pub marked_down: Vec<(String, String)>,
}

fn code_of(e: &io::Error) -> Code {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Code::CONNECT_TIMEOUT,
        _ => Code::CONNECT_REFUSED,
    }
}

/// Resolves `target` (`host:port`) and connects to the first address that answers within
/// `timeout` overall per address.
pub fn connect_target(target: &str, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = target.to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl Backends {
    /// Targets as written in the config, in order.
    pub fn new(targets: Vec<String>, balance: Balance, connect_timeout: Duration) -> Self {
        let health = Mutex::new(vec![Health::default(); targets.len()]);
        Backends {
            targets,
            health,
            balance,
            rr: AtomicUsize::new(0),
            connect_timeout,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Vec<Health>> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured targets.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Order in which a new stream tries the targets: healthy ones in balance order; when none
    /// is marked healthy, every target once (checks can be stale).
    pub fn attempt_order(&self) -> (Vec<usize>, bool) {
        let n = self.targets.len();
        let start = match self.balance {
            Balance::Failover => 0,
            Balance::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n.max(1),
        };
        let order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        let h = self.health();
        let healthy: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| h[i].ok == Some(true))
            .collect();
        if healthy.is_empty() {
            (order, false)
        } else {
            (healthy, true)
        }
    }

    /// Connects a stream: tries targets in `attempt_order`, falling through on failure.
    ///
    /// A healthy target that fails is marked down at once (until its next passing check) while
    /// another target is still healthy: a dead backend whose connects time out then costs one
    /// `connect_timeout` to the streams already trying it, not to every stream until the next
    /// health check. The last healthy target is never marked down this way, so the connector's
    /// health (and what HEALTH tells the hub) changes only with the checks.
    pub fn connect(&self) -> Result<Connected, ConnectFailure> {
        let (order, any_healthy) = self.attempt_order();
        let mut last: Option<(Code, String)> = None;
        let mut marked_down = Vec::new();
        for i in order {
            let t = &self.targets[i];
            match connect_target(t, self.connect_timeout) {
                Ok(stream) => {
                    return Ok(Connected {
                        stream,
                        backend: t.clone(),
                        marked_down,
                    })
                }
                Err(e) => {
                    let code = code_of(&e);
                    if any_healthy && self.mark_down(i, &e.to_string()) {
                        marked_down.push((t.clone(), e.to_string()));
                    }
                    last = Some((code, format!("{t}: {e}")));
                }
            }
        }
        let (code, detail) = last.unwrap_or((Code::NO_HEALTHY_BACKEND, "no target".into()));
        Err(ConnectFailure {
            code: if any_healthy {
                code
            } else {
                Code::NO_HEALTHY_BACKEND
            },
            detail,
            marked_down,
        })
    }

    /// Marks target `i` down after a failed stream connect, unless it is already down or no
    /// other target is healthy. Returns whether it did.
    fn mark_down(&self, i: usize, error: &str) -> bool {
        let mut h = self.health();
        let others_healthy = h
            .iter()
            .enumerate()
            .any(|(j, b)| j != i && b.ok == Some(true));
        match h.get_mut(i) {
            Some(b) if b.ok == Some(true) && others_healthy => {
                *b = Health {
                    ok: Some(false),
                    rtt_ms: None,
                    error: Some(format!("stream connect failed: {error}")),
                };
                true
            }
            _ => false,
        }
    }

    /// Runs one TCP health check of every target (`timeout` each); returns whether any
    /// target's up/down state changed.
    pub fn check_all(&self, timeout: Duration) -> bool {
        let results: Vec<Health> = self
            .targets
            .iter()
            .map(|t| {
                let start = Instant::now();
                match connect_target(t, timeout) {
                    Ok(_) => Health {
                        ok: Some(true),
                        rtt_ms: Some(start.elapsed().as_millis() as u64),
                        error: None,
                    },
                    Err(e) => Health {
                        ok: Some(false),
                        rtt_ms: None,
                        error: Some(e.to_string()),
                    },
                }
            })
            .collect();
        let mut h = self.health();
        let changed = h.iter().zip(&results).any(|(a, b)| a.ok != b.ok);
        *h = results;
        changed
    }

    /// The connector's health for HEALTH frames and `/readyz` (§6).
    pub fn report(&self) -> ConnectorHealth {
        let h = self.health();
        let backends: Vec<BackendHealth> = self
            .targets
            .iter()
            .zip(h.iter())
            .map(|(t, h)| BackendHealth {
                addr: t.clone(),
                ok: h.ok == Some(true),
                rtt_ms: h.rtt_ms,
                error: h.error.clone(),
            })
            .collect();
        ConnectorHealth {
            healthy: backends.iter().any(|b| b.ok),
            backends,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn closed_port() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        drop(l);
        a.to_string()
    }

    #[test]
    fn failover_falls_through_to_the_next_target() {
        let live = TcpListener::bind("127.0.0.1:0").expect("bind");
        let live_addr = live.local_addr().expect("addr").to_string();
        let b = Backends::new(
            vec![closed_port(), live_addr.clone()],
            Balance::Failover,
            Duration::from_secs(1),
        );
        // Unchecked: nothing marked healthy, every target is tried once.
        let c = b.connect().expect("falls through");
        assert_eq!(c.backend, live_addr);
        assert!(c.marked_down.is_empty(), "nothing was healthy to mark down");
        assert!(b.check_all(Duration::from_secs(1)));
        let r = b.report();
        assert!(r.healthy);
        assert!(!r.backends[0].ok && r.backends[1].ok);
        assert_eq!(b.attempt_order(), (vec![1], true));
    }

    #[test]
    fn all_down_is_no_healthy_backend() {
        let b = Backends::new(
            vec![closed_port(), closed_port()],
            Balance::Failover,
            Duration::from_secs(1),
        );
        b.check_all(Duration::from_secs(1));
        assert!(!b.report().healthy);
        let e = b.connect().expect_err("nothing listens");
        assert_eq!(e.code, Code::NO_HEALTHY_BACKEND);
    }

    #[test]
    fn healthy_but_refused_reports_the_connect_error() {
        let live = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = live.local_addr().expect("addr").to_string();
        let b = Backends::new(vec![addr], Balance::Failover, Duration::from_secs(1));
        b.check_all(Duration::from_secs(1));
        drop(live);
        let e = b.connect().expect_err("listener gone");
        assert_eq!(e.code, Code::CONNECT_REFUSED);
    }

    #[test]
    fn a_healthy_target_that_fails_is_skipped_until_its_next_check() {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind");
        let first_addr = first.local_addr().expect("addr").to_string();
        let second = TcpListener::bind("127.0.0.1:0").expect("bind");
        let second_addr = second.local_addr().expect("addr").to_string();
        let b = Backends::new(
            vec![first_addr.clone(), second_addr.clone()],
            Balance::Failover,
            Duration::from_secs(1),
        );
        b.check_all(Duration::from_secs(1));
        assert_eq!(b.attempt_order(), (vec![0, 1], true));
        drop(first);
        let c = b.connect().expect("falls through to the second");
        assert_eq!(c.backend, second_addr);
        assert_eq!(c.marked_down.len(), 1);
        assert_eq!(c.marked_down[0].0, first_addr);
        // Later streams go straight to the second; the connector stays healthy.
        assert_eq!(b.attempt_order(), (vec![1], true));
        let r = b.report();
        assert!(r.healthy && !r.backends[0].ok && r.backends[1].ok);
        assert!(r.backends[0]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("stream connect failed")));
        // The next check decides again: still down.
        assert!(!b.check_all(Duration::from_secs(1)));
        assert_eq!(b.attempt_order(), (vec![1], true));

        // The last healthy target is never marked down by a stream.
        drop(second);
        let e = b.connect().expect_err("nothing listens");
        assert_eq!(e.code, Code::CONNECT_REFUSED);
        assert!(e.marked_down.is_empty());
        assert!(
            b.report().healthy,
            "only a check may make the connector unhealthy"
        );
    }

    #[test]
    fn round_robin_rotates_the_start() {
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let t = vec![
            l1.local_addr().expect("a").to_string(),
            l2.local_addr().expect("a").to_string(),
        ];
        let b = Backends::new(t, Balance::RoundRobin, Duration::from_secs(1));
        b.check_all(Duration::from_secs(1));
        assert_eq!(b.attempt_order().0, vec![0, 1]);
        assert_eq!(b.attempt_order().0, vec![1, 0]);
    }
}
