//! HTTP/1.1 spoken by hand over one TCP socket that stays open: requests
//! written byte for byte, answers read off the socket as they come. For
//! tests about sockets rather than requests: admission counted per socket,
//! an answer sent to a socket that never wrote, the head of a WebSocket
//! upgrade ([`RawWs`](crate::RawWs) is built on it). Ordinary requests use
//! [`http_request`](crate::http_request), which opens and closes its own
//! connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::HttpResponse;
use crate::wait::RECV_TIMEOUT;

/// One TCP connection to a server, written and read by the test alone.
pub struct RawHttp {
    /// The socket; nothing else reads or writes it.
    stream: TcpStream,
    /// The server, in panic messages.
    addr: SocketAddr,
    /// Bytes read past the last answer (after a 101: the first frames).
    pending: Vec<u8>,
}

impl RawHttp {
    /// Connects to `addr`; panics if it cannot.
    pub async fn connect(addr: SocketAddr) -> RawHttp {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        RawHttp {
            stream,
            addr,
            pending: Vec::new(),
        }
    }

    /// Writes `request` as it is, without reading anything, so that a test
    /// can have many requests in the server's hands before any answer.
    pub async fn send(&mut self, request: &[u8]) {
        self.stream
            .write_all(request)
            .await
            .unwrap_or_else(|e| panic!("send a request to {}: {e}", self.addr));
    }

    /// Reads one answer (within 5 s, or the test fails): its head, then a
    /// body as long as its Content-Length says, or up to the end of the
    /// connection (bounded). A 101 has no body; what follows it stays
    /// unread, for [`RawHttp::into_parts`].
    pub async fn read_answer(&mut self) -> HttpResponse {
        let addr = self.addr;
        tokio::time::timeout(RECV_TIMEOUT, self.read_answer_unbounded())
            .await
            .unwrap_or_else(|_| panic!("{addr} sent no answer within {RECV_TIMEOUT:?}"))
    }

    async fn read_answer_unbounded(&mut self) -> HttpResponse {
        let mut raw = std::mem::take(&mut self.pending);
        let head = loop {
            if let Some(head) = parse_head(&raw) {
                break head;
            }
            let n = self
                .stream
                .read_buf(&mut raw)
                .await
                .unwrap_or_else(|e| panic!("read an answer from {}: {e}", self.addr));
            assert!(
                n > 0,
                "{} closed before answering: {:?}",
                self.addr,
                String::from_utf8_lossy(&raw)
            );
        };
        let mut response = HttpResponse {
            status: head.status,
            headers: head.headers,
            body: Vec::new(),
        };
        let mut rest = raw.split_off(head.length);
        if response.status == 101 {
            self.pending = rest;
            return response;
        }
        let expected = response
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        assert!(
            response.header("transfer-encoding").is_none(),
            "a chunked answer from {}: RawHttp reads only Content-Length bodies",
            self.addr
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while expected.is_none_or(|len| rest.len() < len) {
                match self.stream.read_buf(&mut rest).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if let Some(len) = expected {
            self.pending = rest.split_off(len.min(rest.len()));
        }
        response.body = rest;
        response
    }

    /// Everything the server sends until it ends the connection (`true`:
    /// a clean end or a reset alike) or `timeout` passes (`false`).
    pub async fn read_to_end(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let mut got = std::mem::take(&mut self.pending);
        let ended = tokio::time::timeout(timeout, self.stream.read_to_end(&mut got))
            .await
            .is_ok();
        (got, ended)
    }

    /// The socket and the bytes already read past the last answer.
    pub(crate) fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.pending)
    }
}

/// A complete response head: status, headers, and its length in bytes.
struct Head {
    status: u16,
    /// As in [`HttpResponse::headers`].
    headers: Vec<(String, String)>,
    length: usize,
}

/// Parses the response head at the start of `raw` with httparse; None
/// until it is complete. Panics on bytes that are not an HTTP answer.
fn parse_head(raw: &[u8]) -> Option<Head> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut slots);
    let length = match response.parse(raw) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!(
            "not an HTTP answer ({e}): {:?}",
            String::from_utf8_lossy(raw)
        ),
    };
    let headers = response
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).into_owned();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect();
    Some(Head {
        status: response.code.expect("a complete head has a status"),
        headers,
        length,
    })
}
