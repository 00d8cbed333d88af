//! Reading the system without disturbing it: CPU time of a process from
//! `/proc/PID/stat`, machine-wide CPU time from `/proc/stat`.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, 100 if unknown).
pub fn clk_tck() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) a process has used so far, or
/// `None` if it is gone or the file does not parse.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&text).map(|ticks| ticks as f64 / clk_tck())
}

/// CPU seconds of this benchmark process itself.
pub fn own_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat_cpu_ticks(&text).map(|ticks| ticks as f64 / clk_tck())
}

/// utime + stime from a `/proc/PID/stat` line. The comm field may hold spaces
/// and parentheses, so fields are counted from the last `)`: after it come
/// field 3 (state) onwards, which puts utime (14) and stime (15) at offsets 11
/// and 12.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in seconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MachineCpu {
    /// user + nice + system + idle + iowait + irq + softirq + steal.
    pub total_s: f64,
    /// idle + iowait.
    pub idle_s: f64,
    /// steal (time the hypervisor ran something else).
    pub steal_s: f64,
    /// irq + softirq: interrupt work no process is charged for (loopback
    /// TCP processing largely runs here).
    #[serde(default)]
    pub irq_s: f64,
}

/// Reads `/proc/stat`; zeros if unreadable.
pub fn machine_cpu() -> MachineCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return MachineCpu::default();
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse::<f64>().ok())
        .collect();
    let tick = clk_tck();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    MachineCpu {
        total_s: (0..8).map(get).sum::<f64>() / tick,
        idle_s: (get(3) + get(4)) / tick,
        steal_s: get(7) / tick,
        irq_s: (get(5) + get(6)) / tick,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_comm_with_spaces() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 1000 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }
}
