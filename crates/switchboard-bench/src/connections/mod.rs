//! `--workload connections`: what idle connections cost an instance and how
//! it copes with many at once. It runs the chosen `--phases` (see `phases`),
//! each on a fresh redis-server and instances of its own, driving
//! `switchboard-load --workload connections` processes (several per batch,
//! each under its open-files limit, sockets bound to `--source-addrs`), and
//! writes `<name>.{json,md,svg}` with the logs of every process under
//! `<out-dir>/logs/<phase>/`.
//!
//! Module map: `phases` runs the phases; `loaders` a batch of loader
//! processes; `figures` the arithmetic; `record` what is kept; `report` the
//! Markdown; `plot` the chart.

mod figures;
mod loaders;
mod phases;
mod plot;
mod record;
mod report;

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::sys::resource::{getrlimit, Resource};
use tokio_util::sync::CancellationToken;

use crate::cli::{BenchAuth, Cli, ConnectionsPhase};
use crate::error::BenchError;
use crate::Setup;

pub use record::{ConnectionsResults, SCHEMA};

/// Descriptors a loader process keeps free besides its connections.
const LOADER_FD_MARGIN: u64 = 500;

/// What every phase needs.
pub struct Context<'a> {
    /// The command line.
    pub cli: &'a Cli,
    /// The `switchboard` binary.
    pub server_bin: &'a Path,
    /// The `switchboard-load` binary.
    pub loader_bin: &'a Path,
    /// Where each phase's logs go, one directory per phase.
    pub logs_dir: PathBuf,
    /// The HS256 secret of this run (`None`: `--auth none`).
    pub jwt_secret: Option<&'a str>,
    /// Most connections one loader process is given.
    pub per_loader_max: u32,
}

/// How each figure is measured, for the report.
const METHOD: [&str; 6] = [
    "RSS is VmRSS (and RssAnon) of the instance from /proc/PID/status, read --rss-settle-ms \
     after a batch is connected; the baseline is read before any connection.",
    "KiB per connection: total = (RSS - baseline) / connections; marginal = (RSS - previous \
     RSS) / connections added since the previous step; connections are the instance's own \
     switchboard_connections.",
    "Handshakes/s: a batch's connections / the time from its first handshake's start to its \
     last one's end, over all its loader processes; a handshake is TCP connect, the WebSocket \
     upgrade with a freshly minted HS256 token (JWT auth), and the server's welcome frame, \
     with at most --handshake-concurrency in flight per process. Listen overflows are the \
     kernel's TcpExt ListenOverflows (machine-wide) over the batch: each is a handshake that \
     waited a second for its SYN to be retried because an accept queue was full.",
    "After close: every loader closes its connections (close handshake, code 1000); RSS is read \
     every 500 ms from then until --after-close-s after the instance counts no connection.",
    "Drain: SIGTERM to the instance; the time until the process exits (waitpid), and how its \
     clients saw their connections end (close frame code, or the socket's end).",
    "Storm: SIGKILL to the first instance; each client reconnects to the survivors in turn \
     (retries after 50 ms doubling to 1 s), timed from the kill to its welcome.",
];

/// Runs every chosen phase and writes the results.
pub async fn run(cli: &Cli, setup: Setup) -> Result<ExitCode, BenchError> {
    let secret = fresh_secret();
    let jwt_secret = (cli.auth == BenchAuth::Jwt).then_some(secret.as_str());
    let per_loader_max = per_loader_max();
    let cancel = CancellationToken::new();
    crate::watch_signals(cancel.clone());
    let ctx = Context {
        cli,
        server_bin: &setup.server_bin,
        loader_bin: &setup.loader_bin,
        logs_dir: setup.logs_dir.clone(),
        jwt_secret,
        per_loader_max,
    };
    let mut results = ConnectionsResults {
        schema: SCHEMA.to_owned(),
        name: setup.name.clone(),
        command: setup.command.clone(),
        started_utc: setup.started_utc.clone(),
        finished_utc: String::new(),
        machine: setup.machine.clone(),
        config: serde_json::to_value(cli)
            .map_err(|e| BenchError::Report(format!("serialize config: {e}")))?,
        server_bin: setup.server_bin.clone(),
        per_loader_max,
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        interrupted: false,
        scale: None,
        drain: None,
        storm: None,
        hold_all: None,
    };
    for &phase in &cli.phases {
        if cancel.is_cancelled() {
            break;
        }
        eprintln!("[bench] === connections: {}", phase.as_str());
        match phase {
            ConnectionsPhase::Scale => results.scale = Some(phases::scale(&ctx, &cancel).await),
            ConnectionsPhase::Drain => results.drain = Some(phases::drain(&ctx, &cancel).await),
            ConnectionsPhase::Storm => results.storm = Some(phases::storm(&ctx, &cancel).await),
            ConnectionsPhase::HoldAll => {
                results.hold_all = Some(phases::hold_all(&ctx, &cancel).await)
            }
        }
    }
    results.interrupted = cancel.is_cancelled();
    results.finished_utc = crate::report::utc_now().1;
    crate::report::conclude(&results, &setup.out_dir, &setup.logs_dir, false)
}

/// The open-files hard limit the loaders inherit, less a margin.
fn per_loader_max() -> u32 {
    let hard = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(_, hard)| hard);
    u32::try_from(hard.saturating_sub(LOADER_FD_MARGIN).clamp(100, 1_000_000)).unwrap_or(100)
}

/// A secret for this run's instances and loaders only: hashes under the
/// standard library's randomly seeded hash keys (nothing here needs more).
fn fresh_secret() -> String {
    (0..4u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

impl crate::report::Outputs for ConnectionsResults {
    const WHAT: &'static str = "connections";

    fn name(&self) -> &str {
        &self.name
    }

    fn markdown(&self) -> String {
        report::markdown(self)
    }

    fn interrupted(&self) -> bool {
        self.interrupted
    }

    fn all_passed(&self) -> bool {
        report::all_passed(self)
    }
    fn write_svg(&self, path: &Path) -> Result<bool, BenchError> {
        plot::write_svg(self, path).map(|()| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_differ_and_limits_are_sane() {
        let (a, b) = (fresh_secret(), fresh_secret());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(per_loader_max() >= 100);
    }
}
