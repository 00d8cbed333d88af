//! The producing side of `--workload ingest`: the same `--records` DMs
//! made available as fast as each client allows, through one of three
//! doors. Record i is `{"user":"bu-(i mod U)","body":{"n":i div U,"t":T}}`
//! with T the unix time in ms (fractional) just before the record is handed
//! to the client, so `n` counts per user from 0 and the receivers can tell
//! loss, duplicates and order from the body alone.
//!
//! - `stream`: pipelined `XADD <stream> * v <record>` batches on one
//!   connection to the run's redis-server, one batch at a time;
//! - `kafka`: an rdkafka `FutureProducer` (key = the user id, acks=all,
//!   linger 5 ms), every record enqueued without waiting, then every
//!   delivery report awaited;
//! - `http`: `POST /api/v1/publish`, round robin over the instances,
//!   `--publish-inflight` requests in flight on kept-alive connections.
//!
//! Every client is connected (and Kafka's metadata fetched) in `connect`,
//! before the measured window. Nothing here reads what was delivered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde::{Deserialize, Serialize};

use super::receivers::{unix_ms, user_name};
use crate::error::BenchError;

/// Errors kept verbatim per row (the rest are counted).
const KEPT_ERRORS: usize = 5;
/// Bound of one publish request.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Record `i` of a run over `users` users, produced at `t_ms`: (user, JSON).
pub fn record(i: u64, users: u64, t_ms: f64) -> (String, String) {
    let user = user_name(i % users);
    let n = i / users;
    let json = format!(r#"{{"user":"{user}","body":{{"n":{n},"t":{t_ms:.3}}}}}"#);
    (user, json)
}

/// What producing the records took.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProduceStats {
    /// `t` of the first record: the start of the measured window, unix ms.
    pub first_t_unix_ms: f64,
    /// From the first record handed to the client to the last one
    /// acknowledged by the queue (or answered by the API), s.
    pub produce_s: f64,
    /// Records the queue / API accepted.
    pub accepted: u64,
    /// Records refused or failed (each is a record lost before Switchboard).
    pub failed: u64,
    /// http: answers by status code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub http_status: BTreeMap<String, u64>,
    /// kafka: enqueue attempts refused because librdkafka's queue was full
    /// (retried after a poll; not failures).
    #[serde(default)]
    pub queue_full_retries: u64,
    /// The first few errors, verbatim.
    pub errors: Vec<String>,
}

impl ProduceStats {
    fn note(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < KEPT_ERRORS {
            self.errors.push(error);
        }
    }
}

/// A connected client of one source.
pub enum Producer {
    /// The run's redis-server.
    Stream {
        /// A multiplexed connection.
        conn: redis::aio::MultiplexedConnection,
        /// The stream key.
        stream: String,
        /// XADDs per pipeline.
        batch: usize,
    },
    /// The run's Tansu broker.
    Kafka {
        /// The producer, metadata fetched.
        producer: FutureProducer,
        /// The topic.
        topic: String,
    },
    /// The instances' publish API.
    Http {
        /// A pooled client (kept-alive connections); boxed, it is several
        /// times the size of the other variants.
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        /// The instances' ports, round robin.
        ports: Vec<u16>,
        /// `Authorization: Bearer` value.
        api_key: String,
        /// Requests in flight.
        inflight: usize,
    },
}

impl Producer {
    /// Connects to the run's redis-server on `port`.
    pub async fn stream(port: u16, stream: &str, batch: usize) -> Result<Producer, BenchError> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .map_err(|e| BenchError::Redis(format!("stream producer: {e}")))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| BenchError::Redis("stream producer: connect timed out".into()))?
        .map_err(|e| BenchError::Redis(format!("stream producer: connect: {e}")))?;
        Ok(Producer::Stream {
            conn,
            stream: stream.to_owned(),
            batch,
        })
    }

    /// A producer for `brokers`, with `topic`'s metadata fetched (so the
    /// first record does not wait for it).
    pub async fn kafka(
        brokers: &str,
        topic: &str,
        message_timeout: Duration,
    ) -> Result<Producer, BenchError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "switchboard-bench")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().to_string(),
            )
            .create()
            .map_err(|e| BenchError::Report(format!("kafka producer: {e}")))?;
        let probe = producer.clone();
        let owned_topic = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(Some(&owned_topic), Duration::from_secs(20))
                .map(|m| {
                    m.topics()
                        .iter()
                        .map(|t| (t.name().to_owned(), t.partitions().len()))
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|e| BenchError::Report(format!("kafka metadata task: {e}")))?
        .map_err(|e| BenchError::Report(format!("kafka producer: metadata of {topic}: {e}")))?;
        if !metadata.iter().any(|(name, p)| name == topic && *p > 0) {
            return Err(BenchError::Report(format!(
                "kafka producer: the broker's metadata has no partitions of {topic}: {metadata:?}"
            )));
        }
        Ok(Producer::Kafka {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// A client for the publish API of the instances on `ports`.
    pub fn http(ports: Vec<u16>, api_key: String, inflight: usize) -> Producer {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(inflight)
            .build_http();
        Producer::Http {
            client: Box::new(client),
            ports,
            api_key,
            inflight,
        }
    }

    /// Makes `records` records for `users` users available, as fast as the
    /// client allows; bounded by `timeout` (what is not done by then counts
    /// as failed).
    pub async fn produce(&self, records: u64, users: u64, timeout: Duration) -> ProduceStats {
        let started = Instant::now();
        let first_t = unix_ms();
        let mut stats =
            match tokio::time::timeout(timeout, self.produce_all(records, users, first_t)).await {
                Ok(stats) => stats,
                Err(_) => {
                    let mut stats = ProduceStats::default();
                    stats.note(format!(
                        "producing did not finish within {:.0} s",
                        timeout.as_secs_f64()
                    ));
                    stats
                }
            };
        stats.first_t_unix_ms = first_t;
        stats.produce_s = started.elapsed().as_secs_f64();
        stats
    }

    async fn produce_all(&self, records: u64, users: u64, first_t: f64) -> ProduceStats {
        match self {
            Producer::Stream {
                conn,
                stream,
                batch,
            } => produce_stream(conn.clone(), stream, *batch, records, users, first_t).await,
            Producer::Kafka { producer, topic } => {
                produce_kafka(producer, topic, records, users, first_t).await
            }
            Producer::Http {
                client,
                ports,
                api_key,
                inflight,
            } => produce_http(client, ports, api_key, *inflight, records, users, first_t).await,
        }
    }
}

/// `t` of record `i`: the first one's is the window's start.
fn t_of(i: u64, first_t: f64) -> f64 {
    if i == 0 {
        first_t
    } else {
        unix_ms()
    }
}

async fn produce_stream(
    mut conn: redis::aio::MultiplexedConnection,
    stream: &str,
    batch: usize,
    records: u64,
    users: u64,
    first_t: f64,
) -> ProduceStats {
    let mut stats = ProduceStats::default();
    let mut i = 0;
    while i < records {
        let end = (i + batch as u64).min(records);
        let mut pipe = redis::pipe();
        for j in i..end {
            let (_, json) = record(j, users, t_of(j, first_t));
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(super::STREAM_FIELD)
                .arg(json)
                .ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => stats.accepted += end - i,
            Err(e) => {
                for _ in i..end {
                    stats.note(format!("XADD batch: {e}"));
                }
            }
        }
        i = end;
    }
    stats
}

async fn produce_kafka(
    producer: &FutureProducer,
    topic: &str,
    records: u64,
    users: u64,
    first_t: f64,
) -> ProduceStats {
    let mut stats = ProduceStats::default();
    let mut deliveries = Vec::with_capacity(records as usize);
    for i in 0..records {
        let (user, json) = record(i, users, t_of(i, first_t));
        let mut next = FutureRecord::to(topic).key(&user).payload(&json);
        loop {
            match producer.send_result(next) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    stats.queue_full_retries += 1;
                    next = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => {
                    stats.note(format!("enqueue: {e}"));
                    break;
                }
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => stats.accepted += 1,
            Ok(Err((e, _))) => stats.note(format!("delivery: {e}")),
            Err(_) => stats.note("delivery report dropped".into()),
        }
    }
    stats
}

async fn produce_http(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: &[u16],
    api_key: &str,
    inflight: usize,
    records: u64,
    users: u64,
    first_t: f64,
) -> ProduceStats {
    let next = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(ProduceStats::default()));
    let auth = format!("Bearer {api_key}");
    let mut workers = Vec::with_capacity(inflight);
    for _ in 0..inflight {
        let (next, stats, client, auth) = (
            Arc::clone(&next),
            Arc::clone(&stats),
            client.clone(),
            auth.clone(),
        );
        let ports = ports.to_vec();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records {
                    break;
                }
                let port = ports[(i % ports.len() as u64) as usize];
                let (_, json) = record(i, users, t_of(i, first_t));
                let outcome = publish(&client, port, &auth, json).await;
                let Ok(mut s) = stats.lock() else { break };
                match outcome {
                    Ok(202) => {
                        s.accepted += 1;
                        *s.http_status.entry("202".into()).or_insert(0) += 1;
                    }
                    Ok(status) => {
                        *s.http_status.entry(status.to_string()).or_insert(0) += 1;
                        s.note(format!("POST /api/v1/publish to port {port}: {status}"));
                    }
                    Err(e) => s.note(e),
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let stats = stats.lock().map(|s| s.clone());
    stats.unwrap_or_default()
}

/// One publish; the status code, or why there is none.
async fn publish(
    client: &Client<HttpConnector, Full<Bytes>>,
    port: u16,
    auth: &str,
    json: String,
) -> Result<u16, String> {
    let request = hyper::Request::post(format!("http://127.0.0.1:{port}/api/v1/publish"))
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .map_err(|e| format!("build the request: {e}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("POST to port {port}: {e}"))?;
        let status = response.status().as_u16();
        // Read the body so the connection can be reused.
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("POST to port {port}: reading the answer: {e}"))?;
        Ok(status)
    };
    tokio::time::timeout(PUBLISH_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("POST to port {port}: no answer within 10 s")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_user_and_counts_per_user() {
        let (user, json) = record(405, 200, 1_764_650_000_123.456_7);
        assert_eq!(user, "bu-5");
        assert_eq!(
            json,
            r#"{"user":"bu-5","body":{"n":2,"t":1764650000123.457}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(v["body"]["n"], 2);
    }
}
