//! Command line of `nowconnect-agent` (configuration.md "Command line"):
//! `nowconnect-agent --config FILE [--check]`, `--version`, `--help`.
//!
//! `main` calls [`start`]: it parses the arguments, prints help/version or the `--check`
//! result, and either says which exit status to use or hands back the loaded config to run.
//! Config and argument errors go to stderr with exit status 2; `--check` prints `ok` on stdout.
//! The flow itself is [`nowconnect_runtime::cli`], shared with the other binary.

use std::ffi::OsString;
use std::io::Write;

use nowconnect_runtime::cli::{self as shared, AppConfig, Program};
use nowconnect_runtime::conf::{self, ConfigError, EnvLookup, Source};
pub use nowconnect_runtime::conf::{
    Cli, Command, UsageError, CONFIG_ENV, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME,
};

use crate::config::AgentConfig;

/// `--help` text.
pub const USAGE: &str = "\
Usage: nowconnect-agent --config FILE [--check]
       nowconnect-agent --version | --help

NowConnect Premise Agent: dials the hub (wss://, JWT) and connects streams to configured targets.

Options:
  -c, --config FILE   agent.yaml to use (default: $NOWCONNECT_CONFIG)
      --check         validate the file and the files it names, print ok, exit
                      (a missing token.file is only a warning)
  -V, --version       print the version
  -h, --help          print this help

Environment:
  NOWCONNECT_CONFIG   config file when --config is not given
  NOWCONNECT_TOKEN    the JWT when token is not configured
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY   proxy when proxy is not configured
  NOWCONNECT_LOG      log filter (or RUST_LOG), e.g. info, nowconnect_agent=debug

Exit status: 0 clean stop, 1 fatal runtime error, 2 bad configuration or arguments.
";

/// `--version` text.
pub fn version() -> String {
    format!("nowconnect-agent {}", env!("CARGO_PKG_VERSION"))
}

/// This binary for [`nowconnect_runtime::cli`].
const PROGRAM: Program = Program {
    name: "nowconnect-agent",
    usage: USAGE,
    version: concat!("nowconnect-agent ", env!("CARGO_PKG_VERSION")),
};

/// Parses the arguments after the program name; `--config` defaults to `$NOWCONNECT_CONFIG`.
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    shared::parse_args(args)
}

/// Loads and validates the config named on the command line (process environment).
pub fn load(cli: &Cli) -> Result<AgentConfig, ConfigError> {
    load_with_env(cli, &conf::process_env)
}

/// [`load`] with `${VAR}` taken from `env`.
pub fn load_with_env(cli: &Cli, env: EnvLookup<'_>) -> Result<AgentConfig, ConfigError> {
    shared::load_with_env(cli, env)
}

/// `--check`: [`load`] plus the referenced files (`hub.ca_file`). Returns the config and the
/// warnings (e.g. `token.file` does not exist yet), which do not fail the check.
pub fn check(cli: &Cli, env: EnvLookup<'_>) -> Result<(AgentConfig, Vec<String>), ConfigError> {
    shared::check(cli, env)
}

impl AppConfig for AgentConfig {
    fn from_source(src: &Source, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        AgentConfig::from_source(src, env)
    }

    fn check_files(&self, env: EnvLookup<'_>) -> Result<Vec<String>, ConfigError> {
        AgentConfig::check_files(self, env)
    }
}

/// What `main` does next: `Run(Box<AgentConfig>)` or `Exit(status)`.
pub type Start = shared::Start<AgentConfig>;

/// Parses `std::env::args_os()`, handles help/version/`--check`, loads the config.
pub fn start() -> Start {
    shared::start(&PROGRAM)
}

/// [`start`] with everything injected (tests).
pub fn start_with<I: IntoIterator<Item = OsString>>(
    args: I,
    env_config: Option<OsString>,
    env: EnvLookup<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Start {
    shared::start_with(&PROGRAM, args, env_config, env, out, err)
}
