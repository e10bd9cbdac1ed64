//! The admin endpoints' view of the agent: `/readyz` and the HTML status page at `/`
//! (tunnels, supervisor slots, connectors with backend health and last error).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_runtime::admin::AdminState;

use crate::run::Shared;

/// [`AdminState`] of an agent.
#[derive(Debug)]
pub struct Status {
    shared: Arc<Shared>,
}

impl Status {
    /// The status of `shared`.
    pub fn new(shared: Arc<Shared>) -> Status {
        Status { shared }
    }
}

impl AdminState for Status {
    fn readiness(&self) -> (bool, serde_json::Value) {
        self.shared.readiness()
    }

    fn status_page(&self) -> String {
        render(&self.shared)
    }
}

pub use nowconnect_runtime::admin::esc;

/// `1h02m`, `3m05s`, `12s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn ago(at: Instant) -> String {
    format!("{} ago", human(at.elapsed()))
}

fn render(shared: &Shared) -> String {
    let (ready, _) = shared.readiness();
    let mut h = String::with_capacity(8192);
    let agent_id = esc(&shared.cfg.agent_id);
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>NowConnect agent {agent_id}</title>\
         <style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}\
         .ok{{color:#070}}.bad{{color:#b00}}</style></head><body>\
         <h1>NowConnect agent <code>{agent_id}</code></h1><p>{} · {}</p>",
        esc(&crate::supervisor::software()),
        if shared.is_draining() {
            "<b class=\"bad\">draining</b>"
        } else if ready {
            "<b class=\"ok\">ready</b>"
        } else {
            "<b class=\"bad\">not ready</b>"
        }
    );

    h.push_str("<h2>Tunnels</h2><table><tr><th>slot</th><th>hub</th><th>state</th><th>last error</th></tr>");
    let tunnels = shared.registry.snapshot();
    for (slot, st) in shared.registry.slots() {
        let state = match (st.state, st.retry_at) {
            ("backoff", Some(at)) => format!(
                "retrying in {}",
                human(at.saturating_duration_since(Instant::now()))
            ),
            (s, _) => s.to_owned(),
        };
        let error = st
            .last_error
            .as_ref()
            .map(|(at, e)| format!("{} ({})", esc(e), ago(*at)))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{error}</td></tr>",
            esc(&slot),
            esc(&st.hub),
            esc(&state)
        );
    }
    h.push_str("</table><table><tr><th>tunnel</th><th>hub</th><th>session</th><th>state</th><th>streams</th><th>accepted</th><th>rejected</th><th>token expires</th></tr>");
    let now_unix = crate::run::unix_now();
    for (id, t) in &tunnels {
        let state = match (&t.handle, t.up_since) {
            (Some(h), _) if h.is_closed() => "closing".to_owned(),
            (Some(h), Some(up)) if h.is_draining() => {
                format!("draining, up {}", human(up.elapsed()))
            }
            (_, Some(up)) => format!("up {}", human(up.elapsed())),
            (_, None) => format!("handshake ({})", ago(t.dialed)),
        };
        let streams = t.handle.as_ref().map_or(0, |h| h.active_streams());
        let rejected: Vec<String> = t
            .rejected
            .iter()
            .map(|r| format!("{} ({})", r.connector, r.reason))
            .collect();
        let expires = match t.token.exp {
            Some(exp) if exp >= now_unix => {
                format!("in {}", human(Duration::from_secs(exp - now_unix)))
            }
            Some(_) => "expired".to_owned(),
            None => "no exp".to_owned(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{streams}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(id),
            esc(&t.hub),
            esc(t.session.as_deref().unwrap_or("")),
            esc(&state),
            esc(&t.accepted.join(", ")),
            esc(&rejected.join(", ")),
            esc(&expires)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Connectors</h2><table><tr><th>connector</th><th>health</th><th>backends</th><th>last stream error</th></tr>");
    for c in &shared.connectors {
        let health = if !c.is_checked() {
            "<span>not checked yet</span>"
        } else if c.is_healthy() {
            "<span class=\"ok\">healthy</span>"
        } else {
            "<span class=\"bad\">unhealthy</span>"
        };
        let mut backends = String::new();
        for b in c.backends.report().backends {
            let detail = match (b.ok, b.rtt_ms, &b.error) {
                (true, Some(rtt), _) => format!("<span class=\"ok\">up</span> {rtt} ms"),
                (true, None, _) => "<span class=\"ok\">up</span>".to_owned(),
                (false, _, Some(e)) => format!("<span class=\"bad\">down</span>: {}", esc(e)),
                (false, _, None) => "unknown".to_owned(),
            };
            let _ = write!(backends, "<code>{}</code> {detail}<br>", esc(&b.addr));
        }
        let error = c
            .last_error()
            .map(|(at, e)| format!("{} ({})", esc(&e), ago(at)))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{health}</td><td>{backends}</td><td>{error}</td></tr>",
            esc(c.name())
        );
    }
    h.push_str("</table><p><a href=\"/metrics\">metrics</a> · <a href=\"/readyz\">readyz</a></p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
    }
}
