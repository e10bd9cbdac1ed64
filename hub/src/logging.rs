//! Process logging (operations.md "Logs", configuration.md "Environment"): the filter is
//! `NOWCONNECT_LOG`, else `RUST_LOG`, else `logging.level`; the format is one JSON object per
//! line (`ts`, `level`, `target`, `msg`) or human text (`logging.format`, `auto` = JSON unless
//! stderr is a terminal). Context (`agent_id`, `session`, `connector`, `cid`…) is written as
//! `key=value` pairs inside `msg`.

use std::io::{IsTerminal, Write};

use nowconnect_runtime::conf::{LogFormat, LoggingConfig};

/// Installs the global logger. Later calls are no-ops.
pub fn init(cfg: &LoggingConfig) {
    let filter = ["NOWCONNECT_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| cfg.level.clone());
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let mut b = env_logger::Builder::new();
    b.parse_filters(&filter);
    if json {
        b.format(|buf, record| {
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str().to_ascii_lowercase(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    } else {
        b.format_timestamp_millis();
    }
    let _ = b.try_init();
}
