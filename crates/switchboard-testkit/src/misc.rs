//! Small helpers with no better home: unique body markers and the clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (JWT claims are in seconds).
pub fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Milliseconds since the Unix epoch (frame timestamps are in ms).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A string unique within the test run, for body markers: a spy or a
/// client can then find exactly the message it looks for.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u64>())
}
