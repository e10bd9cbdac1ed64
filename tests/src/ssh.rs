//! A real OpenSSH `sshd` on loopback, and `ssh`/`scp` clients with a generated key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_cmd, CmdOutput, Proc, CMD_TIMEOUT, START_TIMEOUT};

/// sshd in the foreground (`-D -e`) with its own config, host key and authorized client key;
/// logs in as the current user (root in CI) with public-key auth only.
pub struct Sshd {
    pub addr: SocketAddr,
    /// Private key the server authorizes (mode 0600, no passphrase).
    pub client_key: PathBuf,
    /// The login user (the user running the tests).
    pub user: String,
    pub proc: Proc,
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        let root = dir.join("sshd");
        std::fs::create_dir_all(&root).expect("create sshd dir");
        // Privilege-separation directory that sshd checks for at start (root only).
        if crate::is_root() {
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        }
        let host_key = root.join("ssh_host_ed25519_key");
        let client_key = root.join("id_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        let authorized = root.join("authorized_keys");
        let pubkey = std::fs::read_to_string(client_key.with_extension("pub"))
            .expect("read client public key");
        crate::write_file(&authorized, pubkey, 0o600);

        let addr = crate::free_addr();
        let conf = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {root}/sshd.pid\n\
             AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n\
             MaxStartups 100:30:200\nMaxSessions 100\nLogLevel VERBOSE\n",
            port = addr.port(),
            host_key = host_key.display(),
            root = root.display(),
            authorized = authorized.display(),
        );
        let conf_path = root.join("sshd_config");
        crate::write_file(&conf_path, conf, 0o600);

        // sshd re-executes itself and so insists on an absolute path.
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(&conf_path);
        let mut proc = Proc::spawn("sshd", cmd, dir);
        proc.wait_for_port(addr, START_TIMEOUT);
        Sshd {
            addr,
            client_key,
            user: current_user(),
            proc,
        }
    }

    /// Options shared by ssh and scp: the generated key only, no host-key check, no config
    /// files, no prompts, bounded connect time.
    fn client_opts(&self, cmd: &mut Command) {
        cmd.arg("-i").arg(&self.client_key).args([
            "-F",
            "/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
        ]);
    }

    /// `ssh -p PORT ... USER@IP COMMAND` against `addr` (this server, or a tunnel listener in
    /// front of it).
    pub fn ssh(&self, addr: SocketAddr, command: &str) -> CmdOutput {
        self.ssh_stdin(addr, command, None)
    }

    /// [`Self::ssh`] with bytes fed to the remote command's stdin.
    pub fn ssh_stdin(&self, addr: SocketAddr, command: &str, stdin: Option<&[u8]>) -> CmdOutput {
        let mut cmd = Command::new("ssh");
        self.client_opts(&mut cmd);
        cmd.args(["-p", &addr.port().to_string()])
            .arg(format!("{}@{}", self.user, addr.ip()))
            .arg(command);
        run_cmd(cmd, stdin, CMD_TIMEOUT)
    }

    /// `scp -P PORT ... LOCAL USER@IP:REMOTE` (upload).
    pub fn scp_to(&self, addr: SocketAddr, local: &Path, remote: &Path) -> CmdOutput {
        let target = format!("{}@{}:{}", self.user, addr.ip(), remote.display());
        self.scp(addr, local.as_os_str(), target.as_ref())
    }

    /// `scp -P PORT ... USER@IP:REMOTE LOCAL` (download).
    pub fn scp_from(&self, addr: SocketAddr, remote: &Path, local: &Path) -> CmdOutput {
        let source = format!("{}@{}:{}", self.user, addr.ip(), remote.display());
        self.scp(addr, source.as_ref(), local.as_os_str())
    }

    fn scp(&self, addr: SocketAddr, from: &std::ffi::OsStr, to: &std::ffi::OsStr) -> CmdOutput {
        let mut cmd = Command::new("scp");
        cmd.arg("-q");
        self.client_opts(&mut cmd);
        cmd.args(["-P", &addr.port().to_string()]).arg(from).arg(to);
        run_cmd(cmd, None, CMD_TIMEOUT)
    }
}

fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "nowconnect-test",
        "-f",
    ])
    .arg(path);
    run_cmd(cmd, None, CMD_TIMEOUT).assert_success();
}

fn current_user() -> String {
    let mut cmd = Command::new("id");
    cmd.arg("-un");
    let out = run_cmd(cmd, None, CMD_TIMEOUT).assert_success();
    out.stdout.trim().to_string()
}
