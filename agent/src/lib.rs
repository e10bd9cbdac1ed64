//! nowconnect-agent library: the Premise Agent. [`run::start`] runs one in-process;
//! `main` wraps it with the command line, logging and signals.
pub mod backend;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod connector;
pub mod dial;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod run;
pub mod status;
pub mod supervisor;
pub mod token;
pub mod tunnel;

pub use run::{start, start_with, Agent, DrainHandle, StartError};
