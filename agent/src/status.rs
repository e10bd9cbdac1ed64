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

/// Page head and shared style (the hub's page looks the same).
const STYLE: &str = "<style>\
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;margin-bottom:.5em}\
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}td.n{text-align:right}\
table.inner td,table.inner th{border:none;border-bottom:1px solid #e4e4e4;padding:.1em .5em .1em 0}\
table.inner{margin:0}\
.ok{color:#070;font-weight:600}.bad{color:#b00;font-weight:600}.warn{color:#a60;font-weight:600}\
.muted{color:#777}code{font-size:.95em}</style>";

fn render(shared: &Shared) -> String {
    let (ready, _) = shared.readiness();
    let mut h = String::with_capacity(8192);
    let agent_id = esc(&shared.cfg.agent_id);
    let state = if shared.is_draining() {
        "<span class=\"warn\">draining</span>"
    } else if ready {
        "<span class=\"ok\">ready</span>"
    } else {
        "<span class=\"bad\">not ready</span>"
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>NowConnect agent {agent_id}</title>{STYLE}</head><body>\
         <h1>NowConnect agent <code>{agent_id}</code></h1><p>{state} &middot; {} &middot; \
         {} tunnel(s) up &middot; <a href=\"/metrics\">metrics</a> &middot; \
         <a href=\"/readyz\">readyz</a> &middot; <a href=\"/healthz\">healthz</a></p>",
        esc(&crate::supervisor::software()),
        shared.registry.up_count(),
    );

    h.push_str(
        "<h2>Tunnels</h2><table><tr><th>tunnel</th><th>hub</th><th>session</th><th>state</th>\
         <th>streams</th><th>accepted</th><th>rejected</th><th>token expires</th></tr>",
    );
    let tunnels = shared.registry.snapshot();
    if tunnels.is_empty() {
        h.push_str("<tr><td colspan=\"8\" class=\"muted\">no tunnel</td></tr>");
    }
    let now_unix = crate::run::unix_now();
    for (id, t) in &tunnels {
        let state = match (&t.handle, t.up_since) {
            (Some(h), _) if h.is_closed() => "<span class=\"muted\">closing</span>".to_owned(),
            (Some(h), Some(up)) if h.is_draining() => format!(
                "<span class=\"warn\">draining</span>, up {}",
                human(up.elapsed())
            ),
            (_, Some(up)) => format!("<span class=\"ok\">up</span> {}", human(up.elapsed())),
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
            Some(_) => "<span class=\"bad\">expired</span>".to_owned(),
            None => "no exp".to_owned(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{state}</td>\
             <td class=\"n\">{streams}</td><td>{}</td><td>{}</td><td>{expires}</td></tr>",
            esc(id),
            esc(&t.hub),
            esc(t.session.as_deref().unwrap_or("")),
            esc(&t.accepted.join(", ")),
            esc(&rejected.join(", ")),
        );
    }
    h.push_str("</table>");

    h.push_str(
        "<h2>Connection slots</h2><table><tr><th>slot</th><th>hub</th><th>state</th>\
         <th>last error</th></tr>",
    );
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
    h.push_str("</table>");

    h.push_str(
        "<h2>Connectors</h2><table><tr><th>connector</th><th>health</th><th>streams</th>\
         <th>backends: health, check, last error</th><th>last stream error</th></tr>",
    );
    for c in &shared.connectors {
        let health = if !c.is_checked() {
            "<span class=\"muted\">not checked yet</span>"
        } else if c.is_healthy() {
            "<span class=\"ok\">healthy</span>"
        } else {
            "<span class=\"bad\">unhealthy</span>"
        };
        let mut backends = String::from("<table class=\"inner\">");
        for b in c.backends.report().backends {
            let (state, check) = match (b.ok, b.rtt_ms) {
                (true, Some(rtt)) => ("<span class=\"ok\">up</span>", format!("{rtt} ms")),
                (true, None) => ("<span class=\"ok\">up</span>", String::new()),
                (false, _) if c.is_checked() => ("<span class=\"bad\">down</span>", String::new()),
                (false, _) => ("<span class=\"muted\">unknown</span>", String::new()),
            };
            let _ = write!(
                backends,
                "<tr><td><code>{}</code></td><td>{state}</td><td>{check}</td><td>{}</td></tr>",
                esc(&b.addr),
                esc(b.error.as_deref().unwrap_or(""))
            );
        }
        backends.push_str("</table>");
        let error = c
            .last_error()
            .map(|(at, e)| format!("{} ({})", esc(&e), ago(at)))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{health}</td><td class=\"n\">{}</td>\
             <td>{backends}</td><td>{error}</td></tr>",
            esc(c.name()),
            shared
                .metrics
                .value(crate::metrics::STREAMS_ACTIVE, &[c.name()])
        );
    }
    h.push_str("</table></body></html>\n");
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
