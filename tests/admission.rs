//! Admission under concurrency (embedded mode): connection caps hold when
//! many upgrades arrive at once (slots are reserved before the 101, not
//! counted after it), and beyond the caps plus the HTTP headroom a socket
//! is answered 503 without being read.

use std::time::Duration;

use switchboard::admission::HTTP_HEADROOM;
use switchboard_testkit::{opts, Client, Instance, Opts, RECV_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Rounds per check, each on a fresh instance: the first with one runtime
/// thread (upgrades sent together are mostly all answered before any
/// session task runs, so an admission counted after the upgrade lets nearly
/// all of them in), the others on the default multi-threaded runtime, where
/// one round of the race may happen to pass.
const ROUNDS: usize = 5;

/// `--threads` for `round`: 1 first, then the default (0: one per core).
fn threads(round: usize) -> usize {
    if round == 0 {
        1
    } else {
        0
    }
}

/// Starts `opts` fresh (so no slot of an earlier round is still being
/// released) and sends every upgrade of `queries` at once: all sockets are
/// connected first, then every request is written, then the answers are
/// read, so the server has them all in hand together. Returns how many
/// were accepted (101) and the statuses of the others. The sockets stay
/// open until every answer has been read.
async fn concurrent_upgrades(opts: Opts, queries: Vec<String>) -> (usize, Vec<u16>) {
    let inst = Instance::spawn(opts).await;
    let mut sockets = Vec::new();
    for _ in &queries {
        sockets.push(TcpStream::connect(inst.addr()).await.expect("connect"));
    }
    for (socket, query) in sockets.iter_mut().zip(&queries) {
        let request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            inst.addr()
        );
        socket
            .write_all(request.as_bytes())
            .await
            .expect("send the upgrade request");
    }
    let mut answers = JoinSet::new();
    for mut socket in sockets {
        answers.spawn(async move {
            let head = read_for(&mut socket, RECV_TIMEOUT, |got| {
                got.windows(4).any(|w| w == b"\r\n\r\n")
            })
            .await;
            let status = head
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
            (status, socket)
        });
    }
    let mut open = Vec::new();
    let mut refused = Vec::new();
    while let Some(answer) = answers.join_next().await {
        match answer.expect("answer task") {
            (101, socket) => open.push(socket),
            (status, _) => refused.push(status),
        }
    }
    (open.len(), refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upgrades_of_one_user_admit_exactly_the_per_user_limit() {
    for round in 0..ROUNDS {
        let opts = opts!("a1")
            .flag("--max-connections-per-user", 2)
            .flag("--threads", threads(round));
        let queries = vec!["user=alice".to_string(); 20];
        let (accepted, refused) = concurrent_upgrades(opts, queries).await;
        assert_eq!(
            accepted, 2,
            "round {round} (--threads {}): 20 concurrent upgrades of alice with --max-connections-per-user 2",
            threads(round)
        );
        assert!(
            refused.iter().all(|&status| status == 429),
            "round {round}: the others are refused with 429: {refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upgrades_of_many_users_admit_exactly_max_connections() {
    for round in 0..ROUNDS {
        let opts = opts!("a2")
            .flag("--max-connections", 3)
            .flag("--threads", threads(round));
        let queries = (0..30).map(|i| format!("user=u{i}")).collect();
        let (accepted, refused) = concurrent_upgrades(opts, queries).await;
        assert_eq!(
            accepted,
            3,
            "round {round} (--threads {}): 30 concurrent upgrades with --max-connections 3",
            threads(round)
        );
        assert!(
            refused.iter().all(|&status| status == 503),
            "round {round}: the others are refused with 503: {refused:?}"
        );
    }
}

/// With `--max-connections 1`, the instance holds 1 + HTTP_HEADROOM sockets:
/// one WebSocket, then plain HTTP (a health check still answers when the
/// WebSocket slots are full). The next socket gets a fixed 503 without
/// sending a byte, and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_http_headroom_a_socket_is_answered_503_unread() {
    let inst = Instance::spawn(opts!("a3").flag("--max-connections", 1)).await;
    let _websocket = Client::connect_user(&inst, "alice").await;
    let mut idle = Vec::new();
    for _ in 0..HTTP_HEADROOM - 1 {
        idle.push(TcpStream::connect(inst.addr()).await.expect("connect"));
    }
    // The last socket of the headroom: a health check on a connection kept
    // open (HTTP/1.1 keep-alive), so that it still holds its place.
    let mut health = TcpStream::connect(inst.addr()).await.expect("connect");
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n\r\n")
        .await
        .expect("send GET /healthz");
    let answer = read_for(&mut health, RECV_TIMEOUT, |got| {
        got.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "/healthz answers within the headroom: {answer:?}"
    );

    // Beyond it: the answer comes though nothing was sent, then the end.
    let mut beyond = TcpStream::connect(inst.addr()).await.expect("connect");
    let (answer, ended) = read_to_end_for(&mut beyond, RECV_TIMEOUT).await;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "a socket beyond 1 + {HTTP_HEADROOM} is answered 503 unread: {answer:?}"
    );
    assert!(
        answer.contains("instance is full"),
        "the 503 says why: {answer:?}"
    );
    assert!(ended, "the refused socket is closed after its 503");
    drop(idle);
}

/// Reads from `stream` until `done` says the bytes so far are enough, the
/// peer closes, or `timeout` passes (which fails the test).
async fn read_for(
    stream: &mut TcpStream,
    timeout: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let finished = tokio::time::timeout(timeout, async {
        while !done(&got) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        finished.is_ok(),
        "no answer within {timeout:?} (got {text:?})"
    );
    text
}

/// Reads until the peer closes (`true`) or `timeout` passes (`false`).
async fn read_to_end_for(stream: &mut TcpStream, timeout: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let ended = tokio::time::timeout(timeout, stream.read_to_end(&mut got))
        .await
        .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), ended)
}
