//! Configuration helpers shared by the hub and the agent (configuration.md).
//!
//! - [`Source`]: one YAML file. [`Source::parse`] expands `${VAR}` in every string value, then
//!   deserializes with serde (`deny_unknown_fields` on every struct); every error names the file,
//!   the key path and, where it can be found, the line: [`ConfigError`].
//! - Scalar parsers: [`parse_duration`], [`parse_size`], [`parse_percent`], [`parse_socket_addr`],
//!   [`parse_host_port`], [`Cidr`], [`validate_connector_name`], and serde adapters for them in
//!   [`de`].
//! - PEM files: [`load_certs`], [`load_private_key`], [`load_ca_certs`] (rustls-pki-types
//!   `PemObject`).
//! - Command line: [`parse_args`] (`--config`, `--check`, `--version`, `--help`).
//!
//! Secrets: values under keys named like a password, secret or token are never echoed in an
//! error (security.md: secrets never appear in error messages).

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::{
    self as sde, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, Visitor,
};
use serde::Deserialize;
use serde_yaml::Value;

/// Exit status for a clean stop (configuration.md "Command line").
pub const EXIT_OK: u8 = 0;
/// Exit status for a fatal runtime error.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit status for bad configuration or arguments.
pub const EXIT_CONFIG: u8 = 2;

/// Environment variable that supplies `--config` when it is not given.
pub const CONFIG_ENV: &str = "NOWCONNECT_CONFIG";

/// Largest configuration file accepted (a YAML config is a few KiB; this only bounds memory).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Looks up an environment variable; `None` when it is not set. Tests pass their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as an [`EnvLookup`]. A variable that is not valid UTF-8 counts as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).and_then(|v| v.into_string().ok())
}

// ---------------------------------------------------------------------------------------------
// Key paths and the error type
// ---------------------------------------------------------------------------------------------

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A mapping key.
    Key(String),
    /// A sequence index (0-based).
    Index(usize),
}

/// Where a value sits in the YAML document, rendered `connectors[1].listen`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The document root.
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// This path extended by a mapping key.
    #[must_use]
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Segment::Key(key.to_owned()));
        self
    }

    /// This path extended by a sequence index.
    #[must_use]
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }

    /// The steps from the root.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// True for the document root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the rendered form (`a.b[2].c`). Keys containing `.` or `[` cannot be written
    /// this way; paths built from serde errors keep such keys intact.
    pub fn parse(s: &str) -> Self {
        let mut out = Vec::new();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let (name, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                out.push(Segment::Key(name.to_owned()));
            }
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(end) = stripped.find(']') else {
                    break;
                };
                if let Ok(i) = stripped[..end].parse() {
                    out.push(Segment::Index(i));
                }
                rest = &stripped[end + 1..];
            }
        }
        KeyPath(out)
    }

    /// The last mapping key on the path, if any.
    pub fn last_key(&self) -> Option<&str> {
        self.0.iter().rev().find_map(|s| match s {
            Segment::Key(k) => Some(k.as_str()),
            Segment::Index(_) => None,
        })
    }

    /// True when the value at this path is a secret and must never be echoed.
    pub fn is_secret(&self) -> bool {
        self.last_key().is_some_and(is_secret_key)
    }
}

impl From<&str> for KeyPath {
    fn from(s: &str) -> Self {
        KeyPath::parse(s)
    }
}

impl From<String> for KeyPath {
    fn from(s: String) -> Self {
        KeyPath::parse(&s)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Keys whose values are secrets: anything named like a password, a secret or a token value.
/// (`token` itself is a section in agent.yaml, but a scalar written there would be a raw JWT.)
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k == "token" || k.ends_with("_token")
}

/// A configuration error: `FILE: KEY.PATH: message (line N)`, e.g.
/// `hub.yaml: connectors[1].listen: invalid socket address "0.0.0.0:38x9" (line 27)`.
/// Every part but the message is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: Option<String>,
    key: Option<KeyPath>,
    line: Option<usize>,
    message: String,
}

impl ConfigError {
    /// An error about the file as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            key: None,
            line: None,
            message: message.into(),
        }
    }

    /// An error about the value at `key` (e.g. `"connectors[1].listen"`).
    pub fn at(key: impl Into<KeyPath>, message: impl Into<String>) -> Self {
        let key = key.into();
        ConfigError {
            file: None,
            key: (!key.is_root()).then_some(key),
            line: None,
            message: message.into(),
        }
    }

    /// Sets the file name shown first.
    #[must_use]
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// Sets the 1-based line.
    #[must_use]
    pub fn with_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }

    /// The file name, if known.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The key path, rendered (`connectors[1].listen`), if the error is about one value.
    pub fn key(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.to_string())
    }

    /// The key path, if the error is about one value.
    pub fn key_path(&self) -> Option<&KeyPath> {
        self.key.as_ref()
    }

    /// The 1-based line, where known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// The message alone.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Source: read, expand, deserialize, locate
// ---------------------------------------------------------------------------------------------

/// One YAML configuration file: its name as given (for messages) and its text.
#[derive(Debug, Clone)]
pub struct Source {
    name: String,
    path: Option<PathBuf>,
    text: String,
}

impl Source {
    /// Reads `path` (at most [`MAX_CONFIG_BYTES`]).
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        use std::io::Read;
        let name = path.display().to_string();
        let fail =
            |e: std::io::Error| ConfigError::new(format!("cannot read: {e}")).with_file(&name);
        let file = std::fs::File::open(path).map_err(fail)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(fail)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(
                ConfigError::new(format!("file larger than {MAX_CONFIG_BYTES} bytes"))
                    .with_file(name),
            );
        }
        Ok(Source {
            name,
            path: Some(path.to_path_buf()),
            text,
        })
    }

    /// A source from text (tests, embedded defaults). `name` is shown in errors.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Source {
        Source {
            name: name.into(),
            path: None,
            text: text.into(),
        }
    }

    /// The name shown in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The directory relative file names in the config are resolved against: the config file's
    /// own directory (or none for a source built from text).
    pub fn base_dir(&self) -> Option<&Path> {
        self.path
            .as_deref()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// Resolves a file name written in the config: absolute names stay, relative ones are taken
    /// from the config file's directory.
    pub fn resolve(&self, file: &Path) -> PathBuf {
        match self.base_dir() {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        }
    }

    /// Parses the YAML, expands `${VAR}` in every string value, then deserializes `T`.
    /// Errors carry this file's name, the key path and the line where found.
    pub fn parse<T: DeserializeOwned>(&self, env: EnvLookup<'_>) -> Result<T, ConfigError> {
        let mut value: Value = serde_yaml::from_str(&self.text).map_err(|e| {
            // libyaml's messages carry their own "at line L column C"; no value is echoed.
            ConfigError::new(format!("invalid YAML: {e}")).with_file(&self.name)
        })?;
        if value.is_null() {
            return Err(ConfigError::new("the configuration is empty").with_file(&self.name));
        }
        expand_value(&mut value, &mut KeyPath::root(), env).map_err(|e| self.locate(e))?;
        serde_path_to_error::deserialize(value).map_err(|e| self.locate(serde_error(e)))
    }

    /// Adds this file's name and, when the error names a key found in the text, its line.
    pub fn locate(&self, mut err: ConfigError) -> ConfigError {
        if err.file.is_none() {
            err.file = Some(self.name.clone());
        }
        if err.line.is_none() {
            if let Some(key) = &err.key {
                err.line = locate_line(&self.text, key);
            }
        }
        err
    }
}

/// Converts a serde error (from deserializing an expanded [`Value`]) into a [`ConfigError`]
/// with the exact key path. Unknown and missing keys name the key itself.
fn serde_error(err: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    let mut path = KeyPath::root();
    for seg in err.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path.0.push(Segment::Index(*index)),
            serde_path_to_error::Segment::Map { key } => path.0.push(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => {
                path.0.push(Segment::Key(variant.clone()))
            }
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    let msg = err.into_inner().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((name, tail)) = rest.split_once('`') {
            // Serde names the field only in the message; put it on the path.
            if path.last_key() != Some(name) {
                path.0.push(Segment::Key(name.to_owned()));
            }
            let expected = tail
                .trim_start_matches(", ")
                .trim_start_matches("expected ")
                .replace('`', "");
            let message = if expected.is_empty() || expected.starts_with("there are no fields") {
                "unknown key".to_owned()
            } else {
                format!("unknown key (expected {expected})")
            };
            return ConfigError::at(path, message);
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some((name, _)) = rest.split_once('`') {
            return ConfigError::at(path.key(name), "required key is missing");
        }
    }
    if path.is_secret() {
        // Serde's messages may quote the value ("invalid type: string \"...\"").
        return ConfigError::at(path, "invalid value (not shown: secret)");
    }
    ConfigError::at(path, msg)
}

/// Expands `${VAR}` in every string scalar below `value` (mapping keys are left alone).
fn expand_value(
    value: &mut Value,
    path: &mut KeyPath,
    env: EnvLookup<'_>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(s) => {
            if s.contains('$') {
                *s = expand_vars(s, env).map_err(|e| ConfigError::at(path.clone(), e))?;
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.0.push(Segment::Index(i));
                let r = expand_value(item, path, env);
                path.0.pop();
                r?;
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = match k {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => "?".to_owned(),
                };
                path.0.push(Segment::Key(key));
                let r = expand_value(v, path, env);
                path.0.pop();
                r?;
            }
        }
        Value::Tagged(tagged) => expand_value(&mut tagged.value, path, env)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Expands `${NAME}` references (NAME = `[A-Za-z_][A-Za-z0-9_]*`) from `env`. `$${` gives a
/// literal `${`; any other `$` is kept. The message of an error names the variable, never the
/// value around it.
pub fn expand_vars(s: &str, env: EnvLookup<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err("unterminated ${ in value".to_owned());
            };
            let name = &tail[..end];
            if !is_var_name(name) {
                return Err("invalid ${...} reference (expected ${NAME} with NAME made of A-Z, a-z, 0-9, _)".to_owned());
            }
            match env(name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// Line locator: walk the original text with serde_yaml's event deserializer along the key path
// and stop at the target with a marker error, whose position serde_yaml fills in.
// ---------------------------------------------------------------------------------------------

const FOUND: &str = "\u{1}nowconnect-locate\u{1}";

/// The 1-based line of the value (or, for the last mapping key, of the key itself) at `path`.
pub fn locate_line(text: &str, path: &KeyPath) -> Option<usize> {
    if path.is_root() {
        return None;
    }
    let de = serde_yaml::Deserializer::from_str(text);
    match (Seek { rest: &path.0 }).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| l.line()),
        _ => None,
    }
}

struct Seek<'p> {
    rest: &'p [Segment],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.rest.is_empty() {
            // Consume nothing: serde_yaml marks the error with the current node's position.
            return d.deserialize_any(Found);
        }
        d.deserialize_any(self)
    }
}

/// Visitor that fails on whatever node it is given: the marker error.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: sde::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: sde::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: sde::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: sde::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: sde::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: sde::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: sde::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(sde::Error::custom(FOUND))
    }
    fn visit_seq<A: sde::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(sde::Error::custom(FOUND))
    }
    fn visit_map<A: sde::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(sde::Error::custom(FOUND))
    }
    fn visit_enum<A: sde::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(sde::Error::custom(FOUND))
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or sequence")
    }
    // Scalars on the way: the path does not exist in the text.
    fn visit_bool<E: sde::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: sde::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: sde::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: sde::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: sde::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: sde::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_enum<A: sde::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Ok(())
    }
    fn visit_seq<A: sde::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Segment::Index(want)) = self.rest.first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut i = 0;
        loop {
            if i == *want {
                seq.next_element_seed(Seek {
                    rest: &self.rest[1..],
                })?;
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
            if i > *want {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            }
        }
    }
    fn visit_map<A: sde::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let want = match self.rest.first() {
            Some(Segment::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let last = self.rest.len() == 1;
        while let Some(hit) = map.next_key_seed(KeySeek { want, last })? {
            if hit {
                map.next_value_seed(Seek {
                    rest: &self.rest[1..],
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Reads one mapping key: `true` if it is the wanted one. For the last step of the path the
/// marker error is raised on the key itself, so the line is the key's.
struct KeySeek<'a> {
    want: Option<&'a str>,
    last: bool,
}

impl KeySeek<'_> {
    fn check<E: sde::Error>(self, key: &str) -> Result<bool, E> {
        if self.want == Some(key) {
            if self.last {
                return Err(E::custom(FOUND));
            }
            return Ok(true);
        }
        Ok(false)
    }
}

impl<'de> DeserializeSeed<'de> for KeySeek<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeek<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: sde::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: sde::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: sde::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: sde::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: sde::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: sde::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: sde::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: sde::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar parsers
// ---------------------------------------------------------------------------------------------

/// Parses a duration: `500ms`, `10s`, `5m`, `1h`, combinations like `1h30m`, or `0`.
/// Whether `0` is allowed (e.g. "disabled") is for the caller to decide.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration \"{s}\" (expected e.g. 500ms, 10s, 5m, 1h)");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0; // milliseconds
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let per: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(per)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(Duration::from_millis(total))
}

/// Parses a size in bytes: `65536`, `64KiB`, `1MiB`, `16MiB`, `1GiB`, `512B`. Binary units
/// only: `K`, `KB`, `MB` are refused as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size \"{s}\" (expected e.g. 65536, 64KiB, 1MiB)");
    let t = s.trim();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let per: u64 = match t[digits..].trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(per).ok_or_else(bad)
}

/// Parses a percentage `80%` (or `80.5%`) into a fraction in (0, 1).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let bad = || format!("invalid percentage \"{s}\" (expected e.g. 80%, between 1% and 99%)");
    let t = s.trim();
    let num = t.strip_suffix('%').ok_or_else(bad)?.trim();
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let p: f64 = num.parse().map_err(|_| bad())?;
    if !(p > 0.0 && p < 100.0) {
        return Err(bad());
    }
    Ok(p / 100.0)
}

/// Parses `ip:port` (`0.0.0.0:389`, `[::]:8443`). Port 0 is allowed (an ephemeral port).
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s.trim()).map_err(|_| format!("invalid socket address \"{s}\""))
}

/// Parses a target `host:port` (`dc1.corp.local:389`, `10.0.0.5:22`, `[fd00::5]:443`): the host
/// is a DNS name or an IP literal, the port 1–65535. Returns host (IPv6 without brackets), port.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("invalid address \"{s}\" (expected host:port)");
    let t = s.trim();
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        Ipv6Addr::from_str(h).map_err(|_| bad())?;
        (h, p)
    } else {
        let (h, p) = t.rsplit_once(':').ok_or_else(bad)?;
        if h.contains(':') || !is_host_name(h) {
            return Err(bad());
        }
        (h, p)
    };
    if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host.to_owned(), p)),
        _ => Err(bad()),
    }
}

/// A DNS host name or IPv4 literal: labels of `[A-Za-z0-9_-]`, 1–63 bytes, 253 bytes in all.
pub fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A URL split into the parts the binaries use. No percent-decoding: hosts and paths are
/// passed on as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    /// Lower-cased scheme (`https`, `wss`, ...).
    pub scheme: String,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Explicit port, else the scheme's default (80 for http/ws, 443 for https/wss).
    pub port: u16,
    /// Path and query, `/` when empty.
    pub path: String,
    /// True if the URL carried `user:password@`.
    pub has_userinfo: bool,
}

impl ParsedUrl {
    /// True when the host is a loopback name or address.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || IpAddr::from_str(&self.host).is_ok_and(|ip| ip.is_loopback())
    }
}

/// The URL with any `user:password@` removed, for messages.
pub fn redact_url(s: &str) -> String {
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => s.to_owned(),
            }
        }
        None => s.to_owned(),
    }
}

/// Parses an absolute URL whose scheme is one of `schemes`.
pub fn parse_url(s: &str, schemes: &[&str]) -> Result<ParsedUrl, String> {
    let shown = redact_url(s);
    let expected = schemes
        .iter()
        .map(|x| format!("{x}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let bad = |why: &str| format!("invalid URL \"{shown}\": {why}");
    let t = s.trim();
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace"));
    }
    let (scheme, rest) = t
        .split_once("://")
        .ok_or_else(|| bad(&format!("expected {expected}")))?;
    let scheme = scheme.to_ascii_lowercase();
    if !schemes.contains(&scheme.as_str()) {
        return Err(bad(&format!("expected {expected}")));
    }
    if rest.contains('#') {
        return Err(bad("fragments are not allowed"));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (mut authority, path) = rest.split_at(end);
    let mut has_userinfo = false;
    if let Some(at) = authority.rfind('@') {
        has_userinfo = true;
        authority = &authority[at + 1..];
    }
    let default_port = match scheme.as_str() {
        "https" | "wss" => 443,
        _ => 80,
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(|| bad("bad IPv6 host"))?;
        Ipv6Addr::from_str(h).map_err(|_| bad("bad IPv6 host"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Err(bad("bad port")),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !host.contains(':') && !is_host_name(host) {
        return Err(bad("bad host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("bad port"))?,
    };
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok(ParsedUrl {
        scheme,
        host: host.to_owned(),
        port,
        path,
        has_userinfo,
    })
}

/// The `connectors` list of hub.yaml and agent.yaml, checked one entry at a time: not empty,
/// names unique (`connectors[i].name`).
#[derive(Debug, Default)]
pub struct ConnectorNames<'a>(std::collections::HashSet<&'a str>);

impl<'a> ConnectorNames<'a> {
    /// Starts the check of a list of `len` connectors: at least one is required.
    pub fn new(len: usize) -> Result<ConnectorNames<'a>, ConfigError> {
        if len == 0 {
            return Err(ConfigError::at(
                "connectors",
                "at least one connector is required",
            ));
        }
        Ok(ConnectorNames::default())
    }

    /// Connector `i` is named `name`: an error if an earlier one has the same name.
    pub fn add(&mut self, i: usize, name: &'a str) -> Result<(), ConfigError> {
        if !self.0.insert(name) {
            return Err(ConfigError::at(
                format!("connectors[{i}].name"),
                format!("duplicate connector name \"{name}\""),
            ));
        }
        Ok(())
    }
}

/// Connector names: 1–64 bytes of `[A-Za-z0-9._-]` (wire-protocol.md §2).
pub fn validate_connector_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "invalid connector name \"{}\" (1 to 64 characters of A-Z a-z 0-9 . _ -)",
            name.escape_default()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "invalid connector name \"{}\" (only A-Z a-z 0-9 . _ - are allowed)",
            name.escape_default()
        ));
    }
    Ok(())
}

/// An IPv4 or IPv6 network, `10.0.0.0/8`, `fd00::/8`; a bare address means one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True if `ip` is inside this network. An IPv4-mapped IPv6 client address
    /// (`::ffff:10.1.2.3`, from a dual-stack listener) matches IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                mask_v4(u32::from(a), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                mask_v6(u128::from(a), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => a & (u32::MAX << (32 - u32::from(p))),
    }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => a & (u128::MAX << (128 - u32::from(p))),
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid CIDR \"{s}\" (expected e.g. 10.0.0.0/8 or fd00::/8)");
        let t = s.trim();
        let (a, p) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr = IpAddr::from_str(a).map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|v| *v <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        let masked = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(v4), prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(v6), prefix))),
        };
        if masked != addr {
            // A typo here would silently widen or move the allow-list.
            return Err(format!(
                "invalid CIDR \"{s}\": host bits set (did you mean {masked}/{prefix}?)"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(sde::Error::custom)
    }
}

/// A secret string (password, client secret). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON unless stderr is a TTY.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// `logging:` (both binaries). `NOWCONNECT_LOG` / `RUST_LOG` override `level`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Log filter, env_logger syntax (`info`, `nowconnect_hub=debug`).
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_owned(),
            format: LogFormat::Auto,
        }
    }
}

impl LoggingConfig {
    /// Checks `level` is a plausible env_logger filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let ok = !self.level.trim().is_empty()
            && self.level.split(',').all(|d| {
                let d = d.trim();
                match d.split_once('=') {
                    Some((target, lvl)) => {
                        !target.is_empty() && LEVELS.contains(&lvl.to_ascii_lowercase().as_str())
                    }
                    // A bare word must be a level: `level: loud` is a typo, not a target.
                    None => LEVELS.contains(&d.to_ascii_lowercase().as_str()),
                }
            });
        if ok {
            Ok(())
        } else {
            Err(ConfigError::at(
                "logging.level",
                format!(
                    "invalid log filter \"{}\" (expected off, error, warn, info, debug, trace or target=level)",
                    self.level.escape_default()
                ),
            ))
        }
    }
}

/// `admin:` (both binaries): the loopback HTTP listener for /metrics, /healthz, /readyz.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address.
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
}

/// Shared limit checks (hub and agent): counts ≥ 1; 1 ≤ window ≤ max_window ≤ 2^31−1;
/// max_buffered ≥ window; 1KiB ≤ max_frame ≤ 16MiB and a full DATA frame fits in max_message.
pub fn validate_limits(
    at: &str,
    counts: &[(&str, u64)],
    window: u32,
    max_window: u32,
    max_buffered: u64,
    frame: Option<(u32, usize)>,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    for (k, v) in counts {
        if *v == 0 {
            return Err(ConfigError::at(key(k), "must be at least 1"));
        }
    }
    if window == 0 {
        return Err(ConfigError::at(key("window"), "must be greater than 0"));
    }
    if u64::from(max_window) > nowconnect_core::config::MAX_CREDIT {
        return Err(ConfigError::at(
            key("max_window"),
            format!(
                "{max_window} exceeds the protocol's credit limit of {} bytes",
                nowconnect_core::config::MAX_CREDIT
            ),
        ));
    }
    if window > max_window {
        return Err(ConfigError::at(
            key("window"),
            format!("window ({window}) is larger than max_window ({max_window})"),
        ));
    }
    if max_buffered < u64::from(window) {
        return Err(ConfigError::at(
            key("max_buffered"),
            format!("max_buffered ({max_buffered}) is smaller than window ({window})"),
        ));
    }
    if let Some((max_frame, max_message)) = frame {
        if !(1024..=16 * 1024 * 1024).contains(&max_frame) {
            return Err(ConfigError::at(
                key("max_frame"),
                format!("{max_frame} is out of range (1KiB to 16MiB)"),
            ));
        }
        // wire-protocol.md §2: header 9 bytes + DATA seq 4 bytes + payload.
        let need = max_frame as usize + nowconnect_core::frame::HEADER_LEN + 4;
        if max_message < need {
            return Err(ConfigError::at(
                key("max_message"),
                format!("max_message ({max_message}) cannot carry one full DATA frame of max_frame ({max_frame}): at least {need} needed"),
            ));
        }
        if max_message > 256 * 1024 * 1024 {
            return Err(ConfigError::at(
                key("max_message"),
                format!("{max_message} is too large (max 256MiB)"),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// serde adapters
// ---------------------------------------------------------------------------------------------

/// `deserialize_with` adapters. Each accepts the YAML scalar forms a person would write,
/// including strings produced by `${VAR}` expansion for numbers and booleans.
pub mod de {
    use super::*;

    /// A scalar as written.
    enum Scalar {
        Str(String),
        Int(i128),
        Float,
        Bool(bool),
    }

    struct ScalarVisitor(&'static str);

    impl Visitor<'_> for ScalarVisitor {
        type Value = Scalar;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: sde::Error>(self, v: &str) -> Result<Scalar, E> {
            Ok(Scalar::Str(v.to_owned()))
        }
        fn visit_string<E: sde::Error>(self, v: String) -> Result<Scalar, E> {
            Ok(Scalar::Str(v))
        }
        fn visit_i64<E: sde::Error>(self, v: i64) -> Result<Scalar, E> {
            Ok(Scalar::Int(v.into()))
        }
        fn visit_u64<E: sde::Error>(self, v: u64) -> Result<Scalar, E> {
            Ok(Scalar::Int(v.into()))
        }
        fn visit_f64<E: sde::Error>(self, _: f64) -> Result<Scalar, E> {
            Ok(Scalar::Float)
        }
        fn visit_bool<E: sde::Error>(self, v: bool) -> Result<Scalar, E> {
            Ok(Scalar::Bool(v))
        }
    }

    fn scalar<'de, D: Deserializer<'de>>(d: D, what: &'static str) -> Result<Scalar, D::Error> {
        d.deserialize_any(ScalarVisitor(what))
    }

    /// A duration (`10s`); the number `0` is accepted as zero.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match scalar(d, "a duration such as 500ms, 10s, 5m, 1h")? {
            Scalar::Str(s) => parse_duration(&s).map_err(sde::Error::custom),
            Scalar::Int(0) => Ok(Duration::ZERO),
            Scalar::Int(n) => Err(sde::Error::custom(format!(
                "invalid duration {n}: a unit is required (e.g. {n}s or {n}ms)"
            ))),
            _ => Err(sde::Error::custom(
                "expected a duration such as 500ms, 10s, 5m, 1h",
            )),
        }
    }

    /// A duration where `0` means disabled (`None`).
    pub fn duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v = duration(d)?;
        Ok((!v.is_zero()).then_some(v))
    }

    fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match scalar(d, "a size such as 65536, 64KiB, 1MiB")? {
            Scalar::Str(s) => parse_size(&s).map_err(sde::Error::custom),
            Scalar::Int(n) => {
                u64::try_from(n).map_err(|_| sde::Error::custom(format!("invalid size {n}")))
            }
            _ => Err(sde::Error::custom(
                "expected a size such as 65536, 64KiB, 1MiB",
            )),
        }
    }

    /// A size in bytes that fits in u32.
    pub fn size_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let v = size(d)?;
        u32::try_from(v)
            .map_err(|_| sde::Error::custom(format!("size {v} is too large (max 4GiB-1)")))
    }

    /// A size in bytes.
    pub fn size_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        size(d)
    }

    /// A size in bytes as usize.
    pub fn size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = size(d)?;
        usize::try_from(v).map_err(|_| sde::Error::custom(format!("size {v} is too large")))
    }

    /// A non-negative integer (or a string of digits, e.g. from `${VAR}`).
    pub fn count_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let n: i128 = match scalar(d, "a whole number")? {
            Scalar::Int(n) => n,
            Scalar::Str(s)
                if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.trim()
                    .parse()
                    .map_err(|_| sde::Error::custom(format!("invalid number \"{s}\"")))?
            }
            Scalar::Str(s) => return Err(sde::Error::custom(format!("invalid number \"{s}\""))),
            _ => return Err(sde::Error::custom("expected a whole number")),
        };
        u32::try_from(n).map_err(|_| sde::Error::custom(format!("number {n} is out of range")))
    }

    /// A boolean (or the strings `true` / `false`, e.g. from `${VAR}`).
    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match scalar(d, "true or false")? {
            Scalar::Bool(b) => Ok(b),
            Scalar::Str(s) if s.trim() == "true" => Ok(true),
            Scalar::Str(s) if s.trim() == "false" => Ok(false),
            Scalar::Str(s) => Err(sde::Error::custom(format!(
                "invalid boolean \"{s}\" (expected true or false)"
            ))),
            _ => Err(sde::Error::custom("expected true or false")),
        }
    }

    /// A percentage `80%` as a fraction.
    pub fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match scalar(d, "a percentage such as 80%")? {
            Scalar::Str(s) => parse_percent(&s).map_err(sde::Error::custom),
            _ => Err(sde::Error::custom("expected a percentage such as 80%")),
        }
    }

    /// A socket address `ip:port`.
    pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        match scalar(d, "a socket address such as 0.0.0.0:8443")? {
            Scalar::Str(s) => parse_socket_addr(&s).map_err(sde::Error::custom),
            _ => Err(sde::Error::custom(
                "expected a socket address such as 0.0.0.0:8443",
            )),
        }
    }

    /// A connector name (`[A-Za-z0-9._-]`, 1–64).
    pub fn connector_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        validate_connector_name(&s).map_err(sde::Error::custom)?;
        Ok(s)
    }

    /// A file name (non-empty).
    pub fn path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(sde::Error::custom("empty file name"));
        }
        Ok(PathBuf::from(s))
    }

    /// A section that may be written empty (`logging:` with every line commented out is
    /// `null`): `null` gives the default.
    pub fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// An optional file name (`null` or absent is `None`).
    pub fn opt_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.trim().is_empty() => Err(sde::Error::custom("empty file name")),
            Some(s) => Ok(Some(PathBuf::from(s))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PEM files
// ---------------------------------------------------------------------------------------------

fn pem_error(path: &Path, e: &pem::Error, secret: bool) -> String {
    match e {
        pem::Error::Io(io) => format!("cannot read {}: {io}", path.display()),
        pem::Error::NoItemsFound => {
            format!("{}: no PEM items of the expected kind", path.display())
        }
        // Other variants may quote a line of the file: never for key files.
        _ if secret => format!("{}: malformed PEM", path.display()),
        other => format!("{}: malformed PEM: {other}", path.display()),
    }
}

/// Reads a PEM certificate chain (one or more `CERTIFICATE` blocks).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, &e, false))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e, false))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE found", path.display()));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). Errors never quote the file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no private key found (expected PKCS#8, PKCS#1 or SEC1 PEM)",
            path.display()
        ),
        e => pem_error(path, &e, true),
    })
}

/// Reads CA certificates (PEM, one or more) and checks each is a CA: a v3 certificate must have
/// basicConstraints CA:TRUE (configuration.md: `ca_file` and `jwks_ca` hold CA certificates, not
/// server leaf certificates). Each must also be usable as a rustls trust anchor.
pub fn load_ca_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = load_certs(path)?;
    for (i, cert) in certs.iter().enumerate() {
        let n = i + 1;
        match ca_status(cert.as_ref()) {
            Ok(CaStatus::Ca | CaStatus::V1) => {}
            Ok(CaStatus::NotCa) => {
                return Err(format!(
                    "{}: certificate #{n} is not a CA certificate (basicConstraints CA:FALSE or absent): put the issuing CA here, not a server certificate",
                    path.display()
                ))
            }
            Err(why) => {
                return Err(format!(
                    "{}: certificate #{n} cannot be parsed ({why})",
                    path.display()
                ))
            }
        }
        let mut store = rustls::RootCertStore::empty();
        store.add(cert.clone()).map_err(|e| {
            format!(
                "{}: certificate #{n} is not a usable trust anchor: {e}",
                path.display()
            )
        })?;
    }
    Ok(certs)
}

/// Whether a DER certificate is a CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaStatus {
    /// basicConstraints with cA TRUE.
    Ca,
    /// A v1/v2 certificate (no extensions): legacy roots, accepted.
    V1,
    /// A v3 certificate without basicConstraints cA TRUE.
    NotCa,
}

/// Minimal DER reader: enough of X.509 to find basicConstraints. Every length is checked
/// against the remaining input before use.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// Reads one TLV: (tag, contents).
    fn next(&mut self) -> Result<(u8, &'a [u8]), &'static str> {
        let b = self.0;
        if b.len() < 2 {
            return Err("truncated");
        }
        let tag = b[0];
        let (len, hdr) = match b[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81..=0x84 => {
                let n = usize::from(b[1] & 0x7f);
                if b.len() < 2 + n {
                    return Err("truncated");
                }
                let len = b[2..2 + n]
                    .iter()
                    .fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
                (len, 2 + n)
            }
            _ => return Err("bad length"),
        };
        let end = hdr.checked_add(len).ok_or("bad length")?;
        if b.len() < end {
            return Err("truncated");
        }
        self.0 = &b[end..];
        Ok((tag, &b[hdr..end]))
    }
}

/// Reads basicConstraints from a DER certificate.
pub fn ca_status(der: &[u8]) -> Result<CaStatus, &'static str> {
    const SEQ: u8 = 0x30;
    const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13]; // 2.5.29.19
    let (tag, cert) = Der(der).next()?;
    if tag != SEQ {
        return Err("not a certificate");
    }
    let (tag, tbs) = Der(cert).next()?;
    if tag != SEQ {
        return Err("not a certificate");
    }
    let mut fields = Der(tbs);
    while !fields.0.is_empty() {
        let (tag, body) = fields.next()?;
        if tag != 0xa3 {
            continue; // not [3] extensions
        }
        let (tag, exts) = Der(body).next()?;
        if tag != SEQ {
            return Err("bad extensions");
        }
        let mut exts = Der(exts);
        while !exts.0.is_empty() {
            let (tag, ext) = exts.next()?;
            if tag != SEQ {
                return Err("bad extension");
            }
            let mut ext = Der(ext);
            let (tag, oid) = ext.next()?;
            if tag != 0x06 || oid != BASIC_CONSTRAINTS {
                continue;
            }
            let (mut tag, mut value) = ext.next()?;
            if tag == 0x01 {
                (tag, value) = ext.next()?; // skip `critical`
            }
            if tag != 0x04 {
                return Err("bad basicConstraints");
            }
            let (tag, bc) = Der(value).next()?;
            if tag != SEQ {
                return Err("bad basicConstraints");
            }
            let mut bc = Der(bc);
            if bc.0.is_empty() {
                return Ok(CaStatus::NotCa); // cA DEFAULT FALSE
            }
            let (tag, ca) = bc.next()?;
            return Ok(if tag == 0x01 && ca.first().is_some_and(|b| *b != 0) {
                CaStatus::Ca
            } else {
                CaStatus::NotCa
            });
        }
        return Ok(CaStatus::NotCa);
    }
    Ok(CaStatus::V1)
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run (or, with `check`, validate) with this config file.
    Run(Cli),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// `--config FILE [--check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// The config file (from `--config`, else `$NOWCONNECT_CONFIG`).
    pub config: PathBuf,
    /// `--check`: validate, print `ok`, exit.
    pub check: bool,
}

/// A bad command line (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after the program name. `env_config` is `$NOWCONNECT_CONFIG`.
/// Accepts `--config FILE`, `--config=FILE`, `-c FILE`, `--check`, `--help`/`-h`,
/// `--version`/`-V`. `--help` and `--version` win over everything else.
pub fn parse_args<I>(args: I, env_config: Option<OsString>) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut config: Option<PathBuf> = None;
    let mut check = false;
    let mut help = false;
    let mut version = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(s) = arg.to_str() else {
            return Err(UsageError(format!(
                "unexpected argument {}",
                arg.to_string_lossy()
            )));
        };
        match s {
            "--config" | "-c" => {
                let v = args
                    .next()
                    .ok_or_else(|| UsageError("--config needs a file name".to_owned()))?;
                if config.replace(PathBuf::from(v)).is_some() {
                    return Err(UsageError("--config given twice".to_owned()));
                }
            }
            "--check" => check = true,
            "--help" | "-h" => help = true,
            "--version" | "-V" => version = true,
            _ => {
                if let Some(v) = s.strip_prefix("--config=") {
                    if config.replace(PathBuf::from(v)).is_some() {
                        return Err(UsageError("--config given twice".to_owned()));
                    }
                } else {
                    return Err(UsageError(format!("unexpected argument {s}")));
                }
            }
        }
    }
    if help {
        return Ok(Command::Help);
    }
    if version {
        return Ok(Command::Version);
    }
    let config = match config.or_else(|| env_config.filter(|v| !v.is_empty()).map(PathBuf::from)) {
        Some(c) if !c.as_os_str().is_empty() => c,
        _ => {
            return Err(UsageError(format!(
                "no configuration file: use --config FILE or set {CONFIG_ENV}"
            )))
        }
    };
    Ok(Command::Run(Cli { config, check }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_round_trip() {
        let p = KeyPath::parse("connectors[1].listen");
        assert_eq!(
            p.segments(),
            &[
                Segment::Key("connectors".into()),
                Segment::Index(1),
                Segment::Key("listen".into())
            ]
        );
        assert_eq!(p.to_string(), "connectors[1].listen");
    }

    #[test]
    fn locate_lines() {
        let text = "a: 1\nconnectors:\n  - name: x\n    listen: 1\n  - name: y\n    listen: bad\n";
        assert_eq!(locate_line(text, &"connectors[1].listen".into()), Some(6));
        assert_eq!(locate_line(text, &"connectors[0].name".into()), Some(3));
        assert_eq!(locate_line(text, &"connectors[1]".into()), Some(5));
        assert_eq!(locate_line(text, &"nope".into()), None);
    }

    #[test]
    fn cidr() {
        let c: Cidr = "10.0.0.0/8".parse().expect("valid");
        assert!(c.contains("10.2.3.4".parse().expect("ip")));
        assert!(c.contains("::ffff:10.2.3.4".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!("10.0.0.1/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
    }
}
