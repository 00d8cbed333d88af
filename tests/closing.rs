//! Closes the server decides (RFC 6455 §7): the client gets the frames
//! already queued for it, then the Close frame with its code, then the end
//! of the connection — never a reset, even when it was still sending.
//!
//! The client here is a plain TCP socket speaking WebSocket by hand, so that
//! no client library can hide a reset: a read that fails with
//! `ConnectionReset` (or a write that fails at all) is what the user of a
//! browser sees as close code 1006, with the frames before it lost. (The
//! kit's `RawWs` only reads, and counts a reset as an end like any other.)

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_testkit::{opts, Instance, RawFrame, RECV_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PONG: u8 = 0xA;

/// One masked client frame (RFC 6455 §5.2; clients must mask).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
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

/// `{"type":"ping","id":N,"pad":"ppp…"}` as a client text frame, with `pad`
/// bytes of padding (an unknown field, ignored by the server).
fn ping_frame(id: usize, pad: usize) -> Vec<u8> {
    let ping = json!({"type": "ping", "id": id, "pad": "p".repeat(pad)});
    client_frame(TEXT, ping.to_string().as_bytes())
}

/// Takes the first complete (unmasked) server frame off the front of `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Option<RawFrame> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "the server sent a masked frame");
    if buf.len() < at + len {
        return None;
    }
    let frame = RawFrame {
        opcode: buf[0] & 0x0f,
        payload: buf[at..at + len].to_vec(),
    };
    buf.drain(..at + len);
    Some(frame)
}

/// How a connection ended, as the client saw it.
#[derive(Debug)]
struct Ending {
    /// Every frame after the upgrade, in order (the welcome first).
    frames: Vec<RawFrame>,
    /// `Err` when a read failed (a reset) instead of reaching the end.
    read: io::Result<()>,
}

impl Ending {
    /// The JSON text frames, in order.
    fn texts(&self) -> Vec<Value> {
        self.frames
            .iter()
            .filter(|f| f.opcode == TEXT)
            .map(|f| serde_json::from_slice(&f.payload).expect("a JSON text frame"))
            .collect()
    }

    /// Asserts a clean end: no reset, the Close frame last with `code`, and
    /// nothing but control frames after the last text frame. Returns the
    /// close reason.
    fn assert_closed_with(&self, code: u16, what: &str) -> String {
        let opcodes: Vec<u8> = self.frames.iter().map(|f| f.opcode).collect();
        if let Err(e) = &self.read {
            panic!(
                "{what}: the connection was reset ({e}) instead of closed; {} frames arrived \
                 before, opcodes of the last ones: {:?}",
                self.frames.len(),
                &opcodes[opcodes.len().saturating_sub(8)..]
            );
        }
        let last = self
            .frames
            .last()
            .unwrap_or_else(|| panic!("{what}: no frame at all before the end"));
        let (got, reason) = last.close_code_and_reason().unwrap_or_else(|| {
            panic!(
                "{what}: the last frame is not a Close frame with a code (opcodes {:?})",
                &opcodes[opcodes.len().saturating_sub(8)..]
            )
        });
        assert_eq!(got, code, "{what}: close code (reason {reason:?})");
        assert_eq!(
            opcodes.iter().filter(|&&op| op == CLOSE).count(),
            1,
            "{what}: exactly one Close frame"
        );
        reason
    }
}

/// A WebSocket upgraded by hand, split so that one task can keep writing
/// while another reads.
struct RawClient {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// Bytes read past the 101 answer.
    pending: Vec<u8>,
}

impl RawClient {
    /// Upgrades `/ws?user=<user>`; panics unless the answer is 101.
    async fn connect(addr: SocketAddr, user: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let request = format!(
            "GET /ws?user={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the upgrade request");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = tokio::time::timeout(RECV_TIMEOUT, async {
            loop {
                if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    return at + 4;
                }
                let n = stream
                    .read(&mut buf)
                    .await
                    .expect("read the upgrade answer");
                assert!(n > 0, "closed before answering the upgrade: {raw:?}");
                raw.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("an answer to the upgrade within 5 s");
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        let (reader, writer) = stream.into_split();
        RawClient {
            reader,
            writer,
            pending: raw[head_end..].to_vec(),
        }
    }
}

/// Reads frames until the server ends the connection (or `timeout`, which
/// fails the test). `closed` is told when the Close frame arrives, so the
/// writer can stop, as RFC 6455 asks of a client.
async fn read_to_end(
    mut reader: OwnedReadHalf,
    mut buf: Vec<u8>,
    closed: Option<watch::Sender<bool>>,
    timeout: Duration,
) -> Ending {
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(timeout, async {
        loop {
            while let Some(frame) = take_frame(&mut buf) {
                if frame.opcode == CLOSE {
                    if let Some(closed) = &closed {
                        let _ = closed.send(true);
                    }
                }
                frames.push(frame);
            }
            match reader.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match read {
        Ok(read) => Ending { frames, read },
        Err(_) => panic!(
            "the server did not end the connection within {timeout:?}; {} frames arrived, the \
             last: {:?}",
            frames.len(),
            frames.last()
        ),
    }
}

/// Writes `data` in one go; once the server's Close has arrived (5 s at
/// most), sends the client's Close and ends its side. Returns the first
/// write error.
async fn write_then_close(
    mut writer: OwnedWriteHalf,
    data: Vec<u8>,
    mut closed: watch::Receiver<bool>,
) -> io::Result<()> {
    writer.write_all(&data).await?;
    let _ = tokio::time::timeout(RECV_TIMEOUT, closed.wait_for(|&c| c)).await;
    writer
        .write_all(&client_frame(CLOSE, &[0x03, 0xe8]))
        .await?;
    writer.shutdown().await
}

/// The replies in short: pong ids, `E` for a `rate_limited` error.
fn summary(replies: &[Value]) -> String {
    let words: Vec<String> = replies
        .iter()
        .map(|reply| match (&reply["type"], &reply["code"]) {
            (t, _) if t == "pong" => reply["id"].to_string(),
            (_, c) if c == "rate_limited" => "E".to_string(),
            _ => reply.to_string(),
        })
        .collect();
    words.join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_reads_its_pongs_errors_and_1008_without_a_reset() {
    const FRAMES: usize = 1000;
    // Burst: the server default, 100.
    let inst = Instance::spawn(opts!("c1").flag("--rate-limit", 50)).await;
    let mut client = RawClient::connect(inst.addr(), "flood").await;
    // All written at once, before anything is read; padded to ~330 KB, more
    // than the server reads in one go (128 KiB), so that input is still
    // unread when it decides to close.
    let flood: Vec<u8> = (0..FRAMES).flat_map(|id| ping_frame(id, 300)).collect();
    let written = client.writer.write_all(&flood).await;
    let ending = read_to_end(client.reader, client.pending, None, Duration::from_secs(10)).await;

    let reason = ending.assert_closed_with(1008, "a flooding client");
    assert!(
        reason.contains("rate limit"),
        "close reason {reason:?} names the rate limit"
    );
    assert!(
        written.is_ok(),
        "the client's writes failed ({written:?}): the connection was reset"
    );
    let texts = ending.texts();
    assert_eq!(texts[0]["type"], "welcome", "{}", texts[0]);
    let replies = &texts[1..];
    // The burst is answered in order; then, once the bucket is empty, come
    // refusals: the 101st in a row (more than `--rate-burst`) is the close.
    assert!(
        replies.len() >= 200,
        "100 pongs and 100 refusals at least, got {} replies: {}",
        replies.len(),
        summary(replies)
    );
    for (i, reply) in replies.iter().enumerate().take(100) {
        assert_eq!(reply, &json!({"type": "pong", "id": i}), "reply {i}");
    }
    for reply in &replies[replies.len() - 100..] {
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "rate_limited", "{reply}");
    }
    assert!(
        replies.len() < FRAMES,
        "frames after the close decision were not processed: {} replies",
        replies.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_followed_by_more_data_gets_1009_without_a_reset() {
    let inst = Instance::spawn(opts!("c2").max_frame_bytes(1024)).await;
    let client = RawClient::connect(inst.addr(), "big").await;
    let (closed_tx, closed_rx) = watch::channel(false);
    // The oversized frame, then far more than the server reads at once
    // (its read buffer is 128 KiB): input still unread when it closes.
    let mut data = client_frame(TEXT, "z".repeat(2000).as_bytes());
    data.extend((0..400).flat_map(|id| ping_frame(id, 900)));
    let writer = tokio::spawn(write_then_close(client.writer, data, closed_rx));
    let ending = read_to_end(
        client.reader,
        client.pending,
        Some(closed_tx),
        Duration::from_secs(10),
    )
    .await;
    let written = writer.await.expect("writer task");

    ending.assert_closed_with(1009, "a frame over --max-frame-bytes");
    assert!(
        written.is_ok(),
        "the client's writes failed ({written:?}): the connection was reset"
    );
    let texts = ending.texts();
    assert_eq!(
        texts.len(),
        1,
        "only the welcome: nothing after the oversized frame is handled: {texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_client_is_sending_closes_it_with_1001_without_a_reset() {
    let mut inst = Instance::spawn(opts!("c3")).await;
    let mut client = RawClient::connect(inst.addr(), "busy").await;
    client
        .writer
        .write_all(&ping_frame(1, 0))
        .await
        .expect("send a ping");
    let (closed_tx, closed_rx) = watch::channel(false);
    // Sends without pause (unsolicited Pong frames, which need no reply, so
    // that the client's own reading is never the bottleneck) until the
    // server's Close arrives; then closes its side.
    let mut writer = client.writer;
    let sending = tokio::spawn(async move {
        let heartbeat = client_frame(PONG, &[b'h'; 125]);
        let batch: Vec<u8> = heartbeat.repeat(32);
        let sent_until_close = async {
            while !*closed_rx.borrow() {
                writer.write_all(&batch).await?;
            }
            writer
                .write_all(&client_frame(CLOSE, &[0x03, 0xe8]))
                .await?;
            writer.shutdown().await
        };
        tokio::time::timeout(Duration::from_secs(15), sent_until_close)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("still sending after 15 s")))
    });

    // SIGTERM once the connection has answered (the pong), while the
    // writer is busy.
    let mut reader = client.reader;
    let mut buf = client.pending;
    let mut chunk = [0u8; 4096];
    let mut before: Vec<RawFrame> = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, async {
        loop {
            while let Some(frame) = take_frame(&mut buf) {
                before.push(frame);
            }
            let pong = br#"{"type":"pong""#;
            if before
                .iter()
                .any(|f| f.opcode == TEXT && f.payload.starts_with(pong))
            {
                return;
            }
            let n = reader.read(&mut chunk).await.expect("read the pong");
            assert!(n > 0, "closed before the pong");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a pong within 5 s");
    inst.send_sigterm();
    let ending = read_to_end(reader, buf, Some(closed_tx), Duration::from_secs(10)).await;
    let written = sending.await.expect("writer task");

    let reason = ending.assert_closed_with(1001, "SIGTERM");
    assert!(
        written.is_ok(),
        "the client's writes failed ({written:?}): the connection was reset (close reason \
         {reason:?})"
    );
    let status = inst.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "graceful shutdown exits 0: {status}");
}
