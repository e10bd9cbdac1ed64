//! `nowconnect-agent --config FILE [--check]` (configuration.md "Command line").

use std::process::ExitCode;

use nowconnect_agent::cli::{self, Start};

/// Static musl builds (scripts/build-static.sh) use mimalloc: musl's malloc is 2-3x slower for
/// the thread-per-socket design.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg = match cli::start() {
        Start::Run(cfg) => cfg,
        Start::Exit(status) => return ExitCode::from(status),
    };
    // Logging, crypto provider, and signals registered before anything runs, so an early
    // SIGTERM drains instead of killing.
    let signals = match nowconnect_runtime::cli::prepare(&cfg.logging) {
        Ok(s) => s,
        Err(status) => return ExitCode::from(status),
    };
    let agent = match nowconnect_agent::start(*cfg) {
        Ok(agent) => agent,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let drain = agent.drain_handle();
    if let Err(e) = signals.spawn(move || drain.drain()) {
        log::error!("cannot start the signal thread: {e}");
        agent.drain();
    }
    ExitCode::from(agent.wait())
}
