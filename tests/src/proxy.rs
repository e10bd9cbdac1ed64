//! A real HTTP CONNECT proxy (tinyproxy) on loopback: the "corporate proxy" an agent dials
//! through.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::{Proc, START_TIMEOUT};

/// tinyproxy in the foreground (`-d`) allowing CONNECT to any port, optionally requiring Basic
/// auth (a wrong or missing `Proxy-Authorization` gets 407).
pub struct Tinyproxy {
    pub addr: SocketAddr,
    pub basic_auth: Option<(String, String)>,
    pub proc: Proc,
}

impl Tinyproxy {
    pub fn start(dir: &Path, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let root = dir.join("tinyproxy");
        std::fs::create_dir_all(&root).expect("create tinyproxy dir");
        let addr = crate::free_addr();
        // No ConnectPort line: CONNECT to every port is allowed. No LogFile/Syslog: the log goes
        // to stdout, i.e. the Proc log. No Allow line: every (loopback) client is allowed.
        let mut conf = format!(
            "Port {}\nListen 127.0.0.1\nTimeout 120\nMaxClients 200\nLogLevel Connect\n\
             DisableViaHeader Yes\n",
            addr.port()
        );
        if crate::is_root() {
            // tinyproxy drops root; without User/Group it refuses to start as root.
            conf += "User nobody\nGroup nogroup\n";
        }
        if let Some((user, password)) = basic_auth {
            conf += &format!("BasicAuth {user} {password}\n");
        }
        let conf_path = root.join("tinyproxy.conf");
        crate::write_file(&conf_path, conf, 0o644);
        let mut cmd = Command::new("tinyproxy");
        cmd.arg("-d").arg("-c").arg(&conf_path);
        let mut proc = Proc::spawn("tinyproxy", cmd, dir);
        proc.wait_for_port(addr, START_TIMEOUT);
        Tinyproxy {
            addr,
            basic_auth: basic_auth.map(|(u, p)| (u.to_string(), p.to_string())),
            proc,
        }
    }

    /// `http://127.0.0.1:<port>` (no credentials).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    /// `http://user:password@127.0.0.1:<port>` when Basic auth is on, else [`Self::url`].
    pub fn url_with_auth(&self) -> String {
        match &self.basic_auth {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.addr.port()),
            None => self.url(),
        }
    }
}
