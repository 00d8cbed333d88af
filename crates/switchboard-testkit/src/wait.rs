//! How long a test waits for what must happen, and how it waits for an
//! effect it cannot be told about: by polling for it, never by sleeping a
//! fixed time and hoping.

use std::future::Future;
use std::time::{Duration, Instant};

/// Default bound for one expected frame or effect: far above what a
/// healthy run needs, so that only a real failure reaches it.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `condition` every 50ms until it returns true; panics with `what`
/// after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
