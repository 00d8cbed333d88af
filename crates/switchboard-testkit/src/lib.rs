//! The black-box test kit for Switchboard: what the server package's
//! integration tests (`tests/*.rs`) use to start real processes and talk to
//! them over real sockets. Compiled once, shared by every test binary.
//!
//! - [`RedisServer`] (a private `redis-server`), its [`Spy`] on the bus and
//!   a fault-injecting [`RedisProxy`] in front of it; [`RedisCluster`] (a
//!   private Redis Cluster: failover, slot moves, INFO of every node);
//!   [`ReplicatedRedis`] (a master, replicas and Redis Sentinels): [`redis`].
//! - [`Instance`]: one `switchboard` process started with [`Opts`], built by
//!   the [`opts!`] macro: [`instance`].
//! - [`Client`]: a WebSocket client speaking the JSON protocol, and the
//!   [`Sentinel`] that proves a message did *not* arrive: [`client`],
//!   [`sentinel`].
//! - [`RawWs`]: a WebSocket upgraded by hand, for malformed traffic, floods
//!   and resets: [`raw_ws`]; [`RawHttp`], HTTP/1.1 by hand over a socket
//!   kept open: [`raw_http`].
//! - [`http_request`] and [`HttpResponse`]: [`http`]; [`Metrics`]: [`metrics`].
//! - [`Traffic`] (a sender and a receiver loop under a fault: what was
//!   sent, acked and delivered when) and [`ReadyzWatch`] (every change of
//!   the instances' `/readyz`): [`traffic`].
//! - Presence watches and room member events (`watch`, `members`, the
//!   pushed `presence_event` / `member_*` frames): [`presence`].
//! - [`Tansu`]: a private Kafka-compatible broker (memory storage) for the
//!   Kafka tests, installed by `scripts/install-tansu.sh`: [`tansu`].
//! - [`mint_jwt`], [`eventually`], [`unique`] and the clocks: [`jwt`],
//!   [`wait`], [`misc`].
//!
//! The kit knows the server only from the outside (its command line, its
//! wire protocol, its Redis keys as tests read them); it never links the
//! server crate, so a test of the server's internals does not belong here.

pub mod client;
pub mod http;
pub mod instance;
pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod misc;
pub mod presence;
pub mod raw_http;
pub mod raw_ws;
pub mod redis;
pub mod sentinel;
pub mod tansu;
pub mod traffic;
pub mod wait;

mod process;

pub use self::redis::ReplicatedRedis;
pub use self::redis::{
    cmdstat_calls, info_field, BusMessage, RedisCluster, RedisProxy, RedisServer, Spy,
};
pub use client::{assert_error, assert_healthy, numbered_bodies, ws_request_at, Client, Incoming};
pub use http::{http_request, HttpResponse};
pub use instance::{free_port, Auth, Instance, Opts};
pub use jwt::{mint_jwt, mint_jwt_claims};
pub use metrics::Metrics;
pub use misc::{now_unix_ms, now_unix_secs, unique};
pub use presence::{
    member_event, online_map, presence_event, MEMBER_EVENTS, MEMBER_JOINED, MEMBER_LEFT,
    PRESENCE_EVENT,
};
pub use raw_http::RawHttp;
pub use raw_ws::{encode_client_frame, Ending, RawFrame, RawReader, RawWriter, RawWs};
pub use sentinel::Sentinel;
pub use tansu::{tansu_bin, Tansu};
pub use traffic::{all_ready, outcome, ReadyzWatch, Received, Sent, Traffic};
pub use wait::{eventually, RECV_TIMEOUT};

/// [`Opts`] for an instance of the `switchboard` binary that cargo built
/// for the calling integration test: `opts!("i1")`.
///
/// Only the server package's own integration tests know where that binary
/// is (`CARGO_BIN_EXE_switchboard` is set while cargo compiles them), so the
/// path is read where the macro is expanded, not in this crate.
#[macro_export]
macro_rules! opts {
    ($instance_id:expr) => {
        $crate::Opts::new(env!("CARGO_BIN_EXE_switchboard"), $instance_id)
    };
}
