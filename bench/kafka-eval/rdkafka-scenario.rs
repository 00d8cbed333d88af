//! rdkafka evaluation against Tansu: classic consumer group join, assignment,
//! keyed consume, commit, resume after restart, rebalance, throughput.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

struct Ctx {
    name: String,
    start: Instant,
    assigned: Arc<AtomicUsize>,
}
impl ClientContext for Ctx {}
impl ConsumerContext for Ctx {
    #[cfg(feature = "new")]
    fn post_rebalance(&self, _base: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) { self.on_rebalance(r) }
    #[cfg(not(feature = "new"))]
    fn post_rebalance(&self, r: &Rebalance<'_>) { self.on_rebalance(r) }
}
impl Ctx {
    fn on_rebalance(&self, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.assigned.store(parts.len(), Ordering::SeqCst);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
                eprintln!("[{}] +{:.2}s (unix_ms {now}) assigned {:?}", self.name, self.start.elapsed().as_secs_f64(), parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                eprintln!("[{}] +{:.2}s revoked {:?}", self.name, self.start.elapsed().as_secs_f64(), parts);
            }
            Rebalance::Error(e) => eprintln!("[{}] rebalance error {e}", self.name),
        }
    }
}

fn consumer(brokers: &str, group: &str, name: &str, start: Instant) -> (StreamConsumer<Ctx>, Arc<AtomicUsize>) {
    let assigned = Arc::new(AtomicUsize::new(0));
    let mut cfg = ClientConfig::new();
    extra(&mut cfg);
    let c: StreamConsumer<Ctx> = cfg
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", name)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range")
        .create_with_context(Ctx { name: name.into(), start, assigned: assigned.clone() })
        .expect("consumer");
    (c, assigned)
}

fn extra(cfg: &mut ClientConfig) {
    for kv in std::env::var("KCFG").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').expect("KCFG k=v,k=v");
        cfg.set(k, v);
    }
}

async fn produce(brokers: &str, topic: &str, n: usize, users: usize, tag: &str) -> f64 {
    let mut cfg = ClientConfig::new();
    if let Ok(d) = std::env::var("RDDEBUG") { cfg.set("debug", &d); }
    extra(&mut cfg);
    let p: FutureProducer = cfg
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "20000")
        .set("acks", "all")
        .create()
        .expect("producer");
    let t = Instant::now();
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("user-{}", i % users);
        let val = format!("{{\"user\":\"{key}\",\"body\":{{\"tag\":\"{tag}\",\"i\":{i}}}}}");
        let f = p.send_result(FutureRecord::to(topic).key(&key).payload(&val));
        match f {
            Ok(f) => futs.push(f),
            Err((e, _)) => panic!("enqueue {i}: {e}"),
        }
    }
    for (i, f) in futs.into_iter().enumerate() {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => panic!("delivery {i}: {e}"),
            Err(e) => panic!("cancelled {i}: {e}"),
        }
    }
    let s = t.elapsed().as_secs_f64();
    eprintln!("produced {n} keyed records in {s:.3}s = {:.0} rec/s", n as f64 / s);
    s
}

async fn wait_assigned(a: &AtomicUsize, c: &StreamConsumer<Ctx>, what: &str, start: Instant) {
    // recv() drives the group protocol; records received before assignment can't happen.
    let deadline = Instant::now() + Duration::from_secs(120);
    while a.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "{what}: no assignment in 120s");
        let _ = tokio::time::timeout(Duration::from_millis(100), async { let _ = c.recv().await; }).await;
    }
    eprintln!("{what}: first assignment after {:.2}s", start.elapsed().as_secs_f64());
}

/// Consumes `n` records (committing every `commit_every` and at the end, sync), returns per-key order check.
async fn consume(c: &StreamConsumer<Ctx>, n: usize, commit_every: usize, what: &str) -> Vec<(i32, i64)> {
    let t = Instant::now();
    let mut seen = Vec::with_capacity(n);
    let mut last_per_key: std::collections::HashMap<String, i64> = Default::default();
    let mut since = 0;
    while seen.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv()).await
            .unwrap_or_else(|_| panic!("{what}: stalled at {} of {n}", seen.len()))
            .expect("recv");
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let payload = std::str::from_utf8(m.payload().unwrap_or_default()).unwrap();
        let i: i64 = payload.rsplit("\"i\":").next().unwrap().trim_end_matches("}}").parse().unwrap();
        if let Some(prev) = last_per_key.insert(key.clone(), i) {
            assert!(prev < i, "{what}: order broken for {key}: {prev} then {i}");
        }
        seen.push((m.partition(), m.offset()));
        c.store_offset_from_message(&m).expect("store offset");
        since += 1;
        if since >= commit_every {
            c.commit_consumer_state(CommitMode::Async).expect("commit");
            since = 0;
        }
    }
    c.commit_consumer_state(CommitMode::Sync).expect("final commit");
    let s = t.elapsed().as_secs_f64();
    eprintln!("{what}: consumed+committed {n} in {s:.3}s = {:.0} rec/s", n as f64 / s);
    seen
}

fn committed(c: &StreamConsumer<Ctx>) -> Vec<(i32, Offset)> {
    let tpl: TopicPartitionList = c.committed(Duration::from_secs(10)).expect("committed");
    tpl.elements().iter().map(|e| (e.partition(), e.offset())).collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or("127.0.0.1:19092".into());
    let topic = args.get(2).cloned().unwrap_or("eval".into());
    let n: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(10_000);
    env_logger::init();
    eprintln!("librdkafka {:?}", rdkafka::util::get_rdkafka_version());
    let group = format!("g-{}", std::process::id());
    let start = Instant::now();
    if let Ok(g) = std::env::var("MEMBER_GROUP") {
        // a long-running member: prints assignments (with wall-clock ms) and consumes forever
        let name = std::env::var("MEMBER_NAME").unwrap_or("M".into());
        let (c, _a) = consumer(&brokers, &g, &name, start);
        c.subscribe(&[&topic]).unwrap();
        loop {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
                c.store_offset_from_message(&m).unwrap();
                let _ = c.commit_consumer_state(CommitMode::Async);
            }
        }
    }

    // 1. produce N keyed records for 200 users
    produce(&brokers, &topic, n, 200, "a").await;

    // 2. consumer A joins the classic group, waits for its assignment, consumes half, commits, exits.
    let half = n / 2;
    {
        let (a, aa) = consumer(&brokers, &group, "A", start);
        a.subscribe(&[&topic]).unwrap();
        let t = Instant::now();
        wait_assigned(&aa, &a, "A join", t).await;
        let _ = consume(&a, half, 100, "A first half").await;
        eprintln!("A committed: {:?}", committed(&a));
        a.unsubscribe();
    } // dropped = closed (leaves group)
    // 3. restart: A2 in the same group resumes from committed offsets
    let (a2, aa2) = consumer(&brokers, &group, "A2", start);
    a2.subscribe(&[&topic]).unwrap();
    let t = Instant::now();
    wait_assigned(&aa2, &a2, "A2 rejoin", t).await;
    let rest = consume(&a2, n - half, 100, "A2 rest").await;
    let mut by_part: std::collections::BTreeMap<i32, (i64, i64)> = Default::default();
    for (p, o) in &rest { let e = by_part.entry(*p).or_insert((i64::MAX, -1)); e.0 = e.0.min(*o); e.1 = e.1.max(*o); }
    eprintln!("A2 resumed at (partition: first..last offset) {by_part:?}");
    eprintln!("A2 committed: {:?}", committed(&a2));

    // 4. rebalance: consumer B joins the same group; drive both until B holds partitions
    //    and A2 gave some up, then produce more and check both consume their share.
    let (b, ab) = consumer(&brokers, &group, "B", start);
    b.subscribe(&[&topic]).unwrap();
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(ab.load(Ordering::SeqCst) > 0 && aa2.load(Ordering::SeqCst) < 4) {
        assert!(Instant::now() < deadline, "rebalance: B never got partitions (A2 holds {})", aa2.load(Ordering::SeqCst));
        tokio::select! {
            r = a2.recv() => { let _ = r.unwrap(); }
            r = b.recv() => { let _ = r.unwrap(); }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    eprintln!("rebalance: B assigned {} and A2 {} partitions after {:.2}s", ab.load(Ordering::SeqCst), aa2.load(Ordering::SeqCst), t.elapsed().as_secs_f64());
    let m = 10_000;
    let tp = Instant::now();
    produce(&brokers, &topic, m, 200, "b").await;
    let mut a_got = 0usize; let mut b_got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while a_got + b_got < m {
        assert!(Instant::now() < deadline, "after rebalance: A2 {a_got}, B {b_got}");
        tokio::select! {
            r = a2.recv() => { let r = r.unwrap(); a2.store_offset_from_message(&r).unwrap(); a_got += 1; }
            r = b.recv() => { let r = r.unwrap(); b.store_offset_from_message(&r).unwrap(); b_got += 1; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    eprintln!("after rebalance: {m} new records produced+consumed end to end in {:.3}s, split A2 {a_got} / B {b_got}", tp.elapsed().as_secs_f64());
    a2.commit_consumer_state(CommitMode::Sync).expect("A2 commit");
    b.commit_consumer_state(CommitMode::Sync).expect("B commit");
    eprintln!("final committed (via B): {:?}", committed(&b));
    eprintln!("total {:.2}s", start.elapsed().as_secs_f64());
}
