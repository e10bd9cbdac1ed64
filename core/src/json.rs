//! JSON bodies of HELLO, HELLO_ACK, HEALTH and RENEW_ACK (wire-protocol.md §3, §6).
//! Unknown fields are ignored (forward compatibility, §3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// HELLO (agent → hub, §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the token's agent-id claim.
    pub agent_id: String,
    /// Connectors the agent offers to serve.
    pub connectors: Vec<String>,
    /// Protocol version (1).
    #[serde(default = "one")]
    pub ver: u32,
    /// Free-form software identification, e.g. `nowconnect-agent/0.1.0`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub software: String,
    /// The agent's initial receive window per stream (credit for hub → agent DATA).
    #[serde(default = "default_window")]
    pub window: u32,
    /// Most concurrent streams the agent accepts.
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
}

/// A connector the hub refused in HELLO_ACK, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The connector name.
    pub connector: String,
    /// Human-readable reason, e.g. `not in token scope`.
    pub reason: String,
}

/// HELLO_ACK (hub → agent, §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Opaque session id chosen by the hub (for logs).
    pub session: String,
    /// Connectors this session will serve.
    pub accepted: Vec<String>,
    /// Connectors refused, with reasons.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    /// The hub's initial receive window per stream (credit for agent → hub DATA).
    #[serde(default = "default_window")]
    pub window: u32,
    /// Largest DATA payload in either direction.
    #[serde(default = "default_max_frame")]
    pub max_frame: u32,
    /// Heartbeat interval in milliseconds (§5).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Protocol version (1).
    #[serde(default = "one")]
    pub ver: u32,
}

/// One backend's last health-check result (§6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    /// The target as written in the agent's config.
    pub addr: String,
    /// Whether its last check passed.
    pub ok: bool,
    /// Connect round trip of the last check, when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// Last error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Health of one connector on the agent (§6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorHealth {
    /// At least one backend passed its last check.
    pub healthy: bool,
    /// Per-backend detail.
    #[serde(default)]
    pub backends: Vec<BackendHealth>,
}

/// HEALTH (agent → hub, §6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Connector name → health.
    pub connectors: BTreeMap<String, ConnectorHealth>,
}

/// RENEW_ACK (hub → agent, §6): the renewed token's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewAck {
    /// Unix seconds.
    pub exp: u64,
}

fn one() -> u32 {
    1
}
fn default_window() -> u32 {
    256 * 1024
}
fn default_max_streams() -> u32 {
    10_000
}
fn default_max_frame() -> u32 {
    64 * 1024
}
fn default_heartbeat_ms() -> u64 {
    20_000
}
