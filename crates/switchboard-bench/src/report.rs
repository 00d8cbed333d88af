//! The result files: `<name>.json` (every raw reading and derived figure, the
//! machine, the exact command line), `<name>.md` (the summary table) and,
//! through the `plot` module, `<name>.svg`. Also the small facts about the
//! machine and the clock that go into them.
//!
//! Everything here reads a [`ResultsFile`] only, so `--render-only` can
//! re-render the Markdown and SVG of an earlier run, and `--merge` can join
//! the rows of several (Switchboard's and the peer's) into one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::run::RunRecord;
use crate::system::System;

/// Identifies the layout of `<name>.json`.
pub const SCHEMA: &str = "switchboard-bench/1";

/// What the machine was.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `nproc`.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// /proc/version.
    pub kernel: String,
    /// `redis-server --version`.
    pub redis_version: String,
    /// Clock ticks per second used for /proc times.
    pub clk_tck: f64,
    /// `git describe --always --dirty` of the working tree, if any.
    pub git_revision: Option<String>,
    /// `node --version`, when the Socket.IO peer ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_version: Option<String>,
    /// The Socket.IO peer's direct npm dependencies as installed: name -> version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peer_packages: BTreeMap<String, String>,
}

/// Everything one benchmark invocation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultsFile {
    /// [`SCHEMA`].
    pub schema: String,
    /// The result name (file stem).
    pub name: String,
    /// The command line, shell-quoted.
    pub command: String,
    /// When the benchmark started, UTC (RFC 3339).
    pub started_utc: String,
    /// When it finished, UTC.
    pub finished_utc: String,
    /// The machine.
    pub machine: Machine,
    /// Every setting (the parsed command line).
    pub config: serde_json::Value,
    /// How the measured window is delimited.
    pub window: String,
    /// The pass rule applied.
    pub pass_rule: String,
    /// Whether Ctrl-C / SIGTERM cut the matrix short.
    pub interrupted: bool,
    /// `--merge`: the results files joined here, as `name: command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// One record per (system, N).
    pub runs: Vec<RunRecord>,
}

/// Reads the machine facts (best effort: unknown values stay empty).
pub fn machine(redis_bin: &Path) -> Machine {
    let command_output = |program: &Path, args: &[&str]| -> Option<String> {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: crate::probe::cpu_model(),
        kernel: std::fs::read_to_string("/proc/version")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        redis_version: command_output(redis_bin, &["--version"]).unwrap_or_default(),
        clk_tck: crate::probe::clk_tck(),
        git_revision: command_output(
            Path::new("git"),
            &["describe", "--always", "--dirty", "--abbrev=12"],
        ),
        node_version: None,
        peer_packages: BTreeMap::new(),
    }
}

/// The settings that must agree for rows of different results files to
/// compare like for like: the workload, the loader's flags, the pass rule.
const LIKE_FOR_LIKE: [&str; 17] = [
    "workload",
    "users",
    "rate",
    "duration",
    "body_bytes",
    "locality",
    "rooms",
    "room_members",
    "room_spread",
    "churn_rate",
    "find_max",
    "start_rate",
    "step_factor",
    "retries",
    "max_p99_ms",
    "min_delivery",
    "loader_args",
];

/// Joins the rows of results files into one (`--merge`), refusing files
/// whose workload settings or machine differ.
pub fn merge(
    parts: Vec<ResultsFile>,
    name: String,
    command: String,
    finished_utc: String,
) -> Result<ResultsFile, BenchError> {
    let Some(first) = parts.first() else {
        return Err(BenchError::Report("--merge: no results files".into()));
    };
    for part in &parts {
        if part.schema != SCHEMA {
            return Err(BenchError::Report(format!(
                "--merge: {} is a {} file, not {SCHEMA}",
                part.name, part.schema
            )));
        }
        for key in LIKE_FOR_LIKE {
            let (a, b) = (setting(&first.config, key), setting(&part.config, key));
            if a != b {
                return Err(BenchError::Report(format!(
                    "--merge: {} and {} differ in {key} ({a} vs {b}): their rows would not \
                     compare like for like",
                    first.name, part.name
                )));
            }
        }
        let (m, n) = (&first.machine, &part.machine);
        if (m.nproc, &m.cpu_model, &m.kernel) != (n.nproc, &n.cpu_model, &n.kernel) {
            return Err(BenchError::Report(format!(
                "--merge: {} and {} ran on different machines",
                first.name, part.name
            )));
        }
    }
    let mut machine = first.machine.clone();
    for part in &parts {
        if machine.node_version.is_none() {
            machine.node_version = part.machine.node_version.clone();
        }
        if machine.peer_packages.is_empty() {
            machine.peer_packages = part.machine.peer_packages.clone();
        }
    }
    let started_utc = parts
        .iter()
        .map(|p| p.started_utc.clone())
        .min()
        .unwrap_or_default();
    Ok(ResultsFile {
        schema: SCHEMA.to_owned(),
        name,
        command,
        started_utc,
        finished_utc,
        machine,
        config: first.config.clone(),
        window: first.window.clone(),
        pass_rule: first.pass_rule.clone(),
        interrupted: parts.iter().any(|p| p.interrupted),
        merged_from: parts
            .iter()
            .map(|p| format!("{}: {}", p.name, p.command))
            .collect(),
        runs: parts.into_iter().flat_map(|p| p.runs).collect(),
    })
}

/// UTC now as `(compact, rfc3339)`: `20261125T183000Z`, `2026-11-25T18:30:00Z`.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (y, mo, d) = civil_from_days(days);
    (
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The command line, each argument quoted for a POSIX shell where needed.
pub fn shell_command_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `<dir>/<name>.json`, `.md` and `.svg`; returns their paths.
pub fn write_all(results: &ResultsFile, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create out dir", dir, e))?;
    let json_path = dir.join(format!("{}.json", results.name));
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| BenchError::Report(format!("serialize results: {e}")))?;
    write_atomically(&json_path, json.as_bytes())?;
    let md_path = dir.join(format!("{}.md", results.name));
    write_atomically(&md_path, markdown(results).as_bytes())?;
    let svg_path = dir.join(format!("{}.svg", results.name));
    crate::plot::write_svg(results, &svg_path)?;
    Ok(vec![json_path, md_path, svg_path])
}

/// A workload's results file (presence, connections, ingest): what the
/// shared writing and re-rendering need.
pub trait Outputs: Serialize + serde::de::DeserializeOwned {
    /// What the workload is called in error messages.
    const WHAT: &'static str;
    /// The result name: files are `<name>.json`, `.md`, `.svg`.
    fn name(&self) -> &str;
    /// The Markdown report.
    fn markdown(&self) -> String;
    /// Whether the run was interrupted (Ctrl-C).
    fn interrupted(&self) -> bool;
    /// Whether every row passed.
    fn all_passed(&self) -> bool;
    /// Writes the chart to `path`; false when the workload has none.
    fn write_svg(&self, _path: &Path) -> Result<bool, BenchError> {
        Ok(false)
    }
}

/// Writes `<dir>/<name>.json`, `.md` and (when there is a chart) `.svg`;
/// returns their paths.
pub fn write_outputs<R: Outputs>(results: &R, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create out dir", dir, e))?;
    let json_path = dir.join(format!("{}.json", results.name()));
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| BenchError::Report(format!("serialize results: {e}")))?;
    write_atomically(&json_path, json.as_bytes())?;
    let md_path = dir.join(format!("{}.md", results.name()));
    write_atomically(&md_path, results.markdown().as_bytes())?;
    let mut paths = vec![json_path, md_path];
    let svg_path = dir.join(format!("{}.svg", results.name()));
    if results.write_svg(&svg_path)? {
        paths.push(svg_path);
    }
    Ok(paths)
}

/// Re-renders `<name>.md` (and `.svg`) next to the results JSON at `path`
/// whose text is `text`.
pub fn render_outputs<R: Outputs>(text: &str, path: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let results: R = serde_json::from_str(text).map_err(|e| {
        BenchError::Report(format!(
            "{}: not a{} {} results file: {e}",
            path.display(),
            if R::WHAT.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "n"
            } else {
                ""
            },
            R::WHAT
        ))
    })?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let md = dir.join(format!("{}.md", results.name()));
    std::fs::write(&md, results.markdown()).map_err(|e| BenchError::io("write", &md, e))?;
    let mut paths = vec![md];
    let svg = dir.join(format!("{}.svg", results.name()));
    if results.write_svg(&svg)? {
        paths.push(svg);
    }
    Ok(paths)
}

/// The end of a workload's run: writes its files to `out_dir` (and, with
/// `publish`, to bench/results/), prints the report and where everything
/// is, and turns the outcome into the exit code (130 interrupted, 1 a row
/// failed).
pub fn conclude<R: Outputs>(
    results: &R,
    out_dir: &Path,
    logs_dir: &Path,
    publish: bool,
) -> Result<std::process::ExitCode, BenchError> {
    let mut paths = write_outputs(results, out_dir)?;
    if publish {
        paths.extend(write_outputs(results, Path::new(crate::cli::PUBLISH_DIR))?);
    }
    println!("{}", results.markdown());
    for p in &paths {
        eprintln!("[bench] wrote {}", p.display());
    }
    eprintln!(
        "[bench] logs of every process it started: {}",
        logs_dir.display()
    );
    Ok(if results.interrupted() {
        std::process::ExitCode::from(130)
    } else if results.all_passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Writes `path` via `path.tmp` and a rename, so a reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BenchError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("out")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| BenchError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BenchError::io("rename into place", path, e))
}

/// Reads a results JSON written earlier.
pub fn read(path: &Path) -> Result<ResultsFile, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("read", path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| BenchError::Report(format!("{}: not a results file: {e}", path.display())))
}

fn f(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".to_owned(),
    }
}

/// A setting of the run as text (`-` when absent or null).
pub fn config_str(results: &ResultsFile, key: &str) -> String {
    setting(&results.config, key)
}

/// A setting of a parsed command line as text (`-` when absent or null; a
/// list comma-separated).
pub fn setting(config: &serde_json::Value, key: &str) -> String {
    fn text(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
            v => v.to_string(),
        }
    }
    config.get(key).map_or_else(|| "-".to_owned(), text)
}

/// The offered rate, or with `--find-max` the first rate of the ladder
/// (`--start-rate` when given, else `--rate`).
pub fn first_rate(results: &ResultsFile) -> String {
    let start = config_str(results, "start_rate");
    if is_find_max(results) && start != "-" {
        start
    } else {
        config_str(results, "rate")
    }
}

/// Whether the results come from `--find-max` runs.
pub fn is_find_max(results: &ResultsFile) -> bool {
    results
        .config
        .get("find_max")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// The Markdown summary.
pub fn markdown(results: &ResultsFile) -> String {
    let find_max = is_find_max(results);
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Switchboard benchmark `{}`\n", results.name);
    let _ = writeln!(
        out,
        "- date (UTC): {} to {}{}",
        results.started_utc,
        results.finished_utc,
        if results.interrupted {
            " — **interrupted**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "- machine: {} cpus, {}; {}",
        m.nproc, m.cpu_model, m.kernel
    );
    let _ = writeln!(
        out,
        "- {}; switchboard tree {}",
        m.redis_version,
        m.git_revision.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(out, "- command: `{}`", results.command);
    let _ = writeln!(
        out,
        "- workload: {}, {} users, offered {}/s{}, {} s{}, body {} B",
        config_str(results, "workload"),
        config_str(results, "users"),
        first_rate(results),
        if find_max { " (find-max start)" } else { "" },
        config_str(results, "duration"),
        if find_max { " per step" } else { "" },
        config_str(results, "body_bytes"),
    );
    for source in &results.merged_from {
        let _ = writeln!(out, "- merged from `{source}`");
    }
    if results
        .runs
        .iter()
        .any(|r| matches!(System::from_name(&r.mode), Some(System::Socketio(_))))
    {
        let packages = m
            .peer_packages
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "- `socketio-*` rows: the Socket.IO peer of `bench/peers/socketio` ({packages}; Node \
             {}), one `node server.js` per instance with the classic or the sharded Redis \
             adapter, driven by the same switchboard-load (`--protocol socketio`); its \
             *instance* figures are the node processes', its bus messages what each node's \
             Redis subscriber connection received (its `/stats`), and its acks say `ok` (it \
             cannot tell routed from offline)",
            m.node_version.as_deref().unwrap_or("?")
        );
    }
    let _ = writeln!(out, "- pass rule: {}", results.pass_rule);
    let _ = writeln!(out, "- window: {}", results.window);
    if find_max {
        let _ = writeln!(
            out,
            "- find-max: *offered/s* is the loader's max sustained rate; delivered/s, p50, p99 \
             and lost are those of that step; CPU, Redis and bus figures per message average \
             over the whole ladder (every step's deliveries in the window)."
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| mode | N | {} | delivered/s | p50 ms | p99 ms | instance µs/msg | Redis µs/msg | total µs/msg | Redis B/msg | PUBLISH/msg | bus msgs rx per instance per msg (mean / max) | lost | pass |",
        if find_max { "max sustained/s" } else { "offered/s" }
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &results.runs {
        match &r.derived {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
                    r.mode,
                    r.nodes,
                    f(Some(d.offered_rate), 0),
                    f(Some(d.delivered_per_sec), 0),
                    f(d.p50_ms, 2),
                    f(d.p99_ms, 1),
                    f(d.instance_cpu_us_per_msg, 1),
                    f(d.redis_cpu_us_per_msg, 1),
                    f(d.total_cpu_us_per_msg, 1),
                    f(d.redis_out_bytes_per_msg, 0),
                    f(d.publish_per_msg, 2),
                    f(d.bus_rx_per_instance_per_msg_mean, 2),
                    f(d.bus_rx_per_instance_per_msg_max, 2),
                    f(Some(d.lost), 0),
                    if d.pass {
                        "yes".to_owned()
                    } else {
                        format!("NO ({})", d.pass_failures.join("; "))
                    },
                );
            }
            None => {
                let reason = r
                    .error
                    .as_deref()
                    .map_or("no result".to_owned(), short_error);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | | | | | | | | | | | |",
                    r.mode,
                    r.nodes,
                    format!("{}: {}", r.status, reason).replace('|', "\\|")
                );
            }
        }
    }

    if results.runs.iter().all(|r| r.derived.is_none()) {
        return out + &warnings_section(results);
    }
    let _ = writeln!(out, "\n## Details\n");
    let _ = writeln!(
        out,
        "| mode | N | window s | delivered (loader) / frames queued (instances) | instance cores | Redis cores | machine busy cores (irq / other processes) | Redis µs/msg (INFO) | loader µs/msg | Redis cmds/msg | commands per msg | bus rx by kind | DMs by path |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results.runs {
        let Some(d) = &r.derived else { continue };
        let commands = d
            .command_calls_per_msg
            .iter()
            .filter(|(_, v)| **v >= 0.005)
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let kv = |m: &std::collections::BTreeMap<String, f64>| {
            m.iter()
                .filter(|(_, v)| **v != 0.0)
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} | {} | {} | {} ({} / {}) | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.nodes,
            f(Some(d.window_s), 2),
            f(Some(d.window_delivered), 0),
            f(Some(d.instance_frames_queued), 0),
            f(d.instance_cores, 2),
            f(d.redis_cores, 2),
            f(d.machine_busy_cores, 2),
            f(d.machine_irq_cores, 2),
            f(d.foreign_cores, 2),
            f(d.redis_cpu_us_per_msg_info, 1),
            f(d.loader_cpu_us_per_msg, 1),
            f(d.redis_commands_per_msg, 2),
            commands,
            kv(&d.bus_received_by_kind),
            kv(&d.dm_by_path),
        );
    }

    out + &redis_cluster_section(results) + &warnings_section(results)
}

/// The "Redis Cluster" section (empty when no run had one): per run the
/// totals and the spread, per node what it did, and the cluster rows'
/// Redis and total CPU per message against their single-Redis row and the
/// other modes' rows on the same cluster.
fn redis_cluster_section(results: &ResultsFile) -> String {
    let clustered: Vec<(&RunRecord, &crate::derive::RedisClusterFigures)> = results
        .runs
        .iter()
        .filter_map(|r| Some((r, r.derived.as_ref()?.redis_cluster.as_ref()?)))
        .collect();
    let mut out = String::new();
    if clustered.is_empty() {
        return out;
    }
    let _ = writeln!(out, "\n## Redis Cluster\n");
    let _ = writeln!(
        out,
        "Redis figures of a `-cluster<M>` row are sums over its nodes. *Bus*: the cluster bus \
         between the nodes (`CLUSTER INFO` messages sent, pings included; bytes: what each \
         node wrote, `/proc/PID/io`, beyond INFO's `total_net_output_bytes`: clients and replicas). \
         *max / mean*: the busiest master's CPU over the masters' mean (1 = even).\n"
    );
    let _ = writeln!(
        out,
        "| mode | N | nodes | Redis µs/msg | max / mean master CPU | Redis out B/msg | bus msgs/msg (pub/sub) | bus B/msg | PUBLISH/msg | SPUBLISH/msg |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (r, c) in &clustered {
        let Some(d) = &r.derived else { continue };
        let shape = r.redis_cluster.as_ref().map_or("-".to_owned(), |k| {
            format!(
                "{} masters, {} replicas each",
                k.shape.masters, k.shape.replicas
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            r.mode,
            r.nodes,
            shape,
            f(d.redis_cpu_us_per_msg, 1),
            f(c.master_cpu_max_over_mean, 2),
            f(d.redis_out_bytes_per_msg, 0),
            f(c.bus_sent_per_msg, 2),
            f(c.bus_publish_sent_per_msg, 2),
            f(c.bus_bytes_per_msg, 0),
            f(d.command_calls_per_msg.get("publish").copied(), 2),
            f(c.spublish_per_msg, 2),
        );
    }
    let _ = writeln!(out, "\n### Per node\n");
    let _ = writeln!(
        out,
        "| mode | N | node | role, slots | instance channels served | CPU µs/msg | share | out B/msg | bus msgs sent / rx per msg | bus B/msg | PUBLISH/msg | SPUBLISH/msg | commands/msg |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (r, c) in &clustered {
        for n in &c.nodes {
            let info = r
                .redis_cluster
                .as_ref()
                .and_then(|k| k.nodes.iter().find(|i| i.port == n.port));
            let role = match info {
                Some(i) if i.role == crate::redis_server::NodeRole::Replica => format!(
                    "replica of :{}",
                    i.master_port.map_or("?".to_owned(), |p| p.to_string())
                ),
                Some(i) => format!("master {}", i.slots.join(" ")),
                None => "-".to_owned(),
            };
            let channels = r
                .redis_cluster
                .as_ref()
                .map(|k| {
                    k.channel_owners
                        .iter()
                        .filter(|(_, port)| *port == n.port)
                        .map(|(channel, _)| channel.clone())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | :{} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
                r.mode,
                r.nodes,
                n.port,
                role,
                channels,
                f(n.cpu_us_per_msg, 1),
                n.cpu_share
                    .filter(|v| v.is_finite())
                    .map_or("-".to_owned(), |v| format!("{:.0} %", v * 100.0)),
                f(n.out_bytes_per_msg, 0),
                f(n.bus_sent_per_msg, 2),
                f(n.bus_received_per_msg, 2),
                f(n.bus_bytes_per_msg, 0),
                f(n.publish_per_msg, 2),
                f(n.spublish_per_msg, 2),
                f(n.commands_per_msg, 2),
            );
        }
    }
    let comparisons = cluster_comparisons(results);
    if !comparisons.is_empty() {
        let _ = writeln!(
            out,
            "\n### Against the single-Redis row and the other modes\n"
        );
        let _ = writeln!(
            out,
            "Per delivered message, this row over the other (runs of this file only).\n"
        );
        let _ = writeln!(
            out,
            "| row | N | over | Redis CPU | total CPU | Redis out B |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for line in comparisons {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// Table lines comparing each cluster row with its single-Redis row (the
/// same name without the `-cluster<M>` suffix) and with the other routing
/// modes' rows on the same cluster, at the same N.
fn cluster_comparisons(results: &ResultsFile) -> Vec<String> {
    let find = |mode: &str, nodes: usize| {
        results
            .runs
            .iter()
            .find(|r| r.mode == mode && r.nodes == nodes)
            .and_then(|r| r.derived.as_ref())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| f(a.zip(b).and_then(|(a, b)| per_ratio(a, b)), 2);
    let mut lines = Vec::new();
    for r in &results.runs {
        let (Some(k), Some(d)) = (&r.redis_cluster, &r.derived) else {
            continue;
        };
        let suffix = crate::redis_server::RedisTopology::Cluster(k.shape).row_suffix();
        let Some(base) = r.mode.strip_suffix(&suffix) else {
            continue;
        };
        let mut others = vec![base.to_owned()];
        let this_mode = crate::cli::RoutingMode::ALL
            .into_iter()
            .map(crate::cli::RoutingMode::as_str)
            .find(|m| base.starts_with(m));
        if let Some(this_mode) = this_mode {
            for other in crate::cli::RoutingMode::ALL.map(crate::cli::RoutingMode::as_str) {
                if other != this_mode {
                    others.push(r.mode.replacen(this_mode, other, 1));
                }
            }
        }
        for other in others {
            let Some(o) = find(&other, r.nodes) else {
                continue;
            };
            lines.push(format!(
                "| {} | {} | {} | {} | {} | {} |",
                r.mode,
                r.nodes,
                other,
                ratio(d.redis_cpu_us_per_msg, o.redis_cpu_us_per_msg),
                ratio(d.total_cpu_us_per_msg, o.total_cpu_us_per_msg),
                ratio(d.redis_out_bytes_per_msg, o.redis_out_bytes_per_msg),
            ));
        }
    }
    lines
}

/// `a / b`, `None` when `b` is not positive.
fn per_ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// The "Warnings and errors" section (empty when there are none).
fn warnings_section(results: &ResultsFile) -> String {
    let mut out = String::new();
    let notes: Vec<String> = results
        .runs
        .iter()
        .flat_map(|r| {
            let prefix = format!("{} N={}", r.mode, r.nodes);
            let mut lines: Vec<String> = r
                .derived
                .iter()
                .flat_map(|d| d.warnings.iter().cloned())
                .collect();
            if let Some(d) = &r.derived {
                if !d.verdict_disagreements.is_empty() {
                    lines.push(format!(
                        "loader pass verdict differs from the peer rule at rates {:?}",
                        d.verdict_disagreements
                    ));
                }
                if d.loader_pass.is_some_and(|p| p != d.pass) {
                    lines.push(format!(
                        "loader says pass={:?}, peer rule says {}",
                        d.loader_pass, d.pass
                    ));
                }
            }
            if let Some(e) = &r.error {
                let mut text = format!("{}: {}", r.status, short_error(e));
                if e.lines().count() > 1 {
                    text.push_str("\n\n  ```\n");
                    for l in e.lines() {
                        let _ = writeln!(text, "  {l}");
                    }
                    text.push_str("  ```");
                }
                lines.push(text);
            }
            lines.into_iter().map(move |l| format!("- {prefix}: {l}"))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## Warnings and errors\n");
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
    out
}

/// One line for a table cell: the error's first line and, when a log tail
/// follows, the first line of it that mentions an error (else its last line).
fn short_error(e: &str) -> String {
    let mut lines = e.lines();
    let first = lines.next().unwrap_or_default();
    let Some(head) = first.strip_suffix("; last log lines:") else {
        return first.to_owned();
    };
    let rest: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
    let detail = rest
        .iter()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or(rest.last());
    match detail {
        Some(d) => format!("{head}: {}", d.chars().take(160).collect::<String>()),
        None => head.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn short_errors() {
        assert_eq!(
            short_error("n1 exited early (exit status: 2); last log lines:\nerror: unexpected argument '--x' found\n\nUsage: ..."),
            "n1 exited early (exit status: 2): error: unexpected argument '--x' found"
        );
        assert_eq!(short_error("interrupted"), "interrupted");
    }

    #[test]
    fn quoting() {
        let args = ["a", "--x", "", "it's", "b c"].map(String::from);
        assert_eq!(shell_command_line(&args), "a --x '' 'it'\\''s' 'b c'");
    }

    fn results(name: &str, rate: u64, modes: &[&str]) -> ResultsFile {
        let runs = modes
            .iter()
            .map(|mode| {
                serde_json::from_value(serde_json::json!({
                    "mode": mode, "nodes": 2, "status": "ok", "error": null, "wall_s": 1.0,
                    "redis_port": null, "instance_ports": [], "instance_command": [],
                    "loader_command": [], "loader_exit": null, "window_start": null,
                    "connections_at_start": null, "window_end": null, "before": null,
                    "after": null, "loader": null, "derived": null, "timeline": [],
                    "processes": [], "logs_dir": "logs"
                }))
                .expect("a run record")
            })
            .collect();
        ResultsFile {
            schema: SCHEMA.to_owned(),
            name: name.to_owned(),
            command: format!("bench {name}"),
            started_utc: format!("2026-01-01T00:00:0{}Z", name.len() % 10),
            finished_utc: String::new(),
            machine: Machine::default(),
            config: serde_json::json!({"workload": "dm", "users": 200, "rate": rate, "loader_args": ["--no-ack"]}),
            window: String::new(),
            pass_rule: String::new(),
            interrupted: false,
            merged_from: Vec::new(),
            runs,
        }
    }

    #[test]
    fn cluster_rows_get_nodes_and_ratios() {
        use crate::derive::{Derived, RedisClusterFigures, RedisNodeDelta};
        use crate::redis_server::{ClusterRecord, ClusterShape, NodeInfo, NodeRole};
        let mut file = results(
            "c",
            1000,
            &["routed", "routed-cluster3", "broadcast-cluster3"],
        );
        let node = |port: u16, cpu: f64| RedisNodeDelta {
            port,
            role: NodeRole::Master,
            cpu_s: Some(cpu),
            cpu_us_per_msg: Some(cpu),
            cpu_share: Some(0.5),
            out_bytes_per_msg: Some(100.0),
            in_bytes_per_msg: None,
            bus_sent_per_msg: Some(0.0),
            bus_received_per_msg: Some(0.0),
            bus_publish_sent_per_msg: Some(0.0),
            bus_bytes_per_msg: Some(0.0),
            publish_per_msg: Some(0.0),
            spublish_per_msg: Some(1.0),
            commands_per_msg: None,
        };
        for (run, redis_cpu) in file.runs.iter_mut().zip([10.0, 12.0, 40.0]) {
            let clustered = run.mode.contains("cluster");
            run.derived = Some(Derived {
                redis_cpu_us_per_msg: Some(redis_cpu),
                total_cpu_us_per_msg: Some(redis_cpu * 10.0),
                redis_cluster: clustered.then(|| RedisClusterFigures {
                    nodes: vec![node(21001, redis_cpu / 2.0), node(21002, redis_cpu / 2.0)],
                    master_cpu_max_over_mean: Some(1.0),
                    ..RedisClusterFigures::default()
                }),
                ..Derived::default()
            });
            run.redis_cluster = clustered.then(|| ClusterRecord {
                shape: ClusterShape {
                    masters: 3,
                    replicas: 0,
                },
                nodes: vec![NodeInfo {
                    port: 21001,
                    pid: 1,
                    node_id: "a".into(),
                    role: NodeRole::Master,
                    slots: vec!["0-5460".into()],
                    master_port: None,
                }],
                create_command: Vec::new(),
                channel_owners: vec![
                    ("sb:inst:{n1}".into(), 21001),
                    ("sb:inst:{n2}".into(), 21002),
                ],
            });
        }
        let md = markdown(&file);
        assert!(md.contains("## Redis Cluster"), "{md}");
        assert!(
            md.contains("| routed-cluster3 | 2 | :21001 | master 0-5460 | sb:inst:{n1} | 6.0 |"),
            "{md}"
        );
        // Against the single-Redis row (12 / 10) and broadcast on the cluster (12 / 40).
        assert!(
            md.contains("| routed-cluster3 | 2 | routed | 1.20 | 1.20 | - |"),
            "{md}"
        );
        assert!(
            md.contains("| routed-cluster3 | 2 | broadcast-cluster3 | 0.30 | 0.30 | - |"),
            "{md}"
        );
        assert!(
            md.contains("| broadcast-cluster3 | 2 | routed-cluster3 | 3.33 |"),
            "{md}"
        );
    }

    #[test]
    fn merges_rows_of_like_workloads_only() {
        let sb = results("sb", 1000, &["routed", "broadcast"]);
        let mut peer = results("peer", 1000, &["socketio-classic"]);
        peer.machine.node_version = Some("v20".into());
        let merged = merge(
            vec![sb.clone(), peer],
            "both".into(),
            "bench --merge".into(),
            "t".into(),
        )
        .expect("same workload");
        let modes: Vec<&str> = merged.runs.iter().map(|r| r.mode.as_str()).collect();
        assert_eq!(modes, ["routed", "broadcast", "socketio-classic"]);
        assert_eq!(merged.machine.node_version.as_deref(), Some("v20"));
        assert_eq!(merged.merged_from, ["sb: bench sb", "peer: bench peer"]);
        let md = markdown(&merged);
        assert!(md.contains("merged from `peer: bench peer`"), "{md}");
        assert!(md.contains("`socketio-*` rows"), "{md}");
        let other_rate = results("fast", 2000, &["socketio-sharded"]);
        let refused = merge(
            vec![sb, other_rate],
            "x".into(),
            String::new(),
            String::new(),
        );
        assert!(
            refused.is_err_and(|e| e.to_string().contains("rate")),
            "different rates must not merge"
        );
    }
}
