//! What Redis says about itself: `INFO stats`, `INFO commandstats` and `INFO
//! cpu` read over one connection, parsed into the numbers the benchmark
//! subtracts (network bytes, commands, calls per command, CPU seconds).

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
}

/// A connection to the benchmark's redis-server.
pub struct RedisProbe {
    connection: redis::aio::MultiplexedConnection,
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
        Ok(RedisProbe { connection })
    }

    /// `PING`.
    pub async fn ping(&mut self) -> Result<(), BenchError> {
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut self.connection);
        match tokio::time::timeout(COMMAND_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BenchError::Redis(e.to_string())),
            Err(_) => Err(BenchError::Redis(format!(
                "PING timed out after {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    async fn info(&mut self, section: &str) -> Result<BTreeMap<String, String>, BenchError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let info = cmd.query_async::<String>(&mut self.connection);
        let text = match tokio::time::timeout(COMMAND_TIMEOUT, info).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => return Err(BenchError::Redis(format!("INFO {section}: {e}"))),
            Err(_) => {
                return Err(BenchError::Redis(format!(
                    "INFO {section} timed out after {COMMAND_TIMEOUT:?}"
                )))
            }
        };
        Ok(parse_info(&text))
    }

    /// Reads the counters (three INFO calls; their own few KB of output fall
    /// into the measured window and are negligible next to the workload).
    pub async fn snapshot(&mut self) -> Result<RedisSnapshot, BenchError> {
        let stats = self.info("stats").await?;
        let commands = self.info("commandstats").await?;
        let cpu = self.info("cpu").await?;
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
}
