//! Command line of `nowconnect-hub` (configuration.md "Command line"):
//! `nowconnect-hub --config FILE [--check]`, `--version`, `--help`.
//!
//! `main` calls [`start`]: it parses the arguments, prints help/version or the `--check`
//! result, and either says which exit status to use or hands back the loaded config to run.
//! Config and argument errors go to stderr with exit status 2; `--check` prints `ok` on stdout.

use std::ffi::OsString;
use std::io::Write;

use nowconnect_runtime::conf::{self, ConfigError, EnvLookup, Source};
pub use nowconnect_runtime::conf::{
    Cli, Command, UsageError, CONFIG_ENV, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME,
};

use crate::config::HubConfig;

/// `--help` text.
pub const USAGE: &str = "\
Usage: nowconnect-hub --config FILE [--check]
       nowconnect-hub --version | --help

NowConnect Cloud Hub: accepts agent tunnels (wss://, JWT) and serves connector listeners.

Options:
  -c, --config FILE   hub.yaml to use (default: $NOWCONNECT_CONFIG)
      --check         validate the file and the files it names, print ok, exit
  -V, --version       print the version
  -h, --help          print this help

Environment:
  NOWCONNECT_CONFIG   config file when --config is not given
  NOWCONNECT_LOG      log filter (or RUST_LOG), e.g. info, nowconnect_hub=debug

Exit status: 0 clean stop, 1 fatal runtime error, 2 bad configuration or arguments.
";

/// `--version` text.
pub fn version() -> String {
    format!("nowconnect-hub {}", env!("CARGO_PKG_VERSION"))
}

/// Parses the arguments after the program name; `--config` defaults to `$NOWCONNECT_CONFIG`.
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    conf::parse_args(args, std::env::var_os(CONFIG_ENV))
}

/// Loads and validates the config named on the command line (process environment).
pub fn load(cli: &Cli) -> Result<HubConfig, ConfigError> {
    load_with_env(cli, &conf::process_env)
}

/// [`load`] with `${VAR}` taken from `env`.
pub fn load_with_env(cli: &Cli, env: EnvLookup<'_>) -> Result<HubConfig, ConfigError> {
    HubConfig::from_source(&Source::read(&cli.config)?, env)
}

/// `--check`: [`load`] plus the referenced files (TLS cert/key, `jwks_file`, `jwks_ca`).
pub fn check(cli: &Cli, env: EnvLookup<'_>) -> Result<HubConfig, ConfigError> {
    let src = Source::read(&cli.config)?;
    let cfg = HubConfig::from_source(&src, env)?;
    cfg.check_files().map_err(|e| src.locate(e))?;
    Ok(cfg)
}

/// What `main` does next.
#[derive(Debug)]
pub enum Start {
    /// Run the hub with this config.
    Run(Box<HubConfig>),
    /// Exit now with this status (help, version, `--check`, or an error already printed).
    Exit(u8),
}

/// Parses `std::env::args_os()`, handles help/version/`--check`, loads the config.
pub fn start() -> Start {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    start_with(
        std::env::args_os().skip(1),
        std::env::var_os(CONFIG_ENV),
        &conf::process_env,
        &mut stdout.lock(),
        &mut stderr.lock(),
    )
}

/// [`start`] with everything injected (tests).
pub fn start_with<I: IntoIterator<Item = OsString>>(
    args: I,
    env_config: Option<OsString>,
    env: EnvLookup<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Start {
    // Write failures on stdout/stderr cannot be reported anywhere; the exit status still is.
    let cli = match conf::parse_args(args, env_config) {
        Ok(Command::Help) => {
            let _ = out.write_all(USAGE.as_bytes());
            return Start::Exit(EXIT_OK);
        }
        Ok(Command::Version) => {
            let _ = writeln!(out, "{}", version());
            return Start::Exit(EXIT_OK);
        }
        Ok(Command::Run(cli)) => cli,
        Err(e) => {
            let _ = writeln!(err, "nowconnect-hub: {e}\n\n{USAGE}");
            return Start::Exit(EXIT_CONFIG);
        }
    };
    if cli.check {
        return match check(&cli, env) {
            Ok(_) => {
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
