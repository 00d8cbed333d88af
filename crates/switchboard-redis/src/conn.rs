//! The two deployments Switchboard runs on — one Redis, or a Redis Cluster —
//! behind one set of connection types, so every other module issues the same
//! commands and scripts and asks only where the two differ (sharded channels,
//! commands that must be split by slot).
//!
//! This module owns opening the connections and the few cluster-specific
//! calls (the all-masters check, the topology fingerprint); what is sent on
//! them is the other modules' business.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use switchboard_core::error::BackendError;

use crate::scripts::{LoadScript, Lua};
use crate::{maintenance_error, RedisSetupError};

/// Where Redis is: the instance's `--redis-url` or `--redis-cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (`redis://`, `rediss://` or `redis+unix://`).
    Single(String),
    /// Seed nodes of a Redis Cluster (Redis ≥ 7): any reachable one is
    /// enough to learn the rest.
    Cluster(Vec<String>),
    /// A primary managed by Redis Sentinel: the sentinels' URLs and the
    /// monitored master's name (`redis+sentinel://H:P[,H:P…]/NAME`).
    Sentinel {
        /// `redis://H:P` of each sentinel.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the master under.
        service: String,
    },
}

/// Why a `redis+sentinel://` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid sentinel url {url:?}: expected redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME"
)]
pub struct SentinelUrlError {
    url: String,
}

impl RedisTarget {
    /// The target a `--redis-url` names: `redis+sentinel://` is a
    /// Sentinel-managed primary, anything else one Redis.
    pub fn from_url(url: &str) -> Result<RedisTarget, SentinelUrlError> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return Ok(RedisTarget::Single(url.to_owned()));
        };
        let refused = || SentinelUrlError {
            url: url.to_owned(),
        };
        let (hosts, service) = rest.split_once('/').ok_or_else(refused)?;
        let service = service.trim_end_matches('/');
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(|host| {
                let (name, port) = host.rsplit_once(':')?;
                let port: u16 = port.parse().ok()?;
                (!name.is_empty()).then(|| format!("redis://{name}:{port}"))
            })
            .collect::<Option<_>>()
            .ok_or_else(refused)?;
        if sentinels.is_empty() || service.is_empty() || service.contains('/') {
            return Err(refused());
        }
        Ok(RedisTarget::Sentinel {
            sentinels,
            service: service.to_owned(),
        })
    }

    /// Whether this is a cluster: channels are sharded, multi-key work is
    /// split by slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }
}

/// Opens a cluster client with RESP3 and `push` as its push sender (if any).
/// `retries` bounds the client's own retries of a command (redirections and
/// reconnections); the backend still times every message-path command.
pub(crate) fn cluster_client(
    seeds: &[String],
    connect_timeout: Duration,
    response_timeout: Duration,
    retries: u32,
    push: Option<impl redis::aio::AsyncPushSender>,
) -> Result<ClusterClient, RedisSetupError> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .use_protocol(redis::ProtocolVersion::RESP3)
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout)
        .retries(retries)
        .min_retry_wait(10)
        .max_retry_wait(250);
    if let Some(push) = push {
        builder = builder.push_sender(push);
    }
    builder.build().map_err(RedisSetupError::Url)
}

/// Connects a cluster connection, bounded by `bound`.
pub(crate) async fn cluster_connect(
    client: &ClusterClient,
    what: &'static str,
    bound: Duration,
) -> Result<ClusterConnection, RedisSetupError> {
    match tokio::time::timeout(bound, client.get_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(RedisSetupError::Connect { what, source }),
        Err(_) => Err(RedisSetupError::Connect {
            what,
            source: redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {bound:?}"),
            )),
        }),
    }
}

/// The message-path connection: one multiplexed connection to one Redis, or
/// the cluster client's (one multiplexed connection per node, commands
/// routed by slot). Cheap to clone.
#[derive(Clone)]
pub(crate) enum MessageConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A maintenance connection: from the small pool, or (cluster) the
/// maintenance cluster connection, separate from the message path's so a
/// 20,000-user resync never queues in front of a DM.
pub(crate) enum MaintenanceConn {
    Pooled(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

macro_rules! delegate_connection_like {
    ($ty:ident, $a:ident, $b:ident) => {
        impl ConnectionLike for $ty {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    $ty::$a(c) => c.req_packed_command(cmd),
                    $ty::$b(c) => c.req_packed_command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    $ty::$a(c) => c.req_packed_commands(pipeline, offset, count),
                    $ty::$b(c) => c.req_packed_commands(pipeline, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    $ty::$a(c) => c.get_db(),
                    $ty::$b(c) => c.get_db(),
                }
            }
        }
    };
}

delegate_connection_like!(MessageConn, Single, Cluster);
delegate_connection_like!(MaintenanceConn, Pooled, Cluster);

impl MessageConn {
    /// `CLIENT TRACKING ON` and `HGETALL key` in one pipeline, so the read
    /// is tracked on the connection that made it; on a cluster the pipeline
    /// is routed to the master of `key`'s slot explicitly (the client would
    /// send `CLIENT` to a random node, and refuse the mix as cross-slot).
    pub(crate) async fn tracked_hgetall(
        &mut self,
        key: &str,
    ) -> redis::RedisResult<Vec<(String, i64)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("TRACKING").arg("ON").ignore();
        pipe.cmd("HGETALL").arg(key);
        match self {
            MessageConn::Single(conn) => {
                let (fields,): (Vec<(String, i64)>,) = pipe.query_async(conn).await?;
                Ok(fields)
            }
            MessageConn::Cluster(conn) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let mut replies = conn
                    .route_pipeline(pipe, 0, 2, SingleNodeRoutingInfo::SpecificNode(route))
                    .await?;
                let fields = replies.pop().unwrap_or(Value::Nil);
                Ok(redis::from_redis_value(fields)?)
            }
        }
    }

    /// `WAIT replicas timeout` on the connection (on a cluster: the node
    /// connection serving `key`'s slot) that just wrote `key`: how many
    /// replicas have this connection's writes so far.
    pub(crate) async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> redis::RedisResult<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis() as u64);
        match self {
            MessageConn::Single(conn) => wait.query_async(conn).await,
            MessageConn::Cluster(conn) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let reply = conn.route_command(wait, routing).await?;
                Ok(redis::from_redis_value(reply)?)
            }
        }
    }
}

/// `SCRIPT LOAD` on one Redis, or routed to the master of `key`'s slot.
async fn load_script_at(
    conn: &mut impl ConnectionLike,
    cluster: Option<&mut ClusterConnection>,
    code: &str,
    key: &[u8],
) -> redis::RedisResult<()> {
    let mut load = redis::cmd("SCRIPT");
    load.arg("LOAD").arg(code);
    match cluster {
        None => load.query_async::<String>(conn).await.map(|_| ()),
        Some(cluster) => {
            use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
            let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            cluster.route_command(load, routing).await.map(|_| ())
        }
    }
}

impl LoadScript for MessageConn {
    fn load_script<'a>(&'a mut self, code: &'a str, key: &'a [u8]) -> RedisFuture<'a, ()> {
        Box::pin(async move {
            match self {
                MessageConn::Single(conn) => load_script_at(conn, None, code, key).await,
                MessageConn::Cluster(conn) => {
                    let mut routed = conn.clone();
                    load_script_at(conn, Some(&mut routed), code, key).await
                }
            }
        })
    }
}

impl LoadScript for MaintenanceConn {
    fn load_script<'a>(&'a mut self, code: &'a str, key: &'a [u8]) -> RedisFuture<'a, ()> {
        Box::pin(async move {
            match self {
                MaintenanceConn::Pooled(conn) => load_script_at(conn, None, code, key).await,
                MaintenanceConn::Cluster(conn) => {
                    let mut routed = conn.clone();
                    load_script_at(conn, Some(&mut routed), code, key).await
                }
            }
        })
    }
}

/// Commands sent at most this many at a time when a batch is split by slot.
const SPLIT_CONCURRENCY: usize = 256;

impl MaintenanceConn {
    /// Runs `cmds` (each a single-key command) and discards their answers
    /// (see [`query_each`]).
    pub(crate) async fn run_all(&mut self, cmds: Vec<Cmd>) -> Result<(), BackendError> {
        let result = match self {
            MaintenanceConn::Pooled(conn) => query_each(conn, None, cmds).await,
            MaintenanceConn::Cluster(conn) => query_each(&mut conn.clone(), Some(conn), cmds).await,
        };
        result.map(|_| ()).map_err(maintenance_error)
    }
}

impl MessageConn {
    /// Runs single-key `cmds` and returns their answers in order (see
    /// [`query_each`]).
    pub(crate) async fn query_each(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        match self {
            MessageConn::Single(conn) => query_each(conn, None, cmds).await,
            MessageConn::Cluster(conn) => query_each(&mut conn.clone(), Some(conn), cmds).await,
        }
    }
}

impl MessageConn {
    /// [`query_scripts`] on the message path.
    pub(crate) async fn query_scripts(
        &mut self,
        scripts: &[&Lua],
        cmds: Vec<Cmd>,
    ) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
        match self {
            MessageConn::Single(conn) => query_scripts(conn, None, scripts, cmds).await,
            MessageConn::Cluster(conn) => {
                query_scripts(&mut conn.clone(), Some(conn), scripts, cmds).await
            }
        }
    }
}

impl MaintenanceConn {
    /// [`query_scripts`] on a maintenance connection.
    pub(crate) async fn query_scripts(
        &mut self,
        scripts: &[&Lua],
        cmds: Vec<Cmd>,
    ) -> Result<Vec<redis::RedisResult<Value>>, BackendError> {
        let result = match self {
            MaintenanceConn::Pooled(conn) => query_scripts(conn, None, scripts, cmds).await,
            MaintenanceConn::Cluster(conn) => {
                query_scripts(&mut conn.clone(), Some(conn), scripts, cmds).await
            }
        };
        result.map_err(maintenance_error)
    }
}

/// Runs single-key `cmds` among which `EVALSHA`s of `scripts` (see
/// [`Lua::evalsha`]), and returns each command's own answer or error, in
/// order: a batch of transitions where one failed still reports the ones
/// that were announced, so they are published. Sent as [`query_each`]
/// sends (one pipeline, or split by slot on a cluster). The calls that met
/// `NOSCRIPT` (a Redis that restarted, a promoted replica: script caches
/// are not replicated) did not run: the scripts are loaded — on a cluster
/// on every master — and those calls alone sent again, once. Nothing is
/// loaded while the scripts are cached, which is always but after a
/// restart or failover. The outer error is the connection's.
async fn query_scripts(
    conn: &mut impl ConnectionLike,
    cluster: Option<&ClusterConnection>,
    scripts: &[&Lua],
    cmds: Vec<Cmd>,
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    let mut replies = send_each(conn, cluster, &cmds).await?;
    let missing: Vec<usize> = replies
        .iter()
        .enumerate()
        .filter(|(_, reply)| {
            reply.as_ref().is_err_and(|e| {
                e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            })
        })
        .map(|(i, _)| i)
        .collect();
    if missing.is_empty() {
        return Ok(replies);
    }
    for script in scripts {
        match cluster {
            None => {
                script.load_cmd().query_async::<String>(conn).await?;
            }
            Some(cluster) => {
                cluster
                    .clone()
                    .route_command(
                        script.load_cmd(),
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllMasters,
                            Some(ResponsePolicy::AllSucceeded),
                        )),
                    )
                    .await?;
            }
        }
    }
    let again: Vec<Cmd> = missing.iter().map(|&i| cmds[i].clone()).collect();
    let retried = send_each(conn, cluster, &again).await?;
    for (i, reply) in missing.into_iter().zip(retried) {
        replies[i] = reply;
    }
    Ok(replies)
}

/// [`query_each`] keeping each command's error to itself.
async fn send_each(
    conn: &mut impl ConnectionLike,
    cluster: Option<&ClusterConnection>,
    cmds: &[Cmd],
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    use futures_util::stream::{self, StreamExt};
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    let Some(cluster) = cluster else {
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        return pipe.ignore_errors().query_async(conn).await;
    };
    Ok(stream::iter(cmds.iter().cloned().map(|cmd| {
        let mut conn = cluster.clone();
        async move { cmd.query_async::<Value>(&mut conn).await }
    }))
    .buffered(SPLIT_CONCURRENCY)
    .collect()
    .await)
}

/// Runs single-key `cmds`: one pipeline on one Redis; on a cluster
/// (`cluster` given) each command on its own — a cluster pipeline must stay
/// in one slot — up to [`SPLIT_CONCURRENCY`] in flight, so the client still
/// pipelines them per node. Answers come back in the order of `cmds`.
async fn query_each(
    conn: &mut impl ConnectionLike,
    cluster: Option<&ClusterConnection>,
    cmds: Vec<Cmd>,
) -> redis::RedisResult<Vec<Value>> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let Some(cluster) = cluster else {
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        return pipe.query_async(conn).await;
    };
    stream::iter(cmds.into_iter().map(|cmd| {
        let mut conn = cluster.clone();
        async move { cmd.query_async::<Value>(&mut conn).await }
    }))
    .buffered(SPLIT_CONCURRENCY)
    .try_collect()
    .await
}

/// PINGs every master of the cluster: the cluster is whole only if each
/// answers (a master that died and whose replica was not yet promoted leaves
/// its slots unserved).
pub(crate) async fn ping_all_masters(conn: &mut ClusterConnection) -> redis::RedisResult<()> {
    conn.route_command(
        redis::cmd("PING"),
        RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        )),
    )
    .await
    .map(|_| ())
}

/// The masters as the cluster describes itself (`CLUSTER SHARDS` would do
/// as well; `CLUSTER NODES` is one line per node): the sorted ids of the
/// nodes flagged master and not failed. A change between two heartbeats is a
/// failover or a topology change: writes acknowledged by a master that
/// failed may not have reached its replica, so presence is re-asserted.
pub(crate) async fn master_fingerprint(conn: &mut ClusterConnection) -> redis::RedisResult<String> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
    Ok(masters_of(&nodes))
}

fn masters_of(nodes: &str) -> String {
    let mut masters: Vec<&str> = nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?;
            let _addr = fields.next()?;
            let flags = fields.next()?;
            let is_master = flags.split(',').any(|f| f == "master");
            let failed = flags.split(',').any(|f| f == "fail" || f == "fail?");
            (is_master && !failed).then_some(id)
        })
        .collect();
    masters.sort_unstable();
    masters.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_and_the_master() {
        assert_eq!(
            RedisTarget::from_url("redis+sentinel://127.0.0.1:26379,localhost:26380/mymaster"),
            Ok(RedisTarget::Sentinel {
                sentinels: vec![
                    "redis://127.0.0.1:26379".to_owned(),
                    "redis://localhost:26380".to_owned()
                ],
                service: "mymaster".to_owned(),
            })
        );
        assert_eq!(
            RedisTarget::from_url("redis://127.0.0.1:6379"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379".to_owned()))
        );
        for bad in [
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://127.0.0.1/mymaster",
            "redis+sentinel://:26379/mymaster",
            "redis+sentinel://127.0.0.1:x/mymaster",
            "redis+sentinel:///mymaster",
        ] {
            assert!(RedisTarget::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fingerprint_lists_live_masters_only() {
        let nodes = "\
b 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
a 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
c 127.0.0.1:30003@40003 master,fail - 0 1 3 disconnected
d 127.0.0.1:30004@40004 slave a 0 1 1 connected
e 127.0.0.1:30005@40005 master,fail? - 0 1 3 connected
";
        assert_eq!(masters_of(nodes), "a,b");
    }
}
