//! A batch of `switchboard-load --workload connections` processes started
//! together against one instance: how the batch is split over processes
//! (each under its open-files limit, distinct user names, the source
//! addresses rotated so small batches still use them all), their command
//! lines, waiting for their connect phase through the documents each
//! rewrites at `--out`, and stopping them. The processes belong to the
//! phase's [`Supervisor`]; this module only knows their pids.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use switchboard_bench_schema::{ConnectionsRun, HoldPhase};
use tokio_util::sync::CancellationToken;

use super::figures::{processes_for, split};
use super::Context;
use crate::error::BenchError;
use crate::procs::Supervisor;

/// How often a document is read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// One loader process.
#[derive(Debug, Clone)]
pub struct Loader {
    /// Its name in the supervisor and the logs.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Where it writes its document.
    pub out: PathBuf,
    /// Its command line (the JWT secret is in its environment, not here).
    pub command: Vec<String>,
}

/// What a batch connects to.
pub struct BatchSpec<'a> {
    /// Names the processes and their files (`scale-1000`, `storm`).
    pub label: &'a str,
    /// `ws://127.0.0.1:PORT` of the instance.
    pub target: String,
    /// Where lost connections reconnect (empty: they do not).
    pub reconnect_targets: Vec<String>,
    /// Connections of the batch.
    pub connections: u32,
}

/// The processes of one batch.
pub struct Batch {
    /// Its label.
    pub label: String,
    /// Its processes.
    pub loaders: Vec<Loader>,
}

impl Batch {
    /// Starts the processes of a batch (they connect at once).
    pub fn start(
        ctx: &Context<'_>,
        supervisor: &mut Supervisor,
        dir: &Path,
        spec: &BatchSpec<'_>,
    ) -> Result<Batch, BenchError> {
        let cli = ctx.cli;
        let processes = processes_for(spec.connections, cli.loader_procs, ctx.per_loader_max);
        let mut loaders = Vec::new();
        for (k, connections) in split(spec.connections, processes).into_iter().enumerate() {
            let name = format!("loader-{}-{}", spec.label, k + 1);
            let out = dir.join(format!("{name}.json"));
            let _ = std::fs::remove_file(&out);
            let mut args: Vec<String> = vec![
                "--workload".into(),
                "connections".into(),
                "--targets".into(),
                spec.target.clone(),
                "--users".into(),
                connections.to_string(),
                "--user-prefix".into(),
                format!("{}-{}-", spec.label, k + 1),
                "--source-addrs".into(),
                rotated(&cli.source_addrs, k),
                "--connect-concurrency".into(),
                cli.handshake_concurrency.to_string(),
                "--connect-timeout".into(),
                cli.connect_timeout.to_string(),
                "--out".into(),
                out.to_string_lossy().into_owned(),
            ];
            if !spec.reconnect_targets.is_empty() {
                args.push("--reconnect-targets".into());
                args.push(spec.reconnect_targets.join(","));
                args.push("--reconnect-within".into());
                args.push(cli.storm_within_s.to_string());
            }
            if !cli.loader_args.iter().any(|a| a.starts_with("--threads")) {
                // Several processes share the machine: one thread each.
                args.push("--threads".into());
                args.push("1".into());
            }
            args.extend(cli.loader_args.iter().cloned());
            let env: Vec<(&str, &str)> = ctx
                .jwt_secret
                .map(|secret| ("SWITCHBOARD_LOAD_JWT_SECRET", secret))
                .into_iter()
                .collect();
            let log = dir.join(format!("{name}.log"));
            let pid = supervisor.spawn_with_env(&name, ctx.loader_bin, &args, &env, &log, false)?;
            let command = std::iter::once(ctx.loader_bin.to_string_lossy().into_owned())
                .chain(args)
                .collect();
            loaders.push(Loader {
                name,
                pid,
                out,
                command,
            });
        }
        Ok(Batch {
            label: spec.label.to_owned(),
            loaders,
        })
    }

    /// The pids of the batch.
    pub fn pids(&self) -> Vec<u32> {
        self.loaders.iter().map(|l| l.pid).collect()
    }

    /// Every process's document as of now (`None`: not written yet, or unreadable).
    pub fn documents(&self) -> Vec<Option<ConnectionsRun>> {
        self.loaders.iter().map(|l| read_document(&l.out)).collect()
    }

    /// Waits until every process has ended its connect phase (its document
    /// says `holding` or later), at most until `deadline`.
    pub async fn wait_connected(
        &self,
        supervisor: &mut Supervisor,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Vec<ConnectionsRun>, BenchError> {
        loop {
            let docs = self.documents();
            if docs
                .iter()
                .all(|d| d.as_ref().is_some_and(|d| d.phase >= HoldPhase::Holding))
            {
                return Ok(docs.into_iter().flatten().collect());
            }
            for (loader, doc) in self.loaders.iter().zip(&docs) {
                if doc.is_none() {
                    if let Some(status) = supervisor.try_exited(loader.pid) {
                        return Err(BenchError::ExitedEarly {
                            name: loader.name.clone(),
                            status,
                            log_tail: supervisor.log_tail(loader.pid, 20),
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Loader(format!(
                    "batch {}: not every process finished connecting in time",
                    self.label
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(BenchError::Interrupted),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Asks every process to close its connections and exit (SIGTERM)
    /// without waiting.
    pub fn ask_to_stop(&self, supervisor: &mut Supervisor) {
        for pid in self.pids() {
            supervisor.signal(pid, Signal::SIGTERM);
        }
    }

    /// Whether every process has exited.
    pub fn all_exited(&self, supervisor: &mut Supervisor) -> bool {
        self.pids()
            .into_iter()
            .all(|pid| supervisor.try_exited(pid).is_some())
    }

    /// Waits at most `timeout` for every process to exit by itself.
    pub async fn wait_exited(&self, supervisor: &mut Supervisor, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.all_exited(supervisor) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }

    /// Stops every process (SIGTERM, the supervisor's grace, SIGKILL) and
    /// returns their final documents.
    pub async fn stop(&self, supervisor: &mut Supervisor) -> Vec<ConnectionsRun> {
        supervisor.stop_many(&self.pids()).await;
        self.documents().into_iter().flatten().collect()
    }
}

/// Reads a loader's document.
pub fn read_document(path: &Path) -> Option<ConnectionsRun> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The addresses, starting at the `k`-th, comma-separated.
fn rotated(addrs: &[Ipv4Addr], k: usize) -> String {
    let n = addrs.len().max(1);
    (0..addrs.len())
        .map(|i| addrs[(i + k) % n].to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_starts_at_another_address() {
        let addrs: Vec<Ipv4Addr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        assert_eq!(rotated(&addrs, 0), "127.0.0.2,127.0.0.3,127.0.0.4");
        assert_eq!(rotated(&addrs, 1), "127.0.0.3,127.0.0.4,127.0.0.2");
        assert_eq!(rotated(&addrs, 4), "127.0.0.3,127.0.0.4,127.0.0.2");
    }
}
