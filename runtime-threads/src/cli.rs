//! What `nowconnect-hub` and `nowconnect-agent` share on the command line
//! (configuration.md "Command line"): `--config FILE [--check]`, `--version`, `--help`, and
//! signal handling (SIGTERM/SIGINT: the first drains, a second exits at once with status 1).
//!
//! Each binary describes itself with a [`Program`] and its config type with [`AppConfig`];
//! [`start_with`] does the rest. Config and argument errors go to stderr with exit status 2;
//! `--check` prints `ok` on stdout (its warnings go to stderr).

use std::ffi::OsString;
use std::io::{self, Write};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::conf::{
    self, Cli, Command, ConfigError, EnvLookup, LoggingConfig, Source, UsageError, EXIT_CONFIG,
    EXIT_OK, EXIT_RUNTIME,
};

/// A binary's name and texts.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// `nowconnect-hub`, `nowconnect-agent`: prefixes usage errors.
    pub name: &'static str,
    /// `--help` text.
    pub usage: &'static str,
    /// `--version` text.
    pub version: &'static str,
}

/// A configuration file the command line loads and `--check`s.
pub trait AppConfig: Sized {
    /// Parses and validates a [`Source`], resolving relative file names against its directory.
    fn from_source(src: &Source, env: EnvLookup<'_>) -> Result<Self, ConfigError>;

    /// `--check`'s extra checks of the files the config names. `Ok` carries warnings, which
    /// do not fail the check. Errors name the key path (no file).
    fn check_files(&self, env: EnvLookup<'_>) -> Result<Vec<String>, ConfigError>;
}

/// Parses the arguments after the program name; `--config` defaults to `$NOWCONNECT_CONFIG`.
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    conf::parse_args(args, std::env::var_os(conf::CONFIG_ENV))
}

/// Loads and validates the config named on the command line; `${VAR}` from `env`.
pub fn load_with_env<C: AppConfig>(cli: &Cli, env: EnvLookup<'_>) -> Result<C, ConfigError> {
    C::from_source(&Source::read(&cli.config)?, env)
}

/// `--check`: [`load_with_env`] plus the referenced files. Returns the config and the warnings.
pub fn check<C: AppConfig>(cli: &Cli, env: EnvLookup<'_>) -> Result<(C, Vec<String>), ConfigError> {
    let src = Source::read(&cli.config)?;
    let cfg = C::from_source(&src, env)?;
    let warnings = cfg.check_files(env).map_err(|e| src.locate(e))?;
    Ok((cfg, warnings))
}

/// What `main` does next.
#[derive(Debug)]
pub enum Start<C> {
    /// Run with this config.
    Run(Box<C>),
    /// Exit now with this status (help, version, `--check`, or an error already printed).
    Exit(u8),
}

/// Parses `std::env::args_os()`, handles help/version/`--check`, loads the config.
pub fn start<C: AppConfig>(program: &Program) -> Start<C> {
    let stdout = io::stdout();
    let stderr = io::stderr();
    start_with(
        program,
        std::env::args_os().skip(1),
        std::env::var_os(conf::CONFIG_ENV),
        &conf::process_env,
        &mut stdout.lock(),
        &mut stderr.lock(),
    )
}

/// [`start`] with everything injected (tests).
pub fn start_with<C: AppConfig, I: IntoIterator<Item = OsString>>(
    program: &Program,
    args: I,
    env_config: Option<OsString>,
    env: EnvLookup<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Start<C> {
    // Write failures on stdout/stderr cannot be reported anywhere; the exit status still is.
    let cli = match conf::parse_args(args, env_config) {
        Ok(Command::Help) => {
            let _ = out.write_all(program.usage.as_bytes());
            return Start::Exit(EXIT_OK);
        }
        Ok(Command::Version) => {
            let _ = writeln!(out, "{}", program.version);
            return Start::Exit(EXIT_OK);
        }
        Ok(Command::Run(cli)) => cli,
        Err(e) => {
            let _ = writeln!(err, "{}: {e}\n\n{}", program.name, program.usage);
            return Start::Exit(EXIT_CONFIG);
        }
    };
    if cli.check {
        return match check::<C>(&cli, env) {
            Ok((_, warnings)) => {
                for w in warnings {
                    let _ = writeln!(err, "{}: warning: {w}", cli.config.display());
                }
                let _ = writeln!(out, "ok");
                Start::Exit(EXIT_OK)
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                Start::Exit(EXIT_CONFIG)
            }
        };
    }
    match load_with_env(&cli, env) {
        Ok(cfg) => Start::Run(Box::new(cfg)),
        Err(e) => {
            let _ = writeln!(err, "{e}");
            Start::Exit(EXIT_CONFIG)
        }
    }
}

/// What `main` does once the config is loaded, before it starts anything: the process logger,
/// the crypto provider, then the signal handlers (so an early signal drains instead of
/// killing). `Err(status)`: the handlers could not be installed (logged).
pub fn prepare(logging: &LoggingConfig) -> Result<DrainSignals, u8> {
    crate::logging::init(logging);
    crate::install_crypto_provider();
    DrainSignals::register().map_err(|e| {
        log::error!("cannot install signal handlers: {e}");
        EXIT_RUNTIME
    })
}

/// SIGTERM/SIGINT handlers, registered before anything runs so an early signal drains
/// instead of killing the process.
pub struct DrainSignals(Signals);

impl std::fmt::Debug for DrainSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DrainSignals")
    }
}

impl DrainSignals {
    /// Registers the handlers (from then on the signals no longer kill the process).
    pub fn register() -> io::Result<DrainSignals> {
        Signals::new([SIGTERM, SIGINT]).map(DrainSignals)
    }

    /// Starts the thread "nc-signals": the first signal calls `drain`, a second one exits at
    /// once with status 1.
    pub fn spawn(mut self, drain: impl FnOnce() + Send + 'static) -> io::Result<()> {
        std::thread::Builder::new()
            .name("nc-signals".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut drain = Some(drain);
                for signal in self.0.forever() {
                    if let Some(drain) = drain.take() {
                        log::info!(signal; "signal received: draining (send it again to exit at once)");
                        drain();
                    } else {
                        log::warn!(signal; "signal received again: exiting now");
                        std::process::exit(i32::from(EXIT_RUNTIME));
                    }
                }
            })
            .map(drop)
    }
}
