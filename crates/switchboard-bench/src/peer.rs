//! The Socket.IO peer (`bench/peers/socketio/server.js`) as the benchmark
//! runs it: checking that Node.js is there, `npm ci` from the committed
//! lockfile when `node_modules` is missing, the command line of one node,
//! and its `GET /stats` read as a [`Scrape`] under the names of
//! [`MetricNames::SOCKETIO`], so the window, the derived figures and the
//! report read the peer exactly as they read Switchboard's `/metrics`.
//!
//! Starting and stopping the nodes is the `cluster` module's and the
//! supervisor's job, as for Switchboard's instances.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use crate::error::BenchError;
use crate::openmetrics::{Scrape, Series};
use crate::procs::tail_of_file;
use crate::system::{MetricNames, PeerAdapter};

/// The oldest Node.js `server.js` runs on (`util.parseArgs`).
const MIN_NODE_MAJOR: u32 = 18;

/// Bound of `npm ci` (a first install fetches about 40 packages).
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(600);

/// A peer ready to start: Node.js found, dependencies installed.
#[derive(Debug, Clone)]
pub struct PeerSetup {
    /// The `node` binary.
    pub node_bin: PathBuf,
    /// `server.js`, absolute.
    pub server_js: PathBuf,
    /// `node --version`.
    pub node_version: String,
    /// The peer's direct dependencies as installed: name -> version.
    pub packages: BTreeMap<String, String>,
}

/// Checks Node.js, installs the peer's dependencies if `node_modules` is
/// missing (`npm ci`, log in `logs_dir/npm-ci.log`), and reads what is installed.
pub async fn prepare(
    peer_dir: &Path,
    node_bin: &Path,
    npm_bin: &Path,
    logs_dir: &Path,
) -> Result<PeerSetup, BenchError> {
    let peer_dir = std::path::absolute(peer_dir).unwrap_or_else(|_| peer_dir.to_owned());
    let server_js = peer_dir.join("server.js");
    let manifest = peer_dir.join("package.json");
    if !server_js.is_file() || !manifest.is_file() {
        return Err(BenchError::Report(format!(
            "the Socket.IO peer is not at {} (no server.js / package.json): run from the \
             repository root (scripts/bench.sh does) or pass --peer-dir",
            peer_dir.display()
        )));
    }
    let node_version = version_of(node_bin).ok_or_else(|| {
        BenchError::Report(format!(
            "cannot run `{} --version`: the Socket.IO peer needs Node.js 18 or later \
             (Debian/Ubuntu: apt-get install -y nodejs npm; or https://nodejs.org) or pass --node-bin",
            node_bin.display()
        ))
    })?;
    let major = node_version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < MIN_NODE_MAJOR) {
        return Err(BenchError::Report(format!(
            "`{} --version` says {node_version}: the Socket.IO peer needs Node.js \
             {MIN_NODE_MAJOR} or later",
            node_bin.display()
        )));
    }
    let dependencies = read_dependencies(&manifest)?;
    let installed = |name: &str| {
        peer_dir
            .join("node_modules")
            .join(name)
            .join("package.json")
    };
    if dependencies.keys().any(|name| !installed(name).is_file()) {
        npm_ci(&peer_dir, npm_bin, logs_dir).await?;
    }
    let mut packages = BTreeMap::new();
    for name in dependencies.keys() {
        let version = read_version(&installed(name))?;
        packages.insert(name.clone(), version);
    }
    Ok(PeerSetup {
        node_bin: node_bin.to_owned(),
        server_js,
        node_version,
        packages,
    })
}

/// `program --version`, trimmed, if it runs.
fn version_of(program: &Path) -> Option<String> {
    let output = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    dependencies: BTreeMap<String, String>,
    #[serde(default)]
    version: String,
}

fn read_manifest(path: &Path) -> Result<Manifest, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("read", path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| BenchError::Report(format!("{}: not a package.json: {e}", path.display())))
}

fn read_dependencies(manifest: &Path) -> Result<BTreeMap<String, String>, BenchError> {
    Ok(read_manifest(manifest)?.dependencies)
}

fn read_version(manifest: &Path) -> Result<String, BenchError> {
    Ok(read_manifest(manifest)?.version)
}

/// `npm ci` in `peer_dir`: exactly the versions of the committed lockfile.
async fn npm_ci(peer_dir: &Path, npm_bin: &Path, logs_dir: &Path) -> Result<(), BenchError> {
    if version_of(npm_bin).is_none() {
        return Err(BenchError::Report(format!(
            "{}/node_modules is missing and `{} --version` does not run: install npm \
             (Debian/Ubuntu: apt-get install -y npm) or pass --npm-bin, or run `npm ci` there",
            peer_dir.display(),
            npm_bin.display()
        )));
    }
    let log = logs_dir.join("npm-ci.log");
    let out = std::fs::File::create(&log).map_err(|e| BenchError::io("create log", &log, e))?;
    let err = out
        .try_clone()
        .map_err(|e| BenchError::io("clone log handle", &log, e))?;
    eprintln!(
        "[bench] installing the Socket.IO peer's dependencies: npm ci in {} (log {})",
        peer_dir.display(),
        log.display()
    );
    let mut child = tokio::process::Command::new(npm_bin)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(peer_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BenchError::Spawn {
            name: "npm ci".into(),
            program: npm_bin.to_owned(),
            source,
        })?;
    let status = match tokio::time::timeout(NPM_CI_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(BenchError::io("wait for npm ci", &log, e)),
        Err(_) => {
            let _ = child.kill().await;
            return Err(BenchError::Report(format!(
                "npm ci did not finish within {NPM_CI_TIMEOUT:?}; log {}",
                log.display()
            )));
        }
    };
    if !status.success() {
        return Err(BenchError::Report(format!(
            "npm ci in {} failed ({status}); last log lines:\n{}",
            peer_dir.display(),
            tail_of_file(&log, 20)
        )));
    }
    Ok(())
}

impl PeerSetup {
    /// The arguments of `node` for one peer node.
    pub fn node_args(
        &self,
        adapter: PeerAdapter,
        id: &str,
        port: u16,
        redis_port: u16,
    ) -> Vec<String> {
        vec![
            self.server_js.to_string_lossy().into_owned(),
            "--port".into(),
            port.to_string(),
            "--redis".into(),
            format!("redis://127.0.0.1:{redis_port}"),
            "--adapter".into(),
            adapter.as_str().into(),
            "--name".into(),
            id.into(),
        ]
    }
}

/// `GET /stats` of a peer node.
#[derive(Deserialize)]
struct Stats {
    adapter: String,
    counters: BTreeMap<String, f64>,
}

/// A peer node's `/stats` as series: `socketio_connections` (gauge), every
/// other counter as `socketio_<name>_total`, the bus counters labelled with
/// the adapter as their `kind`, and the two breakdowns the report shows for
/// Switchboard: `socketio_dm_total{path="local"|"remote"}` (whether the
/// recipient's room had a socket on the sender's node) and
/// `socketio_dropped_total{reason="error_answer"}`.
pub fn scrape_of_stats(body: &str) -> Result<Scrape, String> {
    let stats: Stats =
        serde_json::from_str(body).map_err(|e| format!("/stats is not the peer's JSON: {e}"))?;
    let names = &MetricNames::SOCKETIO;
    let series = |name: &str, label: Option<(&str, &str)>, value: f64| Series {
        name: name.to_owned(),
        labels: label
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into_iter()
            .collect(),
        value,
    };
    let counter = |name: &str| stats.counters.get(name).copied().unwrap_or(0.0);
    let kind = Some(("kind", stats.adapter.as_str()));
    let mut out = Vec::with_capacity(stats.counters.len() + 4);
    for (name, &value) in &stats.counters {
        out.push(match name.as_str() {
            "connections" => series(names.connections, None, value),
            "bus_received" => series(names.bus_received, kind, value),
            "bus_published" => series(names.bus_published, kind, value),
            _ => series(&format!("socketio_{name}_total"), None, value),
        });
    }
    let local = counter("dm_local");
    out.push(series(names.dm_by_path, Some(("path", "local")), local));
    out.push(series(
        names.dm_by_path,
        Some(("path", "remote")),
        counter("dm_in") - local,
    ));
    out.push(series(
        names.dropped,
        Some(("reason", "error_answer")),
        counter("errors"),
    ));
    Ok(Scrape::from_series(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_read_under_the_peer_names() {
        let body = r#"{"name":"n1","pid":7,"adapter":"classic","counters":{"connections":100,
            "connects_total":100,"dm_in":1020,"dm_local":490,"room_in":0,"acks_sent":1020,
            "errors":1,"packets_out":2210,"events_out":990,"bus_published":1020,"bus_received":2000}}"#;
        let s = scrape_of_stats(body).expect("reads");
        let names = &MetricNames::SOCKETIO;
        assert_eq!(s.sum(names.connections, None), 100.0);
        assert_eq!(s.sum(names.frames_queued, None), 2210.0);
        assert_eq!(
            s.by_label(names.bus_received, "kind").get("classic"),
            Some(&2000.0)
        );
        assert_eq!(s.sum(names.bus_published, None), 1020.0);
        assert_eq!(
            s.by_label(names.dm_by_path, "path").get("remote"),
            Some(&530.0)
        );
        assert_eq!(s.sum(names.dropped, None), 1.0);
        assert_eq!(s.sum("socketio_events_out_total", None), 990.0);
        // The stored form reads back the same.
        let stored = serde_json::to_value(&s).expect("serializes");
        assert_eq!(serde_json::from_value::<Scrape>(stored).ok(), Some(s));
        assert!(scrape_of_stats("# HELP x\nx 1\n").is_err());
    }
}
