//! HTTP/1.1 requests to an instance (`/healthz`, `/metrics`, `/api/v1/*`),
//! over reqwest: one fresh connection per request, like `curl`, so nothing
//! stays open against the server between two requests (graceful shutdown
//! and connection counts are under test).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// One HTTP answer: status, headers and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code, e.g. 202.
    pub status: u16,
    /// Every header in order, names lower-cased, values as (lossy) text.
    pub headers: Vec<(String, String)>,
    /// The whole body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics (showing status and body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} answer is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Sends one request to `http://addr/path` and reads the whole answer:
/// 2 s to connect, 10 s in all. `headers` are sent as given; reqwest adds
/// `Host` and, for a body, `Content-Length` (`Content-Length: 0` too for an
/// empty body on any method but GET, as curl does: hyper would send none,
/// and the API refuses a POST without one).
pub async fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, reqwest::Error> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()?;
    let verb = reqwest::Method::from_bytes(method.as_bytes())
        .unwrap_or_else(|e| panic!("{method:?} is not an HTTP method: {e}"));
    let is_get = verb == reqwest::Method::GET;
    let mut request = client.request(verb, format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_empty() && !is_get {
        request = request.header(reqwest::header::CONTENT_LENGTH, "0");
    }
    if !body.is_empty() {
        request = request.body(body.to_vec());
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_string(), value)
        })
        .collect();
    let body = response.bytes().await?.to_vec();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// [`try_http_request`], panicking with the request in the message on failure.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr} failed: {e}"))
}
