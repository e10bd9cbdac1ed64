//! nowconnect-hub library: configuration, authentication, pools, and the hub itself
//! ([`server::start`]) so it can run in-process (tests) as well as from `main`.
pub mod auth;
pub mod cli;
pub mod config;
mod listener;
pub mod logging;
pub mod metrics;
pub mod pdp;
pub mod pool;
pub mod server;
mod status;
mod tunnel;
mod upgrade;

pub use server::{start, Hub, HubHandle, StartError};
