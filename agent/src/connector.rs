//! A connector at run time: its targets ([`Backends`]), the health-check thread that keeps
//! their state and tells the hub when it changes (wire-protocol.md §6, §10), and connecting a
//! stream's target on the stream's own thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nowconnect_core::{ConnectorHealth, HealthReport};
use nowconnect_runtime::OpenRequest;

use crate::backend::Backends;
use crate::config::ConnectorConfig;
use crate::metrics;
use crate::run::Shared;

/// One configured connector.
#[derive(Debug)]
pub struct Connector {
    /// Its configuration.
    pub cfg: ConnectorConfig,
    /// Its targets and their health.
    pub backends: Backends,
    /// At least one health check has completed.
    checked: AtomicBool,
    /// The last stream connect failure, for the status page.
    last_error: Mutex<Option<(Instant, String)>>,
}

impl Connector {
    /// A connector with nothing checked yet.
    pub fn new(cfg: ConnectorConfig) -> Connector {
        let backends = Backends::new(cfg.targets.clone(), cfg.balance, cfg.connect_timeout);
        Connector {
            cfg,
            backends,
            checked: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Whether a health check has completed (before that its state is unknown).
    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    /// Checked, and at least one backend passed.
    pub fn is_healthy(&self) -> bool {
        self.is_checked() && self.backends.report().healthy
    }

    /// The last stream connect failure.
    pub fn last_error(&self) -> Option<(Instant, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_error(&self, detail: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), detail.to_owned()));
    }

    /// One round of checks: updates the backend gauges, logs what changed, returns whether
    /// any backend's up/down state changed (or this was the first round).
    pub fn check(&self, shared: &Shared) -> bool {
        let before = self.backends.report();
        let changed = self.backends.check_all(self.cfg.health_check.timeout);
        let first = !self.checked.swap(true, Ordering::AcqRel);
        let after = self.backends.report();
        for (i, b) in after.backends.iter().enumerate() {
            let labels = [self.name(), b.addr.as_str()];
            shared
                .metrics
                .set(metrics::BACKEND_UP, &labels, if b.ok { 1.0 } else { 0.0 });
            let was = before.backends.get(i).map(|p| p.ok);
            if first || was != Some(b.ok) {
                let error = b.error.as_deref().unwrap_or("");
                if b.ok {
                    log::info!(connector = self.name(), backend = b.addr.as_str(), rtt_ms = b.rtt_ms.unwrap_or(0); "backend up");
                } else {
                    log::warn!(connector = self.name(), backend = b.addr.as_str(), reason = error; "backend down");
                }
            }
        }
        if first || before.healthy != after.healthy {
            if after.healthy {
                log::info!(connector = self.name(); "connector healthy");
            } else {
                log::warn!(connector = self.name(); "connector unhealthy: no backend passed its health check");
            }
        }
        changed || first
    }
}

/// HEALTH for `accepted` connectors; connectors never checked are left out (§10: a connector
/// missing from a HEALTH keeps its last state, and a fresh session is routable).
pub fn health_report(connectors: &[Arc<Connector>], accepted: &[String]) -> HealthReport {
    let connectors: BTreeMap<String, ConnectorHealth> = connectors
        .iter()
        .filter(|c| c.is_checked() && accepted.iter().any(|a| a == c.name()))
        .map(|c| (c.name().to_owned(), c.backends.report()))
        .collect();
    HealthReport { connectors }
}

/// The health-check thread of one connector: checks at once, then every `interval`; on any
/// change sends HEALTH on every established tunnel. Ends when the agent drains.
pub fn run_health_checks(shared: Arc<Shared>, connector: Arc<Connector>) {
    let drain = shared.drain_signal();
    loop {
        if connector.check(&shared) {
            shared.broadcast_health();
        }
        match drain.recv_timeout(connector.cfg.health_check.interval) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // Drain started (the sender is dropped) or a message: stop checking.
            _ => return,
        }
    }
}

/// Runs on the stream's own thread: connect a target (fall-through, connect_timeout), then
/// [`OpenRequest::accept`] — which runs the stream on this thread — or refuse with the §8
/// code.
pub fn connect_stream(shared: Arc<Shared>, connector: Arc<Connector>, req: OpenRequest) {
    let start = Instant::now();
    let cid = req.cid;
    let name = connector.name();
    let result = connector.backends.connect();
    let marked_down = match &result {
        Ok(c) => &c.marked_down,
        Err(f) => &f.marked_down,
    };
    for (backend, error) in marked_down {
        shared
            .metrics
            .set(metrics::BACKEND_UP, &[name, backend.as_str()], 0.0);
        log::warn!(
            connector = name,
            backend = backend.as_str(),
            reason = error.as_str();
            "backend down: a stream could not connect; skipped until it passes a health check"
        );
    }
    match result {
        Ok(c) => {
            shared.metrics.observe(
                metrics::BACKEND_CONNECT_DURATION,
                &[name],
                start.elapsed().as_secs_f64(),
            );
            log::debug!(connector = name, cid = cid, client = req.peer.as_str(), backend = c.backend.as_str(); "stream open");
            req.accept(c.stream, &c.backend);
        }
        Err(failure) => {
            connector.note_error(&failure.detail);
            log::warn!(
                connector = name,
                cid = cid,
                client = req.peer.as_str(),
                code = failure.code.name(),
                reason = failure.detail.as_str(),
                duration_ms = start.elapsed().as_millis() as u64;
                "stream open failed"
            );
            req.refuse(failure.code, &failure.detail);
        }
    }
}
