//! Shared helpers for the black-box integration tests.
//!
//! Every test file does `mod support;` and uses only these helpers:
//! - [`RedisServer`]: a private `redis-server` on a unix socket, killed on drop.
//! - [`Spy`]: a `PSUBSCRIBE` listener recording every bus message.
//! - [`Instance`]: the built `switchboard` binary on a free port, killed on drop.
//! - [`Client`]: a WebSocket client speaking the JSON protocol.
//! - [`RedisProxy`]: a byte-level proxy in front of a [`RedisServer`] that can
//!   drop an instance's subscriptions without a disconnection (fault tests).
//! - [`mint_jwt`], [`eventually`], [`metric_value`], [`rss_kb`].

// Each test binary compiles this module separately and uses a subset of it.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Default timeout for a single expected frame.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Default wait used by "receives nothing" assertions.
pub const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Kills (SIGKILL) and reaps the child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_log(path: &PathBuf) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    // Keep panic messages readable: only the tail matters.
    let max = 8000;
    if text.len() > max {
        let mut cut = text.len() - max;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("...{}", &text[cut..]);
    }
    text
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A private `redis-server` listening only on a unix socket in a fresh tempdir.
pub struct RedisServer {
    conn: redis::aio::MultiplexedConnection,
    client: redis::Client,
    url: String,
    child: ChildGuard,
    dir: TempDir,
}

impl RedisServer {
    /// Starts redis-server and waits until it answers PING. Panics if
    /// `redis-server` is not installed (the suite never skips).
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("create a tempdir for redis-server");
        let (child, client, conn) = Self::launch(&dir).await;
        let url = format!("redis+unix://{}", dir.path().join("redis.sock").display());
        RedisServer {
            conn,
            client,
            url,
            child,
            dir,
        }
    }

    /// Spawns redis-server on `<dir>/redis.sock` (no persistence, so a restart
    /// is always empty) and waits up to 10s until it answers PING.
    async fn launch(
        dir: &TempDir,
    ) -> (ChildGuard, redis::Client, redis::aio::MultiplexedConnection) {
        let sock = dir.path().join("redis.sock");
        let log_path = dir.path().join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create redis-server log file");
        let spawned = Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&sock)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => ChildGuard(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server not found: install it (Debian: apt-get install redis-server) — see README"
            ),
            Err(e) => panic!("failed to start redis-server: {e}"),
        };
        let url = format!("redis+unix://{}", sock.display());
        let client = redis::Client::open(url.as_str()).expect("redis url should be valid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            if sock.exists() {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        break conn;
                    }
                }
            }
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!(
                    "redis-server exited during startup ({status}); log:\n{}",
                    read_log(&log_path)
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING on {url} within 10s; log:\n{}",
                read_log(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (child, client, conn)
    }

    /// Kills the redis-server with SIGKILL (no shutdown, no save) and reaps it.
    /// Until [`RedisServer::restart`], every [`RedisServer::cmd`] fails.
    pub fn kill(&mut self) {
        self.child
            .0
            .kill()
            .expect("SIGKILL the redis-server process");
        self.child.0.wait().expect("reap the redis-server process");
    }

    /// Starts a fresh, empty redis-server on the same unix socket path (after
    /// [`RedisServer::kill`]); returns the moment it first answered PING.
    pub async fn restart(&mut self) -> Instant {
        assert!(
            matches!(self.child.0.try_wait(), Ok(Some(_))),
            "restart() needs the previous redis-server to be dead (call kill() first)"
        );
        let (child, client, conn) = Self::launch(&self.dir).await;
        let answered = Instant::now();
        self.child = child;
        self.client = client;
        self.conn = conn;
        answered
    }

    /// Path of the unix socket the server listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix:///<dir>/redis.sock`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A plain redis client for this server.
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// Runs one command (e.g. `&["HGETALL", "sb:presence:{bob}"]`), panicking
    /// with the command in the message if it fails.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => panic!("redis command {args:?} failed: {e}"),
        }
    }

    /// Like [`RedisServer::cmd`] but returns the error instead of panicking.
    pub async fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await
    }

    /// `ZSCORE key member` (None when the member is absent).
    pub async fn zscore(&self, key: &str, member: &str) -> Option<f64> {
        self.cmd(&["ZSCORE", key, member]).await
    }

    pub async fn hgetall(&self, key: &str) -> HashMap<String, String> {
        self.cmd(&["HGETALL", key]).await
    }

    pub async fn smembers(&self, key: &str) -> Vec<String> {
        self.cmd(&["SMEMBERS", key]).await
    }

    pub async fn exists(&self, key: &str) -> bool {
        self.cmd::<i64>(&["EXISTS", key]).await == 1
    }

    /// PTTL in ms: -2 if the key is missing, -1 if it has no TTL.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.cmd(&["PTTL", key]).await
    }

    /// `PUBSUB NUMSUB channel`: number of subscribers of one channel.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let reply: (String, i64) = self.cmd(&["PUBSUB", "NUMSUB", channel]).await;
        reply.1
    }

    /// Starts a spy that PSUBSCRIBEs `pattern`; the subscription is active
    /// when this returns.
    pub async fn spy(&self, pattern: &str) -> Spy {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .expect("spy: open a pubsub connection");
        pubsub
            .psubscribe(pattern)
            .await
            .expect("spy: PSUBSCRIBE failed");
        let seen: Arc<Mutex<Vec<BusMessage>>> = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let entry = BusMessage {
                    channel: msg.get_channel_name().to_string(),
                    payload: msg.get_payload_bytes().to_vec(),
                };
                sink.lock().expect("spy mutex poisoned").push(entry);
            }
        });
        Spy { seen, task }
    }
}

/// One message seen on the bus.
#[derive(Clone, Debug)]
pub struct BusMessage {
    pub channel: String,
    pub payload: Vec<u8>,
}

impl BusMessage {
    pub fn contains(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        !needle.is_empty() && self.payload.windows(needle.len()).any(|w| w == needle)
    }
}

/// Records every message published on channels matching its pattern.
pub struct Spy {
    seen: Arc<Mutex<Vec<BusMessage>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Spy {
    pub fn messages(&self) -> Vec<BusMessage> {
        self.seen.lock().expect("spy mutex poisoned").clone()
    }

    /// Messages whose payload contains `needle` (e.g. a unique body marker).
    pub fn containing(&self, needle: &str) -> Vec<BusMessage> {
        self.messages()
            .into_iter()
            .filter(|m| m.contains(needle))
            .collect()
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Redis proxy (fault injection)
// ---------------------------------------------------------------------------

/// A byte-for-byte unix-socket proxy in front of a [`RedisServer`]. Point an
/// instance at [`RedisProxy::url`] and it talks to Redis through the proxy.
///
/// Its one trick, [`RedisProxy::drop_subscriptions_silently`], makes Redis
/// forget subscriptions of the subscriber connections (those that sent a
/// SUBSCRIBE) without any disconnection: it injects `UNSUBSCRIBE` upstream and
/// swallows Redis's RESP3 confirmation pushes, so the client sees nothing.
pub struct RedisProxy {
    url: String,
    /// Added before forwarding each chunk towards Redis (commands only).
    delay: Arc<Mutex<Duration>>,
    subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    _dir: TempDir,
}

/// A subscriber connection's handles: bytes to inject upstream, and the
/// confirmation pushes to swallow on the way back.
#[derive(Clone)]
struct ProxyConn {
    inject: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    swallow: Arc<Mutex<Vec<Swallow>>>,
}

struct Swallow {
    /// The push up to its final integer: `>3 unsubscribe <channel> :`.
    prefix: Vec<u8>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Removes every complete pending push from `pending` and returns the bytes
/// that can be forwarded now (a tail that may be the start of a pending push
/// is held back until more bytes arrive).
fn strip_swallowed(pending: &mut Vec<u8>, swallow: &Mutex<Vec<Swallow>>) -> Vec<u8> {
    let mut list = swallow.lock().expect("proxy mutex poisoned");
    loop {
        let mut matched = false;
        for entry in list.iter_mut().filter(|e| e.done.is_some()) {
            let Some(start) = find_bytes(pending, &entry.prefix) else {
                continue;
            };
            let after = start + entry.prefix.len();
            let Some(end) = find_bytes(&pending[after..], b"\r\n") else {
                continue;
            };
            pending.drain(start..after + end + 2);
            if let Some(done) = entry.done.take() {
                let _ = done.send(());
            }
            matched = true;
            break;
        }
        if !matched {
            break;
        }
    }
    list.retain(|e| e.done.is_some());
    let mut hold = 0;
    for entry in list.iter() {
        if let Some(start) = find_bytes(pending, &entry.prefix) {
            hold = hold.max(pending.len() - start);
        }
        for k in (1..entry.prefix.len().min(pending.len() + 1)).rev() {
            if pending.ends_with(&entry.prefix[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    let forward = pending.len() - hold;
    pending.drain(..forward).collect()
}

impl RedisProxy {
    /// Listens on a fresh unix socket and forwards every connection to `redis`.
    pub async fn start(redis: &RedisServer) -> RedisProxy {
        let dir = tempfile::tempdir().expect("create a tempdir for the proxy");
        let path = dir.path().join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy socket");
        let upstream = redis.socket_path();
        let subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let delay: Arc<Mutex<Duration>> = Arc::default();
        let (subs, all_tasks, conn_delay) = (subscribers.clone(), tasks.clone(), delay.clone());
        let accept = tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                next_id += 1;
                let task = tokio::spawn(proxy_connection(
                    next_id,
                    client,
                    upstream.clone(),
                    subs.clone(),
                    conn_delay.clone(),
                ));
                all_tasks
                    .lock()
                    .expect("proxy mutex poisoned")
                    .push(task.abort_handle());
            }
        });
        tasks
            .lock()
            .expect("proxy mutex poisoned")
            .push(accept.abort_handle());
        RedisProxy {
            url: format!("redis+unix://{}", path.display()),
            delay,
            subscribers,
            tasks,
            _dir: dir,
        }
    }

    /// `redis+unix:///<dir>/proxy.sock`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// From now on, every chunk a client sends towards Redis waits `delay`
    /// first (replies and pushes are not delayed): a slow Redis for writes.
    pub fn delay_commands(&self, delay: Duration) {
        *self.delay.lock().expect("proxy mutex poisoned") = delay;
    }

    /// Number of live connections that subscribed through the proxy.
    pub fn subscriber_connections(&self) -> usize {
        self.subscribers.lock().expect("proxy mutex poisoned").len()
    }

    /// Makes Redis unsubscribe every subscriber connection from `channels`
    /// while the clients see nothing (no push, no disconnection). Returns
    /// once Redis confirmed each unsubscription (confirmations swallowed).
    pub async fn drop_subscriptions_silently(&self, channels: &[&str]) {
        let conns: Vec<ProxyConn> = self
            .subscribers
            .lock()
            .expect("proxy mutex poisoned")
            .values()
            .cloned()
            .collect();
        assert!(
            !conns.is_empty(),
            "no subscriber connection goes through the proxy"
        );
        let mut command = format!("*{}\r\n$11\r\nUNSUBSCRIBE\r\n", channels.len() + 1);
        for channel in channels {
            command.push_str(&format!("${}\r\n{channel}\r\n", channel.len()));
        }
        let mut confirmations = Vec::new();
        for conn in &conns {
            {
                let mut swallow = conn.swallow.lock().expect("proxy mutex poisoned");
                for channel in channels {
                    let (done, confirmed) = tokio::sync::oneshot::channel();
                    let prefix = format!(
                        ">3\r\n$11\r\nunsubscribe\r\n${}\r\n{channel}\r\n:",
                        channel.len()
                    );
                    swallow.push(Swallow {
                        prefix: prefix.into_bytes(),
                        done: Some(done),
                    });
                    confirmations.push((channel.to_string(), confirmed));
                }
            }
            conn.inject
                .send(command.clone().into_bytes())
                .expect("proxy connection task is gone");
        }
        for (channel, confirmed) in confirmations {
            tokio::time::timeout(Duration::from_secs(5), confirmed)
                .await
                .unwrap_or_else(|_| {
                    panic!("redis did not confirm the injected UNSUBSCRIBE {channel} within 5s")
                })
                .expect("proxy connection ended before the UNSUBSCRIBE was confirmed");
        }
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().expect("proxy mutex poisoned").iter() {
            task.abort();
        }
    }
}

async fn proxy_connection(
    id: u64,
    client: tokio::net::UnixStream,
    upstream: PathBuf,
    subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>>,
    delay: Arc<Mutex<Duration>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(upstream) = tokio::net::UnixStream::connect(&upstream).await else {
        return; // Redis is down: the client sees the connection close.
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut redis_rx, mut redis_tx) = upstream.into_split();
    let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let swallow: Arc<Mutex<Vec<Swallow>>> = Arc::default();
    let conn = ProxyConn {
        inject,
        swallow: swallow.clone(),
    };
    let registry = subscribers.clone();
    let to_redis = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut registered = false;
        loop {
            tokio::select! {
                read = client_rx.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !registered && find_bytes(&buf[..n], b"SUBSCRIBE").is_some() {
                        registered = true;
                        registry
                            .lock()
                            .expect("proxy mutex poisoned")
                            .insert(id, conn.clone());
                    }
                    let wait = *delay.lock().expect("proxy mutex poisoned");
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    if redis_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Some(bytes) = injected.recv() => {
                    if redis_tx.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let to_client = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = match redis_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let forward = strip_swallowed(&mut pending, &swallow);
            if client_tx.write_all(&forward).await.is_err() {
                return;
            }
        }
    };
    // Either side closing closes both.
    tokio::select! {
        _ = to_redis => {}
        _ = to_client => {}
    }
    subscribers
        .lock()
        .expect("proxy mutex poisoned")
        .remove(&id);
}

// ---------------------------------------------------------------------------
// Switchboard instances
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum Auth {
    /// `--auth none`: identity from `?user=`.
    None,
    /// `--auth jwt --jwt-secret S`.
    Jwt(String),
    /// No `--auth` flag at all (server default), only `--jwt-secret S`.
    DefaultWithSecret(String),
}

/// Command-line options of one instance. Defaults: embedded mode (no Redis),
/// `--auth none`, server defaults for everything else.
#[derive(Clone, Debug)]
pub struct Opts {
    pub instance_id: String,
    pub redis_url: Option<String>,
    pub routing: Option<String>,
    pub auth: Auth,
    pub max_frame_bytes: Option<usize>,
    pub lease_ms: Option<u64>,
    pub redis_prefix: Option<String>,
    pub outbound_queue: Option<usize>,
    /// Any other `--flag value` pairs, passed as given.
    pub extra: Vec<(String, String)>,
}

impl Opts {
    pub fn new(instance_id: &str) -> Opts {
        Opts {
            instance_id: instance_id.to_string(),
            redis_url: None,
            routing: None,
            auth: Auth::None,
            max_frame_bytes: None,
            lease_ms: None,
            redis_prefix: None,
            outbound_queue: None,
            extra: Vec::new(),
        }
    }

    /// Any other flag, e.g. `.flag("--rate-limit", "5")`. Tests run with
    /// `--rate-limit 0` (no limit) unless they set it: most send bursts.
    pub fn flag(mut self, flag: &str, value: impl ToString) -> Opts {
        self.extra.push((flag.to_string(), value.to_string()));
        self
    }

    pub fn redis(mut self, redis: &RedisServer) -> Opts {
        self.redis_url = Some(redis.url());
        self
    }

    /// Any Redis URL (e.g. a [`RedisProxy`]'s) instead of a [`RedisServer`]'s.
    pub fn redis_url(mut self, url: &str) -> Opts {
        self.redis_url = Some(url.to_string());
        self
    }

    pub fn routing(mut self, routing: &str) -> Opts {
        self.routing = Some(routing.to_string());
        self
    }

    pub fn auth(mut self, auth: Auth) -> Opts {
        self.auth = auth;
        self
    }

    pub fn jwt(self, secret: &str) -> Opts {
        self.auth(Auth::Jwt(secret.to_string()))
    }

    pub fn max_frame_bytes(mut self, n: usize) -> Opts {
        self.max_frame_bytes = Some(n);
        self
    }

    pub fn lease_ms(mut self, ms: u64) -> Opts {
        self.lease_ms = Some(ms);
        self
    }

    pub fn redis_prefix(mut self, prefix: &str) -> Opts {
        self.redis_prefix = Some(prefix.to_string());
        self
    }

    /// `--outbound-queue N`: frames queued per client before 1008.
    pub fn outbound_queue(mut self, n: usize) -> Opts {
        self.outbound_queue = Some(n);
        self
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
    child: ChildGuard,
    addr: SocketAddr,
    id: String,
    log_path: PathBuf,
    _dir: Arc<TempDir>,
}

/// Reserves a free loopback port by binding port 0 and releasing it.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of reserved port")
}

enum SpawnError {
    /// The process exited before becoming healthy (maybe a port clash).
    Exited(String),
}

impl Instance {
    /// Starts the binary and waits (up to 10s) until `GET /healthz` is 200.
    pub async fn spawn(opts: Opts) -> Instance {
        let mut last = String::new();
        for _attempt in 0..3 {
            match Self::try_spawn(&opts, free_port(), None).await {
                Ok(instance) => return instance,
                Err(SpawnError::Exited(msg)) => last = msg,
            }
        }
        panic!(
            "switchboard instance {} failed to start: {last}",
            opts.instance_id
        );
    }

    /// Spawns on `addr`; a respawn passes the previous log dir so one log
    /// file holds every process that served this address.
    async fn try_spawn(
        opts: &Opts,
        addr: SocketAddr,
        dir: Option<Arc<TempDir>>,
    ) -> Result<Instance, SpawnError> {
        let dir = match dir {
            Some(dir) => dir,
            None => Arc::new(tempfile::tempdir().expect("create a tempdir for the server log")),
        };
        let log_path = dir.path().join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create server log file");
        let log_err = log.try_clone().expect("clone server log handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SWITCHBOARD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .args(opts.args(addr))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .expect("spawn the switchboard binary");
        let mut instance = Instance {
            child: ChildGuard(child),
            addr,
            id: opts.instance_id.clone(),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, _)) = instance.try_http_get("/healthz").await {
                return Ok(instance);
            }
            if let Ok(Some(status)) = instance.child.0.try_wait() {
                return Err(SpawnError::Exited(format!(
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

    pub fn instance_id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A WebSocket upgrade request for `/ws?<query>` (query may be empty).
    pub fn ws_request(&self, query: &str) -> Request {
        let url = if query.is_empty() {
            self.ws_url()
        } else {
            format!("{}?{query}", self.ws_url())
        };
        url.into_client_request().expect("build websocket request")
    }

    /// A WebSocket upgrade request for `/ws` with `Authorization: Bearer <token>`.
    pub fn ws_request_bearer(&self, token: &str) -> Request {
        let mut req = self.ws_request("");
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("token must be a valid header value");
        req.headers_mut().insert("authorization", value);
        req
    }

    /// The server's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    async fn try_http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = self.addr;
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get_blocking(addr, &path))
            .await
            .expect("http_get task panicked")
    }

    /// Plain HTTP/1.1 GET; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        match self.try_http_get(path).await {
            Ok(reply) => reply,
            Err(e) => panic!("GET {path} on instance {} failed: {e}", self.id),
        }
    }

    /// Value of one metric line from `/metrics` (0 if the line is absent),
    /// e.g. `switchboard_bus_received_total{kind="personal"}`.
    pub async fn metric(&self, key: &str) -> f64 {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics on {} returned {status}", self.id);
        metric_value(&body, key)
    }

    /// Sends SIGTERM to the process.
    pub fn send_sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
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

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -{name}: {e}"));
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }

    /// SIGKILL (no cleanup at all) and reap the process.
    pub fn sigkill(&mut self) {
        self.child.0.kill().expect("SIGKILL the instance");
        self.child.0.wait().expect("reap the killed instance");
    }

    /// SIGSTOP: the process freezes; its sockets stay open.
    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Instance::sigstop`].
    pub fn sigcont(&self) {
        self.signal("CONT");
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
            match Self::try_spawn(&opts, self.addr, Some(self._dir.clone())).await {
                Ok(instance) => {
                    // The old (dead) child is dropped; the log dir is shared.
                    *self = instance;
                    return;
                }
                Err(SpawnError::Exited(msg)) => {
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
        rss_kb(self.pid())
    }

    /// `GET path` status, or None when the instance does not answer.
    pub async fn http_status(&self, path: &str) -> Option<u16> {
        self.try_http_get(path).await.ok().map(|(status, _)| status)
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

fn http_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
        .ok_or_else(|| std::io::Error::other(format!("unparsable HTTP response: {raw:?}")))
}

fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Reads one metric from Prometheus text: the line starting with `key`
/// (name plus labels, exactly as written) followed by a space. Missing => 0.
pub fn metric_value(text: &str, key: &str) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix(key) {
            if rest.starts_with(' ') {
                let value = rest.split_whitespace().next().unwrap_or("");
                return value
                    .parse()
                    .unwrap_or_else(|_| panic!("metric {key}: unparsable value in line {line:?}"));
            }
        }
    }
    0.0
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What [`Client::next_event`] saw: a frame, the end of the connection, or
/// nothing within the timeout. Never panics, for tests where connections are
/// expected to drop (restarts, slow consumers).
#[derive(Debug)]
pub enum Incoming {
    /// A JSON text frame.
    Json(Value),
    /// The server's Close frame, with its code.
    Closed(Option<u16>),
    /// The connection ended without a Close frame (the text says how).
    Ended(String),
    /// Nothing arrived within the timeout.
    Timeout,
}

/// A protocol client. Frames that arrive while waiting for something else
/// (e.g. pushed dm/room frames while waiting for an ack) are buffered and
/// returned by later `recv_*` calls, in arrival order.
pub struct Client {
    ws: Ws,
    buffered: VecDeque<Value>,
    next_id: u64,
    /// The welcome frame the server sent first.
    pub welcome: Value,
    label: String,
}

impl Client {
    /// Auth none: connects as `?user=<user>` and reads the welcome frame.
    pub async fn connect_user(instance: &Instance, user: &str) -> Client {
        Self::connect(instance.ws_request(&format!("user={user}"))).await
    }

    /// Auth jwt: connects with `?token=<token>` and reads the welcome frame.
    pub async fn connect_token(instance: &Instance, token: &str) -> Client {
        Self::connect(instance.ws_request(&format!("token={token}"))).await
    }

    /// Auth jwt: connects with `Authorization: Bearer <token>`.
    pub async fn connect_bearer(instance: &Instance, token: &str) -> Client {
        Self::connect(instance.ws_request_bearer(token)).await
    }

    /// Connects with an arbitrary request, panicking if the upgrade fails.
    pub async fn connect(request: Request) -> Client {
        let uri = request.uri().to_string();
        match Self::try_connect(request).await {
            Ok(client) => client,
            Err(WsError::Http(resp)) => panic!(
                "websocket upgrade to {uri} rejected with HTTP {}: {}",
                resp.status(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
            ),
            Err(e) => panic!("websocket connect to {uri} failed: {e}"),
        }
    }

    /// Connects and reads the welcome frame; returns the handshake error as is.
    pub async fn try_connect(request: Request) -> Result<Client, WsError> {
        let (mut client, welcome) = Self::try_connect_raw(request).await?;
        assert_eq!(
            welcome["type"], "welcome",
            "first server frame must be the welcome frame, got {welcome}"
        );
        client.label = format!(
            "{}@{}",
            welcome["user"].as_str().unwrap_or("?"),
            welcome["instance"].as_str().unwrap_or("?")
        );
        client.welcome = welcome;
        Ok(client)
    }

    /// Connects and returns the server's first frame as it is, without
    /// checking that it is the welcome frame (`welcome` stays null).
    pub async fn try_connect_raw(request: Request) -> Result<(Client, Value), WsError> {
        let uri = request.uri().to_string();
        let (ws, _resp) =
            tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .unwrap_or_else(|_| panic!("websocket handshake with {uri} timed out"))?;
        let mut client = Client {
            ws,
            buffered: VecDeque::new(),
            next_id: 0,
            welcome: Value::Null,
            label: uri,
        };
        let first = client.recv_json().await;
        Ok((client, first))
    }

    /// Expects the upgrade to be refused; returns the HTTP status.
    pub async fn rejection_status(request: Request) -> u16 {
        let uri = request.uri().to_string();
        match Self::try_connect(request).await {
            Ok(client) => panic!(
                "websocket upgrade to {uri} was accepted (welcome {}), expected an HTTP rejection",
                client.welcome
            ),
            Err(WsError::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("websocket connect to {uri} failed without an HTTP status: {e}"),
        }
    }

    /// The connection id from the welcome frame.
    pub fn conn_id(&self) -> String {
        self.welcome["conn"]
            .as_str()
            .unwrap_or_else(|| panic!("welcome has no string conn: {}", self.welcome))
            .to_string()
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        if let Err(e) = self.ws.send(Message::text(text)).await {
            panic!("[{}] sending a text frame failed: {e}", self.label);
        }
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        if let Err(e) = self.ws.send(Message::binary(data)).await {
            panic!("[{}] sending a binary frame failed: {e}", self.label);
        }
    }

    async fn read_incoming(&mut self, timeout: Duration) -> Incoming {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Incoming::Timeout,
                Ok(None) => return Incoming::Ended("stream ended".to_string()),
                Ok(Some(Err(e))) => return Incoming::Ended(e.to_string()),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(text) => match serde_json::from_str(text.as_str()) {
                        Ok(value) => return Incoming::Json(value),
                        Err(e) => panic!(
                            "[{}] server sent a non-JSON text frame ({e}): {}",
                            self.label,
                            text.as_str()
                        ),
                    },
                    Message::Binary(data) => {
                        panic!("[{}] server sent a binary frame: {data:?}", self.label)
                    }
                    Message::Close(frame) => {
                        return Incoming::Closed(frame.map(|f| u16::from(f.code)))
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                },
            }
        }
    }

    async fn read_json(&mut self, timeout: Duration, waiting_for: &str) -> Value {
        match self.read_incoming(timeout).await {
            Incoming::Json(value) => value,
            Incoming::Timeout => panic!(
                "[{}] timed out after {timeout:?} waiting for {waiting_for}; buffered frames: {:?}",
                self.label, self.buffered
            ),
            Incoming::Closed(code) => panic!(
                "[{}] connection closed (code {code:?}) while waiting for {waiting_for}",
                self.label
            ),
            Incoming::Ended(e) => panic!(
                "[{}] connection ended ({e}) while waiting for {waiting_for}",
                self.label
            ),
        }
    }

    /// Next event (buffered frames first), waiting up to `timeout`; never
    /// panics. After `Closed` or `Ended` the client is unusable.
    pub async fn next_event(&mut self, timeout: Duration) -> Incoming {
        if let Some(value) = self.buffered.pop_front() {
            return Incoming::Json(value);
        }
        self.read_incoming(timeout).await
    }

    /// Sends a JSON frame; returns the error text instead of panicking.
    pub async fn try_send_json(&mut self, value: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .map_err(|e| format!("[{}] send failed: {e}", self.label))
    }

    /// Next frame (buffered first), waiting up to 5s.
    pub async fn recv_json(&mut self) -> Value {
        if let Some(value) = self.buffered.pop_front() {
            return value;
        }
        self.read_json(RECV_TIMEOUT, "any frame").await
    }

    /// Next frame with `"type": ty`; other frames stay buffered in order.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        if let Some(pos) = self.buffered.iter().position(|v| v["type"] == ty) {
            return self.buffered.remove(pos).expect("position is in range");
        }
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self
                .read_json(left, &format!("a frame of type {ty:?}"))
                .await;
            if value["type"] == ty {
                return value;
            }
            self.buffered.push_back(value);
        }
    }

    /// Sends `frame` (adding a fresh string `id` if it has none) and returns
    /// the reply carrying that id; unrelated frames are buffered.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        if frame.get("id").is_none() {
            self.next_id += 1;
            frame["id"] = json!(format!("req-{}", self.next_id));
        }
        let id = frame["id"].clone();
        self.send_json(&frame).await;
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self.read_json(left, &format!("the reply to {frame}")).await;
            if value.get("id") == Some(&id) {
                return value;
            }
            self.buffered.push_back(value);
        }
    }

    /// Asserts that nothing arrives within `wait` (use [`QUIET`]).
    pub async fn expect_no_frame(&mut self, wait: Duration) {
        assert!(
            self.buffered.is_empty(),
            "[{}] expected no frame, but these were already received: {:?}",
            self.label,
            self.buffered
        );
        match self.read_incoming(wait).await {
            Incoming::Timeout => {}
            Incoming::Json(value) => {
                panic!("[{}] expected no frame, but received {value}", self.label)
            }
            Incoming::Closed(code) => panic!(
                "[{}] expected no frame, but the connection was closed (code {code:?})",
                self.label
            ),
            Incoming::Ended(e) => panic!(
                "[{}] expected no frame, but the connection ended: {e}",
                self.label
            ),
        }
    }

    /// Waits (skipping data frames) for the server's Close frame and returns
    /// its code (None if the frame had no code). Panics if the connection
    /// ends without a Close frame or nothing happens within `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_incoming(left).await {
                Incoming::Json(value) => self.buffered.push_back(value),
                Incoming::Closed(code) => {
                    // Keep polling briefly so our Close reply is flushed and
                    // the server sees a completed closing handshake.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    })
                    .await;
                    return code;
                }
                Incoming::Timeout => panic!(
                    "[{}] no Close frame within {timeout:?}; frames received: {:?}",
                    self.label, self.buffered
                ),
                Incoming::Ended(e) => panic!(
                    "[{}] connection ended without a Close frame: {e}; frames received: {:?}",
                    self.label, self.buffered
                ),
            }
        }
    }

    /// `presence` query for one user.
    pub async fn is_online(&mut self, user: &str) -> bool {
        let reply = self
            .request(json!({"type": "presence", "users": [user]}))
            .await;
        assert_eq!(reply["type"], "presence", "presence reply: {reply}");
        reply["online"][user]
            .as_bool()
            .unwrap_or_else(|| panic!("presence reply lacks a bool for {user}: {reply}"))
    }

    /// Polls `presence` until `user`'s state is `online` (or panics after 5s).
    pub async fn await_presence(&mut self, user: &str, online: bool) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        while self.is_online(user).await != online {
            assert!(
                Instant::now() < deadline,
                "[{}] presence of {user} did not become online={online} within {RECV_TIMEOUT:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful client-side close: sends Close and drains until the server
    /// ends the connection (bounded).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

pub fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// HS256 token with `sub` and `exp = now + exp_offset_secs`.
pub fn mint_jwt(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    let now = now_unix_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + exp_offset_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a JWT")
}

/// Polls `condition` every 50ms until it returns true; panics with `what`
/// after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status:\n{status}"))
}

/// A string unique within the test run, for body markers.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u64>())
}

// ---------------------------------------------------------------------------
// HTTP requests with headers and a body; raw WebSocket upgrades; JWT claims
// (API, limits, conformance and panic-isolation tests)
// ---------------------------------------------------------------------------

/// One HTTP answer: status, headers (names lower-cased, in order) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics (showing status and body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} answer is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Splits a complete HTTP/1.1 answer into status, headers and (de-chunked) body.
fn parse_full_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = length {
        rest.get(..length)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Sends one HTTP/1.1 request (`Connection: close`) over a fresh TCP
/// connection and reads the whole answer (10s bound). A `Content-Length` is
/// added for a non-empty body or any non-GET method unless `headers` already
/// set `content-length` or `transfer-encoding`. A failed write (the server
/// may answer early and close, e.g. 413) is ignored if an answer arrives.
pub async fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let framed = headers.iter().any(|(n, _)| {
            n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
        });
        if !framed && (!body.is_empty() || method != "GET") {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let written = stream.write_all(&request).await;
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw).await;
        match parse_full_http_response(&raw) {
            Some(response) => Ok(response),
            None => {
                written?;
                read?;
                Err(std::io::Error::other(format!(
                    "unparsable HTTP answer to {method} {path}: {:?}",
                    String::from_utf8_lossy(&raw)
                )))
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::other(format!(
            "{method} {path} on {addr}: no complete answer within 10s"
        ))),
    }
}

/// [`try_http_request`], panicking with the request in the message on failure.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr} failed: {e}"))
}

impl Instance {
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
}

/// A WebSocket upgrade request for `ws://ADDR/ws?<query>` (any server, e.g.
/// one run in-process).
pub fn ws_request_at(addr: SocketAddr, query: &str) -> Request {
    let url = if query.is_empty() {
        format!("ws://{addr}/ws")
    } else {
        format!("ws://{addr}/ws?{query}")
    };
    url.into_client_request().expect("build websocket request")
}

/// HS256 token with exactly these claims (add `sub`, `exp`, `aud`, `nbf`...).
pub fn mint_jwt_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a JWT")
}

/// A WebSocket connection upgraded by hand over a plain TCP socket: nothing
/// reads it or answers pings unless the test does.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read past the 101 response headers (the first frames).
    pub pending: Vec<u8>,
}

/// One frame the server sent (servers never mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub opcode: u8,
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
pub fn parse_ws_frames(mut data: &[u8]) -> Vec<RawFrame> {
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
    /// reads the answer's headers. `Err` carries a non-101 answer.
    pub async fn upgrade(
        addr: SocketAddr,
        query: &str,
        extra: &[(&str, &str)],
    ) -> Result<RawWs, HttpResponse> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
            let split = loop {
                if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break split;
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
            let status: u16 = std::str::from_utf8(&raw[..split])
                .ok()
                .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "unparsable upgrade answer: {:?}",
                        String::from_utf8_lossy(&raw)
                    )
                });
            if status == 101 {
                return Ok(RawWs {
                    stream,
                    pending: raw[split + 4..].to_vec(),
                });
            }
            // Read the rest of the refusal (bounded) for the caller to inspect.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while parse_full_http_response(&raw)
                    .is_none_or(|r| r.header("content-length").is_none() && r.body.is_empty())
                {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            Err(parse_full_http_response(&raw).unwrap_or(HttpResponse {
                status,
                headers: Vec::new(),
                body: Vec::new(),
            }))
        };
        tokio::time::timeout(RECV_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("websocket upgrade on {addr} got no answer within 5s"))
    }

    /// Reads everything until the server closes the TCP connection (or
    /// `timeout` passes). Returns the frames (including those read with the
    /// upgrade), and whether the connection ended within the timeout.
    pub async fn read_until_closed(&mut self, timeout: Duration) -> (Vec<RawFrame>, bool) {
        use tokio::io::AsyncReadExt;
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

/// Asserts the connection still answers `ping` with `pong`.
pub async fn assert_healthy(client: &mut Client, after: &str) {
    let pong = client
        .request(json!({"type": "ping", "id": "health"}))
        .await;
    assert_eq!(
        pong,
        json!({"type": "pong", "id": "health"}),
        "connection must stay usable after {after}"
    );
}

/// Asserts `reply` is an error frame with `code` and a message.
pub fn assert_error(reply: &Value, code: &str, what: &str) {
    assert_eq!(
        reply["type"], "error",
        "{what}: expected an error frame, got {reply}"
    );
    assert_eq!(reply["code"], code, "{what}: wrong error code in {reply}");
    assert!(
        reply["message"].is_string(),
        "{what}: error needs a message: {reply}"
    );
}
