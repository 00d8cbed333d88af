//! Reading the system without disturbing it: CPU time of a process from
//! `/proc/PID/stat`, machine-wide CPU time from `/proc/stat`, and a minimal
//! HTTP/1.0 GET for `/readyz` and `/metrics` on 127.0.0.1.
//!
//! Nothing here parses what the server says beyond the status line: the
//! metrics text is the `openmetrics` module's business.

use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// An HTTP response: status code and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code of the status line.
    pub status: u16,
    /// The body (de-chunked if needed).
    pub body: String,
}

/// `GET path` on 127.0.0.1:port with HTTP/1.0 (the server closes the
/// connection after the body), bounded by `timeout`.
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::with_capacity(8192);
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("GET 127.0.0.1:{port}{path} timed out after {timeout:?}"))?
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "response without header end".to_owned())?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::with_capacity(body.len());
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| "truncated chunk header".to_owned())?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| "truncated chunk".to_owned())?;
        out.push_str(chunk);
        body = rest
            .get(size..)
            .unwrap_or_default()
            .trim_start_matches("\r\n");
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

    #[test]
    fn responses_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nready").expect("ok");
        assert_eq!((r.status, r.body.as_str()), (200, "ready"));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(parse_response(b"nonsense").is_err());
    }
}
