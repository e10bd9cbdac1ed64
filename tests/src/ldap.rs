//! A real OpenLDAP `slapd` on loopback, and the `ldapsearch`/`ldapadd` clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_cmd, CmdOutput, Proc, TlsFiles, CMD_TIMEOUT, START_TIMEOUT};

pub const LDAP_BASE_DN: &str = "dc=example,dc=com";
/// The database's rootdn: can read and write everything.
pub const LDAP_BIND_DN: &str = "cn=admin,dc=example,dc=com";
pub const LDAP_BIND_PW: &str = "admin-secret";

/// What the directory holds at start: `uid=alice` and `uid=bob` under `ou=people` (alice's
/// password is `alice-pw`, so she can bind too) and `cn=engineers` under `ou=groups`.
const SEED_LDIF: &str = "\
dn: dc=example,dc=com
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=com
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=com
objectClass: organizationalUnit
ou: groups

dn: uid=alice,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: alice
cn: Alice Example
sn: Example
mail: alice@example.com
userPassword: alice-pw

dn: uid=bob,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: bob
cn: Bob Example
sn: Example
mail: bob@example.com

dn: cn=engineers,ou=groups,dc=example,dc=com
objectClass: groupOfNames
cn: engineers
member: uid=alice,ou=people,dc=example,dc=com
member: uid=bob,ou=people,dc=example,dc=com
";

/// slapd with a throwaway `slapd.conf`: one mdb database `dc=example,dc=com` seeded with alice,
/// bob and the engineers group, plain LDAP on [`Slapd::ldap`] and, given TLS files, LDAPS on
/// [`Slapd::ldaps`]. Runs as the current user in the foreground (`-d`), logging to its
/// [`Proc`] log.
pub struct Slapd {
    pub ldap: SocketAddr,
    pub ldaps: Option<SocketAddr>,
    /// The CA that verifies the LDAPS certificate, when TLS is on.
    pub ca: Option<PathBuf>,
    pub proc: Proc,
    /// `slapd.conf`, the `-h` URLs and the log directory, for [`Slapd::restart`].
    conf_path: PathBuf,
    urls: String,
    log_dir: PathBuf,
    starts: u32,
}

impl Slapd {
    pub fn start(dir: &Path, tls: Option<&TlsFiles>) -> Slapd {
        let root = dir.join("slapd");
        let db = root.join("db");
        std::fs::create_dir_all(&db).expect("create slapd dir");
        let ldap = crate::free_addr();
        let ldaps = tls.map(|_| crate::free_addr());

        let mut conf = String::new();
        for schema in ["core", "cosine", "inetorgperson", "nis"] {
            conf += &format!("include /etc/ldap/schema/{schema}.schema\n");
        }
        conf += &format!(
            "pidfile {root}/slapd.pid\nargsfile {root}/slapd.args\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\n",
            root = root.display()
        );
        if let Some(t) = tls {
            conf += &format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            );
        }
        conf += &format!(
            "database mdb\nmaxsize 268435456\nsuffix \"{LDAP_BASE_DN}\"\n\
             rootdn \"{LDAP_BIND_DN}\"\nrootpw {LDAP_BIND_PW}\ndirectory {db}\n\
             index objectClass eq\nindex uid eq\n\
             access to attrs=userPassword by self write by anonymous auth by * none\n\
             access to * by * read\n",
            db = db.display()
        );
        let conf_path = root.join("slapd.conf");
        crate::write_file(&conf_path, &conf, 0o600);
        let seed = root.join("seed.ldif");
        crate::write_file(&seed, SEED_LDIF, 0o644);

        let mut add = Command::new(slap_tool("slapadd"));
        add.arg("-f").arg(&conf_path).arg("-l").arg(&seed);
        let added = run_cmd(add, None, CMD_TIMEOUT);
        assert!(
            added.success(),
            "slapadd failed:\n{added}\n--- slapd.conf ---\n{conf}"
        );

        let mut urls = format!("ldap://127.0.0.1:{}/", ldap.port());
        if let Some(a) = ldaps {
            urls += &format!(" ldaps://127.0.0.1:{}/", a.port());
        }
        let proc = spawn_slapd("slapd", &urls, &conf_path, dir, ldap, ldaps);
        Slapd {
            ldap,
            ldaps,
            ca: tls.map(|t| t.ca.clone()),
            proc,
            conf_path,
            urls,
            log_dir: dir.to_path_buf(),
            starts: 1,
        }
    }

    /// Stops slapd (SIGTERM, then SIGKILL after 5 s); its ports stop accepting.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts slapd again on the same ports and database (after [`Slapd::stop`]) and waits
    /// until it accepts. The log of start `n` is `slapd-<n>.log`.
    pub fn restart(&mut self) {
        assert!(!self.proc.is_running(), "slapd still running");
        self.starts += 1;
        let name = format!("slapd-{}", self.starts);
        self.proc = spawn_slapd(
            &name,
            &self.urls,
            &self.conf_path,
            &self.log_dir,
            self.ldap,
            self.ldaps,
        );
    }

    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.ldap.port())
    }

    /// `ldaps://localhost:<port>` (the name the test certificate carries), when TLS is on.
    pub fn ldaps_url(&self) -> Option<String> {
        self.ldaps
            .map(|a| format!("ldaps://localhost:{}", a.port()))
    }

    /// `ldapsearch` as the rootdn over plain LDAP, straight to this server.
    pub fn search(&self, filter: &str) -> CmdOutput {
        ldapsearch(&self.ldap_url(), None, filter)
    }
}

fn spawn_slapd(
    name: &str,
    urls: &str,
    conf_path: &Path,
    log_dir: &Path,
    ldap: SocketAddr,
    ldaps: Option<SocketAddr>,
) -> Proc {
    let mut cmd = Command::new(slap_tool("slapd"));
    // -d keeps slapd in the foreground; 256 = "stats" (connections, operations, results).
    cmd.args(["-d", "256", "-h", urls]).arg("-f").arg(conf_path);
    let mut proc = Proc::spawn(name, cmd, log_dir);
    proc.wait_for_port(ldap, START_TIMEOUT);
    if let Some(a) = ldaps {
        proc.wait_for_port(a, START_TIMEOUT);
    }
    proc
}

/// `ldapsearch -x` bound as [`LDAP_BIND_DN`] under [`LDAP_BASE_DN`] at `url` (ldap:// or
/// ldaps://, e.g. a hub connector's listener). For ldaps, `ca_file` is the only trusted CA and the
/// certificate and host name are verified (`LDAPTLS_REQCERT=demand`). Output is LDIF.
pub fn ldapsearch(url: &str, ca_file: Option<&Path>, filter: &str) -> CmdOutput {
    let mut cmd = ldap_client("ldapsearch", url, ca_file);
    cmd.args(["-LLL", "-b", LDAP_BASE_DN, "-l", "20", filter]);
    run_cmd(cmd, None, CMD_TIMEOUT)
}

/// `ldapadd -x` bound as [`LDAP_BIND_DN`], entries from `ldif`.
pub fn ldapadd(url: &str, ca_file: Option<&Path>, ldif: &str) -> CmdOutput {
    let cmd = ldap_client("ldapadd", url, ca_file);
    run_cmd(cmd, Some(ldif.as_bytes()), CMD_TIMEOUT)
}

fn ldap_client(tool: &str, url: &str, ca_file: Option<&Path>) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-x", "-H", url, "-D", LDAP_BIND_DN, "-w", LDAP_BIND_PW])
        .args(["-o", "nettimeout=10"])
        // Ignore /etc/ldap/ldap.conf and ~/.ldaprc: only what the test says counts.
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/nonexistent-nowconnect-ldaprc")
        .env("LDAPTLS_REQCERT", "demand");
    match ca_file {
        Some(ca) => {
            cmd.env("LDAPTLS_CACERT", ca);
        }
        // Without a CA nothing verifies: an empty CA file makes ldaps fail rather than fall
        // back to the system store.
        None => {
            cmd.env("LDAPTLS_CACERT", "/dev/null");
        }
    }
    cmd
}

/// slapd and its tools live in /usr/sbin, which a non-root PATH may lack.
fn slap_tool(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}
