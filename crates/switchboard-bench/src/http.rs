//! `GET` on an instance's HTTP endpoints (`/readyz`, `/metrics`) at
//! 127.0.0.1, through hyper-util's client, each request bounded in time.
//!
//! Every request opens its own connection and closes it after the response
//! (no idle pool): the benchmark's own traffic inside the measured window
//! stays one short connection per scrape, and no idle keep-alive connection
//! is left open on an instance that is about to be stopped. What the body
//! says is the caller's business (`openmetrics` parses `/metrics`).

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why a `GET` gave no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL could not be built (a bad path).
    #[error("GET {url}: not a valid URL: {source}")]
    Url {
        /// The URL as built.
        url: String,
        /// The parse error.
        source: hyper::http::uri::InvalidUri,
    },
    /// Connecting, sending, or reading the response head failed.
    #[error("GET {url}: {}", error_chain(source))]
    Request {
        /// The URL requested.
        url: String,
        /// The client's error (its sources say what happened).
        source: hyper_util::client::legacy::Error,
    },
    /// Reading the body failed.
    #[error("GET {url}: reading the body: {source}")]
    Body {
        /// The URL requested.
        url: String,
        /// The connection's error.
        source: hyper::Error,
    },
    /// No complete response within the bound.
    #[error("GET {url} timed out after {timeout:?}")]
    Timeout {
        /// The URL requested.
        url: String,
        /// The bound.
        timeout: Duration,
    },
}

/// An error and its sources, `outer: inner: innermost`: the client's own
/// message is only its kind ("client error (Connect)").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A response: status code and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, as text (invalid UTF-8 replaced).
    pub body: String,
}

/// A client for the instances of a cluster; cheap to clone (one per scrape task).
#[derive(Clone)]
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for HttpProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpProbe {
    /// A client without an idle-connection pool (see the module note).
    pub fn new() -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        HttpProbe { client }
    }

    /// `GET http://127.0.0.1:port{path}`, the whole exchange bounded by `timeout`.
    pub async fn get(
        &self,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let url = format!("http://127.0.0.1:{port}{path}");
        let uri: Uri = url.parse().map_err(|source| HttpError::Url {
            url: url.clone(),
            source,
        })?;
        let exchange = async {
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|source| HttpError::Request {
                    url: url.clone(),
                    source,
                })?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|source| HttpError::Body {
                    url: url.clone(),
                    source,
                })?
                .to_bytes();
            Ok(HttpResponse {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout { url, timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers one request on a loopback port with `response`, verbatim.
    async fn one_shot_server(response: &'static [u8]) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(response).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn reads_status_and_body_plain_and_chunked() {
        let probe = HttpProbe::new();
        let port = one_shot_server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nready",
        )
        .await;
        let r = probe
            .get(port, "/readyz", Duration::from_secs(5))
            .await
            .expect("response");
        assert_eq!((r.status, r.body.as_str()), (200, "ready"));
        let port = one_shot_server(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n",
        )
        .await;
        let r = probe
            .get(port, "/readyz", Duration::from_secs(5))
            .await
            .expect("response");
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_that_says_why() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let error = HttpProbe::new()
            .get(port, "/metrics", Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        let text = error.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}/metrics")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
}
