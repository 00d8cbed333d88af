//! A WebSocket upgraded by hand over a plain TCP socket, for traffic a
//! real client library would never produce or would hide: a client that
//! never answers pings, refused upgrades read byte for byte, the server's
//! frames as raw opcodes and payloads. The protocol tests use
//! [`Client`](crate::Client) instead.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::HttpResponse;
use crate::wait::RECV_TIMEOUT;

/// A WebSocket connection upgraded by hand: nothing reads it or answers
/// pings unless the test does.
pub struct RawWs {
    /// The upgraded socket, read only by [`RawWs::read_until_closed`].
    stream: TcpStream,
    /// Bytes read past the 101 response headers (the first frames).
    pending: Vec<u8>,
}

/// One frame the server sent (servers never mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// 0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong.
    pub opcode: u8,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// For a Close frame: its code and reason.
    pub fn close_code_and_reason(&self) -> Option<(u16, String)> {
        if self.opcode != 0x8 || self.payload.len() < 2 {
            return None;
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// Parses unmasked server frames; a trailing incomplete frame is ignored.
fn parse_ws_frames(mut data: &[u8]) -> Vec<RawFrame> {
    let mut frames = Vec::new();
    while data.len() >= 2 {
        let opcode = data[0] & 0x0f;
        let masked = data[1] & 0x80 != 0;
        let (len, mut at) = match data[1] & 0x7f {
            126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
            127 if data.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if masked {
            at += 4;
        }
        let Some(payload) = data.get(at..at + len) else {
            break;
        };
        frames.push(RawFrame {
            opcode,
            payload: payload.to_vec(),
        });
        data = &data[at + len..];
    }
    frames
}

impl RawWs {
    /// Sends `GET /ws?<query>` with the upgrade headers (plus `extra`) and
    /// reads the answer's headers. `Err` carries a non-101 answer, body and
    /// all.
    pub async fn upgrade(
        addr: SocketAddr,
        query: &str,
        extra: &[(&str, &str)],
    ) -> Result<RawWs, HttpResponse> {
        let path = if query.is_empty() {
            "/ws".to_string()
        } else {
            format!("/ws?{query}")
        };
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (name, value) in extra {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let exchange = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            stream
                .write_all(request.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("send the upgrade request to {addr}: {e}"));
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let head = loop {
                if let Some(head) = parse_head(&raw) {
                    break head;
                }
                let n = stream
                    .read(&mut buf)
                    .await
                    .unwrap_or_else(|e| panic!("read the upgrade answer from {addr}: {e}"));
                assert!(
                    n > 0,
                    "{addr} closed before answering the upgrade: {:?}",
                    String::from_utf8_lossy(&raw)
                );
                raw.extend_from_slice(&buf[..n]);
            };
            if head.status == 101 {
                return Ok(RawWs {
                    stream,
                    pending: raw[head.length..].to_vec(),
                });
            }
            // The refusal's body: as long as its Content-Length says, or up
            // to the end of the connection (bounded).
            let response = HttpResponse {
                status: head.status,
                headers: head.headers,
                body: Vec::new(),
            };
            let expected = response
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            assert!(
                response.header("transfer-encoding").is_none(),
                "a chunked refusal from {addr}: RawWs reads only Content-Length bodies"
            );
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while expected.is_none_or(|len| raw.len() < head.length + len) {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            let mut body = raw[head.length..].to_vec();
            if let Some(len) = expected {
                body.truncate(len);
            }
            Err(HttpResponse { body, ..response })
        };
        tokio::time::timeout(RECV_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("websocket upgrade on {addr} got no answer within 5s"))
    }

    /// Reads everything until the server closes the TCP connection (or
    /// `timeout` passes). Returns the frames (including those read with the
    /// upgrade), and whether the connection ended within the timeout.
    pub async fn read_until_closed(&mut self, timeout: Duration) -> (Vec<RawFrame>, bool) {
        let mut data = std::mem::take(&mut self.pending);
        let mut buf = [0u8; 4096];
        let ended = tokio::time::timeout(timeout, async {
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .is_ok();
        (parse_ws_frames(&data), ended)
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
