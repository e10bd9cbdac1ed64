//! A real PostgreSQL server on loopback (its own throwaway cluster), and a `psql` helper.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_cmd, CmdOutput, Proc, TlsFiles, CMD_TIMEOUT, START_TIMEOUT};

/// A cluster made by `initdb` in `<dir>/pg` (trust auth, superuser `postgres`), served by
/// `postgres` on 127.0.0.1:<free port> with its Unix socket in the same directory.
///
/// postgres refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user
/// (created by the Debian package) and `<dir>` is made traversable (mode |= 0o711) for it.
pub struct Postgres {
    pub addr: SocketAddr,
    /// The CA that verifies the server certificate, when started with TLS.
    pub ca: Option<PathBuf>,
    pub proc: Proc,
}

impl Postgres {
    pub fn start(dir: &Path) -> Postgres {
        Postgres::start_inner(dir, None)
    }

    /// Like [`Postgres::start`] with `ssl=on` and the given certificate (clients can then use
    /// [`psql_tls`] with `sslmode=verify-full`).
    pub fn start_tls(dir: &Path, tls: &TlsFiles) -> Postgres {
        Postgres::start_inner(dir, Some(tls))
    }

    fn start_inner(dir: &Path, tls: Option<&TlsFiles>) -> Postgres {
        let bin = pg_bin_dir();
        let owner = if crate::is_root() {
            Some(postgres_ids())
        } else {
            None
        };
        let root = dir.join("pg");
        let data = root.join("data");
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock).expect("create pg dirs");
        if let Some((uid, gid)) = owner {
            let mode = std::fs::metadata(dir)
                .expect("stat dir")
                .permissions()
                .mode();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
                .expect("chmod dir");
            for p in [&root, &sock] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown pg dir");
            }
        }
        let as_owner = |cmd: &mut Command| {
            if let Some((uid, gid)) = owner {
                cmd.uid(uid)
                    .gid(gid)
                    .env("HOME", &root)
                    .env("USER", "postgres");
            }
            cmd.current_dir(&root)
                .env("LC_ALL", "C")
                .env_remove("PGDATA");
        };

        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        as_owner(&mut initdb);
        run_cmd(initdb, None, std::time::Duration::from_secs(120)).assert_success();

        let addr = crate::free_addr();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &addr.port().to_string()])
            .arg("-k")
            .arg(&sock);
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=200",
            "shared_buffers=32MB",
            "log_connections=on",
            "log_disconnections=on",
        ] {
            cmd.args(["-c", setting]);
        }
        if let Some(t) = tls {
            // postgres wants the key private to its own user.
            let cert = root.join("server.pem");
            let key = root.join("server.key");
            crate::write_file(&cert, &t.cert_pem, 0o644);
            crate::write_file(&key, &t.key_pem, 0o600);
            if let Some((uid, gid)) = owner {
                for p in [&cert, &key] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown pg key");
                }
            }
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        as_owner(&mut cmd);
        let mut proc = Proc::spawn("postgres", cmd, dir);
        // SIGINT = "fast" shutdown: SIGTERM ("smart") would wait for clients to disconnect.
        proc.set_stop_signal("INT");
        proc.wait_for_port(addr, START_TIMEOUT);
        Postgres {
            addr,
            ca: tls.map(|t| t.ca.clone()),
            proc,
        }
    }

    /// [`psql`] straight to this server.
    pub fn query(&self, sql: &str) -> CmdOutput {
        psql(self.addr, sql)
    }
}

/// `psql -XAtq -v ON_ERROR_STOP=1 -c SQL` as `postgres` on database `postgres` at `addr` (this
/// server, or a tunnel listener in front of it). Output is unaligned, tuples only.
pub fn psql(addr: SocketAddr, sql: &str) -> CmdOutput {
    psql_conninfo(
        &format!(
            "host={} port={} user=postgres dbname=postgres sslmode=prefer",
            addr.ip(),
            addr.port()
        ),
        sql,
    )
}

/// [`psql`] over TLS with `sslmode=verify-full` against `ca`, to host name `localhost`.
pub fn psql_tls(addr: SocketAddr, ca: &Path, sql: &str) -> CmdOutput {
    psql_conninfo(
        &format!(
            "host=localhost hostaddr={} port={} user=postgres dbname=postgres \
             sslmode=verify-full sslrootcert={}",
            addr.ip(),
            addr.port(),
            ca.display()
        ),
        sql,
    )
}

fn psql_conninfo(conninfo: &str, sql: &str) -> CmdOutput {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "10")
    .env_remove("PGPASSWORD")
    .env_remove("PGSERVICE");
    run_cmd(cmd, None, CMD_TIMEOUT)
}

/// `$PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin` (Debian keeps initdb and
/// postgres there, off PATH).
fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((major, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no /usr/lib/postgresql/<major>/bin/initdb: install postgresql (see .ci/run)")
}

/// uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let mut cmd = Command::new("id");
        cmd.args([flag, "postgres"]);
        let out = run_cmd(cmd, None, CMD_TIMEOUT);
        assert!(
            out.success(),
            "no postgres user (install postgresql):\n{out}"
        );
        out.stdout.trim().parse().expect("numeric id")
    };
    (id("-u"), id("-g"))
}
