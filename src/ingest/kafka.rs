//! The Kafka source (`--kafka-brokers`, `--kafka-topics`): every instance
//! with it is a member of the consumer group `--kafka-group` (librdkafka's
//! high-level consumer, the classic group protocol: `group.protocol=classic`,
//! range assignment), so a topic's partitions are spread over the
//! instances and move to the survivors when one leaves or dies (after
//! `--kafka-session-timeout-ms`).
//!
//! **Commits.** Offsets are committed by librdkafka's auto-commit
//! (`enable.auto.commit=true`, every [`AUTO_COMMIT_MS`]) of the offsets
//! *stored* by this module, and auto-storing is off
//! (`enable.auto.offset.store=false`): a record's offset is stored only once
//! it is done — routed or stored by the router, or malformed (counted,
//! logged without its value, dead-lettered if configured). Stored offsets
//! are also committed synchronously when partitions are revoked
//! (rebalance) and at shutdown. So delivery is at-least-once: a crash
//! re-delivers at most what was done and not yet committed, and a DM's
//! idempotency key (default `<topic>/<partition>/<offset>`) makes a
//! re-delivered stored DM an answer from its idempotency record, not a
//! second copy, within `--idempotency-window-s`. A group new to the topic
//! starts at the earliest offset (`auto.offset.reset=earliest`: nothing
//! produced before the first instance started is lost).
//!
//! **Order and bounds.** The consumer's stream is processed sequentially,
//! one record at a time: records of one partition (with key = user id: of
//! one user) are routed in offset order, and a record that fails
//! `unavailable` / `timeout` is retried (same key, capped backoff) before
//! anything after it — which also holds back the other partitions this
//! instance owns. Nothing is buffered in this module; librdkafka's
//! prefetch is bounded by `queued.max.messages.kbytes` =
//! [`QUEUED_MAX_KBYTES`] and `queued.min.messages` = [`QUEUED_MIN_MESSAGES`].
//! A retry longer than librdkafka's `max.poll.interval.ms` (default 5
//! minutes) makes this member leave the group; its partitions go to the
//! others, which resume from the committed offsets.
//!
//! **Lag.** `switchboard_ingest_lag{source="kafka"}` is the sum over this
//! instance's partitions of librdkafka's `consumer_lag_stored` (high
//! watermark − stored offset), from its statistics every [`STATS_MS`].
//!
//! `--kafka-option KEY=VALUE` is passed to librdkafka (consumer and
//! dead-letter producer) after the settings above; the keys this module's
//! semantics rest on are refused by the configuration.

use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use switchboard_core::metrics::IngestCounters;
use switchboard_core::protocol::MAX_KEY_LEN;

use super::{backoff, wait, worth_logging, Ingest};
use crate::config::Config;

/// librdkafka's prefetch bound (`queued.max.messages.kbytes`): at most this
/// many KiB of fetched, not yet consumed records are held (for the whole
/// consumer, whatever the number of partitions).
pub const QUEUED_MAX_KBYTES: u32 = 4096;
/// `queued.min.messages`: the prefetch target, in records.
pub const QUEUED_MIN_MESSAGES: u32 = 1000;
/// `auto.commit.interval.ms`: how often stored offsets are committed.
pub const AUTO_COMMIT_MS: u32 = 1000;
/// `statistics.interval.ms`: how often the lag gauge is refreshed.
pub const STATS_MS: u32 = 1000;

/// Attempts at producing a malformed record to the dead-letter topic
/// before its offset is stored without a copy.
const DEAD_LETTER_ATTEMPTS: u32 = 3;
/// How long one dead-letter produce may take.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// librdkafka settings this module's semantics rest on: `--kafka-option`
/// may not set them.
pub const RESERVED_OPTIONS: &[&str] = &[
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "bootstrap.servers",
    "metadata.broker.list",
];

/// Whether librdkafka accepts `options` (a value it does not know, or a
/// security protocol or SASL mechanism this build lacks, is refused): a
/// client is created with them and no broker, then dropped. The error
/// names what is wrong.
pub fn check_options(options: &[(String, String)]) -> Result<(), String> {
    let mut config = ClientConfig::new();
    config.set_log_level(RDKafkaLogLevel::Error);
    for (key, value) in options {
        config.set(key, value);
    }
    config
        .create::<BaseConsumer>()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What the consumer needs from the configuration.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topics subscribed to.
    pub topics: Vec<String>,
    /// The consumer group.
    pub group: String,
    /// Where malformed records are copied to.
    pub dead_letter: Option<String>,
    /// `session.timeout.ms`.
    pub session_timeout_ms: u64,
    /// `--kafka-option` pairs, applied last.
    pub options: Vec<(String, String)>,
    /// `client.id`: the instance id.
    pub client_id: String,
}

/// The consumer's settings from the configuration.
pub fn settings(config: &Config) -> KafkaSettings {
    KafkaSettings {
        brokers: config.kafka_brokers.join(","),
        topics: config.kafka_topics.clone(),
        group: config.kafka_group.clone(),
        dead_letter: config.kafka_dead_letter_topic.clone(),
        session_timeout_ms: config.kafka_session_timeout_ms,
        options: config.kafka_options(),
        client_id: config.instance().to_owned(),
    }
}

/// The idempotency key of a DM record that names none:
/// `<topic>/<partition>/<offset>`. Longer than the key limit (64
/// characters; a topic name may have 249), the topic is replaced by `h`
/// and 16 hex digits of its 64-bit FNV-1a hash (at most 48 characters).
pub fn default_key(topic: &str, partition: i32, offset: i64) -> String {
    let key = format!("{topic}/{partition}/{offset}");
    if key.chars().count() <= MAX_KEY_LEN {
        return key;
    }
    format!("h{:016x}/{partition}/{offset}", fnv1a(topic.as_bytes()))
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The consumer's context: commits stored offsets when partitions are
/// revoked, logs assignments, and feeds the lag gauge from statistics.
struct Context {
    counters: IngestCounters,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let mut lag: Option<i64> = None;
        for topic in statistics.topics.values() {
            for partition in topic.partitions.values() {
                // -1: the internal "unassigned" partition, or not known yet.
                if partition.partition >= 0 && partition.consumer_lag_stored >= 0 {
                    *lag.get_or_insert(0) += partition.consumer_lag_stored;
                }
            }
        }
        self.counters.lag.set(lag.unwrap_or(0));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                commit(consumer, "revoke");
                tracing::info!(partitions = %describe(partitions), "kafka partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = %describe(partitions), "kafka partitions assigned");
        }
    }
}

/// `topic/partition` list, for logs.
fn describe(partitions: &TopicPartitionList) -> String {
    let list: Vec<String> = partitions
        .elements()
        .iter()
        .map(|p| format!("{}/{}", p.topic(), p.partition()))
        .collect();
    format!("[{}]", list.join(","))
}

/// Commits the stored offsets synchronously; nothing stored is no error.
fn commit<C: ConsumerContext>(consumer: &impl Consumer<C>, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(when, "kafka offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(when, %error, "committing kafka offsets failed"),
    }
}

/// librdkafka settings common to the consumer and the dead-letter producer.
fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", &settings.client_id)
        .set_log_level(RDKafkaLogLevel::Warning);
    config
}

/// Applies `--kafka-option`s, last.
fn apply_options(config: &mut ClientConfig, settings: &KafkaSettings) {
    for (key, value) in &settings.options {
        config.set(key, value);
    }
}

fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let session = settings.session_timeout_ms;
    let mut config = client_config(settings);
    config
        .set("group.id", &settings.group)
        .set("group.protocol", "classic")
        .set("partition.assignment.strategy", "range")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", AUTO_COMMIT_MS.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session.to_string())
        .set(
            "heartbeat.interval.ms",
            (session / 3).clamp(100, 3000).to_string(),
        )
        .set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES.to_string())
        .set("queued.min.messages", QUEUED_MIN_MESSAGES.to_string())
        .set("statistics.interval.ms", STATS_MS.to_string())
        .set("enable.partition.eof", "false");
    apply_options(&mut config, settings);
    config
}

fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = client_config(settings);
    config.set("acks", "all").set(
        "message.timeout.ms",
        DEAD_LETTER_TIMEOUT.as_millis().to_string(),
    );
    apply_options(&mut config, settings);
    config
}

/// Consumes until `stop` is cancelled: the record in progress is finished
/// (a retry wait is cut short, its offset then not stored), the stored
/// offsets are committed and the consumer leaves the group.
pub async fn run(core: Ingest, settings: KafkaSettings, stop: CancellationToken) {
    let context = Context {
        counters: core.counters().clone(),
    };
    let consumer: StreamConsumer<Context> =
        match consumer_config(&settings).create_with_context(context) {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, "cannot create the kafka consumer; not consuming");
                return;
            }
        };
    let producer: Option<FutureProducer> = match &settings.dead_letter {
        None => None,
        Some(_) => match producer_config(&settings).create() {
            Ok(producer) => Some(producer),
            Err(error) => {
                tracing::error!(%error, "cannot create the kafka dead-letter producer; not consuming");
                return;
            }
        },
    };
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    if let Err(error) = consumer.subscribe(&topics) {
        tracing::error!(%error, "cannot subscribe to the kafka topics; not consuming");
        return;
    }
    let mut failures = 0u32;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = consumer.recv() => message,
        };
        match message {
            Ok(message) => {
                failures = 0;
                if process(&core, &settings, producer.as_ref(), &message, &stop).await {
                    if let Err(error) = consumer.store_offset_from_message(&message) {
                        // Revoked meanwhile: the new owner re-delivers it
                        // (the key makes that safe).
                        tracing::debug!(%error, "could not store a kafka offset");
                    }
                }
            }
            Err(error) => {
                failures += 1;
                if worth_logging(failures) {
                    tracing::warn!(%error, "consuming from kafka failed; retrying");
                }
                if !wait(backoff(failures), &stop).await {
                    break;
                }
            }
        }
    }
    // Committing and leaving the group block (librdkafka calls): off the
    // async workers.
    let left = tokio::task::spawn_blocking(move || {
        commit(&consumer, "shutdown");
        drop(consumer);
        drop(producer);
    })
    .await;
    if left.is_err() {
        tracing::warn!("closing the kafka consumer failed");
    }
    tracing::info!("stopped consuming from kafka");
}

/// Processes one record; true when it is done (its offset may be stored),
/// false when `stop` interrupted a retry.
async fn process(
    core: &Ingest,
    settings: &KafkaSettings,
    producer: Option<&FutureProducer>,
    message: &BorrowedMessage<'_>,
    stop: &CancellationToken,
) -> bool {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let key = default_key(topic, partition, offset);
    let value = message.payload().unwrap_or_default();
    let publish = match core.parse(value, &key) {
        Ok(publish) => publish,
        Err(malformed) => {
            core.counters().malformed.inc();
            let reason = malformed.to_string();
            tracing::warn!(topic, partition, offset, error = %reason, "malformed record; skipped without delivery");
            if let (Some(producer), Some(dead)) = (producer, &settings.dead_letter) {
                dead_letter(producer, dead, message, &reason, stop).await;
            }
            return true;
        }
    };
    let mut attempt = 0u32;
    loop {
        match core.route(&publish).await {
            Ok(delivered) => {
                core.counters().delivered.inc();
                tracing::debug!(topic, partition, offset, ?delivered, "record delivered");
                return true;
            }
            Err(error) => {
                attempt += 1;
                let position = format!("{topic}/{partition}/{offset}");
                if !core.retry_wait(attempt, error, &position, stop).await {
                    return false;
                }
            }
        }
    }
}

/// Produces a malformed record to the dead-letter topic: its value and key
/// as they were, with headers `source-topic`, `source-partition`,
/// `source-offset` and `error`.
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    message: &BorrowedMessage<'_>,
    reason: &str,
    stop: &CancellationToken,
) {
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    for attempt in 1..=DEAD_LETTER_ATTEMPTS {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "source-topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "source-partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "source-offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "error",
                value: Some(reason),
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        let sent = tokio::select! {
            _ = stop.cancelled() => return,
            sent = producer.send(record, DEAD_LETTER_TIMEOUT) => sent,
        };
        match sent {
            Ok(_) => return,
            Err((error, _)) if attempt == DEAD_LETTER_ATTEMPTS => {
                tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %error, "could not copy the malformed record to the dead-letter topic");
            }
            Err(_) => {
                if !wait(backoff(attempt), stop).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keys_fit_the_key_limit() {
        assert_eq!(default_key("events", 3, 42), "events/3/42");
        let long = "t".repeat(249);
        let key = default_key(&long, i32::MAX, i64::MAX);
        assert!(key.chars().count() <= MAX_KEY_LEN, "{key}");
        assert!(
            key.ends_with(&format!("/{}/{}", i32::MAX, i64::MAX)),
            "{key}"
        );
        assert_ne!(key, default_key(&"u".repeat(249), i32::MAX, i64::MAX));
        assert_eq!(key, default_key(&long, i32::MAX, i64::MAX), "deterministic");
    }
}
