//! Who a WebSocket client is: HS256 JWT verification (algorithm pinned, `exp`
//! required) or, in development mode, the `?user=` query parameter.
//!
//! This module decides identity only. It never logs a token, and it knows
//! nothing of connections, routing or Redis.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthMode;
use crate::protocol::validate_name;

/// Why credentials were refused; every variant becomes HTTP 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token (or no `?user=` in development mode).
    #[error("missing credentials")]
    Missing,
    /// Bad signature, wrong algorithm, expired, malformed.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The user id is not a valid name.
    #[error("invalid user id")]
    InvalidUser,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// Verifies credentials presented at the WebSocket upgrade.
pub struct Authenticator {
    mode: AuthMode,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The credentials a client presented.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// `?token=` (browsers cannot set headers on a WebSocket).
    pub query_token: Option<&'a str>,
    /// `Authorization` header value.
    pub authorization: Option<&'a str>,
    /// `?user=` (development mode only).
    pub query_user: Option<&'a str>,
}

impl Authenticator {
    /// An authenticator for `mode`; `secret` is required for JWT.
    pub fn new(mode: AuthMode, secret: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        validation.validate_nbf = true;
        // Checked only when an audience is configured (`with_audience`).
        validation.validate_aud = false;
        Authenticator {
            mode,
            key: DecodingKey::from_secret(secret.unwrap_or("").as_bytes()),
            validation,
        }
    }

    /// Requires tokens to carry `aud` = `audience`.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        // Without this, a token with no `aud` at all would pass.
        self.validation
            .set_required_spec_claims(&["exp", "sub", "aud"]);
        self
    }

    /// The user id these credentials prove.
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Arc<str>, AuthError> {
        let user = match self.mode {
            AuthMode::None => credentials.query_user.ok_or(AuthError::Missing)?.to_owned(),
            AuthMode::Jwt => {
                let token = credentials
                    .authorization
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .or(credentials.query_token)
                    .ok_or(AuthError::Missing)?;
                jsonwebtoken::decode::<Claims>(token.trim(), &self.key, &self.validation)
                    .map_err(|e| AuthError::InvalidToken(e.kind_description()))?
                    .claims
                    .sub
            }
        };
        validate_name(&user).map_err(|_| AuthError::InvalidUser)?;
        Ok(Arc::from(user))
    }
}

trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonwebtoken::errors::Error {
    /// The error kind only: never the token itself.
    fn kind_description(&self) -> String {
        format!("{:?}", self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn token(secret: &str, sub: &str, exp_offset: i64, alg: Algorithm) -> String {
        let exp = crate::router::now_ms() as i64 / 1000 + exp_offset;
        let claims = serde_json::json!({"sub": sub, "exp": exp});
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn jwt(t: &str) -> Credentials<'_> {
        Credentials {
            query_token: Some(t),
            ..Default::default()
        }
    }

    #[test]
    fn jwt_rules() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret"));
        let good = token("s3cret", "alice", 60, Algorithm::HS256);
        assert_eq!(&*auth.authenticate(&jwt(&good)).expect("valid"), "alice");
        let header = format!("Bearer {good}");
        let via_header = Credentials {
            authorization: Some(&header),
            ..Default::default()
        };
        assert!(auth.authenticate(&via_header).is_ok());
        assert!(auth.authenticate(&Credentials::default()).is_err());
        assert!(auth
            .authenticate(&jwt(&token("other", "alice", 60, Algorithm::HS256)))
            .is_err());
        assert!(auth
            .authenticate(&jwt(&token("s3cret", "alice", -3600, Algorithm::HS256)))
            .is_err());
        assert!(auth
            .authenticate(&jwt(&token("s3cret", "alice", 60, Algorithm::HS384)))
            .is_err());
        assert!(auth
            .authenticate(&jwt(&token("s3cret", "a b", 60, Algorithm::HS256)))
            .is_err());
        assert!(auth.authenticate(&jwt("not.a.token")).is_err());
    }

    fn token_with(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .expect("encode")
    }

    #[test]
    fn not_before_and_audience() {
        let now = crate::router::now_ms() as i64 / 1000;
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret"));
        let future = token_with(serde_json::json!({"sub":"a","exp":now+60,"nbf":now+3600}));
        assert!(auth.authenticate(&jwt(&future)).is_err(), "not yet valid");
        let with_aud = token_with(serde_json::json!({"sub":"a","exp":now+60,"aud":"chat"}));
        assert!(
            auth.authenticate(&jwt(&with_aud)).is_ok(),
            "aud not checked when unset"
        );
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret")).with_audience("chat");
        assert!(auth.authenticate(&jwt(&with_aud)).is_ok());
        let other = token_with(serde_json::json!({"sub":"a","exp":now+60,"aud":"billing"}));
        assert!(auth.authenticate(&jwt(&other)).is_err(), "another audience");
        let none = token_with(serde_json::json!({"sub":"a","exp":now+60}));
        assert!(
            auth.authenticate(&jwt(&none)).is_err(),
            "audience required once configured"
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret"));
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let unsigned =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(auth.authenticate(&jwt(unsigned)).is_err());
    }

    #[test]
    fn dev_mode_takes_the_query_user() {
        let auth = Authenticator::new(AuthMode::None, None);
        let creds = Credentials {
            query_user: Some("bob"),
            ..Default::default()
        };
        assert_eq!(&*auth.authenticate(&creds).expect("ok"), "bob");
        let bad = Credentials {
            query_user: Some(""),
            ..Default::default()
        };
        assert!(auth.authenticate(&bad).is_err());
    }
}
