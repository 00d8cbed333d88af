//! The instance's counters, exposed on `GET /metrics` in the Prometheus /
//! OpenMetrics text format.
//!
//! Each instance owns its own registry (no process-global recorder), so
//! several in-process instances in one test keep separate numbers. Label
//! values are resolved once at start-up: the per-message path only does
//! atomic increments. This module counts; it never decides anything.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

/// One Kafka partition: its topic and number.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// The topic.
    pub topic: String,
    /// The partition number.
    pub partition: i32,
}

/// One gauge per Kafka partition (`switchboard_ingest_partition_lag`).
#[derive(Clone, Debug, Default)]
pub struct PartitionGauges(Family<PartitionLabel, Gauge>);

impl PartitionGauges {
    /// Sets `partition`'s gauge, creating its series.
    pub fn set(&self, partition: &PartitionLabel, value: i64) {
        self.0.get_or_create(partition).set(value);
    }

    /// Removes `partition`'s series (it left this instance).
    pub fn remove(&self, partition: &PartitionLabel) {
        self.0.remove(partition);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOutcomeLabel {
    source: &'static str,
    outcome: &'static str,
}

/// The counters of one ingestion source (`stream` or `kafka`).
#[derive(Clone, Debug, Default)]
pub struct IngestCounters {
    /// Records routed or stored (then acknowledged to the source).
    pub delivered: Counter,
    /// Records refused by the publish rules (counted, logged without the
    /// body, dead-lettered if configured, acknowledged).
    pub malformed: Counter,
    /// Attempts that failed `unavailable` / `timeout` and were retried.
    pub retried: Counter,
    /// Records in the source not yet delivered and acknowledged (best
    /// available: for a stream, the group's lag plus its pending entries).
    pub lag: Gauge,
    /// Records read and not yet done (routed, stored, malformed or given
    /// up at shutdown).
    pub in_flight: Gauge,
    /// Times a partition (Kafka) was paused because its records read and
    /// not done reached `--kafka-partition-buffer` or
    /// `--ingest-inflight-bytes`.
    pub paused: Counter,
}

/// Counters of the outcomes of one kind of send (DM or room message).
#[derive(Clone, Debug, Default)]
pub struct SendOutcomes {
    /// Local recipients got it; other instances could not be reached.
    pub partial: Counter,
    /// Reached nobody: the backend was unavailable (answered `unavailable`).
    pub unavailable: Counter,
    /// The backend did not answer in time (answered `timeout`).
    pub timeout: Counter,
}

/// Counters for one bus channel kind.
#[derive(Clone, Debug, Default)]
pub struct BusCounters {
    /// Messages on this kind of channel.
    pub personal: Counter,
    /// Room channel messages.
    pub room: Counter,
    /// Broadcast channel (`sb:all`) messages.
    pub broadcast: Counter,
    /// Per-user channel messages (`--routing user-channel`).
    pub user: Counter,
}

/// Every number an operator or the benchmark reads off an instance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Direct messages that found their recipient on this instance only.
    pub dm_local: Counter,
    /// Direct messages published to at least one other instance.
    pub dm_routed: Counter,
    /// Direct messages whose recipient was nowhere.
    pub dm_offline: Counter,
    /// Direct messages that could not be routed (or only locally), by outcome.
    pub dm_failed: SendOutcomes,
    /// Room messages published to the room's channel.
    pub room_ok: Counter,
    /// Room messages that could not be published (or only delivered locally).
    pub room_failed: SendOutcomes,
    /// DMs re-routed (hop 1) to an instance that now holds the recipient.
    pub rerouted: Counter,
    /// DMs that reached an instance no longer holding the recipient, whose
    /// every other holder already had them (no re-route needed).
    pub reroute_covered: Counter,
    /// Bus messages this instance published, by channel kind.
    pub bus_published: BusCounters,
    /// Bus messages this instance received, by channel kind.
    pub bus_received: BusCounters,
    /// Messages (dm and room frames) queued to local sockets; replies,
    /// pings and welcome frames are not counted.
    pub delivered: Counter,
    /// Bus messages received for a recipient this instance no longer holds.
    pub dropped_not_here: Counter,
    /// Frames dropped because a client's outbound queue was full.
    pub dropped_slow_consumer: Counter,
    /// Stored DMs a connection already had (same seq): the seam's and a
    /// re-delivery's de-duplication.
    pub dropped_duplicate: Counter,
    /// DMs appended to their recipient's inbox.
    pub inbox_stored: Counter,
    /// DMs not stored because their recipient was not seen within the inbox
    /// TTL (the abuse bound); the sender's ack says `stored: false`.
    pub inbox_refused_unknown: Counter,
    /// Sends answered from the idempotency record (a retry, not stored again).
    pub inbox_duplicate_sends: Counter,
    /// Inbox entries replayed to connections (backlog on connect, and
    /// repairs).
    pub inbox_replayed: Counter,
    /// Inbox reads a live connection made to repair a hole: a stored DM
    /// arrived before its predecessor.
    pub inbox_repairs: Counter,
    /// Stored DMs answered `timeout` because fewer replicas than
    /// `--redis-wait-replicas` confirmed them in time.
    pub inbox_unconfirmed: Counter,
    /// Times the bus said its subscriptions were re-established after
    /// messages may have been lost, and every connection read its inbox.
    pub inbox_catch_ups: Counter,
    /// `gap` frames sent (entries lost to retention, found by a replay or
    /// a repair).
    pub inbox_gaps: Counter,
    /// Connections closed because their backlog could not be read.
    pub inbox_read_failures: Counter,
    /// Delivery receipts sent to senders.
    pub receipts: Counter,
    /// Bus messages dropped because the inbound bus queue was full.
    pub dropped_bus_inbox_full: Counter,
    /// DMs not re-routed because the re-route queue was full.
    pub dropped_reroute_queue_full: Counter,
    /// Presence entries found pointing at an instance that did not listen.
    pub stale_presence: Counter,
    /// DMs routed from the tracked presence cache without reading Redis.
    pub presence_cache_hits: Counter,
    /// DMs whose recipient's presence had to be read (and was then cached).
    pub presence_cache_misses: Counter,
    /// Presence writes that failed and wait for the next resync.
    pub presence_write_failures: Counter,
    /// Connections refused at the upgrade for bad credentials.
    pub auth_failures: Counter,
    /// Client frames refused by the per-connection rate limit.
    pub rate_limited: Counter,
    /// Connections closed by the server, by reason.
    pub closed_slow_consumer: Counter,
    /// Connections closed for flooding past their rate limit.
    pub closed_flooding: Counter,
    /// Connections closed for sending nothing within the idle timeout.
    pub closed_idle: Counter,
    /// Connections closed because their token expired unrefreshed (4001).
    pub closed_token_expired: Counter,
    /// Connections closed by the server API's disconnect (4002).
    pub closed_disconnected: Counter,
    /// Connections closed for refreshing with another user's token (4003).
    pub closed_other_user: Counter,
    /// Room memberships ended by the server API's kick.
    pub kicked: Counter,
    /// Joins refused by room authorization.
    pub forbidden_joins: Counter,
    /// DMs refused by the DM policy.
    pub forbidden_dms: Counter,
    /// Connection tasks that panicked (the instance kept running).
    pub session_panics: Counter,
    /// Upgrades refused by connection limits or origin checks, by reason.
    pub refused_limit: Counter,
    /// Upgrades refused because the browser's Origin is not allowed.
    pub refused_origin: Counter,
    /// Sockets refused at accept: beyond `--max-connections` plus the HTTP
    /// headroom (answered 503 when a refusal slot was free).
    pub refused_sockets: Counter,
    /// Requests to the server-side HTTP API, accepted.
    pub api_publishes: Counter,
    /// Dead instances this instance won the claim on and cleaned up.
    pub reaped_instances: Counter,
    /// Subscription probes that did not come back (each triggers a resubscribe).
    pub probe_failures: Counter,
    /// Redis Cluster dropped sharded subscriptions (their slot moved) and
    /// this instance subscribed them again.
    pub resubscribes: Counter,
    /// Redis Cluster masters changed between two heartbeats (failover).
    pub cluster_topology_changes: Counter,
    /// Times this instance re-asserted its presence (lease lost or writes failed).
    pub presence_resyncs: Counter,
    /// Latency of Redis commands on the message path, seconds.
    pub redis_latency: Histogram,
    /// User-level transitions this instance announced (it won them in the
    /// backend), by kind.
    pub presence_transitions_online: Counter,
    /// See [`Metrics::presence_transitions_online`].
    pub presence_transitions_offline: Counter,
    /// Room membership transitions this instance announced, by kind.
    pub member_transitions_joined: Counter,
    /// See [`Metrics::member_transitions_joined`].
    pub member_transitions_left: Counter,
    /// Presence events (`P` envelopes) received from the bus.
    pub presence_events_received: Counter,
    /// Room member events (`M` envelopes) received from the bus.
    pub member_events_received: Counter,
    /// Presence event frames queued to local connections.
    pub presence_events_delivered: Counter,
    /// Member event frames queued to local connections.
    pub member_events_delivered: Counter,
    /// Users watched by at least one local connection.
    pub watched_users: Gauge,
    /// Times the watched states were re-read after the bus may have lost
    /// events.
    pub presence_reconciles: Counter,
    /// Queue ingestion from a Redis stream (`--ingest-stream`).
    pub ingest_stream: IngestCounters,
    /// Queue ingestion from Kafka.
    pub ingest_kafka: IngestCounters,
    /// Stream entries this instance claimed (`XAUTOCLAIM`) from a consumer
    /// that left them idle past `--ingest-claim-ms`.
    pub ingest_claimed: Counter,
    /// Per Kafka partition this instance owns: high watermark minus the
    /// stored offset (librdkafka's `consumer_lag_stored`); a partition's
    /// series is removed when the partition leaves this instance.
    pub ingest_partition_lag: PartitionGauges,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        registry.register(
            "switchboard_connections",
            "Open WebSocket connections",
            connections.clone(),
        );

        let dm = Family::<PathLabel, Counter>::default();
        registry.register(
            "switchboard_dm",
            "Direct messages sent from this instance, by outcome (local, routed, offline, partial, unavailable, timeout)",
            dm.clone(),
        );
        let room = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_room_messages",
            "Room messages sent from this instance, by outcome (ok, partial, unavailable, timeout)",
            room.clone(),
        );
        let reroutes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_reroutes",
            "DMs that arrived for a recipient no longer here: re-routed to its new instance, or already covered by its other instances",
            reroutes.clone(),
        );
        let published = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_bus_published",
            "Bus messages published by this instance, by channel kind",
            published.clone(),
        );
        let received = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_bus_received",
            "Bus messages received by this instance, by channel kind",
            received.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "switchboard_delivered",
            "Messages (dm and room frames) queued to local client sockets",
            delivered.clone(),
        );
        let dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "switchboard_dropped",
            "Messages dropped, by reason",
            dropped.clone(),
        );
        let inbox = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_inbox",
            "DMs offered to the inbox, by outcome (stored, refused_unknown: recipient not seen within the TTL, duplicate: an idempotent retry, unconfirmed: stored on the master but not confirmed by --redis-wait-replicas replicas in time)",
            inbox.clone(),
        );
        let replay = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_inbox_replay",
            "Inbox replays on connect, by event (entries replayed, gaps reported, read failures, repairs of a hole in live delivery, catch_ups: every connection read its inbox after the bus resubscribed)",
            replay.clone(),
        );
        let receipts = Counter::default();
        registry.register(
            "switchboard_receipts",
            "Delivery receipts sent to senders",
            receipts.clone(),
        );
        let stale_presence = Counter::default();
        registry.register(
            "switchboard_stale_presence",
            "Presence entries whose instance had no listener (PUBLISH returned 0)",
            stale_presence.clone(),
        );
        let presence_cache = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_presence_cache",
            "Recipients' presence looked up in the tracked cache when routing a DM, by outcome (hit, miss)",
            presence_cache.clone(),
        );
        let presence_write_failures = Counter::default();
        registry.register(
            "switchboard_presence_write_failures",
            "Presence writes that failed (re-asserted at the next resync)",
            presence_write_failures.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "switchboard_auth_failures",
            "WebSocket upgrades refused for bad or missing credentials",
            auth_failures.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "switchboard_rate_limited_frames",
            "Client frames refused by the per-connection rate limit",
            rate_limited.clone(),
        );
        let closed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "switchboard_closed_connections",
            "Connections closed by the server, by reason (slow_consumer, flooding, idle, \
             token_expired, disconnected, other_user)",
            closed.clone(),
        );
        let kicked = Counter::default();
        registry.register(
            "switchboard_kicked_memberships",
            "Room memberships ended by the server API's kick",
            kicked.clone(),
        );
        let forbidden = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_forbidden_requests",
            "Client requests refused by authorization, by kind (join, dm)",
            forbidden.clone(),
        );
        let session_panics = Counter::default();
        registry.register(
            "switchboard_session_panics",
            "Connection tasks that panicked; the instance kept serving",
            session_panics.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "switchboard_refused_upgrades",
            "WebSocket upgrades refused, by reason (limit, origin)",
            refused.clone(),
        );
        let refused_sockets = Counter::default();
        registry.register(
            "switchboard_refused_sockets",
            "TCP connections refused at accept because the instance was full",
            refused_sockets.clone(),
        );
        let api_publishes = Counter::default();
        registry.register(
            "switchboard_api_publishes",
            "Messages accepted by POST /api/v1/publish",
            api_publishes.clone(),
        );
        let reaped_instances = Counter::default();
        registry.register(
            "switchboard_reaped_instances",
            "Dead instances whose presence this instance cleaned (each is reaped by exactly one instance)",
            reaped_instances.clone(),
        );
        let probe_failures = Counter::default();
        registry.register(
            "switchboard_probe_failures",
            "Subscription probes on the personal channel that did not come back",
            probe_failures.clone(),
        );
        let resubscribes = Counter::default();
        registry.register(
            "switchboard_resubscribes",
            "Times Redis Cluster dropped sharded subscriptions (a slot moved) and they were subscribed again",
            resubscribes.clone(),
        );
        let cluster_topology_changes = Counter::default();
        registry.register(
            "switchboard_cluster_topology_changes",
            "Times the Redis Cluster's masters changed between two heartbeats (failover): presence re-asserted",
            cluster_topology_changes.clone(),
        );
        let presence_resyncs = Counter::default();
        registry.register(
            "switchboard_presence_resyncs",
            "Times this instance re-asserted all of its presence entries",
            presence_resyncs.clone(),
        );
        let redis_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "switchboard_redis_command_seconds",
            "Latency of Redis commands on the message path",
            redis_latency.clone(),
        );

        let transitions = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_presence_transitions",
            "User-level presence transitions this instance announced, by kind (online, offline)",
            transitions.clone(),
        );
        let member_transitions = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_member_transitions",
            "Room membership transitions this instance announced, by kind (joined, left)",
            member_transitions.clone(),
        );
        let presence_events_received = Counter::default();
        registry.register(
            "switchboard_presence_events_received",
            "Presence events received from the bus (only instances watching the user receive them)",
            presence_events_received.clone(),
        );
        let member_events_received = Counter::default();
        registry.register(
            "switchboard_member_events_received",
            "Room member events received from the bus",
            member_events_received.clone(),
        );
        let events_delivered = Family::<KindLabel, Counter>::default();
        registry.register(
            "switchboard_presence_events_delivered",
            "Presence and member event frames queued to local connections, by kind (presence, member)",
            events_delivered.clone(),
        );
        let watched_users = Gauge::default();
        registry.register(
            "switchboard_watched_users",
            "Users watched by at least one local connection",
            watched_users.clone(),
        );
        let presence_reconciles = Counter::default();
        registry.register(
            "switchboard_presence_reconciles",
            "Times watched presence and room members were re-read after bus messages may have been lost",
            presence_reconciles.clone(),
        );

        let ingest_records = Family::<SourceOutcomeLabel, Counter>::default();
        registry.register(
            "switchboard_ingest_records",
            "Records consumed from a queue, by source (stream, kafka) and outcome (delivered: routed or stored, then acknowledged; malformed: refused by the publish rules, acknowledged; retried: an attempt answered unavailable or timeout, retried)",
            ingest_records.clone(),
        );
        let ingest_lag = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "switchboard_ingest_lag",
            "Records in the source not yet delivered and acknowledged, by source (stream: the consumer group's lag plus its pending entries)",
            ingest_lag.clone(),
        );
        let ingest_claimed = Counter::default();
        registry.register(
            "switchboard_ingest_claimed",
            "Stream entries claimed (XAUTOCLAIM) from a consumer that left them idle past --ingest-claim-ms",
            ingest_claimed.clone(),
        );
        let ingest_in_flight = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "switchboard_ingest_in_flight",
            "Records read from the source and not yet done (routed, stored or malformed), by source",
            ingest_in_flight.clone(),
        );
        let ingest_paused = Family::<SourceLabel, Counter>::default();
        registry.register(
            "switchboard_ingest_paused",
            "Times a Kafka partition was paused because its records read and not done reached --kafka-partition-buffer or --ingest-inflight-bytes",
            ingest_paused.clone(),
        );
        let ingest_partition_lag = PartitionGauges::default();
        registry.register(
            "switchboard_ingest_partition_lag",
            "Per Kafka partition this instance owns: high watermark minus the stored offset",
            ingest_partition_lag.0.clone(),
        );
        let ingest = |source: &'static str| IngestCounters {
            delivered: ingest_records.get_or_create_owned(&SourceOutcomeLabel {
                source,
                outcome: "delivered",
            }),
            malformed: ingest_records.get_or_create_owned(&SourceOutcomeLabel {
                source,
                outcome: "malformed",
            }),
            retried: ingest_records.get_or_create_owned(&SourceOutcomeLabel {
                source,
                outcome: "retried",
            }),
            lag: ingest_lag.get_or_create_owned(&SourceLabel { source }),
            in_flight: ingest_in_flight.get_or_create_owned(&SourceLabel { source }),
            paused: ingest_paused.get_or_create_owned(&SourceLabel { source }),
        };

        let bus = |family: &Family<KindLabel, Counter>| BusCounters {
            personal: family.get_or_create_owned(&KindLabel { kind: "personal" }),
            room: family.get_or_create_owned(&KindLabel { kind: "room" }),
            broadcast: family.get_or_create_owned(&KindLabel { kind: "broadcast" }),
            user: family.get_or_create_owned(&KindLabel { kind: "user" }),
        };
        let reason = |r: &'static str| dropped.get_or_create_owned(&ReasonLabel { reason: r });
        Arc::new(Metrics {
            connections,
            dm_local: dm.get_or_create_owned(&PathLabel { path: "local" }),
            dm_routed: dm.get_or_create_owned(&PathLabel { path: "routed" }),
            dm_offline: dm.get_or_create_owned(&PathLabel { path: "offline" }),
            dm_failed: SendOutcomes {
                partial: dm.get_or_create_owned(&PathLabel { path: "partial" }),
                unavailable: dm.get_or_create_owned(&PathLabel {
                    path: "unavailable",
                }),
                timeout: dm.get_or_create_owned(&PathLabel { path: "timeout" }),
            },
            room_ok: room.get_or_create_owned(&OutcomeLabel { outcome: "ok" }),
            room_failed: SendOutcomes {
                partial: room.get_or_create_owned(&OutcomeLabel { outcome: "partial" }),
                unavailable: room.get_or_create_owned(&OutcomeLabel {
                    outcome: "unavailable",
                }),
                timeout: room.get_or_create_owned(&OutcomeLabel { outcome: "timeout" }),
            },
            rerouted: reroutes.get_or_create_owned(&OutcomeLabel {
                outcome: "rerouted",
            }),
            reroute_covered: reroutes.get_or_create_owned(&OutcomeLabel { outcome: "covered" }),
            bus_published: bus(&published),
            bus_received: bus(&received),
            delivered,
            dropped_not_here: reason("recipient_not_here"),
            dropped_slow_consumer: reason("slow_consumer"),
            dropped_duplicate: reason("duplicate_seq"),
            inbox_stored: inbox.get_or_create_owned(&OutcomeLabel { outcome: "stored" }),
            inbox_refused_unknown: inbox.get_or_create_owned(&OutcomeLabel {
                outcome: "refused_unknown",
            }),
            inbox_duplicate_sends: inbox.get_or_create_owned(&OutcomeLabel {
                outcome: "duplicate",
            }),
            inbox_unconfirmed: inbox.get_or_create_owned(&OutcomeLabel {
                outcome: "unconfirmed",
            }),
            inbox_replayed: replay.get_or_create_owned(&OutcomeLabel { outcome: "entries" }),
            inbox_gaps: replay.get_or_create_owned(&OutcomeLabel { outcome: "gaps" }),
            inbox_repairs: replay.get_or_create_owned(&OutcomeLabel { outcome: "repairs" }),
            inbox_catch_ups: replay.get_or_create_owned(&OutcomeLabel {
                outcome: "catch_ups",
            }),
            inbox_read_failures: replay.get_or_create_owned(&OutcomeLabel {
                outcome: "read_failures",
            }),
            receipts,
            dropped_bus_inbox_full: reason("bus_inbox_full"),
            dropped_reroute_queue_full: reason("reroute_queue_full"),
            stale_presence,
            presence_cache_hits: presence_cache
                .get_or_create_owned(&OutcomeLabel { outcome: "hit" }),
            presence_cache_misses: presence_cache
                .get_or_create_owned(&OutcomeLabel { outcome: "miss" }),
            presence_write_failures,
            auth_failures,
            rate_limited,
            closed_slow_consumer: closed.get_or_create_owned(&ReasonLabel {
                reason: "slow_consumer",
            }),
            closed_flooding: closed.get_or_create_owned(&ReasonLabel { reason: "flooding" }),
            closed_idle: closed.get_or_create_owned(&ReasonLabel { reason: "idle" }),
            closed_token_expired: closed.get_or_create_owned(&ReasonLabel {
                reason: "token_expired",
            }),
            closed_disconnected: closed.get_or_create_owned(&ReasonLabel {
                reason: "disconnected",
            }),
            closed_other_user: closed.get_or_create_owned(&ReasonLabel {
                reason: "other_user",
            }),
            kicked,
            forbidden_joins: forbidden.get_or_create_owned(&KindLabel { kind: "join" }),
            forbidden_dms: forbidden.get_or_create_owned(&KindLabel { kind: "dm" }),
            session_panics,
            refused_limit: refused.get_or_create_owned(&ReasonLabel { reason: "limit" }),
            refused_origin: refused.get_or_create_owned(&ReasonLabel { reason: "origin" }),
            refused_sockets,
            api_publishes,
            reaped_instances,
            probe_failures,
            resubscribes,
            cluster_topology_changes,
            presence_resyncs,
            redis_latency,
            presence_transitions_online: transitions
                .get_or_create_owned(&KindLabel { kind: "online" }),
            presence_transitions_offline: transitions
                .get_or_create_owned(&KindLabel { kind: "offline" }),
            member_transitions_joined: member_transitions
                .get_or_create_owned(&KindLabel { kind: "joined" }),
            member_transitions_left: member_transitions
                .get_or_create_owned(&KindLabel { kind: "left" }),
            presence_events_received,
            member_events_received,
            presence_events_delivered: events_delivered
                .get_or_create_owned(&KindLabel { kind: "presence" }),
            member_events_delivered: events_delivered
                .get_or_create_owned(&KindLabel { kind: "member" }),
            watched_users,
            presence_reconciles,
            ingest_stream: ingest("stream"),
            ingest_kafka: ingest("kafka"),
            ingest_claimed,
            ingest_partition_lag,
            registry,
        })
    }

    /// The metrics in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_resolved_labels() {
        let m = Metrics::new();
        m.bus_received.personal.inc();
        m.connections.inc();
        let text = m.render();
        assert!(
            text.contains("switchboard_bus_received_total{kind=\"personal\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchboard_bus_received_total{kind=\"room\"} 0"),
            "{text}"
        );
        assert!(text.contains("switchboard_connections 1"), "{text}");
        for series in [
            "switchboard_ingest_records_total{source=\"stream\",outcome=\"delivered\"} 0",
            "switchboard_ingest_records_total{source=\"kafka\",outcome=\"retried\"} 0",
            "switchboard_ingest_lag{source=\"stream\"} 0",
            "switchboard_ingest_claimed_total 0",
            "switchboard_ingest_in_flight{source=\"kafka\"} 0",
            "switchboard_ingest_paused_total{source=\"kafka\"} 0",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }
}
