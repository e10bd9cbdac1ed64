//! The agent's Prometheus metric names (operations.md "Agent": names are part of the interface).

use nowconnect_runtime::metrics::{Registry, SECONDS_BUCKETS};

/// Established tunnels (HELLO_ACK received, not yet closed).
pub const TUNNELS_UP: &str = "nowconnect_agent_tunnels_up";
/// Tunnel connect attempts by `result`: `ok`, `unauthorized`, `forbidden`, `proxy_error`,
/// `tls_error`, `network_error`.
pub const CONNECTS_TOTAL: &str = "nowconnect_agent_connects_total";
/// 1 when a backend passed its last TCP health check.
pub const BACKEND_UP: &str = "nowconnect_agent_backend_up";
/// Time to connect a stream's target (successful connects, fall-through included).
pub const BACKEND_CONNECT_DURATION: &str = "nowconnect_agent_backend_connect_duration_seconds";
/// Streams open or opening, per connector.
pub const STREAMS_ACTIVE: &str = "nowconnect_agent_streams_active";
/// Payload bytes relayed, per connector and `direction` (`c2a`, `a2c`).
pub const BYTES: &str = "nowconnect_agent_bytes_total";
/// Seconds until the most recently fetched token expires.
pub const TOKEN_EXPIRY: &str = "nowconnect_agent_token_expiry_seconds";
/// Build information, value 1.
pub const BUILD_INFO: &str = "nowconnect_build_info";

/// `result` label values of [`CONNECTS_TOTAL`].
pub mod result {
    /// Reached HELLO_ACK.
    pub const OK: &str = "ok";
    /// HTTP 401 on the upgrade.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// HTTP 403 on the upgrade, or closed 4403 before HELLO_ACK.
    pub const FORBIDDEN: &str = "forbidden";
    /// The proxy failed or refused.
    pub const PROXY_ERROR: &str = "proxy_error";
    /// TLS handshake or certificate verification failed.
    pub const TLS_ERROR: &str = "tls_error";
    /// Everything else: DNS, TCP, timeouts, other HTTP answers, a session lost before HELLO_ACK.
    pub const NETWORK_ERROR: &str = "network_error";
}

/// Declares every agent metric in `registry`, and sets `nowconnect_build_info`.
pub fn declare(registry: &Registry) {
    registry.gauge(
        TUNNELS_UP,
        "Tunnels that reached HELLO_ACK and are open",
        &[],
    );
    registry.counter(
        CONNECTS_TOTAL,
        "Tunnel connect attempts by result",
        &["result"],
    );
    registry.gauge(
        BACKEND_UP,
        "1 when the backend passed its last TCP health check",
        &["connector", "backend"],
    );
    registry.histogram(
        BACKEND_CONNECT_DURATION,
        "Time to connect a stream's target",
        &["connector"],
        SECONDS_BUCKETS,
    );
    registry.gauge(STREAMS_ACTIVE, "Streams open or opening", &["connector"]);
    registry.counter(
        BYTES,
        "Payload bytes relayed, by direction",
        &["connector", "direction"],
    );
    registry.gauge(BUILD_INFO, "Build information", &["version"]);
    registry.set(BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
}

/// Sets [`TOKEN_EXPIRY`], declaring it on first use (so it does not read 0 before any token
/// was fetched).
pub fn set_token_expiry(registry: &Registry, seconds: i64) {
    registry.gauge(TOKEN_EXPIRY, "Seconds until the current token expires", &[]);
    registry.set(TOKEN_EXPIRY, &[], seconds as f64);
}
