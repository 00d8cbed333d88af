//! Start-up as an operator sees it on stderr: an unreachable Redis fails
//! fast and says why, a weak JWT secret is warned about, the "listening"
//! line reads plainly, and a log that is not a terminal has no colour codes.
//!
//! A refused start-up runs through the kit's `Instance::run_until_exit`.
//! The others run the binary by hand, since a kit `Instance` logs at `warn`
//! only (the "listening" line is `info`); the binary is the kit's, so
//! `SWITCHBOARD_TEST_BIN` applies.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_testkit::{opts, Instance, RECV_TIMEOUT};

/// A `switchboard` process whose stderr is collected as it is written.
/// Killed on drop.
struct Process {
    child: Child,
    /// Everything written to stderr so far, byte for byte (a thread copies
    /// the pipe into it until the process ends).
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// Reserves a free loopback port by binding port 0 and releasing it.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of reserved port")
}

impl Process {
    /// Runs the binary as `--instance-id s1` on a free port with `args`,
    /// logging at `info`, with stderr a pipe (not a terminal) and nothing of
    /// the test's `SWITCHBOARD_*` or `NO_COLOR`; waits (up to 5 s) for its
    /// "listening" line. Returns the process and its address.
    async fn listening(args: &[&str]) -> (Process, SocketAddr) {
        let addr = free_port();
        let binary = opts!("s1").binary;
        let mut cmd = Command::new(&binary);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("SWITCHBOARD_") || name == "NO_COLOR" {
                cmd.env_remove(&key);
            }
        }
        let mut child = cmd
            .args(["--instance-id", "s1", "--listen", &addr.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let collected = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .expect("stderr buffer")
                    .extend_from_slice(&buf[..n]);
            }
        });
        let mut process = Process { child, stderr };
        let deadline = Instant::now() + RECV_TIMEOUT;
        while !process.stderr().contains("listening") {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "exited ({status}) before its \"listening\" line; stderr:\n{}",
                    process.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no \"listening\" line within {RECV_TIMEOUT:?}; stderr:\n{}",
                process.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (process, addr)
    }

    /// Stderr so far, as (lossy) text.
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }
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

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_jwt_secret_is_warned_about_and_a_32_byte_one_is_not() {
    let secret_warnings = |log: &str| {
        log.lines()
            .filter(|line| line.contains("WARN") && line.contains("jwt-secret"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (short, _) = Process::listening(&["--auth", "jwt", "--jwt-secret", "s3cret"]).await;
    let log = without_colour(&short.stderr());
    let warnings = secret_warnings(&log);
    assert!(
        warnings.iter().any(|line| line.contains("32 ")),
        "a 6-byte secret is warned about, naming the 32 bytes HS256 needs; stderr:\n{log}"
    );

    let strong = "0123456789abcdef0123456789abcdef";
    assert_eq!(strong.len(), 32);
    let (long, _) = Process::listening(&["--auth", "jwt", "--jwt-secret", strong]).await;
    let log = without_colour(&long.stderr());
    assert_eq!(
        secret_warnings(&log),
        Vec::<String>::new(),
        "no warning for a 32-byte secret; stderr:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listening_line_shows_address_routing_and_the_page_plainly() {
    let (process, addr) = Process::listening(&["--auth", "none"]).await;
    let log = without_colour(&process.stderr());
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
    let (process, _) = Process::listening(&["--auth", "none"]).await;
    let log = process.stderr();
    assert!(log.contains("WARN"), "a warning was logged: {log:?}");
    assert!(
        !log.contains("\x1b["),
        "stderr is a pipe, so it has no ANSI escapes: {log:?}"
    );
}
