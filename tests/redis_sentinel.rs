//! Switchboard over a Sentinel-managed Redis: a master, two replicas and
//! three sentinels ([`ReplicatedRedis`]), real instance processes started
//! with `--redis-url redis+sentinel://…/sbmaster`, real WebSocket clients.
//!
//! - Failover, twice (the master, then the replica promoted in its place),
//!   SIGKILLed while stored DMs flow from one instance to the other; the
//!   sentinels promote a replica and each instance follows them to it. No
//!   client reconnects, `/readyz` goes 503 and back to 200, a DM sent after
//!   the kill is delivered within 3 s of the sentinels naming the promoted
//!   replica, the stored DMs acked before the kill all arrive (but those
//!   the dead master had not yet replicated), a presence the promoted
//!   replica lacked is re-asserted, and presence is right afterwards.
//! - Start-up: a malformed `redis+sentinel://` URL is refused, saying
//!   what the URL should look like; so are sentinels that do not answer
//!   or do not know the master's name.
//!
//! The traffic loops and the `/readyz` poller are the testkit's
//! ([`Traffic`], [`ReadyzWatch`]), as in `tests/redis_cluster.rs`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_testkit::{
    all_ready, eventually, free_port, opts, outcome, Client, Instance, ReadyzWatch,
    ReplicatedRedis, Traffic, RECV_TIMEOUT,
};

/// The sentinels' `down-after-milliseconds`: the master is subjectively
/// down this long after its last answer to a sentinel's PING.
const DOWN_AFTER_MS: u64 = 1000;
/// What the instances may take, once every sentinel names the promoted
/// replica, to have routed a DM through it again: the bound on a DM sent
/// after the kill is the sentinels' failover as measured (down-after
/// included) + this. Measured 0.1–1.4 s (an instance retries its master
/// with backoff capped at 1 s).
const INSTANCE_RECOVERY: Duration = Duration::from_secs(3);

/// Stored DMs delivered before the master is killed: those must all
/// arrive (but any the dead master had not yet replicated).
const PRE_KILL_DMS: usize = 40;

/// The key of a user's presence hash (`sb:presence:{user}`).
fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

/// Makes every replica of the current master forget `user`'s presence, as
/// if the master's last writes had not reached them (a replica's own
/// writes are not replicated): the replica promoted next lacks it unless
/// the user's instance re-asserts it.
async fn replicas_forget_presence(set: &ReplicatedRedis, user: &str) {
    let master = set.master_port().await;
    for replica in set.live_node_ports().into_iter().filter(|&p| p != master) {
        let _: () = set
            .cmd(replica, &["CONFIG", "SET", "replica-read-only", "no"])
            .await;
        let _: i64 = set.cmd(replica, &["DEL", &presence_key(user)]).await;
    }
}

/// `HGETALL sb:presence:{user}` on the node on `port`.
async fn presence_on(set: &ReplicatedRedis, port: u16, user: &str) -> HashMap<String, String> {
    set.cmd(port, &["HGETALL", &presence_key(user)]).await
}

/// What one failover measured.
struct Round {
    /// From the kill until every sentinel named the promoted replica.
    failover: Duration,
    /// From the kill until the first DM sent after it was delivered.
    delivered: Duration,
    /// (instance index, after the kill) of the first 503 of each instance
    /// that said 503.
    saw_503: Vec<(usize, Duration)>,
}

/// Two failovers in a row (the master, then the replica promoted in its
/// place), stored DMs flowing from alice on i1 to bob on i2 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failovers_under_dm_traffic_without_client_reconnects() {
    let started = Instant::now();
    let mut set = ReplicatedRedis::start(2, 3, DOWN_AFTER_MS).await;
    let formed = started.elapsed();
    // The default lease (10 s): every connection of an instance goes to the
    // one master, so its death shows at once (no heartbeat needs to fall in
    // the outage), and the promoted replica's copy of each lease outlives
    // the outage by seconds.
    let spawns = ["i1", "i2"].map(|id| Instance::spawn(opts!(id).redis_url(&set.sentinel_url())));
    let inst = futures_util::future::join_all(spawns).await;
    eprintln!(
        "master + 2 replicas + 3 sentinels formed in {formed:?}; 2 instances healthy after {:?}",
        started.elapsed()
    );
    let alice = Client::connect_user(&inst[0], "alice").await;
    let bob = Client::connect_user(&inst[1], "bob").await;
    // Idle on i2 throughout: her presence is what the replicas will lack.
    let mut carol = Client::connect_user(&inst[1], "carol").await;
    let conns = (alice.conn_id(), bob.conn_id(), carol.conn_id());
    all_ready(&inst).await;
    let readyz = ReadyzWatch::start(inst.iter().map(Instance::addr).collect());
    let traffic = Traffic::start(alice, bob, "bob");
    traffic
        .await_deliveries(PRE_KILL_DMS, RECV_TIMEOUT, "DMs flow before the kill")
        .await;

    let mut rounds = Vec::new();
    let mut last_moments = HashSet::new();
    let mut promoted = 0;
    for round in 1..=2 {
        if round > 1 {
            // The last failover finished, the last replica follows the
            // promoted one: the second fault meets the set as the first did.
            set.wait_settled(Duration::from_secs(15)).await;
            let before = traffic.delivered();
            traffic
                .await_deliveries(before + 10, RECV_TIMEOUT, "DMs flow again")
                .await;
        }
        replicas_forget_presence(&set, "carol").await;
        // Taken before the SIGKILL: an instance may say 503 before
        // kill_master returns.
        let kill = Instant::now();
        let killed = set.kill_master().await;
        promoted = set.wait_failover(killed, Duration::from_secs(20)).await;
        let failover = kill.elapsed();
        let carol_at_promotion = presence_on(&set, promoted, "carol").await;
        let bound = failover + INSTANCE_RECOVERY;
        let delivered = traffic
            .await_delivery_sent_after(kill, bound + RECV_TIMEOUT, "after killing the master")
            .await
            - kill;
        readyz.await_all_ready(Duration::from_secs(15)).await;
        let ready = kill.elapsed();
        let saw_503 = (0..inst.len())
            .filter_map(|i| readyz.saw_after(i, 503, kill).map(|at| (i, at - kill)))
            .collect::<Vec<_>>();
        // Asynchronous replication: a DM the dead master stored (and acked)
        // in its last moments may never have reached the promoted replica;
        // if pub/sub did not deliver it either, it is gone. Only those are
        // excused.
        last_moments.extend(traffic.stored_between(kill - Duration::from_secs(1), kill));
        let lost = traffic
            .await_stored_delivered(&last_moments, Duration::from_secs(10))
            .await;
        eprintln!(
            "failover {round}: master {killed} killed, {promoted} promoted after {failover:?} \
             (down-after {:?}); first DM sent after the kill delivered {delivered:?} after it \
             (bound {bound:?}); /readyz 503 first seen (instance index, after the kill): \
             {saw_503:?}; all ready after {ready:?}; stored DMs lost to asynchronous \
             replication: {lost:?}; carol's presence on the promoted replica when the \
             sentinels named it: {carol_at_promotion:?}",
            set.down_after()
        );
        eprintln!(
            "failover {round}: /readyz changes since the kill: {:?}",
            readyz.changes_after(kill)
        );
        eprintln!(
            "failover {round}: send outcomes (ms since the kill): {:?}",
            traffic.outcome_runs(kill)
        );
        // Carol's presence, lost with the dead master, is re-asserted by i2.
        let set = &set;
        eventually(
            RECV_TIMEOUT,
            "carol's presence {i2} is back on the promoted master",
            || async move {
                presence_on(set, promoted, "carol")
                    .await
                    .keys()
                    .eq(["i2"].iter())
            },
        )
        .await;
        rounds.push(Round {
            failover,
            delivered,
            saw_503,
        });
    }

    let (mut alice, mut bob, _, received) = traffic.stop().await;
    readyz.stop().await;
    eprintln!(
        "{} DMs received; other frames: {:?}",
        received.dms.len(),
        received.other
    );
    assert_eq!(
        (alice.conn_id(), bob.conn_id(), carol.conn_id()),
        conns,
        "no client reconnected"
    );
    for (i, round) in rounds.iter().enumerate() {
        assert!(
            round.delivered <= round.failover + INSTANCE_RECOVERY,
            "failover {}: a DM sent after the kill took {:?} to arrive; the sentinels named \
             the promoted replica after {:?}, and the instances may take {INSTANCE_RECOVERY:?} \
             more",
            i + 1,
            round.delivered,
            round.failover
        );
        assert_eq!(
            round.saw_503.len(),
            2,
            "failover {}: /readyz said 503 while the master was down on every instance, not \
             only (index, after the kill) {:?}",
            i + 1,
            round.saw_503
        );
    }

    // Presence is right on the last master: bob is on i2, a DM to him is
    // routed there, and alice sees him online; so is carol.
    let presence = presence_on(&set, promoted, "bob").await;
    assert!(
        presence.keys().eq(["i2"].iter()),
        "bob's presence on the last master: {presence:?}"
    );
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": {"after": "failover"}}))
        .await;
    assert_eq!(outcome(&ack), "ack:routed", "{ack}");
    assert_eq!(ack["stored"], true, "{ack}");
    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["body"], json!({"after": "failover"}), "{dm}");
    assert!(alice.is_online("bob").await, "alice sees bob online");
    let ack = alice
        .request(json!({"type": "dm", "to": "carol", "body": "re-asserted"}))
        .await;
    assert_eq!(outcome(&ack), "ack:routed", "{ack}");
    assert_eq!(carol.recv_type("dm").await["body"], "re-asserted");
}

// ---------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------

/// A URL that does not name sentinels and a master is a configuration
/// error (exit status 2), and the message shows the URL and the form it
/// should have.
#[tokio::test]
async fn a_malformed_sentinel_url_is_refused_at_start_up() {
    for url in [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1/sbmaster",
        "redis+sentinel:///sbmaster",
        "redis+sentinel://127.0.0.1:notaport/sbmaster",
        "redis+sentinel://127.0.0.1:26379,,127.0.0.1:26380/sbmaster",
        "redis+sentinel://127.0.0.1:26379/sbmaster/extra",
    ] {
        let (status, log) =
            Instance::run_until_exit(opts!("s1").redis_url(url), Duration::from_secs(5)).await;
        assert_eq!(
            status.code(),
            Some(2),
            "{url}: exit status {status}; log:\n{log}"
        );
        assert!(
            log.contains(url) && log.contains("redis+sentinel://HOST:PORT"),
            "{url}: the log names the URL and the form it should have:\n{log}"
        );
    }
}

/// Sentinels that do not answer, or do not know the master's name: the
/// instance cannot find its master and does not start.
#[tokio::test]
async fn no_master_through_the_sentinels_is_refused_at_start_up() {
    let nobody = format!("redis+sentinel://{}/sbmaster", free_port());
    let (status, log) =
        Instance::run_until_exit(opts!("s2").redis_url(&nobody), Duration::from_secs(10)).await;
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    let sentinel = nobody
        .trim_start_matches("redis+sentinel://")
        .trim_end_matches("/sbmaster");
    assert!(
        log.contains("\"sbmaster\"") && log.contains(sentinel) && log.contains("refused"),
        "no sentinel answers: the log names the master and the sentinels:\n{log}"
    );

    let set = ReplicatedRedis::start(0, 1, DOWN_AFTER_MS).await;
    let unknown = set.sentinel_url().replace("/sbmaster", "/nosuchmaster");
    let (status, log) =
        Instance::run_until_exit(opts!("s3").redis_url(&unknown), Duration::from_secs(10)).await;
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("\"nosuchmaster\"") && log.contains("not found"),
        "the sentinel knows no master of that name: the log says so:\n{log}"
    );
}
