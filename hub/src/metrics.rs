//! The hub's Prometheus metrics (operations.md "Prometheus metrics", Hub). Names and label
//! values are part of the interface: they are spelled once, here.

use nowconnect_runtime::metrics::{Registry, SECONDS_BUCKETS};

/// Gauge: tunnels upgraded and not yet ended.
pub const TUNNELS_ACTIVE: &str = "nowconnect_tunnels_active";
/// Counter `{result}`: `ok`, `unauthorized`, `forbidden`, `bad_request`, `version`, `overloaded`.
pub const TUNNEL_HANDSHAKES: &str = "nowconnect_tunnel_handshakes_total";
/// Gauge `{agent_id}`: established tunnels per agent.
pub const AGENTS_CONNECTED: &str = "nowconnect_agents_connected";
/// Gauge `{connector}`: 1 when a healthy, non-draining session serves it.
pub const CONNECTOR_AVAILABLE: &str = "nowconnect_connector_available";
/// Gauge `{connector}`.
pub const STREAMS_ACTIVE: &str = "nowconnect_streams_active";
/// Counter `{connector}`: OPENs sent.
pub const STREAMS_OPENED: &str = "nowconnect_streams_opened_total";
/// Counter `{connector,reason}`: `normal`, `reset`, `idle_timeout`, `tunnel_lost`, `shutdown`.
pub const STREAMS_CLOSED: &str = "nowconnect_streams_closed_total";
/// Counter `{connector,reason}`: see [`OpenFailure`].
pub const STREAM_OPEN_FAILURES: &str = "nowconnect_stream_open_failures_total";
/// Counter `{connector,direction}` (`c2a`, `a2c`). Declared; the runtime does not count bytes
/// per stream yet.
pub const BYTES: &str = "nowconnect_bytes_total";
/// Histogram `{connector}`: client accept to OPEN_OK.
pub const OPEN_DURATION: &str = "nowconnect_open_duration_seconds";
/// Counter `{result}`: `allow`, `deny`, `error`, `cached_allow`, `cached_deny`.
pub const PDP_REQUESTS: &str = "nowconnect_pdp_requests_total";
/// Histogram: duration of each PDP call (cached decisions are not calls).
pub const PDP_DURATION: &str = "nowconnect_pdp_duration_seconds";
/// Counter `{result}`: `ok`, `error`.
pub const JWKS_REFRESH: &str = "nowconnect_jwks_refresh_total";
/// Counter `{kind}`: protocol violations by agents — sessions ended (`protocol_error`,
/// `timeout`, `version`) and streams reset with the session kept (`stream_protocol_error`,
/// `flow_control`).
pub const PROTOCOL_ERRORS: &str = "nowconnect_protocol_errors_total";
/// Gauge `{version}` = 1.
pub const BUILD_INFO: &str = "nowconnect_build_info";

/// `tunnel_handshakes_total{result}` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// HELLO_ACK sent.
    Ok,
    /// 401.
    Unauthorized,
    /// 403, or 4403 after HELLO.
    Forbidden,
    /// 400/404, a malformed upgrade, or a bad first frame.
    BadRequest,
    /// 4426: unsupported protocol version.
    Version,
    /// 503: draining, tunnel or handshake limit, keys not loaded.
    Overloaded,
}

impl Handshake {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::Unauthorized => "unauthorized",
            Handshake::Forbidden => "forbidden",
            Handshake::BadRequest => "bad_request",
            Handshake::Version => "version",
            Handshake::Overloaded => "overloaded",
        }
    }

    /// The result an HTTP rejection of the upgrade counts as.
    pub fn from_status(status: u16) -> Handshake {
        match status {
            401 => Handshake::Unauthorized,
            403 => Handshake::Forbidden,
            503 => Handshake::Overloaded,
            _ => Handshake::BadRequest,
        }
    }
}

/// `stream_open_failures_total{reason}` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    /// No healthy session serves the connector (or the agent does not know it).
    NoAgent,
    /// The PDP refused.
    Denied,
    /// Not in the connector's `allow_clients`.
    ClientNotAllowed,
    /// Agent: RST CONNECT_REFUSED.
    ConnectRefused,
    /// Agent: RST CONNECT_TIMEOUT.
    ConnectTimeout,
    /// Agent: RST NO_HEALTHY_BACKEND.
    NoHealthyBackend,
    /// The hub's `open_timeout` passed without OPEN_OK.
    Timeout,
    /// Stream limit of the session (ours or the agent's).
    RefusedStream,
}

impl OpenFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenFailure::NoAgent => "no_agent",
            OpenFailure::Denied => "denied",
            OpenFailure::ClientNotAllowed => "client_not_allowed",
            OpenFailure::ConnectRefused => "connect_refused",
            OpenFailure::ConnectTimeout => "connect_timeout",
            OpenFailure::NoHealthyBackend => "no_healthy_backend",
            OpenFailure::Timeout => "timeout",
            OpenFailure::RefusedStream => "refused_stream",
        }
    }
}

/// A registry with every hub metric declared, and `build_info` set.
pub fn registry() -> Registry {
    let r = Registry::new();
    r.gauge(TUNNELS_ACTIVE, "Tunnels currently up", &[]);
    r.counter(
        TUNNEL_HANDSHAKES,
        "Tunnel upgrades and handshakes by result",
        &["result"],
    );
    r.gauge(
        AGENTS_CONNECTED,
        "Established tunnels per agent",
        &["agent_id"],
    );
    r.gauge(
        CONNECTOR_AVAILABLE,
        "1 when a healthy session serves the connector",
        &["connector"],
    );
    r.gauge(STREAMS_ACTIVE, "Streams open or opening", &["connector"]);
    r.counter(STREAMS_OPENED, "OPENs sent", &["connector"]);
    r.counter(
        STREAMS_CLOSED,
        "Streams ended after OPEN_OK (or reset locally before it)",
        &["connector", "reason"],
    );
    r.counter(
        STREAM_OPEN_FAILURES,
        "Client connections that got no stream",
        &["connector", "reason"],
    );
    r.counter(BYTES, "Payload bytes relayed", &["connector", "direction"]);
    r.histogram(
        OPEN_DURATION,
        "Client accept to OPEN_OK",
        &["connector"],
        SECONDS_BUCKETS,
    );
    r.counter(PDP_REQUESTS, "PDP decisions by result", &["result"]);
    r.histogram(PDP_DURATION, "PDP call duration", &[], SECONDS_BUCKETS);
    r.counter(JWKS_REFRESH, "JWKS refreshes by result", &["result"]);
    r.counter(
        PROTOCOL_ERRORS,
        "Protocol violations by agents: sessions ended, streams reset",
        &["kind"],
    );
    r.gauge(BUILD_INFO, "Build information", &["version"]);
    r.set(BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
    r
}
