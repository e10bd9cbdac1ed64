//! `nowconnect-hub --config FILE [--check]`: config, logging, crypto provider, the hub, and
//! signals (SIGTERM/SIGINT: graceful drain; a second one exits at once).

use std::process::ExitCode;

use nowconnect_hub::cli::{self, Start, EXIT_RUNTIME};
use nowconnect_hub::{logging, server};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    let cfg = match cli::start() {
        Start::Run(cfg) => cfg,
        Start::Exit(code) => return ExitCode::from(code),
    };
    logging::init(&cfg.logging);
    nowconnect_runtime::install_crypto_provider();

    // Registered before the listeners open, so an early signal is never the default (kill).
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
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
    let spawned = std::thread::Builder::new()
        .name("nc-signals".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("signal {sig}: draining (send again to exit at once)");
                    handle.drain();
                } else {
                    log::warn!("signal {sig} again: exiting now");
                    std::process::exit(i32::from(EXIT_RUNTIME));
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    ExitCode::from(hub.wait())
}
