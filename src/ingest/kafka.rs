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
//! **Order and bounds.** Records are routed concurrently
//! ([`super::flight`]): up to `--ingest-inflight` records per partition at
//! once, the records of one user (or room) one after another in offset
//! order — with key = user id, a user's records are in one partition, so
//! per-user order is the partition's. Records read beyond that wait in
//! their partition, in order. A partition whose records read and not done
//! reach `--kafka-partition-buffer` records or `--ingest-inflight-bytes`
//! bytes is **paused** (librdkafka stops fetching it, drops what it had
//! prefetched for it, and fetches again from after the last record handed
//! out once resumed) and resumed once it is down to half
//! (`switchboard_ingest_paused_total` counts the pauses); the other
//! partitions go on meanwhile. The buffer is what makes pauses rare: each
//! costs a fetch round trip (up to `fetch.wait.max.ms` = [`FETCH_WAIT_MS`])
//! and the refetch of what was dropped, so with only the in-flight window
//! as the bound a backlog drained at ~300 records/s instead of thousands
//! (docs/BENCHMARKS.md). A partition's offset is stored at its **done
//! prefix**: after the last record such that it and every one before it
//! are done, so a record retried for long (`unavailable` / `timeout`,
//! capped backoff, same key) holds back its partition's commits and its
//! user's later records, never other users' records or another partition.
//! librdkafka's own prefetch, before records reach this module, is bounded
//! by `queued.max.messages.kbytes` = [`QUEUED_MAX_KBYTES`] and
//! `queued.min.messages` = [`QUEUED_MIN_MESSAGES`]. A partition revoked
//! while records of it are in flight lets them finish without storing (its
//! new owner resumes from the committed offsets: at-least-once).
//!
//! **Lag.** `switchboard_ingest_lag{source="kafka"}` is the sum over this
//! instance's partitions of librdkafka's `consumer_lag_stored` (high
//! watermark − stored offset), and
//! `switchboard_ingest_partition_lag{topic,partition}` each partition's,
//! from its statistics every [`STATS_MS`]; a partition's series goes when
//! the partition leaves this instance.
//!
//! `--kafka-option KEY=VALUE` is passed to librdkafka (consumer and
//! dead-letter producer) after the settings above; the keys this module's
//! semantics rest on are refused by the configuration.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use switchboard_core::metrics::{IngestCounters, PartitionGauges, PartitionLabel};
use switchboard_core::protocol::MAX_KEY_LEN;

use super::flight::{Finished, Flight, Limits};
use super::{backoff, wait, worth_logging, Ingest, Record};
use crate::config::Config;

/// librdkafka's prefetch bound (`queued.max.messages.kbytes`): at most this
/// many KiB of fetched, not yet consumed records are held (for the whole
/// consumer, whatever the number of partitions).
pub const QUEUED_MAX_KBYTES: u32 = 4096;
/// `queued.min.messages`: the prefetch target, in records — librdkafka's
/// default; the bound that holds is [`QUEUED_MAX_KBYTES`]. At 1000 it was
/// what limited a backlog to ≈4,000 records/s against Tansu (15,000 at
/// this value, docs/BENCHMARKS.md).
pub const QUEUED_MIN_MESSAGES: u32 = 100_000;
/// `auto.commit.interval.ms`: how often stored offsets are committed.
pub const AUTO_COMMIT_MS: u32 = 1000;
/// `fetch.wait.max.ms`: how long the broker may hold a fetch with no new
/// records (librdkafka's default is 500).
pub const FETCH_WAIT_MS: u32 = 100;
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
    /// Records routed at once per partition (`--ingest-inflight`), and
    /// bytes of values read and not done per partition
    /// (`--ingest-inflight-bytes`).
    pub limits: Limits,
    /// Records read and not done per partition before it is paused
    /// (`--kafka-partition-buffer`).
    pub buffer: usize,
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
        limits: super::limits(config),
        buffer: config.kafka_partition_buffer,
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
/// revoked and tells the loop which ones, resumes assigned partitions
/// (none stays paused from an earlier assignment), logs assignments, and
/// feeds the lag gauges from statistics.
struct Context {
    counters: IngestCounters,
    /// `switchboard_ingest_partition_lag`.
    partition_lag: PartitionGauges,
    /// The partitions with a lag series now.
    lag_series: Mutex<HashSet<PartitionLabel>>,
    /// Revoked since the loop last looked (it drops their state).
    revoked: Mutex<Vec<(String, i32)>>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let mut lag: Option<i64> = None;
        let mut seen = HashSet::new();
        for (name, topic) in &statistics.topics {
            for partition in topic.partitions.values() {
                // -1: the internal "unassigned" partition, or not known yet.
                if partition.partition >= 0 && partition.consumer_lag_stored >= 0 {
                    *lag.get_or_insert(0) += partition.consumer_lag_stored;
                    let label = PartitionLabel {
                        topic: name.clone(),
                        partition: partition.partition,
                    };
                    self.partition_lag
                        .set(&label, partition.consumer_lag_stored);
                    seen.insert(label);
                }
            }
        }
        self.counters.lag.set(lag.unwrap_or(0));
        if let Ok(mut series) = self.lag_series.lock() {
            for gone in series.difference(&seen) {
                self.partition_lag.remove(gone);
            }
            *series = seen;
        }
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
                if let Ok(mut revoked) = self.revoked.lock() {
                    revoked.extend(
                        partitions
                            .elements()
                            .iter()
                            .map(|p| (p.topic().to_owned(), p.partition())),
                    );
                }
                tracing::info!(partitions = %describe(partitions), "kafka partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            // The loop starts these afresh; a pause of an earlier
            // assignment must not outlive it.
            if let Err(error) = consumer.resume(partitions) {
                tracing::debug!(%error, "could not resume the assigned kafka partitions");
            }
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
        .set("enable.partition.eof", "false")
        // A resumed partition is fetched again once the fetch in progress
        // returns: at most this long when the partition is caught up.
        .set("fetch.wait.max.ms", FETCH_WAIT_MS.to_string());
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

/// Where a record is: its partition, the partition's generation in this
/// instance (a partition revoked and assigned again starts afresh), and
/// its offset.
type Position = (PartitionId, u64, i64);

/// A partition: topic and number.
type PartitionId = (Arc<str>, i32);

/// One assigned partition's records read and not yet done.
#[derive(Default)]
struct PartitionState {
    /// Bumped when the partition is revoked: records of an older
    /// generation finish without touching this state.
    generation: u64,
    /// Offsets started and not yet stored, in offset order, each with its
    /// outcome once finished.
    offsets: VecDeque<(i64, Option<bool>)>,
    /// Started and not finished (at most `--ingest-inflight`).
    running: usize,
    /// Read and not started yet, in offset order.
    waiting: VecDeque<OwnedMessage>,
    /// Bytes of the values of the running and waiting records.
    bytes: usize,
    /// Paused by this module (its records read and not done reached the
    /// bound); resumed at half.
    paused: bool,
}

impl PartitionState {
    /// Records read and not done.
    fn held(&self) -> usize {
        self.running + self.waiting.len()
    }
}

/// The consumer's loop state; see [`run`].
struct Dispatcher {
    core: Ingest,
    consumer: StreamConsumer<Context>,
    settings: KafkaSettings,
    producer: Option<FutureProducer>,
    stop: CancellationToken,
    flight: Flight<Position>,
    partitions: HashMap<PartitionId, PartitionState>,
    generations: u64,
}

/// Consumes until `stop` is cancelled: records in flight finish (a retry
/// wait is cut short and its record, and what follows it in its
/// partition, is then not stored), the stored offsets are committed and
/// the consumer leaves the group.
pub async fn run(
    core: Ingest,
    settings: KafkaSettings,
    partition_lag: PartitionGauges,
    stop: CancellationToken,
) {
    let context = Context {
        counters: core.counters().clone(),
        partition_lag,
        lag_series: Mutex::new(HashSet::new()),
        revoked: Mutex::new(Vec::new()),
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
    let mut dispatcher = Dispatcher {
        core,
        consumer,
        settings,
        producer,
        stop,
        flight: Flight::default(),
        partitions: HashMap::new(),
        generations: 0,
    };
    dispatcher.consume().await;
    let Dispatcher {
        consumer, producer, ..
    } = dispatcher;
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

impl Dispatcher {
    /// Reads records and finishes them until `stop`, then lets the records
    /// in flight finish.
    async fn consume(&mut self) {
        let mut failures = 0u32;
        // After a failed read: when the next one may be made.
        let mut read_after: Option<Instant> = None;
        loop {
            let next_read = read_after;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(finished) = self.flight.next() => self.finish(finished),
                _ = sleep_until(next_read), if next_read.is_some() => read_after = None,
                message = self.consumer.recv(), if next_read.is_none() => {
                    let message = message.map(|m| m.detach());
                    self.forget_revoked();
                    match message {
                        Ok(message) => {
                            failures = 0;
                            self.admit(message);
                        }
                        Err(error) => {
                            failures += 1;
                            if worth_logging(failures) {
                                tracing::warn!(%error, "consuming from kafka failed; retrying");
                            }
                            read_after = Some(Instant::now() + backoff(failures));
                        }
                    }
                }
            }
        }
        while let Some(finished) = self.flight.next().await {
            self.finish(finished);
        }
    }

    /// Drops the state of partitions revoked since the last look: their
    /// held record is left to the new owner, their records in flight
    /// finish without storing (storing for a partition not assigned fails
    /// anyway).
    fn forget_revoked(&mut self) {
        let revoked = match self.consumer.context().revoked.lock() {
            Ok(mut revoked) => std::mem::take(&mut *revoked),
            Err(_) => return,
        };
        for (topic, partition) in revoked {
            let id: PartitionId = (Arc::from(topic.as_str()), partition);
            self.partitions.remove(&id);
        }
    }

    /// Takes `message` into its partition: started at once if fewer than
    /// `--ingest-inflight` of the partition's records are running,
    /// otherwise waiting; a partition whose records read and not done
    /// reach `--kafka-partition-buffer` or `--ingest-inflight-bytes` is
    /// paused.
    fn admit(&mut self, message: OwnedMessage) {
        let id: PartitionId = (Arc::from(message.topic()), message.partition());
        let size = value_len(&message);
        let state = self.state(&id);
        state.bytes += size;
        state.waiting.push_back(message);
        self.start_waiting(&id);
        let (buffer, limits) = (self.settings.buffer, self.settings.limits);
        if let Some(state) = self.partitions.get_mut(&id) {
            if !state.paused && (state.held() >= buffer || state.bytes >= limits.bytes) {
                // librdkafka drops what it had fetched for the partition
                // and fetches again from after the last record handed out
                // once resumed: nothing is lost, nothing read twice.
                state.paused = true;
                self.core.counters().paused.inc();
                self.pause_resume(&id, true);
            }
        }
    }

    /// The state of partition `id`, created at a new generation.
    fn state(&mut self, id: &PartitionId) -> &mut PartitionState {
        let generations = &mut self.generations;
        self.partitions.entry(id.clone()).or_insert_with(|| {
            *generations += 1;
            PartitionState {
                generation: *generations,
                ..PartitionState::default()
            }
        })
    }

    /// Starts partition `id`'s waiting records while fewer than
    /// `--ingest-inflight` are running — none once `stop` is cancelled:
    /// shutdown lets what runs finish and leaves the rest (not stored) to
    /// the next owner.
    fn start_waiting(&mut self, id: &PartitionId) {
        if self.stop.is_cancelled() {
            return;
        }
        let inflight = self.settings.limits.items;
        while let Some(message) = self
            .partitions
            .get_mut(id)
            .filter(|state| state.running < inflight)
            .and_then(|state| state.waiting.pop_front())
        {
            self.add(id.clone(), message);
        }
    }

    /// Starts routing `message` (of partition `id`; its bytes are counted
    /// already).
    fn add(&mut self, id: PartitionId, message: OwnedMessage) {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let key = default_key(topic, partition, offset);
        let parsed = self.core.parse(message.payload().unwrap_or_default(), &key);
        let order_key = parsed.as_ref().ok().map(Record::order_key);
        let size = value_len(&message);
        let state = self.state(&id);
        state.offsets.push_back((offset, None));
        state.running += 1;
        let position = (id, state.generation, offset);
        self.core.counters().in_flight.inc();
        let core = self.core.clone();
        let dead_letter_to = match (&self.producer, &self.settings.dead_letter) {
            (Some(producer), Some(topic)) => Some((producer.clone(), topic.clone())),
            _ => None,
        };
        let stop = self.stop.clone();
        let work = async move {
            match parsed {
                Ok(record) => {
                    let position = format!("{}/{}/{}", message.topic(), partition, offset);
                    core.deliver(&record, &position, &stop).await
                }
                Err(malformed) => {
                    core.counters().malformed.inc();
                    let reason = malformed.to_string();
                    tracing::warn!(topic = message.topic(), partition, offset, error = %reason, "malformed record; skipped without delivery");
                    if let Some((producer, topic)) = dead_letter_to {
                        dead_letter(&producer, &topic, &message, &reason, &stop).await;
                    }
                    true
                }
            }
        };
        self.flight.add(position, order_key, size, work);
    }

    /// A record finished: stores the offset after the partition's done
    /// prefix, starts waiting records, and resumes the partition once it is
    /// down to half its bounds.
    fn finish(&mut self, finished: Finished<Position>) {
        self.core.counters().in_flight.dec();
        let ((topic, partition), generation, offset) = finished.position;
        let id: PartitionId = (topic, partition);
        let (buffer, limits) = (self.settings.buffer, self.settings.limits);
        let Some(state) = self.partitions.get_mut(&id) else {
            return;
        };
        if state.generation != generation {
            return;
        }
        state.running = state.running.saturating_sub(1);
        state.bytes = state.bytes.saturating_sub(finished.bytes);
        if let Ok(i) = state.offsets.binary_search_by_key(&offset, |(o, _)| *o) {
            state.offsets[i].1 = Some(finished.done);
        }
        let mut stored = None;
        while let Some(&(o, Some(true))) = state.offsets.front() {
            state.offsets.pop_front();
            stored = Some(o);
        }
        // Resumed at half, not at the first free slot: a resume costs a
        // fetch round trip, and the half still held keeps the partition
        // busy meanwhile.
        let resume = state.paused && state.held() <= buffer / 2 && state.bytes <= limits.bytes / 2;
        if resume {
            state.paused = false;
        }
        if let Some(done) = stored {
            self.store(&id, done);
        }
        self.start_waiting(&id);
        if resume {
            self.pause_resume(&id, false);
        }
    }

    /// Stores `done + 1` as partition `id`'s next offset to commit.
    fn store(&self, id: &PartitionId, done: i64) {
        let mut list = TopicPartitionList::new();
        let stored = list
            .add_partition_offset(&id.0, id.1, Offset::Offset(done + 1))
            .and_then(|()| self.consumer.store_offsets(&list));
        if let Err(error) = stored {
            // Revoked meanwhile: the new owner re-delivers from the
            // committed offset (the key makes that safe for stored DMs).
            tracing::debug!(topic = &*id.0, partition = id.1, %error, "could not store a kafka offset");
        }
    }

    /// Pauses (or resumes) fetching partition `id`.
    fn pause_resume(&self, id: &PartitionId, pause: bool) {
        let mut list = TopicPartitionList::new();
        list.add_partition(&id.0, id.1);
        let result = if pause {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        match result {
            Ok(()) => tracing::debug!(
                topic = &*id.0,
                partition = id.1,
                pause,
                "kafka partition paused/resumed"
            ),
            Err(error) => {
                tracing::warn!(topic = &*id.0, partition = id.1, pause, %error, "could not pause/resume a kafka partition")
            }
        }
    }
}

/// The length of a record's value.
fn value_len(message: &OwnedMessage) -> usize {
    message.payload().map_or(0, <[u8]>::len)
}

/// Sleeps until `at`; never resolves without one (the branch is then
/// disabled anyway).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Produces a malformed record to the dead-letter topic: its value and key
/// as they were, with headers `source-topic`, `source-partition`,
/// `source-offset` and `error`.
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    message: &OwnedMessage,
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
