//! Queue ingestion from Kafka (issue 15, `--kafka-brokers`), end to end on
//! a real Tansu broker: keyed records (key = user id) to online and
//! offline users arrive once each, in per-user order (offline ones on
//! connect); poison records neither stall the partition nor reach the log,
//! and are produced to the dead-letter topic; a restarted consumer resumes
//! from the committed offsets; two consuming instances, one SIGKILLed
//! mid-way: every record reaches its user exactly once after `seq`
//! de-duplication, in per-user order.
//!
//! Real Tansu, redis-server, instance processes and WebSocket clients; the
//! test produces with rdkafka like any producer would. Tansu holds a new
//! group's first join ≈5 s and a rebalance ≈6 s: the tests wait for
//! assignments (the consumer's log lines) and deliveries, never sleep.
//! The users of the kill test's records are drawn from a seeded
//! generator: the seed is printed, `SB_INGEST_SEED=<seed>` replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use switchboard_testkit::{
    eventually, numbered_bodies, opts, Client, Incoming, Instance, Opts, RedisServer, Tansu,
    RECV_TIMEOUT,
};

const TOPIC: &str = "events";
const DELIVERED: &str = r#"switchboard_ingest_records_total{source="kafka",outcome="delivered"}"#;
const MALFORMED: &str = r#"switchboard_ingest_records_total{source="kafka",outcome="malformed"}"#;
const ASSIGNED: &str = "kafka partitions assigned";
const LEASE_MS: u64 = 1000;
/// Time for a first group join (≈5 s on Tansu) plus deliveries.
const JOIN: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    let seed = std::env::var("SB_INGEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("SB_INGEST_SEED={seed}");
    seed
}

/// Numbered records (`{"user":U,"body":{"n":N}}`, N from 1, key U) and
/// what was sent to whom.
struct Producer {
    n: u64,
    producer: FutureProducer,
    sent: BTreeMap<String, Vec<u64>>,
}

impl Producer {
    fn new(tansu: &Tansu) -> Producer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", tansu.brokers())
            .set("acks", "all")
            .set("linger.ms", "5");
        if let Some(ca) = tansu.ca_path() {
            config
                .set("security.protocol", "ssl")
                .set("ssl.ca.location", ca.display().to_string());
        }
        let producer = config.create().expect("a kafka producer");
        Producer {
            n: 0,
            producer,
            sent: BTreeMap::new(),
        }
    }

    /// Produces `value` with `key` to `topic`.
    async fn send(&self, topic: &str, key: &str, value: &str) {
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    /// The next record, to `user` (keyed by the user).
    async fn record_for(&mut self, user: &str) {
        self.n += 1;
        self.sent.entry(user.to_owned()).or_default().push(self.n);
        let value = json!({"user": user, "body": {"n": self.n}}).to_string();
        self.send(TOPIC, user, &value).await;
    }

    /// Records to each of `users`, in this order, enqueued at once (the
    /// producer keeps their order per partition), then awaited.
    async fn records_for(&mut self, users: &[&str]) {
        let mut pending = Vec::with_capacity(users.len());
        for user in users {
            self.n += 1;
            self.sent
                .entry((*user).to_owned())
                .or_default()
                .push(self.n);
            let value = json!({"user": user, "body": {"n": self.n}}).to_string();
            let record = FutureRecord::to(TOPIC).key(*user).payload(&value);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => panic!("enqueueing a record: {e}"),
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => panic!("producing a record: {e}"),
                Err(e) => panic!("producing a record: {e}"),
            }
        }
    }

    /// What `user` was sent, in order.
    fn sent_to(&self, user: &str) -> Vec<u64> {
        self.sent.get(user).cloned().unwrap_or_default()
    }
}

/// An instance consuming [`TOPIC`] in `group`, with `flags`.
fn consumer(
    id: &str,
    tansu: &Tansu,
    redis: &RedisServer,
    group: &str,
    flags: &[(&str, &str)],
) -> Opts {
    let mut opts = opts!(id)
        .redis(redis)
        .lease_ms(LEASE_MS)
        .log_level("warn,switchboard::ingest::kafka=debug")
        .flag("--kafka-brokers", tansu.brokers())
        .flag("--kafka-topics", TOPIC)
        .flag("--kafka-group", group)
        .flag("--kafka-session-timeout-ms", "6000");
    for (flag, value) in flags {
        opts = opts.flag(flag, value);
    }
    opts
}

/// Connects once and leaves: the user is "seen", so DMs to them are stored.
async fn seen(instance: &Instance, user: &str) {
    let mut client = Client::connect_user(instance, user).await;
    client.request(json!({"type": "ping"})).await;
    client.close().await;
}

/// Waits until `instance` logged `n` assignments.
async fn assigned(instance: &Instance, n: usize, within: Duration) {
    eventually(within, "the consumer is assigned partitions", || async {
        instance.full_log().matches(ASSIGNED).count() >= n
    })
    .await;
}

/// Waits until `instance` counted `n` delivered records.
async fn delivered(instance: &Instance, n: f64, within: Duration) {
    eventually(within, "the records are delivered", || async {
        instance.metric(DELIVERED).await >= n
    })
    .await;
}

/// Reads dm frames until the reply to a ping: what arrived by then.
async fn frames_until_ping(client: &mut Client, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    client
        .send_json(&json!({"type": "ping", "id": "end"}))
        .await;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Incoming::Json(frame) if frame["id"] == "end" => return frames,
            Incoming::Json(frame) if frame["type"] == "dm" => frames.push(frame),
            Incoming::Json(_) => {}
            other => panic!("{} frames, then {other:?}", frames.len()),
        }
    }
}

/// Records produced before the consumer joined (a new group starts at the
/// earliest offset) and after: the online user gets hers live, the offline
/// one his on connect, once each, in per-user order, from `ingest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_reach_online_and_offline_users_once_in_order() {
    let (tansu, redis) = tokio::join!(Tansu::start(), RedisServer::start());
    tansu.create_topic(TOPIC, 4).await;
    let mut producer = Producer::new(&tansu);
    for i in 0..20 {
        producer
            .record_for(if i % 2 == 0 { "alice" } else { "bob" })
            .await;
    }
    let ingest = Instance::spawn(consumer("k1", &tansu, &redis, "g1", &[])).await;
    seen(&ingest, "bob").await;
    let mut alice = Client::connect_user(&ingest, "alice").await;
    assigned(&ingest, 1, JOIN).await;
    for i in 0..20 {
        producer
            .record_for(if i % 2 == 0 { "alice" } else { "bob" })
            .await;
    }
    delivered(&ingest, 40.0, JOIN).await;

    let got = frames_until_ping(&mut alice, RECV_TIMEOUT).await;
    assert_eq!(
        numbered_bodies(&got),
        producer.sent_to("alice"),
        "alice: once each, in order"
    );
    assert!(got.iter().all(|d| d["from"] == "ingest"), "{got:?}");
    let mut bob = Client::connect_user(&ingest, "bob").await;
    let got = frames_until_ping(&mut bob, RECV_TIMEOUT).await;
    assert_eq!(
        numbered_bodies(&got),
        producer.sent_to("bob"),
        "bob on connect: once each, in order"
    );
    assert_eq!(ingest.metric(DELIVERED).await, 40.0);
    assert_eq!(ingest.metric(MALFORMED).await, 0.0);
}

/// Poison records (not JSON, an array, a bad name, a body over
/// --max-body-bytes) between good ones of the same key: counted, logged
/// without their value, produced to the dead-letter topic (value and key
/// as they were, headers naming where they came from and why), skipped;
/// the records after them are delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_do_not_block_and_reach_the_dead_letter_topic() {
    let (tansu, redis) = tokio::join!(Tansu::start(), RedisServer::start());
    tansu.create_topic(TOPIC, 2).await;
    tansu.create_topic("dead", 1).await;
    let ingest = Instance::spawn(consumer(
        "k2",
        &tansu,
        &redis,
        "g2",
        &[
            ("--kafka-dead-letter-topic", "dead"),
            ("--max-body-bytes", "64"),
        ],
    ))
    .await;
    let mut alice = Client::connect_user(&ingest, "alice").await;
    let producer = Producer::new(&tansu);
    let good = |n: u64| json!({"user": "alice", "body": {"n": n}}).to_string();
    let secret = "SECRET-poison-7f3a";
    let poison = [
        format!("not json {secret}"),
        format!("[\"alice\", \"{secret}\"]"),
        json!({"user": "a b", "body": secret}).to_string(),
        json!({"user": "alice", "body": secret.repeat(8)}).to_string(),
    ];
    producer.send(TOPIC, "alice", &good(1)).await;
    for value in &poison {
        producer.send(TOPIC, "alice", value).await;
    }
    producer.send(TOPIC, "alice", &good(2)).await;
    producer.send(TOPIC, "alice", &good(3)).await;

    let got = alice.distinct_dms(3, JOIN).await;
    assert_eq!(
        numbered_bodies(&got),
        [1, 2, 3],
        "the records after the poison, in order"
    );
    eventually(Duration::from_secs(10), "the poison is counted", || async {
        ingest.metric(MALFORMED).await == 4.0
    })
    .await;
    assert_eq!(ingest.metric(DELIVERED).await, 3.0);

    // The dead-letter topic, read by partition (no group join).
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("group.id", "dead-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a kafka consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("dead", 0, Offset::Beginning)
        .expect("partition");
    reader.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dead = Vec::new();
    while dead.len() < poison.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} dead letters",
            dead.len(),
            poison.len()
        );
        let polled = tokio::task::block_in_place(|| reader.poll(Duration::from_millis(200)));
        if let Some(message) = polled {
            let message = message.expect("a dead letter");
            let headers: BTreeMap<String, String> = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            dead.push((
                message.key().map(|k| k.to_vec()),
                String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                headers,
            ));
        }
    }
    let offsets: BTreeSet<&str> = dead
        .iter()
        .map(|(_, _, h)| h["source-offset"].as_str())
        .collect();
    assert_eq!(offsets.len(), poison.len(), "distinct offsets: {dead:?}");
    for ((key, value, headers), want) in dead.iter().zip(&poison) {
        assert_eq!(key.as_deref(), Some(&b"alice"[..]));
        assert_eq!(value, want);
        assert_eq!(headers["source-topic"], TOPIC, "{headers:?}");
        assert!(
            headers["source-partition"].parse::<i32>().is_ok(),
            "{headers:?}"
        );
        assert!(!headers["error"].is_empty(), "{headers:?}");
    }
    let log = ingest.full_log();
    assert!(log.contains("malformed record"), "{log}");
    assert!(!log.contains(secret), "a value reached the log:\n{log}");
}

/// A consumer stopped after delivering a first batch commits its offsets;
/// a new one in the same group resumes after them: nothing delivered
/// twice, nothing lost, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_from_the_committed_offsets() {
    let (tansu, redis) = tokio::join!(Tansu::start(), RedisServer::start());
    tansu.create_topic(TOPIC, 2).await;
    let mut producer = Producer::new(&tansu);
    let mut first = Instance::spawn(consumer("k3a", &tansu, &redis, "g3", &[])).await;
    seen(&first, "bob").await;
    for _ in 0..20 {
        producer.record_for("bob").await;
    }
    delivered(&first, 20.0, JOIN).await;
    // SIGTERM: the stored offsets are committed and the member leaves.
    let stopping = Instant::now();
    first.terminate(Duration::from_secs(15)).await;
    println!("the first consumer stopped in {:?}", stopping.elapsed());
    for _ in 0..20 {
        producer.record_for("bob").await;
    }
    let second = Instance::spawn(consumer("k3b", &tansu, &redis, "g3", &[])).await;
    delivered(&second, 20.0, JOIN).await;
    let mut bob = Client::connect_user(&second, "bob").await;
    let got = frames_until_ping(&mut bob, RECV_TIMEOUT).await;
    let seqs: BTreeSet<&str> = got.iter().filter_map(|f| f["seq"].as_str()).collect();
    assert_eq!(seqs.len(), got.len(), "no seq twice");
    assert_eq!(
        numbered_bodies(&got),
        producer.sent_to("bob"),
        "each once, in order"
    );
    assert_eq!(
        second.metric(DELIVERED).await,
        20.0,
        "the second consumer resumed after the committed offsets"
    );
}

/// The issue's scale: 10,000 keyed records for 200 users, half of them
/// offline, two consuming instances of which one is SIGKILLed mid-way; the
/// online users are connected to a third instance that does not consume.
/// The victim's partitions go to the survivor (after the session
/// timeout), which resumes from the committed offsets: every record
/// reaches its user (live, or from the inbox on connect) exactly once
/// after seq de-duplication, in per-user order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_members_partitions_are_taken_over_exactly_once_in_order() {
    const USERS: usize = 200;
    const RECORDS: usize = 10_000;
    let seed = seed();
    let (tansu, redis) = tokio::join!(Tansu::start(), RedisServer::start());
    tansu.create_topic(TOPIC, 4).await;
    let (mut victim, survivor, edge) = tokio::join!(
        Instance::spawn(consumer("k4a", &tansu, &redis, "g4", &[])),
        Instance::spawn(consumer("k4b", &tansu, &redis, "g4", &[])),
        Instance::spawn(opts!("k4c").redis(&redis).lease_ms(LEASE_MS)),
    );
    let users: Vec<String> = (0..USERS).map(|u| format!("u{u}")).collect();
    for user in &users {
        seen(&edge, user).await;
    }
    let mut online = Vec::new();
    for user in &users[..USERS / 2] {
        online.push(Client::connect_user(&edge, user).await);
    }
    // Both members hold partitions (the second join rebalanced the first).
    eventually(
        Duration::from_secs(40),
        "both members are assigned",
        || async {
            let (v, s) = (victim.full_log(), survivor.full_log());
            v.contains(ASSIGNED) && s.contains(ASSIGNED)
        },
    )
    .await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut producer = Producer::new(&tansu);
    let mut draw = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| users[rng.random_range(0..users.len())].clone())
            .collect()
    };
    let first: Vec<String> = draw(RECORDS / 2);
    producer
        .records_for(&first.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    eventually(Duration::from_secs(20), "the victim delivers", || async {
        victim.metric(DELIVERED).await >= 200.0
    })
    .await;
    let at_kill = victim.metric(DELIVERED).await;
    victim.sigkill();
    println!("the victim had delivered {at_kill} records when SIGKILLed");
    let second: Vec<String> = draw(RECORDS - RECORDS / 2);
    producer
        .records_for(&second.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let within = Duration::from_secs(90);
    for (client, user) in online.iter_mut().zip(&users[..USERS / 2]) {
        let want = producer.sent_to(user);
        let got = client.distinct_dms(want.len(), within).await;
        assert_eq!(
            numbered_bodies(&got),
            want,
            "{user} (online): each once after seq de-dup, in order"
        );
    }
    for user in &users[USERS / 2..] {
        // The inbox on connect, then (if the takeover is still going) live.
        let mut client = Client::connect_user(&edge, user).await;
        let want = producer.sent_to(user);
        let got = client.distinct_dms(want.len(), within).await;
        assert_eq!(
            numbered_bodies(&got),
            want,
            "{user} (offline): each once after seq de-dup, in order"
        );
    }
    let total: usize = users.iter().map(|u| producer.sent_to(u).len()).sum();
    assert_eq!(total, RECORDS);
    println!(
        "the survivor delivered {} of {RECORDS} records",
        survivor.metric(DELIVERED).await
    );
}

/// `--ingest-inflight 4 --kafka-partition-buffer 8`: four records routed
/// at once, a partition with eight read and not done is paused and resumed
/// at four (counted); every record still arrives once, in per-user order,
/// and the partition's lag series drains to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_is_paused_and_resumed_without_loss() {
    let (tansu, redis) = tokio::join!(Tansu::start(), RedisServer::start());
    tansu.create_topic(TOPIC, 1).await;
    let ingest = Instance::spawn(consumer(
        "k5",
        &tansu,
        &redis,
        "g5",
        &[
            ("--ingest-inflight", "4"),
            ("--kafka-partition-buffer", "8"),
        ],
    ))
    .await;
    let users: Vec<String> = (0..10).map(|u| format!("p{u}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push(Client::connect_user(&ingest, user).await);
    }
    assigned(&ingest, 1, JOIN).await;
    let mut producer = Producer::new(&tansu);
    let order: Vec<&str> = (0..500).map(|i| users[i % users.len()].as_str()).collect();
    producer.records_for(&order).await;
    for (client, user) in clients.iter_mut().zip(&users) {
        let want = producer.sent_to(user);
        let got = client.distinct_dms(want.len(), JOIN).await;
        assert_eq!(numbered_bodies(&got), want, "{user}: once each, in order");
    }
    assert_eq!(ingest.metric(DELIVERED).await, 500.0);
    let paused = r#"switchboard_ingest_paused_total{source="kafka"}"#;
    assert!(
        ingest.metric(paused).await >= 1.0,
        "the partition was paused"
    );
    let lag = format!(r#"switchboard_ingest_partition_lag{{topic="{TOPIC}",partition="0"}}"#);
    eventually(
        Duration::from_secs(10),
        "the partition's lag is 0",
        || async { ingest.metric(&lag).await == 0.0 },
    )
    .await;
    assert_eq!(
        ingest
            .metric(r#"switchboard_ingest_in_flight{source="kafka"}"#)
            .await,
        0.0
    );
}

/// A broker reachable only over TLS (verified against its certificate,
/// host name included): `--kafka-option security.protocol=ssl` and
/// `ssl.ca.location` are all it takes; records arrive once, in order. The
/// same instance without the CA cannot verify the broker and delivers
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_behind_tls_is_consumed_with_its_ca() {
    let (tansu, redis) = tokio::join!(Tansu::start_tls(), RedisServer::start());
    tansu.create_topic(TOPIC, 2).await;
    let ca = tansu
        .ca_path()
        .expect("a TLS broker has a CA")
        .display()
        .to_string();
    let untrusting = Instance::spawn(consumer(
        "k6a",
        &tansu,
        &redis,
        "g6a",
        &[("--kafka-option", "security.protocol=ssl")],
    ))
    .await;
    let ingest = Instance::spawn(consumer(
        "k6",
        &tansu,
        &redis,
        "g6",
        &[
            ("--kafka-option", "security.protocol=ssl"),
            ("--kafka-option", &format!("ssl.ca.location={ca}")),
        ],
    ))
    .await;
    let mut bob = Client::connect_user(&ingest, "bob").await;
    assigned(&ingest, 1, JOIN).await;
    let mut producer = Producer::new(&tansu);
    producer.records_for(&["bob"; 20]).await;
    let got = bob.distinct_dms(20, JOIN).await;
    assert_eq!(
        numbered_bodies(&got),
        producer.sent_to("bob"),
        "once each, in order"
    );
    assert_eq!(ingest.metric(DELIVERED).await, 20.0);
    assert_eq!(untrusting.metric(DELIVERED).await, 0.0);
    let log = untrusting.full_log();
    assert!(
        log.to_lowercase().contains("certificate verify failed"),
        "the untrusting instance says why:\n{log}"
    );
}
