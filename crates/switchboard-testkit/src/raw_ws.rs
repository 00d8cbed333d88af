//! A WebSocket upgraded by hand over a plain TCP socket, for traffic a
//! real client library would never produce or would hide: a client that
//! never answers pings, refused upgrades read byte for byte, floods written
//! in one go, the server's frames as raw opcodes and payloads, and a reset
//! told apart from a clean end (a browser shows a reset as close code 1006,
//! with the frames before it lost). The protocol tests use
//! [`Client`](crate::Client) instead.
//!
//! One encoder ([`encode_client_frame`]), one parser (for server frames),
//! one upgrade ([`RawWs::upgrade`]); the connection splits into a
//! [`RawReader`] and a [`RawWriter`] so that one task can keep writing
//! while another reads.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use crate::http::HttpResponse;
use crate::raw_http::RawHttp;

/// One frame the server sent (servers never mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// 0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong.
    pub opcode: u8,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

/// The opcodes (RFC 6455 §5.2) the tests name.
impl RawFrame {
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;

    /// For a Close frame: its code and reason.
    pub fn close_code_and_reason(&self) -> Option<(u16, String)> {
        if self.opcode != Self::CLOSE || self.payload.len() < 2 {
            return None;
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// One final, masked client frame (RFC 6455 §5.2: clients must mask), for
/// tests that write many frames in one go.
pub fn encode_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// Takes the first complete server frame off the front of `buffer`; None
/// until one is complete. Panics on a masked frame: a server must not mask.
fn take_server_frame(buffer: &mut Vec<u8>) -> Option<RawFrame> {
    if buffer.len() < 2 {
        return None;
    }
    let (len, at) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buffer[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    assert_eq!(buffer[1] & 0x80, 0, "the server sent a masked frame");
    if buffer.len() < at + len {
        return None;
    }
    let frame = RawFrame {
        opcode: buffer[0] & 0x0f,
        payload: buffer[at..at + len].to_vec(),
    };
    buffer.drain(..at + len);
    Some(frame)
}

/// How a connection ended, as the client saw it.
#[derive(Debug)]
pub struct Ending {
    /// Every frame read, in order, up to the end.
    pub frames: Vec<RawFrame>,
    /// `Err` when a read failed (a reset) instead of reaching the end.
    pub read: io::Result<()>,
}

impl Ending {
    /// The JSON text frames, in order.
    pub fn texts(&self) -> Vec<Value> {
        self.frames
            .iter()
            .filter(|f| f.opcode == RawFrame::TEXT)
            .map(|f| serde_json::from_slice(&f.payload).expect("a JSON text frame"))
            .collect()
    }

    /// Asserts a clean end: no reset, the Close frame last with `code`, and
    /// exactly one Close frame. Returns the close reason.
    pub fn assert_closed_with(&self, code: u16, what: &str) -> String {
        let opcodes: Vec<u8> = self.frames.iter().map(|f| f.opcode).collect();
        let last_opcodes = &opcodes[opcodes.len().saturating_sub(8)..];
        if let Err(e) = &self.read {
            panic!(
                "{what}: the connection was reset ({e}) instead of closed; {} frames arrived \
                 before, opcodes of the last ones: {last_opcodes:?}",
                self.frames.len(),
            );
        }
        let last = self
            .frames
            .last()
            .unwrap_or_else(|| panic!("{what}: no frame at all before the end"));
        let (got, reason) = last.close_code_and_reason().unwrap_or_else(|| {
            panic!(
                "{what}: the last frame is not a Close frame with a code (opcodes \
                 {last_opcodes:?})"
            )
        });
        assert_eq!(got, code, "{what}: close code (reason {reason:?})");
        assert_eq!(
            opcodes.iter().filter(|&&op| op == RawFrame::CLOSE).count(),
            1,
            "{what}: exactly one Close frame"
        );
        reason
    }
}

/// The reading half of a [`RawWs`]: nothing reads the socket, or answers
/// pings, unless the test does.
pub struct RawReader {
    /// Its own half of the socket, so that a writer task never waits on it.
    read: OwnedReadHalf,
    /// Bytes read but not yet taken as frames (first: those read with the
    /// 101 answer).
    buffer: Vec<u8>,
    /// Set once the server's Close frame has been read, so that the
    /// [`RawWriter`] can stop sending, as RFC 6455 asks of a client.
    server_closed: watch::Sender<bool>,
}

impl RawReader {
    /// The next frame; `Ok(None)` at a clean end, `Err` when a read fails.
    async fn next_frame(&mut self) -> io::Result<Option<RawFrame>> {
        loop {
            if let Some(frame) = take_server_frame(&mut self.buffer) {
                if frame.opcode == RawFrame::CLOSE {
                    self.server_closed.send_replace(true);
                }
                return Ok(Some(frame));
            }
            self.buffer.reserve(64 * 1024);
            if self.read.read_buf(&mut self.buffer).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Pushes every frame onto `frames` until the connection ends.
    async fn collect_frames(&mut self, frames: &mut Vec<RawFrame>) -> io::Result<()> {
        while let Some(frame) = self.next_frame().await? {
            frames.push(frame);
        }
        Ok(())
    }

    /// Reads until the server ends the connection, telling a clean end
    /// from a reset; panics if it has not ended within `timeout`.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Ending {
        let mut frames = Vec::new();
        match tokio::time::timeout(timeout, self.collect_frames(&mut frames)).await {
            Ok(read) => Ending { frames, read },
            Err(_) => panic!(
                "the server did not end the connection within {timeout:?}; {} frames arrived, \
                 the last: {:?}",
                frames.len(),
                frames.last()
            ),
        }
    }

    /// Reads everything until the server closes the TCP connection (or
    /// `timeout` passes). Returns the frames, and whether the connection
    /// ended (cleanly or by a reset alike) within the timeout.
    pub async fn read_until_closed(&mut self, timeout: Duration) -> (Vec<RawFrame>, bool) {
        let mut frames = Vec::new();
        let ended = tokio::time::timeout(timeout, self.collect_frames(&mut frames))
            .await
            .is_ok();
        (frames, ended)
    }

    /// Reads frames up to the first one that is `wanted` and returns them,
    /// that one last; what came after it stays unread. Panics, naming
    /// `what`, if the connection ends first or `timeout` passes.
    pub async fn read_until(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&RawFrame) -> bool,
    ) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        let found = tokio::time::timeout(timeout, async {
            loop {
                match self.next_frame().await {
                    Ok(Some(frame)) => {
                        let done = wanted(&frame);
                        frames.push(frame);
                        if done {
                            return;
                        }
                    }
                    Ok(None) => panic!("the connection ended before {what}"),
                    Err(e) => panic!("reading until {what} failed: {e}"),
                }
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "no {what} within {timeout:?}; frames: {frames:?}"
        );
        frames
    }
}

/// The writing half of a [`RawWs`]. Every write returns its error instead
/// of panicking: a failed write is how a test sees a reset.
pub struct RawWriter {
    /// Its own half of the socket; dropping it ends the client's side.
    write: OwnedWriteHalf,
    /// Whether the [`RawReader`] has read the server's Close frame.
    server_closed: watch::Receiver<bool>,
}

impl RawWriter {
    /// Writes `bytes` (frames from [`encode_client_frame`]) in one go.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write.write_all(bytes).await
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.send_bytes(&encode_client_frame(opcode, payload)).await
    }

    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send_frame(RawFrame::TEXT, text.as_bytes()).await
    }

    /// Whether the server's Close frame has been read by the reader.
    pub fn server_has_closed(&self) -> bool {
        *self.server_closed.borrow()
    }

    /// Once the server's Close has been read (waiting `wait` at most),
    /// answers with a Close (1000) and ends this side of the connection.
    pub async fn close_after_server(&mut self, wait: Duration) -> io::Result<()> {
        let _ = tokio::time::timeout(wait, self.server_closed.wait_for(|&closed| closed)).await;
        self.send_frame(RawFrame::CLOSE, &1000u16.to_be_bytes())
            .await?;
        self.write.shutdown().await
    }
}

/// A WebSocket connection upgraded by hand; [`RawWs::into_split`] gives
/// its halves to two tasks.
pub struct RawWs {
    /// Kept split from the start, so that [`RawWs::into_split`] is free.
    reader: RawReader,
    /// Shares the reader's Close signal.
    writer: RawWriter,
}

impl RawWs {
    /// The upgrade request for `GET /ws?<query>` (plus the `extra`
    /// headers), to send with [`RawHttp::send`] when a test needs many in
    /// flight at once.
    pub fn upgrade_request(addr: SocketAddr, query: &str, extra: &[(&str, &str)]) -> String {
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
        request
    }

    /// Sends the upgrade request for `/ws?<query>` (plus `extra`) and reads
    /// the answer's head. `Err` carries a non-101 answer, body and all.
    pub async fn upgrade(
        addr: SocketAddr,
        query: &str,
        extra: &[(&str, &str)],
    ) -> Result<RawWs, HttpResponse> {
        let mut http = RawHttp::connect(addr).await;
        http.send(Self::upgrade_request(addr, query, extra).as_bytes())
            .await;
        let answer = http.read_answer().await;
        if answer.status != 101 {
            return Err(answer);
        }
        let (stream, pending) = http.into_parts();
        let (read, write) = stream.into_split();
        let (closed_tx, closed_rx) = watch::channel(false);
        Ok(RawWs {
            reader: RawReader {
                read,
                buffer: pending,
                server_closed: closed_tx,
            },
            writer: RawWriter {
                write,
                server_closed: closed_rx,
            },
        })
    }

    /// [`RawWs::upgrade`] that must succeed: panics with the refusal.
    pub async fn connect(addr: SocketAddr, query: &str) -> RawWs {
        Self::upgrade(addr, query, &[]).await.unwrap_or_else(|r| {
            panic!(
                "upgrade /ws?{query} on {addr} refused: {} {}",
                r.status,
                r.text()
            )
        })
    }

    /// The reading and the writing half, for two tasks.
    pub fn into_split(self) -> (RawReader, RawWriter) {
        (self.reader, self.writer)
    }

    /// See [`RawWriter::send_frame`].
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.writer.send_frame(opcode, payload).await
    }

    /// See [`RawWriter::send_text`].
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.writer.send_text(text).await
    }

    /// See [`RawReader::read_to_end`].
    pub async fn read_to_end(&mut self, timeout: Duration) -> Ending {
        self.reader.read_to_end(timeout).await
    }

    /// See [`RawReader::read_until_closed`].
    pub async fn read_until_closed(&mut self, timeout: Duration) -> (Vec<RawFrame>, bool) {
        self.reader.read_until_closed(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame as the wire has it: final bit, opcode, length, payload.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = encode_client_frame(opcode, payload);
        let head = frame.len() - 4 - payload.len();
        frame[1] &= 0x7f;
        frame.truncate(head);
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn server_frames_of_each_length_form_are_taken_whole_and_in_order() {
        for len in [0, 125, 126, 0xffff, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buffer = server_frame(RawFrame::BINARY, &payload);
            buffer.extend(server_frame(RawFrame::PING, b"p"));
            let first = take_server_frame(&mut buffer).expect("a complete frame");
            assert_eq!((first.opcode, first.payload.len()), (RawFrame::BINARY, len));
            assert_eq!(first.payload, payload, "payload of length {len}");
            let second = take_server_frame(&mut buffer).expect("the next frame");
            assert_eq!(
                (second.opcode, second.payload),
                (RawFrame::PING, b"p".to_vec())
            );
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn an_incomplete_server_frame_stays_in_the_buffer() {
        let whole = server_frame(RawFrame::TEXT, &[b'x'; 300]);
        for cut in [1, 3, 4, 299] {
            let mut buffer = whole[..cut].to_vec();
            assert_eq!(take_server_frame(&mut buffer), None, "cut at {cut}");
            assert_eq!(buffer.len(), cut);
        }
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        let payload = b"{\"type\":\"ping\"}";
        let frame = encode_client_frame(RawFrame::TEXT, payload);
        assert_eq!(frame[0], 0x80 | RawFrame::TEXT);
        assert_eq!(frame[1], 0x80 | payload.len() as u8, "mask bit and length");
        let mask = &frame[2..6];
        let unmasked: Vec<u8> = frame[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, payload);
    }

    #[test]
    fn a_close_frame_gives_its_code_and_reason() {
        let close = RawFrame {
            opcode: RawFrame::CLOSE,
            payload: [&1008u16.to_be_bytes()[..], b"rate limit"].concat(),
        };
        assert_eq!(
            close.close_code_and_reason(),
            Some((1008, "rate limit".to_string()))
        );
        let text = RawFrame {
            opcode: RawFrame::TEXT,
            payload: close.payload.clone(),
        };
        assert_eq!(text.close_code_and_reason(), None);
    }
}
