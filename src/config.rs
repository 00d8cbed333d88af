//! Configuration: every command-line flag, its `SWITCHBOARD_<NAME>` environment
//! variable and its default, parsed once at start-up.
//!
//! This module owns parsing and validation of settings only. It does not open
//! sockets, talk to Redis or decide anything about routing; the rest of the
//! server receives an already-validated [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, ValueEnum};

use switchboard_core::protocol::{validate_name, NameError};
pub use switchboard_core::router::RoutingMode;
use switchboard_core::store::StoreLimits;

/// `--max-connections` when neither it nor the open-files limit says less.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

/// File descriptors kept beside the WebSocket connections: the 64 sockets of
/// HTTP headroom and 32 refusals at accept (see `admission`), Redis
/// connections, the listener, stdio and some slack.
pub const RESERVED_FILES: usize = 256;

/// HS256 secrets shorter than this are accepted with a warning (RFC 7518
/// §3.2: the key must be at least as long as the hash output, 256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

fn routing_mode() -> impl TypedValueParser<Value = RoutingMode> {
    PossibleValuesParser::new(RoutingMode::ALL.map(RoutingMode::as_str))
        .try_map(|name: String| name.parse::<RoutingMode>())
}

/// How a WebSocket client proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// JWT (HS256 secret, RSA/EC public key or JWKS); `sub` is the user id.
    Jwt,
    /// Development only: the user id is taken from `?user=NAME`.
    None,
}

/// Who may join a room (`--room-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoomAuth {
    /// Any connection may join any room.
    Open,
    /// A join needs the connection token's `rooms` claim to allow the room,
    /// or a per-room token.
    Token,
}

/// Whom a connection may DM (`--dm-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DmPolicy {
    /// Anyone.
    Any,
    /// Those the connection token's `dm: true` or `dm_to` claim allows.
    Token,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Every setting of one Switchboard instance.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Config {
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis://, rediss://, redis+unix://), or a Sentinel-managed
    /// primary: redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME (the
    /// sentinels, then the name they monitor it under; the instance follows
    /// the sentinels' failovers). Absent: embedded single-node mode with an
    /// in-process bus and presence store.
    #[arg(long, env = "SWITCHBOARD_REDIS_URL", conflicts_with = "redis_cluster")]
    pub redis_url: Option<String>,

    /// Seed nodes of a Redis Cluster (Redis ≥ 7), comma-separated
    /// (`redis://host:port,redis://host:port`): any reachable one is enough.
    /// Instance and room channels become sharded channels (SSUBSCRIBE /
    /// SPUBLISH) spread over the slots; every key shares a slot with what it
    /// is used with. Mutually exclusive with --redis-url.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_CLUSTER",
        value_delimiter = ',',
        num_args = 1..
    )]
    pub redis_cluster: Vec<String>,

    /// This process's instance id. Default: hostname plus a random suffix, new
    /// at every start, so a restarted process never inherits a crashed one's state.
    #[arg(long, env = "SWITCHBOARD_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// `routed` publishes a DM only to the instances holding the recipient;
    /// `broadcast` is the every-instance baseline the benchmarks compare against.
    #[arg(
        long,
        env = "SWITCHBOARD_ROUTING",
        value_parser = routing_mode(),
        default_value = "routed"
    )]
    pub routing: RoutingMode,

    /// Client authentication: `jwt` or `none` (development only). JWTs are
    /// verified with exactly one of --jwt-secret, --jwt-public-key or
    /// --jwks-url.
    #[arg(long, env = "SWITCHBOARD_AUTH", value_enum, default_value = "jwt")]
    pub auth: AuthMode,

    /// HS256 secret for `--auth jwt`.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file of the public key verifying client JWTs: an RSA key verifies
    /// RS256 tokens, an EC P-256 key ES256 (P-384: ES384); no other
    /// algorithm is accepted.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// URL (http:// or https://) of a JWKS whose keys verify client JWTs,
    /// chosen by the token's `kid`, each with its own algorithm (the JWK's
    /// `alg`, else RS256 for RSA, ES256 for EC P-256).
    #[arg(long, env = "SWITCHBOARD_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Shortest interval between two JWKS fetches, milliseconds: a token
    /// with an unknown `kid` triggers a fetch at most this often.
    #[arg(
        long,
        env = "SWITCHBOARD_JWKS_MIN_REFRESH_MS",
        default_value_t = 10_000
    )]
    pub jwks_min_refresh_ms: u64,

    /// Age in seconds after which cached JWKS keys are refetched (on the
    /// next verification; a failed fetch keeps the cached keys).
    #[arg(long, env = "SWITCHBOARD_JWKS_REFRESH_S", default_value_t = 300)]
    pub jwks_refresh_s: u64,

    /// Who may join a room: `token` (the connection token's `rooms` claim,
    /// or a per-room token in the join) or `open` (anyone). Default: `token`
    /// with --auth jwt, `open` with --auth none.
    #[arg(long, env = "SWITCHBOARD_ROOM_AUTH", value_enum)]
    pub room_auth: Option<RoomAuth>,

    /// Whom a connection may DM: `any`, or `token` (those its token's
    /// `dm: true` or `dm_to` claim allows). Needs --auth jwt.
    #[arg(long, env = "SWITCHBOARD_DM_POLICY", value_enum, default_value = "any")]
    pub dm_policy: DmPolicy,

    /// How long before a token's `exp` the server sends `token_expiring`,
    /// milliseconds.
    #[arg(
        long,
        env = "SWITCHBOARD_TOKEN_EXPIRY_WARNING_MS",
        default_value_t = 30_000
    )]
    pub token_expiry_warning_ms: u64,

    /// Prefix of every Redis key and channel, so deployments can share a Redis.
    #[arg(long, env = "SWITCHBOARD_REDIS_PREFIX", default_value = "sb")]
    pub redis_prefix: String,

    /// Largest WebSocket frame (and message) accepted; larger closes with 1009.
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,

    /// Instance lease TTL in milliseconds; refreshed every third of it.
    #[arg(long, env = "SWITCHBOARD_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,

    /// Frames queued for one client before it is disconnected as a slow consumer.
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Bytes queued for one client before it is disconnected as a slow
    /// consumer (whichever of this and --outbound-queue is reached first).
    #[arg(
        long,
        env = "SWITCHBOARD_OUTBOUND_QUEUE_BYTES",
        default_value_t = 1 << 20
    )]
    pub outbound_queue_bytes: usize,

    /// Longest wait for a connection to Redis to be established, milliseconds.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_CONNECT_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub redis_connect_timeout_ms: u64,

    /// Longest wait for Redis to answer a command, milliseconds. A DM whose
    /// routing got no answer in time is answered `timeout` (it may have been
    /// delivered), never `unavailable`.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_RESPONSE_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub redis_response_timeout_ms: u64,

    /// Replicas that must have a stored DM before it is acknowledged as
    /// stored (`WAIT` after the append). 0 (the default): acknowledged once
    /// the master has it — Redis replication is asynchronous, so a failover
    /// right after can lose it. With N > 0, a DM not confirmed by N
    /// replicas within --redis-wait-timeout-ms is answered `timeout` (it is
    /// stored on the master and may be delivered; a retry with its key is
    /// answered from the first attempt). Costs a replica round trip per
    /// stored DM, during which this instance's other commands to that node
    /// wait (WAIT blocks the connection).
    #[arg(long, env = "SWITCHBOARD_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// Longest wait for --redis-wait-replicas, milliseconds.
    #[arg(long, env = "SWITCHBOARD_REDIS_WAIT_TIMEOUT_MS", default_value_t = 100)]
    pub redis_wait_timeout_ms: u64,

    /// Most entries kept in one user's inbox; the oldest are trimmed (a
    /// client resuming from before them is told with a `gap` frame).
    #[arg(long, env = "SWITCHBOARD_INBOX_MAX_LEN", default_value_t = 1000)]
    pub inbox_max_len: usize,

    /// How long an inbox is kept after its user last connected, and the
    /// oldest an entry may be, in seconds. DMs to a user who has not
    /// connected within it (and is not online) are not stored
    /// (`"stored": false`).
    #[arg(long, env = "SWITCHBOARD_INBOX_TTL_S", default_value_t = 604_800)]
    pub inbox_ttl_s: u64,

    /// Messages kept per room for `join` with `since` (0: room history
    /// off; room messages then carry no `seq`).
    #[arg(long, env = "SWITCHBOARD_ROOM_HISTORY", default_value_t = 100)]
    pub room_history: usize,

    /// How long a room's history is kept after its last message, seconds.
    #[arg(long, env = "SWITCHBOARD_ROOM_HISTORY_TTL_S", default_value_t = 86_400)]
    pub room_history_ttl_s: u64,

    /// How long a send's idempotency `key` is remembered, in seconds.
    #[arg(long, env = "SWITCHBOARD_IDEMPOTENCY_WINDOW_S", default_value_t = 300)]
    pub idempotency_window_s: u64,

    /// Runtime worker threads; 0 = one per CPU. 1 runs a single-threaded
    /// runtime (no cross-thread wakeups), the better choice when several
    /// instances share a few cores.
    #[arg(long, env = "SWITCHBOARD_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Log format.
    #[arg(
        long,
        env = "SWITCHBOARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Required `aud` claim of client JWTs (not checked when absent).
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Bearer key of the server-side HTTP API (`/api/v1/*`); the API is
    /// disabled when no key is set.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Largest message body (the `body` field, as JSON text); larger is
    /// refused with `too_large` (WebSocket) or 413 (HTTP API).
    #[arg(long, env = "SWITCHBOARD_MAX_BODY_BYTES", default_value_t = 16384)]
    pub max_body_bytes: usize,

    /// Frames per second one connection may send (token bucket rate); 0 disables.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,

    /// Token bucket size: frames a connection may send in a burst.
    #[arg(long, env = "SWITCHBOARD_RATE_BURST", default_value_t = 100.0)]
    pub rate_burst: f64,

    /// Most open WebSocket connections on this instance (503 beyond).
    /// Default: what the open-files limit allows (after raising the soft
    /// limit to the hard one), at most 100000. A value the limit cannot
    /// hold is refused at start-up.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most connections of one user on this instance (429 beyond).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER",
        default_value_t = 16
    )]
    pub max_connections_per_user: usize,

    /// Most rooms one connection may join.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_ROOMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_rooms_per_connection: usize,

    /// How long a user whose last connection closed stays online (and a
    /// room member whose last connection in the room left stays a member)
    /// before watchers are told: a reconnect within it, anywhere, is no
    /// event. 0 announces at once.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_GRACE_MS", default_value_t = 2000)]
    pub presence_grace_ms: u64,

    /// Most users one connection may watch (`limit_exceeded` beyond).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_WATCHES_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_watches_per_connection: usize,

    /// Most members one `members` reply (or `GET /api/v1/rooms/R/members`)
    /// lists; beyond, the reply says `"truncated": true`.
    #[arg(long, env = "SWITCHBOARD_MAX_MEMBERS_LISTED", default_value_t = 1000)]
    pub max_members_listed: usize,

    /// A client must send its HTTP request (the WebSocket upgrade) within this
    /// many milliseconds of connecting, or it is disconnected.
    #[arg(
        long,
        env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,

    /// Interval of server WebSocket pings, milliseconds.
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL_MS", default_value_t = 20_000)]
    pub ping_interval_ms: u64,

    /// A connection that sends nothing (not even a pong) for this long is
    /// closed (1001 "idle timeout"), milliseconds.
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// Comma-separated `Origin` values browsers may connect from (e.g.
    /// `https://chat.example.com`); others get 403. Empty: any origin.
    /// Requests without an `Origin` header (non-browser clients) are allowed.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Redis stream to consume records from (the key as given, no
    /// --redis-prefix): each entry's field `v` holds a `POST
    /// /api/v1/publish` body. Needs --redis-url or --redis-cluster. Every
    /// instance with it is a consumer (named by its instance id) of
    /// --ingest-group.
    #[arg(long, env = "SWITCHBOARD_INGEST_STREAM")]
    pub ingest_stream: Option<String>,

    /// Consumer group of --ingest-stream, created (with the stream) if
    /// missing.
    #[arg(long, env = "SWITCHBOARD_INGEST_GROUP", default_value = "switchboard")]
    pub ingest_group: String,

    /// Where a group created by this instance starts: `earliest` (every
    /// entry already in the stream) or `latest` (only entries added from
    /// now on). An existing group keeps its position.
    #[arg(
        long,
        env = "SWITCHBOARD_INGEST_START",
        value_enum,
        default_value = "earliest"
    )]
    pub ingest_start: IngestStart,

    /// Stream entries pending in a consumer for longer than this (its
    /// instance died, or is stuck) are claimed by another instance and
    /// processed there, milliseconds.
    #[arg(long, env = "SWITCHBOARD_INGEST_CLAIM_MS", default_value_t = 30_000)]
    pub ingest_claim_ms: u64,

    /// Stream entries read (or claimed) at a time; up to --ingest-inflight
    /// of them are routed at once (entries for the same user or room one
    /// after another, in stream order), and the next batch is read once
    /// this one is done.
    #[arg(long, env = "SWITCHBOARD_INGEST_BATCH", default_value_t = 100)]
    pub ingest_batch: usize,

    /// Records routed at once per Kafka partition (and per stream
    /// consumer); records for the same user or room go one after another,
    /// in offset order.
    #[arg(long, env = "SWITCHBOARD_INGEST_INFLIGHT", default_value_t = 64)]
    pub ingest_inflight: usize,

    /// Bytes of record values read and not done per Kafka partition (past
    /// it the partition is paused, as for --kafka-partition-buffer), and
    /// routed at once per stream consumer. A single larger record is still
    /// taken alone.
    #[arg(long, env = "SWITCHBOARD_INGEST_INFLIGHT_BYTES", default_value_t = 1 << 20)]
    pub ingest_inflight_bytes: usize,

    /// Records read and not done per Kafka partition (routed, or waiting
    /// for --ingest-inflight); a partition at it is paused until it is down
    /// to half.
    #[arg(
        long,
        env = "SWITCHBOARD_KAFKA_PARTITION_BUFFER",
        default_value_t = 1000
    )]
    pub kafka_partition_buffer: usize,

    /// Stream malformed entries are copied to (their `v`, and `stream`,
    /// `id`, `error` fields; capped at about 100,000 entries) before they
    /// are acknowledged. Unset: they are only counted and logged.
    #[arg(long, env = "SWITCHBOARD_INGEST_DEAD_LETTER_STREAM")]
    pub ingest_dead_letter_stream: Option<String>,

    /// Kafka brokers to consume records from (`host:port`, comma-separated;
    /// librdkafka's `bootstrap.servers`). With --kafka-topics, every
    /// instance is a member of the consumer group --kafka-group; each
    /// record's value is a `POST /api/v1/publish` body.
    #[arg(long, env = "SWITCHBOARD_KAFKA_BROKERS", value_delimiter = ',')]
    pub kafka_brokers: Vec<String>,

    /// Kafka topics to consume (comma-separated; they must exist).
    #[arg(long, env = "SWITCHBOARD_KAFKA_TOPICS", value_delimiter = ',')]
    pub kafka_topics: Vec<String>,

    /// Kafka consumer group (classic protocol); a new group starts at the
    /// earliest offset.
    #[arg(long, env = "SWITCHBOARD_KAFKA_GROUP", default_value = "switchboard")]
    pub kafka_group: String,

    /// Kafka topic malformed records are produced to (value and key as
    /// they were; headers `source-topic`, `source-partition`,
    /// `source-offset`, `error`). Unset: they are only counted and logged.
    #[arg(long, env = "SWITCHBOARD_KAFKA_DEAD_LETTER_TOPIC")]
    pub kafka_dead_letter_topic: Option<String>,

    /// Kafka group session timeout (`session.timeout.ms`): a member that
    /// died loses its partitions to the others after this long,
    /// milliseconds.
    #[arg(
        long,
        env = "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub kafka_session_timeout_ms: u64,

    /// A librdkafka setting `KEY=VALUE` for the Kafka consumer and the
    /// dead-letter producer (repeatable; in the variable, one per line),
    /// e.g. `security.protocol=SASL_PLAINTEXT`, `sasl.mechanism=PLAIN`,
    /// `sasl.username=…`, `sasl.password=…`. `group.id`,
    /// `bootstrap.servers`, `enable.auto.commit` and
    /// `enable.auto.offset.store` are refused (flags above, or the
    /// delivery guarantee rests on them).
    #[arg(
        long = "kafka-option",
        env = "SWITCHBOARD_KAFKA_OPTION",
        value_delimiter = '\n'
    )]
    pub kafka_option: Vec<String>,
}

/// Where a new consumer group starts (`--ingest-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IngestStart {
    /// From the first entry of the stream (`XGROUP CREATE … 0`): nothing
    /// written before the first instance started is lost.
    Earliest,
    /// From the next entry (`XGROUP CREATE … $`).
    Latest,
}

/// Why a configuration cannot be used.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// `--auth jwt` needs a key to verify tokens with.
    #[error(
        "--auth jwt needs --jwt-secret (or SWITCHBOARD_JWT_SECRET), --jwt-public-key or \
         --jwks-url"
    )]
    MissingJwtSecret,
    /// Two key sources: which one verifies would be ambiguous.
    #[error("--jwt-secret, --jwt-public-key and --jwks-url are mutually exclusive")]
    SeveralJwtKeys,
    /// A `--jwks-url` that is not http(s).
    #[error("--jwks-url must be an http:// or https:// URL")]
    JwksUrl,
    /// Token-based policies with nothing that could sign a token.
    #[error("--{0} token needs --auth jwt")]
    PolicyNeedsJwt(&'static str),
    /// The instance id appears in keys and channel names.
    #[error("invalid --instance-id: {0}")]
    InstanceId(NameError),
    /// The prefix appears in every key and channel name.
    #[error("invalid --redis-prefix: {0}")]
    Prefix(NameError),
    /// A lease shorter than this cannot be refreshed reliably.
    #[error("--lease-ms must be at least 300")]
    LeaseTooShort,
    /// Frames must at least hold a minimal message.
    #[error("--max-frame-bytes must be at least 256")]
    FrameTooSmall,
    /// The outbound queue must hold at least one frame.
    #[error("--outbound-queue must be at least 1")]
    EmptyQueue,
    /// A rate limit needs room for at least one frame.
    #[error("--rate-limit must be >= 0 and --rate-burst >= 1")]
    RateLimit,
    /// Pings must come well before the idle timeout closes a connection.
    #[error("--ping-interval-ms must be at least 100 and below --idle-timeout-ms")]
    Heartbeat,
    /// A queue must hold at least one maximal frame.
    #[error("--outbound-queue-bytes must be at least --max-frame-bytes")]
    QueueBytes,
    /// More connections than the open-files limit can hold.
    #[error(
        "--max-connections {asked} cannot be held: the open-files limit is {open_files} \
         (hard limit, after raising the soft one), which leaves room for {room} connections; \
         lower --max-connections or raise the limit (ulimit -Hn, LimitNOFILE=)"
    )]
    TooManyConnections {
        /// What was asked for.
        asked: usize,
        /// The limit.
        open_files: u64,
        /// What fits.
        room: usize,
    },
    /// An inbox must keep at least one entry for at least a second.
    #[error("--inbox-max-len and --inbox-ttl-s must be at least 1")]
    Inbox,
    /// A `redis+sentinel://` URL that does not name sentinels and a master.
    #[error(transparent)]
    SentinelUrl(switchboard_redis::SentinelUrlError),
    /// Timeouts of zero would fail every command.
    #[error("--redis-connect-timeout-ms and --redis-response-timeout-ms must be at least 10")]
    RedisTimeouts,
    /// A stream needs Redis: the embedded mode has none.
    #[error(
        "--ingest-stream needs Redis: set --redis-url or --redis-cluster (the embedded mode has \
         no streams)"
    )]
    IngestNeedsRedis,
    /// Ingestion settings out of range.
    #[error(
        "--ingest-stream and --ingest-group must not be empty, --ingest-batch and \
         --ingest-inflight must be 1 to 10000, --kafka-partition-buffer 1 to 1000000, \
         --ingest-inflight-bytes at least 1 and --ingest-claim-ms at least 100"
    )]
    IngestSettings,
    /// Kafka settings incomplete or out of range.
    #[error(
        "--kafka-brokers and --kafka-topics go together, --kafka-group must not be empty, \
         --kafka-session-timeout-ms must be at least 1000 and every --kafka-option KEY=VALUE \
         (not group.id, bootstrap.servers, metadata.broker.list, enable.auto.commit, \
         enable.auto.offset.store)"
    )]
    KafkaSettings,
    /// librdkafka refused a `--kafka-option` (unknown key, bad value, or a
    /// security protocol / SASL mechanism this build lacks).
    #[error("--kafka-option: {0}")]
    KafkaOption(String),
}

impl Config {
    /// Where Redis is: `None` in embedded mode.
    pub fn redis_target(&self) -> Option<switchboard_redis::RedisTarget> {
        if !self.redis_cluster.is_empty() {
            return Some(switchboard_redis::RedisTarget::Cluster(
                self.redis_cluster.clone(),
            ));
        }
        // Checked by `validate`; an unparsable one would fail to connect.
        self.redis_url.as_deref().map(|url| {
            switchboard_redis::RedisTarget::from_url(url)
                .unwrap_or_else(|_| switchboard_redis::RedisTarget::Single(url.to_owned()))
        })
    }

    /// Checks cross-field rules clap cannot express and fills the instance id.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.validate_auth()?;
        let id = match self.instance_id.take() {
            Some(id) => id,
            None => default_instance_id(),
        };
        validate_name(&id).map_err(ConfigError::InstanceId)?;
        self.instance_id = Some(id);
        validate_name(&self.redis_prefix).map_err(ConfigError::Prefix)?;
        if self.lease_ms < 300 {
            return Err(ConfigError::LeaseTooShort);
        }
        if self.max_frame_bytes < 256 {
            return Err(ConfigError::FrameTooSmall);
        }
        if self.outbound_queue == 0 {
            return Err(ConfigError::EmptyQueue);
        }
        self.redis_cluster.retain(|seed| !seed.trim().is_empty());
        if let Some(url) = &self.redis_url {
            switchboard_redis::RedisTarget::from_url(url).map_err(ConfigError::SentinelUrl)?;
        }
        if self.inbox_max_len == 0 || self.inbox_ttl_s == 0 {
            return Err(ConfigError::Inbox);
        }
        if !(self.rate_limit >= 0.0 && self.rate_burst >= 1.0) {
            return Err(ConfigError::RateLimit);
        }
        if self.ping_interval_ms < 100 || self.ping_interval_ms >= self.idle_timeout_ms {
            return Err(ConfigError::Heartbeat);
        }
        if self.outbound_queue_bytes < self.max_frame_bytes {
            return Err(ConfigError::QueueBytes);
        }
        if self.redis_connect_timeout_ms < 10 || self.redis_response_timeout_ms < 10 {
            return Err(ConfigError::RedisTimeouts);
        }
        self.allowed_origins.retain(|o| !o.trim().is_empty());
        self.validate_ingest()?;
        self.validate_kafka()?;
        Ok(self)
    }

    /// `--kafka-*`: brokers and topics together (empty entries dropped),
    /// options well formed and not the reserved ones.
    fn validate_kafka(&mut self) -> Result<(), ConfigError> {
        self.kafka_brokers.retain(|b| !b.trim().is_empty());
        self.kafka_topics.retain(|t| !t.trim().is_empty());
        self.kafka_option.retain(|o| !o.trim().is_empty());
        self.kafka_dead_letter_topic.take_if(|t| t.is_empty());
        if self.kafka_brokers.is_empty() && self.kafka_topics.is_empty() {
            return Ok(());
        }
        let options_ok = self.kafka_option.iter().all(|o| {
            o.split_once('=').is_some_and(|(k, _)| {
                !k.trim().is_empty() && !crate::ingest::kafka::RESERVED_OPTIONS.contains(&k.trim())
            })
        });
        if self.kafka_brokers.is_empty()
            || self.kafka_topics.is_empty()
            || self.kafka_group.is_empty()
            || self.kafka_session_timeout_ms < 1000
            || !options_ok
        {
            return Err(ConfigError::KafkaSettings);
        }
        if !self.kafka_option.is_empty() {
            crate::ingest::kafka::check_options(&self.kafka_options())
                .map_err(ConfigError::KafkaOption)?;
        }
        Ok(())
    }

    /// `--kafka-option`s as (key, value) pairs.
    pub fn kafka_options(&self) -> Vec<(String, String)> {
        self.kafka_option
            .iter()
            .filter_map(|o| o.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
            .collect()
    }

    /// Whether the Kafka source is configured.
    pub fn kafka_enabled(&self) -> bool {
        !self.kafka_brokers.is_empty() && !self.kafka_topics.is_empty()
    }

    /// `--ingest-*`: a stream needs Redis; empty names count as absent
    /// for the stream and the dead-letter stream.
    fn validate_ingest(&mut self) -> Result<(), ConfigError> {
        self.ingest_stream.take_if(|s| s.is_empty());
        self.ingest_dead_letter_stream.take_if(|s| s.is_empty());
        if !(1..=10_000).contains(&self.ingest_inflight)
            || self.ingest_inflight_bytes == 0
            || !(1..=1_000_000).contains(&self.kafka_partition_buffer)
        {
            return Err(ConfigError::IngestSettings);
        }
        if self.ingest_stream.is_none() {
            return Ok(());
        }
        if self.redis_url.is_none() && self.redis_cluster.is_empty() {
            return Err(ConfigError::IngestNeedsRedis);
        }
        if self.ingest_group.is_empty()
            || !(1..=10_000).contains(&self.ingest_batch)
            || self.ingest_claim_ms < 100
        {
            return Err(ConfigError::IngestSettings);
        }
        Ok(())
    }

    /// The key source and the token policies: exactly one key with
    /// `--auth jwt`; `token` policies only with `--auth jwt`. Empty values
    /// (an environment variable set to "") count as absent.
    fn validate_auth(&mut self) -> Result<(), ConfigError> {
        self.jwt_secret.take_if(|secret| secret.is_empty());
        self.jwt_public_key
            .take_if(|path| path.as_os_str().is_empty());
        self.jwks_url.take_if(|url| url.trim().is_empty());
        if let Some(url) = &self.jwks_url {
            let http = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !http {
                return Err(ConfigError::JwksUrl);
            }
        }
        match self.auth {
            AuthMode::Jwt => {
                let sources = usize::from(self.jwt_secret.is_some())
                    + usize::from(self.jwt_public_key.is_some())
                    + usize::from(self.jwks_url.is_some());
                match sources {
                    0 => Err(ConfigError::MissingJwtSecret),
                    1 => Ok(()),
                    _ => Err(ConfigError::SeveralJwtKeys),
                }
            }
            AuthMode::None if self.room_auth == Some(RoomAuth::Token) => {
                Err(ConfigError::PolicyNeedsJwt("room-auth"))
            }
            AuthMode::None if self.dm_policy == DmPolicy::Token => {
                Err(ConfigError::PolicyNeedsJwt("dm-policy"))
            }
            AuthMode::None => Ok(()),
        }
    }

    /// `--room-auth` as set, or its default: `token` with `--auth jwt`,
    /// `open` with `--auth none`.
    pub fn room_auth(&self) -> RoomAuth {
        self.room_auth.unwrap_or(match self.auth {
            AuthMode::Jwt => RoomAuth::Token,
            AuthMode::None => RoomAuth::Open,
        })
    }

    /// `--token-expiry-warning-ms` as a duration.
    pub fn token_expiry_warning(&self) -> Duration {
        Duration::from_millis(self.token_expiry_warning_ms)
    }

    /// `--max-connections` as set, or the default of [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }

    /// Fits `--max-connections` to `open_files`, the process's open-files
    /// limit: each connection is a file descriptor, and
    /// [`RESERVED_FILES`] more are needed beside them (the listener, Redis,
    /// plain HTTP requests, refusals, logs). A default is lowered to fit; an
    /// explicit value that cannot fit is an error. Returns the effective value.
    pub fn fit_max_connections(&mut self, open_files: u64) -> Result<usize, ConfigError> {
        let room =
            usize::try_from(open_files.saturating_sub(RESERVED_FILES as u64)).unwrap_or(usize::MAX);
        let fitted = match self.max_connections {
            Some(asked) if asked > room => {
                return Err(ConfigError::TooManyConnections {
                    asked,
                    open_files,
                    room,
                })
            }
            Some(asked) => asked,
            None => DEFAULT_MAX_CONNECTIONS.min(room),
        };
        self.max_connections = Some(fitted);
        Ok(fitted)
    }

    /// Settings that work but that an operator should hear about.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (AuthMode::Jwt, Some(secret)) = (self.auth, &self.jwt_secret) {
            let len = secret.len();
            if len < MIN_HS256_SECRET_BYTES {
                warnings.push(format!(
                    "--jwt-secret is {len} bytes; HS256 needs at least {MIN_HS256_SECRET_BYTES} \
                     random bytes to resist brute force (e.g. `openssl rand -base64 32`)"
                ));
            }
        }
        warnings
    }

    /// The instance id; always set once [`Config::validate`] has run.
    pub fn instance(&self) -> &str {
        self.instance_id.as_deref().unwrap_or("unnamed")
    }

    /// Inbox retention and the idempotency window.
    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            inbox_max_len: self.inbox_max_len,
            inbox_ttl_ms: self.inbox_ttl_s.saturating_mul(1000),
            idempotency_window_ms: self.idempotency_window_s.saturating_mul(1000),
            room_history: self.room_history,
            room_history_ttl_ms: self.room_history_ttl_s.max(1).saturating_mul(1000),
        }
    }

    /// The lease TTL as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// A configuration for tests and embedding: embedded mode, `--auth none`.
    pub fn for_tests(instance: &str) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis_url: None,
            redis_cluster: Vec::new(),
            instance_id: Some(instance.to_owned()),
            routing: RoutingMode::Routed,
            auth: AuthMode::None,
            jwt_secret: None,
            jwt_public_key: None,
            jwks_url: None,
            jwks_min_refresh_ms: 10_000,
            jwks_refresh_s: 300,
            room_auth: None,
            dm_policy: DmPolicy::Any,
            token_expiry_warning_ms: 30_000,
            redis_prefix: "sb".to_owned(),
            max_frame_bytes: 65536,
            lease_ms: 10_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 1 << 20,
            redis_connect_timeout_ms: 1000,
            redis_response_timeout_ms: 2000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 100,
            log_format: LogFormat::Text,
            threads: 0,
            inbox_max_len: 1000,
            inbox_ttl_s: 604_800,
            idempotency_window_s: 300,
            room_history: 100,
            room_history_ttl_s: 86_400,
            jwt_audience: None,
            api_key: None,
            max_body_bytes: 16384,
            rate_limit: 0.0,
            rate_burst: 100.0,
            max_connections: None,
            max_connections_per_user: 16,
            max_rooms_per_connection: 100,
            presence_grace_ms: 2000,
            max_watches_per_connection: 1000,
            max_members_listed: 1000,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            allowed_origins: Vec::new(),
            ingest_stream: None,
            ingest_group: "switchboard".to_owned(),
            ingest_start: IngestStart::Earliest,
            ingest_claim_ms: 30_000,
            ingest_batch: 100,
            ingest_inflight: 64,
            ingest_inflight_bytes: 1 << 20,
            kafka_partition_buffer: 1000,
            ingest_dead_letter_stream: None,
            kafka_brokers: Vec::new(),
            kafka_topics: Vec::new(),
            kafka_group: "switchboard".to_owned(),
            kafka_dead_letter_topic: None,
            kafka_session_timeout_ms: 10_000,
            kafka_option: Vec::new(),
        }
    }
}

/// `switchboard token`: the flags of the development token minter. The key
/// decides the algorithm, as on the server: `--jwt-secret` signs HS256,
/// `--jwt-private-key` RS256 (RSA) or ES256 (EC P-256).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The user the token names (`sub`).
    #[arg(long)]
    pub user: String,

    /// Rooms the connection may join (`rooms`), comma-separated: exact names
    /// or prefix patterns ending in `*` (`lobby,team-42:*`; `*` is every room).
    #[arg(long, value_delimiter = ',', conflicts_with = "room")]
    pub rooms: Vec<String>,

    /// The connection may DM anyone (`dm: true`).
    #[arg(long, conflicts_with = "room")]
    pub dm: bool,

    /// Users the connection may DM (`dm_to`), comma-separated names or
    /// prefix patterns ending in `*`.
    #[arg(long, value_delimiter = ',', conflicts_with = "room")]
    pub dm_to: Vec<String>,

    /// Mint a per-room token for this room (`room`) instead of a connection
    /// token; the client sends it in its `join`.
    #[arg(long)]
    pub room: Option<String>,

    /// Lifetime: `exp` is now plus this (30s, 15m, 1h, 1d).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Audience (`aud`); the server's --jwt-audience by default.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub aud: Option<String>,

    /// HS256 secret (the server's --jwt-secret).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM private key (PKCS#8, or PKCS#1 RSA) whose public half the server
    /// has in --jwt-public-key or its JWKS; takes precedence over
    /// --jwt-secret.
    #[arg(long, env = "SWITCHBOARD_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<PathBuf>,

    /// Key id put in the header (`kid`), for a server using --jwks-url.
    #[arg(long)]
    pub kid: Option<String>,
}

/// `hostname-xxxxxxxx`: readable in logs, unique per process start.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "switchboard".to_owned()
    } else {
        host
    };
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_needs_a_secret() {
        let cfg = Config::try_parse_from(["switchboard"]).expect("parse");
        assert!(matches!(cfg.validate(), Err(ConfigError::MissingJwtSecret)));
    }

    #[test]
    fn an_ingest_stream_needs_redis_and_sane_bounds() {
        let parse = |args: &[&str]| {
            let mut all = vec!["switchboard", "--auth", "none"];
            all.extend_from_slice(args);
            Config::try_parse_from(all).expect("parse").validate()
        };
        assert_eq!(
            parse(&["--ingest-stream", "events"]).err(),
            Some(ConfigError::IngestNeedsRedis)
        );
        let redis = [
            "--redis-url",
            "redis://127.0.0.1:1",
            "--ingest-stream",
            "events",
        ];
        let cfg = parse(&redis).expect("valid");
        assert_eq!(
            (
                cfg.ingest_group.as_str(),
                cfg.ingest_batch,
                cfg.ingest_claim_ms
            ),
            ("switchboard", 100, 30_000)
        );
        assert_eq!(cfg.ingest_start, IngestStart::Earliest);
        for bad in [
            &["--ingest-batch", "0"][..],
            &["--ingest-claim-ms", "5"][..],
            &["--ingest-group", ""][..],
        ] {
            let mut args = redis.to_vec();
            args.extend_from_slice(bad);
            assert_eq!(
                parse(&args).err(),
                Some(ConfigError::IngestSettings),
                "{bad:?}"
            );
        }
        // An empty stream (an unset variable) is no ingestion.
        assert!(parse(&["--ingest-stream", ""]).is_ok());
    }

    #[test]
    fn kafka_flags_go_together_and_refuse_reserved_options() {
        let parse = |args: &[&str]| {
            let mut all = vec!["switchboard", "--auth", "none"];
            all.extend_from_slice(args);
            Config::try_parse_from(all).expect("parse").validate()
        };
        let cfg = parse(&[
            "--kafka-brokers",
            "a:9092,b:9092",
            "--kafka-topics",
            "events",
            "--kafka-option",
            "security.protocol=SASL_PLAINTEXT",
            "--kafka-option",
            "sasl.mechanism=PLAIN",
            "--kafka-option",
            "sasl.username=sb",
            "--kafka-option",
            "sasl.password=a=b",
        ])
        .expect("valid");
        assert!(cfg.kafka_enabled());
        assert_eq!(cfg.kafka_brokers, ["a:9092", "b:9092"]);
        assert_eq!(
            (cfg.kafka_group.as_str(), cfg.kafka_session_timeout_ms),
            ("switchboard", 10_000)
        );
        assert_eq!(
            cfg.kafka_options(),
            [
                ("security.protocol".to_owned(), "SASL_PLAINTEXT".to_owned()),
                ("sasl.mechanism".to_owned(), "PLAIN".to_owned()),
                ("sasl.username".to_owned(), "sb".to_owned()),
                ("sasl.password".to_owned(), "a=b".to_owned())
            ]
        );
        for bad in [
            &["--kafka-brokers", "a:9092"][..],
            &["--kafka-topics", "events"][..],
            &[
                "--kafka-brokers",
                "a:1",
                "--kafka-topics",
                "t",
                "--kafka-option",
                "group.id=x",
            ][..],
            &[
                "--kafka-brokers",
                "a:1",
                "--kafka-topics",
                "t",
                "--kafka-option",
                "novalue",
            ][..],
            &[
                "--kafka-brokers",
                "a:1",
                "--kafka-topics",
                "t",
                "--kafka-session-timeout-ms",
                "5",
            ][..],
        ] {
            assert_eq!(
                parse(bad).err(),
                Some(ConfigError::KafkaSettings),
                "{bad:?}"
            );
        }
        assert!(!parse(&["--kafka-brokers", ""])
            .expect("valid")
            .kafka_enabled());
        // TLS and SCRAM are built in (OpenSSL); Kerberos and unknown keys
        // are refused at start-up.
        for options in [
            &["security.protocol=ssl"][..],
            &[
                "security.protocol=sasl_ssl",
                "sasl.mechanism=SCRAM-SHA-512",
                "sasl.username=u",
                "sasl.password=p",
            ],
        ] {
            let mut args = vec!["--kafka-brokers", "a:1", "--kafka-topics", "t"];
            for option in options {
                args.extend(["--kafka-option", option]);
            }
            let parsed = parse(&args);
            assert!(parsed.is_ok(), "{options:?}: {parsed:?}");
        }
        for (option, says) in [
            ("sasl.mechanism=GSSAPI", "GSSAPI"),
            ("no.such.option=1", "no.such.option"),
        ] {
            match parse(&[
                "--kafka-brokers",
                "a:1",
                "--kafka-topics",
                "t",
                "--kafka-option",
                "security.protocol=sasl_plaintext",
                "--kafka-option",
                option,
            ]) {
                Err(ConfigError::KafkaOption(e)) => assert!(e.contains(says), "{option}: {e}"),
                other => panic!("{option}: {other:?}"),
            }
        }
    }

    #[test]
    fn default_instance_ids_are_unique_and_valid() {
        let a = default_instance_id();
        let b = default_instance_id();
        assert_ne!(a, b);
        validate_name(&a).expect("valid");
    }

    #[test]
    fn flags_parse() {
        let cfg = Config::try_parse_from([
            "switchboard",
            "--auth",
            "none",
            "--routing",
            "broadcast",
            "--instance-id",
            "i1",
            "--listen",
            "127.0.0.1:9000",
        ])
        .expect("parse")
        .validate()
        .expect("valid");
        assert_eq!(cfg.routing, RoutingMode::Broadcast);
        assert_eq!(cfg.instance(), "i1");
        assert_eq!(cfg.listen.port(), 9000);
    }

    #[test]
    fn a_short_jwt_secret_is_warned_about() {
        let parse = |secret: &str| {
            Config::try_parse_from(["switchboard", "--jwt-secret", secret])
                .expect("parse")
                .validate()
                .expect("valid")
        };
        assert_eq!(parse("s3cret").warnings().len(), 1);
        assert!(parse(&"k".repeat(32)).warnings().is_empty());
    }

    #[test]
    fn exactly_one_jwt_key_source() {
        let validate = |args: &[&str]| {
            let mut argv = vec!["switchboard"];
            argv.extend_from_slice(args);
            Config::try_parse_from(argv).expect("parse").validate()
        };
        let url = "https://idp.example/.well-known/jwks.json";
        assert!(validate(&["--jwt-secret", "s"]).is_ok());
        assert!(validate(&["--jwt-public-key", "/etc/key.pem"]).is_ok());
        assert!(validate(&["--jwks-url", url]).is_ok());
        assert!(validate(&["--jwks-url", "http://127.0.0.1:9/jwks"]).is_ok());
        for several in [
            &["--jwt-secret", "s", "--jwt-public-key", "/k.pem"][..],
            &["--jwt-secret", "s", "--jwks-url", url],
            &["--jwt-public-key", "/k.pem", "--jwks-url", url],
        ] {
            assert!(
                matches!(validate(several), Err(ConfigError::SeveralJwtKeys)),
                "{several:?}"
            );
        }
        assert!(matches!(
            validate(&["--jwt-secret", ""]),
            Err(ConfigError::MissingJwtSecret)
        ));
        for bad in ["ftp://idp/jwks", "idp.example/jwks", "file:///jwks.json"] {
            assert!(
                matches!(validate(&["--jwks-url", bad]), Err(ConfigError::JwksUrl)),
                "{bad}"
            );
        }
        // No secret, so no short-secret warning.
        let cfg = validate(&["--jwt-public-key", "/k.pem"]).expect("valid");
        assert!(cfg.warnings().is_empty());
        assert_eq!(cfg.jwks_min_refresh_ms, 10_000);
        assert_eq!(cfg.jwks_refresh_s, 300);
    }

    #[test]
    fn token_policies() {
        let validate = |args: &[&str]| {
            let mut argv = vec!["switchboard"];
            argv.extend_from_slice(args);
            Config::try_parse_from(argv).expect("parse").validate()
        };
        let jwt = validate(&["--jwt-secret", "s"]).expect("valid");
        assert_eq!(jwt.room_auth(), RoomAuth::Token);
        assert_eq!(jwt.dm_policy, DmPolicy::Any);
        assert_eq!(jwt.token_expiry_warning(), Duration::from_secs(30));
        let none = validate(&["--auth", "none"]).expect("valid");
        assert_eq!(none.room_auth(), RoomAuth::Open);
        let open = validate(&["--jwt-secret", "s", "--room-auth", "open"]).expect("valid");
        assert_eq!(open.room_auth(), RoomAuth::Open);
        let strict = validate(&[
            "--jwt-secret",
            "s",
            "--dm-policy",
            "token",
            "--token-expiry-warning-ms",
            "5000",
        ])
        .expect("valid");
        assert_eq!(strict.dm_policy, DmPolicy::Token);
        assert_eq!(strict.token_expiry_warning(), Duration::from_secs(5));
        assert!(matches!(
            validate(&["--auth", "none", "--room-auth", "token"]),
            Err(ConfigError::PolicyNeedsJwt("room-auth"))
        ));
        assert!(matches!(
            validate(&["--auth", "none", "--dm-policy", "token"]),
            Err(ConfigError::PolicyNeedsJwt("dm-policy"))
        ));
        assert!(validate(&["--auth", "none", "--room-auth", "open"]).is_ok());
        assert_eq!(Config::for_tests("i1").room_auth(), RoomAuth::Open);
    }

    #[test]
    fn max_connections_fit_the_open_files_limit() {
        let mut cfg = Config::for_tests("i1");
        assert_eq!(cfg.fit_max_connections(20_000), Ok(20_000 - RESERVED_FILES));
        let mut cfg = Config::for_tests("i1");
        assert_eq!(
            cfg.fit_max_connections(1 << 20),
            Ok(DEFAULT_MAX_CONNECTIONS)
        );
        let mut cfg = Config::for_tests("i1");
        cfg.max_connections = Some(19_000);
        assert_eq!(cfg.fit_max_connections(20_000), Ok(19_000));
        cfg.max_connections = Some(19_900);
        assert!(matches!(
            cfg.fit_max_connections(20_000),
            Err(ConfigError::TooManyConnections { room: 19_744, .. })
        ));
    }

    #[test]
    fn routing_modes_parse_by_name() {
        for mode in RoutingMode::ALL {
            let cfg = Config::try_parse_from(["switchboard", "--routing", mode.as_str()]);
            assert_eq!(cfg.expect("parse").routing, mode);
        }
        assert!(Config::try_parse_from(["switchboard", "--routing", "nope"]).is_err());
    }

    #[test]
    fn bad_instance_id_is_refused() {
        let cfg = Config::try_parse_from(["switchboard", "--auth", "none", "--instance-id", "a b"])
            .expect("parse");
        assert!(matches!(cfg.validate(), Err(ConfigError::InstanceId(_))));
    }
}
