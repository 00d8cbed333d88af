//! The processes this benchmark starts, and nothing else: it spawns each in
//! its own process group (so a terminal's Ctrl-C reaches only the benchmark,
//! which then stops them in order), sends its output to a log file, remembers
//! it by pid, and stops it with SIGTERM, then SIGKILL after a grace period.
//! It never signals a pid it did not start and has not reaped (an unreaped
//! child keeps its pid, so the pid cannot have been reused).
//!
//! Also reserves free loopback ports for the processes to listen on (for a
//! Redis Cluster node, a port whose port + 10000 is free too).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::error::BenchError;

/// One process we started.
struct Managed {
    /// Our name for it (`redis`, `n1`, `loader`), for logs and the report.
    name: String,
    pid: u32,
    child: Child,
    /// Where its stdout and stderr go: read back when it fails.
    log: PathBuf,
    /// Stopped after every other process (redis: the instances need it to shut down cleanly).
    stop_last: bool,
    /// Set once reaped.
    status: Option<ExitStatus>,
}

/// How a process ended, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stopped {
    /// Our name for it.
    pub name: String,
    /// Its pid while it ran.
    pub pid: u32,
    /// Its exit status as text (`exit status: 0`, `signal: 9 (SIGKILL)`).
    pub status: String,
    /// Whether it exited by itself before we asked it to.
    pub exited_by_itself: bool,
    /// Whether it had to be killed after ignoring SIGTERM for the grace period.
    pub killed: bool,
}

/// Owns every process of one run.
pub struct Supervisor {
    children: Vec<Managed>,
    stop_grace: Duration,
    stopped: Vec<Stopped>,
}

impl Supervisor {
    /// A supervisor that waits `stop_grace` between SIGTERM and SIGKILL.
    pub fn new(stop_grace: Duration) -> Self {
        Supervisor {
            children: Vec::new(),
            stop_grace,
            stopped: Vec::new(),
        }
    }

    /// Starts `program args`, output to `log`; returns its pid.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        stop_last: bool,
    ) -> Result<u32, BenchError> {
        self.spawn_with_env(name, program, args, &[], log, stop_last)
    }

    /// [`Supervisor::spawn`] with extra environment variables (secrets that
    /// should not show in a command line or a report).
    pub fn spawn_with_env(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
        stop_last: bool,
    ) -> Result<u32, BenchError> {
        self.spawn_inner(name, program, args, env, None, log, stop_last)
    }

    /// [`Supervisor::spawn`] in working directory `dir` (a program that
    /// may write files where it runs).
    pub fn spawn_in_dir(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
        log: &Path,
        stop_last: bool,
    ) -> Result<u32, BenchError> {
        self.spawn_inner(name, program, args, &[], Some(dir), log, stop_last)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_inner(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: Option<&Path>,
        log: &Path,
        stop_last: bool,
    ) -> Result<u32, BenchError> {
        let out = std::fs::File::create(log).map_err(|e| BenchError::io("create log", log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| BenchError::io("clone log handle", log, e))?;
        let spawn_error = |source| BenchError::Spawn {
            name: name.to_owned(),
            program: program.to_owned(),
            source,
        };
        let mut command = Command::new(program);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let pid = child.id().ok_or_else(|| {
            spawn_error(std::io::Error::other("exited before its pid could be read"))
        })?;
        self.children.push(Managed {
            name: name.to_owned(),
            pid,
            child,
            log: log.to_owned(),
            stop_last,
            status: None,
        });
        Ok(pid)
    }

    fn find(&mut self, pid: u32) -> Option<&mut Managed> {
        self.children.iter_mut().find(|m| m.pid == pid)
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_exited(&mut self, pid: u32) -> Option<String> {
        let m = self.find(pid)?;
        if m.status.is_none() {
            if let Ok(Some(status)) = m.child.try_wait() {
                m.status = Some(status);
            }
        }
        m.status.map(|s| s.to_string())
    }

    /// Waits for the process to exit by itself, at most `timeout`.
    pub async fn wait_exit(&mut self, pid: u32, timeout: Duration) -> Option<String> {
        let m = self.find(pid)?;
        if m.status.is_none() {
            if let Ok(Ok(status)) = tokio::time::timeout(timeout, m.child.wait()).await {
                m.status = Some(status);
            }
        }
        m.status.map(|s| s.to_string())
    }

    /// The last `lines` lines of a process's log.
    pub fn log_tail(&self, pid: u32, lines: usize) -> String {
        self.children
            .iter()
            .find(|m| m.pid == pid)
            .map(|m| tail_of_file(&m.log, lines))
            .unwrap_or_default()
    }

    /// Stops one process (SIGTERM, then SIGKILL after the grace period).
    pub async fn stop(&mut self, pid: u32) {
        let grace = self.stop_grace;
        let mut done = Vec::new();
        if let Some(m) = self.find(pid) {
            done.extend(stop_group(std::slice::from_mut(m), grace).await);
        }
        self.children.retain(|m| m.pid != pid);
        self.stopped.extend(done);
    }

    /// Sends `signal` to a process it started and has not reaped (so the
    /// pid is still that process). Returns whether the signal was sent.
    pub fn signal(&mut self, pid: u32, signal: Signal) -> bool {
        if self.try_exited(pid).is_some() || self.find(pid).is_none() {
            return false;
        }
        let Ok(raw) = i32::try_from(pid) else {
            return false;
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).is_ok()
    }

    /// Stops these processes together (SIGTERM to all, one grace period,
    /// SIGKILL to the rest), leaving the others running.
    pub async fn stop_many(&mut self, pids: &[u32]) {
        let grace = self.stop_grace;
        let (mut group, rest): (Vec<Managed>, Vec<Managed>) =
            self.children.drain(..).partition(|m| pids.contains(&m.pid));
        self.children = rest;
        self.stopped.extend(stop_group(&mut group, grace).await);
    }

    /// Stops everything still running: all others first, then the `stop_last` ones.
    /// Returns how every process of this supervisor ended.
    pub async fn stop_all(&mut self) -> Vec<Stopped> {
        let grace = self.stop_grace;
        let (mut last, mut first): (Vec<Managed>, Vec<Managed>) =
            self.children.drain(..).partition(|m| m.stop_last);
        self.stopped.extend(stop_group(&mut first, grace).await);
        self.stopped.extend(stop_group(&mut last, grace).await);
        std::mem::take(&mut self.stopped)
    }
}

/// SIGTERM to every live process of the group, wait up to `grace` for all of
/// them, SIGKILL the rest.
async fn stop_group(group: &mut [Managed], grace: Duration) -> Vec<Stopped> {
    let mut exited_by_itself = Vec::with_capacity(group.len());
    for m in group.iter_mut() {
        if m.status.is_none() {
            if let Ok(Some(status)) = m.child.try_wait() {
                m.status = Some(status);
            }
        }
        exited_by_itself.push(m.status.is_some());
        if m.status.is_none() {
            send_sigterm(m.pid);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let mut running = 0;
        for m in group.iter_mut() {
            if m.status.is_none() {
                match m.child.try_wait() {
                    Ok(Some(status)) => m.status = Some(status),
                    Ok(None) => running += 1,
                    Err(_) => running += 1,
                }
            }
        }
        if running == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::with_capacity(group.len());
    for (m, by_itself) in group.iter_mut().zip(exited_by_itself) {
        let mut killed = false;
        if m.status.is_none() {
            eprintln!(
                "[bench] {} (pid {}) ignored SIGTERM for {:?}: SIGKILL",
                m.name, m.pid, grace
            );
            killed = true;
            let _ = m.child.start_kill();
            if let Ok(Ok(status)) = tokio::time::timeout(grace, m.child.wait()).await {
                m.status = Some(status);
            }
        }
        out.push(Stopped {
            name: m.name.clone(),
            pid: m.pid,
            status: m
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown (did not exit after SIGKILL)".to_owned()),
            exited_by_itself: by_itself,
            killed,
        });
    }
    out
}

/// SIGTERM by pid. Only called for a child that is not reaped yet, so the
/// pid is still ours.
fn send_sigterm(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        eprintln!("[bench] pid {pid} does not fit a pid_t; not signalled");
        return;
    };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGTERM) {
        // ESRCH: it exited between the last check and now; reaped below.
        if e != nix::errno::Errno::ESRCH {
            eprintln!("[bench] cannot send SIGTERM to pid {pid}: {e}");
        }
    }
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail_of_file(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => return String::new(),
    };
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// `count` distinct free TCP ports on 127.0.0.1. All are bound at once (so
/// they differ), then released for the processes to bind; another program
/// could take one in between, which the readiness checks would then report.
pub fn reserve_ports(count: usize) -> Result<Vec<u16>, BenchError> {
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| BenchError::io("reserve a port", "127.0.0.1:0", e))?;
        listeners.push(listener);
    }
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| BenchError::io("read a reserved port", "127.0.0.1:0", e))
        })
        .collect()
}

/// Where [`reserve_ports_with_bus`] looks: below the ephemeral range
/// (32768-60999 here) with the bus port too, so no outgoing connection can
/// take either meanwhile, and well below redis-server's limit (a node's port
/// + 10000 must be a port).
const CLUSTER_PORTS: std::ops::RangeInclusive<u16> = 20_000..=22_767;
/// Redis Cluster's bus listens on the node's port + this.
pub const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// `count` distinct ports on 127.0.0.1, each free together with its port +
/// 10000 (a Redis Cluster node's bus), from [`CLUSTER_PORTS`]. The search
/// starts at an offset drawn from the clock and the pid, so concurrent
/// benchmarks rarely probe the same ports; as with [`reserve_ports`], all are
/// bound at once and released for the nodes to bind.
pub fn reserve_ports_with_bus(count: usize) -> Result<Vec<u16>, BenchError> {
    let span = u32::from(CLUSTER_PORTS.end() - CLUSTER_PORTS.start()) + 1;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut listeners = Vec::with_capacity(2 * count);
    let mut ports = Vec::with_capacity(count);
    for k in 0..span {
        if ports.len() == count {
            break;
        }
        let offset = u16::try_from((seed.wrapping_add(k)) % span).unwrap_or(0);
        let port = CLUSTER_PORTS.start() + offset;
        let (Ok(node), Ok(bus)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET)),
        ) else {
            continue;
        };
        listeners.push(node);
        listeners.push(bus);
        ports.push(port);
    }
    if ports.len() < count {
        return Err(BenchError::io(
            "reserve cluster ports",
            format!("127.0.0.1:{CLUSTER_PORTS:?}"),
            std::io::Error::other(format!(
                "only {} of {count} ports free with their port + {CLUSTER_BUS_OFFSET}",
                ports.len()
            )),
        ));
    }
    ports.sort_unstable();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ports_come_with_their_bus_ports() {
        let ports = reserve_ports_with_bus(6).expect("six free pairs");
        assert_eq!(ports.len(), 6);
        assert!(ports.windows(2).all(|w| w[0] < w[1]), "{ports:?}");
        for port in ports {
            assert!(CLUSTER_PORTS.contains(&port));
            assert!(TcpListener::bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET)).is_ok());
        }
    }

    #[tokio::test]
    async fn stops_what_it_started_with_sigterm() {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-bench-procs-test-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut supervisor = Supervisor::new(Duration::from_secs(5));
        let pid = supervisor
            .spawn(
                "sleeper",
                Path::new("sleep"),
                &["30".to_owned()],
                &dir.join("sleeper.log"),
                false,
            )
            .expect("sleep starts");
        assert!(supervisor.try_exited(pid).is_none());
        let stopped = supervisor.stop_all().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(stopped.len(), 1);
        let sleeper = &stopped[0];
        assert_eq!(sleeper.pid, pid);
        assert!(!sleeper.killed && !sleeper.exited_by_itself, "{sleeper:?}");
        assert!(sleeper.status.contains("SIGTERM"), "{sleeper:?}");
    }
}
