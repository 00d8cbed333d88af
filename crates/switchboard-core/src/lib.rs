//! Switchboard's core: frames in, routing decisions, frames out.
//!
//! This crate owns the wire protocol ([`protocol`]), the router
//! ([`router`]), the local connection registry ([`registry`]), and the two
//! traits the router talks to — [`presence::Presence`] (who holds which user)
//! and [`bus::Bus`] (publish/subscribe between instances, and the one routing
//! operation) — with their in-process implementation ([`local`]), which is
//! the embedded single-node mode and the second backend every router test
//! runs against.
//!
//! It has no Redis client, no WebSocket and no HTTP library among its
//! dependencies, so nothing here can touch Redis or a socket: the Redis
//! backend lives in `switchboard-redis`, sockets and HTTP in the
//! `switchboard` server crate.

pub mod bus;
pub mod error;
pub mod keyed_lock;
pub mod local;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod queue;
pub mod registry;
pub mod router;
pub mod store;
pub mod watch;

#[cfg(test)]
mod proptests;
