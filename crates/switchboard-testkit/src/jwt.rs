//! HS256 tokens, as an identity provider would mint them for `--auth jwt`.

use serde_json::{json, Value};

use crate::misc::now_unix_secs;

/// A token for `sub`, issued now, expiring `exp_offset_secs` from now
/// (negative: already expired).
pub fn mint_jwt(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    let now = now_unix_secs();
    mint_jwt_claims(
        secret,
        &json!({"sub": sub, "iat": now, "exp": now + exp_offset_secs}),
    )
}

/// A token with exactly these claims (add `sub`, `exp`, `aud`, `nbf`...).
pub fn mint_jwt_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a JWT")
}
