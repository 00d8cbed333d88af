//! The kafka rows' broker: a private Tansu (Kafka-compatible, memory
//! storage) on a reserved 127.0.0.1 port, started through the run's
//! [`Supervisor`] (so it is stopped by pid with everything else, also on
//! Ctrl-C), its topic created with Tansu's own CLI, and the instances'
//! partition assignment read from their logs ("kafka partitions assigned"
//! / "revoked" lines).
//!
//! The binary is found as the test kit finds it: `--tansu-bin`,
//! `$TANSU_BIN`, where `scripts/install-tansu.sh` puts it, `tansu` on PATH.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::procs::{reserve_ports, Supervisor};

/// How long the broker may take to accept its topic.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The `tansu` binary, or why there is none.
pub fn binary(given: Option<&Path>) -> Result<PathBuf, BenchError> {
    let hint =
        "run scripts/install-tansu.sh (it prints the path) or pass --tansu-bin / set TANSU_BIN";
    if let Some(path) = given {
        return if is_executable(path) {
            Ok(path.to_owned())
        } else {
            Err(BenchError::Report(format!(
                "--tansu-bin {} is not an executable file",
                path.display()
            )))
        };
    }
    if let Some(bin) = std::env::var_os("TANSU_BIN").map(PathBuf::from) {
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(BenchError::Report(format!(
                "TANSU_BIN={} is not an executable file: {hint}",
                bin.display()
            )))
        };
    }
    let installed = std::env::var_os("TANSU_HOME")
        .map(|home| PathBuf::from(home).join("bin/tansu"))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/share/switchboard/tansu/bin/tansu"))
        });
    if let Some(path) = installed.filter(|p| is_executable(p)) {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .and_then(|dirs| {
            std::env::split_paths(&dirs)
                .map(|d| d.join("tansu"))
                .find(|p| is_executable(p))
        })
        .ok_or_else(|| {
            BenchError::Report(format!(
                "the Tansu broker binary was not found (kafka rows need it): {hint}"
            ))
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `tansu --version`, best effort.
pub fn version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A started broker with its topic.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its pid (the supervisor's).
    pub pid: u32,
}

impl Broker {
    /// `127.0.0.1:PORT`, for `--kafka-brokers` and the producer.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Starts a broker in `dir` and creates `topic` with `partitions`
/// partitions (retried until the broker takes it, at most 30 s), checking
/// the broker lists it with that many.
pub async fn start(
    bin: &Path,
    dir: &Path,
    topic: &str,
    partitions: u32,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<Broker, BenchError> {
    let port = reserve_ports(1)?
        .first()
        .copied()
        .ok_or_else(|| BenchError::Report("no port reserved for Tansu".into()))?;
    let url = format!("tcp://127.0.0.1:{port}");
    let work = dir.join("tansu");
    std::fs::create_dir_all(&work).map_err(|e| BenchError::io("create Tansu dir", &work, e))?;
    let args: Vec<String> = [
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
        "--storage-engine",
        "memory://tansu/",
        "--cluster-id",
        "switchboard-bench",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let pid = supervisor.spawn_in_dir("tansu", bin, &args, &work, &dir.join("tansu.log"), true)?;
    let broker = Broker { port, pid };
    let deadline = Instant::now() + START_TIMEOUT;
    let create = [
        "topic".to_owned(),
        "create".to_owned(),
        "--partitions".to_owned(),
        partitions.to_string(),
        topic.to_owned(),
    ];
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        if let Some(status) = supervisor.try_exited(pid) {
            return Err(BenchError::ExitedEarly {
                name: "tansu".into(),
                status,
                log_tail: supervisor.log_tail(pid, 20),
            });
        }
        let (ok, text) = cli(bin, &create, port).await?;
        if ok || text.contains("already exists") {
            break;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::NotReady {
                name: format!("tansu (topic create: {text})"),
                seconds: START_TIMEOUT.as_secs_f64(),
                log_tail: supervisor.log_tail(pid, 20),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, listed) = cli(bin, &["topic".to_owned(), "list".to_owned()], port).await?;
    let count = ok
        .then(|| topic_partitions(&listed, topic))
        .flatten()
        .unwrap_or(0);
    if count != partitions as usize {
        return Err(BenchError::Report(format!(
            "tansu lists {count} partitions of {topic}, not {partitions}: {listed}"
        )));
    }
    Ok(broker)
}

/// Runs `tansu ARGS --broker tcp://127.0.0.1:PORT` (bounded; killed by its
/// handle if it overruns): success, and stdout + stderr.
async fn cli(bin: &Path, args: &[String], port: u16) -> Result<(bool, String), BenchError> {
    let run = tokio::process::Command::new(bin)
        .args(args)
        .args(["--broker", &format!("tcp://127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CLI_TIMEOUT, run).await {
        Ok(Ok(out)) => Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
        Ok(Err(e)) => Err(BenchError::Spawn {
            name: "tansu cli".into(),
            program: bin.to_owned(),
            source: e,
        }),
        Err(_) => Ok((false, format!("tansu {args:?} took over 30 s"))),
    }
}

/// The partitions of `topic` in `tansu topic list`'s JSON.
fn topic_partitions(listed: &str, topic: &str) -> Option<usize> {
    let topics: serde_json::Value = serde_json::from_str(listed.trim()).ok()?;
    topics.as_array()?.iter().find_map(|t| {
        (t.get("name")?.as_str()? == topic).then(|| Some(t.get("partitions")?.as_array()?.len()))?
    })
}

/// Each instance's current partitions of `topic`, from its log: those of
/// its last "kafka partitions assigned" line, empty after a later
/// "revoked" line, `None` when it logged neither yet.
pub fn assignment_from_log(log: &str, topic: &str) -> Option<Vec<u32>> {
    let mut current = None;
    for line in log.lines() {
        if line.contains("kafka partitions assigned") {
            current = Some(partitions_in(line, topic));
        } else if line.contains("kafka partitions revoked") {
            current = Some(Vec::new());
        }
    }
    current
}

/// Every `TOPIC/N` in a line.
fn partitions_in(line: &str, topic: &str) -> Vec<u32> {
    let needle = format!("{topic}/");
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(p) = digits.parse() {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// Whether the instances' assignments (by id) hold every partition of the
/// topic exactly once, every instance having logged one.
pub fn complete(assignments: &BTreeMap<String, Option<Vec<u32>>>, partitions: u32) -> bool {
    let mut held: Vec<u32> = Vec::new();
    for assigned in assignments.values() {
        match assigned {
            Some(list) => held.extend(list),
            None => return false,
        }
    }
    held.sort_unstable();
    held == (0..partitions).collect::<Vec<_>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assignment_is_the_last_logged_one() {
        let log = "2026-12-02T06:00:00Z INFO switchboard::ingest::kafka: kafka partitions assigned partitions=[bench-events/0,bench-events/1,bench-events/2,bench-events/3]\n\
                   2026-12-02T06:00:05Z INFO switchboard::ingest::kafka: kafka partitions revoked partitions=[bench-events/0,bench-events/1,bench-events/2,bench-events/3]\n\
                   2026-12-02T06:00:06Z INFO switchboard::ingest::kafka: kafka partitions assigned partitions=[bench-events/0,bench-events/1]\n";
        assert_eq!(assignment_from_log(log, "bench-events"), Some(vec![0, 1]));
        assert_eq!(assignment_from_log("nothing yet", "bench-events"), None);
        let mut all = BTreeMap::new();
        all.insert("n1".to_owned(), Some(vec![0, 1]));
        all.insert("n2".to_owned(), None);
        assert!(!complete(&all, 4));
        all.insert("n2".to_owned(), Some(vec![2, 3]));
        assert!(complete(&all, 4));
        all.insert("n1".to_owned(), Some(vec![0, 1, 2]));
        assert!(!complete(&all, 4), "partition 2 twice");
    }

    #[test]
    fn topic_list_json_gives_the_partition_count() {
        let listed = r#"[{"name":"bench-events","partitions":[{},{},{},{}]},{"name":"x","partitions":[{}]}]"#;
        assert_eq!(topic_partitions(listed, "bench-events"), Some(4));
        assert_eq!(topic_partitions(listed, "y"), None);
        assert_eq!(topic_partitions("not json", "x"), None);
    }
}
