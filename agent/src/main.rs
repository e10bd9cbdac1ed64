//! `nowconnect-agent --config FILE [--check]` (configuration.md "Command line").

use std::process::ExitCode;

use nowconnect_agent::cli::{self, Start, EXIT_RUNTIME};
use nowconnect_agent::logging;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    let cfg = match cli::start() {
        Start::Run(cfg) => cfg,
        Start::Exit(status) => return ExitCode::from(status),
    };
    logging::init(&cfg.logging);
    nowconnect_runtime::install_crypto_provider();
    // Registered before anything runs, so an early SIGTERM drains instead of killing.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let agent = match nowconnect_agent::start(*cfg) {
        Ok(agent) => agent,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let drain = agent.drain_handle();
    let spawned = std::thread::Builder::new()
        .name("nc-signals".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let mut first = true;
            for signal in signals.forever() {
                if first {
                    first = false;
                    log::info!("signal {signal}: graceful drain (send it again to stop at once)");
                    drain.drain();
                } else {
                    log::warn!("signal {signal} again: stopping now");
                    std::process::exit(i32::from(EXIT_RUNTIME));
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
        agent.drain();
    }
    ExitCode::from(agent.wait())
}
