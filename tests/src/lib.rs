//! End-to-end test support (see tests/tests/).
//!
//! Fixtures that run the real `nowconnect-hub` / `nowconnect-agent` binaries and the real servers
//! the tunnel carries, all on loopback:
//!
//! | need | use |
//! |---|---|
//! | the built binaries | [`bin_path`] (builds them once per test process when missing or stale) |
//! | ports | [`free_port`], [`free_addr`], [`wait_for_port`] |
//! | a child process | [`Proc`]: log captured to a file, killed with its process group on drop, log dumped when the test panics |
//! | a command with a deadline | [`run_cmd`] → [`CmdOutput`]; [`curl`] (proxy env cleared) |
//! | scratch space | [`temp_dir`] (`NOWCONNECT_KEEP_TEMP=1` keeps it) |
//! | TLS | [`TestCa`], [`TlsFiles::localhost`] |
//! | JWT / JWKS | [`JwtKey`], [`JwtKeys`] |
//! | an HTTPS JWKS endpoint (IdP) to swap keys in and take down | [`idp::Idp`] |
//! | a plain TCP echo target | [`echo_server`] |
//! | servers | [`Slapd`], [`Sshd`], [`Postgres`], [`Tinyproxy`], [`HttpStub`] (plain or TLS) |
//! | a policy decision point | [`pdp::FakePdp`] (programmable allow/deny/delay/hold/down, request log) |
//! | hub + agent wired together | [`tunnel::Tunnel`] (configs, keys, token written; started and waited for) |
//! | more agents on one hub | [`tunnel::Tunnel::extra_agent`] |
//! | a hand-driven rogue agent or hub (raw frames, close codes) | [`rogue::RawPeer`], [`rogue::RogueHub`] |
//!
//! Fixture constructors panic with the server's log when it does not come up: they are for tests,
//! where a panic with context is the most useful failure.

mod bins;
mod cmd;
mod http;
pub mod idp;
mod jwt;
mod ldap;
pub mod pdp;
mod ports;
mod postgres;
mod process;
pub mod prom;
mod proxy;
pub mod rogue;
mod ssh;
mod tls;
pub mod token_endpoint;
pub mod tunnel;

pub use bins::{bin_path, workspace_root};
pub use cmd::{curl, run_cmd, CmdOutput};
pub use http::{HttpStub, StubRequest, StubResponse};
pub use jwt::{now_secs, JwtKey, JwtKeys};
pub use ldap::{ldapadd, ldapsearch, Slapd, LDAP_BASE_DN, LDAP_BIND_DN, LDAP_BIND_PW};
pub use ports::{free_addr, free_port, wait_for_port};
pub use postgres::{psql, psql_tls, Postgres};
pub use process::Proc;
pub use proxy::Tinyproxy;
pub use ssh::Sshd;
pub use tls::{TestCa, TlsFiles};

use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

/// Default deadline for a client command (ldapsearch, ssh, psql, curl) in the fixtures.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Default deadline for a server fixture to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh temporary directory, removed on drop unless `NOWCONNECT_KEEP_TEMP` is set (then its
/// path is printed so a failed run can be inspected).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let keep = std::env::var_os("NOWCONNECT_KEEP_TEMP").is_some_and(|v| !v.is_empty());
    let dir = tempfile::Builder::new()
        .prefix(&format!("nc-{prefix}-"))
        .disable_cleanup(keep)
        .tempdir()
        .expect("create temp dir");
    if keep {
        eprintln!("[fixtures] keeping temp dir {}", dir.path().display());
    }
    dir
}

/// Writes `contents` to `path` with the given Unix mode, panicking with the path on failure.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Polls `cond` every 20 ms until it is true or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when this process runs as root (CI does; the fixtures then drop privileges where a
/// server refuses root, e.g. postgres).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loopback echo target, one thread per connection; on EOF it shuts down its write half (the
/// peer's FIN comes back as ours). Health checks that connect and close are shrugged off.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(free_addr()).expect("bind echo server");
    let addr = listener.local_addr().expect("echo server addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}
