//! Reading the system without disturbing it, through `procfs`: CPU time of a
//! process (`/proc/PID/stat`), its resident memory (`/proc/PID/status`), the
//! bytes it wrote (`/proc/PID/io`),
//! machine-wide CPU time (`/proc/stat`), the CPU model (`/proc/cpuinfo`). Every reading is best effort: a process that is
//! gone or a file that does not parse reads as `None` (or zeros), and the
//! report says so where it matters.

use procfs::process::Process;
use procfs::{Current, CurrentSI};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc` times (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    procfs::ticks_per_second() as f64
}

/// utime + stime of a process, all threads, in seconds.
fn cpu_seconds_of(process: &Process) -> Option<f64> {
    let stat = process.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / clk_tck())
}

/// CPU seconds (user + system, all threads) a process has used so far, or
/// `None` if it is gone or its stat does not parse.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let pid = i32::try_from(pid).ok()?;
    cpu_seconds_of(&Process::new(pid).ok()?)
}

/// Bytes a process has passed to write(2), send(2) and the like so far
/// (`wchar` of `/proc/PID/io`), or `None` if it is gone. For redis-server
/// this counts what `INFO stats` leaves out: cluster-bus traffic.
pub fn process_write_bytes(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    Some(Process::new(pid).ok()?.io().ok()?.wchar)
}

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// VmRSS: everything resident, KiB.
    pub rss_kib: u64,
    /// RssAnon: the anonymous part (heap, stacks), KiB.
    pub anon_kib: Option<u64>,
}

/// The resident memory of `pid`, or `None` if it is gone.
pub fn process_memory(pid: u32) -> Option<Memory> {
    let pid = i32::try_from(pid).ok()?;
    let status = Process::new(pid).ok()?.status().ok()?;
    Some(Memory {
        rss_kib: status.vmrss?,
        anon_kib: status.rssanon,
    })
}

/// `TcpExt: ListenOverflows` of `/proc/net/netstat`: connections dropped,
/// machine-wide, because a listener's accept queue was full (the client
/// retries its SYN after a second). `None` if unreadable.
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    netstat_counter(&text, "TcpExt:", "ListenOverflows")
}

/// A counter of `/proc/net/netstat`'s layout: a line of names, then a line
/// of values, both starting with `prefix`.
fn netstat_counter(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let position = names.split_whitespace().position(|n| n == name);
        if let Some(i) = position {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// CPU seconds of this benchmark process itself.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_of(&Process::myself().ok()?)
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
    let Ok(stats) = procfs::KernelStats::current() else {
        return MachineCpu::default();
    };
    let t = &stats.total;
    let (iowait, irq, softirq, steal) = (
        t.iowait.unwrap_or(0),
        t.irq.unwrap_or(0),
        t.softirq.unwrap_or(0),
        t.steal.unwrap_or(0),
    );
    let seconds = |ticks: u64| ticks as f64 / clk_tck();
    MachineCpu {
        total_s: seconds(t.user + t.nice + t.system + t.idle + iowait + irq + softirq + steal),
        idle_s: seconds(t.idle + iowait),
        steal_s: seconds(steal),
        irq_s: seconds(irq + softirq),
    }
}

/// `model name` of the first CPU in `/proc/cpuinfo` (empty if unknown).
pub fn cpu_model() -> String {
    procfs::CpuInfo::current()
        .ok()
        .and_then(|info| info.model_name(0).map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_and_machine_cpu() {
        let before = own_cpu_seconds().expect("own stat reads");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let after = own_cpu_seconds().expect("own stat reads");
        assert!(after >= before);
        assert!(process_cpu_seconds(std::process::id()).is_some());
        // Beyond pid_max: no such process.
        assert!(process_cpu_seconds(u32::MAX).is_none());
        assert!(process_write_bytes(std::process::id()).is_some());
        assert!(process_write_bytes(u32::MAX).is_none());
        let memory = process_memory(std::process::id()).expect("own status reads");
        assert!(memory.rss_kib > 0 && memory.anon_kib.is_some_and(|a| a <= memory.rss_kib));
        assert!(process_memory(u32::MAX).is_none());
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 515 516\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 3\n";
        assert_eq!(
            netstat_counter(netstat, "TcpExt:", "ListenOverflows"),
            Some(515)
        );
        assert_eq!(netstat_counter(netstat, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(netstat_counter(netstat, "TcpExt:", "Nothing"), None);
        let machine = machine_cpu();
        assert!(machine.total_s > 0.0 && machine.idle_s <= machine.total_s);
    }
}
