//! Fault injection between an instance and Redis: a byte-for-byte proxy
//! that can slow down an instance's commands, or make Redis forget its
//! subscriptions without the instance noticing anything.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::RedisServer;

/// A byte-for-byte unix-socket proxy in front of a [`RedisServer`]. Point an
/// instance at [`RedisProxy::url`] and it talks to Redis through the proxy.
///
/// Its one trick, [`RedisProxy::drop_subscriptions_silently`], makes Redis
/// forget subscriptions of the subscriber connections (those that sent a
/// SUBSCRIBE) without any disconnection: it injects `UNSUBSCRIBE` upstream and
/// swallows Redis's RESP3 confirmation pushes, so the client sees nothing.
pub struct RedisProxy {
    /// `redis+unix://` URL of the proxy's own socket.
    url: String,
    /// Added before forwarding each chunk towards Redis (commands only).
    delay: Arc<Mutex<Duration>>,
    /// The connections that sent a SUBSCRIBE, by connection number.
    subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>>,
    /// The accept loop and every connection task, stopped on drop.
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Holds the proxy's socket.
    _dir: TempDir,
}

/// A subscriber connection's handles: bytes to inject upstream, and the
/// confirmation pushes to swallow on the way back.
#[derive(Clone)]
struct ProxyConn {
    /// Bytes to write to Redis as if the client had sent them.
    inject: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// Pushes from Redis that the client must not see.
    swallow: Arc<Mutex<Vec<Swallow>>>,
}

/// One push to remove from the stream towards the client.
struct Swallow {
    /// The push up to its final integer: `>3 unsubscribe <channel> :`.
    prefix: Vec<u8>,
    /// Told once the push was seen and removed.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Removes every complete pending push from `pending` and returns the bytes
/// that can be forwarded now (a tail that may be the start of a pending push
/// is held back until more bytes arrive).
fn strip_swallowed(pending: &mut Vec<u8>, swallow: &Mutex<Vec<Swallow>>) -> Vec<u8> {
    let mut list = swallow.lock().expect("proxy mutex poisoned");
    loop {
        let mut matched = false;
        for entry in list.iter_mut().filter(|e| e.done.is_some()) {
            let Some(start) = find_bytes(pending, &entry.prefix) else {
                continue;
            };
            let after = start + entry.prefix.len();
            let Some(end) = find_bytes(&pending[after..], b"\r\n") else {
                continue;
            };
            pending.drain(start..after + end + 2);
            if let Some(done) = entry.done.take() {
                let _ = done.send(());
            }
            matched = true;
            break;
        }
        if !matched {
            break;
        }
    }
    list.retain(|e| e.done.is_some());
    let mut hold = 0;
    for entry in list.iter() {
        if let Some(start) = find_bytes(pending, &entry.prefix) {
            hold = hold.max(pending.len() - start);
        }
        for k in (1..entry.prefix.len().min(pending.len() + 1)).rev() {
            if pending.ends_with(&entry.prefix[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    let forward = pending.len() - hold;
    pending.drain(..forward).collect()
}

impl RedisProxy {
    /// Listens on a fresh unix socket and forwards every connection to `redis`.
    pub async fn start(redis: &RedisServer) -> RedisProxy {
        let dir = tempfile::tempdir().expect("create a tempdir for the proxy");
        let path = dir.path().join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy socket");
        let upstream = redis.socket_path();
        let subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let delay: Arc<Mutex<Duration>> = Arc::default();
        let (subs, all_tasks, conn_delay) = (subscribers.clone(), tasks.clone(), delay.clone());
        let accept = tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                next_id += 1;
                let task = tokio::spawn(proxy_connection(
                    next_id,
                    client,
                    upstream.clone(),
                    subs.clone(),
                    conn_delay.clone(),
                ));
                all_tasks
                    .lock()
                    .expect("proxy mutex poisoned")
                    .push(task.abort_handle());
            }
        });
        tasks
            .lock()
            .expect("proxy mutex poisoned")
            .push(accept.abort_handle());
        RedisProxy {
            url: format!("redis+unix://{}", path.display()),
            delay,
            subscribers,
            tasks,
            _dir: dir,
        }
    }

    /// `redis+unix:///<dir>/proxy.sock`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// From now on, every chunk a client sends towards Redis waits `delay`
    /// first (replies and pushes are not delayed): a slow Redis for writes.
    pub fn delay_commands(&self, delay: Duration) {
        *self.delay.lock().expect("proxy mutex poisoned") = delay;
    }

    /// Number of live connections that subscribed through the proxy.
    pub fn subscriber_connections(&self) -> usize {
        self.subscribers.lock().expect("proxy mutex poisoned").len()
    }

    /// Makes Redis unsubscribe every subscriber connection from `channels`
    /// while the clients see nothing (no push, no disconnection). Returns
    /// once Redis confirmed each unsubscription (confirmations swallowed).
    pub async fn drop_subscriptions_silently(&self, channels: &[&str]) {
        let conns: Vec<ProxyConn> = self
            .subscribers
            .lock()
            .expect("proxy mutex poisoned")
            .values()
            .cloned()
            .collect();
        assert!(
            !conns.is_empty(),
            "no subscriber connection goes through the proxy"
        );
        let mut command = format!("*{}\r\n$11\r\nUNSUBSCRIBE\r\n", channels.len() + 1);
        for channel in channels {
            command.push_str(&format!("${}\r\n{channel}\r\n", channel.len()));
        }
        let mut confirmations = Vec::new();
        for conn in &conns {
            {
                let mut swallow = conn.swallow.lock().expect("proxy mutex poisoned");
                for channel in channels {
                    let (done, confirmed) = tokio::sync::oneshot::channel();
                    let prefix = format!(
                        ">3\r\n$11\r\nunsubscribe\r\n${}\r\n{channel}\r\n:",
                        channel.len()
                    );
                    swallow.push(Swallow {
                        prefix: prefix.into_bytes(),
                        done: Some(done),
                    });
                    confirmations.push((channel.to_string(), confirmed));
                }
            }
            conn.inject
                .send(command.clone().into_bytes())
                .expect("proxy connection task is gone");
        }
        for (channel, confirmed) in confirmations {
            tokio::time::timeout(Duration::from_secs(5), confirmed)
                .await
                .unwrap_or_else(|_| {
                    panic!("redis did not confirm the injected UNSUBSCRIBE {channel} within 5s")
                })
                .expect("proxy connection ended before the UNSUBSCRIBE was confirmed");
        }
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().expect("proxy mutex poisoned").iter() {
            task.abort();
        }
    }
}

async fn proxy_connection(
    id: u64,
    client: tokio::net::UnixStream,
    upstream: PathBuf,
    subscribers: Arc<Mutex<HashMap<u64, ProxyConn>>>,
    delay: Arc<Mutex<Duration>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(upstream) = tokio::net::UnixStream::connect(&upstream).await else {
        return; // Redis is down: the client sees the connection close.
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut redis_rx, mut redis_tx) = upstream.into_split();
    let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let swallow: Arc<Mutex<Vec<Swallow>>> = Arc::default();
    let conn = ProxyConn {
        inject,
        swallow: swallow.clone(),
    };
    let registry = subscribers.clone();
    let to_redis = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut registered = false;
        loop {
            tokio::select! {
                read = client_rx.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !registered && find_bytes(&buf[..n], b"SUBSCRIBE").is_some() {
                        registered = true;
                        registry
                            .lock()
                            .expect("proxy mutex poisoned")
                            .insert(id, conn.clone());
                    }
                    let wait = *delay.lock().expect("proxy mutex poisoned");
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    if redis_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Some(bytes) = injected.recv() => {
                    if redis_tx.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let to_client = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = match redis_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let forward = strip_swallowed(&mut pending, &swallow);
            if client_tx.write_all(&forward).await.is_err() {
                return;
            }
        }
    };
    // Either side closing closes both.
    tokio::select! {
        _ = to_redis => {}
        _ = to_client => {}
    }
    subscribers
        .lock()
        .expect("proxy mutex poisoned")
        .remove(&id);
}
