//! Logging set-up (configuration.md "Environment", operations.md "Logs"): the filter comes from
//! `NOWCONNECT_LOG`, else `RUST_LOG`, else `logging.level`; the format is one JSON object per
//! line on stderr (`ts`, `level`, `target`, `msg`, then the record's key-values such as
//! `connector`, `cid`, `session`), or human text on a TTY with `format: auto`.

use std::io::{self, IsTerminal, Write};

use env_logger::fmt::Formatter;
use log::kv::{self, Key, Value, VisitSource};
use log::Record;
use nowconnect_runtime::conf::{LogFormat, LoggingConfig};

/// Environment variable with the log filter (before `RUST_LOG`).
pub const LOG_ENV: &str = "NOWCONNECT_LOG";

/// The filter in force: `NOWCONNECT_LOG`, else `RUST_LOG`, else `logging.level`.
pub fn filter(cfg: &LoggingConfig) -> String {
    [LOG_ENV, "RUST_LOG"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| cfg.level.clone())
}

/// Installs the process logger (once; later calls are no-ops).
pub fn init(cfg: &LoggingConfig) {
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(&filter(cfg))
        .target(env_logger::Target::Stderr);
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !io::stderr().is_terminal(),
    };
    if json {
        builder.format(format_json);
    } else {
        builder.format_timestamp_millis();
    }
    // Err: a logger is already installed (tests); keep it.
    let _ = builder.try_init();
}

/// One JSON object per line, `ts` first.
fn format_json(buf: &mut Formatter, record: &Record<'_>) -> io::Result<()> {
    let mut line = String::with_capacity(160);
    line.push_str("{\"ts\":");
    push_json_str(&mut line, &buf.timestamp_millis().to_string());
    line.push_str(",\"level\":");
    // Lower case, like the hub's logs.
    push_json_str(&mut line, &record.level().as_str().to_ascii_lowercase());
    line.push_str(",\"target\":");
    push_json_str(&mut line, record.target());
    line.push_str(",\"msg\":");
    push_json_str(&mut line, &record.args().to_string());
    let mut fields = Fields(&mut line);
    // A visitor that never fails.
    let _ = record.key_values().visit(&mut fields);
    line.push('}');
    writeln!(buf, "{line}")
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let out = &mut *self.0;
        out.push(',');
        push_json_str(out, key.as_str());
        out.push(':');
        if let Some(b) = value.to_bool() {
            out.push_str(if b { "true" } else { "false" });
        } else if let Some(n) = value.to_u64() {
            out.push_str(&n.to_string());
        } else if let Some(n) = value.to_i64() {
            out.push_str(&n.to_string());
        } else {
            push_json_str(out, &value.to_string());
        }
        Ok(())
    }
}
