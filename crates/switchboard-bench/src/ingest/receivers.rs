//! The receiving side of `--workload ingest`: one WebSocket connection per
//! user (`bu-<k>` on instance `k mod N`, `?user=`, the instances run
//! `--auth none`), each connected, welcomed and answered a `ping` (so its
//! inbox replay is over and the user is registered everywhere) before any
//! record is made available; then every `dm` frame is read, its body
//! `{"n":…,"t":…}` checked against what the producer made for that user,
//! and timed (`t`, unix ms at production, to the receipt, same clock).
//!
//! Each connection is one task that owns its tally; the shared
//! [`Progress`] only counts first receipts and remembers the last one, so
//! the orchestrator can tell when everything arrived without locking.
//! Nothing here produces records or reads counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::error::BenchError;

/// Handshakes in flight at once (within any instance's listen backlog).
const CONNECT_CONCURRENCY: usize = 32;
/// The id of the `ping` whose `pong` says the connection is set up.
const READY_PING_ID: u64 = 1;

/// The user name of receiver `k`.
pub fn user_name(k: u64) -> String {
    format!("bu-{k}")
}

/// Current time, unix milliseconds (fractional).
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Shared counters of every receiver.
#[derive(Debug, Default)]
pub struct Progress {
    /// Records received for the first time, all users.
    pub first_receipts: AtomicU64,
    /// When the latest first receipt happened, unix µs.
    pub last_receipt_unix_us: AtomicU64,
    /// Receivers whose connection failed or closed after set-up.
    pub broken: AtomicU64,
}

/// What one user's connection saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserTally {
    /// `bu-<k>`.
    pub user: String,
    /// The instance (0-based) the connection was on.
    pub instance: usize,
    /// Records made for this user.
    pub expected: u64,
    /// `dm` frames with a readable body.
    pub frames: u64,
    /// Distinct records received.
    pub unique: u64,
    /// Frames of a record already received.
    pub duplicates: u64,
    /// First receipts of a record lower than one already received.
    pub order_violations: u64,
    /// `dm` frames whose body is not one of this user's records.
    pub unexpected: u64,
    /// Why the connection ended before it was told to, if it did.
    pub error: Option<String>,
    /// Production-to-receipt latency of each first receipt, ms (not
    /// serialized: the figures keep the quantiles).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// A frame as far as the receivers read it.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    body: Option<RecordBody>,
}

/// A record's body, as the producers write it.
#[derive(Deserialize)]
struct RecordBody {
    n: u64,
    t: f64,
}

/// The receivers of one run, connected and set up.
pub struct Receivers {
    tasks: Vec<JoinHandle<UserTally>>,
    /// Shared counters.
    pub progress: Arc<Progress>,
    stop: CancellationToken,
}

/// Records for user `k` when `records` are spread round robin over `users`.
pub fn expected_for(k: u64, users: u64, records: u64) -> u64 {
    records / users + u64::from(k < records % users)
}

/// Connects `users` receivers round robin over `ports` and waits until every
/// one is set up (welcome, then the `pong` to its first `ping`), at most
/// `timeout`. On an error every task already started is stopped.
pub async fn connect_all(
    ports: &[u16],
    users: u64,
    records: u64,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Receivers, BenchError> {
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(users as usize);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(users as usize);
    for k in 0..users {
        let instance = (k % ports.len() as u64) as usize;
        let tally = UserTally {
            user: user_name(k),
            instance,
            expected: expected_for(k, users, records),
            ..UserTally::default()
        };
        let url = format!("ws://127.0.0.1:{}/ws?user={}", ports[instance], tally.user);
        tasks.push(tokio::spawn(receive(
            url,
            tally,
            Arc::clone(&gate),
            ready_tx.clone(),
            Arc::clone(&progress),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    let receivers = Receivers {
        tasks,
        progress,
        stop,
    };
    let deadline = Instant::now() + timeout;
    let mut ready = 0;
    while ready < users {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                receivers.stop().await;
                return Err(BenchError::Interrupted);
            }
            next = tokio::time::timeout_at(deadline.into(), ready_rx.recv()) => next,
        };
        match next {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(why))) => {
                receivers.stop().await;
                return Err(BenchError::Loader(format!(
                    "a receiver failed to set up: {why}"
                )));
            }
            Ok(None) => {
                receivers.stop().await;
                return Err(BenchError::Loader(
                    "the receivers ended before all were set up".into(),
                ));
            }
            Err(_) => {
                receivers.stop().await;
                return Err(BenchError::Loader(format!(
                    "only {ready} of {users} receivers were set up within {:.0} s",
                    timeout.as_secs_f64()
                )));
            }
        }
    }
    Ok(receivers)
}

impl Receivers {
    /// Tells every receiver to stop and collects the tallies, in user order.
    pub async fn stop(self) -> Vec<UserTally> {
        self.stop.cancel();
        let mut tallies = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            match task.await {
                Ok(tally) => tallies.push(tally),
                Err(e) => tallies.push(UserTally {
                    error: Some(format!("the receiver task failed: {e}")),
                    ..UserTally::default()
                }),
            }
        }
        tallies
    }
}

/// One user's connection: set up, report ready, read until stopped.
async fn receive(
    url: String,
    mut tally: UserTally,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> UserTally {
    let permit = tokio::select! {
        _ = stop.cancelled() => return tally,
        permit = gate.acquire_owned() => permit,
    };
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true);
    let mut ws = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((ws, _response))) => ws,
        Ok(Err(e)) => {
            let _ = ready
                .send(Err(format!("{}: connect: {e}", tally.user)))
                .await;
            return tally;
        }
        Err(_) => {
            let _ = ready
                .send(Err(format!("{}: connect timed out after 10 s", tally.user)))
                .await;
            return tally;
        }
    };
    drop(permit);
    let ping = format!(r#"{{"type":"ping","id":{READY_PING_ID}}}"#);
    if let Err(e) = ws.send(Message::text(ping)).await {
        let _ = ready
            .send(Err(format!("{}: send ping: {e}", tally.user)))
            .await;
        return tally;
    }
    let mut welcomed = false;
    let mut set_up = false;
    let mut seen = vec![false; tally.expected as usize];
    let mut highest: Option<u64> = None;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = ws.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                tally.error = Some(format!("closed by the server: {frame:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tally.error = Some(format!("read: {e}"));
                break;
            }
            None => {
                tally.error = Some("the connection ended".into());
                break;
            }
        };
        let received_ms = unix_ms();
        let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
            continue;
        };
        match frame.kind.as_str() {
            "welcome" => welcomed = true,
            "pong"
                if frame.id.as_ref().and_then(serde_json::Value::as_u64) == Some(READY_PING_ID) =>
            {
                if !welcomed {
                    tally.error = Some("pong before the welcome".into());
                    break;
                }
                set_up = true;
                if ready.send(Ok(())).await.is_err() {
                    break;
                }
            }
            "dm" => {
                let Some(body) = frame.body else {
                    tally.unexpected += 1;
                    continue;
                };
                tally.frames += 1;
                let Some(slot) = seen.get_mut(body.n as usize) else {
                    tally.unexpected += 1;
                    continue;
                };
                if *slot {
                    tally.duplicates += 1;
                    continue;
                }
                *slot = true;
                tally.unique += 1;
                if highest.is_some_and(|h| body.n < h) {
                    tally.order_violations += 1;
                }
                highest = Some(highest.map_or(body.n, |h| h.max(body.n)));
                tally.latencies_ms.push(received_ms - body.t);
                progress.first_receipts.fetch_add(1, Ordering::Relaxed);
                progress
                    .last_receipt_unix_us
                    .fetch_max((received_ms * 1000.0) as u64, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    if tally.error.is_some() {
        if set_up {
            progress.broken.fetch_add(1, Ordering::Relaxed);
        } else {
            let why = format!(
                "{}: {}",
                tally.user,
                tally.error.as_deref().unwrap_or_default()
            );
            let _ = ready.send(Err(why)).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_spread_round_robin_over_the_users() {
        let counts: Vec<u64> = (0..3).map(|k| expected_for(k, 3, 10)).collect();
        assert_eq!(counts, [4, 3, 3]);
        assert_eq!(counts.iter().sum::<u64>(), 10);
        assert_eq!(expected_for(5, 200, 20_000), 100);
        assert_eq!(user_name(7), "bu-7");
    }
}
