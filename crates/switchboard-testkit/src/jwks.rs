//! A JWKS endpoint as an identity provider serves one, for `--jwks-url`:
//! plain HTTP on 127.0.0.1 (a port of its own), a key set a test replaces
//! while the server runs (key rotation), an outage it can be put into
//! (every answer a 503) or a stall (requests read, never answered), and a
//! count of the requests it received (to see that a server caches and
//! bounds its refetches).
//!
//! It answers every `GET` with the current set and closes the connection;
//! it is a test double, not an HTTP server: no keep-alive, no TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Reads one JWK (a JSON object with `kty`, `kid`, ...) from a file, e.g.
/// `tests/fixtures/rsa-a.jwk.json`.
pub fn jwk_from_file(path: impl AsRef<Path>) -> Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read JWK {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("JWK {} is not JSON: {e}", path.display()))
}

/// What the endpoint serves and what it has seen, shared with its tasks.
struct Shared {
    /// The body of the next answer: `{"keys": [...]}`.
    body: Mutex<Vec<u8>>,
    /// Requests received so far (503s and stalled ones included).
    requests: AtomicUsize,
    /// Whether every request is answered 503 (an outage).
    failing: AtomicBool,
    /// Whether requests are read and never answered (a hung provider).
    stalled: AtomicBool,
}

/// A running JWKS endpoint; stops (and closes every connection) when
/// dropped.
pub struct JwksServer {
    /// Where it listens.
    addr: SocketAddr,
    /// The key set and the request count.
    shared: Arc<Shared>,
    /// The accept loop, which owns every connection's task: aborting it
    /// ends them all.
    accept: JoinHandle<()>,
}

impl JwksServer {
    /// Starts serving `{"keys": keys}` on a free port of 127.0.0.1.
    pub async fn start(keys: &[Value]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the JWKS server on 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local_addr of the JWKS server");
        let shared = Arc::new(Shared {
            body: Mutex::new(key_set(keys)),
            requests: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        JwksServer {
            addr,
            shared,
            accept,
        }
    }

    /// The URL to pass as `--jwks-url`.
    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Serves `{"keys": keys}` from the next request on (a rotation).
    pub fn set_keys(&self, keys: &[Value]) {
        *self.shared.body.lock().expect("JWKS body lock") = key_set(keys);
    }

    /// While `failing`, every request is answered `503 Service
    /// Unavailable` (and still counted).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// While `stalled`, every request is read and left unanswered, its
    /// connection open until the server is dropped (a fetch that can only
    /// end by its own timeout). Counted like the others.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    /// How many requests it has received.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn key_set(keys: &[Value]) -> Vec<u8> {
    json!({ "keys": keys }).to_string().into_bytes()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(answer(stream, shared.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reads one request head (bounded in size and time) and answers it with
/// the current key set (a 503 while failing); anything that is not a `GET`
/// gets a 405.
async fn answer(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    if shared.stalled.load(Ordering::SeqCst) {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        // Ends when the accept loop, which owns this task, is aborted.
        std::future::pending::<()>().await;
    }
    let answer = if !head.starts_with(b"GET ") {
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_vec()
    } else if shared.failing.load(Ordering::SeqCst) {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_vec()
    } else {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let body = shared.body.lock().expect("JWKS body lock").clone();
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        answer
    };
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(server: &JwksServer) -> Value {
        let response =
            crate::http::http_request(server.addr, "GET", "/.well-known/jwks.json", &[], b"").await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    #[tokio::test]
    async fn serves_the_current_key_set_and_counts_requests() {
        let a = json!({"kty": "RSA", "kid": "a"});
        let b = json!({"kty": "RSA", "kid": "b"});
        let server = JwksServer::start(std::slice::from_ref(&a)).await;
        assert!(
            server.url().starts_with("http://127.0.0.1:"),
            "{}",
            server.url()
        );
        assert_eq!(server.requests(), 0);
        assert_eq!(get(&server).await, json!({"keys": [a]}));
        server.set_keys(std::slice::from_ref(&b));
        assert_eq!(get(&server).await, json!({"keys": [b]}));
        server.set_failing(true);
        let response =
            crate::http::http_request(server.addr, "GET", "/.well-known/jwks.json", &[], b"").await;
        assert_eq!(response.status, 503);
        server.set_failing(false);
        assert_eq!(get(&server).await, json!({"keys": [b]}));
        assert_eq!(server.requests(), 4);
        server.set_stalled(true);
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
        assert!(read.is_err(), "a stalled server answers nothing: {read:?}");
        assert_eq!(server.requests(), 5);
    }

    #[tokio::test]
    async fn stops_listening_when_dropped() {
        let server = JwksServer::start(&[]).await;
        let addr = server.addr;
        drop(server);
        // The abort takes effect at the accept loop's next poll.
        crate::wait::eventually(
            Duration::from_secs(5),
            "the port is closed",
            || async move { TcpStream::connect(addr).await.is_err() },
        )
        .await;
    }
}
