//! Admission under concurrency (embedded mode): connection caps hold when
//! many upgrades arrive at once (slots are reserved before the 101, not
//! counted after it), and beyond the caps plus the HTTP headroom a socket
//! is answered 503 without being read.

use switchboard::admission::HTTP_HEADROOM;
use switchboard_testkit::{eventually, opts, Client, Instance, Opts, RawHttp, RawWs, RECV_TIMEOUT};
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
        sockets.push(RawHttp::connect(inst.addr()).await);
    }
    for (socket, query) in sockets.iter_mut().zip(&queries) {
        let request = RawWs::upgrade_request(inst.addr(), query, &[]);
        socket.send(request.as_bytes()).await;
    }
    let mut answers = JoinSet::new();
    for mut socket in sockets {
        answers.spawn(async move { (socket.read_answer().await.status, socket) });
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
        idle.push(RawHttp::connect(inst.addr()).await);
    }
    // The last socket of the headroom: a health check on a connection kept
    // open (HTTP/1.1 keep-alive), so that it still holds its place.
    let mut health = RawHttp::connect(inst.addr()).await;
    health
        .send(b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n\r\n")
        .await;
    let answer = health.read_answer().await;
    assert_eq!(
        answer.status, 200,
        "/healthz answers within the headroom: {answer:?}"
    );

    // Beyond it: the answer comes though nothing was sent, then the end.
    let mut beyond = RawHttp::connect(inst.addr()).await;
    let (answer, ended) = beyond.read_to_end(RECV_TIMEOUT).await;
    let answer = String::from_utf8_lossy(&answer);
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
    drop(health);
    // Once sockets are free again the instance answers, and counted the
    // refusal (polls that came too early were refused, and counted, too).
    let inst = &inst;
    eventually(RECV_TIMEOUT, "/healthz answers again", || async move {
        inst.http_status("/healthz").await == Some(200)
    })
    .await;
    assert!(inst.metric("switchboard_refused_sockets_total").await >= 1.0);
}
