//! Start-up as an operator sees it on stderr: an unreachable Redis fails
//! fast and says why, a weak JWT secret is warned about, the "listening"
//! line reads plainly, and a log that is not a terminal has no colour codes.
//!
//! Every run goes through the kit: a refused start-up through
//! `Instance::run_until_exit`, the others as an `Instance` logging at
//! `info` (the "listening" line is `info`), so `SWITCHBOARD_TEST_BIN`
//! applies. The log is a file (not a terminal) holding stdout and stderr
//! (the server logs to stderr only); the kit passes on none of the test's
//! `SWITCHBOARD_*` or `NO_COLOR`.

use std::time::{Duration, Instant};

use switchboard_testkit::{eventually, free_port, opts, Auth, Instance, Opts, RECV_TIMEOUT};

/// Starts `opts` logging at `info` and waits (up to 5 s) for its
/// "listening" line.
async fn listening(opts: Opts) -> Instance {
    let inst = Instance::spawn(opts.log_level("info")).await;
    let inst_ref = &inst;
    eventually(RECV_TIMEOUT, "a \"listening\" line", || async move {
        inst_ref.full_log().contains("listening")
    })
    .await;
    inst
}

/// `text` without ANSI colour codes (`ESC [ … m`), for checks about the
/// words of a line that must not also fail on colour (another test's job).
fn without_colour(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\x1b[") {
        plain.push_str(&rest[..at]);
        rest = &rest[at + 2..];
        let end = rest.find('m').map_or(rest.len(), |m| m + 1);
        rest = &rest[end..];
    }
    plain.push_str(rest);
    plain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_start_up_fast_saying_refused() {
    // Nothing listens on a port just released.
    let redis = format!("redis://{}", free_port());
    let started = Instant::now();
    let (status, log) =
        Instance::run_until_exit(opts!("s1").redis_url(&redis), Duration::from_secs(5)).await;
    assert!(
        !status.success(),
        "exit status {status} with Redis unreachable; log:\n{log}"
    );
    assert!(
        log.contains("refused"),
        "the log says the connection was refused (exit after {:?}):\n{log}",
        started.elapsed()
    );
    assert!(
        !log.contains("timed out"),
        "a refused connection is not reported as a timeout:\n{log}"
    );
}

/// Every connection is a file descriptor: `--max-connections` beyond what the
/// open-files limit can hold is refused at start-up, saying so; the limit
/// itself is raised and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_beyond_the_open_files_limit_is_refused() {
    // Linux never has an unlimited open-files limit (it is capped by
    // fs.nr_open), so there is always a value beyond it.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .expect("a finite open-files hard limit");
    let asked = hard + 1;
    let (status, log) = Instance::run_until_exit(
        opts!("s5").flag("--max-connections", asked),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status.code(), Some(2), "exit status {status}; log:\n{log}");
    assert!(
        log.contains(&format!("--max-connections {asked} cannot be held")),
        "it says why:\n{log}"
    );
    let instance = Instance::spawn(opts!("s6").log_level("info")).await;
    let log = instance.full_log();
    assert!(
        log.contains("open-files limit") && log.contains(&format!("hard={hard}")),
        "the limits are logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_jwt_secret_is_warned_about_and_a_32_byte_one_is_not() {
    let secret_warnings = |log: &str| {
        log.lines()
            .filter(|line| line.contains("WARN") && line.contains("jwt-secret"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let short = listening(opts!("s1").jwt("s3cret")).await;
    let log = without_colour(&short.full_log());
    let warnings = secret_warnings(&log);
    assert!(
        warnings.iter().any(|line| line.contains("32 ")),
        "a 6-byte secret is warned about, naming the 32 bytes HS256 needs; stderr:\n{log}"
    );

    let strong = "0123456789abcdef0123456789abcdef";
    assert_eq!(strong.len(), 32);
    let long = listening(opts!("s1").jwt(strong)).await;
    let log = without_colour(&long.full_log());
    assert_eq!(
        secret_warnings(&log),
        Vec::<String>::new(),
        "no warning for a 32-byte secret; stderr:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listening_line_shows_address_routing_and_the_page_plainly() {
    let process = listening(opts!("s1").auth(Auth::None)).await;
    let addr = process.addr();
    let log = without_colour(&process.full_log());
    let line = log
        .lines()
        .find(|line| line.contains("listening"))
        .expect("waited for it");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let plain_addr = format!("addr={addr}");
    assert!(
        fields.contains(&plain_addr.as_str()),
        "the address as {plain_addr}: {line}"
    );
    assert!(
        fields.contains(&"routing=routed"),
        "the routing mode as routing=routed: {line}"
    );
    assert!(
        line.contains(&format!("open http://{addr}/")),
        "a hint to open http://{addr}/: {line}"
    );
    assert!(!line.contains("Some("), "no Debug formatting: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_is_not_a_terminal_has_no_colour_codes() {
    // `--auth none` logs a warning too: every level is written plainly.
    let process = listening(opts!("s1").auth(Auth::None)).await;
    let log = process.full_log();
    assert!(log.contains("WARN"), "a warning was logged: {log:?}");
    assert!(
        !log.contains("\x1b["),
        "stderr is a pipe, so it has no ANSI escapes: {log:?}"
    );
}

/// `--redis-url` and `--redis-cluster` name two different deployments:
/// asking for both is refused before anything is connected.
#[tokio::test]
async fn redis_url_and_redis_cluster_together_are_refused() {
    let opts = opts!("s1")
        .redis_url("redis://127.0.0.1:1")
        .flag("--redis-cluster", "redis://127.0.0.1:2");
    let (status, log) = Instance::run_until_exit(opts, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(2), "a usage error; log:\n{log}");
    assert!(
        log.contains("--redis-url") && log.contains("--redis-cluster"),
        "the log names both flags:\n{log}"
    );
}
