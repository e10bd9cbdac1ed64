//! What the admin listener asks the hub (operations.md "Health endpoints"): `/readyz` and the
//! HTML status page at `/`, where operators look first: the hub's state, every connector with
//! its pool (agent, session, health, streams) and every tunnel with its agent, uptime, token
//! expiry and streams. Plain HTML with inline CSS: no scripts, no external assets.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nowconnect_runtime::admin::{esc, AdminState};

use crate::metrics;
use crate::server::HubState;
use crate::tunnel::TunnelEntry;

/// The hub's [`AdminState`].
pub(crate) struct Status {
    state: Arc<HubState>,
}

impl Status {
    pub fn new(state: Arc<HubState>) -> Status {
        Status { state }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `1h02m`, `3m05s`, `12s`, `2d03h`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Token expiry relative to `now`: `in 59m58s`, or `expired 3s ago`.
fn expiry(exp: u64, now: u64) -> String {
    if exp >= now {
        format!("in {}", human(Duration::from_secs(exp - now)))
    } else {
        format!("expired {} ago", human(Duration::from_secs(now - exp)))
    }
}

/// What the page shows of one tunnel.
struct Row {
    id: u64,
    agent_id: String,
    session: String,
    remote: std::net::SocketAddr,
    state: &'static str,
    established: bool,
    since: u64,
    exp: u64,
    token_expired: bool,
    streams: usize,
    accepted: String,
    software: String,
}

impl Row {
    fn new(id: u64, e: &TunnelEntry) -> Row {
        let state = match &e.handle {
            None => "<span class=\"muted\">starting</span>",
            Some(t) if t.is_closed() => "<span class=\"muted\">closing</span>",
            Some(t) if t.is_draining() => "<span class=\"warn\">draining</span>",
            Some(_) if e.established => "<span class=\"ok\">established</span>",
            Some(_) => "<span class=\"muted\">awaiting HELLO</span>",
        };
        Row {
            id,
            agent_id: e.agent_id.clone(),
            session: e.session.clone(),
            remote: e.remote,
            state,
            established: e.established,
            since: unix(e.since),
            exp: e.exp,
            token_expired: e.token_expired,
            streams: e.handle.as_ref().map_or(0, |t| t.active_streams()),
            accepted: e.accepted.join(", "),
            software: e.software.clone(),
        }
    }
}

/// Page head and shared style.
const HEAD: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>NowConnect hub</title><style>\
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;margin-bottom:.5em}\
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}td.n{text-align:right}\
.ok{color:#070;font-weight:600}.bad{color:#b00;font-weight:600}.warn{color:#a60;font-weight:600}\
.muted{color:#777}code{font-size:.95em}</style></head><body>";

impl AdminState for Status {
    fn readiness(&self) -> (bool, serde_json::Value) {
        self.state.readiness()
    }

    fn status_page(&self) -> String {
        let st = &self.state;
        let (ready, _) = st.readiness();
        let now = unix(SystemTime::now());
        // A snapshot, so no other lock is taken while the tunnel list is held.
        let tunnels: Vec<Row> = st
            .tunnels()
            .iter()
            .map(|(id, e)| Row::new(*id, e))
            .collect();
        let mut h = String::with_capacity(8192);
        h.push_str(HEAD);
        let state = if st.is_draining() {
            "<span class=\"warn\">draining</span>"
        } else if ready {
            "<span class=\"ok\">ready</span>"
        } else {
            "<span class=\"bad\">not ready</span>"
        };
        let established = tunnels.iter().filter(|t| t.established).count();
        let _ = write!(
            h,
            "<h1>NowConnect hub <span class=\"muted\">{}</span></h1>\
             <p>{state} &middot; {established} tunnel(s) established, {} connected &middot; \
             JWKS {} &middot; agents' endpoint <code>{}{}</code> &middot; \
             <a href=\"/metrics\">metrics</a> &middot; <a href=\"/readyz\">readyz</a> &middot; \
             <a href=\"/healthz\">healthz</a></p>",
            env!("CARGO_PKG_VERSION"),
            tunnels.len(),
            if st.auth.jwks().is_loaded() {
                "<span class=\"ok\">loaded</span>"
            } else {
                "<span class=\"bad\">not loaded</span>"
            },
            st.cfg.listen,
            esc(&st.cfg.path),
        );

        h.push_str(
            "<h2>Connectors</h2><table><tr><th>connector</th><th>listen</th><th>health</th>\
             <th>streams</th><th>opened</th><th>pool: agent / session &mdash; health, streams</th></tr>",
        );
        let members = st.pools.members();
        for c in &st.cfg.connectors {
            let available = st.pools.available(&c.name);
            let pool: Vec<String> = members
                .iter()
                .filter_map(|m| {
                    let healthy = m.connectors.get(&c.name)?;
                    let health = match (m.draining, healthy) {
                        (true, _) => "<span class=\"warn\">draining</span>",
                        (false, true) => "<span class=\"ok\">healthy</span>",
                        (false, false) => "<span class=\"bad\">unhealthy</span>",
                    };
                    let session = tunnels
                        .iter()
                        .find(|t| t.id == m.id)
                        .map_or("?", |t| t.session.as_str());
                    Some(format!(
                        "<code>{}</code> / <code>{}</code> &mdash; {health}, {} stream(s)",
                        esc(&m.agent_id),
                        esc(session),
                        m.active_streams
                    ))
                })
                .collect();
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                esc(&c.name),
                c.listen,
                if available {
                    "<span class=\"ok\">available</span>"
                } else {
                    "<span class=\"bad\">no healthy agent</span>"
                },
                st.metrics.value(metrics::STREAMS_ACTIVE, &[&c.name]),
                st.metrics.value(metrics::STREAMS_OPENED, &[&c.name]),
                if pool.is_empty() {
                    "<span class=\"muted\">empty</span>".to_owned()
                } else {
                    pool.join("<br>")
                }
            );
        }
        h.push_str("</table>");

        h.push_str(
            "<h2>Tunnels</h2><table><tr><th>agent_id</th><th>session</th><th>remote</th>\
             <th>state</th><th>uptime</th><th>token expires</th><th>streams</th>\
             <th>connectors</th><th>software</th></tr>",
        );
        if tunnels.is_empty() {
            h.push_str("<tr><td colspan=\"9\" class=\"muted\">no tunnel</td></tr>");
        }
        for e in &tunnels {
            let token = if e.token_expired || e.exp < now {
                format!("<span class=\"bad\">{}</span>", expiry(e.exp, now))
            } else {
                expiry(e.exp, now)
            };
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{token}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.agent_id),
                esc(&e.session),
                e.remote,
                e.state,
                human(Duration::from_secs(now.saturating_sub(e.since))),
                e.streams,
                esc(&e.accepted),
                esc(&e.software),
            );
        }
        h.push_str("</table></body></html>\n");
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_expiry() {
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
        assert_eq!(human(Duration::from_secs(90000)), "1d01h");
        assert_eq!(expiry(1060, 1000), "in 1m00s");
        assert_eq!(expiry(1000, 1003), "expired 3s ago");
    }
}
