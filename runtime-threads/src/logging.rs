//! Logging set-up (configuration.md "Environment", operations.md "Logs"): the filter comes from
//! `NOWCONNECT_LOG`, else `RUST_LOG`, else `logging.level`; the format is one JSON object per
//! line on stderr (`ts`, `level`, `target`, `msg`, then the record's key-values such as
//! `connector`, `cid`, `session`), or human text on a TTY with `format: auto`.
//!
//! Shared by the hub and the agent. Context goes in the record's key-values, not in `msg`:
//! `log::info!(agent_id = id, session = s; "tunnel up")`. `ts` is RFC 3339 UTC with
//! milliseconds.

use std::io::{self, IsTerminal, Write};

use crate::conf::{LogFormat, LoggingConfig};
use env_logger::fmt::Formatter;
use log::kv::{self, Key, Value, VisitSource, VisitValue};
use log::Record;

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
        let mut json = JsonValue(None);
        value.visit(&mut json)?;
        // `None` (an absent optional field) is left out.
        if let Some(json) = json.0 {
            let out = &mut *self.0;
            out.push(',');
            push_json_str(out, key.as_str());
            out.push(':');
            out.push_str(&json);
        }
        Ok(())
    }
}

/// A value as JSON: numbers and booleans as such, `None` as nothing, anything else as its
/// `Display` string.
struct JsonValue(Option<String>);

impl JsonValue {
    fn set(&mut self, json: String) -> Result<(), kv::Error> {
        self.0 = Some(json);
        Ok(())
    }

    fn set_str(&mut self, s: &str) -> Result<(), kv::Error> {
        let mut out = String::with_capacity(s.len() + 2);
        push_json_str(&mut out, s);
        self.set(out)
    }
}

impl<'v> VisitValue<'v> for JsonValue {
    fn visit_any(&mut self, value: Value<'_>) -> Result<(), kv::Error> {
        self.set_str(&value.to_string())
    }

    fn visit_null(&mut self) -> Result<(), kv::Error> {
        self.0 = None;
        Ok(())
    }

    fn visit_u64(&mut self, value: u64) -> Result<(), kv::Error> {
        self.set(value.to_string())
    }

    fn visit_i64(&mut self, value: i64) -> Result<(), kv::Error> {
        self.set(value.to_string())
    }

    fn visit_u128(&mut self, value: u128) -> Result<(), kv::Error> {
        self.set(value.to_string())
    }

    fn visit_i128(&mut self, value: i128) -> Result<(), kv::Error> {
        self.set(value.to_string())
    }

    fn visit_f64(&mut self, value: f64) -> Result<(), kv::Error> {
        if value.is_finite() {
            // Milliseconds and the like: three decimals are plenty.
            self.set(format!("{}", (value * 1000.0).round() / 1000.0))
        } else {
            self.set_str(&value.to_string())
        }
    }

    fn visit_bool(&mut self, value: bool) -> Result<(), kv::Error> {
        self.set(value.to_string())
    }

    fn visit_str(&mut self, value: &str) -> Result<(), kv::Error> {
        self.set_str(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::kv::ToValue;

    fn fields(kvs: &[(&str, Value<'_>)]) -> String {
        let mut line = String::new();
        for (k, v) in kvs {
            let _ = Fields(&mut line).visit_pair(Key::from_str(k), v.clone());
        }
        line
    }

    #[test]
    fn key_values_as_json_fields() {
        let none: Option<&str> = None;
        let line = fields(&[
            ("agent_id", Value::from("a\"1")),
            ("cid", Value::from(7u32)),
            ("code", Value::from(-3i64)),
            ("duration_ms", Value::from(12u128)),
            ("open_ms", Value::from(1.23456f64)),
            ("up", Value::from(true)),
            ("detail", none.to_value()),
            ("remote", Value::from_display(&"127.0.0.1:1")),
        ]);
        assert_eq!(
            line,
            r#","agent_id":"a\"1","cid":7,"code":-3,"duration_ms":12,"open_ms":1.235,"up":true,"remote":"127.0.0.1:1""#
        );
    }

    #[test]
    fn filter_falls_back_to_config_level() {
        let cfg = LoggingConfig {
            level: "nowconnect_hub=debug".to_owned(),
            format: LogFormat::Json,
        };
        if std::env::var_os(LOG_ENV).is_none() && std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(filter(&cfg), "nowconnect_hub=debug");
        }
    }
}
