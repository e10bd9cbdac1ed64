//! Locating (and if needed building) the workspace's binaries.
//!
//! `CARGO_BIN_EXE_*` only exists for binaries of the package under test, and the hub and agent
//! are other packages, so the binaries are found next to the running test executable
//! (`<target>/<profile>/deps/<test>` → `<target>/<profile>/`), which follows `CARGO_TARGET_DIR`,
//! `--target-dir`, `--release`/`--profile` and `--target` without reading any of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The binaries [`bin_path`] serves (one per package of the same name).
const PACKAGES: &[&str] = &["nowconnect-hub", "nowconnect-agent"];

/// Sources whose change makes the binaries stale (relative to the workspace root).
const SOURCE_DIRS: &[&str] = &["core", "runtime-threads", "hub", "agent"];

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// Absolute path of a workspace binary, e.g. `bin_path("nowconnect-hub")`.
///
/// The first call in a test process runs `cargo build --workspace --bins` (same profile, target
/// dir and target triple as the test) when a binary is missing or older than the sources, so
/// `cargo test -p nowconnect-tests` never runs a stale hub. `--workspace` matters: it resolves
/// features like the README's `cargo test --workspace` (checked: each is fresh after the other),
/// whereas `cargo build -p nowconnect-hub` resolves them differently and would rebuild the whole
/// dependency tree once more. After `cargo test --workspace` the binaries are fresh and nothing
/// runs.
///
/// `NOWCONNECT_BIN_DIR=<dir>` skips all of that and uses `<dir>/<name>`.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary {} not found (built: {PACKAGES:?})",
        path.display()
    );
    path
}

fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("NOWCONNECT_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let layout = Layout::of_current_exe();
        if !layout.fresh() {
            layout.build();
        }
        layout.profile_dir
    })
}

/// Where cargo put the running test, and so where the binaries go.
struct Layout {
    /// `<target>/[<triple>/]<profile>`
    profile_dir: PathBuf,
    target_dir: PathBuf,
    triple: Option<String>,
    profile: String,
}

impl Layout {
    fn of_current_exe() -> Layout {
        let exe = std::env::current_exe().expect("path of the test executable");
        // <target>/[<triple>/]<profile>/deps/<test-hash>
        let from_exe = exe
            .parent()
            .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            // A binary of this package (the demo) sits in the profile dir itself, beside deps/.
            .or_else(|| {
                exe.parent()
                    .filter(|dir| dir.join("deps").is_dir())
                    .map(Path::to_path_buf)
            });
        let profile_dir = from_exe.unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug")
        });
        let profile = profile_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "debug".into());
        let parent = profile_dir
            .parent()
            .expect("profile dir has a parent")
            .to_path_buf();
        // Cargo tags the root of every target dir; one level lower means a --target triple.
        let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
            (parent, None)
        } else {
            let root = parent
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or(parent.clone());
            let triple = parent.file_name().map(|n| n.to_string_lossy().into_owned());
            (root, triple)
        };
        Layout {
            profile_dir,
            target_dir,
            triple,
            profile,
        }
    }

    /// Every binary exists and is newer than every source file and Cargo.lock.
    fn fresh(&self) -> bool {
        let oldest_bin = PACKAGES
            .iter()
            .map(|p| modified(&self.profile_dir.join(p)))
            .min()
            .flatten();
        let Some(oldest_bin) = oldest_bin else {
            return false;
        };
        let root = workspace_root();
        let mut newest_src =
            modified(&root.join("Cargo.lock")).max(modified(&root.join("Cargo.toml")));
        for dir in SOURCE_DIRS {
            newest_src = newest_src.max(newest_in(&root.join(dir)));
        }
        newest_src.is_none_or(|src| src <= oldest_bin)
    }

    fn build(&self) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--workspace", "--bins"])
            .arg("--target-dir")
            .arg(&self.target_dir);
        match self.profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        if let Some(triple) = &self.triple {
            cmd.args(["--target", triple]);
        }
        // Drop what cargo set for this test run (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...): build
        // scripts such as ring's declare rerun-if-env-changed on them, so passing them on would
        // rerun those scripts here and make the outer `cargo test` rebuild everything next time.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            let set_by_cargo_for_tests = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || key.starts_with("CARGO_CFG_")
                || matches!(
                    key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                );
            if set_by_cargo_for_tests {
                cmd.env_remove(key);
            }
        }
        eprintln!("[fixtures] building binaries: {cmd:?}");
        let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({})\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Newest mtime of any file under `dir` (Cargo.toml, src/, build.rs, ...); skips `target`.
fn newest_in(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return None;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            if entry.file_name() != "target" {
                newest = newest.max(newest_in(&path));
            }
        } else {
            newest = newest.max(modified(&path));
        }
    }
    newest
}
