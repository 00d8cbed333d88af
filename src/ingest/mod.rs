//! Queue ingestion: records consumed from a queue (a Redis stream,
//! `stream`, or Kafka topics, `kafka`) are routed like `POST /api/v1/publish` bodies, and
//! acknowledged to the queue only once the router routed or stored them.
//!
//! This module owns the source-independent core: reading a record as a
//! publish body (the same [`protocol::parse_publish`] rules and
//! `--max-body-bytes` limit as the HTTP API; `from` defaults to
//! [`DEFAULT_FROM`]; a DM's idempotency `key` defaults to the record's
//! position in its source), routing it ([`Router::send_dm`] with the key,
//! or [`Router::send_room`]), the capped backoff between attempts that
//! failed `unavailable` / `timeout` (interrupted by shutdown), and
//! [`start`], which starts the configured sources. [`flight`] runs records
//! concurrently in per-user (per-room) order. Each source (`stream`,
//! `kafka`) owns its own loop: reading, bounding what is in flight,
//! acknowledging, dead-lettering.
//! It must not issue Redis commands (those are
//! `switchboard_redis::ingest`'s) nor decide routing (the router's).
//!
//! A record is **done** when the router answered Ok (routed, offline and
//! stored, or partial); `unavailable` and `timeout` retry the same record
//! with the same key (a retry of a stored DM is answered from its
//! idempotency record within `--idempotency-window-s`, never stored
//! twice); a malformed record is never retried.

pub mod flight;
pub mod kafka;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use switchboard_core::metrics::{IngestCounters, Metrics};
use switchboard_core::protocol::{
    self, DmOptions, ErrorCode, Publish, PublishTarget, DEFAULT_PUBLISH_FROM,
};
use switchboard_core::router::{RouteError, Router};
use switchboard_redis::RedisBackend;

use crate::config::Config;

/// `from` of a record that names no sender.
pub const DEFAULT_FROM: &str = "ingest";

/// First wait after a failed attempt; doubled after each one.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two attempts of one record.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a record cannot be delivered, ever: it is counted, logged without
/// its body, dead-lettered when configured, and acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum MalformedRecord {
    /// The value is not UTF-8.
    #[error("the record is not UTF-8 text: {0}")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// A stream entry without the field holding the record.
    #[error("the entry has no `{field}` field")]
    NoValue {
        /// The field looked for.
        field: &'static str,
    },
    /// Refused by the publish rules (the message never holds the body).
    #[error("{message}")]
    Invalid {
        /// The error code the HTTP API would answer with.
        code: ErrorCode,
        /// What is wrong.
        message: String,
    },
    /// The `body` is over `--max-body-bytes`.
    #[error("`body` is larger than {limit} bytes")]
    TooLarge {
        /// `--max-body-bytes`.
        limit: usize,
    },
}

/// The routing step shared by every source, with one source's counters.
#[derive(Clone)]
pub struct Ingest {
    router: Arc<Router>,
    max_body_bytes: usize,
    counters: IngestCounters,
}

/// A record read as a publish body, owning what it routes: records in
/// flight outlive the buffer they were read from.
#[derive(Debug)]
pub struct Record {
    /// The user or room.
    pub target: PublishTarget,
    /// The body, as written.
    pub body: Box<RawValue>,
    /// `from`: the record's own or [`DEFAULT_FROM`].
    pub from: String,
    /// `store` and `key` (the default key when a stored DM names none).
    pub options: DmOptions,
}

impl Record {
    /// What records must not overtake each other for: their user or room
    /// (`u:<user>`, `r:<room>`).
    pub fn order_key(&self) -> String {
        match &self.target {
            PublishTarget::User(user) => format!("u:{user}"),
            PublishTarget::Room(room) => format!("r:{room}"),
        }
    }
}

/// How a record was delivered, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// A DM: `routed`, `offline` or `partial`, and whether it is stored.
    Direct {
        /// The ack status.
        status: &'static str,
        /// In the recipient's inbox.
        stored: bool,
    },
    /// A room message: `ok` or `partial`.
    Room {
        /// The ack status.
        status: &'static str,
    },
}

impl Ingest {
    /// The core over `router`, counting into `counters`.
    pub fn new(router: Arc<Router>, max_body_bytes: usize, counters: IngestCounters) -> Ingest {
        Ingest {
            router,
            max_body_bytes,
            counters,
        }
    }

    /// This source's counters.
    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    /// Reads `value` as a publish body. `default_key` (the record's
    /// position) becomes the idempotency key of a stored DM that names
    /// none.
    pub fn parse(&self, value: &[u8], default_key: &str) -> Result<Record, MalformedRecord> {
        let text = std::str::from_utf8(value).map_err(MalformedRecord::NotUtf8)?;
        let mut publish = protocol::parse_publish(text).map_err(|e| MalformedRecord::Invalid {
            code: e.code,
            message: e.message,
        })?;
        if publish.body.get().len() > self.max_body_bytes {
            return Err(MalformedRecord::TooLarge {
                limit: self.max_body_bytes,
            });
        }
        if publish.from == DEFAULT_PUBLISH_FROM && !names_from(text) {
            DEFAULT_FROM.clone_into(&mut publish.from);
        }
        if matches!(publish.target, PublishTarget::User(_))
            && publish.options.store
            && publish.options.key.is_none()
        {
            publish.options.key = Some(default_key.to_owned());
        }
        let Publish {
            target,
            body,
            from,
            options,
        } = publish;
        Ok(Record {
            target,
            body: body.to_owned(),
            from,
            options,
        })
    }

    /// Routes `record` until the router answers Ok: true once done, false
    /// if `stop` interrupted a retry wait (the record is then not done).
    /// `position` names the record in logs.
    pub async fn deliver(&self, record: &Record, position: &str, stop: &CancellationToken) -> bool {
        let mut attempt = 0u32;
        loop {
            match self.route(record).await {
                Ok(delivered) => {
                    self.counters.delivered.inc();
                    tracing::debug!(%position, ?delivered, "record delivered");
                    return true;
                }
                Err(error) => {
                    attempt += 1;
                    if !self.retry_wait(attempt, error, position, stop).await {
                        return false;
                    }
                }
            }
        }
    }

    /// One attempt at routing `publish`.
    async fn route(&self, publish: &Record) -> Result<Delivered, RouteError> {
        match &publish.target {
            PublishTarget::User(user) => self
                .router
                .send_dm(&publish.from, user, &publish.body, &publish.options)
                .await
                .map(|o| Delivered::Direct {
                    status: o.status.as_str(),
                    stored: o.stored,
                }),
            PublishTarget::Room(room) => self
                .router
                .send_room(&publish.from, None, room, &publish.body)
                .await
                .map(|o| Delivered::Room {
                    status: o.status.as_str(),
                }),
        }
    }

    /// After the `attempt`-th failed attempt (from 1): counts it, logs it
    /// (the first and then every tenth), and waits the capped backoff.
    /// Returns false if `stop` was cancelled meanwhile.
    async fn retry_wait(
        &self,
        attempt: u32,
        error: RouteError,
        position: &str,
        stop: &CancellationToken,
    ) -> bool {
        self.counters.retried.inc();
        if worth_logging(attempt) {
            tracing::warn!(%position, attempt, %error, "record not delivered; retrying");
        }
        wait(backoff(attempt), stop).await
    }
}

/// `--ingest-inflight` and `--ingest-inflight-bytes`.
pub fn limits(config: &Config) -> flight::Limits {
    flight::Limits {
        items: config.ingest_inflight,
        bytes: config.ingest_inflight_bytes,
    }
}

/// Whether the `n`-th failure in a row is logged: the first, then every
/// tenth.
pub fn worth_logging(n: u32) -> bool {
    n == 1 || n.is_multiple_of(10)
}

/// The wait after the `attempt`-th failure: 50 ms doubling, at most 2 s.
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(10);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// Sleeps `duration` unless `stop` is cancelled first; false if it was.
pub async fn wait(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

/// Whether the record names its sender (`"from"` present): only then is a
/// parsed `from` equal to the API's default the record's own.
fn names_from(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct From<'a> {
        #[serde(default, borrow)]
        from: Option<&'a RawValue>,
    }
    serde_json::from_str::<From<'_>>(text).is_ok_and(|f| f.from.is_some())
}

/// Starts the sources `config` names, over `router`; `redis` is the Redis
/// backend when there is one (a stream needs it; configuration refuses a
/// stream without Redis). Returns the tasks, which end once `stop` is
/// cancelled (after acknowledging what they finished).
pub fn start(
    config: &Config,
    router: &Arc<Router>,
    redis: Option<&Arc<RedisBackend>>,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(stream) = &config.ingest_stream {
        match redis {
            Some(redis) => {
                let core = Ingest::new(
                    router.clone(),
                    config.max_body_bytes,
                    metrics.ingest_stream.clone(),
                );
                let settings = stream::settings(config, stream);
                let consumer = redis.stream_consumer(settings);
                tracing::info!(
                    stream = %stream,
                    group = %config.ingest_group,
                    consumer = %config.instance(),
                    "consuming the stream"
                );
                tasks.push(tokio::spawn(stream::run(
                    core,
                    consumer,
                    limits(config),
                    metrics.clone(),
                    stop.clone(),
                )));
            }
            None => tracing::error!(
                stream = %stream,
                "--ingest-stream needs the Redis backend; not consuming"
            ),
        }
    }
    if config.kafka_enabled() {
        let core = Ingest::new(
            router.clone(),
            config.max_body_bytes,
            metrics.ingest_kafka.clone(),
        );
        let settings = kafka::settings(config);
        tracing::info!(
            brokers = %settings.brokers,
            topics = %settings.topics.join(","),
            group = %settings.group,
            "consuming from kafka"
        );
        tasks.push(tokio::spawn(kafka::run(
            core,
            settings,
            metrics.ingest_partition_lag.clone(),
            stop.clone(),
        )));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::local::{LocalBackend, LocalHub};
    use switchboard_core::queue::bounded;
    use switchboard_core::registry::Registry;
    use switchboard_core::router::RoutingMode;

    fn core() -> Ingest {
        let metrics = Metrics::new();
        let (tx, _rx) = bounded(16, 1 << 16);
        let local = Arc::new(LocalBackend::new(
            Arc::new(LocalHub::default()),
            "t1",
            tx,
            metrics.clone(),
        ));
        let router = Arc::new(Router::new(
            "t1",
            RoutingMode::Routed,
            local.clone(),
            local,
            Arc::new(Registry::default()),
            metrics.clone(),
        ));
        Ingest::new(router, 32, metrics.ingest_stream.clone())
    }

    #[test]
    fn records_read_like_publish_bodies() {
        let core = core();
        let p = core
            .parse(br#"{"user":"bob","body":{"t":1}}"#, "s/1-0")
            .expect("valid");
        assert_eq!(p.from, DEFAULT_FROM);
        assert_eq!(p.options.key.as_deref(), Some("s/1-0"));
        let p = core
            .parse(
                br#"{"user":"bob","body":1,"from":"server","key":"k1"}"#,
                "s/1-0",
            )
            .expect("valid");
        assert_eq!(
            (p.from.as_str(), p.options.key.as_deref()),
            ("server", Some("k1"))
        );
        let p = core
            .parse(br#"{"user":"bob","body":1,"store":false}"#, "s/1-0")
            .expect("valid");
        assert_eq!(p.options.key, None);
        let p = core
            .parse(br#"{"room":"lobby","body":1}"#, "s/1-0")
            .expect("valid");
        assert_eq!((p.from.as_str(), p.options.key), (DEFAULT_FROM, None));

        assert!(matches!(
            core.parse(b"\xff", "k"),
            Err(MalformedRecord::NotUtf8(_))
        ));
        for bad in [&b"[]"[..], b"{", br#"{"user":"a b","body":1}"#, b"null"] {
            assert!(
                matches!(core.parse(bad, "k"), Err(MalformedRecord::Invalid { .. })),
                "{bad:?}"
            );
        }
        let large = format!(r#"{{"user":"bob","body":"{}"}}"#, "x".repeat(40));
        assert!(matches!(
            core.parse(large.as_bytes(), "k"),
            Err(MalformedRecord::TooLarge { limit: 32 })
        ));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(7), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
