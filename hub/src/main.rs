//! `nowconnect-hub --config FILE [--check]`: config, logging, crypto provider, the hub, and
//! signals (SIGTERM/SIGINT: graceful drain; a second one exits at once).

use std::process::ExitCode;

use nowconnect_hub::cli::{self, Start, EXIT_RUNTIME};
use nowconnect_hub::server;

/// Static musl builds (scripts/build-static.sh) use mimalloc: musl's malloc is 2-3x slower for
/// the thread-per-socket design.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg = match cli::start() {
        Start::Run(cfg) => cfg,
        Start::Exit(code) => return ExitCode::from(code),
    };
    // Signals registered before the listeners open, so an early one is never the default (kill).
    let signals = match nowconnect_runtime::cli::prepare(&cfg.logging) {
        Ok(s) => s,
        Err(code) => return ExitCode::from(code),
    };
    let hub = match server::start(*cfg) {
        Ok(hub) => hub,
        Err(e) => {
            log::error!("{e}");
            eprintln!("nowconnect-hub: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let handle = hub.handle();
    if let Err(e) = signals.spawn(move || handle.drain()) {
        log::error!("cannot start the signal thread: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    ExitCode::from(hub.wait())
}
