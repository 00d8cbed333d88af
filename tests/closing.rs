//! Closes the server decides (RFC 6455 §7): the client gets the frames
//! already queued for it, then the Close frame with its code, then the end
//! of the connection — never a reset, even when it was still sending.
//!
//! The client here is the kit's `RawWs`, a plain TCP socket speaking
//! WebSocket by hand, so that no client library can hide a reset: a read
//! that fails with `ConnectionReset` (or a write that fails at all) is what
//! the user of a browser sees as close code 1006, with the frames before it
//! lost.

use std::io;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_testkit::{encode_client_frame, opts, Instance, RawFrame, RawWs, RECV_TIMEOUT};

/// `{"type":"ping","id":N,"pad":"ppp…"}` as a client text frame, with `pad`
/// bytes of padding (an unknown field, ignored by the server).
fn ping_frame(id: usize, pad: usize) -> Vec<u8> {
    let ping = json!({"type": "ping", "id": id, "pad": "p".repeat(pad)});
    encode_client_frame(RawFrame::TEXT, ping.to_string().as_bytes())
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
    let (mut reader, mut writer) = RawWs::connect(inst.addr(), "user=flood").await.into_split();
    // All written at once, before anything is read; padded to ~330 KB, more
    // than the server reads in one go (128 KiB), so that input is still
    // unread when it decides to close.
    let flood: Vec<u8> = (0..FRAMES).flat_map(|id| ping_frame(id, 300)).collect();
    let written = writer.send_bytes(&flood).await;
    let ending = reader.read_to_end(Duration::from_secs(10)).await;

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
    let (mut reader, mut writer) = RawWs::connect(inst.addr(), "user=big").await.into_split();
    // The oversized frame, then far more than the server reads at once
    // (its read buffer is 128 KiB): input still unread when it closes.
    let mut data = encode_client_frame(RawFrame::TEXT, "z".repeat(2000).as_bytes());
    data.extend((0..400).flat_map(|id| ping_frame(id, 900)));
    // Written in one go; then, once the server's Close has arrived (5 s at
    // most), the client's Close and the end of its side.
    let writer = tokio::spawn(async move {
        writer.send_bytes(&data).await?;
        writer.close_after_server(RECV_TIMEOUT).await
    });
    let ending = reader.read_to_end(Duration::from_secs(10)).await;
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
    let (mut reader, mut writer) = RawWs::connect(inst.addr(), "user=busy").await.into_split();
    writer
        .send_bytes(&ping_frame(1, 0))
        .await
        .expect("send a ping");
    // Sends without pause (unsolicited Pong frames, which need no reply, so
    // that the client's own reading is never the bottleneck) until the
    // server's Close arrives; then closes its side.
    let sending = tokio::spawn(async move {
        let heartbeat = encode_client_frame(RawFrame::PONG, &[b'h'; 125]);
        let batch: Vec<u8> = heartbeat.repeat(32);
        let sent_until_close = async {
            while !writer.server_has_closed() {
                writer.send_bytes(&batch).await?;
            }
            writer.close_after_server(RECV_TIMEOUT).await
        };
        tokio::time::timeout(Duration::from_secs(15), sent_until_close)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("still sending after 15 s")))
    });

    // SIGTERM once the connection has answered (the pong), while the
    // writer is busy.
    let pong = br#"{"type":"pong""#;
    reader
        .read_until("the pong", RECV_TIMEOUT, |f| {
            f.opcode == RawFrame::TEXT && f.payload.starts_with(pong)
        })
        .await;
    inst.send_sigterm();
    let ending = reader.read_to_end(Duration::from_secs(10)).await;
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
