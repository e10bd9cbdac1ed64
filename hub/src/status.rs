//! What the admin listener asks the hub (operations.md "Health endpoints"): `/readyz` and a
//! small HTML status page at `/` (tunnels with their agent, connectors with their pool).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nowconnect_runtime::admin::{esc, AdminState};

use crate::server::HubState;

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

impl AdminState for Status {
    fn readiness(&self) -> (bool, serde_json::Value) {
        self.state.readiness()
    }

    fn status_page(&self) -> String {
        let st = &self.state;
        let (ready, _) = st.readiness();
        let now = unix(SystemTime::now());
        let mut h = String::with_capacity(4096);
        h.push_str(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>nowconnect-hub</title>\
             <style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
             td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}\
             .up{color:#070}.down{color:#a00}</style></head><body>",
        );
        let _ = write!(
            h,
            "<h1>nowconnect-hub {}</h1><p>{} &middot; draining: {} &middot; JWKS loaded: {} \
             &middot; <a href=\"/metrics\">metrics</a> &middot; <a href=\"/readyz\">readyz</a></p>",
            env!("CARGO_PKG_VERSION"),
            if ready {
                "<b class=\"up\">ready</b>"
            } else {
                "<b class=\"down\">not ready</b>"
            },
            st.is_draining(),
            st.auth.jwks().is_loaded(),
        );

        h.push_str("<h2>Connectors</h2><table><tr><th>connector</th><th>listen</th><th>available</th><th>pool (agent / session: health, streams)</th></tr>");
        let members = st.pools.members();
        let sessions: std::collections::BTreeMap<u64, String> = st
            .tunnels()
            .iter()
            .map(|(id, e)| (*id, e.session.clone()))
            .collect();
        for c in &st.cfg.connectors {
            let available = st.pools.available(&c.name);
            let pool: Vec<String> = members
                .iter()
                .filter_map(|m| {
                    let healthy = m.connectors.get(&c.name)?;
                    let state = match (m.draining, healthy) {
                        (true, _) => "draining",
                        (false, true) => "healthy",
                        (false, false) => "unhealthy",
                    };
                    Some(format!(
                        "{} / {}: {state}, {} streams",
                        esc(&m.agent_id),
                        esc(sessions.get(&m.id).map_or("?", String::as_str)),
                        m.active_streams
                    ))
                })
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                esc(&c.name),
                c.listen,
                if available { "up" } else { "down" },
                available,
                if pool.is_empty() {
                    "&mdash;".to_owned()
                } else {
                    pool.join("<br>")
                }
            );
        }
        h.push_str("</table>");

        h.push_str("<h2>Tunnels</h2><table><tr><th>session</th><th>agent_id</th><th>remote</th><th>up (s)</th><th>state</th><th>connectors</th><th>streams</th><th>token expires in (s)</th><th>software</th></tr>");
        for e in st.tunnels().values() {
            let state = match &e.handle {
                None => "starting",
                Some(t) if t.is_closed() => "closing",
                Some(t) if t.is_draining() => "draining",
                Some(_) if e.established => "established",
                Some(_) => "awaiting HELLO",
            };
            let streams = e.handle.as_ref().map_or(0, |t| t.active_streams());
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}{}</td><td>{}</td><td>{streams}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.session),
                esc(&e.agent_id),
                e.remote,
                now.saturating_sub(unix(e.since)),
                if e.token_expired { " (token expired)" } else { "" },
                esc(&e.accepted.join(", ")),
                i128::from(e.exp) - i128::from(now),
                esc(&e.software),
            );
        }
        h.push_str("</table></body></html>\n");
        h
    }
}
