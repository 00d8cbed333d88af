//! Queue ingestion from a Redis stream (issue 15, `--ingest-stream`), end
//! to end: records to online and offline users (a group created at the
//! start of the stream, records routed across instances, offline users
//! get theirs on connect, once, in order), poison entries that neither
//! stall the stream nor reach the log (and are copied to the dead-letter
//! stream), an instance SIGKILLed holding unacknowledged entries (a
//! survivor claims them after `--ingest-claim-ms`; every record reaches
//! its user exactly once after `seq` de-duplication), and a restarted
//! consumer that resumes after what it acknowledged (its own pending
//! entries first, then new ones, in order).
//!
//! Real redis-server, real instance processes, real WebSocket clients.
//! The test produces with `XADD` like any producer would. The user each
//! record goes to is drawn from a seeded generator: the seed is printed,
//! `SB_INGEST_SEED=<seed>` replays it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchboard_testkit::{
    eventually, numbered_bodies, opts, Client, Incoming, Instance, Opts, RedisCluster, RedisServer,
    RECV_TIMEOUT,
};

const STREAM: &str = "events";
const GROUP: &str = "switchboard";
const DELIVERED: &str = r#"switchboard_ingest_records_total{source="stream",outcome="delivered"}"#;
const MALFORMED: &str = r#"switchboard_ingest_records_total{source="stream",outcome="malformed"}"#;
const LAG: &str = r#"switchboard_ingest_lag{source="stream"}"#;
const CLAIMED: &str = "switchboard_ingest_claimed_total";
/// Lease of every instance here: a restarted instance id waits for its
/// killed predecessor's lease at most this long.
const LEASE_MS: u64 = 1000;

fn seed() -> u64 {
    let seed = std::env::var("SB_INGEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("SB_INGEST_SEED={seed}");
    seed
}

/// Numbered records (`{"user":U,"body":{"n":N}}`, N from 1) and what was
/// sent to whom.
struct Producer {
    n: u64,
    rng: StdRng,
    users: Vec<String>,
    sent: BTreeMap<String, Vec<u64>>,
}

impl Producer {
    fn new(users: &[&str], seed: u64) -> Producer {
        Producer {
            n: 0,
            rng: StdRng::seed_from_u64(seed),
            users: users.iter().map(|u| u.to_string()).collect(),
            sent: BTreeMap::new(),
        }
    }

    /// The next record, to `user`.
    fn record_for(&mut self, user: &str) -> String {
        self.n += 1;
        self.sent.entry(user.to_owned()).or_default().push(self.n);
        json!({"user": user, "body": {"n": self.n}}).to_string()
    }

    /// The next record, to a user drawn at random.
    fn record(&mut self) -> String {
        let user = self.users[self.rng.random_range(0..self.users.len())].clone();
        self.record_for(&user)
    }

    /// What `user` was sent, in order.
    fn sent_to(&self, user: &str) -> Vec<u64> {
        self.sent.get(user).cloned().unwrap_or_default()
    }
}

/// An instance consuming [`STREAM`] with `flags`.
fn consumer(id: &str, redis: &RedisServer, flags: &[(&str, &str)]) -> Opts {
    let mut opts = opts!(id)
        .redis(redis)
        .lease_ms(LEASE_MS)
        .flag("--ingest-stream", STREAM);
    for (flag, value) in flags {
        opts = opts.flag(flag, value);
    }
    opts
}

async fn xadd(redis: &RedisServer, value: &str) -> String {
    redis.cmd(&["XADD", STREAM, "*", "v", value]).await
}

/// Connects once and leaves: the user is "seen", so DMs to them are stored.
async fn seen(instance: &Instance, user: &str) {
    let mut client = Client::connect_user(instance, user).await;
    client.request(json!({"type": "ping"})).await;
    client.close().await;
}

/// `XPENDING stream group`: count, smallest and greatest id, consumers.
type PendingSummary = (
    i64,
    Option<String>,
    Option<String>,
    Option<Vec<(String, String)>>,
);

/// Entries of the group not yet acknowledged.
async fn pending(redis: &RedisServer) -> i64 {
    let (count, ..): PendingSummary = redis.cmd(&["XPENDING", STREAM, GROUP]).await;
    count
}

/// Entries pending in one consumer.
async fn pending_of(redis: &RedisServer, consumer: &str) -> usize {
    let entries: Vec<(String, String, i64, i64)> = redis
        .cmd(&["XPENDING", STREAM, GROUP, "-", "+", "100000", consumer])
        .await;
    entries.len()
}

/// `entries-read` of the group: entries delivered to it so far.
async fn entries_read(redis: &RedisServer) -> i64 {
    let groups: Vec<HashMap<String, Option<String>>> =
        redis.cmd(&["XINFO", "GROUPS", STREAM]).await;
    groups
        .iter()
        .find(|g| g.get("name").cloned().flatten().as_deref() == Some(GROUP))
        .and_then(|g| g.get("entries-read").cloned().flatten())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entries-read for {GROUP} in {groups:?}"))
}

/// Waits until every entry of the stream is acknowledged by the group
/// (nothing undelivered, nothing pending), as `instance`'s lag gauge says
/// and XPENDING confirms.
async fn drained(redis: &RedisServer, instance: &Instance, within: Duration) {
    eventually(within, "the stream is drained (lag 0)", || async {
        instance.metric(LAG).await == 0.0 && pending(redis).await == 0
    })
    .await;
}

/// Reads dm and room frames until the reply to a ping: what arrived by then
/// (every record was delivered before the ping is sent, so nothing is
/// missing but what was never queued).
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
            Incoming::Json(frame) if frame["type"] == "dm" || frame["type"] == "room" => {
                frames.push(frame)
            }
            Incoming::Json(_) => {}
            other => panic!("{} frames, then {other:?}", frames.len()),
        }
    }
}

/// Records before the first instance starts (the group begins at the
/// start of the stream) and after: an online user on another instance gets
/// hers live and across instances, an offline one gets his on connect,
/// once each, in stream order; `from` defaults to `ingest`; a room record
/// reaches the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_online_and_offline_users_once_in_order() {
    let redis = RedisServer::start().await;
    let front = Instance::spawn(opts!("front").redis(&redis).lease_ms(LEASE_MS)).await;
    seen(&front, "alice").await;
    seen(&front, "bob").await;
    let mut producer = Producer::new(&["alice", "bob"], 0);
    // Before any consumer (and before the stream exists).
    for i in 0..20 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        xadd(&redis, &producer.record_for(user)).await;
    }
    let ingest = Instance::spawn(consumer("ing1", &redis, &[])).await;
    let mut alice = Client::connect_user(&front, "alice").await;
    let joined = alice
        .request(json!({"type": "join", "room": "lobby", "events": false}))
        .await;
    assert_eq!(joined["status"], "ok", "{joined}");
    for i in 0..20 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        xadd(&redis, &producer.record_for(user)).await;
    }
    xadd(
        &redis,
        &json!({"user": "alice", "body": {"n": 1000}, "from": "tickets"}).to_string(),
    )
    .await;
    xadd(
        &redis,
        &json!({"room": "lobby", "body": {"n": 2000}}).to_string(),
    )
    .await;
    drained(&redis, &ingest, Duration::from_secs(10)).await;
    assert_eq!(ingest.metric(DELIVERED).await, 42.0);
    assert_eq!(ingest.metric(MALFORMED).await, 0.0);

    let got = frames_until_ping(&mut alice, RECV_TIMEOUT).await;
    let dms: Vec<Value> = got.iter().filter(|f| f["type"] == "dm").cloned().collect();
    let mut want = producer.sent_to("alice");
    want.push(1000);
    assert_eq!(
        numbered_bodies(&dms),
        want,
        "alice: each once, in stream order"
    );
    assert!(dms[..dms.len() - 1].iter().all(|d| d["from"] == "ingest"));
    assert_eq!(dms[dms.len() - 1]["from"], "tickets");
    let rooms: Vec<&Value> = got.iter().filter(|f| f["type"] == "room").collect();
    assert_eq!(rooms.len(), 1, "one room message: {rooms:?}");
    assert_eq!(
        (&rooms[0]["room"], &rooms[0]["from"], &rooms[0]["body"]["n"]),
        (&json!("lobby"), &json!("ingest"), &json!(2000))
    );

    let mut bob = Client::connect_user(&front, "bob").await;
    let got = frames_until_ping(&mut bob, RECV_TIMEOUT).await;
    assert_eq!(
        numbered_bodies(&got),
        producer.sent_to("bob"),
        "bob on connect: each once, in order"
    );
}

/// Entries that are not records (no `v`, not JSON, an array, a bad name, a
/// body over --max-body-bytes, a key on a room message) are counted,
/// logged without their value, copied to the dead-letter stream and
/// acknowledged; the records after them are delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_do_not_block_the_stream_and_go_to_the_dead_letter_stream() {
    let redis = RedisServer::start().await;
    let ingest = Instance::spawn(consumer(
        "ing2",
        &redis,
        &[
            ("--ingest-dead-letter-stream", "dead"),
            ("--max-body-bytes", "64"),
        ],
    ))
    .await;
    let mut alice = Client::connect_user(&ingest, "alice").await;
    let good = |n: u64| json!({"user": "alice", "body": {"n": n}}).to_string();
    let secret = "SECRET-poison-7f3a";
    xadd(&redis, &good(1)).await;
    let no_v: String = redis
        .cmd(&[
            "XADD",
            STREAM,
            "*",
            "x",
            &format!("{{\"user\":\"alice\",\"body\":\"{secret}\"}}"),
        ])
        .await;
    let poison = [
        format!("not json {secret}"),
        format!("[\"alice\", \"{secret}\"]"),
        json!({"user": "a b", "body": secret}).to_string(),
        json!({"user": "alice", "body": secret.repeat(8)}).to_string(),
        json!({"room": "lobby", "body": secret, "key": "k1"}).to_string(),
    ];
    let mut poison_ids = vec![no_v];
    for value in &poison {
        poison_ids.push(xadd(&redis, value).await);
    }
    xadd(&redis, &good(2)).await;
    xadd(&redis, &good(3)).await;

    let got = alice.distinct_dms(3, RECV_TIMEOUT).await;
    assert_eq!(
        numbered_bodies(&got),
        [1, 2, 3],
        "the records after the poison, in order"
    );
    drained(&redis, &ingest, Duration::from_secs(10)).await;
    assert_eq!(ingest.metric(MALFORMED).await, 6.0);
    assert_eq!(ingest.metric(DELIVERED).await, 3.0);

    let dead: Vec<(String, Vec<String>)> = redis.cmd(&["XRANGE", "dead", "-", "+"]).await;
    assert_eq!(dead.len(), 6, "{dead:?}");
    for ((_, fields), (id, value)) in dead.iter().zip(
        poison_ids
            .iter()
            .zip(std::iter::once(None).chain(poison.iter().map(Some))),
    ) {
        let fields: HashMap<&str, &str> = fields
            .chunks(2)
            .map(|kv| (kv[0].as_str(), kv[1].as_str()))
            .collect();
        assert_eq!(fields.get("stream"), Some(&STREAM), "{fields:?}");
        assert_eq!(fields.get("id"), Some(&id.as_str()), "{fields:?}");
        assert!(
            fields.get("error").is_some_and(|e| !e.is_empty()),
            "{fields:?}"
        );
        assert_eq!(
            fields.get("v").copied(),
            value.map(String::as_str),
            "{fields:?}"
        );
    }
    let log = ingest.full_log();
    assert!(log.contains("malformed record"), "{log}");
    assert!(!log.contains(secret), "a value reached the log:\n{log}");
}

/// Produces records in chunks until
/// `victim`, frozen right after a chunk, holds unacknowledged entries;
/// returns how many it holds. The victim stays frozen.
async fn freeze_holding_entries(
    redis: &RedisServer,
    victim: &Instance,
    producer: &mut Producer,
) -> usize {
    for _ in 0..200 {
        for _ in 0..40 {
            xadd(redis, &producer.record()).await;
        }
        victim.sigstop();
        let held = pending_of(redis, victim.instance_id()).await;
        if held > 0 {
            return held;
        }
        victim.sigcont();
    }
    panic!("{} never held a pending entry", victim.instance_id());
}

/// Two consumers; one is SIGKILLed holding entries it had read and not
/// acknowledged. The survivor claims them after --ingest-claim-ms; every
/// record reaches its user (online on the survivor, or offline and
/// connecting at the end) exactly once after seq de-duplication — a
/// record the killed one had stored is not stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_entries_are_claimed_by_a_survivor_exactly_once() {
    let seed = seed();
    let redis = RedisServer::start().await;
    let flags = [("--ingest-claim-ms", "1000"), ("--ingest-batch", "20")];
    let (mut victim, survivor) = tokio::join!(
        Instance::spawn(consumer("kill1", &redis, &flags)),
        Instance::spawn(consumer("kill2", &redis, &flags)),
    );
    let users: Vec<String> = (0..10).map(|u| format!("u{u}")).collect();
    for user in &users {
        seen(&survivor, user).await;
    }
    // u0-u4 online on the survivor, u5-u9 offline until the end.
    let mut online = Vec::new();
    for user in &users[..5] {
        online.push(Client::connect_user(&survivor, user).await);
    }
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut producer = Producer::new(&names, seed);
    let held = freeze_holding_entries(&redis, &victim, &mut producer).await;
    victim.sigkill();
    for _ in 0..200 {
        xadd(&redis, &producer.record()).await;
    }
    println!(
        "the killed consumer held {held} entries; {} records",
        producer.n
    );
    drained(&redis, &survivor, Duration::from_secs(20)).await;
    assert!(
        survivor.metric(CLAIMED).await >= held as f64,
        "the survivor claimed the killed one's {held} entries"
    );

    for (client, user) in online.iter_mut().zip(&users[..5]) {
        let want: BTreeSet<u64> = producer.sent_to(user).into_iter().collect();
        let got = client.distinct_dms(want.len(), RECV_TIMEOUT).await;
        let got_ns = numbered_bodies(&got);
        let distinct: BTreeSet<u64> = got_ns.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            got_ns.len(),
            "{user}: no record stored twice"
        );
        assert_eq!(distinct, want, "{user}: every record");
        assert!(
            frames_until_ping(client, RECV_TIMEOUT).await.is_empty(),
            "{user}: nothing more"
        );
    }
    for user in &users[5..] {
        let want: BTreeSet<u64> = producer.sent_to(user).into_iter().collect();
        let mut client = Client::connect_user(&survivor, user).await;
        let got = numbered_bodies(&frames_until_ping(&mut client, RECV_TIMEOUT).await);
        let distinct: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(distinct.len(), got.len(), "{user}: each once");
        assert_eq!(distinct, want, "{user}: every record");
    }
}

/// A consumer SIGKILLed holding entries restarts with its instance id: it
/// delivers its own pending entries at once (long before
/// --ingest-claim-ms), then what was added meanwhile, and nothing it had
/// acknowledged; the offline user gets every record once, in stream order.
/// A graceful restart then resumes after the last entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_after_what_it_acknowledged() {
    let redis = RedisServer::start().await;
    let flags = [("--ingest-claim-ms", "60000"), ("--ingest-batch", "20")];
    let mut ingest = Instance::spawn(consumer("rs1", &redis, &flags)).await;
    seen(&ingest, "bob").await;
    let mut producer = Producer::new(&["bob"], 0);
    let held = freeze_holding_entries(&redis, &ingest, &mut producer).await;
    // Frozen: the group's state is what the crash leaves.
    let acked = entries_read(&redis).await - held as i64;
    ingest.sigkill();
    for _ in 0..50 {
        xadd(&redis, &producer.record()).await;
    }
    let total = producer.n;
    println!("killed holding {held} entries, {acked} acknowledged, {total} records");
    let started = Instant::now();
    ingest
        .respawn_same_port(consumer("rs1", &redis, &flags))
        .await;
    drained(&redis, &ingest, Duration::from_secs(15)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "recovered from its own pending entries, not by a claim"
    );
    assert_eq!(
        ingest.metric(DELIVERED).await,
        (total as i64 - acked) as f64,
        "it delivered exactly what it had not acknowledged"
    );
    let mut bob = Client::connect_user(&ingest, "bob").await;
    let got = numbered_bodies(&frames_until_ping(&mut bob, Duration::from_secs(10)).await);
    assert_eq!(
        got,
        (1..=total).collect::<Vec<_>>(),
        "every record once, in order"
    );
    bob.close().await;

    // A graceful stop acknowledges everything; the next process resumes
    // after the last entry.
    ingest.terminate(Duration::from_secs(10)).await;
    for _ in 0..10 {
        xadd(&redis, &producer.record()).await;
    }
    ingest
        .respawn_same_port(consumer("rs1", &redis, &flags))
        .await;
    drained(&redis, &ingest, Duration::from_secs(10)).await;
    assert_eq!(ingest.metric(DELIVERED).await, 10.0);
    let mut bob = Client::connect_user(&ingest, "bob").await;
    let got = numbered_bodies(&frames_until_ping(&mut bob, Duration::from_secs(10)).await);
    assert_eq!(got, (1..=total + 10).collect::<Vec<_>>());
}

/// Names of the group's consumers.
async fn consumers(redis: &RedisServer) -> BTreeSet<String> {
    let list: Vec<HashMap<String, Option<String>>> =
        redis.cmd(&["XINFO", "CONSUMERS", STREAM, GROUP]).await;
    list.iter()
        .filter_map(|c| c.get("name").cloned().flatten())
        .collect()
}

/// Consumers left behind — an instance stopped for good, and one that read
/// an entry and vanished — are removed from the group once idle ten
/// `--ingest-claim-ms` with nothing pending; the vanished one's entry is
/// claimed and delivered first, never dropped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_instances_gone_are_removed_from_the_group() {
    let redis = RedisServer::start().await;
    let flags = [("--ingest-claim-ms", "200")];
    let mut gone = Instance::spawn(consumer("gone1", &redis, &flags)).await;
    seen(&gone, "bob").await;
    let mut producer = Producer::new(&["bob"], 0);
    for _ in 0..5 {
        xadd(&redis, &producer.record()).await;
    }
    drained(&redis, &gone, Duration::from_secs(10)).await;
    gone.terminate(Duration::from_secs(10)).await;
    // A consumer that read an entry and never acknowledged it.
    xadd(&redis, &producer.record()).await;
    let () = redis
        .cmd(&[
            "XREADGROUP",
            "GROUP",
            GROUP,
            "ghost",
            "COUNT",
            "1",
            "STREAMS",
            STREAM,
            ">",
        ])
        .await;
    assert_eq!(pending_of(&redis, "ghost").await, 1);
    assert_eq!(
        consumers(&redis).await,
        BTreeSet::from(["ghost".to_owned(), "gone1".to_owned()])
    );
    let live = Instance::spawn(consumer("live1", &redis, &flags)).await;
    eventually(
        Duration::from_secs(20),
        "only the live consumer is left",
        || async { consumers(&redis).await == BTreeSet::from(["live1".to_owned()]) },
    )
    .await;
    assert!(
        live.metric(CLAIMED).await >= 1.0,
        "the ghost's entry was claimed"
    );
    let mut bob = Client::connect_user(&live, "bob").await;
    let got = numbered_bodies(&frames_until_ping(&mut bob, RECV_TIMEOUT).await);
    assert_eq!(
        got,
        (1..=6).collect::<Vec<_>>(),
        "every record once, in order"
    );
}

/// Redis restarted empty: the stream and the group are gone; the consumer
/// creates the group again (`NOGROUP`) and delivers the records added
/// after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_is_created_again_after_redis_restarted_empty() {
    let mut redis = RedisServer::start().await;
    let ingest = Instance::spawn(consumer("rr1", &redis, &[])).await;
    let mut alice = Client::connect_user(&ingest, "alice").await;
    let mut producer = Producer::new(&["alice"], 0);
    xadd(&redis, &producer.record()).await;
    assert_eq!(
        numbered_bodies(&alice.distinct_dms(1, RECV_TIMEOUT).await),
        [1]
    );
    redis.kill();
    redis.restart().await;
    // Alice's connection survives; her presence is re-asserted by the
    // heartbeat, and records flow again once the group is back.
    for _ in 0..5 {
        xadd(&redis, &producer.record()).await;
    }
    let got = alice.distinct_dms(5, Duration::from_secs(15)).await;
    assert_eq!(
        numbered_bodies(&got),
        [2, 3, 4, 5, 6],
        "the records after the restart, in order"
    );
    drained(&redis, &ingest, Duration::from_secs(10)).await;
}

/// On a Redis Cluster (the stream is one key, on one slot): records are
/// delivered, a poison entry is dead-lettered, the lag drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0, 5000).await;
    let ingest = Instance::spawn(
        opts!("cl1")
            .redis_cluster(&cluster)
            .lease_ms(LEASE_MS)
            .flag("--ingest-stream", STREAM)
            .flag("--ingest-dead-letter-stream", "{events}:dead"),
    )
    .await;
    let mut alice = Client::connect_user(&ingest, "alice").await;
    let mut producer = Producer::new(&["alice"], 0);
    for i in 0..10 {
        let value = if i == 4 {
            "poison".to_owned()
        } else {
            producer.record()
        };
        let _: String = cluster
            .cmd_for_key(STREAM, &["XADD", STREAM, "*", "v", &value])
            .await;
    }
    let got = alice.distinct_dms(9, RECV_TIMEOUT).await;
    assert_eq!(numbered_bodies(&got), (1..=9).collect::<Vec<_>>());
    eventually(Duration::from_secs(10), "the lag drains", || async {
        ingest.metric(LAG).await == 0.0
    })
    .await;
    assert_eq!(ingest.metric(MALFORMED).await, 1.0);
    let dead: i64 = cluster
        .cmd_for_key("{events}:dead", &["XLEN", "{events}:dead"])
        .await;
    assert_eq!(dead, 1);
}

/// `--ingest-stream` without Redis is refused at start-up, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_redis_is_refused() {
    let (status, log) = Instance::run_until_exit(
        opts!("nored").flag("--ingest-stream", STREAM),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("--ingest-stream needs Redis"), "{log}");
}
