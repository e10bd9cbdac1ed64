//! Agent tokens for tests: signing keys, their JWKS, and minted JWTs.

use std::path::Path;
use std::process::Command;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde_json::{json, Value};

/// One signing key: private PEM (PKCS#8) for minting, public JWK for the hub's JWKS.
#[derive(Clone, Debug)]
pub struct JwtKey {
    pub kid: String,
    /// The algorithm this key signs with (and the JWK's `alg`).
    pub alg: Algorithm,
    pub private_pem: String,
    /// The public key as a JWK (`kty`, `crv`/`n`/`e`, `x`/`y`, `kid`, `alg`, `use: sig`).
    pub jwk: Value,
}

impl JwtKey {
    /// A fresh P-256 key for ES256.
    pub fn es256(kid: &str) -> JwtKey {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        // Uncompressed SEC1 point: 0x04 || X (32) || Y (32).
        let point = key.public_key_raw();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
            "kid": kid, "alg": "ES256", "use": "sig",
        });
        JwtKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            private_pem: key.serialize_pem(),
            jwk,
        }
    }

    /// A fresh Ed25519 key for EdDSA.
    pub fn ed25519(kid: &str) -> JwtKey {
        let key = KeyPair::generate_for(&PKCS_ED25519).expect("Ed25519 key");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64url(key.public_key_raw()),
            "kid": kid, "alg": "EdDSA", "use": "sig",
        });
        JwtKey {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            private_pem: key.serialize_pem(),
            jwk,
        }
    }

    /// A fresh RSA-2048 key for RS256 (made by the `openssl` command: ring, under rcgen, cannot
    /// generate RSA keys). ~0.1–0.5 s.
    pub fn rs256(kid: &str) -> JwtKey {
        let gen = crate::run_cmd(
            {
                let mut c = Command::new("openssl");
                c.args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ]);
                c
            },
            None,
            crate::CMD_TIMEOUT,
        )
        .assert_success();
        let modulus = crate::run_cmd(
            {
                let mut c = Command::new("openssl");
                c.args(["rsa", "-noout", "-modulus"]);
                c
            },
            Some(gen.stdout.as_bytes()),
            crate::CMD_TIMEOUT,
        )
        .assert_success();
        let hex = modulus
            .stdout
            .trim()
            .strip_prefix("Modulus=")
            .expect("openssl rsa -modulus prints Modulus=HEX");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex modulus"))
            .collect();
        let jwk = json!({
            "kty": "RSA", "n": b64url(&n), "e": "AQAB",
            "kid": kid, "alg": "RS256", "use": "sig",
        });
        JwtKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            private_pem: gen.stdout,
            jwk,
        }
    }

    pub fn encoding_key(&self) -> EncodingKey {
        let pem = self.private_pem.as_bytes();
        match self.alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .expect("encoding key from PEM")
    }

    /// A JWT over `claims` with header `{alg: self.alg, kid: self.kid, typ: JWT}`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    /// A JWT over `claims` with any header (wrong `kid`, other `alg` of the same family, `x5u`,
    /// ...), signed by this key. Panics if jsonwebtoken refuses the header's `alg` for the key.
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding_key()).expect("sign JWT")
    }
}

/// The usual key set of a test IdP: one ES256 key (`kid` "es256-1") and one Ed25519 key
/// (`kid` "ed25519-1").
#[derive(Clone, Debug)]
pub struct JwtKeys {
    pub es256: JwtKey,
    pub ed25519: JwtKey,
}

impl JwtKeys {
    pub fn generate() -> JwtKeys {
        JwtKeys {
            es256: JwtKey::es256("es256-1"),
            ed25519: JwtKey::ed25519("ed25519-1"),
        }
    }

    pub fn keys(&self) -> [&JwtKey; 2] {
        [&self.es256, &self.ed25519]
    }

    /// `{"keys": [...]}` with both public keys.
    pub fn jwks(&self) -> Value {
        JwtKeys::jwks_of(&self.keys())
    }

    /// A JWKS document for any keys (rotation tests: old + new, or only new).
    pub fn jwks_of(keys: &[&JwtKey]) -> Value {
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }

    /// Writes [`Self::jwks`] to `path` (for the hub's `auth.jwks_file`).
    pub fn write_jwks(&self, path: &Path) {
        crate::write_file(path, self.jwks().to_string(), 0o644);
    }

    /// Signs `claims` with the key whose kid is `kid`, header `{alg, kid}`. Panics on an unknown
    /// kid or an `alg` the key cannot produce.
    pub fn mint(&self, claims: &Value, kid: &str, alg: Algorithm) -> String {
        let key = self
            .keys()
            .into_iter()
            .find(|k| k.kid == kid)
            .unwrap_or_else(|| panic!("no test key with kid {kid:?}"));
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        key.sign_with_header(&header, claims)
    }

    /// Standard agent claims: `iss`, `aud`, `sub` (the agent id), `iat`/`nbf` = now,
    /// `exp` = now + `ttl_secs`. Add or overwrite fields on the returned object as needed.
    pub fn agent_claims(issuer: &str, audience: &str, agent_id: &str, ttl_secs: u64) -> Value {
        let now = now_secs();
        json!({
            "iss": issuer, "aud": audience, "sub": agent_id,
            "iat": now, "nbf": now, "exp": now + ttl_secs,
        })
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Base64url without padding (RFC 7515 §2).
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1; // 1 byte → 2 chars, 2 → 3, 3 → 4
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::b64url;

    #[test]
    fn b64url_matches_rfc4648_vectors() {
        // RFC 4648 §10, url-safe alphabet, no padding.
        let cases = [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(b64url(input.as_bytes()), want);
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }
}
