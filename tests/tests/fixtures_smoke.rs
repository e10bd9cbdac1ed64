//! Each fixture proven against its real server directly (no tunnel): if one of these fails, the
//! end-to-end tests that use the fixture cannot be trusted either.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use nowconnect_tests::*;

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "nowconnect-hub";

#[test]
fn binaries_are_built_and_found() {
    for name in ["nowconnect-hub", "nowconnect-agent"] {
        let path = bin_path(name);
        assert!(path.is_absolute(), "{}", path.display());
        let meta = std::fs::metadata(&path).expect("stat binary");
        use std::os::unix::fs::PermissionsExt;
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{} not executable",
            path.display()
        );
    }
}

#[test]
fn proc_waits_for_port_and_stops_with_sigterm() {
    let dir = temp_dir("proc");
    let addr = free_addr();
    let mut cmd = Command::new("nc");
    cmd.args(["-lk", "127.0.0.1", &addr.port().to_string()]);
    let mut nc = Proc::spawn("nc", cmd, dir.path());
    nc.wait_for_port(addr, START_TIMEOUT);
    assert!(wait_for_port(addr, Duration::from_secs(1)));
    let status = nc
        .terminate(Duration::from_secs(5))
        .expect("nc exits on SIGTERM");
    assert!(!status.success());
    assert!(!nc.is_running());

    // A process that ignores SIGTERM is still ended by stop() (SIGKILL after the grace).
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' TERM; echo ready; sleep 60"]);
    let mut stubborn = Proc::spawn("stubborn", cmd, dir.path());
    assert!(
        stubborn.wait_for_log("ready", Duration::from_secs(5)),
        "{}",
        stubborn.log_tail()
    );
    assert!(stubborn.terminate(Duration::from_millis(300)).is_none());
    stubborn.kill();
    assert!(!stubborn.is_running());

    let mut sleep = Command::new("sleep");
    sleep.arg("5");
    let out = run_cmd(sleep, None, Duration::from_millis(200));
    assert!(out.timed_out(), "{out}");
}

#[test]
fn tls_files_verify_with_their_ca_only() {
    let dir = temp_dir("tls");
    let tls = TlsFiles::localhost(dir.path());
    let other = TestCa::new("Other CA");
    let other_ca = dir.path().join("other-ca.pem");
    other.write_cert(&other_ca);

    let verify = |ca: &Path| {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(ca)
            .arg(&tls.cert);
        run_cmd(cmd, None, CMD_TIMEOUT)
    };
    verify(&tls.ca).assert_success();
    verify(&other_ca).assert_failure();

    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-text", "-in"]).arg(&tls.cert);
    let text = run_cmd(cmd, None, CMD_TIMEOUT).assert_success().stdout;
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("DNS:localhost"), "{text}");
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
}

#[test]
fn jwt_tokens_verify_against_the_jwks() {
    let keys = JwtKeys::generate();
    let rsa = JwtKey::rs256("rs256-1");
    let jwks_value = JwtKeys::jwks_of(&[&keys.es256, &keys.ed25519, &rsa]);
    let jwks: JwkSet = serde_json::from_value(jwks_value.clone()).expect("JWKS parses");
    assert_eq!(jwks.keys.len(), 3, "{jwks_value}");

    let claims = JwtKeys::agent_claims(ISSUER, AUDIENCE, "agent-1", 300);
    let verify = |token: &str, kid: &str, alg: Algorithm| {
        let jwk = jwks.find(kid).expect("kid in JWKS");
        let key = DecodingKey::from_jwk(jwk).expect("decoding key from JWK");
        let mut v = Validation::new(alg);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
    };
    for (token, kid, alg) in [
        (
            keys.mint(&claims, "es256-1", Algorithm::ES256),
            "es256-1",
            Algorithm::ES256,
        ),
        (
            keys.mint(&claims, "ed25519-1", Algorithm::EdDSA),
            "ed25519-1",
            Algorithm::EdDSA,
        ),
        (rsa.sign(&claims), "rs256-1", Algorithm::RS256),
    ] {
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(kid));
        let data = verify(&token, kid, alg).unwrap_or_else(|e| panic!("{kid}: {e}"));
        assert_eq!(data.claims["sub"], "agent-1");
    }

    // A token from a key outside the JWKS, carrying a known kid, must not verify.
    let rogue = JwtKey::es256("es256-1");
    assert!(verify(&rogue.sign(&claims), "es256-1", Algorithm::ES256).is_err());
}

#[test]
fn slapd_answers_ldap_and_ldaps_with_verified_certificate() {
    let dir = temp_dir("slapd");
    let tls = TlsFiles::localhost(dir.path());
    let slapd = Slapd::start(dir.path(), Some(&tls));

    let out = slapd.search("(uid=alice)").assert_success();
    assert!(
        out.stdout
            .contains("dn: uid=alice,ou=people,dc=example,dc=com"),
        "{out}"
    );
    assert!(out.stdout.contains("mail: alice@example.com"), "{out}");

    let ldaps = slapd.ldaps_url().expect("ldaps on");
    let out = ldapsearch(&ldaps, Some(&tls.ca), "(cn=engineers)").assert_success();
    assert!(
        out.stdout
            .contains("member: uid=bob,ou=people,dc=example,dc=com"),
        "{out}"
    );

    // Also by name: libldap checks "localhost" against the host name, which the cert carries.
    let by_name = format!("ldaps://localhost:{}", slapd.ldaps.expect("ldaps").port());
    ldapsearch(&by_name, Some(&tls.ca), "(uid=bob)").assert_success();

    // The same server under a CA the client does not trust: the handshake must fail.
    let other_ca = dir.path().join("other-ca.pem");
    TestCa::new("Other CA").write_cert(&other_ca);
    let out = ldapsearch(&ldaps, Some(&other_ca), "(uid=alice)").assert_failure();
    assert!(!out.stdout.contains("uid=alice"), "{out}");

    // Writes work too (ldapadd), and the entry is then found.
    let ldif = "dn: uid=carol,ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\n\
                uid: carol\ncn: Carol\nsn: Example\n";
    ldapadd(&slapd.ldap_url(), None, ldif).assert_success();
    assert!(slapd
        .search("(uid=carol)")
        .assert_success()
        .stdout
        .contains("cn: Carol"));
}

#[test]
fn sshd_runs_commands_and_copies_files() {
    let dir = temp_dir("sshd");
    let sshd = Sshd::start(dir.path());

    let out = sshd.ssh(sshd.addr, "echo hi").assert_success();
    assert_eq!(out.stdout.trim(), "hi", "{out}");

    let out = sshd
        .ssh_stdin(sshd.addr, "wc -c", Some(&[7u8; 100_000]))
        .assert_success();
    assert_eq!(out.stdout.trim(), "100000", "{out}");

    let local = dir.path().join("payload.bin");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&local, &payload).expect("write payload");
    let remote = dir.path().join("remote-copy.bin");
    sshd.scp_to(sshd.addr, &local, &remote).assert_success();
    let back = dir.path().join("back.bin");
    sshd.scp_from(sshd.addr, &remote, &back).assert_success();
    assert_eq!(std::fs::read(&back).expect("read back"), payload);
}

#[test]
fn postgres_answers_psql() {
    let dir = temp_dir("pg");
    let pg = Postgres::start(dir.path());
    let out = pg.query("select 1").assert_success();
    assert_eq!(out.stdout.trim(), "1", "{out}");
    let out = psql(
        pg.addr,
        "create table t(x int); insert into t select generate_series(1,1000); \
         select sum(x) from t",
    )
    .assert_success();
    assert_eq!(out.stdout.trim(), "500500", "{out}");
}

#[test]
fn postgres_with_tls_verifies_full() {
    let dir = temp_dir("pgtls");
    let tls = TlsFiles::localhost(dir.path());
    let pg = Postgres::start_tls(dir.path(), &tls);
    let out = psql_tls(
        pg.addr,
        &tls.ca,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .assert_success();
    assert_eq!(out.stdout.trim(), "t", "{out}");
    let other_ca = dir.path().join("other-ca.pem");
    TestCa::new("Other CA").write_cert(&other_ca);
    psql_tls(pg.addr, &other_ca, "select 1").assert_failure();
}

#[test]
fn tinyproxy_connects_with_and_without_basic_auth() {
    let dir = temp_dir("proxy");
    let web = HttpStub::start();
    web.set("/hello", 200, "text/plain", "hello through the proxy\n");
    let target = web.url("/hello");

    // Open proxy: CONNECT (-p, what the agent does) and plain forwarding.
    let open = Tinyproxy::start(dir.path(), None);
    let out = curl(&["-p", "-x", &open.url(), &target]).assert_success();
    assert_eq!(out.stdout, "hello through the proxy\n", "{out}");
    let out = curl(&["-x", &open.url(), &target]).assert_success();
    assert_eq!(out.stdout, "hello through the proxy\n", "{out}");

    // Proxy with Basic auth: right credentials pass, wrong or missing ones get 407.
    let sub = dir.path().join("auth");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let auth = Tinyproxy::start(&sub, Some(("agent", "s3cret")));
    let out = curl(&["-p", "-x", &auth.url_with_auth(), &target]).assert_success();
    assert_eq!(out.stdout, "hello through the proxy\n", "{out}");
    let connect_code = |proxy: &str| {
        let out = curl(&[
            "-p",
            "-x",
            proxy,
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            &target,
        ]);
        assert!(!out.success(), "{out}");
        out.stdout.trim().to_string()
    };
    assert_eq!(connect_code(&auth.url()), "407");
    // tinyproxy 1.11 answers a CONNECT with *wrong* credentials 401 + WWW-Authenticate (a
    // tinyproxy quirk; squid says 407). Either way the tunnel must not open.
    let wrong = format!("http://agent:wrong@127.0.0.1:{}", auth.addr.port());
    let code = connect_code(&wrong);
    assert!(
        code == "407" || code == "401",
        "wrong proxy password got {code}"
    );
    assert!(web.hits("/hello") >= 3);
}

#[test]
fn http_stub_serves_over_tls_to_a_client_trusting_its_ca() {
    let dir = temp_dir("stub");
    let tls = TlsFiles::localhost(dir.path());
    let stub = HttpStub::start_tls(&tls);
    let keys = JwtKeys::generate();
    stub.set_json("/jwks.json", &keys.jwks());
    let ca = tls.ca.to_string_lossy().into_owned();
    let out = curl(&["--fail", "--cacert", &ca, &stub.url("/jwks.json")]).assert_success();
    let served: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON body");
    assert_eq!(served, keys.jwks());
    // POST bodies are recorded (PDP tests read them).
    curl(&["--cacert", &ca, "-d", "{\"a\":1}", &stub.url("/authorize")]).assert_success();
    let posted = stub
        .requests()
        .into_iter()
        .find(|r| r.path == "/authorize")
        .expect("POST seen");
    assert_eq!(posted.method, "POST");
    assert_eq!(posted.body, b"{\"a\":1}");
    // Unknown CA: no.
    let other_ca = dir.path().join("other-ca.pem");
    TestCa::new("Other CA").write_cert(&other_ca);
    let other = other_ca.to_string_lossy().into_owned();
    curl(&["--cacert", &other, &stub.url("/jwks.json")]).assert_failure();
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut uniq = ports.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), ports.len());
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, ports[0]))).expect("bind");
    drop(l);
}
