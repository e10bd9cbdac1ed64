//! nowconnect-agent library.
pub mod backend;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod token;
