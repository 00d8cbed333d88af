//! krafka (pure Rust) against Tansu: same scenario as rd-eval.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use krafka::consumer::{AutoOffsetReset, Consumer};
use krafka::producer::Acks;
use krafka::{Kafka, Record};

async fn produce(kafka: &Kafka, topic: &str, n: usize, tag: &str) {
    let producer = kafka.producer().acks(Acks::All).linger(Duration::from_millis(5)).build().await.expect("producer");
    let t = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("user-{}", i % 200);
        let val = format!("{{\"user\":\"{key}\",\"body\":{{\"tag\":\"{tag}\",\"i\":{i}}}}}");
        handles.push(producer.enqueue(Record::new(topic, val).key(key)).await.expect("enqueue"));
    }
    for h in handles { h.await.expect("delivery"); }
    let s = t.elapsed().as_secs_f64();
    eprintln!("produced {n} keyed records in {s:.3}s = {:.0} rec/s", n as f64 / s);
    producer.close().await.ok();
}

async fn consumer(kafka: &Kafka, group: &str) -> Consumer {
    kafka.consumer(group)
        .auto_offset_reset(AutoOffsetReset::Earliest)
        .enable_auto_commit(false)
        .session_timeout(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(1))
        .build().await.expect("consumer")
}

async fn assigned(c: &Consumer) -> usize { c.assignment().await.values().map(|v| v.len()).sum() }

/// Polls until `n` records; commits after every batch. Returns (partition, offset) seen.
async fn consume(c: &Consumer, n: usize, what: &str) -> Vec<(i32, i64)> {
    let t = Instant::now();
    let mut seen = Vec::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first: Option<f64> = None;
    while seen.len() < n {
        assert!(Instant::now() < deadline, "{what}: stalled at {} of {n} (assignment {:?})", seen.len(), c.assignment().await);
        let recs = c.poll(Duration::from_millis(500)).await.expect("poll");
        if !recs.is_empty() && first.is_none() { first = Some(t.elapsed().as_secs_f64()); }
        for r in &recs {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
            let i: i64 = v.rsplit("\"i\":").next().unwrap().trim_end_matches("}}").parse().unwrap();
            if let Some(p) = last.insert(key.clone(), i) { assert!(p < i, "{what}: order broken for {key}"); }
            seen.push((r.partition as i32, r.offset as i64));
        }
        if !recs.is_empty() { c.commit().await.expect("commit"); }
    }
    let s = t.elapsed().as_secs_f64();
    eprintln!("{what}: first records after {:.2}s; {} consumed+committed in {s:.3}s", first.unwrap_or(0.0), seen.len());
    seen
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or("127.0.0.1:19092".into());
    let topic = args.get(2).cloned().unwrap_or("kr".into());
    let n: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(10_000);
    let group = format!("kg-{}", std::process::id());
    let kafka = Kafka::builder(brokers.clone()).client_id("krafka-eval").connect().await.expect("connect");
    produce(&kafka, &topic, n, "a").await;
    let half = n / 2;
    {
        let a = consumer(&kafka, &group).await;
        a.subscribe([topic.as_str()]).await.expect("subscribe");
        let seen = consume(&a, half, "A first half").await;
        eprintln!("A assignment {:?}; consumed {} (asked {half})", a.assignment().await, seen.len());
        let parts: Vec<(&str, i32)> = (0..4).map(|p| (topic.as_str(), p)).collect();
        let parts: Vec<_> = parts.iter().map(|(t, p)| (*t, (*p).into())).collect();
        eprintln!("A committed: {:?}", a.committed(&parts).await);
        a.close().await.expect("close");
    }
    let a2 = consumer(&kafka, &group).await;
    a2.subscribe([topic.as_str()]).await.expect("subscribe");
    let total_first = half; // may have consumed a bit more than half (whole batches)
    let rest = consume(&a2, n - total_first, "A2 rest (may stop early if A over-consumed)").await;
    let mut by: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (p, o) in &rest { let e = by.entry(*p).or_insert((i64::MAX, -1)); e.0 = e.0.min(*o); e.1 = e.1.max(*o); }
    eprintln!("A2 resumed at {by:?}");
    let b = consumer(&kafka, &group).await;
    b.subscribe([topic.as_str()]).await.expect("subscribe");
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (x, y) = (assigned(&a2).await, assigned(&b).await);
        if y > 0 && x < 4 { eprintln!("rebalance: A2 {x}, B {y} partitions after {:.2}s", t.elapsed().as_secs_f64()); break; }
        assert!(Instant::now() < deadline, "rebalance: A2 {x}, B {y}");
        let _ = tokio::join!(a2.poll(Duration::from_millis(200)), b.poll(Duration::from_millis(200)));
    }
    let tp = Instant::now();
    produce(&kafka, &topic, 10_000, "b").await;
    let (mut x, mut y) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while x + y < 10_000 {
        assert!(Instant::now() < deadline, "after rebalance: A2 {x}, B {y}");
        let (ra, rb) = tokio::join!(a2.poll(Duration::from_millis(100)), b.poll(Duration::from_millis(100)));
        let (ra, rb) = (ra.expect("poll"), rb.expect("poll"));
        x += ra.len(); y += rb.len();
        if !ra.is_empty() { a2.commit().await.expect("commit"); }
        if !rb.is_empty() { b.commit().await.expect("commit"); }
    }
    eprintln!("after rebalance: 10000 new records produced+consumed+committed end to end in {:.3}s, split A2 {x} / B {y}", tp.elapsed().as_secs_f64());
    a2.close().await.ok(); b.close().await.ok();
}
