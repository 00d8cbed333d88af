//! Who a client is and what its token lets it do.
//!
//! Tokens are JWTs verified with the algorithm pinned to the configured key:
//! an HS256 secret, an RSA (RS256) or EC (ES256, ES384) public key read from
//! a PEM file, or the keys of a JWKS (`jwks`), chosen by `kid`. A header
//! asking for any other algorithm, `none` included, is refused before the
//! signature is looked at, so an HS256 token "signed" with an RSA public key
//! as its secret never reaches a verifier. A connection token carries the
//! user (`sub`) and its grants (`rooms`, `dm`, `dm_to`); a per-room token
//! names one user and one room. In development mode (`--auth none`) the user
//! is `?user=` and everything is allowed. The minter behind
//! `switchboard token` lives here too, so both sides agree on the claims.
//!
//! This module decides identity and grants only: `connection` applies
//! `--room-auth` and `--dm-policy` with them. It never logs a token, and it
//! knows nothing of connections, routing or Redis.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;

use crate::config::{AuthMode, Config, TokenArgs};
use crate::jwks::{JwksCache, JwksError, JwksSettings, JwksSetupError, KeyLookupError};
use crate::protocol::validate_name;

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_S: u64 = 5;

/// Why a token or credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token (or no `?user=` in development mode).
    #[error("missing credentials")]
    Missing,
    /// Bad signature, wrong algorithm, expired, malformed, missing claim.
    /// The text names the kind of fault only, never the token.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The user id is not a valid name.
    #[error("invalid user id")]
    InvalidUser,
    /// A refresh or per-room token for another user than the connection's.
    #[error("token for another user")]
    OtherSubject,
    /// A refresh whose `exp` is not later than the current token's.
    #[error("token does not expire later than the current one")]
    NotLater,
    /// A per-room token for another room.
    #[error("token for another room")]
    WrongRoom,
    /// The token's `kid` is not among the cached keys and the JWKS could not
    /// be fetched.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(#[source] Arc<JwksError>),
}

/// Why an [`Authenticator`] cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// `--auth jwt` with no key source.
    #[error("--auth jwt needs one of --jwt-secret, --jwt-public-key or --jwks-url")]
    MissingKey,
    /// More than one key source: which one verifies would be ambiguous.
    #[error("--jwt-secret, --jwt-public-key and --jwks-url are mutually exclusive")]
    SeveralKeys,
    /// The `--jwt-public-key` file cannot be read.
    #[error("cannot read --jwt-public-key {path:?}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// The `--jwt-public-key` file holds no usable public key.
    #[error("--jwt-public-key {path:?}: {source}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: KeyError,
    },
    /// The JWKS client cannot be set up.
    #[error(transparent)]
    Jwks(#[from] JwksSetupError),
}

/// Why a PEM key cannot be used to verify or sign.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not PEM text at all.
    #[error("not a PEM file: {0}")]
    NotPem(#[source] pem::PemError),
    /// A PEM block of another kind (a certificate, a private key where a
    /// public one is expected, ...).
    #[error("a PEM \"{found}\" block; expected {expected}")]
    Label {
        /// The block's label.
        found: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// SEC1 EC private keys are not read; PKCS#8 ones are.
    #[error(
        "an \"EC PRIVATE KEY\" (SEC1) block; convert it to PKCS#8 with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
    )]
    Sec1,
    /// A key type or curve with no algorithm here (Ed25519, P-521, DSA...).
    #[error("unsupported key type: only RSA, EC P-256 and EC P-384 keys are")]
    Unsupported,
    /// The key's encoding is broken.
    #[error("invalid key: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

/// A key that verifies signatures, and the one algorithm it is used with.
pub struct VerifyingKey {
    /// The key material.
    pub key: DecodingKey,
    /// The algorithm every token verified with it must name.
    pub algorithm: Algorithm,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// An HS256 secret.
    pub fn hs256(secret: &[u8]) -> VerifyingKey {
        VerifyingKey {
            key: DecodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
        }
    }

    /// A public key in PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`): RSA verifies
    /// RS256, EC P-256 ES256, EC P-384 ES384.
    pub fn from_public_key_pem(pem: &[u8]) -> Result<VerifyingKey, KeyError> {
        let kind = KeyKind::of_pem(
            pem,
            "RSA PUBLIC KEY",
            "PUBLIC KEY",
            "\"PUBLIC KEY\" or \"RSA PUBLIC KEY\"",
        )?;
        let key = match kind {
            KeyKind::Rsa => DecodingKey::from_rsa_pem(pem),
            KeyKind::Ec(_) => DecodingKey::from_ec_pem(pem),
        }
        .map_err(KeyError::Invalid)?;
        Ok(VerifyingKey {
            key,
            algorithm: kind.algorithm(),
        })
    }
}

/// The key families this module reads, with the algorithm each implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    /// ES256 or ES384, by curve.
    Ec(Algorithm),
}

/// DER object identifiers, encoded with their tag and length, as they appear
/// in the AlgorithmIdentifier of a SubjectPublicKeyInfo or PKCS#8 key.
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl KeyKind {
    /// The kind of a SubjectPublicKeyInfo or PKCS#8 key, from the
    /// AlgorithmIdentifier at its start (the key bits come after it, so they
    /// cannot be mistaken for an identifier).
    fn of(der: &[u8]) -> Result<KeyKind, KeyError> {
        let head = &der[..der.len().min(40)];
        let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
        if has(OID_RSA_ENCRYPTION) {
            Ok(KeyKind::Rsa)
        } else if has(OID_EC_PUBLIC_KEY) && has(OID_P256) {
            Ok(KeyKind::Ec(Algorithm::ES256))
        } else if has(OID_EC_PUBLIC_KEY) && has(OID_P384) {
            Ok(KeyKind::Ec(Algorithm::ES384))
        } else {
            Err(KeyError::Unsupported)
        }
    }

    /// The kind of the key in a PEM labelled `pkcs1` (an RSA key) or
    /// `pkcs8` (a SubjectPublicKeyInfo or PKCS#8 key of either kind); any
    /// other label is refused, naming the `expected` ones.
    fn of_pem(
        pem: &[u8],
        pkcs1: &str,
        pkcs8: &str,
        expected: &'static str,
    ) -> Result<KeyKind, KeyError> {
        let block = pem::parse(pem).map_err(KeyError::NotPem)?;
        match block.tag() {
            tag if tag == pkcs1 => Ok(KeyKind::Rsa),
            tag if tag == pkcs8 => KeyKind::of(block.contents()),
            other => Err(KeyError::Label {
                found: other.to_owned(),
                expected,
            }),
        }
    }

    fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::Ec(algorithm) => algorithm,
        }
    }
}

/// Where verifying keys come from.
enum Keys {
    /// `--auth none`: no token is accepted (there is nothing to verify with).
    Disabled,
    /// One key: `--jwt-secret` or `--jwt-public-key`.
    Fixed(Arc<VerifyingKey>),
    /// `--jwks-url`: keys by `kid`, fetched and cached.
    Jwks(Box<JwksCache>),
}

/// Verifies credentials presented at the WebSocket upgrade, refresh tokens
/// and per-room tokens. Built once and shared.
pub struct Authenticator {
    /// `--auth`.
    mode: AuthMode,
    /// What verifies signatures.
    keys: Keys,
    /// `--jwt-audience`: when set, every token must carry it in `aud`.
    audience: Option<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Disabled => "none".to_owned(),
            Keys::Fixed(key) => format!("{:?}", key.algorithm),
            Keys::Jwks(cache) => format!("jwks {}", cache.url()),
        };
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("keys", &keys)
            .field("audience", &self.audience)
            .finish()
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

/// Who a connection is, until when, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`, or `?user=` in development mode).
    pub user: Arc<str>,
    /// The token's `exp` in unix milliseconds; `None` in development mode,
    /// where nothing expires.
    pub expires_at_ms: Option<u64>,
    /// What the token allows.
    pub grants: Grants,
}

impl Identity {
    /// A user with no expiry and every grant: development mode, tests and
    /// embedding.
    pub fn unrestricted(user: Arc<str>) -> Identity {
        Identity {
            user,
            expires_at_ms: None,
            grants: Grants::all(),
        }
    }
}

/// What a connection token allows: the rooms it may join without a
/// per-room token (`rooms`), and whom it may DM (`dm`, `dm_to`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The `rooms` claim.
    rooms: Patterns,
    /// `dm: true` (everyone) or the `dm_to` claim.
    dm_to: Patterns,
}

impl Grants {
    /// Everything allowed: `--auth none`.
    pub fn all() -> Grants {
        Grants {
            rooms: Patterns::everything(),
            dm_to: Patterns::everything(),
        }
    }

    /// Nothing allowed: a token with none of the grant claims.
    pub fn none() -> Grants {
        Grants::default()
    }

    /// The grants of claims `rooms`, `dm` and `dm_to`: each list entry is an
    /// exact name or a prefix pattern ending in `*` (`"team-42:*"`, `"*"`).
    pub fn new<S: AsRef<str>>(rooms: &[S], dm: bool, dm_to: &[S]) -> Grants {
        Grants {
            rooms: Patterns::new(rooms),
            dm_to: if dm {
                Patterns::everything()
            } else {
                Patterns::new(dm_to)
            },
        }
    }

    /// Whether the `rooms` claim lets the connection join `room`.
    pub fn allows_room(&self, room: &str) -> bool {
        self.rooms.matches(room)
    }

    /// Whether `dm: true` or the `dm_to` claim lets the connection DM `user`.
    pub fn allows_dm_to(&self, user: &str) -> bool {
        self.dm_to.matches(user)
    }
}

/// Names and prefix patterns: `"lobby"` matches itself, `"team-42:*"`
/// every name starting with `team-42:`, `"*"` every name. A `*` anywhere
/// else is an ordinary character.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Patterns {
    /// Entries without a trailing `*`.
    exact: Vec<Box<str>>,
    /// Entries with a trailing `*`, without it.
    prefixes: Vec<Box<str>>,
}

impl Patterns {
    fn new<S: AsRef<str>>(entries: &[S]) -> Patterns {
        let mut patterns = Patterns::default();
        for entry in entries {
            match entry.as_ref().strip_suffix('*') {
                Some(prefix) => patterns.prefixes.push(prefix.into()),
                None => patterns.exact.push(entry.as_ref().into()),
            }
        }
        patterns
    }

    fn everything() -> Patterns {
        Patterns::new(&["*"])
    }

    fn matches(&self, name: &str) -> bool {
        self.exact.iter().any(|exact| **exact == *name)
            || self
                .prefixes
                .iter()
                .any(|prefix| name.starts_with(&**prefix))
    }
}

/// The claims of a connection (or refresh) token. `sub` and `exp` default
/// here so that jsonwebtoken reports them as missing claims by name.
#[derive(Debug, Deserialize)]
struct ConnectionClaims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    dm: Option<bool>,
    #[serde(default)]
    dm_to: Option<Vec<String>>,
    /// Present only in per-room tokens, which are not connection tokens.
    #[serde(default)]
    room: Option<IgnoredAny>,
}

/// The claims of a per-room token.
#[derive(Debug, Deserialize)]
struct RoomClaims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    #[serde(default)]
    room: Option<String>,
}

impl Authenticator {
    /// The authenticator `cfg` describes: reads `--jwt-public-key`, sets up
    /// (but does not yet fetch) `--jwks-url`. Spawns nothing.
    pub fn from_config(cfg: &Config) -> Result<Authenticator, AuthSetupError> {
        let auth = match cfg.auth {
            AuthMode::None => return Ok(Authenticator::development()),
            AuthMode::Jwt => match (&cfg.jwt_secret, &cfg.jwt_public_key, &cfg.jwks_url) {
                (Some(secret), None, None) => Authenticator::hs256(secret.as_bytes()),
                (None, Some(path), None) => {
                    let pem = std::fs::read(path).map_err(|source| AuthSetupError::ReadKey {
                        path: path.clone(),
                        source,
                    })?;
                    let key = VerifyingKey::from_public_key_pem(&pem).map_err(|source| {
                        AuthSetupError::BadKey {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    Authenticator::with_key(key)
                }
                (None, None, Some(url)) => Authenticator::jwks(JwksCache::new(
                    url,
                    JwksSettings {
                        min_refresh: Duration::from_millis(cfg.jwks_min_refresh_ms),
                        refresh_every: Duration::from_secs(cfg.jwks_refresh_s),
                        ..JwksSettings::default()
                    },
                )?),
                (None, None, None) => return Err(AuthSetupError::MissingKey),
                _ => return Err(AuthSetupError::SeveralKeys),
            },
        };
        Ok(match &cfg.jwt_audience {
            Some(audience) => auth.with_audience(audience),
            None => auth,
        })
    }

    /// `--auth none`: the user is `?user=`, with every grant.
    pub fn development() -> Authenticator {
        Authenticator {
            mode: AuthMode::None,
            keys: Keys::Disabled,
            audience: None,
        }
    }

    /// JWTs signed with the HS256 `secret`.
    pub fn hs256(secret: &[u8]) -> Authenticator {
        Authenticator::with_key(VerifyingKey::hs256(secret))
    }

    /// JWTs verified with `key`, with its algorithm only.
    pub fn with_key(key: VerifyingKey) -> Authenticator {
        Authenticator {
            mode: AuthMode::Jwt,
            keys: Keys::Fixed(Arc::new(key)),
            audience: None,
        }
    }

    /// JWTs verified with the keys of a JWKS.
    pub fn jwks(cache: JwksCache) -> Authenticator {
        Authenticator {
            mode: AuthMode::Jwt,
            keys: Keys::Jwks(Box::new(cache)),
            audience: None,
        }
    }

    /// Requires every token to carry `aud` = `audience`.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.to_owned());
        self
    }

    /// Who these credentials prove, until when, with which grants. May fetch
    /// the JWKS (an unknown `kid`, or cached keys due for a refresh).
    pub async fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Identity, AuthError> {
        match self.mode {
            AuthMode::None => {
                let user = credentials.query_user.ok_or(AuthError::Missing)?;
                validate_name(user).map_err(|_| AuthError::InvalidUser)?;
                Ok(Identity::unrestricted(Arc::from(user)))
            }
            AuthMode::Jwt => {
                let token = credentials
                    .authorization
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .or(credentials.query_token)
                    .ok_or(AuthError::Missing)?;
                self.connection_token(token).await
            }
        }
    }

    /// A `refresh`: the same rules as at connect;
    /// [`AuthError::OtherSubject`] when `sub` is not `current`'s user,
    /// [`AuthError::NotLater`] when `exp` is not after `current`'s.
    pub async fn refresh(&self, token: &str, current: &Identity) -> Result<Identity, AuthError> {
        let identity = self.connection_token(token).await?;
        if identity.user != current.user {
            return Err(AuthError::OtherSubject);
        }
        if let (Some(new), Some(old)) = (identity.expires_at_ms, current.expires_at_ms) {
            if new <= old {
                return Err(AuthError::NotLater);
            }
        }
        Ok(identity)
    }

    /// Checks a per-room token for `user` and `room`; returns its `exp` in
    /// unix milliseconds.
    pub async fn room_token(&self, token: &str, user: &str, room: &str) -> Result<u64, AuthError> {
        let claims: RoomClaims = self.verify(token).await?;
        if claims.sub != user {
            return Err(AuthError::OtherSubject);
        }
        match claims.room {
            None => Err(AuthError::InvalidToken("missing claim room".to_owned())),
            Some(named) if named != room => Err(AuthError::WrongRoom),
            Some(_) => Ok(claims.exp.saturating_mul(1000)),
        }
    }

    /// Verifies a connection token and reads its grants.
    async fn connection_token(&self, token: &str) -> Result<Identity, AuthError> {
        let claims: ConnectionClaims = self.verify(token).await?;
        if claims.room.is_some() {
            // A per-room token names one room; as a connection token it
            // would outlive what it was minted for.
            return Err(AuthError::InvalidToken(
                "a per-room token is not a connection token".to_owned(),
            ));
        }
        validate_name(&claims.sub).map_err(|_| AuthError::InvalidUser)?;
        let no_names: &[String] = &[];
        Ok(Identity {
            user: Arc::from(claims.sub),
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
            grants: Grants::new(
                claims.rooms.as_deref().unwrap_or(no_names),
                claims.dm.unwrap_or(false),
                claims.dm_to.as_deref().unwrap_or(no_names),
            ),
        })
    }

    /// Checks signature (with the key's algorithm only), `exp` (required),
    /// `nbf`, `sub` (required) and `aud` (when configured), then reads the
    /// claims.
    async fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, AuthError> {
        let token = token.trim();
        let key = match &self.keys {
            Keys::Disabled => {
                return Err(AuthError::InvalidToken(
                    "tokens are not used with --auth none".to_owned(),
                ))
            }
            Keys::Fixed(key) => key.clone(),
            Keys::Jwks(cache) => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|e| AuthError::InvalidToken(describe(&e)))?;
                cache
                    .key(header.kid.as_deref())
                    .await
                    .map_err(|e| match e {
                        KeyLookupError::Unavailable(e) => AuthError::KeysUnavailable(e),
                        other => AuthError::InvalidToken(other.to_string()),
                    })?
            }
        };
        let validation = self.validation(key.algorithm);
        jsonwebtoken::decode::<T>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::InvalidToken(describe(&e)))
    }

    /// The rules every token is checked against, for `algorithm` only.
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                // Without `aud` required, a token with no `aud` would pass.
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        validation
    }
}

/// The kind of a verification failure, for logs and error frames: never the
/// token, nor claim values quoted in a parse error.
fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::Json(_) => "malformed claims".to_owned(),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) => "malformed token".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::InvalidRsaKey(_) | ErrorKind::Crypto(_) => "InvalidSignature".to_owned(),
        kind => format!("{kind:?}"),
    }
}

/// Signs tokens for `switchboard token` (and tests): like the verifying
/// side, the key decides the algorithm.
pub struct TokenSigner {
    key: EncodingKey,
    header: Header,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// HS256 with `secret`.
    pub fn hs256(secret: &[u8]) -> TokenSigner {
        TokenSigner {
            key: EncodingKey::from_secret(secret),
            header: Header::new(Algorithm::HS256),
        }
    }

    /// A private key in PEM: PKCS#8 (`PRIVATE KEY`, RSA or EC P-256/P-384)
    /// or PKCS#1 (`RSA PRIVATE KEY`). RSA signs RS256, EC ES256/ES384.
    pub fn from_private_key_pem(pem: &[u8]) -> Result<TokenSigner, KeyError> {
        let kind = KeyKind::of_pem(
            pem,
            "RSA PRIVATE KEY",
            "PRIVATE KEY",
            "\"PRIVATE KEY\" (PKCS#8) or \"RSA PRIVATE KEY\"",
        )
        .map_err(|e| match e {
            KeyError::Label { found, .. } if found == "EC PRIVATE KEY" => KeyError::Sec1,
            e => e,
        })?;
        let key = match kind {
            KeyKind::Rsa => EncodingKey::from_rsa_pem(pem),
            KeyKind::Ec(_) => EncodingKey::from_ec_pem(pem),
        }
        .map_err(KeyError::Invalid)?;
        Ok(TokenSigner {
            key,
            header: Header::new(kind.algorithm()),
        })
    }

    /// Names the verifying key in the header (`kid`), for a JWKS.
    pub fn with_kid(mut self, kid: &str) -> TokenSigner {
        self.header.kid = Some(kid.to_owned());
        self
    }

    /// The algorithm the tokens are signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.header.alg
    }

    /// A signed JWT of `claims`.
    pub fn sign(&self, claims: &impl serde::Serialize) -> Result<String, MintError> {
        jsonwebtoken::encode(&self.header, claims, &self.key).map_err(MintError::Sign)
    }
}

/// Why `switchboard token` could not print a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Neither a secret nor a private key.
    #[error("needs --jwt-secret (or SWITCHBOARD_JWT_SECRET) or --jwt-private-key")]
    MissingKey,
    /// The private key file cannot be read.
    #[error("cannot read --jwt-private-key {path:?}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// The private key file holds no usable key.
    #[error("--jwt-private-key {path:?}: {source}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: KeyError,
    },
    /// `--user` or `--room` is not a valid name.
    #[error("invalid {what} {name:?}: {source}")]
    Name {
        /// `--user` or `--room`.
        what: &'static str,
        /// The name given.
        name: String,
        /// Why it is invalid.
        #[source]
        source: crate::protocol::NameError,
    },
    /// jsonwebtoken could not sign.
    #[error("cannot sign: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// The token `switchboard token` prints for `args`, issued at `now_s`
/// (unix seconds): a per-room token with `--room`, else a connection token.
pub fn mint(args: &TokenArgs, now_s: u64) -> Result<String, MintError> {
    let signer = match (&args.jwt_private_key, &args.jwt_secret) {
        (Some(path), _) => {
            let pem = std::fs::read(path).map_err(|source| MintError::ReadKey {
                path: path.clone(),
                source,
            })?;
            TokenSigner::from_private_key_pem(&pem).map_err(|source| MintError::BadKey {
                path: path.clone(),
                source,
            })?
        }
        (None, Some(secret)) => TokenSigner::hs256(secret.as_bytes()),
        (None, None) => return Err(MintError::MissingKey),
    };
    let signer = match &args.kid {
        Some(kid) => signer.with_kid(kid),
        None => signer,
    };
    validate_name(&args.user).map_err(|source| MintError::Name {
        what: "--user",
        name: args.user.clone(),
        source,
    })?;
    let mut claims = serde_json::json!({
        "sub": args.user,
        "iat": now_s,
        "exp": now_s.saturating_add(args.ttl.as_secs()),
    });
    if let Some(audience) = &args.aud {
        claims["aud"] = audience.as_str().into();
    }
    if let Some(room) = &args.room {
        validate_name(room).map_err(|source| MintError::Name {
            what: "--room",
            name: room.clone(),
            source,
        })?;
        claims["room"] = room.as_str().into();
    } else {
        if !args.rooms.is_empty() {
            claims["rooms"] = args.rooms.clone().into();
        }
        if args.dm {
            claims["dm"] = true.into();
        }
        if !args.dm_to.is_empty() {
            claims["dm_to"] = args.dm_to.clone().into();
        }
    }
    signer.sign(&claims)
}

/// Small keys for unit tests (never used outside them), made with
/// `openssl genpkey`.
#[cfg(test)]
pub(crate) mod test_keys {
    pub const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCuCNdeiy/TEyHG
k9LygqazGBBBmyxMTHPpyDUfIs9aQ9SnxRWqCI58OhMRa8W5BApP8AZpEA3t7QMa
rr7L9a++lzUt2JSKMjxpjuLsgncchPI/e2T5Gkvl+O5vb8M7E7+5TRHBJPCwdS9t
YMAzjpzZInoPPF5YBItOvQc0DqLo4ftjv8PRVM3h9qwU8yeEjVl7CYgPhPC5Sz8R
iNsUmjqRfZgdMaczcRKlJagOE+/SdWcM/HSbJU7N4nouujeeRi43joKB1U2dmoQp
lxGmkD8sQm83FzVDAfEP0AFWOEEZ9wCCvflk7PFEw8rIgbTSg3Dn9Ds/qjU0bDZc
bWdVKUyRAgMBAAECggEABV4c0OPdeC7P0M9qPxwuGqnaRgC8hHeq703jTAwbfbjn
+hrxNqzkAqM6p3PVzcWY8RNZykOiT1lbGjeDp1gi+Q+SNoFWnv7Kx9VuLK3fMTot
O82hLRDtYHjdl0Ko4IWE2TjuHFE4qnOZ0G9+jBSI5EZMwhOqRAATYRzByC5voju5
iyB7bhgwjG2QRFSZYdzhnpsuYbD+66wlXu+zkRfn6cPzreN4SE2VHWjMuo/e5w5u
h/Hz3+bqD2Jqpe3LmVn9pQ31NavvWLp7D7m9Ck8Gdlc040RMkocikI1dRK5RiFEX
itKaJ8IwcNWS2HScO2WWeUruhRWMZGaJXtmh9tm6wQKBgQDVO9SfOHQ1YwOFhrBX
Uo62pWew8zilTHYGjy+Oxeefj7UnyPCTV+FTLMSwXeT2nV1TSRxEXicfrwXgfsNo
TE6tBFZrnqB9nwbCRzwgyqnNmPZSTfUU9X1FKhZtoVjih43Z2CNX2gyBResYdR5w
3hkgeovN8BfrqycpiX0ZAsqywQKBgQDQ8GMS2z4oCALKfoqpEK0NPP0BoDQ/oBYR
c2st26/PeVOMKDFR0YaXjXoVDI3vH8pPizvBeCAz0Pd+W72nw066SjeGjZKD/9V5
12ziNYVQ5I/NaMXx8GNbzo6P9Oo7/LXGy4PMEzg+iRlwjQj8yss74rS/6qFemzEd
prKeek2d0QKBgDRKCrbMujqJQEjTIZUYSqThZM8QpbhrSpoLLMdfIpCPRgYukUgg
icHCvazeKZKMPmF5ETR2vjNX0SIfE74U0Eo/QQ39BTAo+hhULZuA9yjStLy0H0B3
frOiQYO6yDgss41TIj+d2ektgxwpREC7RgAf7P6gPM1u2BiofYPPmnNBAoGAEVIs
VG7ae0UWviS5aASa5AMPUmgujKu/yJiR5Q5WR9PeCjt2wzqkdsHiwgX1akJvaiK3
xHUp7kG/krkWQucdCrKGYeAwqkK2NtCWFTaso6UfCr9J0aHFCuJXzTVXibuMcjuC
5JMfUYfaFQuMGDDTolZL97ECya4B51xfaGXpM1ECgYAo+cXOjrh+v+onYYR7bCud
OKwX5fffmx7+DSukVwRNwoojLUKjOLUw28MhZwaHB7C4WIpmZQbPVfV9EL5stljC
6oyKUZQ/KLG0Q453Gsy6raEf7sUMhk2iqRhK670LNowT2udtiG+EEGWw4bjyfklT
JjDCE8dqbzGl0Ant+LbEjQ==
-----END PRIVATE KEY-----
";
    pub const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEArgjXXosv0xMhxpPS8oKm
sxgQQZssTExz6cg1HyLPWkPUp8UVqgiOfDoTEWvFuQQKT/AGaRAN7e0DGq6+y/Wv
vpc1LdiUijI8aY7i7IJ3HITyP3tk+RpL5fjub2/DOxO/uU0RwSTwsHUvbWDAM46c
2SJ6DzxeWASLTr0HNA6i6OH7Y7/D0VTN4fasFPMnhI1ZewmID4TwuUs/EYjbFJo6
kX2YHTGnM3ESpSWoDhPv0nVnDPx0myVOzeJ6Lro3nkYuN46CgdVNnZqEKZcRppA/
LEJvNxc1QwHxD9ABVjhBGfcAgr35ZOzxRMPKyIG00oNw5/Q7P6o1NGw2XG1nVSlM
kQIDAQAB
-----END PUBLIC KEY-----
";
    /// [`RSA_PUBLIC`]'s modulus, base64url, for a JWK (`e` is `AQAB`).
    pub const RSA_N: &str = "rgjXXosv0xMhxpPS8oKmsxgQQZssTExz6cg1HyLPWkPUp8UVqgiOfDoTEWvFuQQKT_AGaRAN7e0DGq6-y_Wvvpc1LdiUijI8aY7i7IJ3HITyP3tk-RpL5fjub2_DOxO_uU0RwSTwsHUvbWDAM46c2SJ6DzxeWASLTr0HNA6i6OH7Y7_D0VTN4fasFPMnhI1ZewmID4TwuUs_EYjbFJo6kX2YHTGnM3ESpSWoDhPv0nVnDPx0myVOzeJ6Lro3nkYuN46CgdVNnZqEKZcRppA_LEJvNxc1QwHxD9ABVjhBGfcAgr35ZOzxRMPKyIG00oNw5_Q7P6o1NGw2XG1nVSlMkQ";
    pub const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8dvyXhrKXrN56qoq
ysPSdiVi9tacwKsPyCDuFEMdXqmhRANCAATMAqX/but4jUR2tumnOEKz+LHsnGTN
NB/GSkmQZZfpS/iGhrV168bcfgkomaYLnJGMeWr40KNxRgtRXC3e1o5X
-----END PRIVATE KEY-----
";
    pub const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEzAKl/27reI1EdrbppzhCs/ix7Jxk
zTQfxkpJkGWX6Uv4hoa1devG3H4JKJmmC5yRjHlq+NCjcUYLUVwt3taOVw==
-----END PUBLIC KEY-----
";
    /// [`EC_PUBLIC`]'s point, base64url, for a JWK.
    pub const EC_X: &str = "zAKl_27reI1EdrbppzhCs_ix7JxkzTQfxkpJkGWX6Us";
    pub const EC_Y: &str = "-IaGtXXrxtx-CSiZpguckYx5avjQo3FGC1FcLd7Wjlc";
    pub const EC2_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgdfZF5rIjh3SPwg4V
rVQDzqldJ9EY5YDxlUYljc90fjKhRANCAARfjYzftCmspltkj+lTTuHdiQd3H3Ch
x6TepN8ZEy4Vlln5+TEY2KC8zVNUFJWC3wy3iFISiEL1P98GWBvCXDME
-----END PRIVATE KEY-----
";
    /// The public half of [`EC2_PRIVATE`], base64url, for a JWK.
    pub const EC2_X: &str = "X42M37QprKZbZI_pU07h3YkHdx9wocek3qTfGRMuFZY";
    pub const EC2_Y: &str = "Wfn5MRjYoLzNU1QUlYLfDLeIUhKIQvU_3wZYG8JcMwQ";
    pub const EC384_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDDPLgz7maYULt20fQvc
xw0uy0/stCL4BSdqrV89vzrEU0OHoleNs2QkpuzTU8wePR6hZANiAASys+229AIv
9LOL74YT2/bgfnXpukcd2s4HJ4GUFhmOKRYxMlaaeEHbyDyukcWrAAq0SSGi7yZW
DJiwePmnqAz5yHMwBufvLo1J80HKKrr9yYxx+g2hJnZzfg3txxV3mzo=
-----END PRIVATE KEY-----
";
    pub const EC384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEsrPttvQCL/Szi++GE9v24H516bpHHdrO
ByeBlBYZjikWMTJWmnhB28g8rpHFqwAKtEkhou8mVgyYsHj5p6gM+chzMAbn7y6N
SfNByiq6/cmMcfoNoSZ2c34N7ccVd5s6
-----END PUBLIC KEY-----
";
    pub const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEASy0HBqgx/i/Mm5ZhvoqPE6hvm9f7RXBkD/RSoVClR78=
-----END PUBLIC KEY-----
";
}

#[cfg(test)]
mod tests {
    use super::test_keys::*;
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now_s() -> u64 {
        crate::router::now_ms() / 1000
    }

    fn hs(secret: &str, claims: serde_json::Value, alg: Algorithm) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn token(secret: &str, sub: &str, exp_offset: i64, alg: Algorithm) -> String {
        let exp = now_s() as i64 + exp_offset;
        hs(secret, json!({"sub": sub, "exp": exp}), alg)
    }

    fn token_with(claims: serde_json::Value) -> String {
        hs("s3cret", claims, Algorithm::HS256)
    }

    fn signed(private_pem: &str, claims: serde_json::Value) -> String {
        TokenSigner::from_private_key_pem(private_pem.as_bytes())
            .expect("key")
            .sign(&claims)
            .expect("sign")
    }

    fn jwt(t: &str) -> Credentials<'_> {
        Credentials {
            query_token: Some(t),
            ..Default::default()
        }
    }

    fn secret() -> Authenticator {
        Authenticator::hs256(b"s3cret")
    }

    fn public(pem: &str) -> Authenticator {
        Authenticator::with_key(VerifyingKey::from_public_key_pem(pem.as_bytes()).expect("key"))
    }

    #[tokio::test]
    async fn jwt_rules() {
        let auth = secret();
        let good = token("s3cret", "alice", 60, Algorithm::HS256);
        let identity = auth.authenticate(&jwt(&good)).await.expect("valid");
        assert_eq!(&*identity.user, "alice");
        assert!(identity
            .expires_at_ms
            .is_some_and(|exp| exp > crate::router::now_ms()));
        assert_eq!(identity.grants, Grants::none(), "no grant claims");
        let header = format!("Bearer {good}");
        let via_header = Credentials {
            authorization: Some(&header),
            ..Default::default()
        };
        assert!(auth.authenticate(&via_header).await.is_ok());
        let refused = [
            token("other", "alice", 60, Algorithm::HS256),
            token("s3cret", "alice", -3600, Algorithm::HS256),
            token("s3cret", "alice", 60, Algorithm::HS384),
            token("s3cret", "a b", 60, Algorithm::HS256),
            "not.a.token".to_owned(),
        ];
        for t in &refused {
            assert!(auth.authenticate(&jwt(t)).await.is_err(), "{t}");
        }
        assert!(matches!(
            auth.authenticate(&Credentials::default()).await,
            Err(AuthError::Missing)
        ));
    }

    #[tokio::test]
    async fn exp_and_sub_are_required() {
        let auth = secret();
        let now = now_s();
        for (claims, missing) in [
            (json!({"sub": "alice"}), "missing claim exp"),
            (json!({"exp": now + 60}), "missing claim sub"),
        ] {
            match auth.authenticate(&jwt(&token_with(claims))).await {
                Err(AuthError::InvalidToken(kind)) => assert_eq!(kind, missing),
                other => panic!("{missing}: {other:?}"),
            }
        }
        let room = token_with(json!({"sub": "alice", "room": "lobby"}));
        assert!(auth.room_token(&room, "alice", "lobby").await.is_err());
    }

    #[tokio::test]
    async fn not_before_and_audience() {
        let now = now_s();
        let auth = secret();
        let future = token_with(json!({"sub":"a","exp":now+60,"nbf":now+3600}));
        assert!(
            auth.authenticate(&jwt(&future)).await.is_err(),
            "not yet valid"
        );
        let with_aud = token_with(json!({"sub":"a","exp":now+60,"aud":"chat"}));
        assert!(
            auth.authenticate(&jwt(&with_aud)).await.is_ok(),
            "aud not checked when unset"
        );
        let auth = secret().with_audience("chat");
        assert!(auth.authenticate(&jwt(&with_aud)).await.is_ok());
        let other = token_with(json!({"sub":"a","exp":now+60,"aud":"billing"}));
        assert!(
            auth.authenticate(&jwt(&other)).await.is_err(),
            "another audience"
        );
        let none = token_with(json!({"sub":"a","exp":now+60}));
        assert!(
            auth.authenticate(&jwt(&none)).await.is_err(),
            "audience required once configured"
        );
        // Per-room tokens and refreshes follow the same audience rule.
        let room = token_with(json!({"sub":"a","exp":now+60,"room":"r"}));
        assert!(auth.room_token(&room, "a", "r").await.is_err());
        let room = token_with(json!({"sub":"a","exp":now+60,"room":"r","aud":"chat"}));
        assert!(auth.room_token(&room, "a", "r").await.is_ok());
        let current = Identity {
            expires_at_ms: Some(now * 1000),
            ..Identity::unrestricted(Arc::from("a"))
        };
        assert!(auth.refresh(&none, &current).await.is_err());
        assert!(auth.refresh(&with_aud, &current).await.is_ok());
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let unsigned =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(secret().authenticate(&jwt(unsigned)).await.is_err());
        assert!(public(RSA_PUBLIC)
            .authenticate(&jwt(unsigned))
            .await
            .is_err());
        assert!(public(EC_PUBLIC)
            .authenticate(&jwt(unsigned))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn rs256_and_es256_tokens_are_verified() {
        let claims = json!({"sub": "alice", "exp": now_s() + 60});
        for (private, public_pem, alg) in [
            (RSA_PRIVATE, RSA_PUBLIC, Algorithm::RS256),
            (EC_PRIVATE, EC_PUBLIC, Algorithm::ES256),
            (EC384_PRIVATE, EC384_PUBLIC, Algorithm::ES384),
        ] {
            let key = VerifyingKey::from_public_key_pem(public_pem.as_bytes()).expect("key");
            assert_eq!(key.algorithm, alg);
            let signer = TokenSigner::from_private_key_pem(private.as_bytes()).expect("key");
            assert_eq!(signer.algorithm(), alg);
            let auth = public(public_pem);
            let t = signed(private, claims.clone());
            assert_eq!(
                &*auth.authenticate(&jwt(&t)).await.expect("valid").user,
                "alice"
            );
        }
        // Another key of the same type: a bad signature.
        let t = signed(EC2_PRIVATE, claims.clone());
        assert!(public(EC_PUBLIC).authenticate(&jwt(&t)).await.is_err());
        // An RS256 key does not verify an ES256 token, nor the reverse.
        let t = signed(EC_PRIVATE, claims.clone());
        assert!(public(RSA_PUBLIC).authenticate(&jwt(&t)).await.is_err());
        let t = signed(RSA_PRIVATE, claims);
        assert!(public(EC_PUBLIC).authenticate(&jwt(&t)).await.is_err());
    }

    #[tokio::test]
    async fn alg_confusion_is_refused() {
        // The classic attack: HS256 with the (public) RSA key as the secret.
        let claims = json!({"sub": "alice", "exp": now_s() + 60});
        for public_pem in [RSA_PUBLIC, EC_PUBLIC] {
            let forged = hs(public_pem, claims.clone(), Algorithm::HS256);
            match public(public_pem).authenticate(&jwt(&forged)).await {
                Err(AuthError::InvalidToken(kind)) => assert_eq!(kind, "InvalidAlgorithm"),
                other => panic!("{other:?}"),
            }
        }
        // And an RS256 token is no good against an HS256 secret.
        let t = signed(RSA_PRIVATE, claims);
        assert!(secret().authenticate(&jwt(&t)).await.is_err());
    }

    #[test]
    fn public_key_files_are_classified() {
        let kind = |pem: &str| VerifyingKey::from_public_key_pem(pem.as_bytes());
        assert!(matches!(kind(ED25519_PUBLIC), Err(KeyError::Unsupported)));
        assert!(matches!(kind(RSA_PRIVATE), Err(KeyError::Label { .. })));
        assert!(matches!(kind("not pem"), Err(KeyError::NotPem(_))));
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert!(matches!(
            TokenSigner::from_private_key_pem(sec1.as_bytes()),
            Err(KeyError::Sec1)
        ));
        assert!(matches!(
            TokenSigner::from_private_key_pem(RSA_PUBLIC.as_bytes()),
            Err(KeyError::Label { .. })
        ));
    }

    #[test]
    fn grant_patterns() {
        let grants = Grants::new(&["lobby", "team-42:*"], false, &["bob", "ops:*"]);
        let rooms = [
            ("lobby", true),
            ("lobby2", false),
            ("team-42:", true),
            ("team-42:general", true),
            ("team-42", false),
            ("team-4", false),
            ("other", false),
        ];
        for (room, allowed) in rooms {
            assert_eq!(grants.allows_room(room), allowed, "{room}");
        }
        let users = [
            ("bob", true),
            ("bobby", false),
            ("ops:alice", true),
            ("ops", false),
        ];
        for (user, allowed) in users {
            assert_eq!(grants.allows_dm_to(user), allowed, "{user}");
        }
        let star = Grants::new(&["*"], false, &[]);
        assert!(star.allows_room("anything") && !star.allows_dm_to("bob"));
        let dm = Grants::new::<&str>(&[], true, &[]);
        assert!(dm.allows_dm_to("anyone") && !dm.allows_room("lobby"));
        // A `*` that does not end the entry is a literal character.
        let literal = Grants::new(&["a*b"], false, &[]);
        assert!(literal.allows_room("a*b") && !literal.allows_room("axb"));
        assert!(Grants::all().allows_room("x") && Grants::all().allows_dm_to("y"));
        assert!(!Grants::none().allows_room("x") && !Grants::none().allows_dm_to("y"));
    }

    #[tokio::test]
    async fn connection_tokens_carry_grants() {
        let now = now_s();
        let t = token_with(json!({
            "sub": "alice", "exp": now + 60,
            "rooms": ["lobby", "team-42:*"], "dm_to": ["bob"],
        }));
        let identity = secret().authenticate(&jwt(&t)).await.expect("valid");
        assert!(identity.grants.allows_room("team-42:x"));
        assert!(!identity.grants.allows_room("team-43:x"));
        assert!(identity.grants.allows_dm_to("bob") && !identity.grants.allows_dm_to("carol"));
        let t = token_with(json!({"sub": "alice", "exp": now + 60, "dm": true}));
        let identity = secret().authenticate(&jwt(&t)).await.expect("valid");
        assert!(identity.grants.allows_dm_to("carol"));
        // Claims of the wrong shape are refused, not ignored.
        let t = token_with(json!({"sub": "alice", "exp": now + 60, "rooms": "lobby"}));
        assert!(secret().authenticate(&jwt(&t)).await.is_err());
        // A per-room token cannot stand in for a connection token.
        let t = token_with(json!({"sub": "alice", "exp": now + 60, "room": "lobby"}));
        assert!(secret().authenticate(&jwt(&t)).await.is_err());
    }

    #[tokio::test]
    async fn refresh_rules() {
        let now = now_s();
        let auth = secret();
        let first = token_with(json!({"sub": "alice", "exp": now + 60, "rooms": ["a"]}));
        let current = auth.authenticate(&jwt(&first)).await.expect("valid");
        let later = token_with(json!({"sub": "alice", "exp": now + 120, "rooms": ["b"]}));
        let refreshed = auth.refresh(&later, &current).await.expect("refreshed");
        assert_eq!(refreshed.expires_at_ms, Some((now + 120) * 1000));
        assert!(refreshed.grants.allows_room("b") && !refreshed.grants.allows_room("a"));
        let same = token_with(json!({"sub": "alice", "exp": now + 60}));
        assert!(matches!(
            auth.refresh(&same, &current).await,
            Err(AuthError::NotLater)
        ));
        let earlier = token_with(json!({"sub": "alice", "exp": now + 30}));
        assert!(matches!(
            auth.refresh(&earlier, &current).await,
            Err(AuthError::NotLater)
        ));
        let bob = token_with(json!({"sub": "bob", "exp": now + 120}));
        assert!(matches!(
            auth.refresh(&bob, &current).await,
            Err(AuthError::OtherSubject)
        ));
        // A badly signed token for another user is invalid, not "another user".
        let forged = hs(
            "other",
            json!({"sub": "bob", "exp": now + 120}),
            Algorithm::HS256,
        );
        assert!(matches!(
            auth.refresh(&forged, &current).await,
            Err(AuthError::InvalidToken(_))
        ));
        let expired = token_with(json!({"sub": "alice", "exp": now - 3600}));
        assert!(matches!(
            auth.refresh(&expired, &current).await,
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[tokio::test]
    async fn room_token_rules() {
        let now = now_s();
        let auth = secret();
        let t = token_with(json!({"sub": "alice", "room": "team-42:x", "exp": now + 60}));
        assert_eq!(
            auth.room_token(&t, "alice", "team-42:x")
                .await
                .expect("valid"),
            (now + 60) * 1000
        );
        assert!(matches!(
            auth.room_token(&t, "alice", "team-42:y").await,
            Err(AuthError::WrongRoom)
        ));
        assert!(matches!(
            auth.room_token(&t, "bob", "team-42:x").await,
            Err(AuthError::OtherSubject)
        ));
        // The room is named exactly: a pattern in `room` grants nothing.
        let pattern = token_with(json!({"sub": "alice", "room": "team-42:*", "exp": now + 60}));
        assert!(matches!(
            auth.room_token(&pattern, "alice", "team-42:x").await,
            Err(AuthError::WrongRoom)
        ));
        let no_room = token_with(json!({"sub": "alice", "exp": now + 60}));
        assert!(matches!(
            auth.room_token(&no_room, "alice", "team-42:x").await,
            Err(AuthError::InvalidToken(_))
        ));
        let no_exp = token_with(json!({"sub": "alice", "room": "team-42:x"}));
        assert!(auth
            .room_token(&no_exp, "alice", "team-42:x")
            .await
            .is_err());
        let expired = token_with(json!({"sub": "alice", "room": "team-42:x", "exp": now - 3600}));
        assert!(auth
            .room_token(&expired, "alice", "team-42:x")
            .await
            .is_err());
        let forged = hs(
            "other",
            json!({"sub": "alice", "room": "team-42:x", "exp": now + 60}),
            Algorithm::HS256,
        );
        assert!(auth
            .room_token(&forged, "alice", "team-42:x")
            .await
            .is_err());
        // Same key rules as connection tokens: RS256 key, HS256 forgery refused.
        let rsa = public(RSA_PUBLIC);
        let claims = json!({"sub": "alice", "room": "r", "exp": now + 60});
        assert!(rsa
            .room_token(&signed(RSA_PRIVATE, claims.clone()), "alice", "r")
            .await
            .is_ok());
        let forged = hs(RSA_PUBLIC, claims, Algorithm::HS256);
        assert!(rsa.room_token(&forged, "alice", "r").await.is_err());
    }

    #[tokio::test]
    async fn dev_mode_takes_the_query_user() {
        let auth = Authenticator::development();
        let creds = Credentials {
            query_user: Some("bob"),
            ..Default::default()
        };
        let identity = auth.authenticate(&creds).await.expect("ok");
        assert_eq!(identity, Identity::unrestricted(Arc::from("bob")));
        let bad = Credentials {
            query_user: Some(""),
            ..Default::default()
        };
        assert!(auth.authenticate(&bad).await.is_err());
        let t = token_with(json!({"sub": "bob", "exp": now_s() + 60}));
        assert!(
            auth.authenticate(&jwt(&t)).await.is_err(),
            "?token= ignored"
        );
    }

    fn args(extra: &[&str]) -> TokenArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            token: TokenArgs,
        }
        let mut argv = vec!["token"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parse").token
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        let now = now_s();
        let t = mint(
            &args(&[
                "--user",
                "alice",
                "--rooms",
                "lobby,team-42:*",
                "--dm-to",
                "bob,ops:*",
                "--ttl",
                "15m",
                "--jwt-secret",
                "s3cret",
            ]),
            now,
        )
        .expect("minted");
        let identity = secret().authenticate(&jwt(&t)).await.expect("valid");
        assert_eq!(identity.expires_at_ms, Some((now + 900) * 1000));
        assert_eq!(
            identity.grants,
            Grants::new(&["lobby", "team-42:*"], false, &["bob", "ops:*"])
        );
        let t = mint(
            &args(&[
                "--user",
                "alice",
                "--room",
                "r1",
                "--jwt-secret",
                "s3cret",
                "--aud",
                "chat",
            ]),
            now,
        )
        .expect("minted");
        let auth = secret().with_audience("chat");
        assert_eq!(
            auth.room_token(&t, "alice", "r1").await.expect("valid"),
            (now + 3600) * 1000,
            "default ttl 1h"
        );
        let dir = std::env::temp_dir().join(format!("sb-mint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("ec.pem");
        std::fs::write(&key, EC_PRIVATE).expect("write");
        let key = key.to_str().expect("utf-8");
        let t = mint(
            &args(&[
                "--user",
                "alice",
                "--dm",
                "--jwt-private-key",
                key,
                "--kid",
                "k1",
            ]),
            now,
        )
        .expect("minted");
        let header = jsonwebtoken::decode_header(&t).expect("header");
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::ES256, Some("k1"))
        );
        let identity = public(EC_PUBLIC)
            .authenticate(&jwt(&t))
            .await
            .expect("valid");
        assert!(identity.grants.allows_dm_to("anyone"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(
            mint(&args(&["--user", "a b", "--jwt-secret", "s"]), now),
            Err(MintError::Name { .. })
        ));
        assert!(matches!(
            mint(&args(&["--user", "a"]), now),
            Err(MintError::MissingKey)
        ));
    }
}
