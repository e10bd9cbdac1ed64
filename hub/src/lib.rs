//! nowconnect-hub library.
pub mod auth;
pub mod cli;
pub mod config;
pub mod pool;
