//! Test PKI: a CA and the leaf certificates it issues, as PEM strings and files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The names a local server certificate covers: what tests dial (`localhost`, `127.0.0.1`).
pub const LOCALHOST_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A certificate authority (ECDSA P-256) that lives for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "NowConnect tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) {
        crate::write_file(path, &self.cert_pem, 0o644);
    }

    /// Issues a leaf certificate (CA:FALSE — rustls rejects CA:TRUE server certificates) for
    /// `names` (DNS names or IP addresses; the first is also the CN). Returns (cert PEM, PKCS#8
    /// key PEM).
    pub fn issue(&self, names: &[&str], server: bool, client: bool) -> (String, String) {
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        if let Some(cn) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *cn);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        // ECDSA keys only sign (keyEncipherment would be an RSA-only usage).
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a server certificate for `names` and writes `<name>-ca.pem`, `<name>.pem`,
    /// `<name>.key` (0600) into `dir`.
    pub fn server_files(&self, dir: &Path, name: &str, names: &[&str]) -> TlsFiles {
        let (cert, key) = self.issue(names, true, false);
        TlsFiles::write(dir, name, &self.cert_pem, cert, key)
    }

    /// Issues a client certificate (CN `common_name`) and writes it like [`Self::server_files`].
    pub fn client_files(&self, dir: &Path, name: &str, common_name: &str) -> TlsFiles {
        let (cert, key) = self.issue(&[common_name], false, true);
        TlsFiles::write(dir, name, &self.cert_pem, cert, key)
    }
}

/// A certificate, its key and the CA that issued it, as files (and the same PEM in memory).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The issuing CA certificate (what a client trusts).
    pub ca: PathBuf,
    /// The leaf certificate.
    pub cert: PathBuf,
    /// The leaf's PKCS#8 private key (mode 0600).
    pub key: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsFiles {
    /// A new CA and a server certificate for localhost / 127.0.0.1 / ::1 and this machine's
    /// host name, written as `server-ca.pem`, `server.pem`, `server.key` in `dir`.
    ///
    /// The host name is there because OpenLDAP's client library checks `ldaps://localhost`
    /// against the machine's host name, not against "localhost".
    pub fn localhost(dir: &Path) -> TlsFiles {
        let mut names: Vec<String> = LOCALHOST_NAMES.iter().map(|n| n.to_string()).collect();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if !host.is_empty() && host != "localhost" && host.chars().all(valid) {
            names.push(host.to_string());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        TestCa::new("NowConnect Test CA").server_files(dir, "server", &names)
    }

    fn write(dir: &Path, name: &str, ca_pem: &str, cert_pem: String, key_pem: String) -> TlsFiles {
        let files = TlsFiles {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca_pem: ca_pem.to_string(),
            cert_pem,
            key_pem,
        };
        crate::write_file(&files.ca, &files.ca_pem, 0o644);
        crate::write_file(&files.cert, &files.cert_pem, 0o644);
        crate::write_file(&files.key, &files.key_pem, 0o600);
        files
    }
}
