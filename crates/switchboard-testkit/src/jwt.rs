//! Tokens as an identity provider or a backend would mint them for
//! `--auth jwt`: HS256 from a shared secret ([`mint_jwt`],
//! [`mint_jwt_claims`]), RS256 and ES256 from a private key PEM with an
//! optional `kid` ([`SigningKey`]), and the forgeries a server must refuse
//! ([`unsigned_jwt`]: `alg: none`).

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::misc::now_unix_secs;

/// A token for `sub`, issued now, expiring `exp_offset_secs` from now
/// (negative: already expired).
pub fn mint_jwt(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    mint_jwt_claims(secret, &claims_for(sub, exp_offset_secs))
}

/// A token with exactly these claims (add `sub`, `exp`, `aud`, `nbf`...).
pub fn mint_jwt_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a JWT")
}

/// `{"sub": sub, "iat": now, "exp": now + exp_offset_secs}`: the claims
/// every token needs, to extend with `rooms`, `room`, `dm`, `aud`...
pub fn claims_for(sub: &str, exp_offset_secs: i64) -> Value {
    let now = now_unix_secs();
    json!({"sub": sub, "iat": now, "exp": now + exp_offset_secs})
}

/// A token with `alg: none` and an empty signature: what an attacker sends
/// to a server that trusts the header's `alg`.
pub fn unsigned_jwt(claims: &Value) -> String {
    unsigned_jwt_with_header(&json!({"alg": "none", "typ": "JWT"}), claims)
}

/// A token with exactly this header and these claims and an empty
/// signature (e.g. `alg: none` naming a `kid`).
pub fn unsigned_jwt_with_header(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// The claims of a token, read without checking its signature (what a
/// test reads off a token the server minted, e.g. `switchboard token`).
pub fn unverified_claims(token: &str) -> Value {
    let payload = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT (no payload segment): {token:?}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_else(|e| panic!("JWT payload is not base64url ({e}): {token:?}"));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("JWT payload is not JSON ({e}): {token:?}"))
}

/// The header of a token, read as JSON (`alg`, `kid`).
pub fn header_of(token: &str) -> Value {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .unwrap_or_else(|e| panic!("JWT header is not base64url ({e}): {token:?}"));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("JWT header is not JSON ({e}): {token:?}"))
}

/// A signing key and the `alg` and `kid` it puts in every header: RS256
/// from an RSA private key, ES256 from an EC P-256 private key, each from a
/// PEM (PKCS#8 or the type's own format), or an HMAC secret under any HS
/// alg (for the tokens a server must refuse: HS384 where HS256 is
/// configured, HS256 keyed with a public key PEM and naming a `kid`).
#[derive(Clone)]
pub struct SigningKey {
    /// RS256 or ES256, fixed by the key type.
    alg: Algorithm,
    /// The private key.
    key: EncodingKey,
    /// The header's `kid`; none when the server has one key.
    kid: Option<String>,
}

impl SigningKey {
    /// `alg` (`"HS256"`, `"HS384"`, `"HS512"`) keyed with `secret`.
    pub fn hmac(alg: &str, secret: &str) -> SigningKey {
        let alg: Algorithm = alg
            .parse()
            .unwrap_or_else(|e| panic!("{alg:?} is not a JWT algorithm: {e}"));
        assert!(
            matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512),
            "{alg:?} is not an HMAC algorithm"
        );
        SigningKey {
            alg,
            key: EncodingKey::from_secret(secret.as_bytes()),
            kid: None,
        }
    }

    /// RS256 with an RSA private key PEM.
    pub fn rs256(private_pem: &[u8]) -> SigningKey {
        SigningKey {
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(private_pem)
                .unwrap_or_else(|e| panic!("not an RSA private key PEM: {e}")),
            kid: None,
        }
    }

    /// ES256 with an EC P-256 private key PEM.
    pub fn es256(private_pem: &[u8]) -> SigningKey {
        SigningKey {
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(private_pem)
                .unwrap_or_else(|e| panic!("not an EC private key PEM (PKCS#8): {e}")),
            kid: None,
        }
    }

    /// [`SigningKey::rs256`] from a file.
    pub fn rs256_file(path: impl AsRef<Path>) -> SigningKey {
        SigningKey::rs256(&read_pem(path.as_ref()))
    }

    /// [`SigningKey::es256`] from a file.
    pub fn es256_file(path: impl AsRef<Path>) -> SigningKey {
        SigningKey::es256(&read_pem(path.as_ref()))
    }

    /// The same key, naming itself `kid` in every token's header (how a
    /// JWKS consumer picks the key).
    pub fn with_kid(mut self, kid: &str) -> SigningKey {
        self.kid = Some(kid.to_string());
        self
    }

    /// A token with exactly these claims.
    pub fn mint(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key).expect("encode a JWT")
    }

    /// A token for `sub`, issued now, expiring `exp_offset_secs` from now.
    pub fn mint_for(&self, sub: &str, exp_offset_secs: i64) -> String {
        self.mint(&claims_for(sub, exp_offset_secs))
    }
}

fn read_pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    fn jwk(name: &str) -> jsonwebtoken::jwk::Jwk {
        let text = std::fs::read_to_string(fixture(name)).expect("read a JWK fixture");
        serde_json::from_str(&text).expect("a JWK")
    }

    fn verify(token: &str, alg: Algorithm, key: &DecodingKey) -> Result<Value, String> {
        let mut validation = Validation::new(alg);
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| e.to_string())
    }

    /// The fixtures hang together: each private key's tokens verify with
    /// its public PEM and its JWK, and with no other key.
    #[test]
    fn fixture_keys_sign_what_their_public_halves_and_jwks_verify() {
        let cases = [
            ("rsa-a", Algorithm::RS256, "rsa-b"),
            ("rsa-b", Algorithm::RS256, "rsa-a"),
            ("ec", Algorithm::ES256, "rsa-a"),
        ];
        for (name, alg, other) in cases {
            let private = fixture(&format!("{name}.private.pem"));
            let signer = match alg {
                Algorithm::RS256 => SigningKey::rs256_file(&private),
                _ => SigningKey::es256_file(&private),
            }
            .with_kid(name);
            let token = signer.mint_for("alice", 60);
            assert_eq!(header_of(&token)["kid"], name);
            assert_eq!(unverified_claims(&token)["sub"], "alice");

            let public = std::fs::read(fixture(&format!("{name}.public.pem"))).expect("read");
            let from_pem = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&public),
                _ => DecodingKey::from_ec_pem(&public),
            }
            .expect("a public key PEM");
            let claims = verify(&token, alg, &from_pem).expect("verifies with the public PEM");
            assert_eq!(claims["sub"], "alice");

            let from_jwk =
                DecodingKey::from_jwk(&jwk(&format!("{name}.jwk.json"))).expect("a usable JWK");
            verify(&token, alg, &from_jwk).expect("verifies with the JWK");

            let other_public =
                std::fs::read(fixture(&format!("{other}.public.pem"))).expect("read");
            let wrong = DecodingKey::from_rsa_pem(&other_public).expect("an RSA public key");
            assert!(
                verify(&token, Algorithm::RS256, &wrong).is_err(),
                "{name}'s token must not verify with {other}'s key"
            );
        }
    }

    #[test]
    fn an_unsigned_token_says_alg_none_and_has_no_signature() {
        let token = unsigned_jwt(&claims_for("mallory", 60));
        assert_eq!(header_of(&token)["alg"], "none");
        assert!(token.ends_with('.'), "{token}");
        assert_eq!(unverified_claims(&token)["sub"], "mallory");
    }
}
