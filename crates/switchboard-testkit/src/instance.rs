//! One Switchboard instance as a real process: its command line ([`Opts`]),
//! starting it on a free port until `/healthz` answers, signals (SIGTERM,
//! SIGKILL, SIGSTOP, SIGCONT), restarting on the same port, and what a test
//! reads off it from outside (HTTP, `/metrics`, its log, its memory).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::http::{http_request, try_http_request, HttpResponse};
use crate::metrics::Metrics;
use crate::process::{log_tail, log_text, ChildGuard};
use crate::redis::{RedisCluster, RedisServer};

/// How an instance authenticates WebSocket upgrades.
#[derive(Clone, Debug)]
pub enum Auth {
    /// `--auth none`: identity from `?user=`.
    None,
    /// `--auth jwt --jwt-secret S`.
    Jwt(String),
    /// No `--auth` flag at all (server default), only `--jwt-secret S`.
    DefaultWithSecret(String),
    /// No auth flag at all: the server's default (`--auth jwt`) with
    /// whatever key flags the test adds (`--jwt-public-key`, `--jwks-url`).
    Default,
}

/// Command-line options of one instance. Defaults: embedded mode (no Redis),
/// `--auth none`, `--rate-limit 0`, server defaults for everything else.
/// Built with [`opts!`](crate::opts!), which knows where the binary is.
#[derive(Clone, Debug)]
pub struct Opts {
    /// The `switchboard` executable to run.
    pub binary: PathBuf,
    /// `--instance-id`.
    pub instance_id: String,
    /// `--redis-url`; embedded mode when None (and no `redis_cluster`).
    pub redis_url: Option<String>,
    /// `--redis-cluster SEEDS` (comma-separated `redis://` URLs).
    pub redis_cluster: Option<String>,
    /// `--routing` (routed, broadcast, user-channel).
    pub routing: Option<String>,
    /// `--auth` and `--jwt-secret`.
    pub auth: Auth,
    /// `--max-frame-bytes`.
    pub max_frame_bytes: Option<usize>,
    /// `--lease-ms`.
    pub lease_ms: Option<u64>,
    /// `--redis-prefix`.
    pub redis_prefix: Option<String>,
    /// `--outbound-queue`: frames queued per client before 1008.
    pub outbound_queue: Option<usize>,
    /// `RUST_LOG` of the process. None: `warn` for [`Instance::spawn`]
    /// (a log that shows what went wrong, not every connection), `info`
    /// for [`Instance::run_until_exit`] (all a refused start-up says).
    pub log_level: Option<String>,
    /// Any other `--flag value` pairs, passed as given.
    pub extra: Vec<(String, String)>,
}

impl Opts {
    /// Options for `binary` as instance `instance_id`; tests use
    /// [`opts!`](crate::opts!) instead. `SWITCHBOARD_TEST_BIN`, when set,
    /// replaces the binary: that is how a new test is run against an older
    /// build to show that it fails there.
    pub fn new(binary: impl Into<PathBuf>, instance_id: &str) -> Opts {
        let binary = std::env::var_os("SWITCHBOARD_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| binary.into());
        Opts {
            binary,
            instance_id: instance_id.to_string(),
            redis_url: None,
            redis_cluster: None,
            routing: None,
            auth: Auth::None,
            max_frame_bytes: None,
            lease_ms: None,
            redis_prefix: None,
            outbound_queue: None,
            log_level: None,
            extra: Vec::new(),
        }
    }

    /// Any other flag, e.g. `.flag("--rate-limit", "5")`. Tests run with
    /// `--rate-limit 0` (no limit) unless they set it: most send bursts.
    pub fn flag(mut self, flag: &str, value: impl ToString) -> Opts {
        self.extra.push((flag.to_string(), value.to_string()));
        self
    }

    /// Redis mode (`--redis-url`) on `redis`.
    pub fn redis(mut self, redis: &RedisServer) -> Opts {
        self.redis_url = Some(redis.url());
        self
    }

    /// Redis Cluster mode on `cluster`: `--redis-cluster` with its seeds.
    pub fn redis_cluster(mut self, cluster: &RedisCluster) -> Opts {
        self.redis_cluster = Some(cluster.seeds());
        self
    }

    /// Any Redis URL (e.g. a [`RedisProxy`](crate::RedisProxy)'s) instead
    /// of a [`RedisServer`]'s.
    pub fn redis_url(mut self, url: &str) -> Opts {
        self.redis_url = Some(url.to_string());
        self
    }

    /// `--routing mode`.
    pub fn routing(mut self, routing: &str) -> Opts {
        self.routing = Some(routing.to_string());
        self
    }

    /// How upgrades are authenticated.
    pub fn auth(mut self, auth: Auth) -> Opts {
        self.auth = auth;
        self
    }

    /// `--auth jwt --jwt-secret secret`.
    pub fn jwt(self, secret: &str) -> Opts {
        self.auth(Auth::Jwt(secret.to_string()))
    }

    /// `--max-frame-bytes n`.
    pub fn max_frame_bytes(mut self, n: usize) -> Opts {
        self.max_frame_bytes = Some(n);
        self
    }

    /// `--lease-ms ms`.
    pub fn lease_ms(mut self, ms: u64) -> Opts {
        self.lease_ms = Some(ms);
        self
    }

    /// `--redis-prefix prefix`.
    pub fn redis_prefix(mut self, prefix: &str) -> Opts {
        self.redis_prefix = Some(prefix.to_string());
        self
    }

    /// `--outbound-queue N`: frames queued per client before 1008.
    pub fn outbound_queue(mut self, n: usize) -> Opts {
        self.outbound_queue = Some(n);
        self
    }

    /// `RUST_LOG=level`, e.g. `info` for a test that reads start-up lines.
    pub fn log_level(mut self, level: &str) -> Opts {
        self.log_level = Some(level.to_string());
        self
    }

    /// The command that runs the binary on `listen`, logging at the
    /// chosen level or `default_level`. Only the command line configures a
    /// test instance: none of the test's `SWITCHBOARD_*` variables (they
    /// would configure the server) nor `NO_COLOR` (a test of the log's
    /// colours must see the server's own choice) reach it.
    fn command(&self, listen: SocketAddr, default_level: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("SWITCHBOARD_") || name == "NO_COLOR" {
                cmd.env_remove(&key);
            }
        }
        cmd.args(self.args(listen))
            .env(
                "RUST_LOG",
                self.log_level.as_deref().unwrap_or(default_level),
            )
            .stdin(Stdio::null());
        cmd
    }

    fn args(&self, listen: SocketAddr) -> Vec<String> {
        let mut args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--instance-id".to_string(),
            self.instance_id.clone(),
        ];
        let mut push = |flag: &str, value: String| {
            args.push(flag.to_string());
            args.push(value);
        };
        if let Some(url) = &self.redis_url {
            push("--redis-url", url.clone());
        }
        if let Some(seeds) = &self.redis_cluster {
            push("--redis-cluster", seeds.clone());
        }
        if let Some(routing) = &self.routing {
            push("--routing", routing.clone());
        }
        match &self.auth {
            Auth::None => push("--auth", "none".to_string()),
            Auth::Jwt(secret) => {
                push("--auth", "jwt".to_string());
                push("--jwt-secret", secret.clone());
            }
            Auth::DefaultWithSecret(secret) => push("--jwt-secret", secret.clone()),
            Auth::Default => {}
        }
        if let Some(n) = self.max_frame_bytes {
            push("--max-frame-bytes", n.to_string());
        }
        if let Some(ms) = self.lease_ms {
            push("--lease-ms", ms.to_string());
        }
        if let Some(prefix) = &self.redis_prefix {
            push("--redis-prefix", prefix.clone());
        }
        if let Some(n) = self.outbound_queue {
            push("--outbound-queue", n.to_string());
        }
        if !self.extra.iter().any(|(flag, _)| flag == "--rate-limit") {
            push("--rate-limit", "0".to_string());
        }
        for (flag, value) in &self.extra {
            push(flag, value.clone());
        }
        args
    }
}

/// A running `switchboard` process. Killed (SIGKILL) on drop; if the test is
/// panicking, the server's log is printed.
pub struct Instance {
    /// The process; SIGKILLed if still running when the instance is dropped.
    child: ChildGuard,
    /// Kept across [`Instance::respawn_same_port`], so clients reconnect
    /// to the same address.
    addr: SocketAddr,
    /// The `--instance-id` of the current process.
    id: String,
    /// Its stdout and stderr.
    log_path: PathBuf,
    /// Holds the log; shared with the processes that later serve this
    /// address ([`Instance::respawn_same_port`]), so one log tells it all.
    log_dir: Arc<TempDir>,
}

/// Reserves a free loopback port by binding port 0 and releasing it: where
/// an instance will listen, or an address where nothing listens.
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of reserved port")
}

/// The process exited before becoming healthy (maybe a port clash); the
/// text says how, with its log.
struct ExitedEarly(String);

impl Instance {
    /// Starts the binary and waits (up to 10s) until `GET /healthz` is 200.
    pub async fn spawn(opts: Opts) -> Instance {
        let mut last = String::new();
        for _attempt in 0..3 {
            match Self::try_spawn(&opts, free_port(), None).await {
                Ok(instance) => return instance,
                Err(ExitedEarly(msg)) => last = msg,
            }
        }
        panic!(
            "switchboard instance {} failed to start: {last}",
            opts.instance_id
        );
    }

    /// Runs the binary with `opts` expecting it to stop by itself (a refused
    /// start-up): returns its exit status and everything it wrote, or panics
    /// if it is still running (or became healthy) after `timeout`.
    pub async fn run_until_exit(opts: Opts, timeout: Duration) -> (ExitStatus, String) {
        let run = tokio::process::Command::from(opts.command(free_port(), "info"))
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(output)) => {
                let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&output.stderr));
                (output.status, text)
            }
            Ok(Err(e)) => panic!("spawn {}: {e}", opts.binary.display()),
            Err(_) => panic!(
                "instance {} was still running after {timeout:?}; it was expected to stop",
                opts.instance_id
            ),
        }
    }

    /// Spawns on `addr`; a respawn passes the previous log dir so one log
    /// file holds every process that served this address.
    async fn try_spawn(
        opts: &Opts,
        addr: SocketAddr,
        log_dir: Option<Arc<TempDir>>,
    ) -> Result<Instance, ExitedEarly> {
        let log_dir = match log_dir {
            Some(dir) => dir,
            None => Arc::new(tempfile::tempdir().expect("create a tempdir for the server log")),
        };
        let log_path = log_dir.path().join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create server log file");
        let log_err = log.try_clone().expect("clone server log handle");
        let child = opts
            .command(addr, "warn")
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", opts.binary.display()));
        let mut instance = Instance {
            child: ChildGuard(child),
            addr,
            id: opts.instance_id.clone(),
            log_path,
            log_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let health = try_http_request(addr, "GET", "/healthz", &[], b"").await;
            if let Ok(health) = health.as_ref().map_err(|_| ()) {
                // (A binary from before the header, SWITCHBOARD_TEST_BIN,
                // sends none: taken as ours.)
                let answered_by = health.header("x-switchboard-instance");
                let ours = answered_by.is_none_or(|id| id == opts.instance_id);
                if health.status == 200 && ours {
                    return Ok(instance);
                }
                if health.status == 200 {
                    // Another instance holds this port (two free_port()
                    // calls returned the same one): ours failed to bind.
                    return Err(ExitedEarly(format!(
                        "port {addr} answered /healthz as {answered_by:?}, not {}",
                        opts.instance_id
                    )));
                }
            }
            if let Ok(Some(status)) = instance.child.0.try_wait() {
                return Err(ExitedEarly(format!(
                    "exited with {status} before /healthz answered (args {:?}); log:\n{}",
                    opts.args(addr),
                    instance.log()
                )));
            }
            if Instant::now() > deadline {
                panic!(
                    "instance {} did not answer GET /healthz with 200 within 10s; log:\n{}",
                    instance.id,
                    instance.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The `--instance-id` of the running process.
    pub fn instance_id(&self) -> &str {
        &self.id
    }

    /// The address it listens on (HTTP and WebSocket).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A WebSocket upgrade request for `/ws?<query>` (query may be empty).
    pub fn ws_request(&self, query: &str) -> Request {
        crate::client::ws_request_at(self.addr, query)
    }

    /// A WebSocket upgrade request for `/ws` with `Authorization: Bearer <token>`.
    pub fn ws_request_bearer(&self, token: &str) -> Request {
        let mut req = self.ws_request("");
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("token must be a valid header value");
        req.headers_mut().insert("authorization", value);
        req
    }

    /// The server's combined stdout/stderr so far (its tail).
    pub fn log(&self) -> String {
        log_tail(&self.log_path)
    }

    /// All the server has written to stdout/stderr so far, for checks
    /// about every line (no colour codes anywhere).
    pub fn full_log(&self) -> String {
        log_text(&self.log_path)
    }

    /// Any HTTP request to this instance.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        http_request(self.addr, method, path, headers, body).await
    }

    /// `GET path`; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let response = self.http("GET", path, &[], b"").await;
        (response.status, response.text())
    }

    /// `GET path` status, or None when the instance does not answer.
    pub async fn http_status(&self, path: &str) -> Option<u16> {
        try_http_request(self.addr, "GET", path, &[], b"")
            .await
            .ok()
            .map(|response| response.status)
    }

    /// `GET path` with `Authorization: Bearer <key>` when `key` is given.
    pub async fn api_get(&self, path: &str, key: Option<&str>) -> HttpResponse {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = Vec::new();
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        self.http("GET", path, &headers, b"").await
    }

    /// `POST path` with a JSON content type, `body` as given, and
    /// `Authorization: Bearer <key>` when `key` is given.
    pub async fn api_post(&self, path: &str, key: Option<&str>, body: &[u8]) -> HttpResponse {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        self.http("POST", path, &headers, body).await
    }

    /// Everything `GET /metrics` shows now.
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics on {} returned {status}", self.id);
        Metrics::parse(&body).described_as(format!("GET /metrics on {}", self.id))
    }

    /// One series from `/metrics`, written as in the text (name and exact
    /// label set), e.g. `switchboard_bus_received_total{kind="personal"}`.
    /// A series the instance does not expose fails the test.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics().await.value(series)
    }

    fn signal(&self, signal: Signal, name: &str) {
        kill_process(Pid::from_child(&self.child.0), signal)
            .unwrap_or_else(|e| panic!("{name} to instance {}: {e}", self.id));
    }

    /// Sends SIGTERM (graceful shutdown) and returns at once.
    pub fn send_sigterm(&self) {
        self.signal(Signal::TERM, "SIGTERM");
    }

    /// Waits for the process to exit; panics (with the server log) on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.0.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("waiting for instance {} failed: {e}", self.id),
            }
            if Instant::now() > deadline {
                panic!(
                    "instance {} did not exit within {timeout:?}; log:\n{}",
                    self.id,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait (up to `timeout`) for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(timeout).await
    }

    /// SIGKILL (no cleanup at all) and reap the process.
    pub fn sigkill(&mut self) {
        self.child.0.kill().expect("SIGKILL the instance");
        self.child.0.wait().expect("reap the killed instance");
    }

    /// SIGSTOP: the process freezes; its sockets stay open.
    pub fn sigstop(&self) {
        self.signal(Signal::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`Instance::sigstop`].
    pub fn sigcont(&self) {
        self.signal(Signal::CONT, "SIGCONT");
    }

    /// Starts a new process with `opts` (typically a new instance id) on this
    /// instance's port, once the previous process has exited (panics if it is
    /// still running). The log file keeps the previous processes' output.
    pub async fn respawn_same_port(&mut self, opts: Opts) {
        assert!(
            matches!(self.child.0.try_wait(), Ok(Some(_))),
            "respawn_same_port: the previous process of {} is still running",
            self.id
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::try_spawn(&opts, self.addr, Some(self.log_dir.clone())).await {
                Ok(instance) => {
                    // The old (dead) child is dropped; the log dir is shared.
                    *self = instance;
                    return;
                }
                Err(ExitedEarly(msg)) => {
                    assert!(
                        Instant::now() < deadline,
                        "respawning {} on {} failed for 10s: {msg}",
                        opts.instance_id,
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Resident set size of the process in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kb(&self) -> u64 {
        let pid = self.child.0.id();
        procfs::process::Process::new(pid as i32)
            .and_then(|process| process.status())
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status of instance {}: {e}", self.id))
            .vmrss
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status of instance {}", self.id))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- log of switchboard instance {} -----\n{}\n-----",
                self.id,
                self.log()
            );
        }
    }
}
