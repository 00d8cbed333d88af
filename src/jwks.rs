//! `--jwks-url`: the verifying keys of a JWKS, fetched over HTTP(S) and
//! cached by `kid`.
//!
//! A token whose `kid` is not cached triggers a fetch, at most one per
//! `--jwks-min-refresh-ms`; cached keys older than `--jwks-refresh-s` are
//! refetched by the first verification that notices (no background task).
//! At most one fetch is in flight. A failed fetch keeps the keys already
//! cached, so an identity provider that is briefly down does not lock users
//! out; a fetch that succeeds replaces them whole, so a key removed from the
//! JWKS stops verifying. Each key's algorithm is pinned: the JWK's `alg` when
//! it has one, else RS256 for RSA, ES256 for EC P-256, ES384 for P-384.
//! Symmetric (`oct`) keys and keys for encryption are never used.
//!
//! This module knows the JWKS format and HTTP; it knows nothing of claims.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::auth::VerifyingKey;

/// How the cache fetches and refreshes.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Shortest time between two fetches (`--jwks-min-refresh-ms`): bounds
    /// what tokens with made-up `kid`s can cost the identity provider.
    pub min_refresh: Duration,
    /// Age after which cached keys are refetched (`--jwks-refresh-s`).
    pub refresh_every: Duration,
    /// Longest a fetch may take, connection and body included.
    pub timeout: Duration,
    /// Largest JWKS body read.
    pub max_body_bytes: usize,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            min_refresh: Duration::from_millis(10_000),
            refresh_every: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            max_body_bytes: 1 << 20,
        }
    }
}

/// Why the JWKS client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum JwksSetupError {
    /// Not an http:// or https:// URL.
    #[error("--jwks-url {url:?} is not an http:// or https:// URL")]
    Url {
        /// The URL given.
        url: String,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot set up the JWKS HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why a fetch of the JWKS failed (the cached keys are kept).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Connection, TLS, timeout or body read.
    #[error("JWKS request failed: {0}")]
    Request(#[source] reqwest::Error),
    /// A status other than 2xx (redirects are not followed).
    #[error("JWKS answered HTTP {0}")]
    Status(u16),
    /// A body larger than the limit.
    #[error("JWKS body larger than {0} bytes")]
    TooLarge(usize),
    /// Not a JSON object with a `keys` array.
    #[error("JWKS is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// No key in the set can verify tokens.
    #[error("JWKS has no usable signing key ({skipped} skipped)")]
    NoUsableKeys {
        /// Keys present but unusable (symmetric, for encryption, unknown
        /// type or curve, `alg` not matching the key).
        skipped: usize,
    },
}

/// Why no key was found for a token.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    /// The JWKS was fetched and has no key with this `kid`.
    #[error("unknown kid")]
    UnknownKid,
    /// The token names no `kid` and the JWKS has more than one key.
    #[error("token has no kid")]
    NoKid,
    /// The key is not cached and the last fetch failed.
    #[error(transparent)]
    Unavailable(Arc<JwksError>),
}

/// One successful fetch's keys.
#[derive(Debug, Default)]
struct KeySet {
    /// Keys that have a `kid`.
    by_kid: HashMap<String, Arc<VerifyingKey>>,
    /// The key for tokens without `kid`: set only when the JWKS has exactly
    /// one usable key, so the choice is never a guess.
    sole: Option<Arc<VerifyingKey>>,
    /// When this set was fetched (`None`: nothing fetched yet).
    fetched_at: Option<Instant>,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None => self.sole.clone(),
        }
    }

    fn is_stale(&self, now: Instant, refresh_every: Duration) -> bool {
        self.fetched_at
            .is_none_or(|at| now.saturating_duration_since(at) >= refresh_every)
    }

    fn len(&self) -> usize {
        self.by_kid.len().max(usize::from(self.sole.is_some()))
    }
}

/// What the fetch lock guards: the history that rate-limits fetches.
#[derive(Debug, Default)]
struct FetchState {
    /// When the last fetch began, successful or not.
    last_attempt: Option<Instant>,
    /// Why the last fetch failed; `None` after a success.
    last_error: Option<Arc<JwksError>>,
}

impl FetchState {
    fn may_fetch(&self, now: Instant, min_refresh: Duration) -> bool {
        self.last_attempt
            .is_none_or(|at| now.saturating_duration_since(at) >= min_refresh)
    }
}

/// The keys of one JWKS URL, fetched on demand and cached.
pub struct JwksCache {
    url: reqwest::Url,
    client: reqwest::Client,
    settings: JwksSettings,
    /// The keys in use: read by every verification, replaced whole by a
    /// successful fetch (never held across an await).
    keys: RwLock<Arc<KeySet>>,
    /// Held for the whole of a fetch, so at most one is in flight; callers
    /// that need a key it may bring wait on it.
    fetch: tokio::sync::Mutex<FetchState>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.url.as_str())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// A cache for `url`; fetches nothing yet.
    pub fn new(url: &str, settings: JwksSettings) -> Result<JwksCache, JwksSetupError> {
        let parsed = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| JwksSetupError::Url {
                url: url.to_owned(),
            })?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A redirect could lead anywhere, https to http included.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(JwksSetupError::Client)?;
        Ok(JwksCache {
            url: parsed,
            client,
            settings,
            keys: RwLock::default(),
            fetch: tokio::sync::Mutex::default(),
        })
    }

    /// The JWKS URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The key for a token's `kid`, fetching the JWKS when the key is not
    /// cached (rate-limited) or the cache is due for a refresh.
    pub async fn key(&self, kid: Option<&str>) -> Result<Arc<VerifyingKey>, KeyLookupError> {
        let now = Instant::now();
        let cached = self.current();
        if let Some(key) = cached.find(kid) {
            if !cached.is_stale(now, self.settings.refresh_every) {
                return Ok(key);
            }
            // Due for a refresh: the first to notice fetches, everyone else
            // keeps verifying with the cached keys meanwhile.
            let Ok(mut state) = self.fetch.try_lock() else {
                return Ok(key);
            };
            if state.may_fetch(now, self.settings.min_refresh) {
                self.fetch_into(&mut state).await;
            }
            // A key the new set no longer has was revoked.
            return self.current().find(kid).ok_or(KeyLookupError::UnknownKid);
        }
        let mut state = self.fetch.lock().await;
        // A fetch that finished while this one waited may have brought it.
        if let Some(key) = self.current().find(kid) {
            return Ok(key);
        }
        if state.may_fetch(Instant::now(), self.settings.min_refresh) {
            self.fetch_into(&mut state).await;
            if let Some(key) = self.current().find(kid) {
                return Ok(key);
            }
        }
        match &state.last_error {
            Some(error) => Err(KeyLookupError::Unavailable(error.clone())),
            None if kid.is_none() => Err(KeyLookupError::NoKid),
            None => Err(KeyLookupError::UnknownKid),
        }
    }

    /// Fetches now (within the rate limit), e.g. at start-up to learn early
    /// whether the JWKS is reachable. Returns how many keys are cached.
    pub async fn refresh(&self) -> Result<usize, Arc<JwksError>> {
        let mut state = self.fetch.lock().await;
        if state.may_fetch(Instant::now(), self.settings.min_refresh) {
            self.fetch_into(&mut state).await;
        }
        match &state.last_error {
            Some(error) => Err(error.clone()),
            None => Ok(self.current().len()),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One fetch, its outcome recorded in `state`; the caller holds the lock.
    async fn fetch_into(&self, state: &mut FetchState) {
        state.last_attempt = Some(Instant::now());
        match self.fetch_once().await {
            Ok(set) => {
                tracing::info!(url = %self.url, keys = set.len(), "JWKS fetched");
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                state.last_error = None;
            }
            Err(error) => {
                tracing::warn!(
                    url = %self.url,
                    error = %with_causes(&error),
                    "JWKS fetch failed; keeping the cached keys"
                );
                state.last_error = Some(Arc::new(error));
            }
        }
    }

    async fn fetch_once(&self) -> Result<KeySet, JwksError> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(JwksError::Request)?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        let limit = self.settings.max_body_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(JwksError::TooLarge(limit));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(JwksError::Request)? {
            if body.len() + chunk.len() > limit {
                return Err(JwksError::TooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body, Instant::now())
    }
}

/// `error: cause: cause`: reqwest's own text omits why (a refused
/// connection, an untrusted certificate). Causes already quoted in the
/// text are not repeated.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let line = inner.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = inner.source();
    }
    text
}

/// The usable keys of a JWKS document. Keys that cannot be used are
/// skipped, not fatal: a provider may publish encryption keys beside the
/// signing ones.
fn parse_jwks(body: &[u8], now: Instant) -> Result<KeySet, JwksError> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body).map_err(JwksError::Json)?;
    let mut set = KeySet {
        fetched_at: Some(now),
        ..KeySet::default()
    };
    let mut usable = Vec::new();
    let mut skipped = 0;
    for value in document.keys {
        let key = serde_json::from_value::<Jwk>(value)
            .ok()
            .and_then(|jwk| Some((jwk.common.key_id.clone(), verifying_key(&jwk)?)));
        match key {
            Some(key) => usable.push(key),
            None => skipped += 1,
        }
    }
    if usable.is_empty() {
        return Err(JwksError::NoUsableKeys { skipped });
    }
    if usable.len() == 1 {
        set.sole = Some(usable[0].1.clone());
    }
    for (kid, key) in usable {
        if let Some(kid) = kid {
            // The first of duplicated kids wins.
            set.by_kid.entry(kid).or_insert(key);
        }
    }
    Ok(set)
}

/// A JWK as a verifying key with its pinned algorithm, or `None` when it
/// must not verify tokens.
fn verifying_key(jwk: &Jwk) -> Option<Arc<VerifyingKey>> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    use Algorithm::*;
    let allowed: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[ES256],
            EllipticCurve::P384 => &[ES384],
            _ => return None,
        },
        // Symmetric keys do not belong in a published key set; Ed25519 is
        // not among the supported key types.
        AlgorithmParameters::OctetKey(_) | AlgorithmParameters::OctetKeyPair(_) => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        None => allowed[0],
        Some(named) => {
            let named = named.to_string().parse::<Algorithm>().ok()?;
            *allowed.iter().find(|a| **a == named)?
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Arc::new(VerifyingKey { key, algorithm }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_keys::*;
    use crate::auth::{AuthError, Authenticator, Credentials, TokenSigner};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ec_jwk(kid: &str, x: &str, y: &str) -> serde_json::Value {
        json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig"})
    }

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": kid, "alg": "RS256"})
    }

    /// A one-route HTTP server on 127.0.0.1 answering every request with the
    /// current JWKS, counting requests; dropped, it stops listening.
    struct JwksServer {
        url: String,
        body: Arc<Mutex<String>>,
        requests: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(keys: serde_json::Value) -> JwksServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
            let body = Arc::new(Mutex::new(String::new()));
            let requests = Arc::new(AtomicUsize::new(0));
            let (serving, counter) = (body.clone(), requests.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = serving.lock().expect("lock").clone();
                    tokio::spawn(async move {
                        let mut request = vec![0u8; 4096];
                        let _ = socket.read(&mut request).await;
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            });
            let server = JwksServer {
                url,
                body,
                requests,
                task,
            };
            server.serve(keys);
            server
        }

        fn serve(&self, keys: serde_json::Value) {
            *self.body.lock().expect("lock") = json!({ "keys": keys }).to_string();
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn settings(min_refresh_ms: u64, refresh_every_s: u64) -> JwksSettings {
        JwksSettings {
            min_refresh: Duration::from_millis(min_refresh_ms),
            refresh_every: Duration::from_secs(refresh_every_s),
            timeout: Duration::from_secs(2),
            ..JwksSettings::default()
        }
    }

    fn token(private: &str, kid: &str) -> String {
        let exp = crate::router::now_ms() / 1000 + 60;
        TokenSigner::from_private_key_pem(private.as_bytes())
            .expect("key")
            .with_kid(kid)
            .sign(&json!({"sub": "alice", "exp": exp}))
            .expect("sign")
    }

    async fn check(auth: &Authenticator, token: &str) -> Result<(), AuthError> {
        let credentials = Credentials {
            query_token: Some(token),
            ..Default::default()
        };
        auth.authenticate(&credentials).await.map(|_| ())
    }

    #[tokio::test]
    async fn rotation_is_picked_up_and_refetches_are_rate_limited() {
        let server = JwksServer::start(json!([ec_jwk("k1", EC_X, EC_Y), rsa_jwk("r1")])).await;
        let cache = JwksCache::new(&server.url, settings(300, 300)).expect("cache");
        let auth = Authenticator::jwks(cache);
        check(&auth, &token(EC_PRIVATE, "k1")).await.expect("k1");
        check(&auth, &token(RSA_PRIVATE, "r1")).await.expect("r1");
        assert_eq!(server.requests(), 1, "one fetch, then the cache");

        // Alg pinned per key: the EC key's kid on an RSA-signed token fails.
        assert!(check(&auth, &token(RSA_PRIVATE, "k1")).await.is_err());

        // A new kid is picked up without a restart; k1 was rotated out.
        server.serve(json!([ec_jwk("k2", EC2_X, EC2_Y)]));
        tokio::time::sleep(Duration::from_millis(350)).await;
        check(&auth, &token(EC2_PRIVATE, "k2")).await.expect("k2");
        assert_eq!(server.requests(), 2);

        // Unknown kids: no second fetch within --jwks-min-refresh-ms.
        for _ in 0..5 {
            match check(&auth, &token(EC_PRIVATE, "nope")).await {
                Err(AuthError::InvalidToken(kind)) => assert_eq!(kind, "unknown kid"),
                other => panic!("{other:?}"),
            }
        }
        assert!(server.requests() <= 3, "{} fetches", server.requests());
        check(&auth, &token(EC2_PRIVATE, "k2"))
            .await
            .expect("k2 still cached");
        // The rotated-out key no longer verifies (the set was replaced).
        assert!(check(&auth, &token(EC_PRIVATE, "k1")).await.is_err());
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_cached_keys() {
        let server = JwksServer::start(json!([ec_jwk("k1", EC_X, EC_Y)])).await;
        // Refreshed at every use once the rate limit allows.
        let cache = JwksCache::new(&server.url, settings(100, 0)).expect("cache");
        let auth = Authenticator::jwks(cache);
        check(&auth, &token(EC_PRIVATE, "k1")).await.expect("k1");
        let url = server.url.clone();
        drop(server);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The refresh fails (connection refused): k1 keeps verifying.
        check(&auth, &token(EC_PRIVATE, "k1"))
            .await
            .expect("k1 kept");
        // An unknown kid while the JWKS is unreachable: keys unavailable.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(matches!(
            check(&auth, &token(EC2_PRIVATE, "k2")).await,
            Err(AuthError::KeysUnavailable(_))
        ));
        // Nothing ever fetched: unavailable too.
        let auth = Authenticator::jwks(JwksCache::new(&url, settings(100, 300)).expect("cache"));
        assert!(matches!(
            check(&auth, &token(EC_PRIVATE, "k1")).await,
            Err(AuthError::KeysUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn refetches_are_one_at_a_time() {
        let server = JwksServer::start(json!([ec_jwk("k1", EC_X, EC_Y)])).await;
        let cache = Arc::new(JwksCache::new(&server.url, settings(10_000, 300)).expect("cache"));
        let lookups: Vec<_> = (0..20)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let kid = if i % 2 == 0 { "k1" } else { "unknown" };
                    cache.key(Some(kid)).await.is_ok()
                })
            })
            .collect();
        let mut found = 0;
        for lookup in lookups {
            found += usize::from(lookup.await.expect("join"));
        }
        assert_eq!(found, 10);
        assert_eq!(server.requests(), 1);
        assert_eq!(
            cache.refresh().await.expect("cached"),
            1,
            "rate-limited, no fetch"
        );
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let server = JwksServer::start(json!([ec_jwk("k1", EC_X, EC_Y)])).await;
        let small = JwksSettings {
            max_body_bytes: 64,
            ..settings(100, 300)
        };
        let cache = JwksCache::new(&server.url, small).expect("cache");
        match cache.refresh().await {
            Err(error) => assert!(matches!(*error, JwksError::TooLarge(64)), "{error}"),
            Ok(keys) => panic!("{keys} keys from an oversized body"),
        }
    }

    #[test]
    fn unusable_keys_are_skipped() {
        let body = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y, "kid": "enc", "use": "enc"},
            {"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y, "kid": "mismatch", "alg": "RS256"},
            {"kty": "EC", "crv": "P-521", "x": EC_X, "y": EC_Y, "kid": "p521"},
            {"kty": "weird", "kid": "weird"},
            {"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": "ps", "alg": "PS256"},
            ec_jwk("k1", EC_X, EC_Y),
        ]});
        let set = parse_jwks(body.to_string().as_bytes(), Instant::now()).expect("set");
        let mut kids: Vec<_> = set.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["k1", "ps"]);
        assert_eq!(set.by_kid["ps"].algorithm, Algorithm::PS256);
        assert_eq!(set.by_kid["k1"].algorithm, Algorithm::ES256);
        assert!(set.sole.is_none(), "two keys: a token must name one");
        let single = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y}]});
        let set = parse_jwks(single.to_string().as_bytes(), Instant::now()).expect("set");
        assert!(set.sole.is_some());
        let none = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(matches!(
            parse_jwks(none.to_string().as_bytes(), Instant::now()),
            Err(JwksError::NoUsableKeys { skipped: 1 })
        ));
        assert!(parse_jwks(b"not json", Instant::now()).is_err());
    }

    #[test]
    fn only_http_urls() {
        for url in ["ftp://x/jwks", "not a url", "file:///etc/jwks.json"] {
            assert!(
                JwksCache::new(url, JwksSettings::default()).is_err(),
                "{url}"
            );
        }
        assert!(JwksCache::new("https://idp.example/jwks.json", JwksSettings::default()).is_ok());
    }
}
