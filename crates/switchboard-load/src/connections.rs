//! The `connections` workload: open `--users` x `--conns-per-user` idle
//! connections as fast as the server takes them (at most
//! `--connect-concurrency` handshakes in flight, sockets bound round-robin to
//! `--source-addrs`), hold them, and end with a close handshake on each when
//! told to: SIGTERM or SIGINT, `--hold` seconds after the connect phase, or
//! once nothing is left open (every connection lost and none reconnecting).
//! With `--reconnect-targets` a connection the server loses reconnects there.
//!
//! It raises its soft open-files limit to the hard one first (each
//! connection is a descriptor) and refuses to start when the connections
//! cannot fit. The [`ConnectionsRun`] document goes to `--out`, rewritten in
//! place at every phase change and about once a second (written to a
//! temporary file and renamed, so a reader never sees half of it), or to
//! stdout at the end. One slot's life is `idle`'s business; this module owns
//! the sequence and the document.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use switchboard_bench_schema::{
    ConnectPhase, ConnectionsRun, ConnectionsTag, HoldPhase, HoldSummary, NofileLimit,
    ReconnectSummary,
};

use crate::cli::{parse_target, Args, AuthMode, Target};
use crate::idle::{self, unix_us, Endpoint, Hold, Tally, CLOSE_GRACE};
use crate::report::{cpu_seconds, quantiles_of};
use crate::state::lock;

/// Descriptors kept free besides the connections (stdio, the runtime, the
/// document, the odd reconnect socket).
const FD_HEADROOM: u64 = 100;
/// How often the document is rewritten while nothing changes phase.
const WRITE_EVERY: Duration = Duration::from_secs(1);
/// How often the loop checks the end of the connect phase and of the hold.
const POLL: Duration = Duration::from_millis(10);

/// Phase and the times the document needs besides the tally.
struct Progress {
    phase: HoldPhase,
    /// When the connect phase ended (the hold began).
    held_from: Option<Instant>,
    /// When the close began.
    close_from: Option<Instant>,
    close_from_us: u64,
    stop_reason: Option<String>,
}

/// Everything the document is built from.
struct Run {
    args: Args,
    hold: Arc<Hold>,
    progress: Mutex<Progress>,
    nofile: NofileLimit,
    started: Instant,
}

/// Runs the workload to its end and writes the document.
pub async fn run(args: Args, targets: Vec<Target>) -> Result<(), String> {
    let started = Instant::now();
    let nofile = raise_nofile();
    let slots = u64::from(args.users) * u64::from(args.conns_per_user);
    if slots + FD_HEADROOM > nofile.soft {
        return Err(format!(
            "{slots} connections need about {} file descriptors but this process may open {} \
             (hard limit {}): split them over more loader processes",
            slots + FD_HEADROOM,
            nofile.soft,
            nofile.hard
        ));
    }
    let reconnect: Vec<Target> = args
        .reconnect_targets
        .iter()
        .map(|t| parse_target(t.trim(), args.allow_remote))
        .collect::<Result<_, _>>()?;
    let targets = resolve(&targets).await?;
    let reconnect_targets = resolve(&reconnect).await?;
    for addr in &args.source_addrs {
        if let Some(t) = targets
            .iter()
            .chain(&reconnect_targets)
            .find(|t| t.addr.is_ipv4() != addr.is_ipv4())
        {
            return Err(format!(
                "source address {addr} and target {} are of different address families",
                t.display
            ));
        }
    }
    // Signals are taken over before the first connection, so a stop that
    // comes while connecting still gets the close handshakes and the document.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;

    let hold = Arc::new(Hold {
        targets,
        reconnect_targets,
        source_addrs: args.source_addrs.clone(),
        auth: args.auth_mode()?,
        jwt_secret: args.jwt_secret.clone().unwrap_or_default(),
        jwt_ttl: args.jwt_ttl,
        user_prefix: args.user_prefix.clone(),
        conns_per_user: args.conns_per_user,
        handshakes: Semaphore::new(args.connect_concurrency),
        connect_deadline: started + Duration::from_secs_f64(args.connect_timeout),
        reconnect_within: Duration::from_secs_f64(args.reconnect_within),
        reconnect_timeout: Duration::from_secs_f64(args.reconnect_timeout),
        tally: Tally::new(),
    });
    let run = Arc::new(Run {
        args,
        hold: hold.clone(),
        progress: Mutex::new(Progress {
            phase: HoldPhase::Connecting,
            held_from: None,
            close_from: None,
            close_from_us: 0,
            stop_reason: None,
        }),
        nofile,
        started,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<JoinHandle<()>> = (0..slots as u32)
        .map(|slot| tokio::spawn(idle::run_slot(hold.clone(), slot, stop_rx.clone())))
        .collect();
    let writer = tokio::spawn(write_periodically(run.clone()));
    let quiet = run.args.quiet;

    // Connect phase, then hold: until a signal, --hold, or nothing left open.
    let tally = &hold.tally;
    let mut hold_until: Option<Instant> = None;
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "signal",
            _ = sigint.recv() => break "interrupted",
            _ = tokio::time::sleep(POLL) => {}
        }
        let phase = lock(&run.progress).phase;
        if phase == HoldPhase::Connecting {
            if tally.initial_done.load(Ordering::Acquire) < slots {
                continue;
            }
            let now = Instant::now();
            {
                let mut p = lock(&run.progress);
                p.phase = HoldPhase::Holding;
                p.held_from = Some(now);
            }
            hold_until = run.args.hold.map(|s| now + Duration::from_secs_f64(s));
            run.write();
            if !quiet {
                let doc = run.document();
                eprintln!(
                    "switchboard-load: connected {}/{} in {:.2} s ({} handshakes/s), {} failed{}",
                    doc.connect.connected,
                    doc.connect.requested,
                    doc.connect.elapsed_s,
                    doc.connect
                        .handshakes_per_s
                        .map_or("-".to_owned(), |r| format!("{r:.0}")),
                    doc.connect.failed,
                    if doc.connect.errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({:?})", doc.connect.errors)
                    }
                );
            }
            continue;
        }
        if hold_until.is_some_and(|t| Instant::now() >= t) {
            break "hold elapsed";
        }
        if tally.open.load(Ordering::Acquire) == 0
            && tally.reconnecting.load(Ordering::Acquire) == 0
        {
            break "all lost";
        }
    };

    // Close every connection; the slots do their own close handshake.
    {
        let mut p = lock(&run.progress);
        p.phase = HoldPhase::Closing;
        p.close_from = Some(Instant::now());
        p.close_from_us = unix_us();
        p.stop_reason = Some(reason.to_owned());
    }
    run.write();
    let _ = stop_tx.send(true);
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    let all = futures_util::future::join_all(tasks);
    let second_signal = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), all) => {}
        _ = second_signal => {
            eprintln!("switchboard-load: second signal: not waiting for the close handshakes");
        }
    }
    for a in aborts {
        a.abort();
    }
    writer.abort();
    lock(&run.progress).phase = HoldPhase::Done;
    let doc = run.document();
    if !quiet {
        eprintln!(
            "switchboard-load: done ({reason}): held {} of {} for {:.1} s, {} lost {:?}{}",
            doc.hold.peak_open,
            doc.connect.requested,
            doc.hold.held_s,
            doc.hold.lost,
            doc.hold.lost_by_cause,
            doc.reconnect.as_ref().map_or(String::new(), |r| format!(
                ", reconnected {}/{} ({} within {} s, {} failed, storm {} s)",
                r.reconnected,
                r.started,
                r.reconnected_within,
                r.within_s,
                r.failed,
                r.storm_s.map_or("-".to_owned(), |s| format!("{s:.2}"))
            ))
        );
    }
    match &run.args.out {
        Some(path) => write_document(path, &doc),
        None => {
            let text = serde_json::to_string_pretty(&doc)
                .map_err(|e| format!("serializing the document: {e}"))?;
            println!("{text}");
            Ok(())
        }
    }
}

/// Rewrites the document about once a second while the run goes on.
async fn write_periodically(run: Arc<Run>) {
    loop {
        tokio::time::sleep(WRITE_EVERY).await;
        run.write();
    }
}

impl Run {
    /// Writes the document to `--out`, if given (a failure is reported once
    /// per call; the final write's failure ends the run with an error).
    fn write(&self) {
        if let Some(path) = &self.args.out {
            if let Err(e) = write_document(path, &self.document()) {
                eprintln!("switchboard-load: {e}");
            }
        }
    }

    /// The document as of now.
    fn document(&self) -> ConnectionsRun {
        let args = &self.args;
        let hold = &self.hold;
        let t = &hold.tally;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let ms = |us: u64| us as f64 / 1000.0;
        let some_us = |us: u64| (us != 0 && us != u64::MAX).then(|| ms(us));
        let p = lock(&self.progress);
        let now = Instant::now();

        let connected = load(&t.connected);
        let first_start = some_us(load(&t.first_start_us));
        let connect_end = if p.phase == HoldPhase::Connecting {
            Some(ms(unix_us()))
        } else {
            some_us(load(&t.last_initial_us))
        };
        let elapsed_s = match (first_start, connect_end) {
            (Some(a), Some(b)) => ((b - a) / 1000.0).max(0.0),
            _ => 0.0,
        };
        let connect = ConnectPhase {
            requested: u64::from(args.users) * u64::from(args.conns_per_user),
            connected,
            failed: load(&t.failed),
            concurrency: args.connect_concurrency,
            started_unix_ms: first_start.unwrap_or(0.0),
            finished_unix_ms: (p.phase != HoldPhase::Connecting)
                .then(|| some_us(load(&t.last_initial_us)))
                .flatten(),
            elapsed_s: round3(elapsed_s),
            handshakes_per_s: (connected > 0 && elapsed_s > 0.0)
                .then(|| round3(connected as f64 / elapsed_s)),
            handshake_ms: lock(&t.handshake)
                .as_ref()
                .map(quantiles_of)
                .unwrap_or_default(),
            errors: lock(&t.connect_errors).clone(),
            first_errors: lock(&t.first_errors).clone(),
        };

        let held_s = p.held_from.map_or(0.0, |from| {
            p.close_from
                .unwrap_or(now)
                .saturating_duration_since(from)
                .as_secs_f64()
        });
        let closed_all =
            p.phase == HoldPhase::Done || (p.close_from.is_some() && load(&t.open) == 0);
        let last_close = load(&t.last_close_us);
        let hold_summary = HoldSummary {
            open: load(&t.open),
            peak_open: load(&t.peak_open),
            held_s: round3(held_s),
            lost: load(&t.lost),
            lost_by_cause: lock(&t.lost_by_cause).clone(),
            first_loss_unix_ms: some_us(load(&t.first_loss_us)),
            last_loss_unix_ms: some_us(load(&t.last_loss_us)),
            closed_by_loader: load(&t.closed_by_loader),
            close_unanswered: load(&t.close_unanswered),
            close_s: (closed_all && p.close_from_us != 0)
                .then(|| round3(last_close.saturating_sub(p.close_from_us) as f64 / 1e6)),
        };

        let reconnect = (!hold.reconnect_targets.is_empty()).then(|| {
            let first_loss = some_us(load(&t.first_loss_us));
            let last_reconnect = some_us(load(&t.last_reconnect_us));
            ReconnectSummary {
                targets: hold
                    .reconnect_targets
                    .iter()
                    .map(|e| e.display.clone())
                    .collect(),
                within_s: args.reconnect_within,
                timeout_s: args.reconnect_timeout,
                started: load(&t.reconnect_started),
                reconnected: load(&t.reconnected),
                reconnected_within: load(&t.reconnected_within),
                failed: load(&t.reconnect_failed),
                pending: load(&t.reconnecting),
                attempts: load(&t.attempts),
                attempt_errors: lock(&t.attempt_errors).clone(),
                by_target: lock(&t.by_target).clone(),
                last_reconnect_unix_ms: last_reconnect,
                storm_s: match (first_loss, last_reconnect) {
                    (Some(a), Some(b)) if b >= a => Some(round3((b - a) / 1000.0)),
                    _ => None,
                },
                reconnect_ms: lock(&t.reconnect)
                    .as_ref()
                    .map(quantiles_of)
                    .unwrap_or_default(),
            }
        });

        ConnectionsRun {
            mode: ConnectionsTag::Connections,
            phase: p.phase,
            pid: std::process::id(),
            targets: hold.targets.iter().map(|e| e.display.clone()).collect(),
            source_addrs: args.source_addrs.iter().map(IpAddr::to_string).collect(),
            auth: match hold.auth {
                AuthMode::Jwt => "jwt",
                AuthMode::None => "none",
            }
            .to_owned(),
            user_prefix: args.user_prefix.clone(),
            nofile: self.nofile,
            connect,
            hold: hold_summary,
            reconnect,
            stop_reason: p.stop_reason.clone(),
            rss_kib: own_rss_kib(),
            cpu_s: round3(cpu_seconds()),
            elapsed_s: round3(self.started.elapsed().as_secs_f64()),
            updated_unix_ms: ms(unix_us()),
        }
    }
}

/// Writes `doc` to `path` through `path.tmp` and a rename.
fn write_document(path: &Path, doc: &ConnectionsRun) -> Result<(), String> {
    let text =
        serde_json::to_string_pretty(doc).map_err(|e| format!("serializing the document: {e}"))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{text}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Resolves each target's host and port once (the upgrade URL keeps the name).
async fn resolve(targets: &[Target]) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let rest = t.endpoint.strip_prefix("ws://").unwrap_or(&t.endpoint);
        let authority = rest.split('/').next().unwrap_or(rest);
        let authority = if authority
            .rsplit(':')
            .next()
            .is_some_and(|p| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(authority.as_str())
            .await
            .map_err(|e| format!("target {}: {e}", t.display))?
            .next()
            .ok_or_else(|| format!("target {}: no address", t.display))?;
        out.push(Endpoint {
            display: t.display.clone(),
            url: t.endpoint.clone(),
            addr,
        });
    }
    Ok(out)
}

/// Raises the soft open-files limit to the hard one; reports both.
fn raise_nofile() -> NofileLimit {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return NofileLimit::default();
    };
    let raised = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    NofileLimit {
        soft_before: soft,
        soft: raised,
        hard,
    }
}

/// This process's VmRSS, KiB.
fn own_rss_kib() -> Option<u64> {
    procfs::process::Process::myself()
        .ok()?
        .status()
        .ok()?
        .vmrss
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_within_the_hard_one() {
        let limit = raise_nofile();
        assert!(limit.hard > 0);
        assert!(limit.soft >= limit.soft_before && limit.soft <= limit.hard);
    }

    #[tokio::test]
    async fn targets_resolve_to_their_port() {
        let t = parse_target("ws://127.0.0.1:8081", false).expect("valid");
        let e = resolve(&[t]).await.expect("resolves");
        assert_eq!(e[0].addr.to_string(), "127.0.0.1:8081");
        assert_eq!(e[0].url, "ws://127.0.0.1:8081/ws");
        let t = parse_target("ws://[::1]:9/x", false).expect("valid");
        let e = resolve(&[t]).await.expect("resolves");
        assert_eq!(e[0].addr.to_string(), "[::1]:9");
    }
}
