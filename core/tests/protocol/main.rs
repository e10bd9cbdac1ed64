//! The core's test suite, one binary (compile time matters on 2 cores): each module owns one
//! part of wire-protocol.md.

mod codec;
mod corpus;
mod props;
mod replay;
mod session;
