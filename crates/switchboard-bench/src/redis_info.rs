//! What Redis says about itself: `INFO stats`, `INFO commandstats` and `INFO
//! cpu` (and, on a Redis Cluster node, `CLUSTER INFO`) read over one
//! connection, parsed into the numbers the benchmark subtracts (network
//! bytes, commands, calls per command, CPU seconds, cluster-bus messages).
//! Also the few cluster questions asked once at start-up (`CLUSTER NODES`,
//! `CLUSTER KEYSLOT`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// Bound of every command the benchmark sends, so a stuck Redis cannot hang a run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls and time of one command, from `cmdstat_<name>:calls=..,usec=..`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CommandStat {
    /// Times the command ran.
    pub calls: u64,
    /// Microseconds spent in it.
    pub usec: u64,
}

/// One reading of the counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RedisSnapshot {
    /// `total_net_output_bytes`: bytes Redis wrote to clients, subscribers included.
    pub net_output_bytes: u64,
    /// `total_net_input_bytes`.
    pub net_input_bytes: u64,
    /// `total_commands_processed`.
    pub commands_processed: u64,
    /// `used_cpu_user + used_cpu_sys` (process-wide), seconds.
    pub used_cpu_s: f64,
    /// Per command (lower-case name, e.g. `publish`, `evalsha`, `hgetall`).
    pub commandstats: BTreeMap<String, CommandStat>,
    /// `total_net_repl_output_bytes`: bytes sent to replicas (Redis 7
    /// counts them in `net_output_bytes` too); absent in files written
    /// before Redis Cluster runs.
    #[serde(default)]
    pub net_repl_output_bytes: u64,
    /// A Redis Cluster node: every `cluster_stats_messages_*` counter of
    /// `CLUSTER INFO` (cluster-bus messages by type and direction, e.g.
    /// `cluster_stats_messages_publish_sent`); empty on a plain redis-server.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cluster_stats: BTreeMap<String, u64>,
}

impl RedisSnapshot {
    /// The sum of several nodes' readings: what a whole Redis Cluster did.
    pub fn total<'a>(parts: impl IntoIterator<Item = &'a RedisSnapshot>) -> RedisSnapshot {
        let mut total = RedisSnapshot::default();
        for part in parts {
            total.net_output_bytes += part.net_output_bytes;
            total.net_input_bytes += part.net_input_bytes;
            total.commands_processed += part.commands_processed;
            total.used_cpu_s += part.used_cpu_s;
            total.net_repl_output_bytes += part.net_repl_output_bytes;
            for (name, stat) in &part.commandstats {
                let sum = total.commandstats.entry(name.clone()).or_default();
                sum.calls += stat.calls;
                sum.usec += stat.usec;
            }
            for (name, value) in &part.cluster_stats {
                *total.cluster_stats.entry(name.clone()).or_default() += value;
            }
        }
        total
    }

    /// A `cluster_stats_messages_*` counter (0 when absent).
    pub fn cluster_stat(&self, name: &str) -> u64 {
        self.cluster_stats.get(name).copied().unwrap_or(0)
    }

    /// Calls of one command (0 when it never ran).
    pub fn calls(&self, command: &str) -> u64 {
        self.commandstats.get(command).map_or(0, |s| s.calls)
    }
}

/// A connection to one of the benchmark's redis-servers (a plain one, or
/// one node of its Redis Cluster: a direct connection, not a cluster client).
pub struct RedisProbe {
    connection: redis::aio::MultiplexedConnection,
    /// Whether the server is a cluster node: snapshots then read `CLUSTER INFO` too.
    cluster_node: bool,
}

impl RedisProbe {
    /// Connects to `redis://127.0.0.1:port`.
    pub async fn connect(port: u16) -> Result<Self, BenchError> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .map_err(|e| BenchError::Redis(e.to_string()))?;
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| BenchError::Redis(e.to_string()))?;
        Ok(RedisProbe {
            connection,
            cluster_node: false,
        })
    }

    /// Connects to `redis://127.0.0.1:port`, a Redis Cluster node.
    pub async fn connect_cluster_node(port: u16) -> Result<Self, BenchError> {
        let mut probe = RedisProbe::connect(port).await?;
        probe.cluster_node = true;
        Ok(probe)
    }

    /// One command, bounded by [`COMMAND_TIMEOUT`]; `what` names it in errors.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T, BenchError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut self.connection))
            .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(BenchError::Redis(format!("{what}: {e}"))),
            Err(_) => Err(BenchError::Redis(format!(
                "{what} timed out after {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    /// `PING`.
    pub async fn ping(&mut self) -> Result<(), BenchError> {
        self.query::<String>(&redis::cmd("PING"), "PING")
            .await
            .map(drop)
    }

    async fn info(&mut self, section: &str) -> Result<BTreeMap<String, String>, BenchError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let text: String = self.query(&cmd, &format!("INFO {section}")).await?;
        Ok(parse_info(&text))
    }

    /// `INFO replication`, as `key: value`.
    pub async fn info_replication(&mut self) -> Result<BTreeMap<String, String>, BenchError> {
        self.info("replication").await
    }

    /// `CLUSTER INFO`, as `key: value`.
    pub async fn cluster_info(&mut self) -> Result<BTreeMap<String, String>, BenchError> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("INFO");
        let text: String = self.query(&cmd, "CLUSTER INFO").await?;
        Ok(parse_info(&text))
    }

    /// `CLUSTER NODES`, the raw text (see `redis_server::parse_cluster_nodes`).
    pub async fn cluster_nodes(&mut self) -> Result<String, BenchError> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        self.query(&cmd, "CLUSTER NODES").await
    }

    /// `CLUSTER KEYSLOT name`: the hash slot of a key or shard channel.
    pub async fn keyslot(&mut self, name: &str) -> Result<u16, BenchError> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("KEYSLOT").arg(name);
        self.query(&cmd, "CLUSTER KEYSLOT").await
    }

    /// Reads the counters (three INFO calls, and `CLUSTER INFO` on a
    /// cluster node; their own few KB of output fall into the measured
    /// window and are negligible next to the workload).
    pub async fn snapshot(&mut self) -> Result<RedisSnapshot, BenchError> {
        let stats = self.info("stats").await?;
        let commands = self.info("commandstats").await?;
        let cpu = self.info("cpu").await?;
        let cluster = if self.cluster_node {
            self.cluster_info().await?
        } else {
            BTreeMap::new()
        };
        let int = |m: &BTreeMap<String, String>, k: &str| -> u64 {
            m.get(k).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let float = |k: &str| -> f64 {
            cpu.get(k)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let commandstats = commands
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("cmdstat_")
                    .map(|name| (name.to_owned(), parse_command_stat(v)))
            })
            .collect();
        Ok(RedisSnapshot {
            net_output_bytes: int(&stats, "total_net_output_bytes"),
            net_input_bytes: int(&stats, "total_net_input_bytes"),
            commands_processed: int(&stats, "total_commands_processed"),
            used_cpu_s: float("used_cpu_user") + float("used_cpu_sys"),
            commandstats,
            net_repl_output_bytes: int(&stats, "total_net_repl_output_bytes"),
            cluster_stats: cluster_message_stats(&cluster),
        })
    }
}

/// `key:value` lines of an INFO reply.
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The `cluster_stats_messages_*` counters of a `CLUSTER INFO` reply.
fn cluster_message_stats(info: &BTreeMap<String, String>) -> BTreeMap<String, u64> {
    info.iter()
        .filter(|(k, _)| k.starts_with("cluster_stats_messages_"))
        .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
        .collect()
}

/// `calls=12,usec=34,usec_per_call=2.83,rejected_calls=0,failed_calls=0`.
fn parse_command_stat(value: &str) -> CommandStat {
    let mut stat = CommandStat::default();
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("calls", v)) => stat.calls = v.parse().unwrap_or(0),
            Some(("usec", v)) => stat.usec = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    stat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_and_commandstats() {
        let info = parse_info(
            "# Commandstats\r\ncmdstat_publish:calls=12,usec=34,usec_per_call=2.83,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_evalsha:calls=3,usec=9,usec_per_call=3.00\r\n",
        );
        let publish = parse_command_stat(info.get("cmdstat_publish").expect("present"));
        assert_eq!((publish.calls, publish.usec), (12, 34));
        assert_eq!(
            parse_command_stat(info.get("cmdstat_evalsha").expect("present")).calls,
            3
        );
        assert_eq!(parse_command_stat("garbage").calls, 0);
    }

    #[test]
    fn sums_cluster_nodes() {
        let info = parse_info(
            "cluster_state:ok\r\ncluster_stats_messages_publish_sent:10\r\n\
             cluster_stats_messages_sent:12\r\ncluster_known_nodes:3\r\n",
        );
        let node = |publish: u64, cpu: f64| RedisSnapshot {
            net_output_bytes: 100,
            used_cpu_s: cpu,
            commandstats: [(
                "publish".to_owned(),
                CommandStat {
                    calls: publish,
                    usec: 2,
                },
            )]
            .into_iter()
            .collect(),
            cluster_stats: cluster_message_stats(&info),
            ..RedisSnapshot::default()
        };
        let nodes = [node(5, 0.25), node(0, 0.5)];
        let total = RedisSnapshot::total(&nodes);
        assert_eq!(total.net_output_bytes, 200);
        assert_eq!(total.used_cpu_s, 0.75);
        assert_eq!((total.calls("publish"), total.calls("spublish")), (5, 0));
        assert_eq!(total.commandstats["publish"].usec, 4);
        assert_eq!(
            total.cluster_stat("cluster_stats_messages_publish_sent"),
            20
        );
        assert_eq!(total.cluster_stat("cluster_stats_messages_sent"), 24);
        // Only the message counters are kept.
        assert_eq!(total.cluster_stats.len(), 2);
    }
}
