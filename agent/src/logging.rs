//! Process logging: the shared [`nowconnect_runtime::logging`] (JSON lines per
//! operations.md "Logs", context as separate key-value fields).

pub use nowconnect_runtime::logging::*;
