//! Child processes the kit starts (redis-server, instances): a guard that
//! never leaves one running, and a process's log: its tail for panic
//! messages, or all of it.

use std::path::Path;
use std::process::Child;

/// Kills (SIGKILL) and reaps the child process when dropped, so a failing
/// test never leaves a server behind.
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last 8000 bytes of the log at `path` (empty if unreadable): enough
/// for a panic message to show why a process failed, short enough to read.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = log_text(path);
    let max = 8000;
    if text.len() <= max {
        return text;
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &text[cut..])
}

/// The whole log at `path` as (lossy) text; empty if unreadable.
pub(crate) fn log_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
