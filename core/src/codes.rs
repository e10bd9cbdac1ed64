//! Sides, RST/GOAWAY codes (wire-protocol.md §8) and WebSocket close codes (§7).

/// Which end of the tunnel a session (or a frame's sender) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The Cloud Hub: accepts the WebSocket, opens streams.
    Hub,
    /// The Premise Agent: dials out, connects streams to targets.
    Agent,
}

impl Side {
    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::Hub => Side::Agent,
            Side::Agent => Side::Hub,
        }
    }
}

/// RST and GOAWAY codes (§8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub struct Code(pub u16);

#[allow(missing_docs)]
impl Code {
    pub const NO_ERROR: Code = Code(0);
    pub const PROTOCOL_ERROR: Code = Code(1);
    pub const FLOW_CONTROL_ERROR: Code = Code(2);
    pub const CONNECT_REFUSED: Code = Code(3);
    pub const CONNECT_TIMEOUT: Code = Code(4);
    pub const UNKNOWN_CONNECTOR: Code = Code(5);
    pub const NO_HEALTHY_BACKEND: Code = Code(6);
    pub const FORBIDDEN: Code = Code(7);
    pub const IDLE_TIMEOUT: Code = Code(8);
    pub const RESET_BY_PEER: Code = Code(9);
    pub const REFUSED_STREAM: Code = Code(10);
    pub const SHUTDOWN: Code = Code(11);
    pub const TOKEN_EXPIRED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);

    /// The §8 name, or `UNKNOWN` for a code this version does not define.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL_ERROR",
            2 => "FLOW_CONTROL_ERROR",
            3 => "CONNECT_REFUSED",
            4 => "CONNECT_TIMEOUT",
            5 => "UNKNOWN_CONNECTOR",
            6 => "NO_HEALTHY_BACKEND",
            7 => "FORBIDDEN",
            8 => "IDLE_TIMEOUT",
            9 => "RESET_BY_PEER",
            10 => "REFUSED_STREAM",
            11 => "SHUTDOWN",
            12 => "TOKEN_EXPIRED",
            13 => "INTERNAL",
            _ => "UNKNOWN",
        }
    }
}

impl core::fmt::Display for Code {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// WebSocket close codes of §7.
#[allow(missing_docs)]
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 4400;
    pub const TOKEN_EXPIRED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const TIMEOUT: u16 = 4408;
    pub const UNSUPPORTED_VERSION: u16 = 4426;
    pub const SHUTTING_DOWN: u16 = 4503;
}
